//! The chunked export behind `CALL stream_export_chunked(...)`: the source
//! in key order, one chunk of at most `chunk_rows` rows per transaction,
//! committed before the next one starts, so that no snapshot lives longer
//! than one chunk and VACUUM is never held back by the export as a whole.
//!
//! Each chunk is a part file of the directory layout ([`crate::layout`]),
//! read under one REPEATABLE READ snapshot and written atomically with a
//! footer. After each chunk, a line describing it (with the snapshot it
//! read) is appended to the journal `progress.jsonl`; a later call on the
//! same directory continues after the last chunk it lists. Nothing grows
//! with the number of chunks: the journal is read and copied line by line.
//! When the source is exhausted, `manifest.json` is written (marked
//! `"consistency": "per_chunk"`) from the journal, which is then removed.

use std::ffi::OsStr;

use pgrx::{pg_sys, PgMemoryContexts, PgSqlErrorCode};
use serde_json::{json, Value};

use crate::activity::{Description, Tracked};
use crate::error::raise;
use crate::export::{relation_row_estimate, Export};
use crate::file::raise_io;
use crate::file::{write_partial, Directory, PartialFile};
use crate::layout::{
    commit_manifest, new_export_id, part_name, read_journal, read_listing, remove_stale_parts,
    MANIFEST, PROGRESS,
};
use crate::options::{BatchSize, Compression, ExportOptions};
use crate::progress::Destination;
use crate::source::Source;

/// Rows per chunk unless asked otherwise: about a second of export on
/// ordinary rows, so a snapshot lives for seconds, not hours.
pub const DEFAULT_CHUNK_ROWS: i64 = 1_000_000;

/// Rows per keyset query inside a chunk when `batch_size` is automatic.
const CHUNK_QUERY_ROWS: u64 = 100_000;

/// What the call did.
pub struct ChunkedTotals {
    pub chunks: i32,
    pub resumed_chunks: i32,
    pub rows: i64,
    pub bytes: i64,
    pub file_bytes: i64,
}

/// Refuse a call that cannot commit: one inside a transaction block or
/// from a function (an atomic CALL).
pub fn refuse_atomic_call(fcinfo: pg_sys::FunctionCallInfo) {
    // SAFETY: `fcinfo` is this call's; its context node, when it is a
    // CallContext, says whether the CALL may commit.
    let may_commit = unsafe {
        let context = (*fcinfo).context;
        !context.is_null()
            && (*context).type_ == pg_sys::NodeTag::T_CallContext
            && !(*context.cast::<pg_sys::CallContext>()).atomic
    };
    if !may_commit {
        raise(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "stream_export_chunked cannot run inside a transaction block",
            Some("it commits after every chunk, so it must be CALLed on its own: not inside BEGIN ... COMMIT, and not from a function"),
        );
    }
}

/// An SPI connection that may commit (a CALL's non-atomic one).
struct CommittingSpi;

impl CommittingSpi {
    fn connect() -> CommittingSpi {
        // SAFETY: the caller checked that this CALL is non-atomic; an
        // ERROR later aborts the transaction, whose cleanup closes the
        // connection.
        let rc = unsafe { pg_sys::SPI_connect_ext(pg_sys::SPI_OPT_NONATOMIC as i32) };
        if rc != pg_sys::SPI_OK_CONNECT as i32 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("SPI_connect_ext failed: {rc}"),
                None,
            );
        }
        CommittingSpi
    }

    /// Commit what came before and start the chunk's transaction: one
    /// REPEATABLE READ snapshot for every query of the chunk, pushed as the
    /// active snapshot that the export's cursors read.
    fn begin_chunk(&mut self) {
        // SAFETY: no cursor or snapshot of ours is open here (the last
        // chunk's are closed and popped); SPI_commit starts the next
        // transaction at once, before any snapshot is taken, which is when
        // the isolation level may still be set.
        unsafe {
            pg_sys::SPI_commit();
            pg_sys::SetConfigOption(
                c"transaction_isolation".as_ptr(),
                c"repeatable read".as_ptr(),
                pg_sys::GucContext::PGC_USERSET,
                pg_sys::GucSource::PGC_S_SESSION,
            );
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
    }

    fn end_chunk(&mut self) {
        // SAFETY: pops the snapshot begin_chunk pushed.
        unsafe { pg_sys::PopActiveSnapshot() };
    }

    fn finish(self) {
        // SAFETY: closes the connection made in connect.
        unsafe { pg_sys::SPI_finish() };
    }
}

