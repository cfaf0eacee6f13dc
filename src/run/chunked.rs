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
//!
//! In object storage, which cannot append, the journal is the object
//! `progress.json` (the header) and one object `progress-NNNNNNNNNN.json`
//! per finished chunk, each put whole.

use std::collections::BTreeMap;

use pgrx::{pg_sys, PgMemoryContexts, PgSqlErrorCode};
use serde::Deserialize;
use serde_json::Value;

use crate::activity::{Description, Tracked};
use crate::destination::{ExportDirectory, ManifestClaim};
use crate::engine::export::{relation_row_estimate, Export};
use crate::engine::source::Source;
use crate::error::raise;
use crate::layout::{new_export_id, part_name};
use crate::options::{BatchSize, ExportOptions, JsonStyle};
use crate::progress::Destination;
use crate::run;
use crate::run::manifest::{
    write_manifest, ChunkPart, ChunkedExport, Consistency, FinishedChunks, JournalHeader, Totals,
    JOURNAL_VERSION,
};

/// Rows per chunk unless asked otherwise: about a second of export on
/// ordinary rows, so a snapshot lives for seconds, not hours.
pub const DEFAULT_CHUNK_ROWS: u64 = 1_000_000;

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
pub fn refuse_atomic_call(fcinfo: pg_sys::FunctionCallInfo, procedure: &str) {
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
            format!("{procedure} cannot run inside a transaction block"),
            Some("it commits after every chunk, so it must be CALLed on its own: not inside BEGIN ... COMMIT, and not from a function"),
        );
    }
}

/// An SPI connection that may commit (a CALL's non-atomic one).
pub(super) struct CommittingSpi;

