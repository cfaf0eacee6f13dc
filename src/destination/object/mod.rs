//! Object storage (S3 and S3-compatible stores) as a destination and as a
//! source for verification. The pure parts (URIs, configuration, signing,
//! the client, the streaming upload) are in submodules; this module is
//! their PostgreSQL side: privileges, settings, SQLSTATEs, exit cleanup.

pub mod client;
pub mod config;
mod connect;
pub mod lease;
pub mod sigv4;
pub mod upload;
pub mod uri;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use pgrx::{pg_sys, PgSqlErrorCode};

use crate::error::raise;
use client::{Client, Failure, StoreError};
use uri::{ObjectUri, UriError};

pub use lease::{Lease, LEASE};
pub use upload::ObjectUpload;

pub const WRITE_ROLE: &str = "stream_export_object_store_write";
pub const READ_ROLE: &str = "stream_export_object_store_read";

/// Superuser, or a member of the extension's role `name` (a role that was
/// dropped admits superusers only).
fn is_superuser_or_member_of(name: &str) -> bool {
    let Ok(c_name) = std::ffi::CString::new(name) else {
        return false;
    };
    // SAFETY: a role lookup that reads as InvalidOid, never an error, when
    // the role is missing.
    let role = unsafe { pg_sys::get_role_oid(c_name.as_ptr(), true) };
    crate::destination::file::is_superuser_or_member_of(role.to_u32())
}

fn require_role(role: &str, what: &str) {
    if !is_superuser_or_member_of(role) {
        raise(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("permission denied to {what} object storage"),
            Some(&format!(
                "Only superusers and members of {role} can {what} object storage."
            )),
        );
    }
}

pub fn check_write_privilege() {
    require_role(WRITE_ROLE, "write to");
}

pub fn check_read_privilege() {
    require_role(READ_ROLE, "read from");
}

/// Parse an object URI (`prefix`: a "directory"), or raise: `0A000` for a
/// scheme other than s3, `22023` for a malformed URI.
pub fn parse_uri(text: &str, prefix: bool) -> ObjectUri {
    match ObjectUri::parse(text, prefix) {
        Ok(uri) => uri,
        Err(UriError::UnsupportedScheme(scheme)) => raise(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("unsupported URI scheme \"{scheme}\""),
            Some("Object storage URIs start with s3:// (S3 and S3-compatible stores)."),
        ),
        Err(UriError::Malformed(why)) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("invalid object URI: {why}"),
            Some(
                "Write s3://bucket/key for an object, s3://bucket/prefix/ for a directory export.",
            ),
        ),
    }
}

/// The SQLSTATE of a store failure.
pub fn failure_code(failure: Failure) -> PgSqlErrorCode {
    match failure {
        Failure::NoSuchBucket | Failure::NotFound => PgSqlErrorCode::ERRCODE_UNDEFINED_FILE,
        Failure::AccessDenied => PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
        Failure::BadCredentials => PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION,
        Failure::Exists => PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
        Failure::Unreachable => PgSqlErrorCode::ERRCODE_CONNECTION_FAILURE,
        Failure::TooLarge => PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        Failure::Stopped => PgSqlErrorCode::ERRCODE_QUERY_CANCELED,
        Failure::Other => PgSqlErrorCode::ERRCODE_IO_ERROR,
    }
}

/// Raise a store failure: `could not <action> "<uri>": <what the store said>`.
pub fn raise_store_error(error: &StoreError, action: &str, uri: Option<&ObjectUri>) -> ! {
    if error.failure == Failure::Stopped {
        // Stopped for a cancel, a timeout or an exit: raise that (FATAL for
        // a terminate), as PostgreSQL words it.
        pgrx::check_for_interrupts!();
    }
    let hint = match error.failure {
        Failure::NoSuchBucket => {
            Some("Create the bucket first, or check the bucket name and the region.")
        }
        Failure::BadCredentials => {
            Some("Check the credentials in the server's environment or AWS profile.")
        }
        Failure::Exists => Some("Pass overwrite => true to replace it."),
        Failure::Unreachable => Some("Check the endpoint (AWS_ENDPOINT_URL) and the network."),
        _ => None,
    };
    let message = match uri {
        Some(uri) => format!("could not {action} \"{uri}\": {}", error.detail),
        None => format!("could not {action}: {}", error.detail),
    };
    raise(failure_code(error.failure), message, hint)
}

