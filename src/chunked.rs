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

use std::ffi::OsStr;
use std::sync::Arc;

use pgrx::{pg_sys, PgMemoryContexts, PgSqlErrorCode};
use serde_json::{json, Value};

use crate::activity::{Description, Tracked};
use crate::destination::file::{raise_io, Directory, PartialFile};
use crate::destination::listing::{
    commit_manifest, read_journal, read_listing, remove_stale_parts,
};
use crate::destination::object::client::{Client, Failure};
use crate::destination::object::uri::ObjectUri;
use crate::destination::object::{self, raise_store_error, raise_upload_error};
use crate::destination::ExportDirectory;
use crate::error::raise;
use crate::export::{relation_row_estimate, Export};
use crate::layout::{
    export_id_of_part, is_part_file_name, manifest_parts, new_export_id, part_name, read_manifest,
    MANIFEST, PROGRESS, PROGRESS_HEADER,
};
use crate::options::{BatchSize, Compression, ExportOptions};
use crate::progress::Destination;
use crate::run::{self, Counts};
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

/// The journal object of chunk `index` in object storage.
fn progress_entry_name(index: usize) -> String {
    format!("progress-{index:010}.json")
}

/// Is `name` one of the journal's objects?
fn is_journal_object(name: &str) -> bool {
    name == PROGRESS_HEADER
        || name
            .strip_prefix("progress-")
            .and_then(|rest| rest.strip_suffix(".json"))
            .is_some_and(|n| n.len() == 10 && n.bytes().all(|b| b.is_ascii_digit()))
}

/// Where a chunked export goes.
enum Place<'a> {
    Server(&'a Directory),
    Prefix {
        prefix: &'a ObjectUri,
        client: Arc<Client>,
    },
}

/// The journal, open for new chunks.
enum Journal {
    File(std::fs::File),
    Objects,
}

/// Held until the manifest is in place.
enum Claim {
    /// The locked `manifest.json.partial`: one export per directory.
    Server(PartialFile),
    /// The prefix's lease (one export at a time), and the parts of the
    /// finished export a manifest being replaced lists.
    Prefix(Vec<String>, object::Lease),
}

fn read_object(client: &Client, uri: &ObjectUri) -> Option<Value> {
    match client.get(uri) {
        Ok(reader) => read_manifest(reader),
        Err(e) if e.failure == Failure::NotFound => None,
        Err(e) => raise_store_error(&e, "read", Some(uri)),
    }
}

fn put_object(client: &Client, uri: &ObjectUri, value: &Value) {
    client
        .put(uri, (value.to_string() + "\n").as_bytes(), true)
        .unwrap_or_else(|e| raise_store_error(&e, "write", Some(uri)));
}

/// The names (relative to `prefix`) of the objects under `prefix` whose
/// names start with `start`, in order.
fn names_under(client: &Client, prefix: &ObjectUri, start: &str) -> Vec<String> {
    let listed = client
        .list(&prefix.join(start))
        .unwrap_or_else(|e| raise_store_error(&e, "list", Some(prefix)));
    listed
        .into_iter()
        .filter_map(|key| key.strip_prefix(prefix.key.as_str()).map(str::to_owned))
        .collect()
}

