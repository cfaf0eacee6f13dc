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
