//! Where encoded bytes go: a pure-Rust pipeline of counting and checksumming
//! the record bytes, optional gzip or zstd compression, and an [`std::io::Write`]
//! destination (a chunk buffer for `bytea` streams, a file, ...).

pub mod compress;
pub mod deflate;
pub mod verify;

use std::io::{self, Write};

use crate::footer::Footer;
use crate::options::Compression;
use compress::{Codec, ParallelCompressor};

/// Input gathered before it is checksummed and handed on; also the size of
/// the blocks the compression helpers compress independently.
pub const BLOCK_BYTES: usize = 1 << 20;

/// Rows, bytes and CRC-32 of the record lines written so far.
#[derive(Default)]
pub struct RecordStats {
    pub rows: u64,
    pub bytes: u64,
    crc: crc32fast::Hasher,
}

impl RecordStats {
    /// Count one record line (with its newline).
    pub fn add(&mut self, line: &[u8]) {
        self.rows += 1;
        self.bytes += line.len() as u64;
        self.crc.update(line);
    }

    /// Count bytes that are not a record (an array's opening bracket).
    pub fn cover(&mut self, bytes: &[u8]) {
        self.bytes += bytes.len() as u64;
        self.crc.update(bytes);
    }

    pub fn crc32(&self) -> u32 {
        self.crc.clone().finalize()
    }

    /// The footer that covers these records.
    pub fn footer(&self, resume_token: Option<String>) -> Footer {
        Footer {
            rows: self.rows,
            bytes: self.bytes,
            crc32: self.crc32(),
            resume_token,
        }
    }
}

enum Stage {
    Plain,
    Compressed(Box<ParallelCompressor>),
}

impl Stage {
    fn compressed(codec: Codec) -> Stage {
        Stage::Compressed(Box::new(ParallelCompressor::new(
            codec,
            compress::default_workers(),
        )))
    }
}

/// The export pipeline: record lines in, finished output bytes out to `W`.
pub struct ExportWriter<W: Write> {
    block: Vec<u8>,
    stats: RecordStats,
    stage: Stage,
    out: W,
    output_bytes: u64,
    array: bool,
}

/// The lines of a JSON array export (PostgreSQL 19's `COPY ... (FORMAT json,
/// FORCE_ARRAY)`): `[`, then each record prefixed with one space (the first)
/// or a comma (every later one), then `]`, each line ending in a newline.
pub mod array {
    pub const OPEN: &[u8] = b"[\n";
    pub const CLOSE: &[u8] = b"]\n";

    /// What goes before the record (or footer) that follows `rows` records.
    pub fn separator(rows: u64) -> u8 {
        if rows == 0 {
            b' '
        } else {
            b','
        }
    }
}

impl<W: Write> ExportWriter<W> {
    pub fn new(out: W, compression: Compression, level: u32) -> Self {
        let stage = match compression {
            Compression::None => Stage::Plain,
            Compression::Gzip => Stage::compressed(Codec::Gzip(level)),
            Compression::Zstd => Stage::compressed(Codec::Zstd(level as i32)),
        };
        ExportWriter {
            block: Vec::with_capacity(BLOCK_BYTES + (64 << 10)),
            stats: RecordStats::default(),
            stage,
            out,
            output_bytes: 0,
            array: false,
        }
    }

    /// Write one JSON array instead of NDJSON lines (see [`array`]). The
    /// footer, when asked, is the array's last element; the stats cover
    /// every byte before it, the opening bracket and separators included.
    pub fn writing_array(mut self, array: bool) -> Self {
        self.array = array;
        if array {
            self.block.extend_from_slice(array::OPEN);
        }
        self
    }

    /// The buffer the next record line goes to: a caller writes one line
    /// (with its newline) at the end of it and then calls [`Self::end_record`].
    pub fn start_record(&mut self) -> &mut Vec<u8> {
        if self.array {
            self.block.push(array::separator(self.stats.rows));
        }
        &mut self.block
    }

    /// Count the line just appended; hand the block on once it is full.
    pub fn end_record(&mut self) -> io::Result<()> {
        self.stats.rows += 1;
        if self.block.len() >= BLOCK_BYTES {
            self.flush_block()?;
        }
        Ok(())
    }

    /// Append one whole record line (without newline).
    #[cfg(test)]
    pub fn write_record(&mut self, line: &[u8]) -> io::Result<()> {
        self.start_record().extend_from_slice(line);
        self.block.push(b'\n');
        self.end_record()
    }

    fn flush_block(&mut self) -> io::Result<()> {
        if self.block.is_empty() {
            return Ok(());
        }
        self.stats.crc.update(&self.block);
        self.stats.bytes += self.block.len() as u64;
        self.pass_on()
    }