impl Place<'_> {
    fn describe(&self) -> String {
        match self {
            Place::Server(dir) => dir.path().display().to_string(),
            Place::Prefix { prefix, .. } => prefix.to_string(),
        }
    }

    /// `58P02` for a finished export here, unless `overwrite`.
    fn refuse_finished(&self, overwrite: bool) {
        if overwrite {
            return;
        }
        let finished = match self {
            Place::Server(directory) => {
                let finished = directory.contains(OsStr::new(MANIFEST));
                // A crash between writing the manifest and removing the
                // journal leaves both: the export was finished.
                if let (Some(done), Some((journal, _))) = (
                    read_listing(directory, MANIFEST),
                    read_journal(directory, |_| {}),
                ) {
                    if done["export_id"] == journal["export_id"] {
                        let _ = directory.unlink(OsStr::new(PROGRESS));
                    }
                }
                finished
            }
            Place::Prefix { prefix, client } => {
                let done = read_object(client, &prefix.join(MANIFEST));
                if let (Some(done), Some(journal)) =
                    (&done, read_object(client, &prefix.join(PROGRESS_HEADER)))
                {
                    if done["export_id"] == journal["export_id"] {
                        self.remove_journal();
                    }
                }
                done.is_some()
            }
        };
        if finished {
            raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!(
                    "directory \"{}\" already holds a finished export",
                    self.describe()
                ),
                Some("use another directory, or pass overwrite => true to export again"),
            );
        }
    }

    fn claim(&self, overwrite: bool) -> Claim {
        match self {
            Place::Server(directory) => Claim::Server(PartialFile::create(
                directory,
                OsStr::new(MANIFEST),
                overwrite,
            )),
            Place::Prefix { prefix, client } => {
                let lease = object::acquire_lease(client, prefix, "chunked");
                let replaced = read_object(client, &prefix.join(MANIFEST))
                    .map(|m| manifest_parts(&m))
                    .unwrap_or_default();
                Claim::Prefix(replaced, lease)
            }
        }
    }

    /// The journal's header and, through `on_entry`, its chunks in order;
    /// with where the intact lines of a journal file end.
    fn read_journal(&self, mut on_entry: impl FnMut(&Value)) -> Option<(Value, u64)> {
        match self {
            Place::Server(directory) => read_journal(directory, on_entry),
            Place::Prefix { prefix, client } => {
                let header = read_object(client, &prefix.join(PROGRESS_HEADER))?;
                let names = names_under(client, prefix, "progress-");
                let entries = names.iter().filter(|n| is_journal_object(n));
                for (index, name) in entries.enumerate() {
                    if *name != progress_entry_name(index) {
                        break;
                    }
                    match read_object(client, &prefix.join(name)) {
                        Some(entry) => on_entry(&entry),
                        None => break,
                    }
                }
                Some((header, 0))
            }
        }
    }

    /// Which part files are there.
    fn parts_present(&self) -> Box<dyn Fn(&str) -> bool + '_> {
        match self {
            Place::Server(directory) => {
                Box::new(move |name: &str| directory.contains(OsStr::new(name)))
            }
            Place::Prefix { prefix, client } => {
                let names: std::collections::HashSet<String> =
                    names_under(client, prefix, "part-").into_iter().collect();
                Box::new(move |name: &str| names.contains(name))
            }
        }
    }

    /// Continue the journal after its intact lines.
    fn resume_journal(&self, good_len: u64) -> Journal {
        match self {
            Place::Server(directory) => {
                let journal = directory
                    .open_append(OsStr::new(PROGRESS))
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                // A line cut short by a crash is dropped; its chunk is redone.
                journal
                    .set_len(good_len)
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                Journal::File(journal)
            }
            Place::Prefix { .. } => Journal::Objects,
        }
    }

    /// Start a journal afresh with `header`.
    fn new_journal(&self, header: &Value) -> Journal {
        // A journal whose header never made it is stale.
        self.remove_journal();
        match self {
            Place::Server(directory) => {
                let mut journal = directory
                    .open_append(OsStr::new(PROGRESS))
                    .unwrap_or_else(|e| raise_io(e, PROGRESS));
                append_to_journal(&mut journal, header);
                directory.sync().unwrap_or_else(|e| raise_io(e, PROGRESS));
                Journal::File(journal)
            }
            Place::Prefix { prefix, client } => {
                put_object(client, &prefix.join(PROGRESS_HEADER), header);
                Journal::Objects
            }
        }
    }

    /// Record chunk `index` as done.
    fn append(&self, journal: &mut Journal, index: usize, entry: &Value) {
        match (self, journal) {
            (_, Journal::File(file)) => append_to_journal(file, entry),
            (Place::Prefix { prefix, client }, Journal::Objects) => {
                put_object(client, &prefix.join(&progress_entry_name(index)), entry)
            }
            (Place::Server(_), Journal::Objects) => {
                unreachable!("a server directory's journal is a file")
            }
        }
    }

    /// Remove the journal (best effort: it is only read to resume).
    fn remove_journal(&self) {
        match self {
            Place::Server(directory) => {
                let _ = directory.unlink(OsStr::new(PROGRESS));
            }
            Place::Prefix { prefix, client } => {
                let _ = object::delete_under(client, prefix, "progress", is_journal_object);
            }
        }
    }

    /// Remove part files of exports that did not finish: neither the
    /// finished export's (`keep`) nor this export's.
    fn remove_stale_parts(&self, export_id: &str, keep: &[String]) {
        match self {
            Place::Server(directory) => remove_stale_parts(directory),
            Place::Prefix { prefix, client } => {
                // The lease is held: what other exports left is theirs no more.
                object::remove_leftovers(client, prefix, &|name: &str| {
                    export_id_of_part(name.as_bytes()) == Some(export_id.as_bytes())
                        || keep.iter().any(|k| k == name)
                });
            }
        }
    }

    /// Run `export` (at most `limit` rows) into the part file `name`; in
    /// place when it returns, `None` (and nothing written) without rows.
    fn write_part(&self, export: &mut Export, name: &str, limit: u64) -> Option<Counts> {
        match self {
            Place::Server(directory) => {
                let mut partial = PartialFile::create(directory, OsStr::new(name), false);
                let file = partial
                    .take_file()
                    .unwrap_or_else(|e| raise_io(e, "export output"));
                let (writer, counts) = run::pump(
                    export,
                    crate::sink::background::BackgroundWriter::new(file),
                    limit,
                );
                let file = writer
                    .finish()
                    .unwrap_or_else(|e| raise_io(e, "export output"));
                if counts.rows == 0 {
                    // The partial file is removed when dropped.
                    return None;
                }
                partial.commit(file, false);
                Some(counts)
            }
            Place::Prefix { prefix, client } => {
                // A chunk object of this export that is there already was
                // put but not recorded before a crash: it is rewritten.
                let uri = prefix.join(name);
                let upload = object::upload_with(client, &uri, true);
                let (upload, counts) = run::pump(export, upload, limit);
                if counts.rows == 0 {
                    // Dropping the upload leaves nothing.
                    return None;
                }
                upload
                    .finish()
                    .unwrap_or_else(|e| raise_upload_error(e, &uri));
                Some(counts)
            }
        }
    }
}

