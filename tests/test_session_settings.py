"""Correct under every session setting and statement form: resume tokens
that mean the same row in any session, COPY taken from the parsed
statement, errors of other statements left exactly as PostgreSQL makes
them, NULL arguments, and limits that are errors rather than crashes."""

from __future__ import annotations

import base64
import json
import random
import shutil
import struct
import zlib
from pathlib import Path

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster

SETTINGS = {
    "DateStyle": ["ISO", "SQL, DMY", "SQL, MDY", "German", "Postgres, DMY", "ISO, DMY"],
    "TimeZone": ["UTC", "Asia/Kolkata", "America/New_York", "Asia/Tehran", "Pacific/Chatham",
                 "Europe/Dublin"],
    "extra_float_digits": ["-15", "0", "1", "3"],
    "IntervalStyle": ["postgres", "sql_standard", "iso_8601", "postgres_verbose"],
    "search_path": ["public", "pg_catalog, public", "\"$user\", public"],
    "lc_monetary": ["C", "C.UTF-8"],
    "lc_numeric": ["C", "C.UTF-8"],
}

# Key types and an expression for row g (1..N) that is unique, in an order
# that differs from g, with the awkward values of each type.
KEY_TYPES = {
    "int": "(g * 7919) % 100003",
    "bigint": "((g::bigint * 2654435761) % 9007199254740881) - 4503599627370000",
    "numeric": "((g * 7919) % 100003)::numeric / 7 + 0.000000000000000000001 * g",
    "text": "md5(g::text) || ' é ' || g",
    "uuid": "md5(g::text)::uuid",
    "timestamptz": "timestamptz '2024-03-10 01:59:59.999999+00' + ((g * 7919) % 100003) * interval '1.000001 s'",
    "timestamp": "timestamp '1999-12-31 23:00:00' + ((g * 7919) % 100003) * interval '17.000003 min'",
    "date": "date '0001-01-01' + ((g * 7919) % 100003) * 7",
    "float8": "((g * 7919) % 100003)::float8 / 3.0 + 1e-9 * g",
}
ROWS = 3000


@pytest.fixture(scope="module")
def keyed_tables(server):
    with server.connect() as c:
        for name, expr in KEY_TYPES.items():
            c.execute(f"DROP TABLE IF EXISTS keyed_{name}")
            c.execute(f"CREATE TABLE keyed_{name} AS SELECT g AS id, ({expr})::{name} AS k, "
                      f"g % 5 AS v FROM generate_series(1, {ROWS}) g")
            c.execute(f"ALTER TABLE keyed_{name} ADD PRIMARY KEY (k)")
    return {name: f"keyed_{name}" for name in KEY_TYPES}


def session(server, settings: dict[str, str]) -> psycopg.Connection:
    conn = server.connect()
    conn.execute("LOAD 'pg_stream_export'")  # the COPY hook, in a fresh session
    for name, value in settings.items():
        conn.execute("SELECT set_config(%s, %s, false)", [name, value])
    return conn


def random_settings(rng: random.Random) -> dict[str, str]:
    return {name: rng.choice(values) for name, values in SETTINGS.items()}


def ids_of(lines: list[str]) -> list[int]:
    return [json.loads(line)["id"] for line in lines]


