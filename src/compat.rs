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

/// The start time of the oldest transaction in progress in any other
/// backend that runs SQL (client backends and background workers, in
/// every database; autovacuum never inserts a row), from the server's
/// backend status array, read afresh; `None` when there is none. A backend
/// that does not report its activity (`track_activities` off) counts from
/// its own start, the earliest its transaction can have begun. Any role
/// may call it: nothing about the transactions leaves this function but
/// that one time.
pub fn oldest_other_transaction_start() -> Option<pg_sys::TimestampTz> {
    // SAFETY: the status array is copied into this backend's memory by the
    // first fetch after the clear (PostgreSQL's own read protocol); the
    // entries are read by 1-based index below the count it reports, and
    // only plain fields are read.
    unsafe {
        pg_sys::pgstat_clear_backend_activity_snapshot();
        let count = pg_sys::pgstat_fetch_stat_numbackends();
        let mut oldest: Option<pg_sys::TimestampTz> = None;
        for index in 1..=count {
            #[cfg(feature = "pg15")]
            let entry = pg_sys::pgstat_fetch_stat_local_beentry(index);
            #[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
            let entry = pg_sys::pgstat_get_local_beentry_by_index(index);
            if entry.is_null() {
                continue;
            }
            let status = &(*entry).backendStatus;
            let runs_sql = matches!(
                status.st_backendType,
                pg_sys::BackendType::B_BACKEND | pg_sys::BackendType::B_BG_WORKER
            );
            let start = if status.st_state == pg_sys::BackendState::STATE_DISABLED {
                status.st_proc_start_timestamp
            } else {
                status.st_xact_start_timestamp
            };
            if status.st_procpid == pg_sys::MyProcPid || !runs_sql || start == 0 {
                continue;
            }
            oldest = Some(oldest.map_or(start, |o: pg_sys::TimestampTz| o.min(start)));
        }
        // The copy belongs to this transaction; the next reader wants a
        // fresh one too.
        pg_sys::pgstat_clear_backend_activity_snapshot();
        oldest
    }
}
