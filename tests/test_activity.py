"""Watching exports: the stream_export_activity view, progress NOTICEs on
the client, and the audit line in the server log.

The view needs the library in shared_preload_libraries, so these tests run
on a cluster of their own (`watched`), with room for one tracked export at
a time to show that a full table never fails an export.
"""

from __future__ import annotations

import json
import os
import re
import subprocess

import psycopg
import pytest

from conftest import start_cluster, stop_cluster, crashes_in
from helpers import run_in_thread, wait_until

ROWS = 1_000_000


@pytest.fixture(scope="module")
def watched():
    srv = start_cluster("pg_stream_export", environment={"RUST_BACKTRACE": "1"},
                        settings={"pg_stream_export.max_tracked_exports": "3"})
    with srv.connect() as c:
        c.execute(f"""
            CREATE TABLE big AS
            SELECT g AS id, md5(g::text) AS a, md5((g + 1)::text) AS b
            FROM generate_series(1, {ROWS}) g;
            ALTER TABLE big ADD PRIMARY KEY (id);
            ANALYZE big;
            CREATE ROLE watcher LOGIN;
            CREATE ROLE exporter LOGIN;
            GRANT SELECT ON big TO exporter;
        """)
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


def activity(conn, pid: int):
    row = conn.execute("SELECT row_to_json(a)::text FROM stream_export_activity a WHERE pid = %s",
                       [pid]).fetchone()
    return json.loads(row[0]) if row else None


SLOW = "SELECT * FROM stream_export_to_file('big', %s, compression => 'gzip', compression_level => 9)"


def start(srv, sql, args, user="postgres"):
    conn = psycopg.connect(srv.dsn(user=user), autocommit=True)
    pid = conn.info.backend_pid
    thread, result = run_in_thread(lambda: conn.execute(sql, args).fetchall())
    return conn, pid, thread, result


def cancel(srv, conn, pid, thread):
    with srv.connect() as c:
        c.execute("SELECT pg_cancel_backend(%s)", [pid])
    thread.join(timeout=60)
    conn.close()


def test_the_view_needs_the_library_preloaded(conn):
    with pytest.raises(psycopg.errors.ObjectNotInPrerequisiteState):
        conn.execute("SELECT * FROM stream_export_activity")


