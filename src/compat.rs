//! What differs between the PostgreSQL versions this extension supports,
//! kept in one place: every `cfg(feature = "pgNN")` and server-version
//! check lives here.

use pgrx::pg_sys;

/// The attributes of a tuple descriptor, dropped ones included.
///
/// # Safety
/// `tupdesc` must be a valid tuple descriptor that outlives the slice.
pub unsafe fn attributes<'a>(tupdesc: pg_sys::TupleDesc) -> &'a [pg_sys::FormData_pg_attribute] {
    // SAFETY: the caller guarantees a valid descriptor; its `natts`
    // attributes are one contiguous array (since 18 it follows the compact
    // attributes, and TupleDescAttr finds it).
    unsafe {
        let natts = (*tupdesc).natts as usize;
        if natts == 0 {
            return &[];
        }
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        let first = (*tupdesc).attrs.as_ptr();
        #[cfg(feature = "pg18")]
        let first = pg_sys::TupleDescAttr(tupdesc, 0).cast_const();
        std::slice::from_raw_parts(first, natts)
    }
}

/// Install a signal handler the way the server does (`pqsignal`, which
/// 18 renamed for the backend).
///
/// # Safety
/// `handler` must be safe to run as a signal handler.
pub unsafe fn set_signal_handler(signal: libc::c_int, handler: pg_sys::pqsigfunc) {
    // SAFETY: forwarded from the caller.
    unsafe {
        #[cfg(any(feature = "pg15", feature = "pg16", feature = "pg17"))]
        pg_sys::pqsignal(signal, handler);
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(signal, handler);
    }
}

/// Whether the server implements `COPY ... TO ... (FORMAT json)` itself
/// (PostgreSQL 19 and later). The COPY hook then leaves plain
/// `FORMAT json` statements without this extension's own options to it.
/// The one place that knows this version boundary.
pub const NATIVE_COPY_JSON: bool = pg_sys::PG_VERSION_NUM >= 190000;