@pytest.mark.parametrize("key_type", list(KEY_TYPES))
def test_tokens_resume_exactly_across_sessions_with_other_settings(server, keyed_tables, key_type):
    table = keyed_tables[key_type]
    rng = random.Random(f"tokens-{key_type}")
    for _ in range(4):
        exporting, resuming = random_settings(rng), random_settings(rng)
        with session(server, exporting) as a, session(server, resuming) as b:
            full = [r[0] for r in a.execute("SELECT stream_export(%s, key => 'k', batch_size => 97)", [table])]
            assert len(full) == ROWS
            cut = rng.randrange(1, ROWS - 1)
            # 1. The token of a line the client received, made in the
            #    exporting session and used in the resuming one. A float
            #    key's text in a line may be rounded (extra_float_digits):
            #    that is refused rather than guessed.
            if key_type == "float8":
                with pytest.raises(psycopg.errors.InvalidParameterValue):
                    a.execute("SELECT stream_export_resume_token(%s, 'k', %s)", [table, full[cut]])
            else:
                token = a.execute("SELECT stream_export_resume_token(%s, 'k', %s)",
                                  [table, full[cut]]).fetchone()[0]
                rest = [r[0] for r in b.execute("SELECT stream_export(%s, key => 'k', after => %s)",
                                                [table, token])]
                assert ids_of(full[:cut + 1]) + ids_of(rest) == ids_of(full), (exporting, resuming)
            # 2. The footer token of an export that stopped at a bound.
            bound = json.loads(full[cut])["k"]
            part = [r[0] for r in a.execute(
                "SELECT stream_export(%s, key => 'k', key_to => %s, footer => true)",
                [table, bound if isinstance(bound, str) else json.dumps(bound)])]
            footer = json.loads(part[-1])["_stream_export"]
            rest = [r[0] for r in b.execute("SELECT stream_export(%s, key => 'k', after => %s)",
                                            [table, footer["resume_token"]])]
            assert ids_of(part[:-1]) + ids_of(rest) == ids_of(full), (exporting, resuming)