/// The fixed parts of one chunked export.
struct Job<'a> {
    source: Source,
    options: ExportOptions,
    directory: &'a Directory,
    export_id: String,
    chunk_rows: u64,
}

/// One chunk written and in place.
struct Chunk {
    entry: Value,
    rows: u64,
    resume_token: Option<String>,
}

/// The snapshot a chunk reads, named as PostgreSQL names it.
fn chunk_snapshot() -> (String, String) {
    let snapshot: String =
        crate::scan::select_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
            .unwrap_or_default();
    (snapshot, utc_text("pg_catalog.now()"))
}

/// Write chunk `index`: up to `chunk_rows` rows after `after`. `None` when
/// there was no row left (nothing is written then).
fn write_chunk(
    job: &Job<'_>,
    index: usize,
    after: Option<&str>,
    tracked: &mut Option<Tracked>,
    counted: (u64, u64),
) -> Option<Chunk> {
    let (snapshot, started) = chunk_snapshot();
    let mut options = job.options.clone();
    options.after = after.map(str::to_owned);
    let compression = options.compression;
    let mut export = Export::open(job.source.clone(), options, Destination::File);
    if let Some(tracked) = tracked.take() {
        export.count_in(tracked, counted);
    }
    let name = part_name(&job.export_id, index, compression == Compression::Gzip);
    let mut partial = PartialFile::create(job.directory, OsStr::new(&name), false);
    let (file, counts) = write_partial(&mut export, &mut partial, job.chunk_rows);
    *tracked = export.release_tracked();
    if counts.rows == 0 {
        // The partial file is removed when dropped.
        return None;
    }
    let resume_token = export.resume_token();
    let last_key = export.last_key_text();
    partial.commit(file, false);
    let xmin = snapshot.split(':').next().unwrap_or("").to_string();
    Some(Chunk {
        entry: json!({
            "chunk": index,
            "file": name,
            "after_key": Value::Null, // filled in by the caller
            "last_key": last_key,
            "rows": counts.rows,
            "bytes": counts.bytes,
            "file_bytes": counts.file_bytes,
            "crc32": format!("{:08x}", counts.crc32),
            "snapshot": snapshot,
            "snapshot_xmin": xmin,
            "transaction_started_at": started,
            "resume_token": resume_token,
        }),
        rows: counts.rows,
        resume_token,
    })
}

/// A timestamptz expression as ISO 8601 in UTC with `Z`, whatever the
/// session's settings.
fn utc_text(expression: &str) -> String {
    crate::scan::select_one(
        &format!(
            r#"SELECT pg_catalog.to_char({expression} AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"#
        ),
        &[],
    )
    .unwrap_or_default()
}

fn now_utc() -> String {
    utc_text("pg_catalog.clock_timestamp()")
}

/// The journal's first line: what the export is.
fn journal_header(
    export_id: &str,
    source: &Source,
    key: &str,
    options: &ExportOptions,
    chunk_rows: u64,
) -> Value {
    json!({
        "pg_stream_export_progress": 1,
        "consistency": "per_chunk",
        "export_id": export_id,
        "source": source.canonical(),
        "key": key,
        "compression": options.compression.to_string(),
        "chunk_rows": chunk_rows,
        "started_at": now_utc(),
    })
}

/// Sums over the chunks, and the last chunk's entry.
#[derive(Default)]
struct Tally {
    chunks: usize,
    rows: u64,
    bytes: u64,
    file_bytes: u64,
    last: Option<Value>,
}

impl Tally {
    fn add(&mut self, entry: &Value) {
        self.chunks += 1;
        self.rows += entry["rows"].as_u64().unwrap_or(0);
        self.bytes += entry["bytes"].as_u64().unwrap_or(0);
        self.file_bytes += entry["file_bytes"].as_u64().unwrap_or(0);
        self.last = Some(entry.clone());
    }
}

/// Append one chunk's line to the journal and flush it (when the server
/// flushes files): from here on the chunk counts as done.
fn append_to_journal(journal: &mut std::fs::File, entry: &Value) {
    use std::io::Write;
    let line = entry.to_string() + "\n";
    journal
        .write_all(line.as_bytes())
        .and_then(|_| {
            if crate::file::flush_enabled() {
                journal.sync_data()
            } else {
                Ok(())
            }
        })
        .unwrap_or_else(|e| raise_io(e, PROGRESS));
}

