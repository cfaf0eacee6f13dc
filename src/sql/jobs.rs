//! Incremental jobs in SQL: the job catalog, `stream_export_job_create`
//! and `CALL stream_export_increment(name)`; the work is
//! [`crate::run::jobs`]'s.

use pgrx::prelude::*;

use crate::error::required;
use crate::run::jobs::{self, Increment};

/// Define an incremental job owned by the current role: its parts go to
/// `destination` (a server directory or an `s3://` prefix), in `key`
/// order, each starting after the last row of the one before.
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export_job_create(
    name: Option<&str>,
    source: Option<&str>,
    key: Option<&str>,
    destination: Option<&str>,
    compression: default!(Option<&str>, "'none'"),
    compression_level: default!(Option<i32>, "NULL"),
) {
    jobs::create(
        required(name, "name"),
        required(source, "source"),
        required(key, "key"),
        required(destination, "destination"),
        compression.unwrap_or("none"),
        compression_level,
    );
}

/// `CALL stream_export_increment(job)`; its SQL definition is in the
/// catalog block below (a procedure).
#[pg_extern(sql = false)]
fn stream_export_increment(job: Option<&str>) {
    let name = required(job, "job");
    match jobs::increment(name) {
        Increment::Part {
            number,
            target,
            rows,
            recovered,
        } => {
            let how = if recovered {
                ", recovered from a run that stopped before recording it"
            } else {
                ""
            };
            pgrx::notice!("stream_export_increment: job \"{name}\": part {number}, {rows} rows in \"{target}\"{how}");
        }
        Increment::Nothing => {
            pgrx::notice!("stream_export_increment: job \"{name}\": no new rows")
        }
    }
}

pgrx::extension_sql!(
    r#"
-- Incremental jobs: a definition per job, and the history of its parts.
-- Each role sees and runs only its own jobs (row-level security); the
-- tables are dumped by pg_dump with the database.
CREATE TABLE stream_export_job (
    name text PRIMARY KEY,
    owner regrole NOT NULL DEFAULT current_user::text::regrole,
    source text NOT NULL,
    key text NOT NULL,
    destination text NOT NULL,
    compression text NOT NULL DEFAULT 'none',
    compression_level integer,
    position text,
    parts bigint NOT NULL DEFAULT 0,
    rows bigint NOT NULL DEFAULT 0,
    created_at timestamptz NOT NULL DEFAULT now(),
    last_run_at timestamptz,
    last_part_at timestamptz
);
COMMENT ON TABLE stream_export_job IS 'pg_stream_export incremental jobs: what CALL stream_export_increment(name) exports next (position: the resume token after the last exported row; NULL: from the start).';
CREATE TABLE stream_export_job_part (
    job text NOT NULL REFERENCES stream_export_job (name) ON DELETE CASCADE ON UPDATE CASCADE,
    part bigint NOT NULL,
    target text NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    file_bytes bigint NOT NULL,
    crc32 text NOT NULL,
    after_token text,
    resume_token text NOT NULL,
    recovered boolean NOT NULL DEFAULT false,
    elapsed interval,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (job, part)
);
COMMENT ON TABLE stream_export_job_part IS 'pg_stream_export incremental jobs: every part written, in order (recovered: written by a run that died before it could record it, and taken over by the next run).';
ALTER TABLE stream_export_job ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_export_job_part ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_jobs ON stream_export_job
    USING (owner = current_user::text::regrole) WITH CHECK (owner = current_user::text::regrole);
CREATE POLICY own_job_parts ON stream_export_job_part
    USING (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job))
    WITH CHECK (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job));
GRANT SELECT, INSERT, UPDATE, DELETE ON stream_export_job, stream_export_job_part TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('stream_export_job', '');
SELECT pg_catalog.pg_extension_config_dump('stream_export_job_part', '');
CREATE PROCEDURE stream_export_increment(job text)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_increment_wrapper';
COMMENT ON PROCEDURE stream_export_increment IS 'Export the rows of an incremental job added after its stored position into the job''s next part, and advance the position in the same transaction.';
"#,
    name = "incremental_jobs",
);