impl CommittingSpi {
    pub(super) fn connect() -> CommittingSpi {
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
    pub(super) fn begin_chunk(&mut self) {
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

    pub(super) fn end_chunk(&mut self) {
        // SAFETY: pops the snapshot begin_chunk pushed.
        unsafe { pg_sys::PopActiveSnapshot() };
    }

    pub(super) fn finish(self) {
        // SAFETY: closes the connection made in connect.
        unsafe { pg_sys::SPI_finish() };
    }
}

/// The fixed parts of one chunked export.
struct Job<'a> {
    source: Source,
    options: ExportOptions,
    directory: &'a ExportDirectory,
    export_id: String,
    chunk_rows: u64,
}

/// One chunk written and in place.
struct Chunk {
    part: ChunkPart,
    rows: u64,
    resume_token: Option<String>,
}

/// The snapshot a chunk reads, named as PostgreSQL names it.
pub(super) fn chunk_snapshot() -> (String, String) {
    let snapshot: String =
        crate::engine::scan::select_one("SELECT pg_catalog.pg_current_snapshot()::text", &[])
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
    let name = part_name(&job.export_id, index, compression.file_suffix());
    let written = run::to_part_if_any(job.directory, &mut export, &name, job.chunk_rows);
    *tracked = export.release_tracked();
    let counts = written?;
    let resume_token = export.resume_token();
    let xmin = snapshot.split(':').next().unwrap_or("").to_string();
    Some(Chunk {
        part: ChunkPart {
            chunk: index,
            file: name,
            after_key: None, // filled in by the caller
            last_key: export.last_key_text(),
            rows: counts.rows,
            bytes: counts.bytes,
            file_bytes: counts.file_bytes,
            crc32: format!("{:08x}", counts.crc32),
            snapshot,
            snapshot_xmin: xmin,
            transaction_started_at: started,
            resume_token: resume_token.clone(),
            to_end: false, // filled in by the caller
        },
        rows: counts.rows,
        resume_token,
    })
}

/// A timestamptz expression as ISO 8601 in UTC with `Z`, whatever the
/// session's settings.
fn utc_text(expression: &str) -> String {
    crate::engine::scan::select_one(
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

/// What this call exports, as the journal records it.
fn chunked_export(
    export_id: &str,
    source: &Source,
    key: &str,
    options: &ExportOptions,
    chunk_rows: u64,
) -> ChunkedExport {
    let on = options.style.names();
    ChunkedExport {
        consistency: Consistency::PerChunk,
        export_id: export_id.to_owned(),
        source: Some(source.canonical().to_owned()),
        key: Some(key.to_owned()),
        compression: Some(options.compression.to_string()),
        compression_level: Some(i64::from(options.compression_level)),
        footer: Some(true),
        // Every type option, on or off.
        style: JsonStyle::ALL_NAMES
            .iter()
            .map(|name| (name.to_string(), on.contains(name)))
            .collect::<BTreeMap<_, _>>(),
        chunk_rows: Some(chunk_rows),
        started_at: Some(now_utc()),
    }
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or("?").to_string()
}

/// The first option that changes the bytes of the parts and that the
/// unfinished export `recorded` used differently from this call's
/// (`wanted`), with the journal's value and the call's; `None` when they
/// all agree.
fn differing_option(
    recorded: &ChunkedExport,
    wanted: &ChunkedExport,
) -> Option<(&'static str, String, String)> {
    fn text<T: ToString>(value: Option<&T>) -> String {
        value.map_or_else(|| "(not recorded)".to_string(), T::to_string)
    }
    let mut checks: Vec<(&'static str, String, String)> = vec![
        (
            "source",
            text(recorded.source.as_ref()),
            text(wanted.source.as_ref()),
        ),
        (
            "key",
            text(recorded.key.as_ref()),
            text(wanted.key.as_ref()),
        ),
        (
            "compression",
            text(recorded.compression.as_ref()),
            text(wanted.compression.as_ref()),
        ),
        (
            "footer",
            text(recorded.footer.as_ref()),
            text(wanted.footer.as_ref()),
        ),
    ];
    if wanted.compression.as_deref() != Some("none") {
        checks.push((
            "compression_level",
            text(recorded.compression_level.as_ref()),
            text(wanted.compression_level.as_ref()),
        ));
    }
    for name in JsonStyle::ALL_NAMES {
        checks.push((
            name,
            text(recorded.style.get(name)),
            text(wanted.style.get(name)),
        ));
    }
    checks
        .into_iter()
        .find(|(_, recorded, wanted)| recorded != wanted)
}

/// Sums over the chunks, and the last chunk.
#[derive(Default)]
struct Tally {
    chunks: usize,
    rows: u64,
    bytes: u64,
    file_bytes: u64,
    last: Option<ChunkPart>,
}

impl Tally {
    fn add(&mut self, part: ChunkPart) {
        self.chunks += 1;
        self.rows += part.rows;
        self.bytes += part.bytes;
        self.file_bytes += part.file_bytes;
        self.last = Some(part);
    }
}

/// A journal line as a chunk; one that does not read as a chunk counts
/// as an empty one.
fn chunk_part_of(entry: &Value) -> ChunkPart {
    ChunkPart::deserialize(entry).unwrap_or_default()
}

/// Write the manifest from the journal and put it in place (the commit
/// point); the journal's chunks become its parts, read and copied one by
/// one. Then the parts of the export it replaced are removed, and the
/// journal.
fn commit_manifest(
    directory: &ExportDirectory,
    claim: ManifestClaim,
    export: &ChunkedExport,
    tally: &Tally,
    overwrite: bool,
) {
    let finished = FinishedChunks {
        export,
        complete: true,
        finished_at: now_utc(),
    };
    let totals = Totals {
        chunks: Some(tally.chunks),
        rows: tally.rows,
        bytes: tally.bytes,
        file_bytes: tally.file_bytes,
        ..Totals::default()
    };
    directory.commit_manifest(
        claim,
        &export.export_id,
        overwrite,
        &mut |out| {
            let parts = directory.journal_entries(tally.chunks).map(|line| {
                let line = line?;
                serde_json::from_str::<Value>(&line)
                    .map(|entry| chunk_part_of(&entry))
                    .map_err(std::io::Error::other)
            });
            write_manifest(out, &finished, &totals, parts)
        },
        // A chunked export keeps its parts when it fails (to go on later).
        &mut || {},
        // The journal goes inside the commit point: a cancel can neither
        // fail the committed call nor leave the journal of a finished
        // export for a later call to take up.
        &mut || directory.remove_journal(),
    );
}

fn unfinished_mismatch(
    directory: &ExportDirectory,
    header: &Value,
    option: (&str, String, String),
) -> ! {
    let text = |field: &str| header[field].as_str().unwrap_or("?").to_string();
    let (name, recorded, wanted) = option;
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "directory \"{}\" holds an unfinished chunked export with a different {name}: {recorded}, not {wanted}",
            directory.describe()
        ),
        Some(&format!(
            "it exports {} by {} with compression {}: CALL again with the options it was started with to finish it, or use another directory",
            text("source"),
            text("key"),
            text("compression")
        )),
    )
}

/// `58P02` for a finished export in `directory`, unless `overwrite`. The
/// journal of the finished export (left by a crash or a cancel while it
/// was being removed) goes either way: it must not be resumed.
fn refuse_finished(directory: &ExportDirectory, overwrite: bool) {
    let finished = directory.finished_export();
    if !overwrite && finished {
        raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!(
                "directory \"{}\" already holds a finished export",
                directory.describe()
            ),
            Some("use another directory, or pass overwrite => true to export again"),
        );
    }
}

