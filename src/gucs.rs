//! The extension's settings, all prefixed `pg_stream_export.`.

use std::ffi::CString;

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};

/// `pg_stream_export.allowed_directory`: when set, server files must lie
/// inside it. Only superusers can change it.
pub static ALLOWED_DIRECTORY: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `pg_stream_export.object_store_profile`: the AWS profile (of the server
/// OS user's shared config and credentials files) object exports use; empty:
/// the environment, then `AWS_PROFILE` or `default`. Names a profile, never
/// holds a secret.
pub static OBJECT_STORE_PROFILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);

/// `pg_stream_export.object_part_size`: the size of an upload's parts, in kB.
pub static OBJECT_PART_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(8 * 1024);

/// `pg_stream_export.object_connect_timeout`: the longest wait to connect to
/// the object store, in milliseconds.
pub static OBJECT_CONNECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(10_000);

/// `pg_stream_export.object_timeout`: the longest the store may take to
/// accept or answer any one read or write of a request, in milliseconds.
pub static OBJECT_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(120_000);

/// `pg_stream_export.object_lease_ttl`: how long a prefix's lease lasts
/// after its last renewal, in seconds.
pub static OBJECT_LEASE_TTL_S: GucSetting<i32> = GucSetting::<i32>::new(60);

pub fn define() {
    GucRegistry::define_string_guc(
        c"pg_stream_export.object_store_profile",
        c"AWS profile that object storage exports and reads use (empty: the environment, then AWS_PROFILE or default).",
        c"A profile of the server OS user's shared AWS config and credentials files; its settings (region, endpoint_url, credentials) win over the environment's. It names a profile and never holds a secret.",
        &OBJECT_STORE_PROFILE,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"pg_stream_export.object_part_size",
        c"Size of the parts of a multipart upload to object storage.",
        c"At least 5MB (the S3 minimum). Parts double in size after 3,334 and 6,667 parts to stay under the 10,000-part ceiling; a few parts are held in memory at once.",
        &OBJECT_PART_SIZE_KB,
        5 * 1024,
        1024 * 1024,
        GucContext::Userset,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_int_guc(
        c"pg_stream_export.object_connect_timeout",
        c"Longest wait to connect to the object store.",
        c"A request whose connection is not open by then fails (and is retried twice, as a lost connection is). A cancel or statement_timeout ends the wait at once.",
        &OBJECT_CONNECT_TIMEOUT_MS,
        1,
        i32::MAX,
        GucContext::Userset,
        GucFlags::UNIT_MS,
    );
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
        2,
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
