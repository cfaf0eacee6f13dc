//! The client of a `COPY ... TO STDOUT`: the export's bytes as CopyData
//! messages of the frontend/backend protocol.

use std::ffi::c_char;

use pgrx::pg_sys;

/// CopyData messages are built in memory: one huge line must not make one
/// huge message.
const COPY_DATA_MAX: usize = 1 << 20;

/// Sends CopyData messages to the client. [`CopyOut::begin`] announces the
/// copy, [`CopyOut::end`] closes it.
pub struct CopyOut;

impl CopyOut {
    /// CopyOutResponse: one column; binary format for gzip bytes.
    pub fn begin(binary: bool) -> CopyOut {
        let format = u8::from(binary);
        send_message(b'H', &[format, 0, 1, 0, format]);
        CopyOut
    }

    /// CopyDone.
    pub fn end(self) {
        send_message(b'c', &[]);
    }
}

impl std::io::Write for CopyOut {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        for piece in data.chunks(COPY_DATA_MAX) {
            send_message(b'd', piece);
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn send_message(kind: u8, data: &[u8]) {
    // SAFETY: builds one protocol message in a StringInfo and hands it to
    // libpq's send buffer (which blocks when the client is slow).
    unsafe {
        let mut buffer = pg_sys::StringInfoData::default();
        pg_sys::pq_beginmessage(&mut buffer, kind as c_char);
        if !data.is_empty() {
            pg_sys::pq_sendbytes(&mut buffer, data.as_ptr().cast(), data.len() as i32);
        }
        pg_sys::pq_endmessage(&mut buffer);
    }
}
