//! Partitioned export to a directory with dynamic background workers that
//! all read ONE snapshot: the leader exports its snapshot, each worker
//! imports it, takes partitions from a shared counter and writes
//! `part-<export id>-NNNNN.ndjson[.gz]` atomically; the leader writes
//! `manifest.json` last. Workers run with the caller's identity, so
//! privileges and row-level security apply. Results and errors travel
//! through a dynamic shared memory segment.
//!
//! What makes it safe to run where another export already is:
//! - the leader holds `manifest.json.partial` (created and locked like any
//!   partial file) for the whole export, so two exports into one directory
//!   exclude each other, and one that died is recognised as stale;
//! - part names carry an id unique to the export, so a new export never
//!   touches the files of the one it replaces; renaming the manifest into
//!   place is the one moment the new export replaces the old, and only
//!   then are the old parts removed;
//! - cleanup removes only files with this export's id;
//! - workers reopen the directory the leader checked and refuse to write
//!   if the path now leads elsewhere;
//! - when the leader exits for any reason (ERROR, FATAL, terminate), a
//!   detach callback on the shared segment stops the workers.

use std::ffi::CString;
use std::path::PathBuf;
use std::sync::atomic::{AtomicI32, AtomicU32, Ordering};

use pgrx::bgworkers::BackgroundWorkerBuilder;
use pgrx::{pg_guard, pg_sys, PgSqlErrorCode, PgTryBuilder};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::activity::{Description, Tracked};
use crate::destination::file::Directory;
use crate::destination::{ExportDirectory, ManifestClaim};
use crate::engine::export::Export;
use crate::engine::source::Source;
use crate::error::{context_lines, raise, raise_with_fields, ErrorFields};
use crate::layout::{new_export_id, part_name};
use crate::options::ExportOptions;
use crate::progress::Destination;
use crate::run::manifest::{write_manifest, Consistency, PartitionPart, SnapshotExport, Totals};
use crate::run::{self, Written};

// A slot's state starts at 0 (pending): the segment is zeroed.
const RUNNING: u32 = 1;
const DONE: u32 = 2;
const FAILED: u32 = 3;
const MESSAGE_BYTES: usize = 480;
const CONTEXT_BYTES: usize = 1024;

/// The fixed start of the shared segment.
#[repr(C)]
struct Header {
    partitions: u32,
    workers: u32,
    next: AtomicU32,
    abort: AtomicU32,
    config_len: u32,
    /// The leader's serialized settings (SerializeGUCState), after the config.
    guc_len: u64,
}

/// One text field of an error, truncated to `N` bytes (empty is none).
#[repr(C)]
struct SlotText<const N: usize> {
    len: u32,
    bytes: [u8; N],
}

impl<const N: usize> SlotText<N> {
    fn set(&mut self, text: &[u8]) {
        let len = text.len().min(N);
        self.bytes[..len].copy_from_slice(&text[..len]);
        self.len = len as u32;
    }

    fn get(&self) -> Option<String> {
        let len = (self.len as usize).min(N);
        (len > 0).then(|| String::from_utf8_lossy(&self.bytes[..len]).into_owned())
    }
}

fn optional_bytes(text: &Option<String>) -> &[u8] {
    text.as_deref().unwrap_or("").as_bytes()
}

/// An error: SQLSTATE, message, DETAIL, HINT and CONTEXT, so the leader
/// raises what the worker saw.
#[repr(C)]
struct ErrorSlot {
    sqlstate: i32,
    message: SlotText<MESSAGE_BYTES>,
    detail: SlotText<MESSAGE_BYTES>,
    hint: SlotText<MESSAGE_BYTES>,
    context: SlotText<CONTEXT_BYTES>,
}

impl ErrorSlot {
    fn set(&mut self, code: i32, fields: &ErrorFields) {
        self.message.set(fields.message.as_bytes());
        self.detail.set(optional_bytes(&fields.detail));
        self.hint.set(optional_bytes(&fields.hint));
        self.context.set(optional_bytes(&fields.context));
        self.sqlstate = code;
    }

    fn get(&self) -> (PgSqlErrorCode, ErrorFields) {
        (
            PgSqlErrorCode::from(self.sqlstate),
            ErrorFields {
                message: self.message.get().unwrap_or_default(),
                detail: self.detail.get(),
                hint: self.hint.get(),
                context: self.context.get(),
            },
        )
    }
}

/// One partition's state and result, written by its worker before the
/// state is published with Release ordering.
#[repr(C)]
struct Slot {
    state: AtomicU32,
    rows: u64,
    bytes: u64,
    file_bytes: u64,
    crc32: u32,
    error: ErrorSlot,
}

/// One worker: the partition it is on, and the error that ended it (also
/// a FATAL one, caught by the log hook before the process exits).
#[repr(C)]
struct WorkerSlot {
    partition: AtomicI32,
    has_error: AtomicU32,
    error: ErrorSlot,
}