/// What the configuration is read from inside the server: the process
/// environment (the postmaster's) and files the server OS user can read.
struct ServerEnvironment;

impl config::Environment for ServerEnvironment {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }

    fn read(&self, path: &str) -> Option<String> {
        std::fs::read_to_string(path).ok()
    }

    fn home(&self) -> Option<String> {
        std::env::var("HOME")
            .ok()
            .filter(|h| !h.is_empty())
            .or_else(|| {
                // SAFETY: getpwuid of our own uid; the entry is copied at once.
                unsafe {
                    let entry = libc::getpwuid(libc::getuid());
                    if entry.is_null() || (*entry).pw_dir.is_null() {
                        return None;
                    }
                    Some(
                        std::ffi::CStr::from_ptr((*entry).pw_dir)
                            .to_string_lossy()
                            .into_owned(),
                    )
                }
            })
    }
}

/// A client configured for this session: the server's AWS configuration,
/// with `pg_stream_export.object_store_profile` if set. Read for every
/// export, so rotated credentials take effect at once.
pub fn session_client() -> Arc<Client> {
    let config = config::resolve(&ServerEnvironment, crate::gucs::object_store_profile().as_deref()).unwrap_or_else(|e| {
        let code = match e {
            config::ConfigError::NoCredentials(_) => {
                PgSqlErrorCode::ERRCODE_INVALID_AUTHORIZATION_SPECIFICATION
            }
            _ => PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        };
        raise(
            code,
            e.to_string(),
            Some("Object storage is configured with the standard AWS environment variables and shared config files of the server's OS user."),
        )
    });
    match Client::new(config, timeouts()) {
        Ok(client) => Arc::new(client.stopping_when(cancel_or_exit_pending)),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            e.detail,
            None,
        ),
    }
}

/// `pg_stream_export.object_connect_timeout` and `object_timeout`.
fn timeouts() -> client::Timeouts {
    client::Timeouts {
        connect: crate::gucs::object_connect_timeout(),
        io: crate::gucs::object_timeout(),
    }
}

/// The longest a commit may hold a cancel back: its PUT, the PUT's
/// retries and the read that decides an unanswered one, all together.
const COMMIT_LIMIT: Duration = Duration::from_secs(30);

/// When the commit under way must stop (milliseconds since the Unix
/// epoch; 0: none). One backend commits one export at a time.
static COMMIT_DEADLINE_MS: AtomicU64 = AtomicU64::new(0);

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A client for the one request that commits an export (its manifest): a
/// cancel or `statement_timeout` does not stop it, since whether it
/// reached the store would then be unknown. A terminate or shutdown stops
/// it, and so does one deadline for the whole commit: at most
/// [`COMMIT_LIMIT`], and at most a third of the lease's time to live, so
/// that the lease (no longer renewed once a cancel stopped the session's
/// client) cannot expire and let another export take the prefix first.
pub fn commit_client(client: &Client) -> Client {
    let limit = COMMIT_LIMIT.min(crate::gucs::object_lease_ttl() / 3);
    COMMIT_DEADLINE_MS.store(now_ms() + limit.as_millis() as u64, Ordering::SeqCst);
    let timeouts = client::Timeouts {
        connect: crate::gucs::object_connect_timeout().min(limit),
        io: crate::gucs::object_timeout().min(limit),
    };
    match client.with_timeouts(timeouts) {
        Ok(client) => client.stopping_when(exit_pending_or_commit_late),
        Err(e) => raise(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            e.detail,
            None,
        ),
    }
}

/// Whether the object `uri` holds exactly `bytes` now: how a PUT that
/// ended with no answer is decided. `false` also when the store cannot
/// tell.
pub fn holds(client: &Client, uri: &ObjectUri, bytes: &[u8]) -> bool {
    use std::io::Read;
    // The commit's own client may have been stopped by its deadline: then
    // one look through a clean-up client (short timeouts) decides.
    let cleanup;
    let client = if client.is_stopped() {
        match client.for_cleanup() {
            Ok(c) => {
                cleanup = c;
                &cleanup
            }
            Err(_) => return false,
        }
    } else {
        client
    };
    let Ok(reader) = client.get(uri) else {
        return false;
    };
    let mut held = Vec::with_capacity(bytes.len());
    reader
        .take(bytes.len() as u64 + 1)
        .read_to_end(&mut held)
        .is_ok()
        && held == bytes
}

