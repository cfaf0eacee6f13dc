//! The SQL-callable functions. Thin: they validate options, resolve the
//! source and drive an [`Export`] from the calls of a value-per-call
//! set-returning function.

use pgrx::prelude::*;

use crate::destination::bytea::ChunkBuffer;
use crate::engine::export::{Export, LineSink};
use crate::engine::source::Source;
use crate::error::{raise, required};
use crate::options::{
    parse_chunk_rows, parse_chunk_size, Compression, ExportOptions, OptionError, RawOptions,
};
use crate::progress::Destination;
use crate::run;
use crate::sink::{ExportWriter, RecordStats};

/// The longest text value PostgreSQL can hold (MaxAllocSize less the
/// varlena header).
const MAX_TEXT_BYTES: usize = 0x3fff_ffff - 4;

/// The interrupt check handed to pure-Rust loops (cancel, timeouts).
fn check_interrupts() {
    pgrx::check_for_interrupts!();
}

/// Validate the common options or raise `22023`.
fn export_options(raw: RawOptions<'_>) -> ExportOptions {
    ExportOptions::parse(&raw).unwrap_or_else(|e| e.raise())
}

/// One NDJSON line per row of `source`; the footer, if asked, comes last.
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "stream_export", volatile, parallel_unsafe)]
fn stream_export_v2(
    source: Option<&str>,
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, 6),
    key: default!(Option<&str>, "NULL"),
    after: default!(Option<&str>, "NULL"),
    batch_size: default!(Option<i32>, 0),
    footer: default!(Option<bool>, false),
    key_from: default!(Option<&str>, "NULL"),
    key_to: default!(Option<&str>, "NULL"),
    force_array: default!(Option<bool>, false),
    profile: default!(Option<&str>, "'default'"),
    bigint_as_string: default!(Option<bool>, "NULL"),
    numeric_as_string: default!(Option<bool>, "NULL"),
    timestamptz_utc: default!(Option<bool>, "NULL"),
    bytea_base64: default!(Option<bool>, "NULL"),
    omit_nulls: default!(Option<bool>, "NULL"),
) -> SetOfIterator<'static, String> {
    let options = export_options(RawOptions {
        compression,
        compression_level,
        key,
        after,
        batch_size,
        footer,
        key_from,
        key_to,
        force_array,
        profile,
        bigint_as_string,
        numeric_as_string,
        timestamptz_utc,
        bytea_base64,
        omit_nulls,
    });
    if options.compression != Compression::None {
        OptionError {
            message: format!(
                "stream_export returns text lines; compression '{}' is not available here",
                options.compression
            ),
            hint: "use stream_export_bytes or stream_export_to_file for compressed output".into(),
        }
        .raise();
    }
    let mut export = Export::open(
        Source::resolve(required(source, "source")),
        options,
        Destination::Callback,
    );
    export.track("client (stream_export)");
    SetOfIterator::new(LineStream::new(export))
}

/// The text lines of an export, a batch at a time.
struct LineStream {
    export: Export,
    buffer: Vec<u8>,
    ends: Vec<usize>,
    next_line: usize,
    stats: RecordStats,
    finished: bool,
    footer_sent: bool,
    /// With force_array: the `[` and `]` lines, each once.
    opened: bool,
    closed: bool,
}

impl LineStream {
    fn new(export: Export) -> Self {
        LineStream {
            export,
            buffer: Vec::new(),
            ends: Vec::new(),
            next_line: 0,
            stats: RecordStats::default(),
            finished: false,
            footer_sent: false,
            opened: false,
            closed: false,
        }
    }

    fn array(&self) -> bool {
        self.export.options().force_array
    }
}

/// The engine writes into the stream's own buffer; a separate sink view
/// keeps the borrow of the export apart from the buffer's.
struct LineCollector<'a> {
    buffer: &'a mut Vec<u8>,
    ends: &'a mut Vec<usize>,
    stats: &'a mut RecordStats,
    array: bool,
}

