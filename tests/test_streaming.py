"""The streaming functions through real clients: gzip streams, first rows
before the last is read, flat memory, cancellation."""

from __future__ import annotations

import gzip
import subprocess
import time

import psycopg
import pytest

from helpers import PeakSampler, progress_of, rss_anon_kib, run_in_thread, wait_until


def plain_bytes(conn, source: str, **options) -> bytes:
    args = "".join(f", {k} => %({k})s" for k in options)
    with conn.cursor() as cur:
        rows = cur.execute(f"SELECT stream_export_bytes(%(src)s{args})", {"src": source, **options}).fetchall()
    return b"".join(r[0] for r in rows)


def test_gzip_stream_reads_back_with_every_gzip_reader(conn, events_small, tmp_path):
    plain = plain_bytes(conn, events_small, footer=True)
    packed = plain_bytes(conn, events_small, footer=True, compression="gzip", compression_level=6)
    assert len(packed) < len(plain) / 4
    assert gzip.decompress(packed) == plain
    path = tmp_path / "events.ndjson.gz"
    path.write_bytes(packed)
    subprocess.run(["gzip", "-t", str(path)], check=True)
    assert subprocess.run(["zcat", str(path)], check=True, capture_output=True).stdout == plain
    # Every line is JSON and the last one is the footer.
    lines = plain.decode().splitlines()
    assert lines[-1].startswith('{"_stream_export":')
    assert len(lines) == 500_001


def test_first_rows_arrive_while_the_backend_is_still_producing(server, events_big):
    with server.connect() as reader, server.connect() as observer:
        pid = reader.info.backend_pid
        with reader.cursor() as cur:
            stream = cur.stream(f"SELECT stream_export('{events_big}')")
            first = next(stream)
            assert first[0].startswith('{"id":')
            # The client holds its first row; the export has not read the
            # table to the end.
            state = observer.execute(
                "SELECT state FROM pg_stat_activity WHERE pid = %s", [pid]
            ).fetchone()[0]
            assert state == "active"
            tuples, _ = progress_of(observer, pid)
            assert 0 < tuples < 5_000_000
            stream.close()
    with server.connect() as c:
        c.execute("BEGIN")
        rows = c.execute(f"SELECT count(*) FROM (SELECT stream_export('{events_big}') LIMIT 10) s").fetchone()[0]
        read = c.execute(
            "SELECT pg_stat_get_xact_tuples_returned(%s::regclass)", [events_big]
        ).fetchone()[0]
        c.execute("COMMIT")
        assert rows == 10
        # LIMIT 10 stops the scan after the first batch, far from 5M rows.
        assert read <= 20_000


def peak_growth_kib(server, sql: str) -> tuple[int, int]:
    with server.connect() as c:
        pid = c.info.backend_pid
        # Warm up: load the library and run each path once on a tiny input.
        c.execute("SELECT count(*) FROM (SELECT stream_export_bytes('SELECT 1 AS x', compression => 'gzip')) s")
        c.execute("SELECT count(*) FROM (SELECT stream_export('SELECT 1 AS x')) s")
        idle = rss_anon_kib(pid)
        total = 0
        with PeakSampler(pid) as sampler:
            with c.cursor() as cur:
                with cur.copy(f"COPY ({sql}) TO STDOUT") as copy:
                    for block in copy:
                        total += len(block)
        return sampler.peak - idle, total


@pytest.mark.parametrize(
    "template",
    [
        "SELECT stream_export('{t}')",
        "SELECT stream_export_bytes('{t}', compression => 'gzip')",
        "SELECT stream_export_bytes('{t}', key => 'id')",
    ],
)
def test_memory_stays_flat_from_500k_to_5m_rows(server, events_small, events_big, template):
    small, small_bytes = peak_growth_kib(server, template.format(t=events_small))
    big, big_bytes = peak_growth_kib(server, template.format(t=events_big))
    assert big_bytes > 9 * small_bytes
    assert big < 32 * 1024, f"peak growth {big} KiB for 5M rows"
    assert big - small < 4 * 1024, f"{small} KiB at 500k rows, {big} KiB at 5M rows"


def test_wide_rows_keep_memory_flat(server):
    with server.connect() as c:
        c.execute("DROP TABLE IF EXISTS wide_rows")
        c.execute(
            "CREATE TABLE wide_rows AS SELECT g AS id, repeat(md5(g::text), 32768) AS body "
            "FROM generate_series(1, 300) g"
        )
    growth, total = peak_growth_kib(server, "SELECT stream_export('wide_rows')")
    assert total > 300 * 1_000_000
    assert growth < 32 * 1024, f"peak growth {growth} KiB with 1 MB rows"


@pytest.mark.parametrize("function", ["stream_export", "stream_export_bytes"])
def test_cancel_stops_a_long_export_promptly(server, events_big, function):
    with server.connect() as worker, server.connect() as observer:
        pid = worker.info.backend_pid

        def export():
            with worker.cursor() as cur:
                with cur.copy(f"COPY (SELECT {function}('{events_big}')) TO STDOUT") as copy:
                    for _ in copy:
                        pass

        thread, result = run_in_thread(export)
        # COPY's own progress counts the function's rows (lines or chunks).
        wait_until(lambda: (progress_of(observer, pid) or (0, 0))[0] > 5)
        cancelled_at = time.monotonic()
        observer.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(timeout=30)
        took = time.monotonic() - cancelled_at
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert result["error"].sqlstate == "57014"
        assert took < 2.0, f"cancel took {took:.2f} s"
        assert worker.execute("SELECT 42").fetchone()[0] == 42


def test_statement_timeout_stops_an_export(server, events_big):
    with server.connect() as c:
        c.execute("SET statement_timeout = '300ms'")
        with pytest.raises(psycopg.errors.QueryCanceled) as err:
            c.execute(f"SELECT count(*) FROM (SELECT stream_export('{events_big}')) s")
        assert err.value.sqlstate == "57014"
        c.execute("RESET statement_timeout")
        assert c.execute("SELECT 1").fetchone()[0] == 1


def test_errors_by_sqlstate_through_a_client(conn):
    cases = [
        ("SELECT stream_export('no_such_table_e2e')", "42P01"),
        ("SELECT stream_export('pg_class', key => 'no_col')", "42703"),
        ("SELECT stream_export_bytes('pg_class', compression => 'brotli')", "22023"),
        ("SELECT stream_export('pg_class', key => 'oid', after => 'garbage')", "22023"),
        ("SELECT stream_export('SELECT 1/(g - 1000) FROM generate_series(1, 5000) g')", "22012"),
    ]
    for sql, state in cases:
        with pytest.raises(psycopg.Error) as err:
            conn.execute(sql).fetchall()
        assert err.value.sqlstate == state, sql