/// Offsets of the partition slots, worker slots, config and settings.
struct Layout {
    slots: usize,
    workers: usize,
    config: usize,
    gucs: usize,
}

fn layout(partitions: usize, workers: usize, config_len: usize) -> Layout {
    let slots = std::mem::size_of::<Header>().next_multiple_of(8);
    let worker_slots = slots + partitions * std::mem::size_of::<Slot>();
    let config = worker_slots + workers * std::mem::size_of::<WorkerSlot>();
    Layout {
        slots,
        workers: worker_slots,
        config,
        gucs: (config + config_len).next_multiple_of(8),
    }
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

    fn layout(&self) -> Layout {
        let header = self.header();
        layout(
            header.partitions as usize,
            header.workers as usize,
            header.config_len as usize,
        )
    }

    fn slot(&self, index: usize) -> *mut Slot {
        // SAFETY: index < partitions, inside the segment.
        unsafe { self.base.add(self.layout().slots).cast::<Slot>().add(index) }
    }

    fn worker(&self, index: usize) -> *mut WorkerSlot {
        // SAFETY: index < workers, inside the segment.
        unsafe {
            self.base
                .add(self.layout().workers)
                .cast::<WorkerSlot>()
                .add(index)
        }
    }

    /// Where the serialized settings start.
    fn gucs(&self) -> *mut u8 {
        // SAFETY: inside the segment; the leader put guc_len bytes there.
        unsafe { self.base.add(self.layout().gucs) }
    }

    /// What the leader wrote for the workers (`None` only if the
    /// segment does not hold it).
    fn config(&self) -> Option<WorkerConfig> {
        let at = self.layout().config;
        // SAFETY: the leader wrote config_len bytes of JSON there.
        let bytes = unsafe {
            std::slice::from_raw_parts(self.base.add(at), self.header().config_len as usize)
        };
        serde_json::from_slice(bytes).ok()
    }
}
/// Everything a worker needs from its leader, serialised into the segment.
#[derive(Serialize, Deserialize)]
struct WorkerConfig {
    database: u32,
    /// The leader's PGPROC (the same address in every backend) and pid,
    /// for its lock group.
    leader_proc: u64,
    leader_pid: i32,
    session_user: u32,
    current_user: u32,
    security_context: i32,
    snapshot: String,
    /// The source as shown (a relation's qualified name), or the query.
    source: String,
    /// The relation the leader resolved, when the source is one.
    relation: Option<u32>,
    directory: WorkerDirectory,
    export_id: String,
    /// The options of every partition; each worker adds its key bounds.
    options: ExportOptions,
    /// Each partition's key range (after, up to), as key text.
    bounds: Vec<(Option<String>, Option<String>)>,
}

/// Where the parts go, as a worker reopens it.
#[derive(Serialize, Deserialize)]
enum WorkerDirectory {
    /// A server directory, reopened only if it is still the same one.
    Server {
        path: String,
        dev: u64,
        ino: u64,
    },
    Prefix(String),
}

/// This worker's slot, for the log hook (set once the segment is attached).
static mut WORKER_SLOT: *mut WorkerSlot = std::ptr::null_mut();
static mut PREVIOUS_EMIT_LOG_HOOK: pg_sys::emit_log_hook_type = None;

/// Records the first ERROR or FATAL this worker reports (a FATAL never
/// returns to Rust: the process exits right after this hook).
///
/// # Safety
///
/// Only as `emit_log_hook` of a directory worker: `edata` is the report being
/// emitted, and `WORKER_SLOT` is null or in the attached segment.
unsafe extern "C-unwind" fn capture_worker_error(edata: *mut pg_sys::ErrorData) {
    // SAFETY: called by PostgreSQL with a valid ErrorData; the slot is in
    // the attached segment; nothing here can raise.
    unsafe {
        let slot = WORKER_SLOT;
        if !slot.is_null()
            && (*edata).elevel >= pgrx::PgLogLevel::ERROR as i32
            && (*slot).has_error.load(Ordering::Acquire) == 0
        {
            let text = |ptr: *const std::ffi::c_char| {
                (!ptr.is_null())
                    .then(|| std::ffi::CStr::from_ptr(ptr).to_string_lossy().into_owned())
            };
            let fields = ErrorFields {
                message: text((*edata).message).unwrap_or_else(|| "unknown error".into()),
                detail: text((*edata).detail),
                hint: text((*edata).hint),
                context: text((*edata).context),
            };
            (*slot).error.set((*edata).sqlerrcode, &fields);
            (*slot).has_error.store(1, Ordering::Release);
        }
        if let Some(previous) = PREVIOUS_EMIT_LOG_HOOK {
            previous(edata);
        }
    }
}

