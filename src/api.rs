//! The SQL-callable functions. Thin: they resolve the source and hand the
//! work to the scan.

use pgrx::prelude::*;

use crate::scan::Cursor;
use crate::source::Source;

/// Rows fetched per batch.
const BATCH_ROWS: i64 = 1000;

/// Alias for the source row; long and odd so that no real column shadows it.
const ROW_ALIAS: &str = "__pg_stream_export_row";

/// One NDJSON line per row of `source`, as `row_to_json(r)::text` renders it.
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export(source: &str) -> SetOfIterator<'static, String> {
    let source = Source::resolve(source);
    let sql = format!(
        "SELECT row_to_json({ROW_ALIAS})::text FROM {} AS {ROW_ALIAS}",
        source.sql_from_item()
    );
    SetOfIterator::new(LineStream::new(Cursor::open(&sql)))
}

/// Walks the cursor batch by batch and yields one line per call.
struct LineStream {
    cursor: Cursor,
    lines: std::vec::IntoIter<String>,
    finished: bool,
}

impl LineStream {
    fn new(cursor: Cursor) -> Self {
        LineStream {
            cursor,
            lines: Vec::new().into_iter(),
            finished: false,
        }
    }
}

impl Iterator for LineStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        loop {
            if let Some(line) = self.lines.next() {
                return Some(line);
            }
            if self.finished {
                return None;
            }
            let (fetched, lines) = self.cursor.fetch(BATCH_ROWS, |batch| {
                (0..batch.len())
                    .map(|row| batch.text(row, 1).unwrap_or("null").to_owned())
                    .collect::<Vec<_>>()
            });
            if fetched == 0 {
                self.finished = true;
                self.cursor.close();
            }
            self.lines = lines.into_iter();
        }
    }
}