def v1_token(source: str, key: str, last_key: str, rows: int) -> str:
    """A token as pg_stream_export 0.1 wrote it."""
    fingerprint = 0xcbf29ce484222325
    for b in source.encode() + b"\0" + key.encode():
        fingerprint = ((fingerprint ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    body = (b"PSE" + bytes([1]) + struct.pack(">QQI", fingerprint, rows, len(key)) + key.encode()
            + b"\1" + struct.pack(">I", len(last_key.encode())) + last_key.encode())
    body += struct.pack(">I", zlib.crc32(body))
    return base64.urlsafe_b64encode(body).rstrip(b"=").decode()


def test_version_1_tokens_are_read_where_exact_and_refused_where_not(server, keyed_tables):
    with server.connect() as c:
        full = [r[0] for r in c.execute("SELECT stream_export('keyed_int', key => 'k')")]
        last = json.loads(full[10])["k"]
        token = v1_token('"public"."keyed_int"', "k", str(last), 11)
        rest = [r[0] for r in c.execute("SELECT stream_export('keyed_int', key => 'k', after => %s)", [token])]
        assert rest == full[11:]
        token = v1_token('"public"."keyed_timestamptz"', "k", "2024-03-10 02:00:00+00", 1)
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            c.execute("SELECT stream_export('keyed_timestamptz', key => 'k', after => %s)", [token])
        assert "version 1" in str(err.value)


def test_plan_bounds_mean_the_same_keys_in_another_session(server, keyed_tables):
    with session(server, {"DateStyle": "SQL, DMY", "TimeZone": "Asia/Kolkata"}) as a, \
            session(server, {"DateStyle": "German", "TimeZone": "Pacific/Chatham"}) as b:
        ranges = a.execute("SELECT lower, upper FROM stream_export_plan('keyed_timestamptz', 'k', 5)").fetchall()
        assert len(ranges) == 5
        total = 0
        for lower, upper in ranges:
            total += b.execute("SELECT count(*) FROM stream_export('keyed_timestamptz', key => 'k', "
                               "key_from => %s, key_to => %s)", [lower, upper]).fetchone()[0]
        assert total == ROWS


def test_plan_returns_the_partitions_asked_for_beyond_the_histogram(server, events_small):
    with server.connect() as c:
        c.execute(f"ANALYZE {events_small}")
        ranges = c.execute("SELECT lower, upper FROM stream_export_plan(%s, 'id', 1024)",
                           [events_small]).fetchall()
        assert len(ranges) == 1024
        assert ranges[0][0] is None and ranges[-1][1] is None
        uppers = [int(r[1]) for r in ranges[:-1]]
        assert uppers == sorted(set(uppers))
        assert all(ranges[i][1] == ranges[i + 1][0] for i in range(1023))


# --- COPY from the parsed statement --------------------------------------------

COPY_QUERIES = [
    ("SELECT 'a\\'' AS x", {"standard_conforming_strings": "off"}),
    ("SELECT $é$)$é$ AS x", {}),
    ("SELECT 1 AS é$x$", {}),
    ("SELECT E'it''s \\\\ ) \\' (' AS \"we)ird\"", {}),
    ("SELECT $q$ ) $q$ AS a, $$(($$ AS b /* ) /* nested ) */ ( */ -- )\n", {}),
    ("SELECT U&'d\\0061t\\+000061' AS u, B'1011' AS b, X'1F' AS x, N'nat' AS n", {}),
    ("WITH t(a) AS (VALUES (1), (2)) SELECT a, a * 2 AS \"( b\" FROM t", {}),
    ("VALUES (1, 'one'), (2, ')')", {}),
    ("TABLE pg_catalog.pg_am", {}),
]


@pytest.mark.parametrize("query,settings", COPY_QUERIES)
def test_copy_takes_the_query_from_the_parsed_statement(server, query, settings):
    with session(server, settings) as c:
        expected = "".join(r[0] + "\n" for r in c.execute(f"SELECT row_to_json(r)::text FROM ({query}\n) r"))
        with c.cursor().copy(f"COPY ({query}\n) TO STDOUT (FORMAT ndjson)") as copy:
            got = b"".join(bytes(chunk) for chunk in copy).decode()
        assert got == expected


def test_copy_inside_plpgsql_and_sql_functions(server, server_dir):
    target = server_dir / "from_do.ndjson"
    with session(server, {"standard_conforming_strings": "off"}) as c:
        c.execute(f"DO $$ BEGIN EXECUTE $c$COPY (SELECT 'a\\'' AS x, $v$)$v$ AS y) TO '{target}' "
                  "(FORMAT ndjson)$c$; END $$")
    assert target.read_text() == '{"x":"a\'","y":")"}\n'
    target = server_dir / "from_sql_function.ndjson"
    with server.connect() as c:
        c.execute("LOAD 'pg_stream_export'")
        c.execute(f"CREATE OR REPLACE FUNCTION copy_from_sql() RETURNS void LANGUAGE sql AS "
                  f"$f$ COPY (SELECT 1 AS \"a)\", '(' AS b) TO '{target}' (FORMAT ndjson) $f$")
        c.execute("SELECT copy_from_sql()")
    assert target.read_text() == '{"a)":1,"b":"("}\n'


def test_copy_of_a_data_modifying_query_is_refused(server):
    with server.connect() as c:
        c.execute("CREATE TEMP TABLE dml_target (a int)")
        for query in ["INSERT INTO dml_target VALUES (1) RETURNING a",
                      "WITH d AS (DELETE FROM dml_target RETURNING a) SELECT * FROM d"]:
            with pytest.raises(psycopg.errors.InvalidParameterValue):
                with c.cursor().copy(f"COPY ({query}) TO STDOUT (FORMAT ndjson)") as copy:
                    for _ in copy:
                        pass
        assert c.execute("SELECT count(*) FROM dml_target").fetchone() == (0,)


# --- statements the hook does not handle ----------------------------------------

@pytest.fixture(scope="module")
def alone():
    """A cluster where this extension's hook is the only one, so statements
    it does not handle go straight to PostgreSQL from it."""
    srv = start_cluster("pg_stream_export", environment={"RUST_BACKTRACE": "1"})
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log)


def fields(err: psycopg.Error):
    d = err.diag
    return (d.sqlstate, d.message_primary, d.message_detail, d.message_hint)


def test_errors_of_other_statements_are_exactly_postgresqls(alone):
    with alone.connect() as c:
        postmaster = int((alone.data / "postmaster.pid").read_text().split()[0])
        environ = Path(f"/proc/{postmaster}/environ").read_bytes().split(b"\0")
        assert b"RUST_BACKTRACE=1" in environ
        c.execute("CREATE TABLE hooked (a int); CREATE VIEW hooked_v AS SELECT * FROM hooked")
        cases = [
            ("CREATE TABLE hooked (a int)",
             ("42P07", 'relation "hooked" already exists', None, None)),
            ("DROP TABLE hooked",
             ("2BP01", 'cannot drop table hooked because other objects depend on it',
              "view hooked_v depends on table hooked",
              "Use DROP ... CASCADE to drop the dependent objects too.")),
            ("COPY hooked TO STDOUT (FORMAT bogus)",
             ("22023", 'COPY format "bogus" not recognized', None, None)),
            ("COPY no_such_table TO STDOUT (FORMAT csv)",
             ("42P01", 'relation "no_such_table" does not exist', None, None)),
            ("VACUUM no_such_table",
             ("42P01", 'relation "no_such_table" does not exist', None, None)),
        ]
        for sql, expected in cases:
            with pytest.raises(psycopg.Error) as err:
                c.execute(sql)
            assert fields(err.value) == expected, sql
        # Our own statements still work in the same backend.
        with c.cursor().copy("COPY (SELECT 1 AS x) TO STDOUT (FORMAT ndjson)") as copy:
            assert b"".join(bytes(b) for b in copy) == b'{"x":1}\n'


def test_errors_of_the_source_carry_no_rust_backtrace(alone):
    # The server runs with RUST_BACKTRACE=1: an error raised by PostgreSQL
    # inside the export (here the source query's) reaches the client with
    # PostgreSQL's fields only, and the log shows no Rust frames.
    before = len(alone.log_text())
    statements = [
        "SELECT count(*) FROM stream_export('SELECT 1 / (g - 500) AS x FROM generate_series(1, 1000) g')",
        "SELECT * FROM stream_export_to_file('SELECT 1 / (g - 500) AS x FROM generate_series(1, 1000) g', "
        "'/tmp/pse-no-backtrace.ndjson')",
        "COPY (SELECT 1 / (g - 500) AS x FROM generate_series(1, 1000) g) TO STDOUT (FORMAT ndjson)",
    ]
    with alone.connect() as c:
        c.execute("LOAD 'pg_stream_export'")
        for sql in statements:
            with pytest.raises(psycopg.errors.DivisionByZero) as err:
                if sql.startswith("COPY"):
                    with c.cursor().copy(sql) as copy:
                        for _ in copy:
                            pass
                else:
                    c.execute(sql)
            assert err.value.diag.message_detail is None, (sql, err.value.diag.message_detail)
    log = alone.log_text()[before:]
    assert "division by zero" in log
    for mark in ("stack backtrace", "std::backtrace", "rust_begin_unwind", "pgrx_pg_sys::"):
        assert mark not in log, log[-3000:]


CHECKING_FUNCTION = """
CREATE OR REPLACE FUNCTION pse_check_row(g int) RETURNS int LANGUAGE plpgsql AS $$
BEGIN
    -- pse.leader: a backend that does not raise (a directory export's leader).
    IF g = 1500 AND pg_backend_pid() <> coalesce(nullif(current_setting('pse.leader', true), ''), '0')::int THEN
        RAISE EXCEPTION 'row % is bad', g
            USING ERRCODE = 'check_violation', DETAIL = 'found by the check',
                  HINT = 'fix row ' || g;
    END IF;
    RETURN g;
END $$
"""
CHECKED_QUERY = "SELECT g AS id, pse_check_row(g) AS v FROM generate_series(1, 2000) g"


def all_fields(err: psycopg.Error):
    d = err.diag
    return (d.sqlstate, d.message_primary, d.message_detail, d.message_hint, d.context)


def test_errors_of_the_source_keep_every_field_postgresql_gives(alone, server_dir):
    # A PL/pgSQL function in the source raises past the first batch: every
    # entry point reports the SQLSTATE, message, DETAIL, HINT and CONTEXT
    # PostgreSQL itself reports for the same query, whatever the server's
    # RUST_BACKTRACE says.
    with alone.connect() as c:
        c.execute(CHECKING_FUNCTION)
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute(CHECKED_QUERY).fetchall()
        expected = all_fields(err.value)
        assert "PL/pgSQL function pse_check_row(integer)" in (expected[4] or ""), expected
        q = CHECKED_QUERY.replace("'", "''")
        statements = [
            f"SELECT count(*) FROM stream_export('{q}')",
            f"SELECT length(stream_export_bytes('{q}'))",
            f"SELECT * FROM stream_export_to_file('{q}', '{server_dir}/one.ndjson')",
            f"SELECT * FROM stream_export_to_file('{q}', '{server_dir}/one.ndjson.gz', compression => 'gzip')",
            f"COPY ({CHECKED_QUERY}) TO STDOUT (FORMAT ndjson)",
            f"SELECT * FROM stream_export('{q}', key => 'id', batch_size => 100)",
        ]
        for sql in statements:
            with pytest.raises(psycopg.Error) as err:
                if sql.startswith("COPY"):
                    with c.cursor().copy(sql) as copy:
                        for _ in copy:
                            pass
                else:
                    c.execute(sql).fetchall()
            assert all_fields(err.value) == expected, sql
        # A directory export raises its worker's error in the leader, naming
        # the partition, with the same fields.
        target = server_dir / "dir"
        target.mkdir()
        shutil.chown(target, "postgres", "postgres")
        directory = f"SELECT * FROM stream_export_to_directory('{q}', '{target}', 'id', 2)"
        c.execute("SELECT set_config('pse.leader', pg_backend_pid()::text, false)")
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute(directory)
        code, message, detail, hint, context = all_fields(err.value)
        assert (code, detail, hint, context) == (expected[0], expected[2], expected[3], expected[4])
        assert message.startswith("partition ") and message.endswith(": " + expected[1]), message
        assert list(target.iterdir()) == []
        # Raised in the leader (by the query that plans the partitions), the
        # CONTEXT goes on with the statement SPI ran, as PostgreSQL reports it.
        c.execute("RESET pse.leader")
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute(directory)
        code, message, detail, hint, context = all_fields(err.value)
        assert (code, message, detail, hint) == expected[:4]
        assert context.startswith(expected[4] + "\nSQL statement "), context
        assert list(target.iterdir()) == []
        # The backend goes on; neither an error of our own nor the same error
        # raised elsewhere carries the CONTEXT recorded for an earlier one.
        with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
            c.execute(f"SELECT count(*) FROM stream_export('{q}', batch_size => -1)")
        assert err.value.diag.context is None
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute(f"SELECT count(*) FROM stream_export('{q}')")
        assert all_fields(err.value) == expected
        # Caught by PL/pgSQL exception blocks, again and again: nothing
        # piles up.
        for _ in range(3):
            c.execute(
                f"DO $d$ BEGIN PERFORM count(*) FROM stream_export('{q}'); "
                "EXCEPTION WHEN check_violation THEN NULL; END $d$"
            )
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute(f"SELECT count(*) FROM stream_export('{q}')")
        assert all_fields(err.value) == expected
        # An export whose source runs another export (in a SQL function):
        # the CONTEXT that function reports when called on its own.
        c.execute(
            "CREATE OR REPLACE FUNCTION pse_inner_count() RETURNS bigint LANGUAGE sql "
            f"AS $f$ SELECT count(*) FROM stream_export('{q}') $f$"
        )
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute("SELECT pse_inner_count()")
        alone_fields = all_fields(err.value)
        assert alone_fields[4] == expected[4] + '\nSQL function "pse_inner_count" statement 1'
        with pytest.raises(psycopg.errors.CheckViolation) as err:
            c.execute("SELECT count(*) FROM stream_export('SELECT pse_inner_count()')")
        assert all_fields(err.value) == alone_fields


# --- NULL arguments and limits ------------------------------------------------

NULL_CALLS = [
    ("SELECT * FROM stream_export(NULL)", "22004"),
    ("SELECT * FROM stream_export_bytes(NULL)", "22004"),
    ("SELECT * FROM stream_export_to_file(NULL, '/tmp/x.ndjson')", "22004"),
    ("SELECT * FROM stream_export_to_file('pg_am', NULL)", "22004"),
    ("SELECT * FROM stream_export_to_directory(NULL, '/tmp', 'oid', 2)", "22004"),
    ("SELECT * FROM stream_export_to_directory('pg_am', NULL, 'oid', 2)", "22004"),
    ("SELECT * FROM stream_export_to_directory('pg_am', '/tmp', NULL, 2)", "22004"),
    ("SELECT * FROM stream_export_to_directory('pg_am', '/tmp', 'oid', NULL)", "22004"),
    ("SELECT * FROM stream_export_resume_token(NULL, 'k', '{}')", None),
    ("SELECT * FROM stream_export_resume_token('pg_am', NULL, '{}')", None),
    ("SELECT * FROM stream_export_resume_token('pg_am', 'oid', NULL)", None),
    ("SELECT * FROM stream_export_verify(NULL)", None),
    ("SELECT * FROM stream_export_verify_manifest(NULL)", None),
    ("SELECT * FROM stream_export_plan(NULL, 'oid', 2)", None),
    ("SELECT * FROM stream_export_plan('pg_am', NULL, 2)", None),
    ("SELECT * FROM stream_export_plan('pg_am', 'oid', NULL)", None),
]


@pytest.mark.parametrize("sql,state", NULL_CALLS)
def test_null_required_arguments(conn, sql, state):
    if state is None:  # STRICT: no rows, no error
        assert conn.execute(sql).fetchall() in ([], [(None,)])
    else:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql)
        assert err.value.sqlstate == state, sql
        assert "must not be NULL" in str(err.value)


