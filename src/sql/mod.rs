//! The SQL entry points: the `#[pg_extern]`s ([`api`], and the
//! incremental jobs' in [`jobs`]) and the COPY hook ([`copy_hook`]). They
//! check their arguments and make one call into `crate::run` (or the
//! engine); they never name each other.

pub mod api;
pub mod cluster;
pub mod copy_hook;
pub mod jobs;
