//! Partitioned export to a directory with dynamic background workers that
//! all read ONE snapshot: the leader exports its snapshot, each worker
//! imports it, takes partitions from a shared counter and writes
//! `part-NNNNN.ndjson[.gz]` atomically; the leader writes `manifest.json`
//! last. Workers run as the calling role, so privileges and row-level
//! security apply. Results and errors travel through a dynamic shared
//! memory segment.

use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
};
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode, PgTryBuilder};
use serde_json::{json, Value};

use crate::api::export_to_path;
use crate::error::raise;
use crate::file::PartialFile;
use crate::options::{ExportOptions, RawOptions};
use crate::source::Source;

const PENDING: u32 = 0;
const RUNNING: u32 = 1;
const DONE: u32 = 2;
const FAILED: u32 = 3;
const MESSAGE_BYTES: usize = 480;

/// The fixed start of the shared segment.
#[repr(C)]
struct Header {
    partitions: u32,
    next: AtomicU32,
    abort: AtomicU32,
    config_len: u32,
    /// The leader's serialized settings (SerializeGUCState), after the config.
    guc_len: u64,
}

/// One partition's state and result, written by its worker before the
/// state is published with Release ordering.
#[repr(C)]
struct Slot {
    state: AtomicU32,
    sqlstate: i32,
    rows: u64,
    bytes: u64,
    file_bytes: u64,
    crc32: u32,
    message_len: u32,
    message: [u8; MESSAGE_BYTES],
}

fn layout(partitions: usize, config_len: usize) -> (usize, usize) {
    let slots = std::mem::size_of::<Header>();
    let config = slots + partitions * std::mem::size_of::<Slot>();
    (config, config + config_len)
}

/// A view of the shared segment.
struct Shared {
    base: *mut u8,
}

impl Shared {
    fn header(&self) -> &Header {
        // SAFETY: the segment starts with a Header (written by the leader
        // before any worker starts) and is mapped while `self` lives.
        unsafe { &*self.base.cast::<Header>() }
    }

    fn slot(&self, index: usize) -> *mut Slot {
        // SAFETY: index < partitions, inside the segment.
        unsafe {
            self.base
                .add(std::mem::size_of::<Header>())
                .cast::<Slot>()
                .add(index)
        }
    }

    /// Where the serialized settings start.
    fn gucs(&self) -> *mut u8 {
        let header = self.header();
        let (_, config_end) = layout(header.partitions as usize, header.config_len as usize);
        // SAFETY: inside the segment; the leader put guc_len bytes there.
        unsafe { self.base.add(config_end.next_multiple_of(8)) }
    }

    fn config(&self) -> Value {
        let header = self.header();
        let (start, _) = layout(header.partitions as usize, 0);
        // SAFETY: the leader wrote config_len bytes of JSON there.
        let bytes =
            unsafe { std::slice::from_raw_parts(self.base.add(start), header.config_len as usize) };
        serde_json::from_slice(bytes).unwrap_or(Value::Null)
    }
}

fn part_name(index: usize, gzip: bool) -> String {
    format!("part-{index:05}.ndjson{}", if gzip { ".gz" } else { "" })
}