/// The background worker's entry point (by name, from the library). The
/// argument holds the segment handle (low 32 bits) and the worker's index.
#[pg_guard]
#[no_mangle]
pub extern "C-unwind" fn pg_stream_export_part_worker(argument: pg_sys::Datum) {
    let handle = (argument.value() & 0xffff_ffff) as pg_sys::dsm_handle;
    let worker_index = argument.value() >> 32;
    // SAFETY: standard background worker start-up. SIGTERM gets `die`,
    // which only sets a flag that the next CHECK_FOR_INTERRUPTS acts on (the
    // default handler would exit from inside the signal handler, possibly
    // in the middle of malloc); then signals are unblocked and the segment
    // whose handle is the argument is attached.
    let segment = unsafe {
        crate::compat::set_signal_handler(libc::SIGTERM, Some(postgres_die));
        pg_sys::BackgroundWorkerUnblockSignals();
        pg_sys::dsm_attach(handle)
    };
    if segment.is_null() {
        // The leader is gone already.
        return;
    }
    let shared = Shared {
        // SAFETY: an attached segment's address stays valid until detach.
        base: unsafe { pg_sys::dsm_segment_address(segment) }.cast(),
    };
    if worker_index >= shared.header().workers as usize {
        return;
    }
    // SAFETY: this worker's own slot; the hook is installed on this
    // process only, before anything can fail.
    unsafe {
        WORKER_SLOT = shared.worker(worker_index);
        PREVIOUS_EMIT_LOG_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(capture_worker_error);
    }
    let Some(config) = shared.config() else {
        return;
    };
    // Join the leader's lock group before taking any lock, as parallel
    // query's workers do: the group's locks do not conflict with each
    // other, a worker's request goes ahead of a conflicting one queued
    // behind the leader's (an ALTER TABLE waiting for the leader), and the
    // deadlock detector sees the group as one. Otherwise the workers would
    // wait behind that request, it for the leader, the leader for them.
    // SAFETY: the leader's PGPROC lives in shared memory, mapped at the same
    // address in every backend; BecomeLockGroupMember checks under the
    // group's lock that it still belongs to the leader's pid.
    let joined = unsafe {
        let leader = config.leader_proc as usize as *mut pg_sys::PGPROC;
        !leader.is_null() && pg_sys::BecomeLockGroupMember(leader, config.leader_pid)
    };
    if !joined {
        // The leader is gone already.
        return;
    }
    // Connect as the leader's authenticated user (who could log in), then
    // take on its settings and its current user and security context, as
    // PostgreSQL's parallel workers do.
    // SAFETY: connection set-up of a background worker; restoring the
    // settings needs a transaction for the check hooks' catalog lookups.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnectionByOid(
            pg_sys::Oid::from(config.database),
            pg_sys::Oid::from(config.session_user),
            0,
        );
        pg_sys::StartTransactionCommand();
        pg_sys::RestoreGUCState(shared.gucs().cast());
        pg_sys::CommitTransactionCommand();
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(config.current_user),
            config.security_context,
        );
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
        // SAFETY: this worker owns the slot it took from the counter and
        // its own worker slot.
        unsafe {
            (*shared.worker(worker_index))
                .partition
                .store(index as i32, Ordering::Release);
            (*slot).state.store(RUNNING, Ordering::Release);
        }
        if !run_partition(&config, index, slot) {
            break;
        }
    }
    // SAFETY: detaching the segment this worker attached; the hook must
    // not write to it afterwards.
    unsafe {
        WORKER_SLOT = std::ptr::null_mut();
        pg_sys::dsm_detach(segment);
    }
}

