//! The extension's settings, all prefixed `pg_stream_export.`: every one is
//! defined here and read through a typed getter. The prefix is reserved, so
//! a misspelt `pg_stream_export.*` name is an error rather than a setting
//! that silently does nothing.

use std::ffi::{c_void, CStr, CString};
use std::time::Duration;

use pgrx::{pg_guard, pg_sys, GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};

/// `pg_stream_export.file_mode`: the permissions of the files an export
/// writes on the server.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum FileMode {
    /// Readable by every OS user, as COPY's files (COPY writes under umask
    /// 022, whatever the server's umask).
    #[name = c"0644"]
    World,
    /// Readable by the server's OS group.
    #[name = c"0640"]
    Group,
    /// The server's OS user only.
    #[name = c"0600"]
    Owner,
}

impl FileMode {
    pub fn bits(self) -> libc::mode_t {
        match self {
            FileMode::World => 0o644,
            FileMode::Group => 0o640,
            FileMode::Owner => 0o600,
        }
    }
}

static ALLOWED_DIRECTORY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static OBJECT_STORE_PROFILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static OBJECT_PART_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);
static OBJECT_CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);
static OBJECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(120_000);
static OBJECT_LEASE_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(60);
static MAX_TRACKED_EXPORTS: GucSetting<i32> = GucSetting::<i32>::new(64);
static PROGRESS_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(0);
static LOG_EXPORTS: GucSetting<bool> = GucSetting::<bool>::new(true);
static FILE_MODE: GucSetting<FileMode> = GucSetting::<FileMode>::new(FileMode::World);
static NODE_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static NODE_CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// The smallest part S3 accepts (but the last), in kB.
const MIN_PART_SIZE_KB: i32 = 5 * 1024;
/// The shortest lease: it is renewed every third of it.
const MIN_LEASE_TTL_S: i32 = 2;
/// The longest `node_connect_timeout` and `object_connect_timeout` a role
/// that is not a superuser may set (5 minutes): longer waits are the
/// administrator's choice (postgresql.conf, ALTER SYSTEM, or a superuser's
/// ALTER ROLE / ALTER DATABASE ... SET).
pub const CONNECT_TIMEOUT_BOUND_MS: i32 = 300_000;

/// A text setting, `None` when unset or empty.
fn text(setting: &GucSetting<Option<CString>>) -> Option<String> {
    setting
        .get()
        .map(|value| value.to_string_lossy().into_owned())
        .filter(|value| !value.is_empty())
}

/// `pg_stream_export.allowed_directory`: when set, server files must lie
/// inside it. Only superusers can change it.
pub fn allowed_directory() -> Option<String> {
    text(&ALLOWED_DIRECTORY)
}

/// `pg_stream_export.object_store_profile`: the AWS profile (of the server
/// OS user's shared config and credentials files) object exports use;
/// `None`: the environment, then `AWS_PROFILE` or `default`. Names a
/// profile, never holds a secret.
pub fn object_store_profile() -> Option<String> {
    text(&OBJECT_STORE_PROFILE)
}

/// `pg_stream_export.object_part_size`: the base size of an upload's
/// parts, in bytes.
pub fn object_part_size() -> usize {
    (OBJECT_PART_SIZE_KB.get().max(MIN_PART_SIZE_KB) as usize) << 10
}

