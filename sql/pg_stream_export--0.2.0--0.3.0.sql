-- pg_stream_export 0.2.0 -> 0.3.0 (ALTER EXTENSION pg_stream_export UPDATE).
\echo Use "ALTER EXTENSION pg_stream_export UPDATE TO '0.3.0'" to load this file. \quit

-- compression => 'zstd' is new. compression_level now defaults to NULL,
-- which means the codec's own default (gzip 6, zstd 3), instead of 6: the
-- argument lists are unchanged, so the functions are replaced in place
-- (comments and grants stay).

CREATE OR REPLACE PROCEDURE stream_export_chunked(
    source text,
    directory text,
    key text,
    chunk_rows bigint DEFAULT 1000000,
    compression text DEFAULT 'none',
    compression_level integer DEFAULT NULL,
    batch_size integer DEFAULT 0,
    overwrite boolean DEFAULT false,
    profile text DEFAULT 'default',
    bigint_as_string boolean DEFAULT NULL,
    numeric_as_string boolean DEFAULT NULL,
    timestamptz_utc boolean DEFAULT NULL,
    bytea_base64 boolean DEFAULT NULL,
    omit_nulls boolean DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_chunked_wrapper';

CREATE OR REPLACE FUNCTION "stream_export_bytes"(
	"source" TEXT, /* Option < & str > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT NULL, /* Option < i32 > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"after" TEXT DEFAULT NULL, /* Option < & str > */
	"batch_size" INT DEFAULT 0, /* Option < i32 > */
	"footer" bool DEFAULT false, /* Option < bool > */
	"key_from" TEXT DEFAULT NULL, /* Option < & str > */
	"key_to" TEXT DEFAULT NULL, /* Option < & str > */
	"chunk_size" INT DEFAULT 1048576, /* Option < i32 > */
	"force_array" bool DEFAULT false, /* Option < bool > */
	"profile" TEXT DEFAULT 'default', /* Option < & str > */
	"bigint_as_string" bool DEFAULT NULL, /* Option < bool > */
	"numeric_as_string" bool DEFAULT NULL, /* Option < bool > */
	"timestamptz_utc" bool DEFAULT NULL, /* Option < bool > */
	"bytea_base64" bool DEFAULT NULL, /* Option < bool > */
	"omit_nulls" bool DEFAULT NULL /* Option < bool > */
) RETURNS SETOF bytea /* Vec < u8 > */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_bytes_v2_wrapper';

CREATE OR REPLACE FUNCTION "stream_export_to_file"(
	"source" TEXT, /* Option < & str > */
	"path" TEXT, /* Option < & str > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT NULL, /* Option < i32 > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"after" TEXT DEFAULT NULL, /* Option < & str > */
	"batch_size" INT DEFAULT 0, /* Option < i32 > */
	"footer" bool DEFAULT false, /* Option < bool > */
	"key_from" TEXT DEFAULT NULL, /* Option < & str > */
	"key_to" TEXT DEFAULT NULL, /* Option < & str > */
	"overwrite" bool DEFAULT false, /* Option < bool > */
	"force_array" bool DEFAULT false, /* Option < bool > */
	"profile" TEXT DEFAULT 'default', /* Option < & str > */
	"bigint_as_string" bool DEFAULT NULL, /* Option < bool > */
	"numeric_as_string" bool DEFAULT NULL, /* Option < bool > */
	"timestamptz_utc" bool DEFAULT NULL, /* Option < bool > */
	"bytea_base64" bool DEFAULT NULL, /* Option < bool > */
	"omit_nulls" bool DEFAULT NULL /* Option < bool > */
) RETURNS TABLE (
	"path" TEXT,  /* String */
	"rows" bigint,  /* i64 */
	"bytes" bigint,  /* i64 */
	"file_bytes" bigint,  /* i64 */
	"crc32" TEXT,  /* String */
	"resume_token" TEXT,  /* Option < String > */
	"elapsed" interval  /* pgrx :: datum :: Interval */
)
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_to_file_v2_wrapper';

CREATE OR REPLACE FUNCTION "stream_export_to_directory"(
	"source" TEXT, /* Option < & str > */
	"directory" TEXT, /* Option < & str > */
	"key" TEXT, /* Option < & str > */
	"partitions" INT, /* Option < i32 > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT NULL, /* Option < i32 > */
	"batch_size" INT DEFAULT 0, /* Option < i32 > */
	"overwrite" bool DEFAULT false, /* Option < bool > */
	"workers" INT DEFAULT NULL, /* Option < i32 > */
	"profile" TEXT DEFAULT 'default', /* Option < & str > */
	"bigint_as_string" bool DEFAULT NULL, /* Option < bool > */
	"numeric_as_string" bool DEFAULT NULL, /* Option < bool > */
	"timestamptz_utc" bool DEFAULT NULL, /* Option < bool > */
	"bytea_base64" bool DEFAULT NULL, /* Option < bool > */
	"omit_nulls" bool DEFAULT NULL /* Option < bool > */
) RETURNS TABLE (
	"directory" TEXT,  /* String */
	"partitions" INT,  /* i32 */
	"workers" INT,  /* i32 */
	"rows" bigint,  /* i64 */
	"bytes" bigint,  /* i64 */
	"file_bytes" bigint,  /* i64 */
	"elapsed" interval  /* pgrx :: datum :: Interval */
)
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_to_directory_v2_wrapper';

-- Incremental jobs (new in 0.3.0): the catalog, stream_export_job_create
-- and CALL stream_export_increment.
CREATE FUNCTION "stream_export_job_create"(
	"name" TEXT,
	"source" TEXT,
	"key" TEXT,
	"destination" TEXT,
	"compression" TEXT DEFAULT 'none',
	"compression_level" INT DEFAULT NULL
) RETURNS void
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stream_export_job_create_wrapper';

-- Incremental jobs: a definition per job, and the history of its parts.
-- Each role sees and runs only its own jobs (row-level security); the
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
    USING (owner = pg_catalog.quote_ident(current_user)::regrole) WITH CHECK (owner = pg_catalog.quote_ident(current_user)::regrole);
CREATE POLICY own_job_parts ON stream_export_job_part
    USING (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job))
    WITH CHECK (EXISTS (SELECT FROM stream_export_job j WHERE j.name = job));