/// The fixed parts of one chunked export.
struct Job<'a> {
    source: Source,
    options: ExportOptions,
    place: &'a Place<'a>,
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
    let written = job.place.write_part(&mut export, &name, job.chunk_rows);
    *tracked = export.release_tracked();
    let counts = written?;
    let resume_token = export.resume_token();
    let last_key = export.last_key_text();
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
        "compression_level": options.compression_level,
        "footer": true,
        "style": style_record(options),
        "chunk_rows": chunk_rows,
        "started_at": now_utc(),
    })
}

fn text_of(value: &Value) -> String {
    value.as_str().unwrap_or("?").to_string()
}

/// The type options (see [`crate::options::JsonStyle`]) as the journal and
/// the manifest record them: every one, on or off.
fn style_record(options: &ExportOptions) -> Value {
    let on = options.style.names();
    let mut record = serde_json::Map::new();
    for name in crate::options::JsonStyle::ALL_NAMES {
        record.insert(name.to_string(), Value::from(on.contains(&name)));
    }
    Value::Object(record)
}

/// The first option that changes the bytes of the parts and that the
/// unfinished export in the journal `header` used differently, with the
/// journal's value and the call's; `None` when they all agree.
fn differing_option(
    header: &Value,
    source: &Source,
    key: &str,
    options: &ExportOptions,
) -> Option<(&'static str, String, String)> {
    let text = |value: &Value| match value {
        Value::String(text) => text.clone(),
        Value::Null => "(not recorded)".to_string(),
        other => other.to_string(),
    };
    let mut checks: Vec<(&'static str, &Value, Value)> = vec![
        ("source", &header["source"], Value::from(source.canonical())),
        ("key", &header["key"], Value::from(key)),
        (
            "compression",
            &header["compression"],
            Value::from(options.compression.to_string()),
        ),
        ("footer", &header["footer"], Value::from(true)),
    ];
    if options.compression != Compression::None {
        checks.push((
            "compression_level",
            &header["compression_level"],
            Value::from(options.compression_level),
        ));
    }
    let style = style_record(options);
    for name in crate::options::JsonStyle::ALL_NAMES {
        checks.push((name, &header["style"][name], style[name].clone()));
    }
    checks
        .into_iter()
        .find(|(_, recorded, wanted)| *recorded != wanted)
        .map(|(name, recorded, wanted)| (name, text(recorded), text(&wanted)))
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
            if crate::destination::file::flush_enabled() {
                journal.sync_data()
            } else {
                Ok(())
            }
        })
        .unwrap_or_else(|e| raise_io(e, PROGRESS));
}