/// Whether a terminate or shutdown is pending, or the commit under way is
/// past its deadline. Asked by the commit client's watchdog thread.
fn exit_pending_or_commit_late() -> bool {
    let deadline = COMMIT_DEADLINE_MS.load(Ordering::SeqCst);
    exit_pending() || (deadline != 0 && now_ms() > deadline)
}

/// Whether a terminate or shutdown is pending for this backend (see
/// [`cancel_or_exit_pending`]).
fn exit_pending() -> bool {
    // SAFETY: a plain volatile read of a `volatile sig_atomic_t` flag that
    // a signal handler writes; any thread may read it.
    unsafe { std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ProcDiePending)) != 0 }
}

/// Whether a cancel (`pg_cancel_backend`, `statement_timeout`) or an exit
/// (`pg_terminate_backend`, shutdown) is pending for this backend. Asked by
/// a client's watchdog thread: it only reads the two flags PostgreSQL's
/// signal handlers set, never calls into PostgreSQL, and the backend itself
/// then acts on the interrupt as usual.
pub fn cancel_or_exit_pending() -> bool {
    // SAFETY: plain volatile reads of `volatile sig_atomic_t` flags, which
    // signal handlers write; any thread may read them.
    unsafe {
        std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::QueryCancelPending)) != 0
            || std::ptr::read_volatile(std::ptr::addr_of!(pg_sys::ProcDiePending)) != 0
    }
}

/// The configured base part size in bytes.
pub fn part_size() -> usize {
    crate::gucs::object_part_size()
}

fn check_interrupts() {
    pgrx::check_for_interrupts!();
}

/// Open an upload of `uri` (checked: configuration and, unless
/// `overwrite`, that no object is there yet: `58P02` as for a file). The
/// caller has checked the privilege.
pub fn open_upload(uri: &ObjectUri, overwrite: bool) -> ObjectUpload {
    let client = session_client();
    if !overwrite {
        match client.head(uri) {
            Ok(Some(_)) => raise(
                PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
                format!("object \"{uri}\" already exists"),
                Some("Pass overwrite => true to replace it."),
            ),
            Ok(None) => {}
            Err(e) => raise_store_error(&e, "check", Some(uri)),
        }
    }
    register_exit_callback();
    ObjectUpload::new(
        client,
        uri.clone(),
        overwrite,
        part_size(),
        check_interrupts,
    )
}

/// An upload of `uri` with `client`, without checks: for objects an export
/// owns (a chunk that may be rewritten).
pub fn upload_with(client: &Arc<Client>, uri: &ObjectUri, overwrite: bool) -> ObjectUpload {
    register_exit_callback();
    ObjectUpload::new(
        client.clone(),
        uri.clone(),
        overwrite,
        part_size(),
        check_interrupts,
    )
}

/// A reader of an object's bytes (privilege checked). It keeps its client,
/// so that a cancel also stops a read that stalls.
pub fn open_reader(uri: &ObjectUri) -> impl std::io::Read {
    check_read_privilege();
    let client = session_client();
    let body = client
        .get(uri)
        .unwrap_or_else(|e| raise_store_error(&e, "read", Some(uri)));
    ObjectReader {
        body,
        _client: client,
    }
}

struct ObjectReader<R> {
    body: R,
    _client: Arc<Client>,
}

impl<R: std::io::Read> std::io::Read for ObjectReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.body.read(buf)
    }
}

fn register_exit_callback() {
    use std::sync::atomic::{AtomicBool, Ordering};
    static HOOKED: AtomicBool = AtomicBool::new(false);
    if !HOOKED.swap(true, Ordering::Relaxed) {
        // SAFETY: registers a callback that only talks to the store; once
        // per process.
        unsafe { pg_sys::before_shmem_exit(Some(abort_uploads_on_exit), pg_sys::Datum::from(0)) };
    }
}

