"""stream_export_to_directory: background workers on one snapshot, part
files and a manifest."""

from __future__ import annotations

import gzip
import json
import threading
from pathlib import Path

import psycopg
import pytest

from helpers import run_in_thread, wait_until


def read_part(path: Path) -> list[bytes]:
    data = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    lines = data.splitlines()
    assert lines[-1].startswith(b'{"_stream_export":')
    return lines[:-1]


def workers_running(conn) -> int:
    return conn.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_stream_export'").fetchone()[0]


def test_parts_are_one_snapshot_while_others_write(server, events_small, server_dir):
    # A copy of its own: this test changes and deletes rows.
    table = "churn_events"
    with server.connect() as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"CREATE TABLE {table} AS SELECT * FROM {events_small}")
        c.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
    stop = threading.Event()

    def churn():
        with server.connect() as c:
            next_id = 20_000_000
            for i in range(5000):
                if stop.is_set():
                    break
                c.execute(f"INSERT INTO {table} SELECT g, now(), 2, 'view', 1, true, NULL, NULL, 'churn' "
                          "FROM generate_series(%s, %s) g", [next_id, next_id + 49])
                c.execute(f"UPDATE {table} SET note = 'changed' WHERE id = %s", [1 + i * 37])
                c.execute(f"DELETE FROM {table} WHERE id = %s", [2 + i * 41])
                next_id += 50

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        with server.connect(autocommit=False) as c:
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            expected = [r[0].encode() for r in c.execute(
                f"SELECT row_to_json(e)::text FROM {table} e ORDER BY id")]
            row = c.execute(
                "SELECT * FROM stream_export_to_directory(%s, %s, 'id', 3, compression => 'gzip')",
                [table, str(server_dir)],
            ).fetchone()
            c.commit()
    finally:
        stop.set()
        churner.join()
    _, partitions, workers, rows, *_ = row
    assert partitions == 3 and workers >= 1 and rows == len(expected)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    got = []
    for part in manifest["parts"]:
        got.extend(read_part(server_dir / part["file"]))
    assert got == expected  # parts in key order, same snapshot, nothing missing or doubled
    with server.connect() as c:
        ok, parts, total, detail = c.execute(
            "SELECT * FROM stream_export_verify_manifest(%s)", [str(server_dir)]).fetchone()
        assert ok and parts == 3 and total == len(expected), detail
        for part in manifest["parts"]:
            assert c.execute("SELECT ok FROM stream_export_verify(%s)", [str(server_dir / part["file"])]).fetchone()[0]
        c.execute(f"DROP TABLE {table}")
        assert wait_until(lambda: workers_running(c) == 0) is True


def test_a_failing_partition_leaves_nothing(server, server_dir):
    with server.connect() as c:
        with pytest.raises(psycopg.errors.DivisionByZero) as err:
            c.execute(
                "SELECT * FROM stream_export_to_directory("
                "'SELECT g AS id, 1 / (g - 90000) AS boom FROM generate_series(1, 100000) g', %s, 'id', 4)",
                [str(server_dir)],
            )
        assert "partition 3" in str(err.value)
        assert list(server_dir.iterdir()) == []
        assert wait_until(lambda: workers_running(c) == 0) is True
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_cancelling_the_leader_stops_every_worker(server, events_big, server_dir):
    with server.connect() as leader, server.connect() as observer:
        pid = leader.info.backend_pid
        thread, result = run_in_thread(lambda: leader.execute(
            "SELECT * FROM stream_export_to_directory(%s, %s, 'id', 2, compression => 'gzip')",
            [events_big, str(server_dir)]).fetchone())
        wait_until(lambda: workers_running(observer) > 0)
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=60)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert wait_until(lambda: workers_running(observer) == 0) is True
        assert list(server_dir.iterdir()) == []


def test_bad_directory_arguments(conn, server_dir):
    for sql, state in [
        ("SELECT * FROM stream_export_to_directory('pg_class', %s, 'oid', 0)", "22023"),
        ("SELECT * FROM stream_export_to_directory('pg_class', 'relative/dir', 'oid', 2)", "42501"),
        ("SELECT * FROM stream_export_to_directory('pg_class', %s, 'relname', 2)", "22023"),
    ]:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql, [str(server_dir)] if "%s" in sql else [])
        assert err.value.sqlstate == state, sql