impl LineSink for LineCollector<'_> {
    fn buffer(&mut self) -> &mut Vec<u8> {
        if self.array {
            self.buffer
                .push(crate::sink::array::separator(self.stats.rows));
        }
        self.buffer
    }

    fn line_done(&mut self, start: usize) {
        // An array element's separator belongs to its line.
        let from = start - usize::from(self.array);
        self.stats.add(&self.buffer[from..]);
        self.ends.push(self.buffer.len());
    }
}

impl Iterator for LineStream {
    type Item = String;

    fn next(&mut self) -> Option<String> {
        if self.array() && !self.opened {
            self.opened = true;
            self.stats.cover(crate::sink::array::OPEN);
            return Some("[".into());
        }
        loop {
            if self.next_line < self.ends.len() {
                let start = if self.next_line == 0 {
                    0
                } else {
                    self.ends[self.next_line - 1]
                };
                // Without the newline: one value per line.
                let end = self.ends[self.next_line] - 1;
                self.next_line += 1;
                if end - start > MAX_TEXT_BYTES {
                    raise(
                        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                        format!(
                            "an NDJSON line of {} bytes is longer than a text value can be",
                            end - start
                        ),
                        Some("a text value holds at most 1 GB; stream_export_bytes, stream_export_to_file and COPY ... TO have no limit on a line"),
                    );
                }
                return Some(String::from_utf8_lossy(&self.buffer[start..end]).into_owned());
            }
            if self.finished {
                if self.export.options().footer && !self.footer_sent {
                    self.footer_sent = true;
                    let footer = self.export.footer(&self.stats).render();
                    if self.array() {
                        let separator = crate::sink::array::separator(self.stats.rows) as char;
                        return Some(format!("{separator}{footer}"));
                    }
                    return Some(footer);
                }
                if self.array() && !self.closed {
                    self.closed = true;
                    return Some("]".into());
                }
                let (bytes, crc32) = (self.stats.bytes, self.stats.crc32());
                self.export.complete(bytes, Some(crc32));
                return None;
            }
            self.buffer.clear();
            self.ends.clear();
            self.next_line = 0;
            let rows = self.export.next_fetch_rows();
            let mut collector = LineCollector {
                array: self.export.options().force_array,
                buffer: &mut self.buffer,
                ends: &mut self.ends,
                stats: &mut self.stats,
            };
            if self.export.fetch(rows, &mut collector) == 0 {
                self.finished = true;
            }
        }
    }
}

/// The export as a byte stream (`.ndjson` or `.ndjson.gz`) in chunks of
/// `chunk_size` bytes (the last one shorter).
#[allow(clippy::too_many_arguments)]
#[pg_extern(name = "stream_export_bytes", volatile, parallel_unsafe)]
fn stream_export_bytes_v2(
    source: Option<&str>,
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, "NULL"),
    key: default!(Option<&str>, "NULL"),
    after: default!(Option<&str>, "NULL"),
    batch_size: default!(Option<i32>, 0),
    footer: default!(Option<bool>, false),
    key_from: default!(Option<&str>, "NULL"),
    key_to: default!(Option<&str>, "NULL"),
    chunk_size: default!(Option<i32>, 1048576),
    force_array: default!(Option<bool>, false),
    profile: default!(Option<&str>, "'default'"),
    bigint_as_string: default!(Option<bool>, "NULL"),
    numeric_as_string: default!(Option<bool>, "NULL"),
    timestamptz_utc: default!(Option<bool>, "NULL"),
    bytea_base64: default!(Option<bool>, "NULL"),
    omit_nulls: default!(Option<bool>, "NULL"),
) -> SetOfIterator<'static, Vec<u8>> {
    let options = export_options(RawOptions {
        compression,
        compression_level,
        key,
        after,
        batch_size,
        footer,
        key_from,
        key_to,
        force_array,
        profile,
        bigint_as_string,
        numeric_as_string,
        timestamptz_utc,
        bytea_base64,
        omit_nulls,
    });
    let chunk_size = parse_chunk_size(chunk_size).unwrap_or_else(|e| e.raise());
    let mut export = Export::open(
        Source::resolve(required(source, "source")),
        options,
        Destination::Callback,
    );
    export.track("client (stream_export_bytes)");
    let writer = run::writer_for(&export, ChunkBuffer::default());
    SetOfIterator::new(ChunkStream {
        export,
        writer,
        chunk_size,
        finished: None,
    })
}