/// Write the manifest: the journal's header as a finished export, the
/// chunk lines as its parts (copied one by one, never all in memory), and
/// the totals, into `out`.
fn write_manifest_text(
    out: &mut dyn std::io::Write,
    header: &Value,
    tally: &Tally,
    entries: &mut dyn Iterator<Item = std::io::Result<String>>,
) -> std::io::Result<()> {
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
    write!(out, "{opening},\n  \"parts\": [")?;
    let mut first = true;
    for line in entries.take(tally.chunks) {
        let line = line?;
        write!(
            out,
            "{}\n    {}",
            if first { "" } else { "," },
            line.trim_end()
        )?;
        first = false;
    }
    write!(out, "\n  ]\n}}\n")
}

/// Write the manifest from the journal and put it in place (the commit
/// point); then remove the parts of the export it replaced.
fn write_manifest(place: &Place<'_>, claim: Claim, header: &Value, tally: &Tally, overwrite: bool) {
    use std::io::BufRead;
    let export_id = header["export_id"].as_str().unwrap_or_default().to_owned();
    let own = format!("part-{export_id}-");
    match (place, claim) {
        (Place::Server(directory), Claim::Server(mut partial)) => {
            let file = partial
                .take_file()
                .unwrap_or_else(|e| raise_io(e, MANIFEST));
            let journal = directory
                .open_regular(OsStr::new(PROGRESS))
                .unwrap_or_else(|e| raise_io(e, PROGRESS));
            let mut out = std::io::BufWriter::new(file);
            let mut lines = std::io::BufReader::new(journal).lines().skip(1);
            let file = write_manifest_text(&mut out, header, tally, &mut lines)
                .and_then(|_| out.into_inner().map_err(|e| e.into_error()))
                .unwrap_or_else(|e| raise_io(e, MANIFEST));
            commit_manifest(directory, partial, file, overwrite, |part| {
                part.starts_with(&own)
            });
        }
        (Place::Prefix { prefix, client }, Claim::Prefix(replaced, lease)) => {
            object::check_lease(&lease, prefix);
            let uri = prefix.join(MANIFEST);
            let mut upload = object::upload_with(client, &uri, overwrite);
            let mut entries = (0..tally.chunks).map(|index| {
                read_object(client, &prefix.join(&progress_entry_name(index)))
                    .map(|entry| entry.to_string())
                    .ok_or_else(|| {
                        std::io::Error::other(format!("{} is missing", progress_entry_name(index)))
                    })
            });
            write_manifest_text(&mut upload, header, tally, &mut entries)
                .and_then(|_| upload.finish())
                .unwrap_or_else(|e| raise_upload_error(e, &uri));
            for part in replaced
                .iter()
                .filter(|p| !p.starts_with(&own) && is_part_file_name(p))
            {
                let _ = client.delete(&prefix.join(part));
            }
        }
        _ => unreachable!("a claim belongs to its own kind of place"),
    }
}

