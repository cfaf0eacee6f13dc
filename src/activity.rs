//! What every running export is doing, and what each one did.
//!
//! A [`Tracked`] export has a slot in a fixed shared-memory table (sized by
//! `pg_stream_export.max_tracked_exports` at server start, when the library
//! is in `shared_preload_libraries`) that `stream_export_activity` reads; a
//! full table never fails an export, the export just does not show. It
//! sends progress NOTICEs at `pg_stream_export.progress` intervals, and
//! writes one audit LOG line when it ends (`pg_stream_export.log_exports`):
//! from [`Tracked::complete`] on success, otherwise from a callback on the
//! memory context the export lives in, which PostgreSQL runs when the
//! statement ends or its transaction aborts, with the SQLSTATE that an
//! `emit_log_hook` saw.

use std::ffi::{c_void, CStr};
use std::sync::atomic::{AtomicI32, AtomicU32, AtomicU64, Ordering};

use pgrx::{pg_sys, PgSqlErrorCode};

const TEXT_BYTES: usize = 256;

/// One running export, in shared memory. `pid` 0 is a free slot; `version`
/// is odd while the slot's fields are being written.
#[repr(C)]
struct Slot {
    pid: AtomicI32,
    version: AtomicU32,
    leader_pid: i32,
    partition: i32,
    database: u32,
    role: u32,
    started_at: i64,
    estimated_rows: i64,
    rows: AtomicU64,
    bytes: AtomicU64,
    written: AtomicU64,
    source: [u8; TEXT_BYTES],
    destination: [u8; TEXT_BYTES],
    format: [u8; 64],
}

#[repr(C)]
struct Table {
    slots: usize,
    first: [Slot; 0],
}

static mut TABLE: *mut Table = std::ptr::null_mut();
static mut PREVIOUS_SHMEM_REQUEST: pg_sys::shmem_request_hook_type = None;
static mut PREVIOUS_SHMEM_STARTUP: pg_sys::shmem_startup_hook_type = None;
static mut PREVIOUS_EMIT_LOG: pg_sys::emit_log_hook_type = None;

/// Errors this backend has raised, and the SQLSTATE of the last one.
static ERRORS_SEEN: AtomicU64 = AtomicU64::new(0);
static LAST_ERROR_CODE: AtomicI32 = AtomicI32::new(0);

fn table_bytes() -> usize {
    std::mem::size_of::<Table>() + std::mem::size_of::<Slot>() * crate::gucs::max_tracked_exports()
}

/// From `_PG_init`: the shared table when preloaded, and the error hook.
pub fn install() {
    // SAFETY: hooks are process-global and set during library load, on
    // the backend's only thread; each chains what was there.
    unsafe {
        PREVIOUS_EMIT_LOG = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(note_error);
        if pg_sys::process_shared_preload_libraries_in_progress {
            PREVIOUS_SHMEM_REQUEST = pg_sys::shmem_request_hook;
            pg_sys::shmem_request_hook = Some(request_shmem);
            PREVIOUS_SHMEM_STARTUP = pg_sys::shmem_startup_hook;
            pg_sys::shmem_startup_hook = Some(startup_shmem);
        }
    }
}

/// # Safety
///
/// Only as `shmem_request_hook`, while shared memory is being sized.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn request_shmem() {
    // SAFETY: called by the postmaster at the time shared memory is sized.
    unsafe {
        if let Some(previous) = PREVIOUS_SHMEM_REQUEST {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(table_bytes());
    }
}

/// # Safety
///
/// Only as `shmem_startup_hook`, at shared memory initialisation.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn startup_shmem() {
    // SAFETY: called at shared memory initialisation (postmaster start and
    // every crash restart); AddinShmemInitLock serialises the allocation.
    unsafe {
        if let Some(previous) = PREVIOUS_SHMEM_STARTUP {
            previous();
        }
        // AddinShmemInitLock, a macro in C: the main array's entry 21.
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        let mut found = false;
        let table = pg_sys::ShmemInitStruct(
            c"pg_stream_export activity".as_ptr(),
            table_bytes(),
            &mut found,
        )
        .cast::<Table>();
        if !found {
            std::ptr::write_bytes(table.cast::<u8>(), 0, table_bytes());
            (*table).slots = crate::gucs::max_tracked_exports();
        }
        TABLE = table;
        pg_sys::LWLockRelease(init_lock);
    }
}