/// The background worker's entry point (by name, from the library).
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_stream_export_part_worker(argument: pg_sys::Datum) {
    // SAFETY: standard background worker start-up. SIGTERM gets `die`,
    // which only sets a flag that the next CHECK_FOR_INTERRUPTS acts on (the
    // default handler would exit from inside the signal handler, possibly
    // in the middle of malloc); then signals are unblocked and the segment
    // whose handle is the argument is attached.
    let segment = unsafe {
        pg_sys::pqsignal(libc_sigterm(), Some(postgres_die));
        pg_sys::BackgroundWorkerUnblockSignals();
        pg_sys::dsm_attach(argument.value() as pg_sys::dsm_handle)
    };
    if segment.is_null() {
        return;
    }
    // SAFETY: an attached segment's address stays valid until detach.
    let shared = Shared {
        base: unsafe { pg_sys::dsm_segment_address(segment) }.cast(),
    };
    let config = shared.config();
    let database = pg_sys::Oid::from(config["database"].as_u64().unwrap_or(0) as u32);
    let role = pg_sys::Oid::from(config["role"].as_u64().unwrap_or(0) as u32);
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), Some(role));
    // The leader's settings (TimeZone, DateStyle, extra_float_digits, ...)
    // shape the output: restore them, as parallel query workers do.
    // SAFETY: the leader serialized them into the segment; restoring needs
    // a transaction for the check hooks' catalog lookups.
    unsafe {
        pg_sys::StartTransactionCommand();
        pg_sys::RestoreGUCState(shared.gucs().cast());
        pg_sys::CommitTransactionCommand();
    }
    let partitions = shared.header().partitions as usize;
    loop {
        if shared.header().abort.load(Ordering::Acquire) != 0 {
            break;
        }
        let index = shared.header().next.fetch_add(1, Ordering::AcqRel) as usize;
        if index >= partitions {
            break;
        }
        let slot = shared.slot(index);
        // SAFETY: this worker owns the slot it took from the counter.
        unsafe { (*slot).state.store(RUNNING, Ordering::Release) };
        if !run_partition(&config, index, slot) {
            break;
        }
    }
    // SAFETY: detaching the segment this worker attached.
    unsafe { pg_sys::dsm_detach(segment) };
}