fn unfinished_mismatch(place: &Place<'_>, header: &Value, option: (&str, String, String)) -> ! {
    let text = |field: &str| header[field].as_str().unwrap_or("?").to_string();
    let (name, recorded, wanted) = option;
    raise(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!(
            "directory \"{}\" holds an unfinished chunked export with a different {name}: {recorded}, not {wanted}",
            place.describe()
        ),
        Some(&format!(
            "it exports {} by {} with compression {}: CALL again with the options it was started with to finish it, or use another directory",
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
    let place = match directory {
        ExportDirectory::Server(dir) => Place::Server(dir),
        ExportDirectory::Prefix(prefix) => Place::Prefix {
            prefix,
            client: object::session_client(),
        },
    };
    // Under a prefix the claim (its lease) comes first, so that nothing
    // there is read or removed while another export writes; a server
    // directory's finished export is named (and its stale journal
    // removed) before the claim on its manifest.
    let claim = match place {
        Place::Prefix { .. } => {
            let claim = place.claim(overwrite);
            place.refuse_finished(overwrite);
            claim
        }
        Place::Server(_) => {
            place.refuse_finished(overwrite);
            place.claim(overwrite)
        }
    };
    let mut tally = Tally::default();
    let mut missing: Option<String> = None;
    let present = place.parts_present();
    let resumed = place.read_journal(|entry| {
        if let Some(name) = entry["file"].as_str() {
            if missing.is_none() && !present(name) {
                missing = Some(name.to_owned());
            }
        }
        tally.add(entry);
    });
    drop(present);
    let mut options = options;
    if options.batch_size == BatchSize::Auto {
        // Every query of a chunk reads the chunk's one snapshot, so fewer,
        // larger keyset queries cost nothing in consistency; rows are
        // still fetched about 1 MiB at a time.
        options.batch_size = BatchSize::Fixed(chunk_rows.min(CHUNK_QUERY_ROWS) as u32);
    }
    let (header, mut journal) = match resumed {
        Some((header, good_len)) => {
            let mismatch =
                if header["consistency"] != "per_chunk" || !header["export_id"].is_string() {
                    Some((
                        "format",
                        text_of(&header["consistency"]),
                        "per_chunk".to_string(),
                    ))
                } else {
                    differing_option(&header, &source, &key, &options)
                };
            if let Some(option) = mismatch {
                unfinished_mismatch(&place, &header, option);
            }
            if let Some(name) = missing {
                raise(
                    PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
                    format!(
                        "chunk file \"{name}\" of the unfinished export in \"{}\" is missing",
                        place.describe()
                    ),
                    Some("remove the journal (progress.jsonl, or the progress objects) and the part files to export from the start"),
                );
            }
            (header, place.resume_journal(good_len))
        }
        None => {
            let header = journal_header(&new_export_id(), &source, &key, &options, chunk_rows);
            let journal = place.new_journal(&header);
            (header, journal)
        }
    };
    let export_id = header["export_id"].as_str().unwrap_or_default().to_owned();
    let keep = match &claim {
        Claim::Prefix(replaced, _) => replaced.clone(),
        Claim::Server(_) => Vec::new(),
    };
    place.remove_stale_parts(&export_id, &keep);
    let job = Job {
        source,
        options,
        place: &place,
        export_id,
        chunk_rows,
    };
    let resumed_chunks = tally.chunks;
    let mut tracked = Some(Tracked::start(Description {
        source: job.source.description(),
        destination: place.describe(),
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
        if let Claim::Prefix(_, lease) = &claim {
            if let Place::Prefix { prefix, .. } = &place {
                object::check_lease(lease, prefix);
            }
        }
        place.append(&mut journal, index, &chunk.entry);
        tally.add(&chunk.entry);
        if let Some(tracked) = &mut tracked {
            tracked.written(tally.file_bytes);
        }
    }
    drop(journal);
    write_manifest(&place, claim, &header, &tally, overwrite);
    place.remove_journal();
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