extern "C-unwind" {
    /// PostgreSQL's own `die` signal handler (the raw C function: a signal
    /// handler must not go through a Rust wrapper).
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// What a worker exports: its partition's options and file.
fn partition_export(
    config: &WorkerConfig,
    index: usize,
) -> (Source, ExportOptions, ExportDirectory, String) {
    let mut options = config.options.clone();
    let (key_from, key_to) = config.bounds.get(index).cloned().unwrap_or_default();
    options.key_from = key_from;
    options.key_to = key_to;
    let directory = match &config.directory {
        WorkerDirectory::Prefix(prefix) => {
            ExportDirectory::Prefix(crate::destination::directory::Prefix::new(
                crate::destination::object::parse_uri(prefix, true),
            ))
        }
        WorkerDirectory::Server { path, dev, ino } => {
            ExportDirectory::Server(Directory::reopen(&PathBuf::from(path), (*dev, *ino)))
        }
    };
    let name = part_name(&config.export_id, index, options.compression.file_suffix());
    // The relation the leader resolved, never its name again (a temporary
    // table of the leader's shadows a permanent one only there).
    let source = match config.relation {
        Some(oid) => Source::relation(pg_sys::Oid::from(oid)).unwrap_or_else(|| {
            raise(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!(
                    "relation {} was dropped during the export",
                    Value::from(config.source.as_str())
                ),
                None,
            )
        }),
        None => Source::checked_query(&config.source),
    };
    (source, options, directory, name)
}

/// Export one partition in its own transaction on the shared snapshot;
/// false when it failed (the slot says why).
fn run_partition(config: &WorkerConfig, index: usize, slot: *mut Slot) -> bool {
    let outcome = PgTryBuilder::new(|| {
        // SAFETY: a fresh transaction in a connected background worker; the
        // isolation level is set before the snapshot import, which must
        // come before any query.
        unsafe {
            pg_sys::SetCurrentStatementStartTimestamp();
            pg_sys::StartTransactionCommand();
            pg_sys::XactIsoLevel = pg_sys::XACT_REPEATABLE_READ as i32;
            let snapshot = CString::new(config.snapshot.as_str()).unwrap_or_default();
            pg_sys::ImportSnapshot(snapshot.as_ptr());
            pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        }
        // SAFETY: this background worker's own registration entry.
        let leader_pid = unsafe { (*pg_sys::MyBgworkerEntry).bgw_notify_pid };
        crate::activity::set_worker_of(leader_pid, index as i32);
        let (source, options, directory, name) = partition_export(config, index);
        let written = run::to_part(&directory, source, options, &name);
        // SAFETY: ends the transaction started above.
        unsafe {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        }
        Ok(written)
    })
    .catch_others(|error| {
        let (code, fields) = match &error {
            pgrx::pg_sys::panic::CaughtError::PostgresError(report)
            | pgrx::pg_sys::panic::CaughtError::ErrorReport(report)
            | pgrx::pg_sys::panic::CaughtError::RustPanic {
                ereport: report, ..
            } => (
                report.sql_error_code(),
                ErrorFields {
                    message: report.message().to_string(),
                    detail: report.detail().map(str::to_string),
                    hint: report.hint().map(str::to_string),
                    context: context_lines::recorded_for(
                        report.sql_error_code() as i32,
                        report.message(),
                    ),
                },
            ),
        };
        // SAFETY: clean up the failed transaction before recording.
        unsafe { pg_sys::AbortCurrentTransaction() };
        Err((code, fields))
    })
    .execute();
    // SAFETY: this worker owns the slot; the state is published last.
    unsafe {
        match outcome {
            Ok(Written {
                rows,
                bytes,
                file_bytes,
                crc32,
                ..
            }) => {
                (*slot).rows = rows;
                (*slot).bytes = bytes;
                (*slot).file_bytes = file_bytes;
                (*slot).crc32 = crc32;
                (*slot).state.store(DONE, Ordering::Release);
                true
            }
            Err((code, fields)) => {
                (*slot).error.set(code as i32, &fields);
                (*slot).state.store(FAILED, Ordering::Release);
                false
            }
        }
    }
}

/// Raise a worker's error in the leader, its message prefixed by `what`,
/// with the worker's DETAIL, HINT and CONTEXT.
fn raise_worker_error(code: PgSqlErrorCode, fields: ErrorFields, what: &str) -> ! {
    let message = format!("{what}: {}", fields.message);
    raise_with_fields(code, ErrorFields { message, ..fields })
}

/// What the leader returns.
pub struct DirectoryTotals {
    pub partitions: i32,
    pub workers: i32,
    pub rows: i64,
    pub bytes: i64,
    pub file_bytes: i64,
}

/// The workers' handles, in TopMemoryContext: read by the detach callback,
/// which also runs when the leader exits on FATAL.
#[repr(C)]
struct WorkerHandles {
    shared: *mut u8,
    count: usize,
    handles: [*mut pg_sys::BackgroundWorkerHandle; 0],
}

impl WorkerHandles {
    /// # Safety
    /// `this` must point at a live WorkerHandles with `count` handles.
    unsafe fn handles<'a>(
        this: *mut WorkerHandles,
    ) -> &'a mut [*mut pg_sys::BackgroundWorkerHandle] {
        // SAFETY: forwarded from the caller.
        unsafe {
            std::slice::from_raw_parts_mut(
                std::ptr::addr_of_mut!((*this).handles).cast(),
                (*this).count,
            )
        }
    }
}

/// Tell every worker to stop: the abort flag, then SIGTERM through the
/// postmaster. Never raises.
///
/// # Safety
/// `handles` must point at a live WorkerHandles whose segment is mapped.
unsafe fn signal_workers_to_stop(handles: *mut WorkerHandles) {
    // SAFETY: forwarded; TerminateBackgroundWorker only marks a slot.
    unsafe {
        let header = (*handles).shared.cast::<Header>();
        (*header).abort.store(1, Ordering::Release);
        for &handle in WorkerHandles::handles(handles).iter() {
            if !handle.is_null() {
                pg_sys::TerminateBackgroundWorker(handle);
            }
        }
    }
}