extern "C-unwind" {
    /// PostgreSQL's own `die` signal handler (the raw C function: a signal
    /// handler must not go through a Rust wrapper).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// SIGTERM's number (15 on every platform PostgreSQL runs the workers on).
const fn libc_sigterm() -> i32 {
    15
}

/// Export one partition in its own transaction on the shared snapshot;
/// false when it failed (the slot says why).
fn run_partition(config: &Value, index: usize, slot: *mut Slot) -> bool {
    let outcome = PgTryBuilder::new(|| {
        // SAFETY: a fresh transaction in a connected background worker; the
        // isolation level is set before the snapshot import, which must
        // come before any query.
        unsafe {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
            let snapshot =
                CString::new(config["snapshot"].as_str().unwrap_or("")).unwrap_or_default();
            pg_sys::ImportSnapshot(snapshot.as_ptr());
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
        let bounds = &config["bounds"][index];
        let raw = RawOptions {
            compression: config["compression"].as_str(),
            compression_level: config["level"].as_i64().map(|l| l as i32),
            key: config["key"].as_str(),
            batch_size: config["batch_size"].as_i64().map(|b| b as i32),
            footer: Some(true),
            key_from: bounds[0].as_str(),
            key_to: bounds[1].as_str(),
            ..Default::default()
        };
        let options = ExportOptions::parse(&raw).unwrap_or_else(|e| {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                e.message,
                Some(&e.hint),
            )
        });
        let gzip = config["compression"].as_str() == Some("gzip");
        let target = Path::new(config["directory"].as_str().unwrap_or("/nonexistent"))
            .join(part_name(index, gzip));
        let source = Source::resolve(config["source"].as_str().unwrap_or(""));
        let written = export_to_path(
            source,
            options,
            target,
            config["overwrite"].as_bool().unwrap_or(false),
        );
        // SAFETY: ends the transaction started above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(written)
    })
    .catch_others(|error| {
        let (code, message) = match &error {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(report)
            | pgrx::pg_sys::panic::CaughtError::RustPanic {
                ereport: report, ..
            } => (report.sql_error_code(), report.message().to_string()),
        };
        // SAFETY: clean up the failed transaction before recording.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err((code, message))
    })
    .execute();
    // SAFETY: this worker owns the slot; the state is published last.
    unsafe {
        match outcome {
            Ok(written) => {
                (*slot).rows = written.rows;
                (*slot).bytes = written.bytes;
                (*slot).file_bytes = written.file_bytes;
                (*slot).crc32 = written.crc32;
                (*slot).state.store(DONE, Ordering::Release);
                true
            }
            Err((code, message)) => {
                let bytes = message.as_bytes();
                let len = bytes.len().min(MESSAGE_BYTES);
                (&mut (*slot).message)[..len].copy_from_slice(&bytes[..len]);
                (*slot).message_len = len as u32;
                (*slot).sqlstate = code as i32;
                (*slot).state.store(FAILED, Ordering::Release);
                false
            }
        }
    }
}

/// What the leader returns.
pub struct DirectoryTotals {
    pub partitions: i32,
    pub workers: i32,
    pub rows: i64,
    pub bytes: i64,
    pub file_bytes: i64,
}

/// Stops the workers, detaches the segment and removes every file of a
/// failed or cancelled export; disarmed once the manifest is written.
struct Cleanup {
    workers: Vec<DynamicBackgroundWorker>,
    segment: *mut pg_sys::dsm_segment,
    shared: Shared,
    files: Vec<PathBuf>,
    armed: bool,
}

impl Cleanup {
    fn stop_workers(&mut self) {
        self.shared.header().abort.store(1, Ordering::Release);
        for worker in self.workers.drain(..) {
            let _ = worker.terminate().wait_for_shutdown();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        if self.armed {
            self.stop_workers();
            for file in &self.files {
                let _ = std::fs::remove_file(file);
                let mut partial = file.clone().into_os_string();
                partial.push(".partial");
                let _ = std::fs::remove_file(partial);
            }
        } else {
            for worker in self.workers.drain(..) {
                let _ = worker.wait_for_shutdown();
            }
        }
        if !self.segment.is_null() {
            // SAFETY: detaching the segment the leader created.
            unsafe { pg_sys::dsm_detach(self.segment) };
        }
    }
}

/// Run a directory export; `directory` is canonical and checked.
#[allow(clippy::too_many_arguments)]
pub fn export_directory(
    source_text: &str,
    source: &Source,
    directory: &Path,
    key: &str,
    options: &ExportOptions,
    bounds: Vec<(Option<String>, Option<String>)>,
    workers_wanted: usize,
    overwrite: bool,
) -> DirectoryTotals {
    let partitions = bounds.len();
    let gzip = options.compression == crate::options::Compression::Gzip;
    let snapshot: String = pgrx::spi::Spi::get_one("SELECT pg_catalog.pg_export_snapshot()")
        .ok()
        .flatten()
        .unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "could not export a snapshot",
                None,
            )
        });
    let snapshot_time: String = pgrx::spi::Spi::get_one("SELECT now()::text")
        .ok()
        .flatten()
        .unwrap_or_default();
    // SAFETY: plain reads of backend globals.
    let (database, role) = unsafe { (pg_sys::MyDatabaseId, pg_sys::GetUserId()) };
    let config = json!({
        "database": database.to_u32(),
        "role": role.to_u32(),
        "snapshot": snapshot,
        "source": source_text,
        "key": key,
        "directory": directory.to_string_lossy(),
        "compression": options.compression.to_string(),
        "level": options.compression_level,
        "batch_size": match options.batch_size { crate::options::BatchSize::Auto => 0, crate::options::BatchSize::Fixed(n) => n },
        "overwrite": overwrite,
        "bounds": bounds.iter().map(|(l, u)| json!([l, u])).collect::<Vec<_>>(),
    });
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let (config_at, config_end) = layout(partitions, config_bytes.len());
    // SAFETY: sizing the serialized settings of this backend.
    let guc_len = unsafe { pg_sys::EstimateGUCStateSpace() };
    let size = config_end.next_multiple_of(8) + guc_len;
    // SAFETY: a new segment, zeroed, then filled before any worker starts.
    let segment = unsafe { pg_sys::dsm_create(size, 0) };
    let base: *mut u8 = unsafe { pg_sys::dsm_segment_address(segment) }.cast();
    // SAFETY: `size` bytes are mapped at `base`.
    unsafe {
        std::ptr::write_bytes(base, 0, size);
        let header = base.cast::<Header>();
        (*header).partitions = partitions as u32;
        (*header).config_len = config_bytes.len() as u32;
        (*header).guc_len = guc_len as u64;
        std::ptr::copy_nonoverlapping(
            config_bytes.as_ptr(),
            base.add(config_at),
            config_bytes.len(),
        );
        pg_sys::SerializeGUCState(guc_len, base.add(config_end.next_multiple_of(8)).cast());
    }
    // SAFETY: the handle of the segment just created.
    let handle = unsafe { pg_sys::dsm_segment_handle(segment) };
    let files: Vec<PathBuf> = (0..partitions)
        .map(|i| directory.join(part_name(i, gzip)))
        .collect();
    let mut cleanup = Cleanup {
        workers: Vec::new(),
        segment,
        shared: Shared { base },
        files,
        armed: true,
    };
    for _ in 0..workers_wanted.min(partitions) {
        let launched = BackgroundWorkerBuilder::new("pg_stream_export partition worker")
            .set_type("pg_stream_export")
            .set_library("pg_stream_export")
            .set_function("pg_stream_export_part_worker")
            .set_argument(Some(pg_sys::Datum::from(handle as usize)))
            .enable_spi_access()
            .set_restart_time(None)
            // SAFETY: reads this backend's pid.
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .load_dynamic();
        match launched {
            Ok(worker) => cleanup.workers.push(worker),
            Err(_) => break,
        }
    }
    let workers = cleanup.workers.len();
    if workers == 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            "no background worker could be started for the directory export",
            Some("raise max_worker_processes, or wait for other background workers to finish"),
        );
    }
    // Wait for every partition, or the first failure.
    loop {
        let mut done = 0;
        for index in 0..partitions {
            let slot = cleanup.shared.slot(index);
            // SAFETY: slots are read after their state is published.
            let state = unsafe { (*slot).state.load(Ordering::Acquire) };
            match state {
                DONE => done += 1,
                FAILED => {
                    let (code, message) = unsafe {
                        let len = (*slot).message_len as usize;
                        (
                            PgSqlErrorCode::from((*slot).sqlstate),
                            String::from_utf8_lossy(&(&(*slot).message)[..len.min(MESSAGE_BYTES)])
                                .into_owned(),
                        )
                    };
                    cleanup.stop_workers();
                    drop(cleanup);
                    raise(
                        code,
                        format!("partition {index} failed: {message}"),
                        Some("no part file and no manifest were left behind"),
                    );
                }
                PENDING | RUNNING => {}
                _ => {}
            }
        }
        if done == partitions {
            break;
        }
        let all_gone = cleanup.workers.iter().all(|w| {
            matches!(
                w.pid(),
                Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
            )
        });
        if all_gone {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!(
                    "the workers stopped with {} of {partitions} partitions done",
                    done
                ),
                None,
            );
        }
        // SAFETY: waits on this backend's latch for at most 20 ms; an
        // interrupt (cancel, statement_timeout) is raised right after.
        unsafe {
            pg_sys::WaitLatch(
                pg_sys::MyLatch,
                (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                20,
                pg_sys::PG_WAIT_EXTENSION,
            );
            pg_sys::ResetLatch(pg_sys::MyLatch);
        }
        pgrx::check_for_interrupts!();
    }
    // Manifest, written last and atomically.
    let mut parts = Vec::new();
    let mut totals = DirectoryTotals {
        partitions: partitions as i32,
        workers: workers as i32,
        rows: 0,
        bytes: 0,
        file_bytes: 0,
    };
    for (index, (lower, upper)) in bounds.iter().enumerate() {
        let slot = cleanup.shared.slot(index);
        // SAFETY: every slot is DONE, its fields published.
        let (rows, bytes, file_bytes, crc32) = unsafe {
            (
                (*slot).rows,
                (*slot).bytes,
                (*slot).file_bytes,
                (*slot).crc32,
            )
        };
        totals.rows += rows as i64;
        totals.bytes += bytes as i64;
        totals.file_bytes += file_bytes as i64;
        parts.push(json!({
            "partition": index, "file": part_name(index, gzip), "key_from": lower, "key_to": upper,
            "rows": rows, "bytes": bytes, "file_bytes": file_bytes, "crc32": format!("{crc32:08x}"),
        }));
    }
    let manifest = json!({
        "pg_stream_export_manifest": 1,
        "source": source.canonical(),
        "key": key,
        "compression": options.compression.to_string(),
        "snapshot": snapshot,
        "snapshot_time": snapshot_time,
        "parts": parts,
        "totals": {"partitions": partitions, "rows": totals.rows, "bytes": totals.bytes, "file_bytes": totals.file_bytes},
    });
    let text = serde_json::to_string_pretty(&manifest).unwrap_or_default() + "\n";
    let manifest_path = directory.join("manifest.json");
    cleanup.files.push(manifest_path.clone());
    let mut partial = PartialFile::create(manifest_path, overwrite);
    let mut file = partial
        .take_file()
        .unwrap_or_else(|e| crate::file::raise_io(e, "manifest.json"));
    std::io::Write::write_all(&mut file, text.as_bytes())
        .unwrap_or_else(|e| crate::file::raise_io(e, "manifest.json"));
    partial
        .commit(file)
        .unwrap_or_else(|e| crate::file::raise_io(e, "manifest.json"));
    cleanup.armed = false;
    drop(cleanup);
    totals
}