struct ChunkStream {
    export: Export,
    writer: ExportWriter<ChunkBuffer>,
    chunk_size: usize,
    /// What was written, once the export has no row left.
    finished: Option<run::Counts>,
}

impl Iterator for ChunkStream {
    type Item = Vec<u8>;

    fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            if let Some(chunk) = self
                .writer
                .output()
                .take(self.chunk_size, self.finished.is_some())
            {
                return Some(chunk);
            }
            if let Some(counts) = self.finished {
                self.export.complete(counts.file_bytes, Some(counts.crc32));
                return None;
            }
            if run::step(&mut self.export, &mut self.writer, u64::MAX) == 0 {
                self.finished = Some(run::finish(&self.export, &mut self.writer));
            }
        }
    }
}

/// The resume token for a stream that broke after `last_line`, the last
/// NDJSON line a client received from an export of `source` with `key`.
#[pg_extern(volatile, strict, parallel_unsafe)]
fn stream_export_resume_token(source: &str, key: &str, last_line: &str) -> String {
    let options = export_options(RawOptions {
        key: Some(key),
        ..Default::default()
    });
    let export = Export::open(Source::resolve(source), options, Destination::Callback);
    let key_text: Option<String> = crate::engine::scan::select_one(
        "SELECT ($1::pg_catalog.json) ->> $2",
        &[last_line.into(), key.into()],
    );
    let Some(key_text) = key_text else {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("last_line has no non-null value for key \"{key}\""),
            Some("pass the last line exactly as the export produced it"),
        )
    };
    export.token_after_key_text(&key_text)
}

/// Write the export to a file on the database server, atomically.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(name = "stream_export_to_file", volatile, parallel_unsafe)]
fn stream_export_to_file_v2(
    source: Option<&str>,
    path: Option<&str>,
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, "NULL"),
    key: default!(Option<&str>, "NULL"),
    after: default!(Option<&str>, "NULL"),
    batch_size: default!(Option<i32>, 0),
    footer: default!(Option<bool>, false),
    key_from: default!(Option<&str>, "NULL"),
    key_to: default!(Option<&str>, "NULL"),
    overwrite: default!(Option<bool>, false),
    force_array: default!(Option<bool>, false),
    profile: default!(Option<&str>, "'default'"),
    bigint_as_string: default!(Option<bool>, "NULL"),
    numeric_as_string: default!(Option<bool>, "NULL"),
    timestamptz_utc: default!(Option<bool>, "NULL"),
    bytea_base64: default!(Option<bool>, "NULL"),
    omit_nulls: default!(Option<bool>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(path, String),
        name!(rows, i64),
        name!(bytes, i64),
        name!(file_bytes, i64),
        name!(crc32, String),
        name!(resume_token, Option<String>),
        name!(elapsed, pgrx::datum::Interval),
    ),
> {
    let started = std::time::Instant::now();
    let options = export_options(RawOptions {
        compression,
        compression_level,
        key,
        after,
        batch_size,
        footer,
        key_from,
        key_to,
        force_array,
        profile,
        bigint_as_string,
        numeric_as_string,
        timestamptz_utc,
        bytea_base64,
        omit_nulls,
    });
    let (source, path) = (required(source, "source"), required(path, "path"));
    let written = run::to_target(
        path,
        || Source::resolve(source),
        options,
        overwrite.unwrap_or(false),
    );
    let elapsed = pgrx::datum::Interval::from_micros(started.elapsed().as_micros() as i64);
    TableIterator::once((
        written.path.to_string_lossy().into_owned(),
        written.rows as i64,
        written.bytes as i64,
        written.file_bytes as i64,
        format!("{:08x}", written.crc32),
        written.resume_token,
        elapsed,
    ))
}