/// Write the manifest: the journal's header as a finished export, the
/// chunk lines as its parts (copied one by one, never all in memory), and
/// the totals; then rename it into place.
fn write_manifest(
    directory: &Directory,
    mut partial: PartialFile,
    header: &Value,
    tally: &Tally,
    overwrite: bool,
) {
    use std::io::{BufRead, Write};
    let mut head = header.clone();
    if let Some(fields) = head.as_object_mut() {
        fields.remove("pg_stream_export_progress");
    }
    head["pg_stream_export_manifest"] = json!(1);
    head["complete"] = json!(true);
    head["finished_at"] = json!(now_utc());
    head["totals"] = json!({
        "chunks": tally.chunks,
        "rows": tally.rows,
        "bytes": tally.bytes,
        "file_bytes": tally.file_bytes,
    });
    let text = serde_json::to_string_pretty(&head).unwrap_or_default();
    let opening = text.trim_end().trim_end_matches('}').trim_end();
    let export_id = header["export_id"].as_str().unwrap_or_default().to_owned();
    let file = partial
        .take_file()
        .unwrap_or_else(|e| raise_io(e, MANIFEST));
    let journal = directory
        .open_regular(OsStr::new(PROGRESS))
        .unwrap_or_else(|e| raise_io(e, PROGRESS));
    let written = (|| -> std::io::Result<std::fs::File> {
        let mut out = std::io::BufWriter::new(file);
        write!(out, "{opening},\n  \"parts\": [")?;
        let lines = std::io::BufReader::new(journal).lines().skip(1);
        let mut first = true;
        for line in lines.take(tally.chunks) {
            let line = line?;
            write!(
                out,
                "{}\n    {}",
                if first { "" } else { "," },
                line.trim_end()
            )?;
            first = false;
        }
        write!(out, "\n  ]\n}}\n")?;
        out.into_inner().map_err(|e| e.into_error())
    })();
    let file = written.unwrap_or_else(|e| raise_io(e, MANIFEST));
    let prefix = format!("part-{export_id}-");
    commit_manifest(directory, partial, file, overwrite, |part| {
        part.starts_with(&prefix)
    });
}

fn unfinished_mismatch(directory: &Directory, header: &Value) -> ! {
    let text = |field: &str| header[field].as_str().unwrap_or("?").to_string();
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "directory \"{}\" holds an unfinished chunked export of a different source, key or compression",
            directory.path().display()
        ),
        Some(&format!(
            "it exports {} by {} with compression {}: CALL again with those to finish it, or use another directory",
            text("source"),
            text("key"),
            text("compression")
        )),
    )
}