/// Check every part of a directory export against the manifest and its own
/// footer. Returns (ok, parts, rows, detail); never raises for bad contents.
pub fn verify_directory(directory: &Path) -> (bool, i32, i64, String) {
    let manifest_path = directory.join("manifest.json");
    let manifest: Value =
        match std::fs::read(&manifest_path).map(|b| serde_json::from_slice::<Value>(&b)) {
            Ok(Ok(value)) => value,
            Ok(Err(e)) => return (false, 0, 0, format!("manifest.json is not valid JSON: {e}")),
            Err(e) => return (false, 0, 0, format!("cannot read manifest.json: {e}")),
        };
    let Some(parts) = manifest["parts"].as_array() else {
        return (false, 0, 0, "manifest.json has no parts".into());
    };
    let mut rows = 0i64;
    for part in parts {
        let name = part["file"].as_str().unwrap_or("");
        let verdict = match std::fs::File::open(directory.join(name)).map(crate::verify::verify) {
            Ok(Ok(verdict)) => verdict,
            Ok(Err(e)) | Err(e) => {
                return (
                    false,
                    parts.len() as i32,
                    rows,
                    format!("{name}: cannot be read: {e}"),
                )
            }
        };
        if !verdict.ok {
            return (
                false,
                parts.len() as i32,
                rows,
                format!("{name}: {}", verdict.detail),
            );
        }
        let expected = (part["rows"].as_u64(), part["crc32"].as_str());
        if expected
            != (
                Some(verdict.rows),
                Some(format!("{:08x}", verdict.crc32).as_str()),
            )
        {
            return (
                false,
                parts.len() as i32,
                rows,
                format!("{name}: does not match the manifest"),
            );
        }
        rows += verdict.rows as i64;
    }
    if manifest["totals"]["rows"].as_i64() != Some(rows) {
        return (
            false,
            parts.len() as i32,
            rows,
            "the parts' rows do not add up to the manifest's total".into(),
        );
    }
    (
        true,
        parts.len() as i32,
        rows,
        format!("{} parts, {rows} rows: all match the manifest", parts.len()),
    )
}

/// Names used in errors about the directory argument.
pub fn directory_from(path: &str) -> PathBuf {
    let probe =
        crate::file::resolve_target(&format!("{}/manifest.json", path.trim_end_matches('/')));
    probe
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from(path))
}
