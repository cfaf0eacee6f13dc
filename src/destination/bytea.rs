//! The rows of `stream_export_bytes`: the export's bytes gathered in memory
//! and handed out as `bytea` values of a fixed size (the last one shorter).

/// Output bytes waiting to be returned as chunks.
#[derive(Default)]
pub struct ChunkBuffer {
    pending: Vec<u8>,
}

impl ChunkBuffer {
    /// The next chunk of `size` bytes, if that many are waiting; at the end
    /// (`finished`), whatever is left.
    pub fn take(&mut self, size: usize, finished: bool) -> Option<Vec<u8>> {
        let ready = self.pending.len();
        if ready >= size || (finished && ready > 0) {
            let rest = self.pending.split_off(ready.min(size));
            Some(std::mem::replace(&mut self.pending, rest))
        } else {
            None
        }
    }
}

impl std::io::Write for ChunkBuffer {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(data);
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn hands_out_fixed_size_chunks_then_the_rest() {
        let mut buffer = ChunkBuffer::default();
        buffer.write_all(b"abcdefg").unwrap();
        assert_eq!(buffer.take(3, false).as_deref(), Some(&b"abc"[..]));
        assert_eq!(buffer.take(3, false).as_deref(), Some(&b"def"[..]));
        assert_eq!(buffer.take(3, false), None);
        assert_eq!(buffer.take(3, true).as_deref(), Some(&b"g"[..]));
        assert_eq!(buffer.take(3, true), None);
    }
}