def test_workers_render_with_the_callers_settings(server, server_dir):
    with server.connect() as c:
        c.execute("""
            DROP TABLE IF EXISTS settings_t;
            CREATE TABLE settings_t AS
            SELECT g AS id, timestamptz '2024-03-10 12:00:00+00' + g * interval '7 hours' AS at,
                   g / 7.0::float8 AS x, g * interval '1 day 3 hours' AS span
            FROM generate_series(1, 2000) g;
            ALTER TABLE settings_t ADD PRIMARY KEY (id);
        """)
        c.execute("SET TimeZone = 'America/New_York'; SET extra_float_digits = 0; "
                  "SET IntervalStyle = 'iso_8601'")
        expected = [r[0].encode() + b"\n" for r in c.execute(
            "SELECT row_to_json(s)::text FROM settings_t s ORDER BY id")]
        c.execute("SELECT * FROM stream_export_to_directory('settings_t', %s, 'id', 3)", [str(server_dir)])
    manifest = json.loads((server_dir / "manifest.json").read_text())
    got = []
    for part in manifest["parts"]:
        got.extend(line + b"\n" for line in read_part(server_dir / part["file"]))
    assert got == expected


def test_temporary_tables_are_refused_not_swapped(server, server_dir):
    # A temporary table shadows a permanent one of the same name only in
    # its own session: workers that resolved the name again exported the
    # permanent table's rows under the temporary table's name.
    with server.connect() as c:
        c.execute("DROP TABLE IF EXISTS public.shadowed")
        c.execute("CREATE TABLE public.shadowed (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO public.shadowed SELECT g, 'permanent' FROM generate_series(1, 2000) g")
        c.execute("CREATE TEMP TABLE shadowed (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO shadowed SELECT g, 'temporary' FROM generate_series(1, 10) g")
        c.execute("CREATE TEMP TABLE only_temp (id int PRIMARY KEY)")
        for source in ("shadowed", "only_temp", "SELECT * FROM shadowed WHERE id > 0",
                       "SELECT t.id FROM only_temp t JOIN public.shadowed USING (id)"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                c.execute("SELECT * FROM stream_export_to_directory(%s, %s, 'id', 2)", [source, str(server_dir)])
            assert "temporary table" in str(err.value), source
            assert list(server_dir.iterdir()) == [], source
        # The permanent table by its schema-qualified name exports its own rows.
        c.execute("SELECT * FROM stream_export_to_directory('public.shadowed', %s, 'id', 2)", [str(server_dir)])
        manifest = json.loads((server_dir / "manifest.json").read_text())
        lines = [line for part in manifest["parts"] for line in read_part(server_dir / part["file"])]
        assert len(lines) == 2000 and all(b'"permanent"' in line for line in lines)
        assert manifest["source"] == '"public"."shadowed"'



def test_a_temporary_table_that_hides_a_name_a_function_or_view_reads_is_refused(server, server_dir):
    # Workers resolve names without the session's temporary schema: a
    # function or view that reads "hidden" unqualified read the permanent
    # table there, while the session (and stream_export_to_file) reads the
    # temporary one.
    with server.connect() as c:
        c.execute("""
            DROP TABLE IF EXISTS public.hidden CASCADE;
            CREATE TABLE public.hidden (id int PRIMARY KEY, v text);
            INSERT INTO public.hidden SELECT g, 'permanent' FROM generate_series(1, 2000) g;
            CREATE OR REPLACE FUNCTION hidden_rows() RETURNS SETOF public.hidden LANGUAGE sql STABLE
                AS 'SELECT * FROM hidden';
            CREATE OR REPLACE FUNCTION hidden_rows_definer() RETURNS SETOF public.hidden LANGUAGE plpgsql
                SECURITY DEFINER SET search_path = pg_temp, public
                AS 'BEGIN RETURN QUERY SELECT * FROM hidden; END';
            CREATE OR REPLACE VIEW hidden_view AS SELECT * FROM hidden_rows();""")
        c.execute("CREATE TEMP TABLE hidden (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO hidden SELECT g, 'temporary' FROM generate_series(1, 10) g")
        assert c.execute("SELECT count(*) FROM hidden_rows()").fetchone() == (10,)
        for source in ("SELECT * FROM hidden_rows()", "public.hidden_view",
                       "SELECT * FROM hidden_rows_definer()"):
            with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
                c.execute("SELECT * FROM stream_export_to_directory(%s, %s, 'id', 2)", [source, str(server_dir)])
            assert 'hides "public"."hidden"' in str(err.value), source
            assert list(server_dir.iterdir()) == [], source
        # A temporary type that hides a permanent one, read by a cast in a function.
        c.execute("DROP TABLE pg_temp.hidden")
        c.execute("""
            DROP TYPE IF EXISTS public.hidden_kind;
            CREATE TYPE public.hidden_kind AS ENUM ('permanent');
            CREATE OR REPLACE FUNCTION hidden_kind_rows() RETURNS TABLE (id int, v text) LANGUAGE plpgsql
                AS 'BEGIN RETURN QUERY SELECT h.id, h.v::hidden_kind::text FROM public.hidden h; END'""")
        c.execute("CREATE TYPE pg_temp.hidden_kind AS ENUM ('temporary', 'permanent')")
        with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
            c.execute("SELECT * FROM stream_export_to_directory('SELECT * FROM hidden_kind_rows()', %s, 'id', 2)",
                      [str(server_dir)])
        assert 'hides "public"."hidden_kind"' in str(err.value)
        c.execute("DROP TYPE pg_temp.hidden_kind")
        # Without them, the same sources export the permanent rows.
        c.execute("SELECT * FROM stream_export_to_directory('public.hidden_view', %s, 'id', 2)", [str(server_dir)])
        manifest = json.loads((server_dir / "manifest.json").read_text())
        assert manifest["totals"]["rows"] == 2000


def test_alter_table_mid_export_does_not_hang(server, server_dir):
    """An ALTER TABLE queued while a directory export runs: the workers'
    next lock requests used to wait behind it, it behind the leader, the
    leader for the workers, with no deadlock detected. The workers are in
    the leader's lock group now, so the export finishes and the ALTER
    follows it."""
    with server.connect() as c:
        c.execute("DROP TABLE IF EXISTS locked_src")
        c.execute("CREATE TABLE locked_src (id int PRIMARY KEY, v text)")
        c.execute("INSERT INTO locked_src SELECT g, 'row ' || g FROM generate_series(1, 20000) g")
        c.execute("ANALYZE locked_src")
        c.execute("""
            CREATE OR REPLACE FUNCTION lock_gate(id int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
            BEGIN
              IF id = 3000 AND (SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid())
                                 = 'pg_stream_export' THEN
                PERFORM pg_advisory_xact_lock_shared(4310);
              END IF;
              RETURN true;
            END $$""")
    holder = server.connect()
    holder.execute("SELECT pg_advisory_lock(4310)")
    exporter = server.connect()
    # A hang would fail here, not block the suite.
    exporter.execute("SET statement_timeout = '120s'")
    thread, result = run_in_thread(lambda: exporter.execute(
        "SELECT rows FROM stream_export_to_directory('SELECT * FROM locked_src WHERE lock_gate(id)', %s, 'id', 2, "
        "workers => 1)", [str(server_dir)]).fetchone())
    alterer = server.connect()
    alter_thread = None
    try:
        # The one worker is in partition 0, held at the gate.
        wait_until(lambda: holder.execute(
            "SELECT 1 FROM pg_locks l JOIN pg_stat_activity a USING (pid) WHERE l.locktype = 'advisory' "
            "AND l.objid = 4310 AND NOT l.granted AND a.backend_type = 'pg_stream_export'").fetchone())
        alter_thread, altered = run_in_thread(lambda: alterer.execute(
            "ALTER TABLE locked_src ADD COLUMN extra int"))
        wait_until(lambda: holder.execute(
            "SELECT 1 FROM pg_locks WHERE relation = 'locked_src'::regclass AND mode = 'AccessExclusiveLock' "
            "AND NOT granted").fetchone())
        # Partition 0 ends; partition 1 takes its lock with the ALTER queued.
        holder.execute("SELECT pg_advisory_unlock(4310)")
        thread.join(timeout=150)
        assert result.get("value") == (20000,), result
        alter_thread.join(timeout=60)
        assert "error" not in altered, altered
    finally:
        holder.execute("SELECT pg_advisory_unlock_all()")
        for t in (thread, alter_thread):
            if t is not None:
                t.join(timeout=150)
        for conn in (holder, exporter, alterer):
            conn.close()


def test_a_query_source_resolves_names_on_the_session_search_path(server, server_dir):
    # Planning sampled the query under search_path = pg_catalog, where an
    # unqualified table (or function) of the user's is not found.
    with server.connect() as c:
        c.execute("DROP TABLE IF EXISTS unqualified_src")
        c.execute("CREATE TABLE unqualified_src (id int PRIMARY KEY)")
        c.execute("INSERT INTO unqualified_src SELECT generate_series(1, 3000)")
        c.execute("CREATE OR REPLACE FUNCTION keep_row(id int) RETURNS boolean LANGUAGE sql AS 'SELECT id % 3 <> 0'")
        source = "SELECT id FROM unqualified_src WHERE keep_row(id)"
        plan = c.execute("SELECT partition, lower, upper FROM stream_export_plan(%s, 'id', 3)", [source]).fetchall()
        assert len(plan) == 3 and plan[0][1] is None and plan[-1][2] is None
        row = c.execute("SELECT rows FROM stream_export_to_directory(%s, %s, 'id', 3)",
                        [source, str(server_dir)]).fetchone()
        assert row == (2000,)