/// Check an export file written with `footer => true` against its footer.
#[pg_extern(volatile, strict, parallel_safe)]
fn stream_export_verify(
    path: &str,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(rows, i64),
        name!(bytes, i64),
        name!(crc32, String),
        name!(detail, String),
    ),
> {
    let input = crate::destination::open_for_verify(path);
    let verdict = crate::sink::verify::verify(input, &mut check_interrupts).unwrap_or_else(|e| {
        raise(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("could not read \"{path}\": {e}"),
            None,
        )
    });
    TableIterator::once((
        verdict.ok,
        verdict.rows as i64,
        verdict.bytes as i64,
        format!("{:08x}", verdict.crc32),
        verdict.detail,
    ))
}

/// Split the key range of `source` into `partitions` contiguous ranges:
/// boundaries from the key's histogram in pg_stats, else from a sample of
/// the key. The first lower and the last upper bound are NULL (open); each
/// range is `lower <= key < upper`, so together they cover every key once.
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, strict, parallel_unsafe)]
fn stream_export_plan(
    source: &str,
    key: &str,
    partitions: i32,
) -> TableIterator<
    'static,
    (
        name!(partition, i32),
        name!(lower, Option<String>),
        name!(upper, Option<String>),
        name!(estimated_rows, i64),
    ),
> {
    if !(1..=4096).contains(&partitions) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid value for partitions: {partitions}"),
            Some("partitions must be between 1 and 4096"),
        );
    }
    let options = export_options(RawOptions {
        key: Some(key),
        ..Default::default()
    });
    let export = Export::open(Source::resolve(source), options, Destination::Callback);
    let Some((column, type_name)) = export.key_column_and_type() else {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "a key export has a key",
            None,
        )
    };
    let (boundaries, total) =
        crate::engine::plan::boundaries(export.source(), &column, &type_name, partitions as usize);
    let count = boundaries.len() + 1;
    let per_partition = total / count as i64;
    let rows: Vec<_> = (0..count)
        .map(|i| {
            let lower = if i == 0 {
                None
            } else {
                Some(boundaries[i - 1].clone())
            };
            let upper = boundaries.get(i).cloned();
            (i as i32, lower, upper, per_partition)
        })
        .collect();
    TableIterator::new(rows)
}

/// Export all partitions of `source` at once with background workers that
/// share one snapshot: `part-NNNNN.ndjson[.gz]` files (each with a footer)
/// and `manifest.json`, written last.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
#[pg_extern(name = "stream_export_to_directory", volatile, parallel_unsafe)]
fn stream_export_to_directory_v2(
    source: Option<&str>,
    directory: Option<&str>,
    key: Option<&str>,
    partitions: Option<i32>,
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, "NULL"),
    batch_size: default!(Option<i32>, 0),
    overwrite: default!(Option<bool>, false),
    workers: default!(Option<i32>, "NULL"),
    profile: default!(Option<&str>, "'default'"),
    bigint_as_string: default!(Option<bool>, "NULL"),
    numeric_as_string: default!(Option<bool>, "NULL"),
    timestamptz_utc: default!(Option<bool>, "NULL"),
    bytea_base64: default!(Option<bool>, "NULL"),
    omit_nulls: default!(Option<bool>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(directory, String),
        name!(partitions, i32),
        name!(workers, i32),
        name!(rows, i64),
        name!(bytes, i64),
        name!(file_bytes, i64),
        name!(elapsed, pgrx::datum::Interval),
    ),