/// `pg_stream_export.object_connect_timeout`: the longest wait to connect to
/// the object store.
pub fn object_connect_timeout() -> Duration {
    Duration::from_millis(OBJECT_CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

/// `pg_stream_export.object_timeout`: the longest the store may take to
/// accept or answer any one read or write of a request.
pub fn object_timeout() -> Duration {
    Duration::from_millis(OBJECT_TIMEOUT_MS.get().max(1) as u64)
}

/// `pg_stream_export.object_lease_ttl`: how long a prefix's lease lasts
/// after its last renewal.
pub fn object_lease_ttl() -> Duration {
    Duration::from_secs(OBJECT_LEASE_TTL_S.get().max(MIN_LEASE_TTL_S) as u64)
}

/// `pg_stream_export.max_tracked_exports`: slots of the shared activity
/// table (a server-start setting; its default when not preloaded).
pub fn max_tracked_exports() -> usize {
    MAX_TRACKED_EXPORTS.get().max(1) as usize
}

/// `pg_stream_export.progress`: the interval between progress NOTICEs,
/// `None` for none.
pub fn progress_interval() -> Option<Duration> {
    let millis = PROGRESS_INTERVAL_MS.get();
    (millis > 0).then(|| Duration::from_millis(millis as u64))
}

/// `pg_stream_export.log_exports`: whether an export's end writes an audit
/// LOG line.
pub fn log_exports() -> bool {
    LOG_EXPORTS.get()
}

/// `pg_stream_export.node_connect_timeout`: the longest a cluster export
/// waits to connect to a node.
pub fn node_connect_timeout() -> Duration {
    Duration::from_millis(NODE_CONNECT_TIMEOUT_MS.get().max(1) as u64)
}

/// `pg_stream_export.file_mode`: the mode bits of export files.
pub fn file_mode() -> libc::mode_t {
    FILE_MODE.get().bits()
}

/// From `_PG_init`: define every setting, then reserve the prefix.
pub fn define() {
    // A server-start setting can only be defined while preloading (and only
    // means something then), as pg_stat_statements.max.
    // SAFETY: reads a flag PostgreSQL sets while loading preloaded libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_int_guc(
            c"pg_stream_export.max_tracked_exports",
            c"Running exports that stream_export_activity can show (shared memory, set at server start).",
            c"Exports beyond this number run normally but do not show in the view. Needs the library in shared_preload_libraries.",
            &MAX_TRACKED_EXPORTS,
            1,
            10_000,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"pg_stream_export.progress",
        c"Interval between progress NOTICEs of a running export (0: none).",
        c"Each NOTICE gives rows, size, rate and, when the total is estimated, percent done and ETA. psql prints them on stderr.",
        &PROGRESS_INTERVAL_MS,
        0,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_bool_guc(
        c"pg_stream_export.log_exports",
        c"Write one LOG line (server log only) when an export ends, whatever the outcome.",
        c"Role, database, source, destination, output options, rows, bytes, CRC-32, duration and outcome.",
        &LOG_EXPORTS,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_stream_export.object_store_profile",
        c"AWS profile that object storage exports and reads use (empty: the environment, then AWS_PROFILE or default).",
        c"A profile of the server OS user's shared AWS config and credentials files; its settings (region, endpoint_url, credentials) win over the environment's. It names a profile and never holds a secret.",
        &OBJECT_STORE_PROFILE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"pg_stream_export.node_id",
        c"This server's name in a cluster export: its files go under node-<id>/ (empty: cluster_name).",
        c"Letters, digits, '_', '-' and '.', at most 63 characters; every node of a cluster needs its own. Set it in postgresql.conf, with ALTER SYSTEM, or per database (ALTER DATABASE ... SET) when several databases of one server are nodes.",
        &NODE_ID,
        GucContext::Suset,
        GucFlags::default(),
    );
    // SAFETY: the check hook is a #[pg_guard] function of this library,
    // which stays loaded as long as the setting exists.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"pg_stream_export.node_connect_timeout",
            c"Longest wait of a cluster export to connect to one node.",
            c"A node not connected by then fails the cluster export (SQLSTATE 08001), whatever the network does. A cancel, statement_timeout, pg_terminate_backend or shutdown ends the wait at once. Only superusers may set it above 5min.",
            &NODE_CONNECT_TIMEOUT_MS,
            1,
            i32::MAX,
            GucContext::Userset,
            GucFlags::UNIT_MS,
            Some(check_node_connect_timeout),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"pg_stream_export.object_part_size",
        c"Size of the parts of a multipart upload to object storage.",
        c"At least 5MB (the S3 minimum). Parts double in size after 3,334 and 6,667 parts to stay under the 10,000-part ceiling; a few parts are held in memory at once.",
        &OBJECT_PART_SIZE_KB,
        MIN_PART_SIZE_KB,
        1024 * 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    // SAFETY: as above.
    unsafe {
        GucRegistry::define_int_guc_with_hooks(
            c"pg_stream_export.object_connect_timeout",
            c"Longest wait to connect to the object store.",
            c"A request whose connection is not open by then fails (and is retried twice, as a lost connection is). A cancel, statement_timeout, pg_terminate_backend or shutdown ends the wait at once. Only superusers may set it above 5min.",
            &OBJECT_CONNECT_TIMEOUT_MS,
            1,
            i32::MAX,
            GucContext::Userset,
            GucFlags::UNIT_MS,
            Some(check_object_connect_timeout),
            None,
            None,
        );
    }
    GucRegistry::define_int_guc(
        c"pg_stream_export.object_timeout",
        c"Longest the object store may take to accept or answer any one read or write of a request.",
        c"A store that stalls this long fails the request (retried twice, backing off); a cancel, statement_timeout or pg_terminate_backend ends the wait at once.",
        &OBJECT_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"pg_stream_export.object_lease_ttl",
        c"How long the lease of an object prefix lasts after its last renewal.",
        c"A directory or chunked export to an s3:// prefix holds its lease and renews it every third of this; a lease whose holder died (kill -9, a lost server) can be taken over this long after its last renewal.",
        &OBJECT_LEASE_TTL_S,
        MIN_LEASE_TTL_S,
        86_400,
        GucContext::Userset,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_string_guc(
        c"pg_stream_export.allowed_directory",
        c"Directory that server-side export files must be inside (empty: no restriction).",
        c"When set, stream_export_to_file, stream_export_to_directory and COPY ... TO 'file' WITH (FORMAT ndjson) only write files inside this directory, after resolving '..' and symbolic links.",
        &ALLOWED_DIRECTORY,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_enum_guc(
        c"pg_stream_export.file_mode",
        c"Permissions of the files exports write on the server: 0644 (as COPY), 0640 or 0600.",
        c"0644 lets a loader running as another OS user read the files, as COPY ... TO 'file' does; 0640 limits reading to the server's OS group, 0600 to the server's OS user.",
        &FILE_MODE,
        GucContext::Userset,
        GucFlags::default(),
    );
    // Names under the prefix that are not defined above are now an error
    // (42602) when set, and placeholders set before the library loaded are
    // removed with a WARNING, as pg_stat_statements and plrust do.
    // SAFETY: called from _PG_init on the main thread with a static name.
    unsafe { pg_sys::MarkGUCPrefixReserved(c"pg_stream_export".as_ptr()) };
}

/// Check hook of `pg_stream_export.node_connect_timeout`.
///
/// # Safety
/// Called by PostgreSQL's GUC machinery with a valid `newval`.
#[pg_guard]
unsafe extern "C-unwind" fn check_node_connect_timeout(
    newval: *mut i32,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: forwarded.
    unsafe { check_connect_timeout(c"pg_stream_export.node_connect_timeout", newval, source) }
}

/// Check hook of `pg_stream_export.object_connect_timeout`.
///
/// # Safety
/// Called by PostgreSQL's GUC machinery with a valid `newval`.
#[pg_guard]
unsafe extern "C-unwind" fn check_object_connect_timeout(
    newval: *mut i32,
    _extra: *mut *mut c_void,
    source: pg_sys::GucSource::Type,
) -> bool {
    // SAFETY: forwarded.
    unsafe { check_connect_timeout(c"pg_stream_export.object_connect_timeout", newval, source) }
}

/// A connect timeout above [`CONNECT_TIMEOUT_BOUND_MS`] is as a `PGC_SUSET`
/// setting: refused (`42501`) when a role that is not a superuser sets it
/// in its session (SET, set_config, a function's SET clause, connection
/// options) or for a role or database (the validation of ALTER ROLE /
/// ALTER DATABASE ... SET, run as the role doing it). What the server's
/// configuration and superusers set is taken as given, and so is what a
/// background or parallel worker takes over from its leader, which was
/// checked there.
///
/// # Safety
/// `newval` must point to the proposed value; called from a check hook.
unsafe fn check_connect_timeout(
    name: &CStr,
    newval: *const i32,
    source: pg_sys::GucSource::Type,
) -> bool {
    use pg_sys::GucSource::{PGC_S_CLIENT, PGC_S_SESSION, PGC_S_TEST};
    // SAFETY: the caller's contract; MyBackendType is this process's own.
    let (value, client_backend) = unsafe {
        (
            *newval,
            pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND,
        )
    };
    let set_by_a_role = matches!(source, PGC_S_CLIENT | PGC_S_SESSION | PGC_S_TEST);
    if value <= CONNECT_TIMEOUT_BOUND_MS || !set_by_a_role || !client_backend {
        return true;
    }
    // SAFETY: superuser() looks up the current user, which is set in every
    // context that gives one of these sources (in a transaction).
    if unsafe { pg_sys::superuser() } {
        return true;
    }
    let name = name.to_string_lossy();
    let message = format!("permission denied to set parameter \"{name}\" above 5min");
    let detail = format!(
        "Roles that are not superusers may set it to at most {CONNECT_TIMEOUT_BOUND_MS} ms; {value} ms was asked."
    );
    let hint = "A superuser can set a longer wait for the server (postgresql.conf, ALTER SYSTEM) or for a role or database (ALTER ROLE ... SET, ALTER DATABASE ... SET).";
    // SAFETY: what GUC_check_errcode and the GUC_check_err* macros do: the
    // strings are palloc'd copies in the current context, read by the GUC
    // machinery right after this hook returns.
    unsafe {
        pg_sys::GUC_check_errcode(pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32);
        pg_sys::GUC_check_errmsg_string = palloc_text(&message);
        pg_sys::GUC_check_errdetail_string = palloc_text(&detail);
        pg_sys::GUC_check_errhint_string = palloc_text(hint);
    }
    false
}

/// `text` as a palloc'd C string (NUL bytes, which none of ours hold,
/// would end it early).
fn palloc_text(text: &str) -> *mut std::ffi::c_char {
    let text = CString::new(text.replace('\0', "")).unwrap_or_default();
    // SAFETY: pstrdup copies a NUL-terminated string into the current
    // memory context.
    unsafe { pg_sys::pstrdup(text.as_ptr()) }
}

/// Settings under which key values are turned into text and back for
/// resume tokens and partition bounds: a text made under them reads back
/// as the same value in any session, whatever its DateStyle, TimeZone,
/// extra_float_digits, IntervalStyle, lc_* or search_path.
const KEY_TEXT_SETTINGS: [(&std::ffi::CStr, &std::ffi::CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"IntervalStyle", c"postgres"),
    (c"TimeZone", c"UTC"),
    (c"extra_float_digits", c"3"),
    (c"lc_monetary", c"C"),
    (c"search_path", c"pg_catalog"),
];

/// Run `body` with [`KEY_TEXT_SETTINGS`] in force, as a function with SET
/// clauses does: the session's own values come back afterwards (and, if
/// `body` raises, when the (sub)transaction aborts).
pub fn with_key_text_settings<R>(body: impl FnOnce() -> R) -> R {
    with_text_settings(false, body)
}

/// As [`with_key_text_settings`], but names resolve as in the session: for
/// running the user's own query (partition planning samples it), whose
/// tables and functions are found on the session's search_path.
pub fn with_key_text_settings_on_search_path<R>(body: impl FnOnce() -> R) -> R {
    with_text_settings(true, body)
}

fn with_text_settings<R>(keep_search_path: bool, body: impl FnOnce() -> R) -> R {
    // SAFETY: reads the current value (copied at once), then a GUC nest
    // level, set_config_option with GUC_ACTION_SAVE for each setting (values
    // every role may set), and AtEOXact_GUC to pop exactly that level.
    unsafe {
        let search_path = keep_search_path.then(|| {
            let value = pgrx::pg_sys::GetConfigOption(c"search_path".as_ptr(), false, false);
            (!value.is_null()).then(|| std::ffi::CStr::from_ptr(value).to_owned())
        });
        let level = pgrx::pg_sys::NewGUCNestLevel();
        for (name, value) in KEY_TEXT_SETTINGS {
            let value = match &search_path {
                Some(Some(session)) if name == c"search_path" => session.as_c_str(),
                _ => value,
            };
            pgrx::pg_sys::set_config_option(
                name.as_ptr(),
                value.as_ptr(),
                pgrx::pg_sys::GucContext::PGC_USERSET,
                pgrx::pg_sys::GucSource::PGC_S_SESSION,
                pgrx::pg_sys::GucAction::GUC_ACTION_SAVE,
                true,
                0,
                false,
            );
        }
        let result = body();
        pgrx::pg_sys::AtEOXact_GUC(true, level);
        result
    }
}