/// Detach callback of the leader's segment: runs on every exit path,
/// ERROR, FATAL (`pg_terminate_backend`, shutdown) and normal end alike.
///
/// # Safety
///
/// Only as the detach callback of the leader's segment, with `arg` the
/// WorkerHandles registered with it; it runs once.
unsafe extern "C-unwind" fn stop_workers_on_detach(
    _segment: *mut pg_sys::dsm_segment,
    arg: pg_sys::Datum,
) {
    // SAFETY: `arg` is the WorkerHandles registered with this callback; it
    // is freed here, once, and never used after.
    unsafe {
        let handles = arg.cast_mut_ptr::<WorkerHandles>();
        signal_workers_to_stop(handles);
        pg_sys::pfree(handles.cast());
    }
}

/// Wait on this backend's latch (set when a worker starts or stops) for at
/// most `milliseconds`. It never acts on interrupts itself, so it is safe
/// in cleanup that runs while an error unwinds.
fn sleep_on_latch(milliseconds: i64) {
    // SAFETY: WaitLatch on this backend's own latch with a timeout, then
    // ResetLatch; neither processes interrupts or raises.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
            milliseconds,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
}

fn worker_stopped(handle: *mut pg_sys::BackgroundWorkerHandle) -> bool {
    let mut pid: pg_sys::pid_t = 0;
    // SAFETY: a handle returned by RegisterDynamicBackgroundWorker.
    let status = unsafe { pg_sys::GetBackgroundWorkerPid(handle, &mut pid) };
    matches!(
        status,
        pg_sys::BgwHandleStatus::BGWH_STOPPED | pg_sys::BgwHandleStatus::BGWH_POSTMASTER_DIED
    )
}

/// The leader's state for one directory export. Dropping it while armed
/// (an error, a cancel) stops the workers and removes exactly the files of
/// this export; it never raises, since it also runs while an error
/// unwinds.
struct Leader {
    directory: ExportDirectory,
    export_id: String,
    segment: *mut pg_sys::dsm_segment,
    shared: Shared,
    handles: *mut WorkerHandles,
    armed: bool,
}

impl Leader {
    fn handles(&self) -> &[*mut pg_sys::BackgroundWorkerHandle] {
        // SAFETY: the handles live until the segment is detached (in drop).
        unsafe { WorkerHandles::handles(self.handles) }
    }

    /// Wait until every worker has exited, for at most `limit`, without
    /// acting on interrupts (a second cancel must not raise here).
    fn wait_for_workers(&self, limit: std::time::Duration) {
        let started = std::time::Instant::now();
        while started.elapsed() < limit {
            if self
                .handles()
                .iter()
                .all(|&h| h.is_null() || worker_stopped(h))
            {
                return;
            }
            sleep_on_latch(10);
        }
    }
}

impl Drop for Leader {
    fn drop(&mut self) {
        // SAFETY: the handles and segment are alive until the detach below.
        unsafe { signal_workers_to_stop(self.handles) };
        self.wait_for_workers(std::time::Duration::from_secs(if self.armed {
            30
        } else {
            5
        }));
        if self.armed {
            self.directory.remove_parts_of(&self.export_id);
        }
        // SAFETY: detaching the segment the leader created; this runs the
        // detach callback, which frees the handles.
        unsafe { pg_sys::dsm_detach(self.segment) };
    }
}

/// Refuse to run in a transaction that has written: the workers read a
/// snapshot exported from it, which cannot show its own uncommitted rows.
fn refuse_in_writing_transaction() {
    // SAFETY: reads this transaction's id, if it has one.
    let xid = unsafe { pg_sys::GetTopTransactionIdIfAny() };
    if xid != pg_sys::InvalidTransactionId {
        raise(
            PgSqlErrorCode::ERRCODE_ACTIVE_SQL_TRANSACTION,
            "stream_export_to_directory cannot run in a transaction that has written data",
            Some("its workers read this transaction's snapshot from other sessions, which cannot see its uncommitted changes; commit first, or use stream_export_to_file, which sees them"),
        );
    }
}

/// Export `source_text` in `partitions` key ranges (planned from the key's
/// statistics) with background workers into `directory`: the directory
/// export of `stream_export_to_directory` and of a cluster export's node.
/// `export_id` names the parts (a new one when `None`).
#[allow(clippy::too_many_arguments)]
pub fn export_partitioned(
    source_text: &str,
    directory: &ExportDirectory,
    key: &str,
    partitions: usize,
    options: &ExportOptions,
    workers_wanted: usize,
    overwrite: bool,
    export_id: Option<String>,
) -> DirectoryTotals {
    let export = Export::open(
        Source::resolve(source_text),
        options.clone(),
        Destination::Callback,
    );
    let Some((column, type_name)) = export.key_column_and_type() else {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "a key export has a key",
            None,
        )
    };
    let resolved = export.source().clone();
    let (boundaries, _) =
        crate::engine::plan::boundaries(&resolved, &column, &type_name, partitions);
    drop(export);
    let mut bounds = Vec::with_capacity(boundaries.len() + 1);
    let mut lower = None;
    for boundary in boundaries {
        bounds.push((lower.take(), Some(boundary.clone())));
        lower = Some(boundary);
    }
    bounds.push((lower, None));
    export_directory(
        source_text,
        &resolved,
        directory,
        key,
        options,
        bounds,
        workers_wanted,
        overwrite,
        export_id,
    )
}