/// Count errors (for the audit line's outcome); never raises.
///
/// # Safety
///
/// Only as `emit_log_hook`: `edata` is the report being emitted (or null).
unsafe extern "C-unwind" fn note_error(edata: *mut pg_sys::ErrorData) {
    // SAFETY: PostgreSQL passes the error being reported.
    unsafe {
        if !edata.is_null() && (*edata).elevel >= pgrx::PgLogLevel::ERROR as i32 {
            LAST_ERROR_CODE.store((*edata).sqlerrcode, Ordering::Relaxed);
            ERRORS_SEEN.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(previous) = PREVIOUS_EMIT_LOG {
            previous(edata);
        }
    }
}

/// The table's slots, when the library was preloaded.
fn slots() -> Option<&'static [Slot]> {
    // SAFETY: TABLE is set once at shared memory start-up (inherited by
    // every backend) and points at `slots` slots.
    unsafe {
        let table = TABLE;
        (!table.is_null()).then(|| {
            std::slice::from_raw_parts(std::ptr::addr_of!((*table).first).cast(), (*table).slots)
        })
    }
}

pub fn is_available() -> bool {
    slots().is_some()
}

fn copy_text(into: &mut [u8], text: &str) {
    // Truncated on a character boundary, NUL-padded.
    let mut end = text.len().min(into.len() - 1);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    into.fill(0);
    into[..end].copy_from_slice(&text.as_bytes()[..end]);
}

fn read_text(from: &[u8]) -> String {
    let end = from.iter().position(|&b| b == 0).unwrap_or(from.len());
    String::from_utf8_lossy(&from[..end]).into_owned()
}

/// In a directory-export worker: the leader's pid (0 elsewhere) and the
/// partition, so the worker's export shows under its job and writes no
/// audit line or NOTICE (the leader does, for the whole job).
static WORKER_LEADER: AtomicI32 = AtomicI32::new(0);
static WORKER_PARTITION: AtomicI32 = AtomicI32::new(-1);

pub fn set_worker_of(leader_pid: i32, partition: i32) {
    WORKER_LEADER.store(leader_pid, Ordering::Relaxed);
    WORKER_PARTITION.store(partition, Ordering::Relaxed);
}

fn in_worker() -> bool {
    WORKER_LEADER.load(Ordering::Relaxed) != 0
}

/// What an export is, for the view and the audit line.
pub struct Description {
    pub source: String,
    pub destination: String,
    /// The options that shape the output, as `name=value` words.
    pub format: String,
    pub estimated_rows: Option<i64>,
}

/// Backend-local state of a tracked export, in the memory context it lives
/// in (plain data: the reset callback reads it after Rust is done).
#[repr(C)]
struct Record {
    callback: pg_sys::MemoryContextCallback,
    slot: *const Slot,
    done: bool,
    audit: bool,
    errors_at_start: u64,
    started: std::time::Instant,
    rows: u64,
    bytes: u64,
    written: u64,
    last_notice: std::time::Instant,
    about: *mut About,
}

/// What the audit line names, kept by the record until its callback.
struct About {
    description: Description,
    /// Resolved at the start: no catalog lookups once the transaction may
    /// be aborting.
    role: String,
    database: String,
    /// See [`set_requested_by`].
    requested_by: Option<String>,
}

thread_local! {
    static REQUESTED_BY: std::cell::RefCell<Option<String>> = const { std::cell::RefCell::new(None) };
}

/// Who asked for the exports this backend starts from now on, when that
/// is not the role it runs as: a cluster export's node names the role
/// that called it on the coordinator (`requested_by=` in its audit
/// lines). `None` ends it.
pub fn set_requested_by(who: Option<String>) {
    REQUESTED_BY.with(|cell| *cell.borrow_mut() = who);
}

