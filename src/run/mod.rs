//! Running an export into a destination: the only layer that names both
//! an [`Export`] (the engine) and where its bytes go (`crate::destination`).
//!
//! Every export that writes bytes goes through [`pump`]: the engine's
//! batches are encoded into an [`ExportWriter`] (framing, footer, CRC,
//! compression), which writes into the destination's `io::Write`. A
//! single-target export ([`to_target`], [`to_output`], COPY TO STDOUT) is
//! one [`Single`] run: open the export, show it in the activity
//! view, pump it whole, let the destination commit, then mark it complete.
//! Directory workers ([`to_part`]) and chunked exports use the same pieces.

pub mod archive;
mod archive_checks;
mod catalog;
pub mod chunked;
pub mod cluster;
pub mod jobs;
pub mod manifest;
pub mod parallel;

use std::io::Write;
use std::path::PathBuf;

use crate::destination::file::raise_io;
use crate::destination::object;
use crate::destination::output::Output;
use crate::destination::{ExportDirectory, Target};
use crate::engine::export::{Export, LineSink};
use crate::engine::source::Source;
use crate::options::ExportOptions;
use crate::progress::Destination;
use crate::sink::ExportWriter;

/// What a run wrote into its output.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    /// Record rows.
    pub rows: u64,
    /// Uncompressed bytes (framing and footer included).
    pub bytes: u64,
    /// Bytes written to the destination (compressed when compressed).
    pub file_bytes: u64,
    /// CRC-32 of the uncompressed bytes.
    pub crc32: u32,
}

/// What a single-target export wrote, once in place.
pub struct Written {
    /// The file's path, or the object's URI.
    pub path: PathBuf,
    pub rows: u64,
    pub bytes: u64,
    pub file_bytes: u64,
    pub crc32: u32,
    pub resume_token: Option<String>,
}

/// Lets the engine append lines straight into an [`ExportWriter`]'s block.
pub struct WriterSink<'a, W: Write>(pub &'a mut ExportWriter<W>);

impl<W: Write> LineSink for WriterSink<'_, W> {
    fn buffer(&mut self) -> &mut Vec<u8> {
        self.0.start_record()
    }

    fn line_done(&mut self, _start: usize) {
        if let Err(e) = self.0.end_record() {
            raise_io(e, "export output");
        }
    }
}

/// A writer for `export`'s output options, writing into `out`.
pub fn writer_for<W: Write>(export: &Export, out: W) -> ExportWriter<W> {
    let options = export.options();
    ExportWriter::new(out, options.compression, options.compression_level)
        .writing_array(options.force_array)
}

/// One batch of `export` (at most `limit` rows) into `writer`: the rows
/// written, 0 when the export has no row left.
pub fn step<W: Write>(export: &mut Export, writer: &mut ExportWriter<W>, limit: u64) -> u64 {
    let rows = export.next_fetch_rows().min(limit);
    let fetched = export.fetch(rows, &mut WriterSink(writer));
    if fetched > 0 {
        writer
            .drain()
            .unwrap_or_else(|e| raise_io(e, "export output"));
        export.note_written(writer.output_bytes());
    }
    fetched
}

/// Finish `writer` (the footer when asked) and say what it wrote.
pub fn finish<W: Write>(export: &Export, writer: &mut ExportWriter<W>) -> Counts {
    export
        .finish_writer(writer)
        .unwrap_or_else(|e| raise_io(e, "export output"));
    let stats = writer.stats();
    Counts {
        rows: stats.rows,
        bytes: stats.bytes,
        file_bytes: writer.output_bytes(),
        crc32: stats.crc32(),
    }
}

/// The pipeline run: `export`, at most `limit` rows (footer included when
/// asked), into `out`; returns `out`, not committed, for the destination to
/// commit (or to drop), and what was written.
pub fn pump<W: Write>(export: &mut Export, out: W, limit: u64) -> (W, Counts) {
    let mut writer = writer_for(export, out);
    let mut written = 0;
    while written < limit {
        let fetched = step(export, &mut writer, limit - written);
        if fetched == 0 {
            break;
        }
        written += fetched;
    }
    let counts = finish(export, &mut writer);
    (writer.into_output(), counts)
}

/// A single-target export: opened, shown in the activity view, pumped
/// whole, committed by its destination, then complete.
pub struct Single {
    export: Export,
}

