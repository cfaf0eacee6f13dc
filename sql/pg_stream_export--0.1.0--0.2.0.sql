-- pg_stream_export 0.1.0 -> 0.2.0 (ALTER EXTENSION pg_stream_export UPDATE).
\echo Use "ALTER EXTENSION pg_stream_export UPDATE TO '0.2.0'" to load this file. \quit

-- stream_export, stream_export_bytes and stream_export_to_file take a new
-- last argument, force_array. A new argument list is a new function: the
-- 0.1.0 ones are dropped and the 0.2.0 ones created as a fresh install
-- creates them (calls by name and by position keep working). The library
-- keeps 0.1.0's entry points, so calls keep working until the update too.
DROP FUNCTION "stream_export"(text, text, integer, text, text, integer, boolean, text, text);
DROP FUNCTION "stream_export_bytes"(text, text, integer, text, text, integer, boolean, text, text, integer);
DROP FUNCTION "stream_export_to_file"(text, text, text, integer, text, text, integer, boolean, text, text, boolean);

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
	"force_array" bool DEFAULT false /* Option < bool > */
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
	"force_array" bool DEFAULT false /* Option < bool > */
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
	"force_array" bool DEFAULT false /* Option < bool > */
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