/// Runs as the process exits on FATAL or shutdown, where no destructor
/// runs: aborts the multipart uploads still open. Never calls into
/// PostgreSQL and never panics.
///
/// # Safety
///
/// Only as an exit callback of this process; it touches no PostgreSQL state.
unsafe extern "C-unwind" fn abort_uploads_on_exit(_code: libc::c_int, _arg: pg_sys::Datum) {
    let _ = std::panic::catch_unwind(upload::abort_live_uploads);
    let _ = std::panic::catch_unwind(lease::release_live_leases);
}

/// Take the lease of `prefix` for an export (see [`lease`]): `55P03` when
/// another export holds it.
pub fn acquire_lease(client: &Arc<Client>, prefix: &ObjectUri, export_id: &str) -> Lease {
    register_exit_callback();
    // SAFETY: reads this backend's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default();
    let ttl = crate::gucs::object_lease_ttl();
    match Lease::acquire(client.clone(), prefix, export_id, &format!("pid {pid} on {host}"), ttl) {
        Ok(lease) => lease,
        Err(lease::LeaseError::Store(e)) => raise_store_error(&e, "lease", Some(&prefix.join(lease::LEASE))),
        Err(lease::LeaseError::Held {
            holder,
            export_id,
            expires_at,
        }) => raise(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            format!("\"{prefix}\" is being exported to by another export ({holder}, export {export_id})"),
            Some(&if expires_at > 0 {
                format!("Wait for it to finish. A lease its holder stopped renewing expires {} seconds after its last renewal (pg_stream_export.object_lease_ttl); it said {expires_at} (Unix time).", ttl.as_secs())
            } else {
                "Wait for it to finish.".to_string()
            }),
        ),
    }
}

/// `55P03` when `lease` was lost (taken over after it could not be renewed
/// in time): nothing more may be committed under the prefix.
pub fn check_lease(lease: &Lease, prefix: &ObjectUri) {
    if !lease.is_held() {
        raise(
            PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
            format!("the export lost its lease on \"{prefix}\""),
            Some("It could not be renewed in time (pg_stream_export.object_lease_ttl), and another export may have taken the prefix over; export again."),
        );
    }
}

/// With the lease held, remove what exports that died left under `prefix`:
/// the part objects `keep` does not name, and every multipart upload in
/// progress. Logs each removal; returns nothing, a failure raises.
pub fn remove_leftovers(client: &Client, prefix: &ObjectUri, keep: &dyn Fn(&str) -> bool) {
    let removed = delete_under(client, prefix, "part-", |name| {
        crate::layout::is_part_file_name(name) && !keep(name)
    })
    .unwrap_or_else(|e| raise_store_error(&e, "list", Some(prefix)));
    for name in removed {
        pgrx::log!(
            "pg_stream_export: removed \"{}\" left by an export that did not finish",
            prefix.join(&name)
        );
    }
    let uploads = client
        .list_uploads(prefix)
        .unwrap_or_else(|e| raise_store_error(&e, "list uploads of", Some(prefix)));
    for (key, upload_id) in uploads {
        let uri = ObjectUri {
            bucket: prefix.bucket.clone(),
            key,
        };
        if client.abort_multipart(&uri, &upload_id).is_ok() {
            pgrx::log!("pg_stream_export: aborted the upload of \"{uri}\" left by an export that did not finish");
        }
    }
}

/// Raise an error of an upload's writer.
pub fn raise_upload_error(error: std::io::Error, uri: &ObjectUri) -> ! {
    match upload::store_error_of(&error) {
        Some(e) => raise_store_error(e, "upload", None),
        None => raise(
            PgSqlErrorCode::ERRCODE_IO_ERROR,
            format!("could not upload \"{uri}\": {error}"),
            None,
        ),
    }
}

/// If `error` came from an upload, raise it with its SQLSTATE.
pub fn raise_if_upload_error(error: &std::io::Error) {
    if let Some(e) = upload::store_error_of(error) {
        raise_store_error(e, "upload", None)
    }
}

