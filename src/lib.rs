//! pg_stream_export: stream exports of any size out of PostgreSQL as NDJSON.
//!
//! The folders follow the path of an export (see `ARCHITECTURE.md`):
//! [`sql`] (the SQL functions and the COPY hook) calls [`run`] (one
//! pipeline run into a destination), which drives [`engine`] (what is
//! read), [`encode`] and [`sink`] (the bytes), and [`destination`] (where
//! they go); leaf modules serve them all.

#![deny(unsafe_op_in_unsafe_fn)]

mod activity;
mod compat;
mod destination;
mod encode;
mod engine;
mod error;
mod footer;
mod gucs;
mod ident;
mod layout;
mod options;
mod progress;
mod remote;
mod run;
mod sink;
mod sql;
mod token;

::pgrx::pg_module_magic!(name, version);

/// Called when the library is loaded: registers the GUCs, the activity
/// table (when preloaded) and the COPY hook.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    keep_rust_backtraces_out_of_errors();
    gucs::define();
    activity::install();
    sql::copy_hook::install();
}

/// pgrx appends a Rust backtrace to an ERROR's DETAIL whenever the
/// server's environment asks for backtraces (`RUST_BACKTRACE=1`, as is
/// common where Rust is installed), and the default panic hook prints one
/// to the server log: neither helps a user, and both leak the internals.
/// Captures are switched off for this process before any is taken (std
/// reads these variables once, at the first capture). `_PG_init` runs
/// before the library starts any thread.
fn keep_rust_backtraces_out_of_errors() {
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    std::env::set_var("RUST_BACKTRACE", "0");
}

/// The in-database test suites, one file per feature under `pgrx-tests/`.
#[cfg(any(test, feature = "pg_test"))]
#[path = "../pgrx-tests/mod.rs"]
mod pgrx_tests;

/// Required by `cargo pgrx test`; must be visible at the crate root.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
