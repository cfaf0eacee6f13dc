-- pg_stream_export 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_stream_export UPDATE).
\echo Use "ALTER EXTENSION pg_stream_export UPDATE TO '0.2.0'" to load this file. \quit

-- stream_export, stream_export_bytes, stream_export_to_file and
-- stream_export_to_directory take new last arguments: force_array (not the
-- directory export) and the JSON type options (profile, bigint_as_string,
-- numeric_as_string, timestamptz_utc, bytea_base64, omit_nulls). A new
-- argument list is a new function: the 0.1.0 ones are dropped and the 0.2.0
-- ones created as a fresh install creates them (calls by name and by
-- position keep working). The library keeps 0.1.0's entry points, so calls
-- keep working until the update too.
DROP FUNCTION "stream_export"(text, text, integer, text, text, integer, boolean, text, text);
DROP FUNCTION "stream_export_bytes"(text, text, integer, text, text, integer, boolean, text, text, integer);
DROP FUNCTION "stream_export_to_file"(text, text, text, integer, text, text, integer, boolean, text, text, boolean);
DROP FUNCTION "stream_export_to_directory"(text, text, text, integer, text, integer, integer, boolean, integer);

CREATE FUNCTION "stream_export"(
	"source" TEXT, /* Option < & str > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT 6, /* Option < i32 > */
	"key" TEXT DEFAULT NULL, /* Option < & str > */
	"after" TEXT DEFAULT NULL, /* Option < & str > */
	"batch_size" INT DEFAULT 0, /* Option < i32 > */
	"footer" bool DEFAULT false, /* Option < bool > */
	"key_from" TEXT DEFAULT NULL, /* Option < & str > */
	"key_to" TEXT DEFAULT NULL, /* Option < & str > */
	"force_array" bool DEFAULT false, /* Option < bool > */
	"profile" TEXT DEFAULT 'default', /* Option < & str > */
	"bigint_as_string" bool DEFAULT NULL, /* Option < bool > */
	"numeric_as_string" bool DEFAULT NULL, /* Option < bool > */
	"timestamptz_utc" bool DEFAULT NULL, /* Option < bool > */
	"bytea_base64" bool DEFAULT NULL, /* Option < bool > */
	"omit_nulls" bool DEFAULT NULL /* Option < bool > */
) RETURNS SETOF TEXT /* String */
VOLATILE PARALLEL UNSAFE 
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_v2_wrapper';

CREATE FUNCTION "stream_export_bytes"(
	"source" TEXT, /* Option < & str > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT 6, /* Option < i32 > */
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

CREATE FUNCTION "stream_export_to_file"(
	"source" TEXT, /* Option < & str > */
	"path" TEXT, /* Option < & str > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT 6, /* Option < i32 > */
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

-- New in 0.2.0: the activity of running exports.
CREATE FUNCTION "stream_export_get_activity"() RETURNS TABLE (
	"pid" INT,  /* i32 */
	"leader_pid" INT,  /* Option < i32 > */
	"partition" INT,  /* Option < i32 > */
	"role" TEXT,  /* String */
	"database" TEXT,  /* String */
	"source" TEXT,  /* Option < String > */
	"destination" TEXT,  /* Option < String > */
	"format" TEXT,  /* String */
	"started_at" timestamp with time zone,  /* Option < pgrx :: datum :: TimestampWithTimeZone > */
	"rows" bigint,  /* i64 */
	"bytes" bigint,  /* i64 */
	"bytes_written" bigint,  /* i64 */
	"estimated_rows" bigint  /* Option < i64 > */
)
STRICT VOLATILE PARALLEL RESTRICTED
LANGUAGE c /* Rust */
AS 'MODULE_PATHNAME', 'stream_export_get_activity_wrapper';

CREATE VIEW stream_export_activity AS
SELECT a.pid, a.leader_pid, a.partition, a.role, a.database, a.source, a.destination, a.format,
       a.started_at, a.rows, a.bytes, a.bytes_written,
       round((a.rows / greatest(extract(epoch FROM clock_timestamp() - a.started_at), 0.001))::numeric, 1)
           AS rows_per_second,
       a.estimated_rows,
       CASE WHEN a.estimated_rows > 0 AND a.rows <= a.estimated_rows
            THEN round(100.0 * a.rows / a.estimated_rows, 1) END AS percent_done,
       CASE WHEN a.estimated_rows > 0 AND a.rows > 0 AND a.rows <= a.estimated_rows
            THEN (clock_timestamp() - a.started_at) * ((a.estimated_rows - a.rows)::float8 / a.rows) END AS eta
FROM stream_export_get_activity() a;
COMMENT ON VIEW stream_export_activity IS 'Running pg_stream_export exports: one row per export, a directory export''s leader row summing its workers; estimated_rows, percent_done and eta are estimates.';
GRANT SELECT ON stream_export_activity TO PUBLIC;

-- The directory export with the JSON type options.
CREATE FUNCTION "stream_export_to_directory"(
	"source" TEXT, /* Option < & str > */
	"directory" TEXT, /* Option < & str > */
	"key" TEXT, /* Option < & str > */
	"partitions" INT, /* Option < i32 > */
	"compression" TEXT DEFAULT 'none', /* Option < & str > */
	"compression_level" INT DEFAULT 6, /* Option < i32 > */
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

-- New in 0.2.0: the chunked export, a procedure that commits between chunks.
CREATE PROCEDURE stream_export_chunked(
    source text,
    directory text,
    key text,
    chunk_rows bigint DEFAULT 1000000,
    compression text DEFAULT 'none',
    compression_level integer DEFAULT 6,
    batch_size integer DEFAULT 0,
    overwrite boolean DEFAULT false,
    profile text DEFAULT 'default',
    bigint_as_string boolean DEFAULT NULL,
    numeric_as_string boolean DEFAULT NULL,
    timestamptz_utc boolean DEFAULT NULL,
    bytea_base64 boolean DEFAULT NULL,
    omit_nulls boolean DEFAULT NULL)
LANGUAGE c AS 'MODULE_PATHNAME', 'stream_export_chunked_wrapper';
COMMENT ON PROCEDURE stream_export_chunked IS 'Export a source in key order, one committed transaction per chunk, into part files and a manifest in a directory; CALL again to resume.';

-- New in 0.2.0: object storage destinations.
-- Roles for object storage, like pg_write_server_files/pg_read_server_files
-- for server files. Roles belong to the cluster, so an earlier install in
-- another database may have created them already.
DO $roles$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'stream_export_object_store_write') THEN
        CREATE ROLE stream_export_object_store_write NOLOGIN;
    END IF;
    IF NOT EXISTS (SELECT FROM pg_catalog.pg_roles WHERE rolname = 'stream_export_object_store_read') THEN
        CREATE ROLE stream_export_object_store_read NOLOGIN;
    END IF;
END
$roles$;
COMMENT ON ROLE stream_export_object_store_write IS 'pg_stream_export: may export to object storage (s3:// URIs) with the server''s AWS configuration.';
COMMENT ON ROLE stream_export_object_store_read IS 'pg_stream_export: may read objects (stream_export_verify, stream_export_verify_manifest on s3:// URIs) with the server''s AWS configuration.';