/// Run (or resume) a chunked export of `source` into `directory`; the
/// caller has checked that the CALL may commit ([`refuse_atomic_call`]),
/// the privilege, and `options` (which carry the key and `footer`).
pub fn export_chunked(
    source: Source,
    directory: &Directory,
    options: ExportOptions,
    chunk_rows: u64,
    overwrite: bool,
) -> ChunkedTotals {
    let key = options.key.clone().unwrap_or_default();
    // The key and the options are checked before anything is written.
    drop(Export::open(
        source.clone(),
        options.clone(),
        Destination::Callback,
    ));
    let manifest = OsStr::new(MANIFEST);
    if !overwrite && directory.contains(manifest) {
        // A crash between writing the manifest and removing the journal
        // leaves both: the export was finished.
        if let (Some(done), Some((journal, _))) = (
            read_listing(directory, MANIFEST),
            read_journal(directory, |_| {}),
        ) {
            if done["export_id"] == journal["export_id"] {
                let _ = directory.unlink(OsStr::new(PROGRESS));
            }
        }
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!(
                "directory \"{}\" already holds a finished export",
                directory.path().display()
            ),
            Some("use another directory, or pass overwrite => true to export again"),
        );
    }
    // Held until the manifest is in place: one export per directory.
    let manifest_partial = PartialFile::create(directory, manifest, overwrite);
    let mut tally = Tally::default();
    let mut missing: Option<String> = None;
    let resumed = read_journal(directory, |entry| {
        if let Some(name) = entry["file"].as_str() {
            if missing.is_none() && !directory.contains(OsStr::new(name)) {
                missing = Some(name.to_owned());
            }
        }
        tally.add(entry);
    });
    let mut options = options;
    if options.batch_size == BatchSize::Auto {
        // Every query of a chunk reads the chunk's one snapshot, so fewer,
        // larger keyset queries cost nothing in consistency; rows are
        // still fetched about 1 MiB at a time.
        options.batch_size = BatchSize::Fixed(chunk_rows.min(CHUNK_QUERY_ROWS) as u32);
    }
    let (header, mut journal) = match resumed {
        Some((header, good_len)) => {
            let same = header["consistency"] == "per_chunk"
                && header["source"] == source.canonical()
                && header["key"] == key.as_str()
                && header["compression"] == options.compression.to_string().as_str()
                && header["export_id"].is_string();
            if !same {
                unfinished_mismatch(directory, &header);
            }
            if let Some(name) = missing {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
                    format!(
                        "chunk file \"{}\" of the unfinished export is missing",
                        directory.display(OsStr::new(&name))
                    ),
                    Some("remove progress.jsonl and the part files to export from the start"),
                );
            }
            let journal = directory
                .open_append(OsStr::new(PROGRESS))
                .unwrap_or_else(|e| raise_io(e, PROGRESS));
            // A line cut short by a crash is dropped; its chunk is redone.
            journal
                .set_len(good_len)
                .unwrap_or_else(|e| raise_io(e, PROGRESS));
            (header, journal)
        }
        None => {
            let header = journal_header(&new_export_id(), &source, &key, &options, chunk_rows);
            // A journal whose header never made it is stale: start afresh.
            let _ = directory.unlink(OsStr::new(PROGRESS));
            let mut journal = directory
                .open_append(OsStr::new(PROGRESS))
                .unwrap_or_else(|e| raise_io(e, PROGRESS));
            append_to_journal(&mut journal, &header);
            directory.sync().unwrap_or_else(|e| raise_io(e, PROGRESS));
            (header, journal)
        }
    };
    remove_stale_parts(directory);
    let job = Job {
        source,
        options,
        directory,
        export_id: header["export_id"].as_str().unwrap_or_default().to_owned(),
        chunk_rows,
    };
    let resumed_chunks = tally.chunks;
    let mut tracked = Some(Tracked::start(Description {
        source: job.source.description(),
        destination: directory.path().display().to_string(),
        format: format!("{} chunk_rows={chunk_rows}", job.options.describe()),
        estimated_rows: relation_row_estimate(job.source.relation_oid()),
    }));
    let last = tally.last.clone().unwrap_or(Value::Null);
    let mut after: Option<String> = last["resume_token"].as_str().map(str::to_owned);
    let mut last_key: Value = last["last_key"].clone();
    let mut reached_end = last["to_end"] == true;
    let mut spi = CommittingSpi::connect();
    while !reached_end {
        spi.begin_chunk();
        let index = tally.chunks;
        // Each chunk's plans, caches and row memory go with its context.
        // SAFETY: the context is a fresh child of the current one, freed
        // when dropped after the chunk; nothing allocated in it is used
        // after that (the chunk's results are Rust values).
        let chunk = unsafe {
            PgMemoryContexts::new("pg_stream_export chunk").switch_to(|_| {
                write_chunk(
                    &job,
                    index,
                    after.as_deref(),
                    &mut tracked,
                    (tally.rows, tally.bytes),
                )
            })
        };
        spi.end_chunk();
        let Some(mut chunk) = chunk else {
            break;
        };
        reached_end = chunk.rows < job.chunk_rows;
        chunk.entry["after_key"] = last_key;
        chunk.entry["to_end"] = Value::from(reached_end);
        last_key = chunk.entry["last_key"].clone();
        after = chunk.resume_token;
        append_to_journal(&mut journal, &chunk.entry);
        tally.add(&chunk.entry);
        if let Some(tracked) = &mut tracked {
            tracked.written(tally.file_bytes);
        }
    }
    drop(journal);
    write_manifest(directory, manifest_partial, &header, &tally, overwrite);
    let _ = directory.unlink(OsStr::new(PROGRESS));
    spi.finish();
    if let Some(tracked) = &mut tracked {
        tracked.job_progress(tally.rows, tally.bytes);
        tracked.written(tally.file_bytes);
        tracked.complete(None);
    }
    ChunkedTotals {
        chunks: tally.chunks as i32,
        resumed_chunks: resumed_chunks as i32,
        rows: tally.rows as i64,
        bytes: tally.bytes as i64,
        file_bytes: tally.file_bytes as i64,
    }
}
