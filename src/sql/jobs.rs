//! The DBA's scheduled work in SQL: incremental jobs (the job catalog,
//! `stream_export_job_create`, `CALL stream_export_increment(name)`) and
//! archival (`CALL stream_export_archive`); the work is
//! [`crate::run::jobs`]'s and [`crate::run::archive`]'s.

use pgrx::prelude::*;

use crate::error::required;
use crate::options::{parse_chunk_rows, ExportOptions, RawOptions};
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

/// Remove the job `name` and its history (its files stay); its owner or a
/// superuser.
#[pg_extern(volatile, parallel_unsafe)]
fn stream_export_job_drop(name: Option<&str>) {
    jobs::drop_job(required(name, "name"));
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

/// `CALL stream_export_archive(...)`: export, verify, then delete, one
/// committed transaction per chunk (see [`crate::run::archive`]).
#[allow(clippy::too_many_arguments)]
#[pg_extern(sql = false)]
fn stream_export_archive(
    source: Option<&str>,
    destination: Option<&str>,
    key: Option<&str>,
    condition: Option<&str>,
    chunk_rows: Option<i64>,
    compression: Option<&str>,
    compression_level: Option<i32>,
    fcinfo: pg_sys::FunctionCallInfo,
) {
    crate::run::chunked::refuse_atomic_call(fcinfo, "stream_export_archive");
    let source = required(source, "source");
    let destination = required(destination, "destination");
    let key = required(key, "key");
    let chunk_rows = parse_chunk_rows(chunk_rows, crate::run::archive::DEFAULT_CHUNK_ROWS)
        .unwrap_or_else(|e| e.raise());
    let options = ExportOptions::parse(&RawOptions {
        compression,
        compression_level,
        key: Some(key),
        footer: Some(true),
        ..Default::default()
    })
    .unwrap_or_else(|e| e.raise());
    let directory = crate::destination::ExportDirectory::open(destination);
    let totals = crate::run::archive::archive(source, &directory, condition, chunk_rows, options);
    pgrx::notice!(
        "stream_export_archive: {} rows in {} chunk(s) ({} bytes written) archived into \"{}\" (archive {}), verified and deleted",
        totals.rows,
        totals.chunks,
        totals.file_bytes,
        directory.describe(),
        totals.archive_id
    );
}

pgrx::extension_sql!(
    r#"
-- Incremental jobs: a definition per job, and the history of its parts.
-- Each role sees and runs only its own jobs (row-level security); only the
-- extension's functions change them (with the tables' owner's rights); the
-- tables are dumped by pg_dump with the database.
CREATE TABLE stream_export_job (
    name text PRIMARY KEY,
    owner regrole NOT NULL DEFAULT pg_catalog.quote_ident(current_user)::regrole,
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
    last_part_at timestamptz,
    job_id text NOT NULL DEFAULT (pg_catalog.gen_random_uuid())::text,
    key_type text,
    snapshot text,
    floor text,
    run_xid xid8,
    run_subxids xid8[],
    origin text,
    origin_at timestamptz
);
COMMENT ON TABLE stream_export_job IS 'pg_stream_export incremental jobs: what CALL stream_export_increment(name) exports next (position: the resume token after the last exported row, NULL: from the start; snapshot, floor, run_xid, run_subxids: the last part''s run and the ids of its transaction that its snapshot does not list as seen, whose late rows the next run picks up; origin, origin_at: the largest key when the job was made and the time right after the snapshot that read it, the floor of its first runs).';
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
    snapshot text,
    snapshot_at timestamptz,
    floor text,
    run_xid xid8,
    PRIMARY KEY (job, part)
);
COMMENT ON TABLE stream_export_job_part IS 'pg_stream_export incremental jobs: every part written, in order (recovered: written by a run that did not commit, found to hold exactly what the table holds in its key range, and taken over by the next run).';
ALTER TABLE stream_export_job ENABLE ROW LEVEL SECURITY;
ALTER TABLE stream_export_job_part ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_jobs ON stream_export_job
    USING (owner = pg_catalog.quote_ident(current_user)::regrole) WITH CHECK (owner = pg_catalog.quote_ident(current_user)::regrole);
CREATE POLICY own_job_parts ON stream_export_job_part
    USING (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job))
    WITH CHECK (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job));
GRANT SELECT ON stream_export_job, stream_export_job_part TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('stream_export_job', '');
SELECT pg_catalog.pg_extension_config_dump('stream_export_job_part', '');
-- The roles that own jobs are pinned: one policy per owner, TO that role,
-- on stream_export_job_owners (a table with no rows), which PostgreSQL
-- records as the role's shared dependency. So DROP ROLE of an owner is
-- refused (2BP01) from every database, whether or not the library is
-- loaded; DROP OWNED BY the owner drops its policy, and the event trigger
-- below then removes its jobs. A trigger on the job table keeps the
-- policies in step with the owners.
CREATE TABLE stream_export_job_owners ();
COMMENT ON TABLE stream_export_job_owners IS 'pg_stream_export incremental jobs: holds no rows; one policy per role that owns jobs pins that role (DROP ROLE is refused while it owns jobs; DROP OWNED BY it removes them).';
CREATE FUNCTION stream_export_job_pin_owners() RETURNS void
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $pins$
DECLARE
    pinned regclass := '@extschema@.stream_export_job_owners'::regclass;
    owner_oid oid;
    stale name;
