//! The SQL-callable functions. Thin: they resolve the source and hand the
//! work to the scan and the encoder.

use pgrx::prelude::*;

use crate::encode::RowEncoder;
use crate::scan::Cursor;
use crate::source::Source;

/// Rows fetched per batch.
const BATCH_ROWS: i64 = 1000;

/// One NDJSON line per row of `source`, as `row_to_json(r)::text` renders it.
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export(source: &str) -> SetOfIterator<'static, String> {
    let source = Source::resolve(source);
    SetOfIterator::new(LineStream::open(&source))
}

/// Walks the cursor batch by batch and yields one line per call.
struct LineStream {
    cursor: Cursor,
    encoder: RowEncoder,
    /// The current batch: lines back to back, and where each one ends.
    buffer: Vec<u8>,
    ends: Vec<usize>,
    next_line: usize,
    finished: bool,
}

impl LineStream {
    fn open(source: &Source) -> Self {
        let cursor = Cursor::open(&source.select_all_sql());
        // SAFETY: the cursor's descriptor is valid while the cursor is
        // open; the plan's function caches live in the current (per-call
        // set-returning function) memory context, which outlives it.
        let encoder = unsafe { RowEncoder::new(cursor.tupdesc(), pg_sys::CurrentMemoryContext) };
        LineStream {
            cursor,
            encoder,
            buffer: Vec::new(),
            ends: Vec::new(),
            next_line: 0,
            finished: false,
        }
    }

    fn fill(&mut self) {
        self.buffer.clear();
        self.ends.clear();
        self.next_line = 0;
        let (buffer, ends, encoder) = (&mut self.buffer, &mut self.ends, &mut self.encoder);
        let fetched = self.cursor.fetch(BATCH_ROWS, &mut |values, nulls| {
            // SAFETY: the scan hands us the deformed row of the cursor's
            // descriptor, which is what the encoder was planned for.
            unsafe { encoder.encode_values(buffer, values, nulls) };
            ends.push(buffer.len());
        });
        if fetched == 0 {
            self.finished = true;
            self.cursor.close();
        }
    }
}

impl Iterator for LineStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if self.next_line < self.ends.len() {
                let start = if self.next_line == 0 {
                    0
                } else {
                    self.ends[self.next_line - 1]
                };
                let end = self.ends[self.next_line];
                self.next_line += 1;
                // The encoder writes UTF-8 only: names, escaped text and
                // output-function results in a UTF-8 database.
                return Some(String::from_utf8_lossy(&self.buffer[start..end]).into_owned());
            }
            if self.finished {
                return None;
            }
            self.fill();
        }
    }
}