/// Run (or resume) a chunked export of `source` into `directory`; the
/// caller has checked that the CALL may commit ([`refuse_atomic_call`]),
/// the privilege, and `options` (which carry the key and `footer`).
pub fn export_chunked(
    source: Source,
    directory: &ExportDirectory,
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
    // Under a prefix the claim (its lease) comes first, so that nothing
    // there is read or removed while another export writes; a server
    // directory's finished export is named (and its stale journal
    // removed) before the claim on its manifest.
    let claim = match directory {
        ExportDirectory::Prefix(_) => {
            let claim = directory.claim_for_chunks(overwrite);
            refuse_finished(directory, overwrite);
            claim
        }
        ExportDirectory::Server(_) => {
            refuse_finished(directory, overwrite);
            directory.claim_for_chunks(overwrite)
        }
    };
    let mut tally = Tally::default();
    let mut missing: Option<String> = None;
    let present = directory.parts_present();
    let resumed = directory.read_journal(|entry| {
        let part = chunk_part_of(entry);
        if !part.file.is_empty() && missing.is_none() && !present(&part.file) {
            missing = Some(part.file.clone());
        }
        tally.add(part);
    });
    drop(present);
    let mut options = options;
    if options.batch_size == BatchSize::Auto {
        // Every query of a chunk reads the chunk's one snapshot, so fewer,
        // larger keyset queries cost nothing in consistency; rows are
        // still fetched about 1 MiB at a time.
        options.batch_size = BatchSize::Fixed(chunk_rows.min(CHUNK_QUERY_ROWS) as u32);
    }
    let wanted = chunked_export(&new_export_id(), &source, &key, &options, chunk_rows);
    let (export, mut journal) = match resumed {
        Some((header, good_len)) => {
            let recorded = serde_json::from_value::<JournalHeader>(header.clone())
                .ok()
                .map(|h| h.export)
                .filter(|export| export.consistency == Consistency::PerChunk);
            let Some(recorded) = recorded else {
                unfinished_mismatch(
                    directory,
                    &header,
                    (
                        "format",
                        text_of(&header["consistency"]),
                        "per_chunk".to_string(),
                    ),
                );
            };
            if let Some(option) = differing_option(&recorded, &wanted) {
                unfinished_mismatch(directory, &header, option);
            }
            if let Some(name) = missing {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
                    format!(
                        "chunk file \"{name}\" of the unfinished export in \"{}\" is missing",
                        directory.describe()
                    ),
                    Some("remove the journal (progress.jsonl, or the progress objects) and the part files to export from the start"),
                );
            }
            (recorded, directory.resume_journal(good_len))
        }
        None => {
            let header = JournalHeader {
                pg_stream_export_progress: JOURNAL_VERSION,
                export: wanted,
            };
            let journal = directory.new_journal(&serde_json::to_value(&header).unwrap_or_default());
            (header.export, journal)
        }
    };
    directory.remove_stale_parts(&claim);
    let job = Job {
        source,
        options,
        directory,
        export_id: export.export_id.clone(),
        chunk_rows,
    };
    let resumed_chunks = tally.chunks;
    let mut tracked = Some(Tracked::start(Description {
        source: job.source.description(),
        destination: directory.describe(),
        format: format!("{} chunk_rows={chunk_rows}", job.options.describe()),
        estimated_rows: relation_row_estimate(job.source.relation_oid()),
    }));
    let last = tally.last.clone().unwrap_or_default();
    let mut after: Option<String> = last.resume_token;
    let mut last_key: Option<String> = last.last_key;
    let mut reached_end = last.to_end;
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
        chunk.part.after_key = last_key;
        chunk.part.to_end = reached_end;
        last_key = chunk.part.last_key.clone();
        after = chunk.resume_token;
        directory.check_claim(&claim);
        let entry = serde_json::to_value(&chunk.part).unwrap_or_default();
        directory.append_journal(&mut journal, index, &entry);
        tally.add(chunk.part);
        if let Some(tracked) = &mut tracked {
            tracked.written(tally.file_bytes);
        }
    }
    drop(journal);
    commit_manifest(directory, claim, &export, &tally, overwrite);
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
