-- pg_stream_export 0.3.0 -> 0.4.0 (ALTER EXTENSION pg_stream_export UPDATE).
\echo Use "ALTER EXTENSION pg_stream_export UPDATE TO '0.4.0'" to load this file. \quit

-- Archives: nothing in the catalog changes (the checks before each DELETE
-- are in the library).

-- Incremental jobs: exactly once on a live table. Each run records its
-- snapshot, the time right after it, its floor and its own transaction id,
-- so that the next run picks up the rows that committed late; each job has
-- a random id (bound to its destination) and records its key's type (jobs
-- made before 0.4.0 get theirs at their next run). A job records, when it
-- is made, the largest key and the time right after the snapshot that read
-- it (origin, origin_at: the floor of its first runs; jobs made before 0.4.0
-- have none). Only the extension's
-- functions change the catalog now: INSERT, UPDATE and DELETE are no longer
-- granted; stream_export_job_drop removes a job.
ALTER TABLE stream_export_job
    ADD COLUMN job_id text NOT NULL DEFAULT (pg_catalog.gen_random_uuid())::text,
    ADD COLUMN key_type text,
    ADD COLUMN snapshot text,
    ADD COLUMN floor text,
    ADD COLUMN run_xid xid8,
    ADD COLUMN run_subxids xid8[],
    ADD COLUMN origin text,
    ADD COLUMN origin_at timestamptz;
ALTER TABLE stream_export_job_part
    ADD COLUMN snapshot text,
    ADD COLUMN snapshot_at timestamptz,
    ADD COLUMN floor text,
    ADD COLUMN run_xid xid8;
COMMENT ON TABLE stream_export_job IS 'pg_stream_export incremental jobs: what CALL stream_export_increment(name) exports next (position: the resume token after the last exported row, NULL: from the start; snapshot, floor, run_xid, run_subxids: the last part''s run and the ids of its transaction that its snapshot does not list as seen, whose late rows the next run picks up; origin, origin_at: the largest key when the job was made and the time right after the snapshot that read it, the floor of its first runs).';
COMMENT ON TABLE stream_export_job_part IS 'pg_stream_export incremental jobs: every part written, in order (recovered: written by a run that did not commit, found to hold exactly what the table holds in its key range, and taken over by the next run).';
REVOKE INSERT, UPDATE, DELETE ON stream_export_job, stream_export_job_part FROM PUBLIC;

CREATE  FUNCTION "stream_export_job_drop"(
	"name" TEXT /* Option < & str > */
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_job_drop_wrapper';

-- Cluster exports run with the caller's rights: a role that is not a
-- superuser names its nodes by foreign server (of this wrapper, or of
-- postgres_fdw or dblink_fdw) and reaches them with its own user mapping.
CREATE FOREIGN DATA WRAPPER stream_export_nodes;
COMMENT ON FOREIGN DATA WRAPPER stream_export_nodes IS 'pg_stream_export: servers that are nodes of cluster exports (libpq options; user and password in user mappings)';

-- A cluster export's node function follows every rule of a directory
-- export: it replaces a finished export only with overwrite (the
-- coordinator passes it when it re-exports a node), and names the role
-- that called the cluster export in the node's audit lines.
DROP FUNCTION stream_export_cluster_node(text, text, text, integer, text, integer, text, text);
CREATE FUNCTION "stream_export_cluster_node"(
	"source" TEXT,
	"directory" TEXT,
	"key" TEXT,
	"partitions" INT,
	"compression" TEXT,
	"compression_level" INT,
	"profile" TEXT,
	"export_id" TEXT,
	"overwrite" bool DEFAULT false,
	"requested_by" TEXT DEFAULT NULL
) RETURNS TABLE (
	"partitions" INT,
	"rows" bigint,
	"bytes" bigint,
	"file_bytes" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stream_export_cluster_node_wrapper';

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
-- Pin the owners of the jobs there are.
SELECT stream_export_job_pin_owners();