/// Run a directory export into `directory` (opened and checked).
#[allow(clippy::too_many_arguments)]
pub fn export_directory(
    source_text: &str,
    source: &Source,
    directory: &ExportDirectory,
    key: &str,
    options: &ExportOptions,
    bounds: Vec<(Option<String>, Option<String>)>,
    workers_wanted: usize,
    overwrite: bool,
    export_id: Option<String>,
) -> DirectoryTotals {
    refuse_in_writing_transaction();
    if let Some(temporary) = source.temporary_relation() {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("stream_export_to_directory cannot export the temporary table {temporary}"),
            Some("its background workers cannot read this session's temporary tables; use stream_export_to_file or CALL stream_export_chunked, or export a regular table"),
        );
    }
    // A table read without row-level security resolves no name at run
    // time; a query, a view or a policy may call functions that do.
    let resolves_no_names = matches!(
        source,
        Source::Relation {
            indexable: true,
            ..
        }
    ) && crate::engine::scan::select_one::<bool>(
        "SELECT NOT pg_catalog.row_security_active($1)",
        &[source.relation_oid().into()],
    ) == Some(true);
    let shadowing = (!resolves_no_names)
        .then(crate::engine::source::shadowing_temporary_relation)
        .flatten();
    if let Some((temporary, shadowed)) = shadowing {
        raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("stream_export_to_directory cannot run while the temporary {temporary} hides {shadowed}"),
            Some("its background workers resolve names without this session's temporary schema, so a function, view or policy that reads that name would find another table or type there; drop or rename the temporary one, or use stream_export_to_file or CALL stream_export_chunked"),
        );
    }
    let partitions = bounds.len();
    let mut tracked = Tracked::start(Description {
        source: source.description(),
        destination: directory.describe(),
        format: format!("{} partitions={partitions}", options.describe()),
        estimated_rows: crate::engine::export::relation_row_estimate(source.relation_oid()),
    });
    // Held until the manifest is in place.
    let export_id = export_id.unwrap_or_else(new_export_id);
    let manifest_claim = directory.claim_manifest(overwrite, &export_id);
    // Exporting a snapshot writes nothing: read-only SPI is enough.
    let snapshot: String =
        crate::engine::scan::select_one("SELECT pg_catalog.pg_export_snapshot()", &[])
            .unwrap_or_default();
    let snapshot_time: String =
        crate::engine::scan::select_one("SELECT now()::text", &[]).unwrap_or_default();
    let mut current_user = pg_sys::InvalidOid;
    let mut security_context = 0;
    // SAFETY: plain reads of backend globals and this session's identity.
    let (database, session_user) = unsafe {
        pg_sys::GetUserIdAndSecContext(&mut current_user, &mut security_context);
        (pg_sys::MyDatabaseId, pg_sys::GetAuthenticatedUserId())
    };
    // SAFETY: makes this backend the leader of a lock group of its own (as
    // parallel query does; a no-op when it already leads one); the workers
    // join it with the PGPROC and pid below.
    let (leader_proc, leader_pid) = unsafe {
        pg_sys::BecomeLockGroupLeader();
        (pg_sys::MyProc as usize as u64, pg_sys::MyProcPid)
    };
    let config = WorkerConfig {
        database: database.to_u32(),
        leader_proc,
        leader_pid,
        session_user: session_user.to_u32(),
        current_user: current_user.to_u32(),
        security_context,
        snapshot: snapshot.clone(),
        source: match source {
            Source::Relation { qualified_name, .. } => qualified_name.clone(),
            _ => source_text.to_owned(),
        },
        relation: match source {
            Source::Relation { oid, .. } => Some(oid.to_u32()),
            _ => None,
        },
        directory: match directory {
            ExportDirectory::Server(dir) => {
                let (dev, ino) = dir.identity();
                WorkerDirectory::Server {
                    path: dir.path().to_string_lossy().into_owned(),
                    dev,
                    ino,
                }
            }
            ExportDirectory::Prefix(prefix) => WorkerDirectory::Prefix(prefix.uri.to_string()),
        },
        export_id: export_id.to_owned(),
        // Every part ends with its footer; the partition's bounds are the
        // worker's to add.
        options: ExportOptions {
            key: Some(key.to_owned()),
            footer: true,
            after: None,
            key_from: None,
            key_to: None,
            force_array: false,
            ..options.clone()
        },
        bounds: bounds.to_vec(),
    };
    let config_bytes = serde_json::to_vec(&config).unwrap_or_default();
    let workers = workers_wanted.min(partitions);
    let offsets = layout(partitions, workers, config_bytes.len());
    // SAFETY: sizing the serialized settings of this backend.
    let guc_len = unsafe { pg_sys::EstimateGUCStateSpace() };
    let size = offsets.gucs + guc_len;
    // SAFETY: a new segment, zeroed, then filled before any worker starts;
    // the handles array lives in TopMemoryContext so that the detach
    // callback can use it on any exit path.
    let (segment, base, handles) = unsafe {
        let segment = pg_sys::dsm_create(size, 0);
        let base: *mut u8 = pg_sys::dsm_segment_address(segment).cast();
        std::ptr::write_bytes(base, 0, size);
        let header = base.cast::<Header>();
        (*header).partitions = partitions as u32;
        (*header).workers = workers as u32;
        (*header).config_len = config_bytes.len() as u32;
        (*header).guc_len = guc_len as u64;
        let shared = Shared { base };
        for index in 0..workers {
            (*shared.worker(index))
                .partition
                .store(-1, Ordering::Relaxed);
        }
        std::ptr::copy_nonoverlapping(
            config_bytes.as_ptr(),
            base.add(offsets.config),
            config_bytes.len(),
        );
        pg_sys::SerializeGUCState(guc_len, base.add(offsets.gucs).cast());
        let handles = pg_sys::MemoryContextAllocZero(
            pg_sys::TopMemoryContext,
            std::mem::size_of::<WorkerHandles>()
                + workers * std::mem::size_of::<*mut pg_sys::BackgroundWorkerHandle>(),
        )
        .cast::<WorkerHandles>();
        (*handles).shared = base;
        (*handles).count = workers;
        pg_sys::on_dsm_detach(
            segment,
            Some(stop_workers_on_detach),
            pg_sys::Datum::from(handles),
        );
        (segment, base, handles)
    };
    // SAFETY: the handle of the segment just created.
    let dsm_handle = unsafe { pg_sys::dsm_segment_handle(segment) };
    let mut leader = Leader {
        directory: directory.clone(),
        export_id: export_id.clone(),
        segment,
        shared: Shared { base },
        handles,
        armed: true,
    };
    let mut started = 0;
    for index in 0..workers {
        let argument = dsm_handle as usize | (index << 32);
        let builder = BackgroundWorkerBuilder::new("pg_stream_export partition worker")
            .set_type("pg_stream_export")
            .set_library("pg_stream_export")
            .set_function("pg_stream_export_part_worker")
            .set_argument(Some(pg_sys::Datum::from(argument)))
            .enable_spi_access()
            .set_restart_time(None)
            // SAFETY: reads this backend's pid.
            .set_notify_pid(unsafe { pg_sys::MyProcPid });
        let mut worker: pg_sys::BackgroundWorker = (&builder).into();
        // SAFETY: registers the worker; the handle is allocated in
        // TopMemoryContext so that it outlives this transaction if the
        // detach callback needs it.
        let registered = unsafe {
            let old = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let mut handle = std::ptr::null_mut();
            let ok = pg_sys::RegisterDynamicBackgroundWorker(&mut worker, &mut handle);
            pg_sys::MemoryContextSwitchTo(old);
            ok.then_some(handle)
        };
        match registered {
            Some(handle) => {
                // SAFETY: `index < workers`, the array's length.
                unsafe { WorkerHandles::handles(handles)[index] = handle };
                started += 1;
            }
            None => break,
        }
    }
    if started == 0 {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_RESOURCES,
            "no background worker could be started for the directory export",
            Some("raise max_worker_processes, or wait for other background workers to finish"),
        );
    }
    wait_for_partitions(&leader, partitions, started, &mut tracked);
    let totals = commit_manifest(
        &mut leader,
        manifest_claim,
        source,
        key,
        options,
        &snapshot,
        &snapshot_time,
        &bounds,
        started,
        overwrite,
    );
    drop(leader);
    tracked.job_progress(totals.rows as u64, totals.bytes as u64);
    tracked.written(totals.file_bytes as u64);
    tracked.complete(None);
    totals
}