def test_a_running_export_shows_with_rate_estimate_and_eta(watched, server_dir):
    target = server_dir / "big.ndjson.gz"
    conn, pid, thread, result = start(watched, SLOW, [str(target)])
    try:
        with watched.connect() as observer:
            # Past the first batches, so that the percentage is above 0.0.
            first = wait_until(lambda: (a := activity(observer, pid)) and a["rows"] >= ROWS // 50 and a)
            assert first["source"] == '"public"."big"'
            assert first["destination"] == str(target)
            assert "compression=gzip:9" in first["format"] and "format=ndjson" in first["format"]
            assert first["role"] == "postgres" and first["database"] == "e2e"
            assert first["leader_pid"] is None and first["partition"] is None
            assert first["estimated_rows"] == ROWS  # pg_class.reltuples after ANALYZE
            assert 0 < first["percent_done"] < 100 and first["eta"] is not None
            assert first["rows_per_second"] > 0 and first["bytes"] > 0
            later = wait_until(lambda: (a := activity(observer, pid)) and a["rows"] > first["rows"] and a)
            assert later["bytes_written"] >= first["bytes_written"]
    finally:
        cancel(watched, conn, pid, thread)
    with watched.connect() as observer:
        wait_until(lambda: activity(observer, pid) is None)


def test_others_see_no_source_unless_they_read_all_stats(watched, server_dir):
    target = server_dir / "big.ndjson.gz"
    conn, pid, thread, result = start(watched, SLOW, [str(target)])
    try:
        with psycopg.connect(watched.dsn(user="watcher"), autocommit=True) as plain:
            row = wait_until(lambda: activity(plain, pid))
            assert row["source"] is None and row["destination"] is None
            assert row["role"] == "postgres"
            with watched.connect() as admin:
                admin.execute("GRANT pg_read_all_stats TO watcher")
            try:
                assert activity(plain, pid)["source"] == '"public"."big"'
            finally:
                with watched.connect() as admin:
                    admin.execute("REVOKE pg_read_all_stats FROM watcher")
    finally:
        cancel(watched, conn, pid, thread)
    # A plain role sees its own export in full.
    own, own_pid, own_thread, _ = start(
        watched, "SELECT count(*) FROM stream_export('SELECT pg_sleep(0.001), * FROM big')", [], user="exporter")
    try:
        with psycopg.connect(watched.dsn(user="exporter"), autocommit=True) as same_role:
            row = wait_until(lambda: activity(same_role, own_pid))
            assert row["source"] == "SELECT pg_sleep(0.001), * FROM big"
            assert row["destination"] == "client (stream_export)"
    finally:
        cancel(watched, own, own_pid, own_thread)


def test_a_directory_export_shows_its_job_and_workers(watched, server_dir):
    conn, pid, thread, result = start(
        watched, "SELECT * FROM stream_export_to_directory('big', %s, 'id', 2, compression => 'gzip', "
                 "compression_level => 9)", [str(server_dir)])
    try:
        with watched.connect() as observer:
            def job():
                rows = observer.execute(
                    "SELECT pid, leader_pid, partition, rows FROM stream_export_activity "
                    "WHERE pid = %s OR leader_pid = %s", [pid, pid]).fetchall()
                workers = [r for r in rows if r[1] == pid]
                leader = [r for r in rows if r[0] == pid]
                return leader and len(workers) == 2 and all(w[3] > 0 for w in workers) and (leader, workers)
            leader, workers = wait_until(job)
            assert {w[2] for w in workers} <= {0, 1}
            # The leader's row sums its workers (and finished partitions).
            assert leader[0][3] >= sum(w[3] for w in workers) - 1
    finally:
        cancel(watched, conn, pid, thread)


def test_a_full_table_never_fails_an_export(watched, server_dir):
    running = [start(watched, SLOW, [str(server_dir / f"slow{i}.ndjson.gz")]) for i in range(3)]
    try:
        with watched.connect() as observer:
            wait_until(lambda: observer.execute("SELECT count(*) FROM stream_export_activity").fetchone()[0] == 3)
            # A fourth export finds no free slot: it runs, unseen.
            row = observer.execute("SELECT rows FROM stream_export_to_file('SELECT 1 AS x', %s)",
                                   [str(server_dir / "small.ndjson")]).fetchone()
            assert row == (1,)
            assert observer.execute("SELECT count(*) FROM stream_export_activity").fetchone()[0] == 3
    finally:
        for conn, pid, thread, _ in running:
            cancel(watched, conn, pid, thread)


def test_one_role_cannot_fill_the_table(watched, server_dir):
    # A plain role with many open cursors over stream_export holds at most
    # its share of the table (one of 3 here): other exports still show.
    with psycopg.connect(watched.dsn(user="exporter")) as plain:
        for i in range(8):
            plain.execute(f"DECLARE hog{i} CURSOR FOR SELECT stream_export('big')")
            assert plain.execute(f"FETCH 1 FROM hog{i}").fetchone()
        with watched.connect() as observer:
            hogs = observer.execute("SELECT count(*) FROM stream_export_activity WHERE role = 'exporter'"
                                    ).fetchone()[0]
            assert hogs == 1
            conn, pid, thread, result = start(watched, SLOW, [str(server_dir / "seen.ndjson.gz")])
            try:
                assert wait_until(lambda: activity(observer, pid))["role"] == "postgres"
            finally:
                cancel(watched, conn, pid, thread)
        plain.rollback()


def test_progress_notices_go_to_stderr_and_stdout_stays_the_same(watched, tmp_path):
    statement = "COPY big TO STDOUT (FORMAT ndjson, COMPRESSION gzip, COMPRESSION_LEVEL 9)"
    quiet = watched.psql("-c", statement).stdout
    noisy = watched.psql("-c", statement, options="-c pg_stream_export.progress=200ms")
    assert noisy.stdout == quiet
    lines = [line for line in noisy.stderr.decode().splitlines() if "pg_stream_export:" in line]
    assert len(lines) >= 2, noisy.stderr
    assert all(line.startswith("NOTICE:  pg_stream_export: ") and " rows/s" in line for line in lines)
    assert any("% of about 1000000 rows, ETA" in line for line in lines), lines
    counts = [int(re.search(r"pg_stream_export: (\d+) rows", line).group(1)) for line in lines]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    # Off by default: nothing on stderr.
    assert b"pg_stream_export" not in watched.psql("-c", statement).stderr


def audit_lines(log: str, *pids: int) -> list[str]:
    """The audit lines of these backends (the log line prefix has the pid:
    a line of an earlier test's export may still be on its way)."""
    marks = [f"[{pid}]" for pid in pids]
    return [line for line in log.splitlines()
            if "pg_stream_export: export " in line and any(mark in line for mark in marks)]


def test_every_export_writes_one_audit_line(watched, server_dir):
    before = len(watched.log_text())
    target = server_dir / "audit.ndjson"
    with watched.connect() as c:
        mine = c.info.backend_pid
        c.execute("SELECT * FROM stream_export_to_file('SELECT g AS id FROM generate_series(1, 10) g', %s, "
                  "footer => true)", [str(target)])
        crc = c.execute("SELECT crc32 FROM stream_export_verify(%s)", [str(target)]).fetchone()[0]
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT count(*) FROM stream_export('SELECT 1 / (g - 5) AS x FROM generate_series(1, 10) g')")
        c.execute("SELECT stream_export('big') LIMIT 2").fetchall()
        c.execute("SELECT count(*) FROM stream_export_bytes('SELECT 1 AS x')")
        c.execute("SET pg_stream_export.log_exports = off")
        c.execute("SELECT count(*) FROM stream_export('SELECT 2 AS not_logged')")
    conn, pid, thread, result = start(watched, SLOW, [str(server_dir / "cancelled.ndjson.gz")])
    with watched.connect() as observer:
        wait_until(lambda: (a := activity(observer, pid)) and a["rows"] > 0)
    cancel(watched, conn, pid, thread)
    log = watched.log_text()[before:]
    lines = wait_until(lambda: len(audit_lines(watched.log_text()[before:], mine, pid)) >= 5
                       and audit_lines(watched.log_text()[before:], mine, pid))
    assert len(lines) == 5, lines
    completed, failed, stopped, bytes_line, cancelled = lines
    assert "export completed:" in completed and 'role="postgres"' in completed
    assert 'database="e2e"' in completed and f'destination="{target}"' in completed
    assert " rows=10 " in completed and f"crc32={crc}" in completed and "footer=true" in completed
    assert "export failed (SQLSTATE 22012)" in failed
    assert "export stopped by its caller before the end" in stopped and " rows=" in stopped
    assert "export completed:" in bytes_line and 'destination="client (stream_export_bytes)"' in bytes_line
    assert "export cancelled (SQLSTATE 57014)" in cancelled and r'source="\"public\".\"big\""' in cancelled
    assert "not_logged" not in log
    # The audit line is for the server log only.
    assert "LOG:" in completed


def test_a_directory_export_writes_one_audit_line_for_the_job(watched, server_dir):
    before = len(watched.log_text())
    with watched.connect() as c:
        c.execute("SELECT * FROM stream_export_to_directory('SELECT g AS id FROM generate_series(1, 1000) g', "
                  "%s, 'id', 3)", [str(server_dir)])
        leader = c.info.backend_pid
    log = watched.log_text()[before:]
    lines = audit_lines(log, leader)
    # No worker writes one of its own.
    assert not [line for line in log.splitlines() if "pg_stream_export: export " in line and line not in lines]
    assert len(lines) == 1, lines
    assert "export completed:" in lines[0] and " rows=1000 " in lines[0] and "partitions=3" in lines[0]