impl Record {
    /// The shared-memory slot, when the export has one.
    fn slot(&self) -> Option<&Slot> {
        // SAFETY: a claimed slot stays ours until released, when the
        // pointer is cleared.
        unsafe { self.slot.as_ref() }
    }

    fn about(&self) -> &About {
        // SAFETY: set in start, cleared only by the callback at the end.
        unsafe { &*self.about }
    }

    /// The export ended with `outcome`: leave the view, write the audit
    /// line (`extra` after its fields). Only once.
    fn end(&mut self, outcome: &str, extra: &str) {
        if self.done {
            return;
        }
        self.done = true;
        release_slot(std::mem::replace(&mut self.slot, std::ptr::null()));
        if self.audit {
            log_server_only(format!(
                "pg_stream_export: export {outcome}: {}{extra}",
                audit_fields(self)
            ));
        }
    }
}

/// A running export; see the module documentation.
pub struct Tracked {
    record: *mut Record,
}

/// How many slots of a table of `slots` a role that is not a superuser may
/// hold at once, and how many must stay free for superusers: one role's
/// open cursors cannot hide every other export.
pub fn role_share(slots: usize) -> (usize, usize) {
    ((slots / 4).max(1), slots / 8)
}

/// Whether `role` (not a superuser) may claim one more slot now. Counted
/// without a lock: two exports starting at the same moment may both pass.
fn within_role_share(slots: &[Slot], role: pg_sys::Oid) -> bool {
    let (per_role, reserved) = role_share(slots.len());
    let (mut free, mut held) = (0, 0);
    for slot in slots {
        if slot.pid.load(Ordering::Acquire) == 0 {
            free += 1;
        // SAFETY: a plain read of a word of a slot in use (a stale value
        // only makes the count approximate).
        } else if unsafe { std::ptr::read_volatile(&slot.role) } == role.to_u32() {
            held += 1;
        }
    }
    held < per_role && free > reserved
}

fn claim_slot(description: &Description, role: pg_sys::Oid, database: pg_sys::Oid) -> *const Slot {
    let Some(slots) = slots() else {
        return std::ptr::null();
    };
    // SAFETY: a catalog lookup of a role, in a transaction.
    if !unsafe { pg_sys::superuser_arg(role) } && !within_role_share(slots, role) {
        return std::ptr::null();
    }
    // SAFETY: reads the backend's pid and the clock.
    let (pid, now) = unsafe { (pg_sys::MyProcPid, pg_sys::GetCurrentTimestamp()) };
    let (leader_pid, partition) = (
        WORKER_LEADER.load(Ordering::Relaxed),
        WORKER_PARTITION.load(Ordering::Relaxed),
    );
    for slot in slots {
        if slot
            .pid
            .compare_exchange(0, pid, Ordering::AcqRel, Ordering::Relaxed)
            .is_err()
        {
            continue;
        }
        slot.version.fetch_add(1, Ordering::AcqRel);
        // SAFETY: the slot is ours (claimed above) and marked as being
        // written; readers skip it until the version is even again.
        unsafe {
            let s = (slot as *const Slot).cast_mut();
            (*s).leader_pid = leader_pid;
            (*s).partition = partition;
            (*s).database = database.to_u32();
            (*s).role = role.to_u32();
            (*s).started_at = now;
            (*s).estimated_rows = description.estimated_rows.unwrap_or(-1);
            copy_text(&mut (*s).source, &description.source);
            copy_text(&mut (*s).destination, &description.destination);
            copy_text(&mut (*s).format, &description.format);
        }
        slot.rows.store(0, Ordering::Relaxed);
        slot.bytes.store(0, Ordering::Relaxed);
        slot.written.store(0, Ordering::Relaxed);
        slot.version.fetch_add(1, Ordering::AcqRel);
        return slot;
    }
    std::ptr::null()
}