/// Wait for every partition, or raise the first failure: a partition's
/// error, or the error of a worker that exited before finishing its part.
fn wait_for_partitions(leader: &Leader, partitions: usize, started: usize, tracked: &mut Tracked) {
    let shared = &leader.shared;
    loop {
        let mut done = 0;
        for index in 0..partitions {
            let slot = shared.slot(index);
            // SAFETY: slots are read after their state is published.
            match unsafe { (*slot).state.load(Ordering::Acquire) } {
                DONE => done += 1,
                FAILED => {
                    // SAFETY: a FAILED slot's error is published.
                    let (code, fields) = unsafe { (*slot).error.get() };
                    raise_worker_error(code, fields, &format!("partition {index} failed"));
                }
                _ => {}
            }
        }
        if done == partitions {
            return;
        }
        let mut alive = 0;
        for (index, &handle) in leader.handles().iter().enumerate().take(started) {
            if !worker_stopped(handle) {
                alive += 1;
                continue;
            }
            let worker = shared.worker(index);
            // SAFETY: the worker slot's fields are published before its
            // process exits.
            let (partition, error) = unsafe {
                let partition = (*worker).partition.load(Ordering::Acquire);
                let error = ((*worker).has_error.load(Ordering::Acquire) != 0)
                    .then(|| (*worker).error.get());
                (partition, error)
            };
            let unfinished = partition >= 0
                // SAFETY: as above.
                && unsafe { (*shared.slot(partition as usize)).state.load(Ordering::Acquire) }
                    == RUNNING;
            if unfinished {
                let (code, fields) = error.unwrap_or((
                    PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                    ErrorFields {
                        message: "its worker exited without reporting an error".into(),
                        ..ErrorFields::default()
                    },
                ));
                raise_worker_error(code, fields, &format!("partition {partition} failed"));
            }
            if let Some((code, fields)) = error {
                if partition < 0 {
                    raise_worker_error(code, fields, "a partition worker could not start");
                }
            }
        }
        if alive == 0 {
            raise(
                PgSqlErrorCode::ERRCODE_SYSTEM_ERROR,
                format!("the workers stopped with {done} of {partitions} partitions done"),
                None,
            );
        }
        // Finished partitions count in the leader's own row of the view,
        // running ones in their workers' rows; the NOTICE gives the sum.
        let mut finished = (0u64, 0u64, 0u64);
        for index in 0..partitions {
            let slot = shared.slot(index);
            // SAFETY: a DONE slot's counts are published with its state.
            unsafe {
                if (*slot).state.load(Ordering::Acquire) == DONE {
                    finished.0 += (*slot).rows;
                    finished.1 += (*slot).bytes;
                    finished.2 += (*slot).file_bytes;
                }
            }
        }
        tracked.show_in_view(finished.0, finished.1, finished.2);
        let running = crate::activity::job_totals().unwrap_or((0, 0));
        tracked.job_progress(finished.0 + running.0, finished.1 + running.1);
        sleep_on_latch(20);
        // A cancel or statement_timeout is raised here, outside any cleanup.
        pgrx::check_for_interrupts!();
    }
}