> {
    let started = std::time::Instant::now();
    let (source, directory) = (required(source, "source"), required(directory, "directory"));
    let (key, partitions) = (required(key, "key"), required(partitions, "partitions"));
    if !(1..=1024).contains(&partitions) {
        raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid value for partitions: {partitions}"),
            Some("partitions must be between 1 and 1024"),
        );
    }
    let wanted_workers = match workers {
        None => partitions as usize,
        Some(n) if n >= 1 => n as usize,
        Some(n) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid value for workers: {n}"),
            Some("workers must be at least 1 (NULL: one per partition)"),
        ),
    };
    let options = export_options(RawOptions {
        compression,
        compression_level,
        key: Some(key),
        batch_size,
        footer: Some(true),
        profile,
        bigint_as_string,
        numeric_as_string,
        timestamptz_utc,
        bytea_base64,
        omit_nulls,
        ..Default::default()
    });
    let dir = crate::destination::ExportDirectory::open(directory);
    let totals = crate::run::parallel::export_partitioned(
        source,
        &dir,
        key,
        partitions as usize,
        &options,
        wanted_workers,
        overwrite.unwrap_or(false),
        None,
    );
    let elapsed = pgrx::datum::Interval::from_micros(started.elapsed().as_micros() as i64);
    TableIterator::once((
        dir.describe(),
        totals.partitions,
        totals.workers,
        totals.rows,
        totals.bytes,
        totals.file_bytes,
        elapsed,
    ))
}

/// `CALL stream_export_chunked(...)`: the source in key order, one
/// transaction per chunk (see [`crate::run::chunked`]). A procedure, so its SQL
/// definition is written by hand below. It returns nothing (OUT or INOUT
/// parameters would have to be passed in every CALL from PL/pgSQL): a
/// NOTICE and the manifest say what it did.
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn stream_export_chunked(
    source: Option<&str>,
    directory: Option<&str>,
    key: Option<&str>,
    chunk_rows: Option<i64>,
    compression: Option<&str>,
    compression_level: Option<i32>,
    batch_size: Option<i32>,
    overwrite: Option<bool>,
    profile: Option<&str>,
    bigint_as_string: Option<bool>,
    numeric_as_string: Option<bool>,
    timestamptz_utc: Option<bool>,
    bytea_base64: Option<bool>,
    omit_nulls: Option<bool>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    crate::run::chunked::refuse_atomic_call(fcinfo, "stream_export_chunked");
    let (source, directory) = (required(source, "source"), required(directory, "directory"));
    let key = required(key, "key");
    let chunk_rows = parse_chunk_rows(chunk_rows, crate::run::chunked::DEFAULT_CHUNK_ROWS)
        .unwrap_or_else(|e| e.raise());
    let options = export_options(RawOptions {
        compression,
        compression_level,
        key: Some(key),
        batch_size,
        footer: Some(true),
        profile,
        bigint_as_string,
        numeric_as_string,
        timestamptz_utc,
        bytea_base64,
        omit_nulls,
        ..Default::default()
    });
    let dir = crate::destination::ExportDirectory::open(directory);
    let totals = crate::run::chunked::export_chunked(
        Source::resolve(source),
        &dir,
        options,
        chunk_rows,
        overwrite.unwrap_or(false),
    );
    pgrx::notice!(
        "stream_export_chunked: {} rows ({} bytes, {} written) in {} chunk(s), {} of them from an earlier call, in \"{}\"",
        totals.rows,
        totals.bytes,
        totals.file_bytes,
        totals.chunks,
        totals.resumed_chunks,
        dir.describe()
    );
}