BEGIN
    -- One change of the pins at a time, each reading what the one before
    -- committed: two sessions dropping and adding an owner's last and
    -- first job cannot leave it unpinned.
    LOCK TABLE @extschema@.stream_export_job_owners IN SHARE ROW EXCLUSIVE MODE;
    FOR owner_oid IN
        SELECT DISTINCT j.owner::oid FROM @extschema@.stream_export_job j
        WHERE EXISTS (SELECT FROM pg_roles r WHERE r.oid = j.owner::oid)
          AND NOT EXISTS (SELECT FROM pg_policy p WHERE p.polrelid = pinned
                          AND p.polname LIKE 'job\_owner\_%' AND p.polroles = ARRAY[j.owner::oid])
    LOOP
        EXECUTE format('CREATE POLICY %I ON %s AS PERMISSIVE FOR SELECT TO %I USING (false)',
                       'job_owner_' || replace(gen_random_uuid()::text, '-', ''), pinned,
                       (SELECT rolname FROM pg_roles WHERE oid = owner_oid));
    END LOOP;
    FOR stale IN
        SELECT p.polname FROM pg_policy p WHERE p.polrelid = pinned AND p.polname LIKE 'job\_owner\_%'
          AND NOT EXISTS (SELECT FROM @extschema@.stream_export_job j WHERE ARRAY[j.owner::oid] = p.polroles)
    LOOP
        EXECUTE format('DROP POLICY %I ON %s', stale, pinned);
    END LOOP;
END
$pins$;
REVOKE ALL ON FUNCTION stream_export_job_pin_owners() FROM PUBLIC;
CREATE FUNCTION stream_export_job_owners_changed() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $changed$
BEGIN
    PERFORM @extschema@.stream_export_job_pin_owners();
    RETURN NULL;
END
$changed$;
REVOKE ALL ON FUNCTION stream_export_job_owners_changed() FROM PUBLIC;
CREATE TRIGGER pin_owners AFTER INSERT OR DELETE OR UPDATE OF owner ON stream_export_job
    FOR EACH STATEMENT EXECUTE FUNCTION stream_export_job_owners_changed();
-- Also under session_replication_role = replica (a data-only restore with
-- triggers disabled, replication tools).
ALTER TABLE stream_export_job ENABLE ALWAYS TRIGGER pin_owners;
-- DROP OWNED BY a role drops its pin: its jobs go with it (their files
-- stay), as with the library's hook.
CREATE FUNCTION stream_export_job_owner_dropped() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $dropped$
BEGIN
    IF EXISTS (SELECT FROM pg_event_trigger_dropped_objects()
               WHERE object_type = 'policy' AND object_identity LIKE 'job\_owner\_% on %.stream\_export\_job\_owners') THEN
        DELETE FROM @extschema@.stream_export_job j
        WHERE EXISTS (SELECT FROM pg_roles r WHERE r.oid = j.owner::oid)
          AND NOT EXISTS (SELECT FROM pg_policy p
                          WHERE p.polrelid = '@extschema@.stream_export_job_owners'::regclass
                            AND j.owner::oid = ANY (p.polroles));
    END IF;
END
$dropped$;
REVOKE ALL ON FUNCTION stream_export_job_owner_dropped() FROM PUBLIC;
CREATE EVENT TRIGGER stream_export_job_owner_dropped ON sql_drop WHEN TAG IN ('DROP OWNED')
    EXECUTE FUNCTION stream_export_job_owner_dropped();
ALTER EVENT TRIGGER stream_export_job_owner_dropped ENABLE ALWAYS;
CREATE PROCEDURE stream_export_increment(job text)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_increment_wrapper';
COMMENT ON PROCEDURE stream_export_increment IS 'Export the rows of an incremental job added after its stored position into the job''s next part, and advance the position in the same transaction.';
-- Archival: one row per chunk that stream_export_archive exported, checked
-- and deleted from its table (committed with that DELETE).
CREATE TABLE stream_export_archive_part (
    archive_id text NOT NULL,
    part integer NOT NULL,
    owner regrole NOT NULL DEFAULT pg_catalog.quote_ident(current_user)::regrole,
    source text NOT NULL,
    key text NOT NULL,
    condition text,
    target text NOT NULL,
    after_key text,
    last_key text NOT NULL,
    rows bigint NOT NULL,
    bytes bigint NOT NULL,
    file_bytes bigint NOT NULL,
    crc32 text NOT NULL,
    snapshot text NOT NULL,
    finished_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (archive_id, part)
);
COMMENT ON TABLE stream_export_archive_part IS 'pg_stream_export archival: every chunk exported, read back and verified, then deleted from its table, by CALL stream_export_archive.';
ALTER TABLE stream_export_archive_part ENABLE ROW LEVEL SECURITY;
CREATE POLICY own_archive_parts ON stream_export_archive_part
    USING (owner = pg_catalog.quote_ident(current_user)::regrole) WITH CHECK (owner = pg_catalog.quote_ident(current_user)::regrole);
GRANT SELECT, INSERT, DELETE ON stream_export_archive_part TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('stream_export_archive_part', '');
CREATE PROCEDURE stream_export_archive(
    source text,
    destination text,
    key text,
    condition text DEFAULT NULL,
    chunk_rows bigint DEFAULT 100000,
    compression text DEFAULT 'none',
    compression_level integer DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_archive_wrapper';
COMMENT ON PROCEDURE stream_export_archive IS 'Export the rows of a table that match a condition in key order, chunk by chunk; read each chunk back and verify it, then delete exactly its rows; one transaction per chunk.';
"#,
    name = "incremental_jobs",
);