impl Single {
    /// Open the export of `source`; `shown_as` is its destination in the
    /// activity view and the audit line.
    pub fn open(source: Source, options: ExportOptions, kind: Destination, shown_as: &str) -> Self {
        Single::of(Export::open(source, options, kind), shown_as)
    }

    /// An export opened (and set up) by the caller, as [`Single::open`]
    /// would show it.
    pub fn of(mut export: Export, shown_as: &str) -> Self {
        export.track(shown_as);
        Single { export }
    }

    /// Pump the whole export into `out`, then `commit` it (the commit point
    /// of the destination: a rename, an upload's completion, the end of a
    /// COPY), knowing what was written; the export is complete once that
    /// returns.
    pub fn run<W: Write, R>(
        mut self,
        out: W,
        commit: impl FnOnce(W, &Counts) -> R,
    ) -> (R, Counts, Option<String>) {
        let (out, counts) = pump(&mut self.export, out, u64::MAX);
        let resume_token = self.export.resume_token();
        let committed = commit(out, &counts);
        self.export.complete(counts.file_bytes, Some(counts.crc32));
        (committed, counts, resume_token)
    }
}

fn written(path: PathBuf, counts: Counts, resume_token: Option<String>) -> Written {
    Written {
        path,
        rows: counts.rows,
        bytes: counts.bytes,
        file_bytes: counts.file_bytes,
        crc32: counts.crc32,
        resume_token,
    }
}

/// Export `source` into `output` (a file or an object, see
/// [`Output`]), committed at the end; the caller has checked the privilege.
pub fn to_output(source: Source, options: ExportOptions, output: Output) -> Written {
    let single = Single::open(source, options, Destination::File, &output.describe());
    let (path, counts, resume_token) = single.run(output, |output, _| output.commit_export());
    written(path, counts, resume_token)
}

/// Export to a server-side target, atomically: a file (written as a
/// `.partial` file and renamed) or an object (a multipart upload completed
/// at the end). Privilege checks come first, then the target, then
/// `source()`; `overwrite` says whether an existing file or object may be
/// replaced.
pub fn to_target(
    target: &str,
    source: impl FnOnce() -> Source,
    options: ExportOptions,
    overwrite: bool,
) -> Written {
    match Target::parse(target, false) {
        Target::Object(uri) => {
            object::check_write_privilege();
            let source = source();
            let output = Output::object(&uri, overwrite);
            to_output(source, options, output)
        }
        Target::Path(path) => {
            crate::destination::file::check_write_privilege();
            let (directory, name) = crate::destination::file::resolve_target(path);
            let source = source();
            let output = Output::file(&directory, &name, overwrite);
            to_output(source, options, output)
        }
    }
}

/// Export into a shell command's standard input (COPY ... TO PROGRAM):
/// the privilege first, then `source()`, then the command.
pub fn to_program(
    command: &str,
    source: impl FnOnce() -> Source,
    options: ExportOptions,
) -> Written {
    crate::destination::program::check_privilege();
    let source = source();
    to_output(source, options, Output::program(command))
}

/// Export one part file `name` of a directory export (never replacing one).
pub fn to_part(
    directory: &ExportDirectory,
    source: Source,
    options: ExportOptions,
    name: &str,
) -> Written {
    to_output(source, options, directory.create_part(name, false))
}

/// Run `export` (at most `limit` rows) into the part file `name` of
/// `directory`, replacing one there (a part written but not recorded
/// before a crash); in place when it returns, `None` (and nothing written)
/// without rows.
pub fn to_part_if_any(
    directory: &ExportDirectory,
    export: &mut Export,
    name: &str,
    limit: u64,
) -> Option<Counts> {
    let output = directory.create_part(name, true);
    let (output, counts) = pump(export, output, limit);
    if counts.rows == 0 {
        // Dropped uncommitted, it leaves nothing.
        return None;
    }
    output.commit();
    Some(counts)
}

/// Check a directory export against its manifest (see
/// [`crate::sink::verify::verify_directory`]), reading its files where they are.
pub fn verify_directory(
    directory: &ExportDirectory,
    interrupt: &mut dyn FnMut(),
) -> (bool, i32, i64, String) {
    crate::sink::verify::verify_directory(
        &mut |name| directory.open_file(name),
        interrupt,
        &mut |large| {
            crate::error::raise(
                pgrx::PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                large.to_string(),
                Some("No export of this extension writes a manifest that large; check where it came from."),
            )
        },
    )
}