/// Write the manifest and rename it into place (the commit point), then
/// remove the parts of the export it replaced.
#[allow(clippy::too_many_arguments)]
fn commit_manifest(
    leader: &mut Leader,
    manifest_claim: ManifestClaim,
    source: &Source,
    key: &str,
    options: &ExportOptions,
    snapshot: &str,
    snapshot_time: &str,
    bounds: &[(Option<String>, Option<String>)],
    workers: usize,
    overwrite: bool,
) -> DirectoryTotals {
    let mut parts = Vec::with_capacity(bounds.len());
    let mut totals = Totals {
        partitions: Some(bounds.len()),
        ..Totals::default()
    };
    for (index, (lower, upper)) in bounds.iter().enumerate() {
        let slot = leader.shared.slot(index);
        // SAFETY: every slot is DONE, its fields published.
        let (rows, bytes, file_bytes, crc32) = unsafe {
            (
                (*slot).rows,
                (*slot).bytes,
                (*slot).file_bytes,
                (*slot).crc32,
            )
        };
        totals.rows += rows;
        totals.bytes += bytes;
        totals.file_bytes += file_bytes;
        parts.push(PartitionPart {
            partition: index,
            file: part_name(&leader.export_id, index, options.compression.file_suffix()),
            key_from: lower.clone(),
            key_to: upper.clone(),
            rows,
            bytes,
            file_bytes,
            crc32: format!("{crc32:08x}"),
        });
    }
    let export = SnapshotExport {
        consistency: Consistency::Snapshot,
        export_id: leader.export_id.clone(),
        source: source.canonical().to_owned(),
        key: key.to_owned(),
        compression: options.compression.to_string(),
        snapshot: snapshot.to_owned(),
        snapshot_time: snapshot_time.to_owned(),
    };
    leader.directory.commit_manifest(
        manifest_claim,
        &leader.export_id,
        overwrite,
        &mut |out| write_manifest(out, &export, &totals, parts.iter().map(Ok)),
        // From the commit point on, the manifest may list the parts:
        // nothing may remove them.
        &mut || leader.armed = false,
        &mut || {},
    );
    DirectoryTotals {
        partitions: bounds.len() as i32,
        workers: workers as i32,
        rows: totals.rows as i64,
        bytes: totals.bytes as i64,
        file_bytes: totals.file_bytes as i64,
    }
}
