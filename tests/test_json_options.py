"""The JSON type options through COPY, directory and chunked exports, keyed
COPY, and the gzip stream as one member. (What each option writes is
checked value by value against PostgreSQL in pgrx-tests/json_options.rs.)"""

from __future__ import annotations

import gzip
import json
import zlib

import pytest
from psycopg import errors


@pytest.fixture
def typed(conn):
    conn.execute("LOAD 'pg_stream_export'")  # the COPY integration
    conn.execute("DROP TABLE IF EXISTS typed")
    conn.execute("""CREATE TABLE typed (id int8 PRIMARY KEY, n numeric, at timestamptz, raw bytea,
                                        note text, bigs int8[])""")
    conn.execute("""INSERT INTO typed
                    SELECT g, g * 1.25, timestamptz '2024-01-01 00:00:15.489+00' + g * interval '1 hour',
                           CASE WHEN g % 3 = 0 THEN NULL ELSE decode(md5(g::text), 'hex') END,
                           CASE WHEN g % 2 = 0 THEN NULL ELSE 'row ' || g END,
                           ARRAY[9007199254740993 + g, NULL]
                    FROM generate_series(1, 2000) g""")
    return "typed"


def copy_lines(conn, statement: str) -> list[str]:
    with conn.cursor() as cur:
        with cur.copy(statement) as copy:
            data = b"".join(bytes(block) for block in copy)
    return data.decode().splitlines()


def function_lines(conn, sql: str, params=()) -> list[str]:
    return [r[0] for r in conn.execute(sql, params)]


@pytest.mark.parametrize("copy_options, function_options", [
    ("PROFILE 'javascript'", "profile => 'javascript'"),
    ("PROFILE 'javascript', OMIT_NULLS", "profile => 'javascript', omit_nulls => true"),
    ("PROFILE 'JavaScript', BIGINT_AS_STRING false", "profile => 'javascript', bigint_as_string => false"),
    ("TIMESTAMPTZ_UTC, BYTEA_BASE64 true", "timestamptz_utc => true, bytea_base64 => true"),
    ("NUMERIC_AS_STRING", "numeric_as_string => true"),
])
def test_copy_options_equal_the_function_options(conn, typed, copy_options, function_options):
    conn.execute("SET TimeZone = 'America/New_York'")
    got = copy_lines(conn, f"COPY {typed} TO STDOUT (FORMAT ndjson, {copy_options})")
    want = function_lines(conn, f"SELECT stream_export('{typed}', {function_options})")
    assert got == want and len(got) == 2000
    assert got != function_lines(conn, f"SELECT stream_export('{typed}')")


def test_the_javascript_profile_in_a_line(conn, typed):
    conn.execute("SET TimeZone = 'Asia/Kolkata'")
    (line,) = copy_lines(conn, f"COPY (SELECT * FROM {typed} WHERE id = 1) TO STDOUT "
                               "(FORMAT 'json', FORCE_ARRAY, PROFILE 'javascript', OMIT_NULLS)")[1:2]
    row = json.loads(line.lstrip())
    assert row == {"id": "1", "n": "1.25", "at": "2024-01-01T01:00:15.489Z",
                   "raw": "xMpCOKC5I4INzFCab3WEmw==", "note": "row 1",
                   "bigs": ["9007199254740994", None]}


def test_bad_options_are_refused(conn, typed):
    with pytest.raises(errors.InvalidParameterValue):
        copy_lines(conn, f"COPY {typed} TO STDOUT (FORMAT ndjson, PROFILE 'java')")
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute(f"SELECT stream_export('{typed}', profile => 'typescript')")
    with pytest.raises(errors.FeatureNotSupported):
        copy_lines(conn, f"COPY (SELECT * FROM {typed}) TO STDOUT (FORMAT ndjson, KEY 'id')")


def test_a_keyed_copy_resumes_after_its_token(conn, typed):
    first = copy_lines(conn, f"COPY {typed} TO STDOUT (FORMAT ndjson, KEY 'id', KEY_TO '1001', FOOTER)")
    token = json.loads(first[-1])["_stream_export"]["resume_token"]
    rest = copy_lines(conn, f"COPY {typed} TO STDOUT (FORMAT ndjson, KEY 'id', AFTER '{token}')")
    want = function_lines(conn, f"SELECT row_to_json(t)::text FROM {typed} t ORDER BY id")
    assert first[:-1] + rest == want
    assert [json.loads(line)["id"] for line in first[:-1]] == list(range(1, 1001))


def test_gzip_output_is_one_member(conn, typed):
    with conn.cursor() as cur:
        with cur.copy(f"COPY {typed} TO STDOUT (FORMAT ndjson, COMPRESSION gzip, PROFILE 'javascript')") as copy:
            data = b"".join(bytes(block) for block in copy)
    inflate = zlib.decompressobj(wbits=31)  # one gzip member, as HTTP clients read it
    text = inflate.decompress(data) + inflate.flush()
    assert inflate.eof and inflate.unused_data == b""
    assert text.decode().splitlines() == function_lines(
        conn, f"SELECT stream_export('{typed}', profile => 'javascript')")


def test_directory_and_chunked_exports_take_the_options(conn, typed, server_dir):
    (server_dir / "dir").mkdir()
    (server_dir / "chunks").mkdir()
    import shutil
    for sub in ("dir", "chunks"):
        shutil.chown(server_dir / sub, "postgres", "postgres")
    conn.execute("SELECT * FROM stream_export_to_directory(%s, %s, 'id', 2, compression => 'gzip', "
                 "profile => 'javascript', omit_nulls => true)", [typed, str(server_dir / "dir")])
    conn.execute("CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 700, profile => 'javascript', "
                 "omit_nulls => true)", [typed, str(server_dir / "chunks")])
    want = function_lines(conn, "SELECT stream_export(%s, key => 'id', profile => 'javascript', omit_nulls => true)",
                          [typed])
    for sub, opener in (("dir", gzip.open), ("chunks", open)):
        manifest = json.loads((server_dir / sub / "manifest.json").read_text())
        got = []
        for part in manifest["parts"]:
            with opener(server_dir / sub / part["file"], "rt") as f:
                got.extend(f.read().splitlines()[:-1])
        assert got == want, sub