def test_strict_is_declared_where_every_argument_is_required(conn):
    rows = dict(conn.execute("SELECT proname, proisstrict FROM pg_proc WHERE proname IN "
                             "('stream_export_resume_token', 'stream_export_verify', "
                             "'stream_export_verify_manifest', 'stream_export_plan')").fetchall())
    assert rows == dict.fromkeys(rows, True) and len(rows) == 4


def test_a_line_over_a_text_values_limit_is_54000_like_row_to_json(conn):
    query = "SELECT repeat('x', 600000000) AS a, repeat('y', 600000000) AS b"
    with pytest.raises(psycopg.Error) as oracle:
        conn.execute(f"SELECT row_to_json(r)::text FROM ({query}) r").fetchall()
    # PostgreSQL 15 says 54000; 16 and later fail the same way but with
    # XX000 ("invalid memory alloc request size"). Ours is 54000 on all.
    if conn.info.server_version < 160000:
        assert oracle.value.sqlstate == "54000", oracle.value
    else:
        assert oracle.value.sqlstate == "XX000", oracle.value
        assert "invalid memory alloc request size" in str(oracle.value)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT stream_export(%s)", [query]).fetchall()
    assert err.value.sqlstate == "54000"
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_exports_assign_no_transaction_id(conn, keyed_tables):
    """A read-only export stays read-only (it would fail on a hot standby,
    and burn transaction ids, if it did not)."""
    conn.execute("BEGIN")
    conn.execute("SELECT count(*) FROM stream_export('keyed_int', key => 'k', footer => true)")
    conn.execute("SELECT * FROM stream_export_plan('keyed_int', 'k', 4)")
    conn.execute("SELECT stream_export_resume_token('keyed_int', 'k', '{\"k\": 5}')")
    assert conn.execute("SELECT txid_current_if_assigned()").fetchone() == (None,)
    conn.execute("ROLLBACK")


