"""make bench-memory: backend peak private memory of exports of 1M and
10M rows, next to the idle backend, so flat memory is visible at a glance."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import psycopg

from run import Sampler, rss_anon_kib

MAKE_EVENTS = Path(__file__).resolve().parent / "make_events.sql"


def load(dsn: str, rows: int) -> None:
    subprocess.run(
        ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"N={rows}", "-d", dsn, "-f", str(MAKE_EVENTS)],
        check=True, stdout=subprocess.DEVNULL, env={"PGOPTIONS": "-c TimeZone=UTC", "PATH": "/usr/bin:/bin"},
    )


def measure(dsn: str, sql: str, stream: bool) -> tuple[int, int]:
    with psycopg.connect(dsn, autocommit=True) as c:
        pid = c.info.backend_pid
        c.execute("SELECT count(*) FROM (SELECT stream_export_bytes('SELECT 1 AS x', compression => 'gzip')) s")
        idle = rss_anon_kib(pid)
        sampler = Sampler(lambda: pid)
        if stream:
            with c.cursor(binary=True) as cur:
                for _ in cur.stream(sql):
                    pass
        else:
            c.execute(sql)
        return idle, sampler.finish()


def time_to_first_row(dsn: str) -> float:
    """Seconds from sending `SELECT stream_export('events')` to its first row."""
    import time

    with psycopg.connect(dsn, autocommit=True) as c:
        c.execute("SELECT count(*) FROM (SELECT stream_export('SELECT 1 AS x')) s")  # library loaded
        with c.cursor() as cur:
            start = time.perf_counter()
            stream = cur.stream("SELECT stream_export('events')")
            next(stream)
            elapsed = time.perf_counter() - start
            stream.close()
        return elapsed


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--server-dir", required=True)
    args = parser.parse_args()
    out = f"{args.server_dir}/memory.ndjson"
    cases = [
        ("stream_export_to_file, plain", f"SELECT * FROM stream_export_to_file('events', '{out}', overwrite => true)", False),
        ("stream_export_to_file, gzip", f"SELECT * FROM stream_export_to_file('events', '{out}.gz', compression => 'gzip', overwrite => true)", False),
        ("stream_export_to_file, zstd", f"SELECT * FROM stream_export_to_file('events', '{out}.zst', compression => 'zstd', overwrite => true)", False),
        ("stream_export_bytes, read by a client", "SELECT stream_export_bytes('events')", True),
        ("stream_export_bytes, zstd, read by a client", "SELECT stream_export_bytes('events', compression => 'zstd')", True),
        ("stream_export, read by a client", "SELECT stream_export('events')", True),
        ("stream_export with key => 'id'", "SELECT stream_export('events', key => 'id')", True),
        ("stream_export_to_file, plain, to S3 (local moto)",
         "SELECT * FROM stream_export_to_file('events', 's3://bench/memory.ndjson', overwrite => true)", False),
        ("stream_export_to_file, gzip, to S3 (local moto)",
         "SELECT * FROM stream_export_to_file('events', 's3://bench/memory.ndjson.gz', compression => 'gzip', "
         "overwrite => true)", False),
        ("stream_export_to_file, zstd, to S3 (local moto)",
         "SELECT * FROM stream_export_to_file('events', 's3://bench/memory.ndjson.zst', compression => 'zstd', "
         "overwrite => true)", False),
        # 10 and 100 chunks: what each chunk allocates must go with it.
        ("CALL stream_export_chunked, 100,000-row chunks",
         f"CALL stream_export_chunked('events', '{args.server_dir}/chunked', 'id', chunk_rows => 100000, "
         "overwrite => true)", False),
    ]
    rows_list = [1_000_000, 10_000_000]
    results = {}
    for rows in rows_list:
        print(f"loading {rows:,} rows ...", flush=True)
        load(args.dsn, rows)
        for label, sql, stream in cases:
            idle, peak = measure(args.dsn, sql, stream)
            results[(label, rows)] = (idle, peak)
            print(f"  {label:40s} idle {idle / 1024:6.1f} MiB  peak {peak / 1024:6.1f} MiB", flush=True)
    print()
    print("| export | idle backend | peak at 1M rows | peak at 10M rows | growth at 10M |")
    print("|---|---:|---:|---:|---:|")
    # Object storage holds a few upload parts in memory: its own target.
    worst = {False: 0, True: 0}
    for label, _, _ in cases:
        idle, p1 = results[(label, rows_list[0])]
        idle10, p10 = results[(label, rows_list[1])]
        growth = p10 - idle10
        to_store = "to S3" in label
        worst[to_store] = max(worst[to_store], growth)
        print(f"| {label} | {idle / 1024:.1f} MiB | {p1 / 1024:.1f} MiB | {p10 / 1024:.1f} MiB | {growth / 1024:.1f} MiB |")
    print(f"\nlargest growth over the idle backend: {worst[False] / 1024:.1f} MiB (target < 32 MiB); "
          f"to object storage: {worst[True] / 1024:.1f} MiB (target < 64 MiB)")
    firsts = sorted(time_to_first_row(args.dsn) for _ in range(5))
    print(f"time to first row of SELECT stream_export('events') on {rows_list[-1]:,} rows: "
          f"median {firsts[2] * 1000:.1f} ms (target < 50 ms)")
    return 0 if worst[False] < 32 * 1024 and worst[True] < 64 * 1024 else 1


if __name__ == "__main__":
    sys.exit(main())
