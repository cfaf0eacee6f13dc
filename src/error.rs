//! User-facing errors: every one carries the SQLSTATE the specification names.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::{PgLogLevel, PgSqlErrorCode};

/// Raise a PostgreSQL ERROR with `code`, `message` and an optional hint.
pub fn raise(code: PgSqlErrorCode, message: impl Into<String>, hint: Option<&str>) -> ! {
    let mut report = ErrorReport::new(code, message.into(), "pg_stream_export");
    if let Some(hint) = hint {
        report = report.set_hint(hint);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// A required argument of a function that also takes optional ones (so it
/// cannot be STRICT): NULL is `22004` naming the argument.
pub fn required<T>(value: Option<T>, name: &str) -> T {
    value.unwrap_or_else(|| {
        raise(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            format!("argument \"{name}\" must not be NULL"),
            None,
        )
    })
}

/// The code of a five-character SQLSTATE such as `57014`; `None` when
/// `text` is not one.
pub fn sqlstate_code(text: &str) -> Option<PgSqlErrorCode> {
    let bytes = text.as_bytes();
    let valid = bytes.len() == 5
        && bytes
            .iter()
            .all(|b| b.is_ascii_digit() || b.is_ascii_uppercase());
    valid.then(|| {
        let packed = bytes
            .iter()
            .enumerate()
            .map(|(i, &b)| (((b - b'0') & 0x3f) as i32) << (6 * i))
            .sum::<i32>();
        PgSqlErrorCode::from(packed)
    })
}

/// The fields of an error that the SQL layer passes on: what a directory
/// worker carries back to its leader.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ErrorFields {
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
    pub context: Option<String>,
}

/// Raise an ERROR with every field of `fields`, CONTEXT included.
pub fn raise_with_fields(code: PgSqlErrorCode, fields: ErrorFields) -> ! {
    let mut report = ErrorReport::new(code, fields.message.clone(), "pg_stream_export");
    if let Some(detail) = &fields.detail {
        report = report.set_detail(detail.clone());
    }
    if let Some(hint) = &fields.hint {
        report = report.set_hint(hint.clone());
    }
    if let Some(context) = fields.context.filter(|context| !context.is_empty()) {
        context_lines::attach(code as i32, fields.message, context);
    }
    report.report(PgLogLevel::ERROR);
    unreachable!("an ERROR report does not return")
}

/// PostgreSQL's CONTEXT lines for errors raised inside the source query.
///
/// PostgreSQL builds CONTEXT while it raises an error, from the callbacks
/// on `error_context_stack` (PL/pgSQL's "function f() line 3", SQL
/// functions, ...). pgrx turns every error it traps into a Rust panic that
/// keeps the message, DETAIL and HINT but not CONTEXT, and raises it again
/// where the SQL function returns. A [`Keeper`] puts one callback of ours
/// under the source's callbacks while the source runs: on the first raise
/// it records the CONTEXT built so far (with the error's code and message);
/// when pgrx raises the same error again it is still on the stack (it is
/// left there while the error unwinds) and adds those lines back.
pub mod context_lines {
    use pgrx::pg_sys;
    use std::cell::RefCell;
    use std::ffi::{c_char, c_int, CStr};

    #[derive(Clone)]
    struct Recorded {
        code: i32,
        message: String,
        context: String,
    }

    thread_local! {
        /// The last ERROR seen with CONTEXT under any keeper (backends run
        /// one thread: this is per backend), for [`recorded_for`].
        static LAST: RefCell<Option<Recorded>> = const { RefCell::new(None) };
    }

    unsafe extern "C-unwind" {
        // Variadic, so not in pgrx's bindings.
        fn errcontext_msg(fmt: *const c_char, ...) -> c_int;
    }

    /// One callback on `error_context_stack` with what it saw. Each keeps
    /// its own record: with exports nested (a source that calls a function
    /// that runs another export) the inner keeper must add back only the
    /// lines built above it, not the ones the outer keeper saw.
    #[repr(C)]
    struct Hook {
        // First, so a pointer to the hook is a pointer to the callback.
        callback: pg_sys::ErrorContextCallback,
        recorded: Option<Recorded>,
    }

    /// Keeps the source's CONTEXT while it lives (see the module).
    pub struct Keeper {
        hook: *mut Hook,
    }

    /// Start keeping CONTEXT for errors raised until the keeper drops.
    pub fn keep() -> Keeper {
        Keeper { hook: push(None) }
    }

    /// Record `context` for the next raise of (`code`, `message`) and make
    /// sure a callback will add it.
    pub fn attach(code: i32, message: String, context: String) {
        // Left on the stack: the raise that follows unwinds past it.
        let _ = push(Some(Recorded {
            code,
            message,
            context,
        }));
    }

    /// The CONTEXT last recorded for the error (`code`, `message`), if any:
    /// for a caller that catches the error and reports it elsewhere.
    pub fn recorded_for(code: i32, message: &str) -> Option<String> {
        LAST.with(|last| {
            last.borrow()
                .as_ref()
                .filter(|r| r.code == code && r.message == message)
                .map(|r| r.context.clone())
        })
    }

    fn push(recorded: Option<Recorded>) -> *mut Hook {
        // SAFETY: backends are single-threaded and this runs on the main
        // thread; the hook is heap-allocated, so it stays valid wherever
        // the stack is restored to, and its callback is its first field.
        unsafe {
            let hook = Box::into_raw(Box::new(Hook {
                callback: pg_sys::ErrorContextCallback {
                    previous: pg_sys::error_context_stack,
                    callback: Some(add_or_record),
                    arg: std::ptr::null_mut(),
                },
                recorded,
            }));
            (*hook).callback.arg = hook.cast();
            pg_sys::error_context_stack = hook.cast();
            hook
        }
    }

    impl Drop for Keeper {
        fn drop(&mut self) {
            if std::thread::panicking() {
                // An error is unwinding: pgrx raises it again above us and
                // the callback must still be there. It is not freed (a few
                // bytes per error): a saved stack may still point at it.
                return;
            }
            // SAFETY: main thread; the hook is ours, popped the way
            // PostgreSQL pops a callback (by its `previous`) only while it
            // is on the current stack, then freed: nothing else points at
            // it, since no stack saved after the push outlives this frame.
            unsafe {
                let callback: *mut pg_sys::ErrorContextCallback = self.hook.cast();
                let mut entry = pg_sys::error_context_stack;
                while !entry.is_null() && entry != callback {
                    entry = (*entry).previous;
                }
                if entry == callback {
                    pg_sys::error_context_stack = (*callback).previous;
                }
                drop(Box::from_raw(self.hook));
            }
        }
    }

    /// The callback: called by PostgreSQL for every report while it is on
    /// the stack, with the report being built on top of the error data
    /// stack; `arg` is its [`Hook`].
    ///
    /// # Safety
    ///
    /// Only as the callback of a [`Hook`] made by `push`, with that hook as
    /// `arg`, while PostgreSQL builds a report.
    unsafe extern "C-unwind" fn add_or_record(arg: *mut std::ffi::c_void) {
        // SAFETY: `arg` is the live hook `push` made (hooks are freed only
        // once off the stack). Called from errfinish with a report in
        // progress, so CopyErrorData copies it (into a context other than
        // ErrorContext, as it requires); errcontext_msg appends to that
        // same report.
        unsafe {
            let hook = &mut *arg.cast::<Hook>();
            let previous = pg_sys::MemoryContextSwitchTo(pg_sys::TopMemoryContext);
            let data = pg_sys::CopyErrorData();
            pg_sys::MemoryContextSwitchTo(previous);
            if (*data).elevel >= pgrx::PgLogLevel::ERROR as c_int {
                let text = |ptr: *const c_char| {
                    (!ptr.is_null()).then(|| CStr::from_ptr(ptr).to_string_lossy().into_owned())
                };
                let code = (*data).sqlerrcode;
                let message = text((*data).message).unwrap_or_default();
                let context = text((*data).context);
                let context = context.filter(|context| !context.is_empty());
                match context {
                    // pgrx raising it again: nothing above us has added a
                    // line, so add what was built above us the first time.
                    None => {
                        let lines = hook
                            .recorded
                            .as_ref()
                            .filter(|r| r.code == code && r.message == message)
                            .map(|r| {
                                std::ffi::CString::new(r.context.as_str()).unwrap_or_default()
                            });
                        if let Some(lines) = lines {
                            errcontext_msg(c"%s".as_ptr(), lines.as_ptr());
                        }
                    }
                    // A raise with its CONTEXT built above us (or added back
                    // by a keeper above): record it, replacing what came
                    // before. Errors without CONTEXT leave the record alone,
                    // so one raised while another unwinds does not lose it.
                    Some(context) => {
                        let recorded = Recorded {
                            code,
                            message,
                            context,
                        };
                        LAST.with(|last| *last.borrow_mut() = Some(recorded.clone()));
                        hook.recorded = Some(recorded);
                    }
                }
            }
            pg_sys::FreeErrorData(data);
        }
    }
}

#[cfg(test)]
mod unit_tests {
    use super::*;

    #[test]
    fn sqlstates_pack_as_postgres_does() {
        assert_eq!(
            sqlstate_code("57014"),
            Some(PgSqlErrorCode::ERRCODE_QUERY_CANCELED)
        );
        assert_eq!(
            sqlstate_code("42P01"),
            Some(PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE)
        );
        assert_eq!(sqlstate_code("5701"), None);
        assert_eq!(sqlstate_code("57o14"), None);
    }
}
