"""Crash safety: what a killed, terminated or shut-down export leaves, and
that the next export recognises it as stale; what a directory export may
touch; verify on hostile files.

Tests that kill backends or stop the server run against a cluster of their
own (`scratch`), since a killed backend restarts every session. The
disk-full and mount tests need root, as CI has.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import time
from pathlib import Path

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import PeakSampler, rss_anon_kib, run_in_thread, wait_for_server, wait_until

# A table big enough that a gzip level 9 export of it runs for seconds.
BIG_ROWS = 2_000_000


@pytest.fixture(scope="module")
def scratch():
    srv = start_cluster("pg_stream_export", environment={"RUST_BACKTRACE": "1"})
    with srv.connect() as c:
        c.execute(f"""
            CREATE TABLE big AS
            SELECT g AS id, md5(g::text) AS a, md5((g + 1)::text) AS b, md5((g + 2)::text) AS c
            FROM generate_series(1, {BIG_ROWS}) g;
            ALTER TABLE big ADD PRIMARY KEY (id);
            ANALYZE big;
        """)
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


def active_query_pid(conn, pattern: str) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s AND pid <> pg_backend_pid()",
        [pattern]).fetchone()
    return row[0] if row else None


def start_file_export(srv, target: Path, sql: str | None = None):
    conn = srv.connect()
    pid = conn.info.backend_pid
    sql = sql or "SELECT * FROM stream_export_to_file('big', %s, compression => 'gzip', compression_level => 9)"
    thread, result = run_in_thread(lambda: conn.execute(sql, [str(target)]).fetchall())
    partial = Path(str(target) + ".partial")
    wait_until(lambda: partial.exists() and partial.stat().st_size > 0)
    return conn, pid, thread, result


def workers_running(conn) -> int:
    return conn.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'pg_stream_export'").fetchone()[0]


@pytest.mark.parametrize("how", ["kill -9", "pg_terminate_backend", "fast shutdown"])
def test_a_dead_exports_partial_file_is_replaced_by_the_next_export(scratch, server_dir, how):
    target = server_dir / "big.ndjson.gz"
    partial = Path(str(target) + ".partial")
    conn, pid, thread, result = start_file_export(scratch, target)
    if how == "kill -9":
        os.kill(pid, signal.SIGKILL)
    elif how == "pg_terminate_backend":
        with scratch.connect() as c:
            c.execute("SELECT pg_terminate_backend(%s)", [pid])
    else:
        scratch.pg_ctl("-m", "fast", "-w", "stop")
        scratch.start()
    thread.join(timeout=120)
    assert "error" in result, result
    conn.close()
    wait_for_server(scratch)
    assert not target.exists()
    if how == "kill -9":
        # A process killed outright cannot clean up: its partial file stays,
        # and no one holds it.
        assert partial.exists()
    else:
        # A process that exits on FATAL removes its partial file on the way
        # out (the client hears of the FATAL before the process is gone).
        wait_until(lambda: not partial.exists(), timeout=30)
        # What the exit would have left is stale all the same: make one.
        partial.write_bytes(b"{}\n")
        shutil.chown(partial, "postgres", "postgres")
    log_before = len(scratch.log_text())
    with scratch.connect() as c:
        # Neither a function export without overwrite nor COPY is blocked.
        row = c.execute("SELECT rows FROM stream_export_to_file('SELECT 1 AS x', %s, footer => true)",
                        [str(target)]).fetchone()
        assert row == (1,)
        assert c.execute("SELECT ok FROM stream_export_verify(%s)", [str(target)]).fetchone() == (True,)
    assert not partial.exists()
    log = scratch.log_text()[log_before:]
    assert "removed stale partial file" in log and str(partial) in log


def test_copy_replaces_a_stale_partial_file(scratch, server_dir):
    target = server_dir / "copy.ndjson"
    conn, pid, thread, result = start_file_export(scratch, target)
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=120)
    conn.close()
    wait_for_server(scratch)
    assert Path(str(target) + ".partial").exists()
    with scratch.connect() as c:
        c.execute(f"COPY (SELECT 1 AS x) TO '{target}' WITH (FORMAT ndjson)")
    assert target.read_bytes() == b'{"x":1}\n'
    assert sorted(p.name for p in server_dir.iterdir()) == ["copy.ndjson"]


def test_a_live_exports_partial_file_is_never_touched(scratch, server_dir):
    target = server_dir / "live.ndjson.gz"
    partial = Path(str(target) + ".partial")
    conn, pid, thread, result = start_file_export(scratch, target)
    try:
        inode = partial.stat().st_ino
        with scratch.connect() as c:
            for sql in ["SELECT * FROM stream_export_to_file('SELECT 1 AS x', %s, overwrite => true)",
                        "SELECT * FROM stream_export_to_file('SELECT 1 AS x', %s)"]:
                with pytest.raises(psycopg.errors.DuplicateFile) as err:
                    c.execute(sql, [str(target)])
                assert "another export to the same path is running" in str(err.value)
            with pytest.raises(psycopg.errors.DuplicateFile):
                c.execute(f"COPY (SELECT 1) TO '{target}' (FORMAT ndjson)")
        assert partial.stat().st_ino == inode
        with scratch.connect() as c:
            c.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=60)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled)
    finally:
        conn.close()
    assert list(server_dir.iterdir()) == []


def test_a_file_that_appears_at_the_target_is_not_replaced(scratch, server_dir):
    target = server_dir / "appears.ndjson.gz"
    conn, pid, thread, result = start_file_export(scratch, target)
    target.write_bytes(b"someone else's file\n")
    thread.join(timeout=300)
    conn.close()
    assert isinstance(result.get("error"), psycopg.errors.DuplicateFile), result
    assert "appeared during the export" in str(result["error"])
    assert target.read_bytes() == b"someone else's file\n"
    assert sorted(p.name for p in server_dir.iterdir()) == ["appears.ndjson.gz"]


def test_something_else_at_the_partial_name_is_refused_and_left_alone(scratch, server_dir):
    target = server_dir / "t.ndjson"
    partial = Path(str(target) + ".partial")
    os.mkfifo(partial)
    shutil.chown(partial, "postgres", "postgres")
    with scratch.connect() as c:
        with pytest.raises(psycopg.errors.DuplicateFile):
            c.execute("SELECT * FROM stream_export_to_file('SELECT 1 AS x', %s)", [str(target)])
    assert partial.is_fifo()
    partial.unlink()
    partial.write_bytes(b"root's file")  # another owner
    with scratch.connect() as c:
        with pytest.raises(psycopg.errors.DuplicateFile):
            c.execute("SELECT * FROM stream_export_to_file('SELECT 1 AS x', %s)", [str(target)])
    assert partial.read_bytes() == b"root's file"


# --- directory exports -------------------------------------------------------

def start_directory_export(srv, directory: Path, partitions: int = 2, extra: str = ""):
    conn = srv.connect()
    pid = conn.info.backend_pid
    sql = ("SELECT * FROM stream_export_to_directory('big', %s, 'id', " + str(partitions)
           + ", compression => 'gzip', compression_level => 9" + extra + ")")
    thread, result = run_in_thread(lambda: conn.execute(sql, [str(directory)]).fetchone())
    with srv.connect() as observer:
        wait_until(lambda: workers_running(observer) > 0)
    wait_until(lambda: any(p.name.endswith(".partial") and p.name.startswith("part-")
                           for p in directory.iterdir()))
    return conn, pid, thread, result


def snapshot_of(directory: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in directory.iterdir()}


def finished_export(srv, directory: Path, source: str = "SELECT g AS id FROM generate_series(1, 5000) g",
                    overwrite: bool = False) -> dict[str, str]:
    with srv.connect() as c:
        row = c.execute("SELECT rows FROM stream_export_to_directory(%s, %s, 'id', 3, overwrite => %s)",
                        [source, str(directory), overwrite]).fetchone()
        assert row[0] > 0
        ok, parts, rows, detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)",
                                            [str(directory)]).fetchone()
        assert ok, detail
    return snapshot_of(directory)


def test_terminating_the_leader_stops_its_workers(scratch, server_dir):
    conn, pid, thread, result = start_directory_export(scratch, server_dir)
    with scratch.connect() as observer:
        observer.execute("SELECT pg_terminate_backend(%s)", [pid])
        thread.join(timeout=60)
        conn.close()
        started = time.monotonic()
        wait_until(lambda: workers_running(observer) == 0, timeout=10)
        assert time.monotonic() - started < 3
        wait_until(lambda: observer.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", [pid]).fetchone()[0] == 0)
    # Leader and workers exit on FATAL and remove their partial files before
    # they leave pg_stat_activity.
    assert list(server_dir.iterdir()) == []
    files = finished_export(scratch, server_dir)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert sorted(files) == sorted(["manifest.json"] + [p["file"] for p in manifest["parts"]])


def test_a_killed_directory_exports_files_are_removed_by_the_next_export(scratch, server_dir):
    conn, pid, thread, result = start_directory_export(scratch, server_dir)
    restarts = scratch.log_text().count("database system is ready to accept connections")
    os.kill(pid, signal.SIGKILL)
    thread.join(timeout=60)
    conn.close()
    # The server takes connections until the postmaster notices the crash:
    # wait for the restart that follows it, not only for a connection.
    wait_until(lambda: scratch.log_text().count("database system is ready to accept connections") > restarts,
               timeout=60, interval=0.1)
    wait_for_server(scratch)
    left = sorted(p.name for p in server_dir.iterdir())
    assert "manifest.json.partial" in left
    assert any(name.startswith("part-") and name.endswith(".partial") for name in left), left
    log_before = len(scratch.log_text())
    # What the dead export left is stale: the next export takes the
    # directory and leaves only its own files.
    files = finished_export(scratch, server_dir)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert sorted(files) == sorted(["manifest.json"] + [p["file"] for p in manifest["parts"]])
    log = scratch.log_text()[log_before:]
    assert re.search(r'removed "[^"]*/part-[0-9a-f]{12}-\d{5}\.ndjson[^"]*" \(\d+ bytes\) left by an export', log)
    assert "removed stale partial file" in log and "manifest.json.partial" in log


@pytest.mark.parametrize("round", range(3))
def test_a_double_cancel_of_a_directory_export_is_an_ordinary_cancel(scratch, server_dir, round):
    conn, pid, thread, result = start_directory_export(scratch, server_dir)
    with scratch.connect() as observer:
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        time.sleep(0.03)  # the second cancel lands while the first unwinds
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=60)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert conn.execute("SELECT 1").fetchone() == (1,)  # the same backend lives on
        conn.close()
        wait_until(lambda: workers_running(observer) == 0, timeout=10)
    assert list(server_dir.iterdir()) == []
    assert not crashes_in(scratch.log_text())


def test_a_terminated_worker_fails_the_export_with_its_own_error(scratch, server_dir):
    conn, pid, thread, result = start_directory_export(scratch, server_dir)
    with scratch.connect() as observer:
        worker = observer.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = 'pg_stream_export' "
                                  "LIMIT 1").fetchone()[0]
        observer.execute("SELECT pg_terminate_backend(%s)", [worker])
        thread.join(timeout=60)
        conn.close()
        error = result.get("error")
        assert isinstance(error, psycopg.errors.AdminShutdown), result
        assert "partition" in str(error) and "terminating" in str(error)
        wait_until(lambda: workers_running(observer) == 0, timeout=10)
    assert list(server_dir.iterdir()) == []


def test_a_directory_export_in_use_refuses_a_second_and_both_keep_their_files(scratch, server_dir):
    old = finished_export(scratch, server_dir)
    conn, pid, thread, result = start_directory_export(scratch, server_dir, extra=", overwrite => true")
    with scratch.connect() as c:
        for overwrite in (False, True):
            with pytest.raises(psycopg.errors.DuplicateFile):
                c.execute("SELECT * FROM stream_export_to_directory('SELECT 1 AS id', %s, 'id', 1, overwrite => %s)",
                          [str(server_dir), overwrite])
    # The running export is untouched, and the old one is still whole.
    with scratch.connect() as c:
        ok, *_ , detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)", [str(server_dir)]).fetchone()
        assert ok, detail
    thread.join(timeout=300)
    conn.close()
    assert "value" in result, result
    assert result["value"][3] == BIG_ROWS
    with scratch.connect() as c:
        ok, parts, rows, detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)",
                                            [str(server_dir)]).fetchone()
        assert ok and rows == BIG_ROWS, detail
    manifest = json.loads((server_dir / "manifest.json").read_text())
    # The replaced export's parts are gone; nothing else is there.
    assert sorted(p.name for p in server_dir.iterdir()) == sorted(
        ["manifest.json"] + [p["file"] for p in manifest["parts"]])
    assert not set(old) - {"manifest.json"} & set(p.name for p in server_dir.iterdir())


def test_refused_and_failed_exports_leave_the_previous_export_exactly_as_it_was(scratch, server_dir):
    before = finished_export(scratch, server_dir)
    (server_dir / "notes.txt").write_text("a file of the user's")
    before["notes.txt"] = hashlib.sha256(b"a file of the user's").hexdigest()
    with scratch.connect() as c:
        with pytest.raises(psycopg.errors.DuplicateFile):
            c.execute("SELECT * FROM stream_export_to_directory('SELECT g AS id FROM generate_series(1, 10) g', "
                      "%s, 'id', 2)", [str(server_dir)])
        assert snapshot_of(server_dir) == before
        with pytest.raises(psycopg.errors.DivisionByZero):
            c.execute("SELECT * FROM stream_export_to_directory("
                      "'SELECT g AS id, 1 / (g - 9000) AS boom FROM generate_series(1, 10000) g', %s, 'id', 4, "
                      "overwrite => true)", [str(server_dir)])
        assert snapshot_of(server_dir) == before
        ok, *_, detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)", [str(server_dir)]).fetchone()
        assert ok, detail
    # A successful overwrite replaces the export and only the export.
    after = finished_export(scratch, server_dir, "SELECT g AS id FROM generate_series(1, 777) g", overwrite=True)
    assert after["notes.txt"] == before["notes.txt"]
    assert not (set(before) - {"notes.txt", "manifest.json"}) & set(after)


def test_a_directory_export_in_a_writing_transaction_is_refused(scratch, server_dir):
    with scratch.connect(autocommit=False) as c:
        c.execute("CREATE TEMP TABLE scratch_written (id int)")
        with pytest.raises(psycopg.errors.ActiveSqlTransaction) as err:
            c.execute("SELECT * FROM stream_export_to_directory('big', %s, 'id', 2)", [str(server_dir)])
        assert "commit first" in (err.value.diag.message_hint or "")
    assert list(server_dir.iterdir()) == []


def test_a_directory_swapped_for_a_link_mid_export_is_not_written_through(scratch, server_dir):
    allowed = server_dir / "allowed"
    target = allowed / "export"
    outside = server_dir / "outside"
    for d in (allowed, target, outside):
        d.mkdir()
        shutil.chown(d, "postgres", "postgres")
    conn = scratch.connect()
    conn.execute(f"SET pg_stream_export.allowed_directory = '{allowed}'")
    thread, result = run_in_thread(lambda: conn.execute(
        "SELECT * FROM stream_export_to_directory('big', %s, 'id', 8, workers => 1, compression => 'gzip', "
        "compression_level => 9)", [str(target)]).fetchone())
    wait_until(lambda: any(p.name.startswith("part-") for p in target.iterdir()))
    target.rename(allowed / "moved")
    target.symlink_to(outside)
    thread.join(timeout=300)
    conn.close()
    assert isinstance(result.get("error"), psycopg.errors.InsufficientPrivilege), result
    assert "replaced or removed during the export" in str(result["error"])
    assert list(outside.iterdir()) == []
    assert list((allowed / "moved").iterdir()) == []


def test_a_nologin_role_gets_the_workers_real_error(scratch, server_dir):
    with scratch.connect() as c:
        c.execute("DROP ROLE IF EXISTS dir_exporter; DROP ROLE IF EXISTS dir_nologin")
        c.execute("CREATE ROLE dir_exporter LOGIN; GRANT pg_write_server_files TO dir_exporter; "
                  "CREATE ROLE dir_nologin NOLOGIN; GRANT pg_write_server_files TO dir_nologin; "
                  "GRANT dir_nologin TO dir_exporter")
    with psycopg.connect(scratch.dsn(user="dir_exporter"), autocommit=True) as c:
        # SET ROLE to a NOLOGIN role works: the workers act as the session does.
        c.execute("SET ROLE dir_nologin")
        rows = c.execute("SELECT rows FROM stream_export_to_directory("
                         "'SELECT g AS id FROM generate_series(1, 100) g', %s, 'id', 2)",
                         [str(server_dir)]).fetchone()[0]
        assert rows == 100
        c.execute("RESET ROLE")
        with scratch.connect() as admin:
            admin.execute("ALTER ROLE dir_exporter NOLOGIN")
        try:
            with pytest.raises(psycopg.Error) as err:
                c.execute("SELECT * FROM stream_export_to_directory("
                          "'SELECT g AS id FROM generate_series(1, 100) g', %s, 'id', 2, overwrite => true)",
                          [str(server_dir)])
            assert err.value.sqlstate == "28000", err.value
            assert "not permitted to log in" in str(err.value)
        finally:
            with scratch.connect() as admin:
                admin.execute("ALTER ROLE dir_exporter LOGIN")


# --- verify on hostile files -------------------------------------------------

@pytest.mark.parametrize("path", ["/dev/zero", "/dev/null", "fifo", "directory"])
def test_verify_refuses_files_that_are_not_regular_without_blocking(conn, server_dir, path):
    if path == "fifo":
        path = str(server_dir / "fifo")
        os.mkfifo(path)
        os.chmod(path, 0o644)
    elif path == "directory":
        path = str(server_dir)
    conn.execute("SET statement_timeout = '10s'")
    with pytest.raises(psycopg.errors.WrongObjectType):
        conn.execute("SELECT * FROM stream_export_verify(%s)", [path])


@pytest.fixture
def huge_sparse_file(server_dir):
    path = server_dir / "zeros.ndjson"
    with open(path, "wb") as f:
        f.truncate(64 << 30)  # 64 GiB of zeros, no newline, no disk used
    os.chmod(path, 0o644)
    return path


@pytest.mark.parametrize("stop", ["cancel", "statement_timeout"])
def test_verify_of_an_endless_line_is_flat_and_stops_on_request(server, huge_sparse_file, stop):
    with server.connect() as checker, server.connect() as observer:
        pid = checker.info.backend_pid
        if stop == "statement_timeout":
            checker.execute("SET statement_timeout = '2s'")
        idle = rss_anon_kib(pid)
        with PeakSampler(pid) as sampler:
            thread, result = run_in_thread(lambda: checker.execute(
                "SELECT * FROM stream_export_verify(%s)", [str(huge_sparse_file)]).fetchone())
            wait_until(lambda: active_query_pid(observer, "%stream_export_verify%") == pid)
            time.sleep(2)
            asked = time.monotonic()
            if stop == "cancel":
                observer.execute("SELECT pg_cancel_backend(%s)", [pid])
            thread.join(timeout=30)
            stopped = time.monotonic() - asked
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert stopped < 2.5
        assert sampler.peak - idle < 64 * 1024, (idle, sampler.peak)
        assert checker.execute("SELECT 1").fetchone() == (1,)


def test_verify_reports_a_long_file_without_newline_as_cut_off(conn, server_dir):
    path = server_dir / "long.ndjson"
    with open(path, "wb") as f:
        f.write(b"x" * (80 << 20))
    os.chmod(path, 0o644)
    ok, rows, nbytes, crc, detail = conn.execute("SELECT * FROM stream_export_verify(%s)", [str(path)]).fetchone()
    assert not ok and "cut off" in detail


def test_allowed_directory_limits_writes_not_verification(scratch, server_dir):
    finished_export(scratch, server_dir)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    part = server_dir / manifest["parts"][0]["file"]
    with scratch.connect() as c:
        c.execute("SET pg_stream_export.allowed_directory = '/nonexistent-allowed'")
        ok, *_, detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)", [str(server_dir)]).fetchone()
        assert ok, detail
        assert c.execute("SELECT ok FROM stream_export_verify(%s)", [str(part)]).fetchone() == (True,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            c.execute("SELECT * FROM stream_export_to_directory('SELECT 1 AS id', %s, 'id', 1, overwrite => true)",
                      [str(server_dir)])
