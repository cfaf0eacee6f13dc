"""COPY ... TO STDOUT / 'file' WITH (FORMAT ndjson) through real clients."""

from __future__ import annotations

import gzip
import os
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import psycopg
import pytest

from conftest import HAS_PG_STAT_STATEMENTS
from helpers import copy_out, function_bytes, run_in_thread, wait_until

PRELOAD = "-c session_preload_libraries=pg_stream_export"


def loaded(conn):
    conn.execute("LOAD 'pg_stream_export'")
    return conn


def test_copy_to_stdout_equals_the_byte_stream(conn, events_small):
    loaded(conn)
    data, rows = copy_out(conn, f"COPY {events_small} TO STDOUT WITH (FORMAT ndjson)")
    assert rows == 500_000
    assert data == function_bytes(conn, events_small)
    packed, _ = copy_out(
        conn, f"COPY {events_small} TO STDOUT WITH (FORMAT ndjson, COMPRESSION gzip, COMPRESSION_LEVEL 6, FOOTER true)"
    )
    assert packed == function_bytes(conn, events_small, compression="gzip", compression_level=6, footer=True)
    assert gzip.decompress(packed).startswith(data[:1000])


def test_psql_pipelines(server, events_small, tmp_path):
    with server.connect() as c:
        expected = function_bytes(c, events_small)
        query = f"SELECT id, note FROM {events_small} WHERE ok"
        expected_query_gz = gzip.decompress(function_bytes(c, query, compression="gzip"))
    out = server.psql("-c", f"COPY {events_small} TO STDOUT WITH (FORMAT ndjson)", options=PRELOAD).stdout
    assert out == expected
    assert out.count(b"\n") == 500_000
    packed = server.psql(
        "-c", f"COPY {events_small} TO STDOUT WITH (FORMAT ndjson, COMPRESSION gzip)", options=PRELOAD
    ).stdout
    assert subprocess.run(["gzip", "-d"], input=packed, capture_output=True, check=True).stdout == expected
    plain_file = tmp_path / "out.ndjson"
    gz_file = tmp_path / "out.ndjson.gz"
    server.psql("-c", f"\\copy {events_small} TO '{plain_file}' WITH (FORMAT ndjson)", options=PRELOAD)
    assert plain_file.read_bytes() == expected
    server.psql("-c", f"\\copy ({query}) TO '{gz_file}' WITH (FORMAT ndjson, COMPRESSION gzip)", options=PRELOAD)
    subprocess.run(["gzip", "-t", str(gz_file)], check=True)
    assert gzip.decompress(gz_file.read_bytes()) == expected_query_gz


def test_other_copies_are_untouched_and_hooks_chained(conn, tmp_path):
    loaded(conn)
    loaded(conn)  # loading twice is harmless
    if HAS_PG_STAT_STATEMENTS:
        conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
        conn.execute("SELECT pg_stat_statements_reset()")
    conn.execute("DROP TABLE IF EXISTS plain_copy; CREATE TABLE plain_copy (a int, b text)")
    with conn.cursor() as cur:
        with cur.copy("COPY plain_copy FROM STDIN") as copy:
            copy.write("1\tone\n2\ttwo\n")
        with cur.copy("COPY plain_copy FROM STDIN (FORMAT csv)") as copy:
            copy.write('3,"th,ree"\n')
    assert copy_out(conn, "COPY plain_copy TO STDOUT")[0] == b'1\tone\n2\ttwo\n3\tth,ree\n'
    assert copy_out(conn, "COPY plain_copy TO STDOUT (FORMAT csv)")[0] == b'1,one\n2,two\n3,"th,ree"\n'
    binary, rows = copy_out(conn, "COPY plain_copy TO STDOUT (FORMAT binary)")
    assert binary.startswith(b"PGCOPY\n\xff\r\n\x00") and rows == 3
    target = Path(tempfile.mkdtemp(dir="/tmp")) / "program.txt"
    shutil.chown(target.parent, "postgres", "postgres")
    conn.execute(f"COPY plain_copy TO PROGRAM 'cat > {target}'")
    assert target.read_text() == "1\tone\n2\ttwo\n3\tth,ree\n"
    conn.execute(f"COPY plain_copy FROM '{target}'")
    assert conn.execute("SELECT count(*) FROM plain_copy").fetchone()[0] == 6
    shutil.rmtree(target.parent)
    if not HAS_PG_STAT_STATEMENTS:
        pytest.skip("hook chaining: this PostgreSQL build has no pg_stat_statements (checked on 15 and 18)")
    # The previous hook (pg_stat_statements) saw the statements we left alone.
    seen = conn.execute(
        "SELECT count(*) FROM pg_stat_statements WHERE query ILIKE 'COPY plain_copy TO STDOUT (FORMAT csv)%'"
    ).fetchone()[0]
    assert seen == 1


@pytest.mark.parametrize(
    "statement, state",
    [
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, HEADER true)", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, DELIMITER ',')", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, QUOTE '\"')", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, FORCE_QUOTE *)", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, ENCODING 'LATIN1')", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, BOGUS 1)", "42601"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, COMPRESSION 'lz4')", "22023"),
        ("COPY pg_class TO STDOUT WITH (FORMAT ndjson, COMPRESSION_LEVEL 12)", "22023"),
        ("COPY pg_class FROM STDIN WITH (FORMAT ndjson)", "0A000"),
        ("COPY pg_class FROM PROGRAM 'cat' WITH (FORMAT ndjson)", "0A000"),
        ("COPY no_such_table_copy TO STDOUT WITH (FORMAT ndjson)", "42P01"),
        ("COPY pg_class (no_such_column) TO STDOUT WITH (FORMAT ndjson)", "42703"),
    ],
)
def test_bad_copy_options(conn, statement, state):
    loaded(conn)
    with pytest.raises(psycopg.Error) as err:
        copy_out(conn, statement)
    assert err.value.sqlstate == state
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_encoding_utf8_is_accepted(conn):
    loaded(conn)
    data, rows = copy_out(conn, "COPY (SELECT 1 AS a) TO STDOUT WITH (FORMAT ndjson, ENCODING 'UTF8')")
    assert data == b'{"a":1}\n' and rows == 1