GRANT SELECT, INSERT, UPDATE, DELETE ON stream_export_job, stream_export_job_part TO PUBLIC;
SELECT pg_catalog.pg_extension_config_dump('stream_export_job', '');
SELECT pg_catalog.pg_extension_config_dump('stream_export_job_part', '');
CREATE PROCEDURE stream_export_increment(job text)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_increment_wrapper';
COMMENT ON PROCEDURE stream_export_increment IS 'Export the rows of an incremental job added after its stored position into the job''s next part, and advance the position in the same transaction.';

-- Archival (new in 0.3.0).
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

-- Cluster exports: a coordinator and the function it calls on each node.
CREATE FUNCTION "stream_export_cluster"(
	"source" TEXT,
	"destination" TEXT,
	"key" TEXT,
	"nodes" TEXT[] DEFAULT NULL,
	"cluster" TEXT DEFAULT NULL,
	"partitions_per_node" INT DEFAULT 1,
	"compression" TEXT DEFAULT 'none',
	"compression_level" INT DEFAULT NULL,
	"overwrite" bool DEFAULT false,
	"profile" TEXT DEFAULT 'default'
) RETURNS TABLE (
	"node" TEXT,
	"directory" TEXT,
	"reused" bool,
	"partitions" INT,
	"rows" bigint,
	"bytes" bigint,
	"file_bytes" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stream_export_cluster_wrapper';
-- It connects to other servers as the server's OS user, with that user's
-- password and service files: only roles a superuser trusts with them.
REVOKE EXECUTE ON FUNCTION stream_export_cluster(text, text, text, text[], text, integer, text, integer, boolean, text) FROM PUBLIC;
CREATE FUNCTION "stream_export_cluster_node"(
	"source" TEXT,
	"directory" TEXT,
	"key" TEXT,
	"partitions" INT,
	"compression" TEXT,
	"compression_level" INT,
	"profile" TEXT,
	"export_id" TEXT
) RETURNS TABLE (
	"partitions" INT,
	"rows" bigint,
	"bytes" bigint,
	"file_bytes" bigint
)
VOLATILE PARALLEL UNSAFE
LANGUAGE c
AS 'MODULE_PATHNAME', 'stream_export_cluster_node_wrapper';
