"""Shared helpers for the end-to-end tests."""

from __future__ import annotations

import gzip
import subprocess
import threading
import time
from pathlib import Path

import psycopg


def proc_status_kib(pid: int, field: str) -> int:
    """A memory figure of a process from /proc/<pid>/status, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc status")


def rss_anon_kib(pid: int) -> int:
    """Private anonymous memory of a process (not shared buffers)."""
    return proc_status_kib(pid, "RssAnon")


class PeakSampler:
    """Samples a backend's RssAnon in a thread until stopped; keeps the peak."""

    def __init__(self, pid: int, interval: float = 0.01):
        self.pid = pid
        self.interval = interval
        self.peak = rss_anon_kib(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, rss_anon_kib(self.pid))
            except (FileNotFoundError, ProcessLookupError):
                return
            self._stop.wait(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def wait_until(predicate, timeout: float = 30.0, interval: float = 0.02):
    """Poll `predicate` until it returns something truthy (bounded)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError("condition not reached in time")


def progress_of(conn, pid: int):
    """(tuples, bytes) of a backend's row in pg_stat_progress_copy, or None."""
    return conn.execute(
        "SELECT tuples_processed, bytes_processed FROM pg_stat_progress_copy WHERE pid = %s", [pid]
    ).fetchone()


def run_in_thread(target):
    """Run `target` in a thread; its value or exception lands in the dict."""
    result = {}

    def wrapper():
        try:
            result["value"] = target()
        except Exception as exc:  # noqa: BLE001 - handed back to the test
            result["error"] = exc

    thread = threading.Thread(target=wrapper)
    thread.start()
    return thread, result


def function_bytes(conn, source: str, **options) -> bytes:
    """The whole output of stream_export_bytes with these options."""
    args = "".join(f", {k} => %({k})s" for k in options)
    rows = conn.execute(f"SELECT stream_export_bytes(%(src)s{args})", {"src": source, **options}).fetchall()
    return b"".join(r[0] for r in rows)


def copy_out(conn, statement: str) -> tuple[bytes, int]:
    """A COPY ... TO STDOUT's bytes and row count."""
    with conn.cursor() as cur:
        data = bytearray()
        with cur.copy(statement) as copy:
            for block in copy:
                data += block
        return bytes(data), cur.rowcount


def zstd_decompress(data: bytes) -> bytes:
    """Decompressed with the zstd command-line tool (every frame, checksums
    checked); fails on a damaged or truncated stream."""
    done = subprocess.run(["zstd", "-d", "-c", "-q"], input=data, capture_output=True, check=False)
    if done.returncode != 0:
        raise ValueError(f"zstd -d failed: {done.stderr.decode().strip()}")
    return done.stdout


def part_lines(path: Path) -> list[str]:
    """The record lines of a part file with a footer (gzip, zstd or plain)."""
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        data = gzip.decompress(data)
    elif path.name.endswith(".zst"):
        data = zstd_decompress(data)
    lines = data.decode().splitlines()
    assert lines[-1].startswith('{"_stream_export":')
    return lines[:-1]


def oracle_lines(conn, query: str) -> list[str]:
    """row_to_json(r)::text of every row of `query`, in its order: the
    lines an export of it must give."""
    return [r[0] for r in conn.execute(f"SELECT row_to_json(r)::text FROM ({query}) r").fetchall()]


def sqlstate_of(conn, sql: str, params=None) -> str | None:
    """The SQLSTATE `sql` fails with, or None if it succeeds."""
    try:
        conn.execute(sql, params)
    except psycopg.Error as e:
        return e.sqlstate
    return None


def wait_for_server(srv, timeout: float = 60.0):
    """Wait until the server takes connections again (after a crash and
    restart)."""
    def up():
        try:
            with srv.connect() as c:
                return c.execute("SELECT 1").fetchone()[0] == 1
        except psycopg.OperationalError:
            return False
    wait_until(up, timeout=timeout, interval=0.2)


def listed_part_lines(conn, query: str, params=None) -> list[str]:
    """The record lines of the part files a catalog query lists as (target,
    rows) rows, in its order; each file must hold the rows listed."""
    lines = []
    for target, rows in conn.execute(query, params).fetchall():
        records = part_lines(Path(target))
        assert len(records) == rows, target
        lines += records
    return lines