def test_columns_privileges_and_row_level_security(server, conn):
    loaded(conn)
    conn.execute("""
        DROP TABLE IF EXISTS secrets; DROP ROLE IF EXISTS copy_reader; DROP ROLE IF EXISTS copy_nobody;
        CREATE TABLE secrets (id int, owner text, payload text);
        INSERT INTO secrets VALUES (1, 'copy_reader', 'mine'), (2, 'other', 'theirs');
        ALTER TABLE secrets ENABLE ROW LEVEL SECURITY;
        CREATE POLICY own ON secrets USING (owner = current_user);
        CREATE ROLE copy_reader; GRANT SELECT ON secrets TO copy_reader;
        CREATE ROLE copy_nobody;
    """)
    data, _ = copy_out(conn, "COPY secrets (payload, id) TO STDOUT WITH (FORMAT ndjson)")
    assert data == b'{"payload":"mine","id":1}\n{"payload":"theirs","id":2}\n'  # superuser bypasses RLS
    conn.execute("SET ROLE copy_reader")
    data, rows = copy_out(conn, "COPY secrets TO STDOUT WITH (FORMAT ndjson)")
    assert data == b'{"id":1,"owner":"copy_reader","payload":"mine"}\n' and rows == 1
    with pytest.raises(psycopg.Error) as err:
        copy_out(conn, "COPY secrets TO '/tmp/never.ndjson' WITH (FORMAT ndjson)")
    assert err.value.sqlstate == "42501"
    conn.execute("RESET ROLE; SET ROLE copy_nobody")
    with pytest.raises(psycopg.Error) as err:
        copy_out(conn, "COPY secrets TO STDOUT WITH (FORMAT ndjson)")
    assert err.value.sqlstate == "42501"
    conn.execute("RESET ROLE")


def test_copy_to_server_file_is_atomic_and_equal(conn, events_small, server_dir):
    loaded(conn)
    directory = server_dir
    target = directory / "events.ndjson.gz"
    target.write_bytes(b"old")
    shutil.chown(target, "postgres", "postgres")
    with conn.cursor() as cur:
        cur.execute(f"COPY {events_small} TO '{target}' WITH (FORMAT ndjson, COMPRESSION gzip, FOOTER true)")
        assert cur.rowcount == 500_000
        assert cur.statusmessage == "COPY 500000"
    assert target.read_bytes() == function_bytes(conn, events_small, compression="gzip", footer=True)
    ok, detail = conn.execute("SELECT ok, detail FROM stream_export_verify(%s)", [str(target)]).fetchone()
    assert ok, detail
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(f"COPY (SELECT 1 / (id - 1000) FROM {events_small}) TO '{target}' WITH (FORMAT ndjson)")
    assert sorted(p.name for p in directory.iterdir()) == ["events.ndjson.gz"]
    assert target.read_bytes() == function_bytes(conn, events_small, compression="gzip", footer=True)


def test_cancel_and_progress_of_copy_to_stdout(server, events_big):
    with server.connect() as worker, server.connect() as observer:
        loaded(worker)
        pid = worker.info.backend_pid
        received = []

        def run():
            with worker.cursor() as cur:
                with cur.copy(f"COPY {events_big} TO STDOUT WITH (FORMAT ndjson)") as copy:
                    for block in copy:
                        received.append(len(block))

        thread, result = run_in_thread(run)
        row = wait_until(lambda: observer.execute(
            "SELECT command, type, tuples_processed FROM pg_stat_progress_copy WHERE pid = %s AND tuples_processed > 0",
            [pid]).fetchone())
        assert row[0] == "COPY TO" and row[1] == "PIPE"
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=30)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert worker.execute("SELECT 1").fetchone()[0] == 1


def test_client_disconnect_leaves_no_backend(server, events_big):
    app = f"pse-disconnect-{os.getpid()}"
    env = dict(os.environ, PGAPPNAME=app, PGOPTIONS=PRELOAD)
    proc = subprocess.Popen(
        ["psql", "-X", "-q", "-d", server.dsn(), "-c", f"COPY {events_big} TO STDOUT WITH (FORMAT ndjson)"],
        stdout=subprocess.PIPE, env=env,
    )
    assert proc.stdout.read(1 << 20)  # data is flowing
    with server.connect() as observer:
        assert observer.execute("SELECT count(*) FROM pg_stat_activity WHERE application_name = %s", [app]).fetchone()[0] == 1
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        wait_until(lambda: observer.execute(
            "SELECT count(*) = 0 FROM pg_stat_activity WHERE application_name = %s", [app]).fetchone()[0])


def test_statement_timeout_stops_copy_to_stdout(server, events_big):
    with server.connect() as c:
        loaded(c)
        c.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            copy_out(c, f"COPY {events_big} TO STDOUT WITH (FORMAT ndjson, COMPRESSION gzip)")
        assert err.value.sqlstate == "57014"
        c.execute("RESET statement_timeout")
        assert c.execute("SELECT 1").fetchone()[0] == 1
