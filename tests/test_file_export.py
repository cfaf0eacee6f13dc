"""stream_export_to_file end to end: faults, cancel, progress and
concurrent writers."""

from __future__ import annotations

import os
import subprocess
import tempfile
import threading
from pathlib import Path

import psycopg
import pytest

from helpers import progress_of, run_in_thread, wait_until


@pytest.fixture
def tiny_disk():
    """A 2 MiB tmpfs the server can write: writes beyond it fail with ENOSPC."""
    path = Path(tempfile.mkdtemp(prefix="pse-e2e-tiny.", dir="/tmp"))
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0777", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)
        path.rmdir()


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_disk_full_is_53100_and_leaves_nothing(conn, events_small, tiny_disk):
    target = tiny_disk / "events.ndjson"
    with pytest.raises(psycopg.errors.DiskFull) as err:
        conn.execute("SELECT * FROM stream_export_to_file(%s, %s)", [events_small, str(target)])
    assert err.value.sqlstate == "53100"
    assert leftovers(tiny_disk) == []
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_missing_and_unwritable_directories(conn, tmp_path):
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM stream_export_to_file('pg_class', '/no/such/dir/x.ndjson')")
    assert err.value.sqlstate == "58P01"
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o755)  # owned by root: the server cannot write here
    os.chmod(tmp_path, 0o755)
    with pytest.raises(psycopg.Error) as err:
        conn.execute("SELECT * FROM stream_export_to_file('pg_class', %s)", [str(locked / "x.ndjson")])
    assert err.value.sqlstate == "42501"
    assert leftovers(locked) == []
    assert conn.execute("SELECT 1").fetchone()[0] == 1


def test_cancel_halfway_removes_the_partial_file(server, events_big, server_dir):
    target = server_dir / "big.ndjson.gz"
    with server.connect() as worker, server.connect() as observer:
        pid = worker.info.backend_pid
        thread, result = run_in_thread(
            lambda: worker.execute(
                "SELECT * FROM stream_export_to_file(%s, %s, compression => 'gzip')", [events_big, str(target)]
            ).fetchall()
        )
        wait_until(lambda: (progress_of(observer, pid) or (0, 0))[0] > 10_000)
        assert (server_dir / "big.ndjson.gz.partial").exists()
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=60)
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert leftovers(server_dir) == []
        assert worker.execute("SELECT 1").fetchone()[0] == 1


def test_progress_advances_while_exporting(server, events_big, server_dir):
    target = server_dir / "progress.ndjson"
    with server.connect() as worker, server.connect() as observer:
        pid = worker.info.backend_pid
        thread, result = run_in_thread(
            lambda: worker.execute(
                "SELECT rows FROM stream_export_to_file(%s, %s)", [events_big, str(target)]
            ).fetchone()
        )
        seen = []

        def advanced():
            row = observer.execute(
                "SELECT command, type, tuples_processed, bytes_processed FROM pg_stat_progress_copy WHERE pid = %s",
                [pid],
            ).fetchone()
            if row and (not seen or row[2] > seen[-1][2]):
                seen.append(row)
            return len(seen) >= 3 or "value" in result

        wait_until(advanced, timeout=120)
        thread.join(timeout=120)
        assert result.get("value") == (5_000_000,), result
        assert len(seen) >= 2, seen
        # A first sample may be the report as it starts, before the first
        # row is fetched; the samples taken while rows flow must advance.
        running = [s for s in seen if s[2] > 0]
        assert len(running) >= 2, seen
        command, kind, tuples, nbytes = running[-1]
        assert command == "COPY TO" and kind == "FILE"
        assert 0 < running[0][2] < tuples and nbytes > 0


def test_concurrent_exports_each_see_one_snapshot(server, events_small, server_dir):
    stop = threading.Event()

    def writer():
        with server.connect() as c:
            next_id = 10_000_000
            for _ in range(2000):
                if stop.is_set():
                    break
                c.execute(
                    f"INSERT INTO {events_small} SELECT g, now(), 1, 'click', 1, true, NULL, NULL, 'concurrent' "
                    "FROM generate_series(%s, %s) g",
                    [next_id, next_id + 99],
                )
                next_id += 100

    def exporter(i: int):
        with server.connect(autocommit=False) as c:
            c.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            expected = c.execute(f"SELECT count(*) FROM {events_small}").fetchone()[0]
            rows, = c.execute(
                "SELECT rows FROM stream_export_to_file(%s, %s, footer => true)",
                [events_small, str(server_dir / f"part{i}.ndjson")],
            ).fetchone()
            c.commit()
            return expected, rows

    writer_thread = threading.Thread(target=writer)
    writer_thread.start()
    try:
        exports = [run_in_thread(lambda i=i: exporter(i)) for i in range(4)]
        for thread, _ in exports:
            thread.join(timeout=300)
    finally:
        stop.set()
        writer_thread.join()
    counts = []
    for _, result in exports:
        assert "value" in result, result
        expected, rows = result["value"]
        assert rows == expected
        counts.append(rows)
    with server.connect() as c:
        for i in range(4):
            ok, rows, detail = c.execute(
                "SELECT ok, rows, detail FROM stream_export_verify(%s)", [str(server_dir / f"part{i}.ndjson")]
            ).fetchone()
            assert ok, detail
            assert rows == counts[i]
        c.execute(f"DELETE FROM {events_small} WHERE id >= 10000000")


def test_query_error_halfway_leaves_nothing(conn, events_small, server_dir):
    target = server_dir / "fails.ndjson"
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(
            "SELECT * FROM stream_export_to_file(%s, %s)",
            [f"SELECT id, 1 / (id - 250000) AS boom FROM {events_small}", str(target)],
        )
    assert leftovers(server_dir) == []
    assert conn.execute("SELECT 1").fetchone()[0] == 1