@pytest.mark.parametrize("size", [1023, 1_000_000_001, 2_147_483_647])
def test_chunk_size_is_bounded(conn, size):
    with pytest.raises(psycopg.errors.InvalidParameterValue) as err:
        conn.execute("SELECT * FROM stream_export_bytes('pg_am', chunk_size => %s)", [size])
    assert "chunk_size" in str(err.value)


def test_a_misspelt_setting_of_ours_is_an_error(server):
    """The pg_stream_export. prefix is reserved: a misspelt name is refused
    once the library is loaded (and one set before it loaded is removed with
    a WARNING), instead of being kept as a setting nothing reads."""
    with server.connect() as c:
        warnings: list[str] = []
        c.add_notice_handler(lambda d: warnings.append(d.message_primary or ""))
        # Before the library is loaded PostgreSQL keeps any name as a
        # placeholder; loading it removes ours.
        c.execute("SET pg_stream_export.progres = '1s'")
        c.execute("LOAD 'pg_stream_export'")
        assert any("pg_stream_export.progres" in w for w in warnings), warnings
        with pytest.raises(psycopg.errors.UndefinedObject):
            c.execute("SHOW pg_stream_export.progres")
        for statement in ("SET pg_stream_export.progres = '1s'",
                          "SELECT set_config('pg_stream_export.log_export', 'off', false)"):
            with pytest.raises(psycopg.errors.InvalidName) as err:
                c.execute(statement)
            assert "reserved prefix" in (err.value.diag.message_detail or ""), err.value
        # The settings that exist are untouched.
        c.execute("SET pg_stream_export.progress = '1s'")
        assert c.execute("SHOW pg_stream_export.progress").fetchone() == ("1s",)
        assert c.execute("SHOW pg_stream_export.object_part_size").fetchone() == ("8MB",)