    /// Hand the block to the compression stage or the output.
    fn pass_on(&mut self) -> io::Result<()> {
        match &mut self.stage {
            Stage::Plain => {
                self.out.write_all(&self.block)?;
                self.output_bytes += self.block.len() as u64;
                self.block.clear();
            }
            Stage::Compressed(pool) => {
                let next = pool
                    .spare_input()
                    .unwrap_or_else(|| Vec::with_capacity(BLOCK_BYTES + (64 << 10)));
                let full = std::mem::replace(&mut self.block, next);
                self.output_bytes += pool.submit(full, &mut self.out)?;
                self.output_bytes += pool.drain_ready(&mut self.out)?;
            }
        }
        Ok(())
    }

    /// Move finished compressed output to `W` without waiting.
    pub fn drain(&mut self) -> io::Result<()> {
        if let Stage::Compressed(pool) = &mut self.stage {
            self.output_bytes += pool.drain_ready(&mut self.out)?;
        }
        Ok(())
    }

    pub fn stats(&self) -> &RecordStats {
        &self.stats
    }

    pub fn output(&mut self) -> &mut W {
        &mut self.out
    }

    /// The destination, once the writer is finished.
    pub fn into_output(self) -> W {
        self.out
    }

    /// Output bytes produced so far (the compressed size when compressed).
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes
    }

    /// Flush every record, append the footer line if given (not counted in
    /// the stats) and an array's closing bracket, finish compression and
    /// flush the output.
    pub fn finish(&mut self, footer: Option<&dyn Fn(&RecordStats) -> Footer>) -> io::Result<()> {
        self.flush_block()?;
        if let Some(make_footer) = footer {
            let line = make_footer(&self.stats).render();
            if self.array {
                self.block.push(array::separator(self.stats.rows));
            }
            self.block.extend_from_slice(line.as_bytes());
            self.block.push(b'\n');
        }
        if self.array {
            self.block.extend_from_slice(array::CLOSE);
        }
        if !self.block.is_empty() {
            self.pass_on()?;
        }
        if let Stage::Compressed(pool) = &mut self.stage {
            self.output_bytes += pool.finish(&mut self.out)?;
        }
        self.out.flush()
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;
    use std::io::Read;

    fn gunzip(bytes: &[u8]) -> Vec<u8> {
        // A file of several gzip members is read as one stream.
        let mut out = Vec::new();
        let mut decoder = flate2::read::MultiGzDecoder::new(bytes);
        decoder.read_to_end(&mut out).unwrap();
        out
    }

    fn lines(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| format!("{{\"id\":{i},\"note\":\"{}\"}}", "x".repeat(i % 300)))
            .collect()
    }

    #[test]
    fn plain_output_and_stats() {
        let mut writer = ExportWriter::new(Vec::new(), Compression::None, 6);
        let rows = lines(20_000);
        for line in &rows {
            writer.write_record(line.as_bytes()).unwrap();
        }
        writer.finish(None).unwrap();
        let expected: String = rows.iter().map(|l| format!("{l}\n")).collect();
        assert_eq!(writer.output(), expected.as_bytes());
        assert_eq!(writer.stats().rows, 20_000);
        assert_eq!(writer.stats().bytes, expected.len() as u64);
        let mut crc = crc32fast::Hasher::new();
        crc.update(expected.as_bytes());
        assert_eq!(writer.stats().crc32(), crc.clone().finalize());
        assert_eq!(writer.output_bytes(), expected.len() as u64);
    }

    #[test]
    fn gzip_output_decompresses_to_the_plain_output_with_footer() {
        for level in [0, 1, 6, 9] {
            let mut writer = ExportWriter::new(Vec::new(), Compression::Gzip, level);
            let rows = lines(30_000);
            for line in &rows {
                writer.write_record(line.as_bytes()).unwrap();
            }
            let make = |s: &RecordStats| s.footer(None);
            writer.finish(Some(&make)).unwrap();
            let produced = writer.output_bytes();
            let compressed = std::mem::take(writer.output());
            assert_eq!(produced, compressed.len() as u64);
            let text = String::from_utf8(gunzip(&compressed)).unwrap();
            let mut expected: String = rows.iter().map(|l| format!("{l}\n")).collect();
            let footer = make(writer.stats()).render();
            expected.push_str(&footer);
            expected.push('\n');
            assert_eq!(text, expected, "level {level}");
        }
    }

    #[test]
    fn empty_gzip_export_is_still_a_gzip_file() {
        let mut writer = ExportWriter::new(Vec::new(), Compression::Gzip, 6);
        writer.finish(None).unwrap();
        let compressed = std::mem::take(writer.output());
        assert!(compressed.len() >= 18);
        assert!(gunzip(&compressed).is_empty());
    }
}