pgrx::extension_sql!(
    r#"
CREATE PROCEDURE stream_export_chunked(
    source text,
    directory text,
    key text,
    chunk_rows bigint DEFAULT 1000000,
    compression text DEFAULT 'none',
    compression_level integer DEFAULT NULL,
    batch_size integer DEFAULT 0,
    overwrite boolean DEFAULT false,
    profile text DEFAULT 'default',
    bigint_as_string boolean DEFAULT NULL,
    numeric_as_string boolean DEFAULT NULL,
    timestamptz_utc boolean DEFAULT NULL,
    bytea_base64 boolean DEFAULT NULL,
    omit_nulls boolean DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_chunked_wrapper';
COMMENT ON PROCEDURE stream_export_chunked IS 'Export a source in key order, one committed transaction per chunk, into part files and a manifest in a directory; CALL again to resume.';
"#,
    name = "stream_export_chunked_procedure",
);

/// Check a directory export: every part against its footer and the
/// manifest, and the manifest's totals.
#[pg_extern(volatile, strict, parallel_safe)]
fn stream_export_verify_manifest(
    directory: &str,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(parts, i32),
        name!(rows, i64),
        name!(detail, String),
    ),
> {
    let directory = crate::destination::ExportDirectory::open_for_verify(directory);
    TableIterator::once(run::verify_directory(&directory, &mut check_interrupts))
}

/// The C entry points that version 0.1.0's SQL definitions name, with that
/// version's argument lists. Between installing this library and `ALTER
/// EXTENSION pg_stream_export UPDATE`, a database still on 0.1.0 calls
/// these; without them its calls would read an argument that is not there.
/// They take no SQL definition of their own (0.2.0's functions are the
/// `_v2` entry points above).
mod version_0_1 {
    use pgrx::prelude::*;

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pg_extern(sql = false)]
    fn stream_export_to_directory(
        source: Option<&str>,
        directory: Option<&str>,
        key: Option<&str>,
        partitions: Option<i32>,
        compression: Option<&str>,
        compression_level: Option<i32>,
        batch_size: Option<i32>,
        overwrite: Option<bool>,
        workers: Option<i32>,
    ) -> TableIterator<
        'static,
        (
            name!(directory, String),
            name!(partitions, i32),
            name!(workers, i32),
            name!(rows, i64),
            name!(bytes, i64),
            name!(file_bytes, i64),
            name!(elapsed, pgrx::datum::Interval),
        ),
    > {
        super::stream_export_to_directory_v2(
            source,
            directory,
            key,
            partitions,
            compression,
            compression_level,
            batch_size,
            overwrite,
            workers,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    #[pg_extern(sql = false)]
    fn stream_export(
        source: Option<&str>,
        compression: Option<&str>,
        compression_level: Option<i32>,
        key: Option<&str>,
        after: Option<&str>,
        batch_size: Option<i32>,
        footer: Option<bool>,
        key_from: Option<&str>,
        key_to: Option<&str>,
    ) -> SetOfIterator<'static, String> {
        super::stream_export_v2(
            source,
            compression,
            compression_level,
            key,
            after,
            batch_size,
            footer,
            key_from,
            key_to,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    }

    #[allow(clippy::too_many_arguments)]
    #[pg_extern(sql = false)]
    fn stream_export_bytes(
        source: Option<&str>,
        compression: Option<&str>,
        compression_level: Option<i32>,
        key: Option<&str>,
        after: Option<&str>,
        batch_size: Option<i32>,
        footer: Option<bool>,
        key_from: Option<&str>,
        key_to: Option<&str>,
        chunk_size: Option<i32>,
    ) -> SetOfIterator<'static, Vec<u8>> {
        super::stream_export_bytes_v2(
            source,
            compression,
            compression_level,
            key,
            after,
            batch_size,
            footer,
            key_from,
            key_to,
            chunk_size,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    }

    #[allow(clippy::too_many_arguments, clippy::type_complexity)]
    #[pg_extern(sql = false)]
    fn stream_export_to_file(
        source: Option<&str>,
        path: Option<&str>,
        compression: Option<&str>,
        compression_level: Option<i32>,
        key: Option<&str>,
        after: Option<&str>,
        batch_size: Option<i32>,
        footer: Option<bool>,
        key_from: Option<&str>,
        key_to: Option<&str>,
        overwrite: Option<bool>,
    ) -> TableIterator<
        'static,
        (
            name!(path, String),
            name!(rows, i64),
            name!(bytes, i64),
            name!(file_bytes, i64),
            name!(crc32, String),
            name!(resume_token, Option<String>),
            name!(elapsed, pgrx::datum::Interval),
        ),
    > {
        super::stream_export_to_file_v2(
            source,
            path,
            compression,
            compression_level,
            key,
            after,
            batch_size,
            footer,
            key_from,
            key_to,
            overwrite,
            None,
            None,
            None,
            None,
            None,
            None,
            None,
        )
    }
}

/// Every running export the current role may see (the rows behind the
/// `stream_export_activity` view).
#[allow(clippy::type_complexity)]
#[pg_extern(volatile, parallel_restricted)]
fn stream_export_get_activity() -> TableIterator<
    'static,
    (
        name!(pid, i32),
        name!(leader_pid, Option<i32>),
        name!(partition, Option<i32>),
        name!(role, String),
        name!(database, String),
        name!(source, Option<String>),
        name!(destination, Option<String>),
        name!(format, String),
        name!(started_at, Option<pgrx::datum::TimestampWithTimeZone>),
        name!(rows, i64),
        name!(bytes, i64),
        name!(bytes_written, i64),
        name!(estimated_rows, Option<i64>),
    ),
> {
    TableIterator::new(crate::activity::activity().into_iter().map(|a| {
        (
            a.pid,
            a.leader_pid,
            a.partition,
            a.role,
            a.database,
            a.source,
            a.destination,
            a.format,
            pgrx::datum::TimestampWithTimeZone::try_from(a.started_at).ok(),
            a.rows,
            a.bytes,
            a.written,
            a.estimated_rows,
        )
    }))
}

pgrx::extension_sql!(
    r#"
CREATE VIEW stream_export_activity AS
SELECT a.pid, a.leader_pid, a.partition, a.role, a.database, a.source, a.destination, a.format,
       a.started_at, a.rows, a.bytes, a.bytes_written,
       round((a.rows / greatest(extract(epoch FROM clock_timestamp() - a.started_at), 0.001))::numeric, 1)
           AS rows_per_second,
       a.estimated_rows,
       CASE WHEN a.estimated_rows > 0 AND a.rows <= a.estimated_rows
            THEN round(100.0 * a.rows / a.estimated_rows, 1) END AS percent_done,
       CASE WHEN a.estimated_rows > 0 AND a.rows > 0 AND a.rows <= a.estimated_rows
            THEN (clock_timestamp() - a.started_at) * ((a.estimated_rows - a.rows)::float8 / a.rows) END AS eta
FROM stream_export_get_activity() a;
COMMENT ON VIEW stream_export_activity IS 'Running pg_stream_export exports: one row per export, a directory export''s leader row summing its workers; estimated_rows, percent_done and eta are estimates.';
GRANT SELECT ON stream_export_activity TO PUBLIC;
"#,
    name = "stream_export_activity_view",
    requires = [stream_export_get_activity],
);

pgrx::extension_sql!(
    r#"
-- Roles for object storage, like pg_write_server_files/pg_read_server_files
-- for server files. Roles belong to the cluster, so an earlier install in
-- another database may have created them already.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'stream_export_object_store_write') THEN
        CREATE ROLE stream_export_object_store_write NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'stream_export_object_store_read') THEN
        CREATE ROLE stream_export_object_store_read NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE stream_export_object_store_write IS 'pg_stream_export: may export to object storage (s3:// URIs) with the server''s AWS configuration.';
COMMENT ON ROLE stream_export_object_store_read IS 'pg_stream_export: may read objects (stream_export_verify, stream_export_verify_manifest on s3:// URIs) with the server''s AWS configuration.';
"#,
    name = "object_store_roles",
);
