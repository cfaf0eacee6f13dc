//! The SPI cursor walk: the only module that drives a portal.
//!
//! An export opens one read-only cursor (so the whole export reads one
//! snapshot) and then fetches it batch by batch. SPI is connected only for
//! the length of one call, so a value-per-call set-returning function can
//! keep the cursor across calls and each batch's memory is released (at
//! `SPI_finish`) before the next one is read.

use std::ffi::{CStr, CString};

use pgrx::{pg_guard, pg_sys, PgSqlErrorCode};

use crate::error::raise;

/// A query PostgreSQL has parsed already: the raw parse tree of
/// `COPY (query) TO ...` and the statement text it points into. Valid for
/// the duration of the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ParsedQuery {
    pub raw: *mut pg_sys::Node,
    pub source_text: *const std::ffi::c_char,
    pub location: i32,
    pub len: i32,
}

/// An open, read-only SPI cursor, identified by its portal name.
pub struct Cursor {
    portal_name: CString,
    closed: bool,
    /// Reset after every row: detoasted values and output-function results.
    row_cxt: pg_sys::MemoryContext,
}

/// What receives each fetched row: parallel `values` / `nulls` arrays.
pub type RowCallback<'a> = dyn FnMut(*const pg_sys::Datum, *const bool) + 'a;

/// A DestReceiver that hands every row to a Rust closure.
#[repr(C)]
struct RowReceiver {
    base: pg_sys::DestReceiver,
    /// Points at a `&mut dyn RowCallback` on the fetching frame.
    on_row: *mut std::ffi::c_void,
    row_cxt: pg_sys::MemoryContext,
}

/// # Safety
///
/// Only as the `receiveSlot` of a [`RowReceiver`]'s `base` that outlives the
/// fetch, with `slot` the executor's current row.
#[pg_guard]
unsafe extern "C-unwind" fn receive_slot(
    slot: *mut pg_sys::TupleTableSlot,
    receiver: *mut pg_sys::DestReceiver,
) -> bool {
    // SAFETY: `receiver` is the `base` field of a RowReceiver (repr(C),
    // first field) that outlives the fetch; the slot is the executor's
    // current row, whose attributes are all deformed before use.
    unsafe {
        let receiver = receiver.cast::<RowReceiver>();
        let natts = (*(*slot).tts_tupleDescriptor).natts;
        if ((*slot).tts_nvalid as i32) < natts {
            pg_sys::slot_getsomeattrs_int(slot, natts);
        }
        let old = pg_sys::MemoryContextSwitchTo((*receiver).row_cxt);
        let on_row = &mut *(*receiver).on_row.cast::<&mut RowCallback>();
        on_row((*slot).tts_values, (*slot).tts_isnull);
        pg_sys::MemoryContextSwitchTo(old);
        pg_sys::MemoryContextReset((*receiver).row_cxt);
    }
    true
}

/// # Safety
///
/// Only as a DestReceiver callback; it touches nothing.
#[pg_guard]
unsafe extern "C-unwind" fn receiver_noop_startup(
    _receiver: *mut pg_sys::DestReceiver,
    _operation: i32,
    _tupdesc: pg_sys::TupleDesc,
) {
}

/// # Safety
///
/// Only as a DestReceiver callback; it touches nothing.
#[pg_guard]
unsafe extern "C-unwind" fn receiver_noop(_receiver: *mut pg_sys::DestReceiver) {}

/// A memory context for rows, a child of the current one, which must live
/// as long as every cursor that uses it (for a set-returning function: its
/// multi-call context, not the per-call one that is reset between calls).
pub fn row_context() -> pg_sys::MemoryContext {
    // SAFETY: creates a plain child of the current context; it is freed
    // with its parent, never explicitly.
    unsafe {
        pg_sys::AllocSetContextCreateInternal(
            pg_sys::CurrentMemoryContext,
            c"pg_stream_export row".as_ptr(),
            pg_sys::ALLOCSET_DEFAULT_MINSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_INITSIZE as usize,
            pg_sys::ALLOCSET_DEFAULT_MAXSIZE as usize,
        )
    }
}