fn release_slot(slot: *const Slot) {
    if slot.is_null() {
        return;
    }
    // SAFETY: a slot of the shared table that this backend claimed.
    let slot = unsafe { &*slot };
    slot.version.fetch_add(1, Ordering::AcqRel);
    slot.pid.store(0, Ordering::Release);
    slot.version.fetch_add(1, Ordering::AcqRel);
}

/// A process that exits on FATAL releases the slots it holds (no memory
/// context callback runs then).
///
/// # Safety
///
/// Only as an exit callback of this process.
unsafe extern "C-unwind" fn release_on_exit(_code: i32, _arg: pg_sys::Datum) {
    let Some(slots) = slots() else { return };
    // SAFETY: reads this process's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    for slot in slots {
        if slot.pid.load(Ordering::Acquire) == pid {
            release_slot(slot);
        }
    }
}

impl Tracked {
    /// Start tracking an export that lives in the current memory context.
    pub fn start(description: Description) -> Tracked {
        use std::sync::atomic::AtomicBool;
        static EXIT_HOOKED: AtomicBool = AtomicBool::new(false);
        // SAFETY: reads session state; registers a plain exit callback once.
        let (role, database) = unsafe {
            if is_available() && !EXIT_HOOKED.swap(true, Ordering::Relaxed) {
                pg_sys::before_shmem_exit(Some(release_on_exit), pg_sys::Datum::from(0));
            }
            (pg_sys::GetUserId(), pg_sys::MyDatabaseId)
        };
        let slot = claim_slot(&description, role, database);
        let now = std::time::Instant::now();
        // SAFETY: the record is allocated in the current context, which
        // outlives the export (the caller's contract) and runs the callback
        // when it is reset or deleted; the description is leaked into the
        // record and reclaimed by the callback.
        unsafe {
            let record = pg_sys::palloc0(std::mem::size_of::<Record>()).cast::<Record>();
            std::ptr::write(
                record,
                Record {
                    callback: pg_sys::MemoryContextCallback {
                        func: Some(context_gone),
                        arg: std::ptr::null_mut(),
                        next: std::ptr::null_mut(),
                    },
                    slot,
                    done: false,
                    audit: !in_worker() && crate::gucs::log_exports(),
                    errors_at_start: ERRORS_SEEN.load(Ordering::Relaxed),
                    started: now,
                    rows: 0,
                    bytes: 0,
                    written: 0,
                    last_notice: now,
                    about: Box::into_raw(Box::new(About {
                        description,
                        role: name_of_role(role),
                        database: name_of_database(database),
                        requested_by: REQUESTED_BY.with(|cell| cell.borrow().clone()),
                    })),
                },
            );
            (*record).callback.arg = record.cast::<c_void>();
            pg_sys::MemoryContextRegisterResetCallback(
                pg_sys::CurrentMemoryContext,
                &mut (*record).callback,
            );
            Tracked { record }
        }
    }

    /// Rows and uncompressed bytes produced so far; sends a progress
    /// NOTICE when one is due.
    pub fn update(&mut self, rows: u64, bytes: u64) {
        if let Some(slot) = self.record().slot() {
            slot.rows.store(rows, Ordering::Relaxed);
            slot.bytes.store(bytes, Ordering::Relaxed);
        }
        self.job_progress(rows, bytes);
    }

    fn record(&mut self) -> &mut Record {
        // SAFETY: the record lives as long as the export (see start).
        unsafe { &mut *self.record }
    }

    /// Set the counts the view shows for this export's own row, without
    /// touching what the audit line and NOTICEs report.
    pub fn show_in_view(&mut self, rows: u64, bytes: u64, written: u64) {
        if let Some(slot) = self.record().slot() {
            slot.rows.store(rows, Ordering::Relaxed);
            slot.bytes.store(bytes, Ordering::Relaxed);
            slot.written.store(written, Ordering::Relaxed);
        }
    }

