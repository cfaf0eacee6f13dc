//! pg_stream_export: stream exports of any size out of PostgreSQL as NDJSON.
//!
//! The `#[pg_extern]` layer lives in [`api`]; everything it calls is either
//! pure Rust (unit-tested without a server) or one of the few modules that
//! talk to PostgreSQL through `pg_sys` ([`scan`], [`source`], [`error`]).

#![deny(unsafe_op_in_unsafe_fn)]

mod activity;
mod api;
mod chunked;
mod compat;
mod copy_hook;
mod destination;
mod encode;
mod error;
mod export;
mod footer;
mod gucs;
mod ident;
mod layout;
mod options;
mod parallel;
mod plan;
mod progress;
mod run;
mod scan;
mod sink;
mod source;
mod token;
mod verify;

::pgrx::pg_module_magic!(name, version);

/// Called when the library is loaded: registers the GUCs, the activity
/// table (when preloaded) and the COPY hook.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    keep_rust_backtraces_out_of_errors();
    gucs::define();
    activity::install();
    copy_hook::install();
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
