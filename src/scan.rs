//! The SPI cursor walk: the only module that drives a portal.
//!
//! An export opens one read-only cursor (so the whole export reads one
//! snapshot) and then fetches it batch by batch. SPI is connected only for
//! the length of one call, so a value-per-call set-returning function can
//! keep the cursor across calls and each batch's memory is released (at
//! `SPI_finish`) before the next one is read.

use std::ffi::{CStr, CString};

use pgrx::{pg_sys, FromDatum, PgSqlErrorCode};

use crate::error::raise;

/// An open, read-only SPI cursor, identified by its portal name.
pub struct Cursor {
    portal_name: CString,
    closed: bool,
}

/// One fetched batch, valid while the SPI connection of the fetch is open.
pub struct Batch {
    tupdesc: pg_sys::TupleDesc,
    tuples: *mut pg_sys::HeapTuple,
    len: usize,
}

impl Batch {
    pub fn len(&self) -> usize {
        self.len
    }

    /// The text value of column `column` (1-based) of row `row`, or `None`
    /// for SQL NULL.
    pub fn text(&self, row: usize, column: i32) -> Option<&str> {
        assert!(row < self.len, "row {row} out of range");
        let mut is_null = false;
        // SAFETY: `row` is within the batch, the tuple and descriptor belong
        // to the live SPI tuple table, and the column is a text column of
        // the query this module built; the detoasted value lives in the SPI
        // memory context, which outlives `&self`.
        unsafe {
            let tuple = *self.tuples.add(row);
            let datum = pg_sys::SPI_getbinval(tuple, self.tupdesc, column, &mut is_null);
            <&str as FromDatum>::from_datum(datum, is_null)
        }
    }
}

/// Run `body` inside an SPI connection.
fn with_spi<R>(body: impl FnOnce() -> R) -> R {
    // SAFETY: SPI_connect/SPI_finish bracket the body; an ERROR raised in the
    // body aborts the transaction, whose cleanup (AtEOXact_SPI) closes the
    // connection, so no unbalanced state survives.
    unsafe {
        let rc = pg_sys::SPI_connect();
        if rc != pg_sys::SPI_OK_CONNECT as i32 {
            raise(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                format!("SPI_connect failed: {}", spi_code_name(rc)),
                None,
            );
        }
        let result = body();
        pg_sys::SPI_finish();
        result
    }
}

fn spi_code_name(code: i32) -> String {
    // SAFETY: SPI_result_code_string returns a static string for any code.
    unsafe { CStr::from_ptr(pg_sys::SPI_result_code_string(code)) }
        .to_string_lossy()
        .into_owned()
}

impl Cursor {
    /// Plan `sql` and open it as a read-only cursor on the current snapshot.
    pub fn open(sql: &str) -> Cursor {
        let Ok(c_sql) = CString::new(sql) else {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "the export query must not contain a NUL byte",
                None,
            )
        };
        let portal_name = with_spi(|| {
            // SAFETY: inside an SPI connection; SPI_prepare copies the text
            // and raises on parse errors; a NULL plan is turned into an
            // ERROR here. The portal outlives SPI_finish (portals belong to
            // the transaction), and its name is copied before returning.
            unsafe {
                let plan = pg_sys::SPI_prepare(c_sql.as_ptr(), 0, std::ptr::null_mut());
                if plan.is_null() {
                    raise(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        format!("SPI_prepare failed: {}", spi_code_name(pg_sys::SPI_result)),
                        None,
                    );
                }
                let portal = pg_sys::SPI_cursor_open(
                    std::ptr::null(),
                    plan,
                    std::ptr::null_mut(),
                    std::ptr::null(),
                    true,
                );
                if portal.is_null() {
                    raise(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        format!(
                            "SPI_cursor_open failed: {}",
                            spi_code_name(pg_sys::SPI_result)
                        ),
                        None,
                    );
                }
                CStr::from_ptr((*portal).name).to_owned()
            }
        });
        Cursor {
            portal_name,
            closed: false,
        }
    }

    /// Fetch up to `rows` rows and hand them to `consume`; returns how many
    /// rows the batch had (0 at the end). The batch is freed afterwards.
    pub fn fetch<R>(&mut self, rows: i64, consume: impl FnOnce(&Batch) -> R) -> (usize, R) {
        with_spi(|| {
            // SAFETY: inside an SPI connection; the portal was opened by
            // `open` in this transaction and is looked up by name (NULL if
            // the transaction dropped it). SPI_cursor_fetch fills the SPI
            // globals, which are read by value right after it.
            unsafe {
                let portal = pg_sys::SPI_cursor_find(self.portal_name.as_ptr());
                if portal.is_null() {
                    raise(
                        PgSqlErrorCode::ERRCODE_INVALID_CURSOR_STATE,
                        "the export cursor is gone",
                        None,
                    );
                }
                pg_sys::SPI_cursor_fetch(portal, true, rows as std::ffi::c_long);
                let table = pg_sys::SPI_tuptable;
                let len = pg_sys::SPI_processed as usize;
                let batch = if table.is_null() {
                    Batch {
                        tupdesc: std::ptr::null_mut(),
                        tuples: std::ptr::null_mut(),
                        len: 0,
                    }
                } else {
                    Batch {
                        tupdesc: (*table).tupdesc,
                        tuples: (*table).vals,
                        len,
                    }
                };
                let result = consume(&batch);
                (batch.len, result)
            }
        })
    }

    /// Close the cursor now rather than at the end of the transaction.
    pub fn close(&mut self) {
        if self.closed {
            return;
        }
        self.closed = true;
        // SAFETY: only in a healthy transaction (during abort the portal is
        // cleaned up by PostgreSQL itself and must not be touched); the
        // portal is looked up by name and closed only if it still exists.
        unsafe {
            if !pg_sys::IsTransactionState() {
                return;
            }
            let portal = pg_sys::GetPortalByName(self.portal_name.as_ptr());
            if !portal.is_null() && (*portal).status != pg_sys::PortalStatus::PORTAL_ACTIVE {
                pg_sys::SPI_cursor_close(portal);
            }
        }
    }
}

impl Drop for Cursor {
    fn drop(&mut self) {
        self.close();
    }
}
