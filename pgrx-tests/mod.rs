//! In-database tests, one file per feature, run by `cargo pgrx test`. Each
//! file keeps its tests in a `tests` schema module, where the test framework
//! looks for them.

mod cluster;
mod encoding;
mod file_export;
mod json_options;
mod plan;
mod stream_export;
mod streaming;
mod support;