/// Run `body` inside an SPI connection.
pub fn with_spi<R>(body: impl FnOnce() -> R) -> R {
    // The body's queries may run the source's functions.
    let _context = crate::error::context_lines::keep();
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
    /// Plan `sql` and open it as a read-only cursor on the current snapshot,
    /// with `params` bound to `$1`, `$2`, ... (type, value; `None` is NULL;
    /// PostgreSQL copies them into the portal). Rows are handed over with
    /// `row_cxt` (see [`row_context`]) as the current memory context, reset
    /// after each row.
    pub fn open(
        sql: &str,
        params: &[(pg_sys::Oid, Option<pg_sys::Datum>)],
        row_cxt: pg_sys::MemoryContext,
    ) -> Cursor {
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
                let mut types: Vec<pg_sys::Oid> = params.iter().map(|(t, _)| *t).collect();
                let mut values: Vec<pg_sys::Datum> = params
                    .iter()
                    .map(|(_, v)| v.unwrap_or(pg_sys::Datum::from(0usize)))
                    .collect();
                let nulls: Vec<std::ffi::c_char> = params
                    .iter()
                    .map(|(_, v)| if v.is_some() { b' ' } else { b'n' } as std::ffi::c_char)
                    .collect();
                let plan = pg_sys::SPI_prepare_cursor(
                    c_sql.as_ptr(),
                    params.len() as i32,
                    types.as_mut_ptr(),
                    pg_sys::CURSOR_OPT_NO_SCROLL as i32,
                );
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
                    values.as_mut_ptr(),
                    nulls.as_ptr(),
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
            row_cxt,
        }
    }

    /// Analyse, rewrite and plan a query PostgreSQL has parsed (the query of
    /// a COPY statement), as COPY itself does, and open it as a portal. Only
    /// a read-only SELECT is accepted.
    pub fn open_parsed(query: &ParsedQuery, row_cxt: pg_sys::MemoryContext) -> Cursor {
        let refuse = |problem: &str| -> ! {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("invalid source query: {problem}"),
                Some("an export source query must be a single read-only statement"),
            )
        };
        let _context = crate::error::context_lines::keep();
        // SAFETY: the raw tree and text belong to the running statement;
        // the tree is copied before analysis (which may scribble on it).
        // Analysis, rewriting and planning raise their own errors; the plan
        // and the portal live in the statement's memory, as long as the
        // export.
        unsafe {
            let mut raw = pgrx::PgBox::<pg_sys::RawStmt>::alloc_node(pg_sys::NodeTag::T_RawStmt);
            raw.stmt = pg_sys::copyObjectImpl(query.raw.cast()).cast();
            raw.stmt_location = query.location;
            raw.stmt_len = query.len;
            let rewritten =
                pgrx::PgList::<pg_sys::Query>::from_pg(pg_sys::pg_analyze_and_rewrite_fixedparams(
                    raw.as_ptr(),
                    query.source_text,
                    std::ptr::null_mut(),
                    0,
                    std::ptr::null_mut(),
                ));
            let parsed = match (rewritten.len(), rewritten.get_ptr(0)) {
                (1, Some(parsed)) => parsed,
                (0, _) => refuse("DO INSTEAD NOTHING rules are not supported"),
                _ => refuse("multi-statement DO INSTEAD rules are not supported"),
            };
            if (*parsed).commandType != pg_sys::CmdType::CMD_SELECT
                || !(*parsed).utilityStmt.is_null()
            {
                refuse("only SELECT, WITH, VALUES and TABLE queries can be exported");
            }
            if (*parsed).hasModifyingCTE {
                refuse("a data-modifying statement in WITH is not allowed");
            }
            let plan = pg_sys::pg_plan_query(
                parsed,
                query.source_text,
                pg_sys::CURSOR_OPT_NO_SCROLL as i32,
                std::ptr::null_mut(),
            );
            let portal = pg_sys::CreateNewPortal();
            (*portal).visible = false;
            pg_sys::PortalDefineQuery(
                portal,
                std::ptr::null(),
                query.source_text,
                pg_sys::CommandTag::CMDTAG_SELECT,
                pg_sys::lappend(std::ptr::null_mut(), plan.cast()),
                std::ptr::null_mut(),
            );
            pg_sys::PortalStart(portal, std::ptr::null_mut(), 0, std::ptr::null_mut());
            Cursor {
                portal_name: CStr::from_ptr((*portal).name).to_owned(),
                closed: false,
                row_cxt,
            }
        }
    }

    /// The descriptor of the rows the cursor returns.
    pub fn tupdesc(&self) -> pg_sys::TupleDesc {
        // SAFETY: the portal is alive (checked by `portal`) and its tupDesc
        // stays valid until the portal is dropped.
        unsafe { (*self.portal()).tupDesc }
    }

    /// The planner's estimate of the rows the portal returns (its first
    /// plan's top node), when it has one.
    pub fn estimated_rows(&self) -> Option<i64> {
        let portal = self.portal();
        // SAFETY: a live portal's statement list holds PlannedStmt nodes
        // (utility statements have no plan tree).
        unsafe {
            let stmts = (*portal).stmts;
            if stmts.is_null() || (*stmts).length < 1 {
                return None;
            }
            let first = (*(*stmts).elements).ptr_value.cast::<pg_sys::Node>();
            if first.is_null() || !pgrx::is_a(first, pg_sys::NodeTag::T_PlannedStmt) {
                return None;
            }
            let plan = (*first.cast::<pg_sys::PlannedStmt>()).planTree;
            (!plan.is_null()).then(|| (*plan).plan_rows.round() as i64)
        }
    }

    fn portal(&self) -> pg_sys::Portal {
        // SAFETY: looks the portal up by name; NULL when the transaction
        // has dropped it.
        let portal = unsafe { pg_sys::GetPortalByName(self.portal_name.as_ptr()) };
        if portal.is_null() || self.closed {
            raise(
                PgSqlErrorCode::ERRCODE_INVALID_CURSOR_STATE,
                "the export cursor is gone",
                None,
            );
        }
        portal
    }

    /// Fetch up to `rows` rows, handing each to `on_row` as parallel
    /// `values` / `nulls` arrays of the cursor's descriptor. Memory that
    /// `on_row` allocates in the current memory context is freed after
    /// each row. Returns the number of rows fetched (0 at the end).
    pub fn fetch(&mut self, rows: i64, mut on_row: &mut RowCallback) -> u64 {
        let portal = self.portal();
        let mut receiver = RowReceiver {
            base: pg_sys::DestReceiver {
                receiveSlot: Some(receive_slot),
                rStartup: Some(receiver_noop_startup),
                rShutdown: Some(receiver_noop),
                rDestroy: Some(receiver_noop),
                mydest: pg_sys::CommandDest::DestNone,
            },
            on_row: (&mut on_row as *mut &mut RowCallback).cast(),
            row_cxt: self.row_cxt,
        };
        // Errors raised by the source keep their CONTEXT.
        let _context = crate::error::context_lines::keep();
        // SAFETY: the portal is a live, ready SELECT portal of this
        // transaction; PortalRunFetch runs it forward into our receiver,
        // which lives on this stack frame for the whole call. Errors unwind
        // as PostgreSQL errors and mark the portal failed.
        unsafe {
            pg_sys::PortalRunFetch(
                portal,
                pg_sys::FetchDirection::FETCH_FORWARD,
                rows as std::ffi::c_long,
                (&mut receiver.base as *mut pg_sys::DestReceiver).cast(),
            )
        }
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

/// Every relation `query` reads, views resolved to the tables under them
/// (the plan cache's dependency list), without running it.
pub fn relations_read_by(query: &str) -> Vec<pg_sys::Oid> {
    let Ok(c_query) = CString::new(query) else {
        return Vec::new();
    };
    with_spi(|| {
        // SAFETY: inside an SPI connection; SPI_prepare raises on errors; a
        // plan source's relationOids is an OID list (or NIL), read before
        // SPI_finish frees the plan.
        unsafe {
            let plan = pg_sys::SPI_prepare(c_query.as_ptr(), 0, std::ptr::null_mut());
            if plan.is_null() {
                return Vec::new();
            }
            let mut relations = Vec::new();
            let sources = pgrx::PgList::<pg_sys::CachedPlanSource>::from_pg(
                pg_sys::SPI_plan_get_plan_sources(plan),
            );
            for source in sources.iter_ptr() {
                let list = (*source).relationOids;
                if list.is_null() {
                    continue;
                }
                for index in 0..(*list).length as usize {
                    relations.push((*(*list).elements.add(index)).oid_value);
                }
            }
            relations
        }
    })
}

/// The first row of a read-only query (`None` without rows), through
/// SPI's read-only mode. (pgrx's `Spi::get_one*` helpers run queries as
/// updates, which assigns the transaction an id: an export would then
/// count as a writing transaction, and fail on a hot standby.) Errors of
/// the query itself are raised as they are.
pub fn select_first_row<T>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
    read: impl FnOnce(pgrx::spi::SpiHeapTupleData<'_>) -> pgrx::spi::SpiResult<T>,
) -> Option<T> {
    // The query may run the source (the NULL-key probe, plan bounds).
    let _context = crate::error::context_lines::keep();
    pgrx::spi::Spi::connect(|client| {
        let table = client.select(sql, Some(1), args)?;
        if table.is_empty() {
            return Ok(None);
        }
        match table.first().get_heap_tuple()? {
            Some(row) => read(row).map(Some),
            None => Ok(None),
        }
    })
    .unwrap_or_else(|e: pgrx::spi::SpiError| {
        raise(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("catalog query failed: {e}"),
            None,
        )
    })
}

/// The first column of the first row of a read-only query (see
/// [`select_first_row`]); `None` for no row or NULL.
pub fn select_one<T: pgrx::FromDatum + pgrx::IntoDatum>(
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Option<T> {
    select_first_row(sql, args, |row| row.get::<T>(1)).flatten()
}