    /// A job's totals (a directory export's leader, from its workers):
    /// for the NOTICE and the audit line; the view sums the workers itself.
    pub fn job_progress(&mut self, rows: u64, bytes: u64) {
        let record = self.record();
        record.rows = rows;
        record.bytes = bytes;
        self.maybe_notice();
    }

    fn maybe_notice(&mut self) {
        let record = self.record();
        let interval = crate::gucs::progress_interval();
        if let Some(interval) = interval.filter(|_| !in_worker()) {
            let now = std::time::Instant::now();
            if now.duration_since(record.last_notice) >= interval {
                record.last_notice = now;
                pgrx::notice!("{}", progress_line(record));
            }
        }
    }

    /// Bytes written to the destination so far (compressed size for gzip).
    pub fn written(&mut self, bytes: u64) {
        let record = self.record();
        record.written = bytes;
        if let Some(slot) = record.slot() {
            slot.written.store(bytes, Ordering::Relaxed);
        }
    }

    /// The export finished: write the audit line and leave the view.
    pub fn complete(&mut self, crc32: Option<u32>) {
        let crc = crc32.map(|c| format!(" crc32={c:08x}")).unwrap_or_default();
        self.record().end("completed", &crc);
    }
}

fn log_server_only(message: String) {
    pgrx::pg_sys::panic::ErrorReport::new(
        PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
        message,
        "pg_stream_export",
    )
    .report(pgrx::PgLogLevel::LOG_SERVER_ONLY);
}

/// The memory context of an export is going away: at the end of its
/// statement, or because its transaction aborted. An export that did not
/// complete failed (an error was raised since it started) or was stopped
/// by its caller (a LIMIT, a closed cursor).
///
/// # Safety
///
/// Only as a memory context reset callback whose `arg` is the [`Record`]
/// registered with it, which lives until the callback returns.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn context_gone(arg: *mut c_void) {
    // SAFETY: `arg` is the record registered with this callback; its
    // memory is freed right after the callbacks run.
    let record = unsafe { &mut *arg.cast::<Record>() };
    if !record.done {
        record.end(&outcome_of_unfinished(record), "");
    }
    // SAFETY: leaked in start, reclaimed once here.
    drop(unsafe { Box::from_raw(std::mem::replace(&mut record.about, std::ptr::null_mut())) });
}

/// How an export that did not complete ended.
fn outcome_of_unfinished(record: &Record) -> String {
    // An error since the start (its SQLSTATE from the hook), or a
    // transaction that is aborting (an error not logged on the server,
    // below log_min_messages), is a failure.
    let errored = ERRORS_SEEN.load(Ordering::Relaxed) != record.errors_at_start;
    // SAFETY: reads the transaction state.
    let aborting = !unsafe { pg_sys::IsTransactionState() };
    if errored {
        let state = sqlstate(LAST_ERROR_CODE.load(Ordering::Relaxed));
        if state == "57014" {
            format!("cancelled (SQLSTATE {state})")
        } else {
            format!("failed (SQLSTATE {state})")
        }
    } else if aborting {
        "failed".to_string()
    } else {
        "stopped by its caller before the end".to_string()
    }
}

/// A packed SQLSTATE as its five characters.
fn sqlstate(code: i32) -> String {
    (0..5)
        .map(|i| (((code >> (6 * i)) & 0x3f) as u8 + b'0') as char)
        .collect()
}