/// Claim a prefix's manifest for a directory export: `58P02` if one is
/// there and not `overwrite`; else the parts it lists (to remove once the
/// new manifest replaced it).
pub fn claim_manifest(client: &Client, prefix: &ObjectUri, overwrite: bool) -> Vec<String> {
    let manifest = prefix.join(crate::layout::MANIFEST);
    let existing = match client.get(&manifest) {
        Ok(reader) => {
            use std::io::Read;
            let mut text = Vec::new();
            let _ = reader.take(64 << 20).read_to_end(&mut text);
            Some(serde_json::from_slice::<serde_json::Value>(&text).unwrap_or_default())
        }
        Err(e) if e.failure == Failure::NotFound => None,
        Err(e) => raise_store_error(&e, "read", Some(&manifest)),
    };
    match existing {
        Some(_) if !overwrite => raise(
            PgSqlErrorCode::ERRCODE_DUPLICATE_FILE,
            format!("\"{prefix}\" already holds an export (\"{manifest}\" exists)"),
            Some("Pass overwrite => true to replace it, or export to another prefix."),
        ),
        Some(old) => crate::layout::manifest_parts(&old),
        None => Vec::new(),
    }
}

/// Delete the objects under `prefix` whose names (relative to it) start
/// with `start` and pass `wanted`, one by one; a failed delete is skipped.
/// Returns the names deleted.
pub fn delete_under(
    client: &Client,
    prefix: &ObjectUri,
    start: &str,
    wanted: impl Fn(&str) -> bool,
) -> Result<Vec<String>, StoreError> {
    let mut deleted = Vec::new();
    for key in client.list(&prefix.join(start))? {
        let Some(name) = key.strip_prefix(prefix.key.as_str()) else {
            continue;
        };
        if wanted(name) && client.delete(&prefix.join(name)).is_ok() {
            deleted.push(name.to_owned());
        }
    }
    Ok(deleted)
}

/// Abort the multipart uploads in progress under `prefix` whose names
/// (relative to it) pass `wanted`. Best effort, never raises; stops when a
/// cancel or terminate is pending.
pub fn abort_uploads_under(client: &Client, prefix: &ObjectUri, wanted: &dyn Fn(&str) -> bool) {
    if let Ok(uploads) = client.list_uploads(prefix) {
        for (key, upload_id) in uploads {
            if cancel_or_exit_pending() {
                return;
            }
            if !key.strip_prefix(prefix.key.as_str()).is_some_and(wanted) {
                continue;
            }
            let uri = ObjectUri {
                bucket: prefix.bucket.clone(),
                key,
            };
            let _ = client.abort_multipart(&uri, &upload_id);
        }
    }
}

/// A client for cleaning up after a failure, with the short timeouts of
/// cleanup; `None` when the configuration does not resolve (never raises).
fn cleanup_client() -> Option<Client> {
    config::resolve(
        &ServerEnvironment,
        crate::gucs::object_store_profile().as_deref(),
    )
    .ok()
    .and_then(|c| Client::new(c, client::Timeouts::CLEANUP).ok())
}

/// Remove the part objects of the export `export_id` under `prefix`. Best
/// effort and never raises: it runs when a directory export failed.
pub fn remove_parts_of(prefix: &ObjectUri, export_id: &str) {
    let Some(client) = cleanup_client() else {
        return;
    };
    let _ = delete_under(&client, prefix, &format!("part-{export_id}-"), |_| true);
}

/// Remove everything the export `export_id` left under `prefix` when the
/// process that ran it may have died: its part objects, its multipart
/// uploads in progress, and its lease. Best effort and never raises: it
/// runs while a cluster export's error unwinds.
pub fn remove_export_leftovers(prefix: &ObjectUri, export_id: &str) {
    let Some(client) = cleanup_client() else {
        return;
    };
    let own = format!("part-{export_id}-");
    let _ = delete_under(&client, prefix, &own, |_| true);
    if let Ok(uploads) = client.list_uploads(prefix) {
        for (key, upload_id) in uploads {
            let name = key.strip_prefix(prefix.key.as_str()).unwrap_or("");
            if name.starts_with(&own) {
                let uri = ObjectUri {
                    bucket: prefix.bucket.clone(),
                    key,
                };
                let _ = client.abort_multipart(&uri, &upload_id);
            }
        }
    }
    let lease = prefix.join(lease::LEASE);
    if let Ok(Some((text, _))) = client.get_small(&lease) {
        let holder: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
        if holder["export_id"] == export_id {
            let _ = client.delete(&lease);
        }
    }
}