fn quoted(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

fn c_text(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        String::new()
    } else {
        // SAFETY: a NUL-terminated string from PostgreSQL.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }
}

fn name_of_role(role: pg_sys::Oid) -> String {
    // SAFETY: a syscache lookup that tolerates a missing role.
    c_text(unsafe { pg_sys::GetUserNameFromId(role, true) })
}

fn name_of_database(database: pg_sys::Oid) -> String {
    // SAFETY: a catalog lookup that returns NULL for a missing database.
    c_text(unsafe { pg_sys::get_database_name(database) })
}

fn audit_fields(record: &Record) -> String {
    let About {
        description,
        role,
        database,
        requested_by,
    } = record.about();
    let source: String = description.source.chars().take(200).collect();
    let requested_by = requested_by
        .as_deref()
        .map(|who| format!(" requested_by={}", quoted(who)))
        .unwrap_or_default();
    format!(
        "role={}{requested_by} database={} source={} destination={} {} rows={} bytes={} written={} duration={:.3}s",
        quoted(role),
        quoted(database),
        quoted(&source),
        quoted(&description.destination),
        description.format,
        record.rows,
        record.bytes,
        record.written,
        record.started.elapsed().as_secs_f64()
    )
}

fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "kB", "MB", "GB", "TB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

/// Percent done and seconds left, when the total is estimated and the
/// export has not passed it.
pub fn estimate(rows: u64, estimated_rows: i64, rate: f64) -> Option<(f64, f64)> {
    if estimated_rows <= 0 || rows > estimated_rows as u64 {
        return None;
    }
    let percent = rows as f64 * 100.0 / estimated_rows as f64;
    let eta = if rate > 0.0 {
        (estimated_rows as u64 - rows) as f64 / rate
    } else {
        f64::NAN
    };
    Some((percent, eta))
}

fn progress_line(record: &Record) -> String {
    let seconds = record.started.elapsed().as_secs_f64();
    let rate = if seconds > 0.0 {
        record.rows as f64 / seconds
    } else {
        0.0
    };
    let mut line = format!(
        "pg_stream_export: {} rows, {}, {:.0} rows/s",
        record.rows,
        human_bytes(record.bytes),
        rate
    );
    let estimated_rows = record.about().description.estimated_rows.unwrap_or(-1);
    if let Some((percent, eta)) = estimate(record.rows, estimated_rows, rate) {
        line.push_str(&format!(
            ", {percent:.1}% of about {estimated_rows} rows, ETA {eta:.0} s"
        ));
    }
    line
}

/// Rows and bytes of the running workers of this backend's directory
/// export, when the table exists.
pub fn job_totals() -> Option<(u64, u64)> {
    let slots = slots()?;
    // SAFETY: reads this backend's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    let mut totals = (0, 0);
    for snapshot in slots.iter().filter_map(read_slot) {
        if snapshot.leader_pid == pid {
            totals.0 += snapshot.rows;
            totals.1 += snapshot.bytes;
        }
    }
    Some(totals)
}

/// One row of `stream_export_activity`.
pub struct ActivityRow {
    pub pid: i32,
    pub leader_pid: Option<i32>,
    pub partition: Option<i32>,
    pub role: String,
    pub database: String,
    pub source: Option<String>,
    pub destination: Option<String>,
    pub format: String,
    pub started_at: i64,
    pub rows: i64,
    pub bytes: i64,
    pub written: i64,
    pub estimated_rows: Option<i64>,
}

struct Snapshot {
    pid: i32,
    leader_pid: i32,
    partition: i32,
    database: u32,
    role: u32,
    started_at: i64,
    estimated_rows: i64,
    rows: u64,
    bytes: u64,
    written: u64,
    source: String,
    destination: String,
    format: String,
}

/// A consistent copy of a slot in use, or None.
fn read_slot(slot: &Slot) -> Option<Snapshot> {
    for _ in 0..100 {
        let before = slot.version.load(Ordering::Acquire);
        let pid = slot.pid.load(Ordering::Acquire);
        if pid == 0 {
            return None;
        }
        if before % 2 == 1 {
            std::hint::spin_loop();
            continue;
        }
        // SAFETY: plain reads of a shared slot; the version check below
        // discards a copy that raced with a writer.
        let snapshot = unsafe {
            Snapshot {
                pid,
                leader_pid: std::ptr::read_volatile(&slot.leader_pid),
                partition: std::ptr::read_volatile(&slot.partition),
                database: std::ptr::read_volatile(&slot.database),
                role: std::ptr::read_volatile(&slot.role),
                started_at: std::ptr::read_volatile(&slot.started_at),
                estimated_rows: std::ptr::read_volatile(&slot.estimated_rows),
                rows: slot.rows.load(Ordering::Relaxed),
                bytes: slot.bytes.load(Ordering::Relaxed),
                written: slot.written.load(Ordering::Relaxed),
                source: read_text(&std::ptr::read_volatile(&slot.source)),
                destination: read_text(&std::ptr::read_volatile(&slot.destination)),
                format: read_text(&std::ptr::read_volatile(&slot.format)),
            }
        };
        if slot.version.load(Ordering::Acquire) == before {
            return Some(snapshot);
        }
    }
    None
}

/// Every running export the current role may see; a job's leader row
/// carries the sums of its workers.
pub fn activity() -> Vec<ActivityRow> {
    let Some(slots) = slots() else {
        crate::error::raise(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "stream_export_activity needs pg_stream_export in shared_preload_libraries",
            Some("add it to shared_preload_libraries and restart the server; the view's memory is set at server start"),
        )
    };
    let snapshots: Vec<Snapshot> = slots.iter().filter_map(read_slot).collect();
    // SAFETY: role checks and name lookups in a transaction.
    let (me, all_stats) = unsafe {
        let me = pg_sys::GetUserId();
        (
            me,
            pg_sys::has_privs_of_role(me, pg_sys::Oid::from(pg_sys::ROLE_PG_READ_ALL_STATS)),
        )
    };
    snapshots
        .iter()
        .map(|s| {
            let role = pg_sys::Oid::from(s.role);
            // SAFETY: as above.
            let visible = all_stats || unsafe { pg_sys::has_privs_of_role(me, role) };
            let (mut rows, mut bytes, mut written) = (s.rows, s.bytes, s.written);
            if s.leader_pid == 0 {
                for worker in snapshots.iter().filter(|w| w.leader_pid == s.pid) {
                    rows += worker.rows;
                    bytes += worker.bytes;
                    written += worker.written;
                }
            }
            let (role_name, database_name) = (
                name_of_role(role),
                name_of_database(pg_sys::Oid::from(s.database)),
            );
            ActivityRow {
                pid: s.pid,
                leader_pid: (s.leader_pid != 0).then_some(s.leader_pid),
                partition: (s.partition >= 0).then_some(s.partition),
                role: role_name,
                database: database_name,
                source: visible.then(|| s.source.clone()),
                destination: visible.then(|| s.destination.clone()),
                format: s.format.clone(),
                started_at: s.started_at,
                rows: rows as i64,
                bytes: bytes as i64,
                written: written as i64,
                estimated_rows: (s.estimated_rows >= 0).then_some(s.estimated_rows),
            }
        })
        .collect()
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn sqlstates_unpack() {
        // MAKE_SQLSTATE('5','7','0','1','4')
        let pack = |s: &str| {
            s.bytes()
                .enumerate()
                .map(|(i, c)| ((c - b'0') as i32 & 0x3f) << (6 * i))
                .sum::<i32>()
        };
        for state in ["57014", "22012", "XX000", "53100", "42P01"] {
            assert_eq!(sqlstate(pack(state)), state);
        }
    }

    #[test]
    fn texts_are_cut_on_character_boundaries() {
        let mut field = [0u8; 8];
        copy_text(&mut field, "ééééé");
        assert_eq!(read_text(&field), "ééé");
        copy_text(&mut field, "ab");
        assert_eq!(read_text(&field), "ab");
    }

    #[test]
    fn one_role_holds_a_share_and_superusers_keep_some() {
        assert_eq!(role_share(64), (16, 8));
        assert_eq!(role_share(3), (1, 0));
        assert_eq!(role_share(1), (1, 0));
    }

    #[test]
    fn estimates_stop_at_the_total() {
        assert_eq!(estimate(50, 100, 10.0), Some((50.0, 5.0)));
        assert_eq!(estimate(150, 100, 10.0), None);
        assert_eq!(estimate(5, -1, 10.0), None);
        assert_eq!(human_bytes(512), "512 bytes");
        assert_eq!(human_bytes(3 << 20), "3.0 MB");
    }
}
