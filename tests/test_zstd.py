"""compression => 'zstd' through every entry point: the decompressed output
is byte for byte the plain export, the zstd tool and DuckDB read it,
damage is found by the verifiers, and bad levels are refused with 22023."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import duckdb
import pytest
from psycopg import errors

from helpers import copy_out, function_bytes, zstd_decompress

PRELOAD = "-c session_preload_libraries=pg_stream_export"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"


def copied(conn, statement: str) -> bytes:
    """The bytes of a COPY ... TO STDOUT (FORMAT ndjson), library loaded."""
    conn.execute("LOAD 'pg_stream_export'")
    return copy_out(conn, statement)[0]


def zstd_test(path: Path) -> None:
    """`zstd -t`: every frame decodes and its checksum holds."""
    subprocess.run(["zstd", "-t", "-q", str(path)], check=True)


def expected_lines(conn, source: str) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT row_to_json(e)::text FROM {source} e ORDER BY id")]


def test_bytes_round_trip_to_the_plain_export(conn, events_small, tmp_path):
    plain = function_bytes(conn, events_small, footer=True)
    packed = function_bytes(conn, events_small, footer=True, compression="zstd")
    assert packed.startswith(ZSTD_MAGIC)
    assert len(packed) < len(plain) / 4
    assert zstd_decompress(packed) == plain
    # Several frames (one a block, compressed on helper threads), each one
    # checked by the zstd tool, and by zstdcat as one stream.
    assert packed.count(ZSTD_MAGIC) > 1
    path = tmp_path / "events.ndjson.zst"
    path.write_bytes(packed)
    zstd_test(path)
    assert subprocess.run(["zstdcat", str(path)], check=True, capture_output=True).stdout == plain
    # The default level is 3: the same bytes as asking for it.
    assert function_bytes(conn, events_small, footer=True, compression="zstd", compression_level=3) == packed


def test_the_level_is_applied(conn, events_small):
    source = f"SELECT * FROM {events_small} WHERE id <= 20000 ORDER BY id"
    plain = function_bytes(conn, source)
    fast = function_bytes(conn, source, compression="zstd", compression_level=1)
    small = function_bytes(conn, source, compression="zstd", compression_level=15)
    assert zstd_decompress(fast) == zstd_decompress(small) == plain
    assert len(small) < len(fast)


def test_an_empty_export_is_a_valid_zstd_stream(conn, tmp_path):
    packed = function_bytes(conn, "SELECT 1 AS x WHERE false", compression="zstd")
    assert packed.startswith(ZSTD_MAGIC) and zstd_decompress(packed) == b""


def test_file_export_round_trip_and_verify(conn, events_small, server_dir):
    plain_path, zst_path = server_dir / "e.ndjson", server_dir / "e.ndjson.zst"
    plain_row = conn.execute("SELECT rows, bytes, crc32 FROM stream_export_to_file(%s, %s, footer => true)",
                             [events_small, str(plain_path)]).fetchone()
    row = conn.execute("SELECT rows, bytes, file_bytes, crc32 FROM stream_export_to_file(%s, %s, "
                       "compression => 'zstd', footer => true)", [events_small, str(zst_path)]).fetchone()
    data = zst_path.read_bytes()
    assert (row[0], row[1], row[3]) == plain_row and row[2] == len(data)
    zstd_test(zst_path)
    assert zstd_decompress(data) == plain_path.read_bytes()
    assert data == function_bytes(conn, events_small, footer=True, compression="zstd")
    ok, rows, _, crc, detail = conn.execute("SELECT * FROM stream_export_verify(%s)", [str(zst_path)]).fetchone()
    assert ok and rows == 500_000 and crc == row[3], detail


def test_verify_finds_a_damaged_or_truncated_zstd_file(conn, events_small, server_dir):
    good = server_dir / "good.ndjson.zst"
    conn.execute("SELECT stream_export_to_file(%s, %s, compression => 'zstd', footer => true)",
                 [events_small, str(good)])
    data = good.read_bytes()
    cases = {
        "flipped.ndjson.zst": data[:len(data) // 2] + bytes([data[len(data) // 2] ^ 0x40]) + data[len(data) // 2 + 1:],
        "truncated.ndjson.zst": data[:-1000],
        "cut-at-a-frame.ndjson.zst": data[:data.rindex(ZSTD_MAGIC)],  # whole frames, the footer's gone
        "garbage-after.ndjson.zst": data + b"not zstd",
    }
    for name, damaged in cases.items():
        path = server_dir / name
        path.write_bytes(damaged)
        ok, _, _, _, detail = conn.execute("SELECT * FROM stream_export_verify(%s)", [str(path)]).fetchone()
        assert not ok and detail, (name, detail)
    ok, _, _, _, detail = conn.execute("SELECT * FROM stream_export_verify(%s)", [str(good)]).fetchone()
    assert ok, detail


def test_copy_to_stdout_and_to_a_file(server, conn, events_small, server_dir, tmp_path):
    expected = function_bytes(conn, events_small, footer=True, compression="zstd", compression_level=5)
    assert copied(conn, f"COPY {events_small} TO STDOUT WITH (FORMAT ndjson, COMPRESSION zstd, "
                          "COMPRESSION_LEVEL 5, FOOTER true)") == expected
    target = server_dir / "copy.ndjson.zst"
    conn.execute(f"COPY {events_small} TO '{target}' WITH (FORMAT ndjson, COMPRESSION zstd, FOOTER true)")
    assert target.read_bytes() == function_bytes(conn, events_small, footer=True, compression="zstd")
    # psql's \copy writes what COPY TO STDOUT sends: a file the zstd tool reads.
    client_file = tmp_path / "client.ndjson.zst"
    query = f"SELECT * FROM {events_small} WHERE id % 3 = 0"
    server.psql("-c", f"\\copy ({query}) TO '{client_file}' WITH (FORMAT ndjson, COMPRESSION zstd)",
                options=PRELOAD)
    zstd_test(client_file)
    assert zstd_decompress(client_file.read_bytes()) == function_bytes(conn, query)


def parts_of(directory: Path) -> list[Path]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return [directory / p["file"] for p in manifest["parts"]]


def test_directory_export_is_read_by_duckdb(conn, events_small, server_dir):
    row = conn.execute("SELECT partitions, rows FROM stream_export_to_directory(%s, %s, 'id', 3, "
                       "compression => 'zstd')", [events_small, str(server_dir)]).fetchone()
    assert row == (3, 500_000)
    parts = parts_of(server_dir)
    assert all(p.name.endswith(".ndjson.zst") for p in parts), parts
    lines = []
    for part in parts:
        zstd_test(part)
        part_text = zstd_decompress(part.read_bytes()).decode().splitlines()
        assert part_text[-1].startswith('{"_stream_export":')
        lines += part_text[:-1]
    assert lines == expected_lines(conn, events_small)
    assert conn.execute("SELECT ok, parts, rows FROM stream_export_verify_manifest(%s)",
                        [str(server_dir)]).fetchone() == (True, 3, 500_000)
    # DuckDB reads the parts as zstd NDJSON (by their .zst name); the footer
    # lines have no id.
    want = conn.execute(f"SELECT count(*), sum(id), min(id), max(id) FROM {events_small}").fetchone()
    files = ", ".join(f"'{p}'" for p in parts)
    with duckdb.connect() as db:
        got = db.execute(f"SELECT count(id), sum(id), min(id), max(id) FROM read_json([{files}], "
                         "format = 'newline_delimited')").fetchone()
    assert tuple(int(v) for v in got) == tuple(int(v) for v in want)
    # A damaged part makes the manifest check fail and names the part.
    victim = parts[1]
    victim.write_bytes(victim.read_bytes()[:-200])
    ok, _, _, detail = conn.execute("SELECT * FROM stream_export_verify_manifest(%s)",
                                    [str(server_dir)]).fetchone()
    assert not ok and victim.name in detail, detail


def test_chunked_export_with_zstd(conn, events_small, server_dir):
    conn.execute("CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 200000, compression => 'zstd')",
                 [events_small, str(server_dir)])
    parts = parts_of(server_dir)
    assert len(parts) == 3 and all(p.name.endswith(".ndjson.zst") for p in parts), parts
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert manifest["compression"] == "zstd", manifest
    lines = []
    for part in parts:
        lines += zstd_decompress(part.read_bytes()).decode().splitlines()[:-1]
    assert lines == expected_lines(conn, events_small)
    assert conn.execute("SELECT ok, rows FROM stream_export_verify_manifest(%s)",
                        [str(server_dir)]).fetchone() == (True, 500_000)


BAD_LEVELS = [0, 20, 22, -1]


@pytest.mark.parametrize("level", BAD_LEVELS)
def test_bad_levels_are_refused_everywhere(conn, server_dir, level):
    calls = [
        ("SELECT stream_export_bytes('SELECT 1', compression => 'zstd', compression_level => %s)", [level]),
        ("SELECT stream_export_to_file('SELECT 1', %s, compression => 'zstd', compression_level => %s)",
         [str(server_dir / "x.ndjson.zst"), level]),
        ("SELECT stream_export_to_directory('SELECT 1 AS id', %s, 'id', 1, compression => 'zstd', "
         "compression_level => %s)", [str(server_dir / "d"), level]),
        ("CALL stream_export_chunked('SELECT 1 AS id', %s, 'id', compression => 'zstd', "
         "compression_level => %s)", [str(server_dir / "c"), level]),
    ]
    for sql, params in calls:
        with pytest.raises(errors.InvalidParameterValue) as raised:
            conn.execute(sql, params)
        assert "between 1 and 19" in (raised.value.diag.message_hint or ""), raised.value
    with pytest.raises(errors.InvalidParameterValue):
        copied(conn, f"COPY (SELECT 1) TO STDOUT WITH (FORMAT ndjson, COMPRESSION zstd, "
                       f"COMPRESSION_LEVEL {level})")
    assert list(server_dir.iterdir()) == []


def test_gzip_levels_stay_gzip_levels(conn):
    # 10 is a zstd level but not a gzip one; the codec names its own range.
    with pytest.raises(errors.InvalidParameterValue) as raised:
        conn.execute("SELECT stream_export_bytes('SELECT 1', compression => 'gzip', compression_level => 10)")
    assert "between 0 and 9" in (raised.value.diag.message_hint or ""), raised.value
    assert function_bytes(conn, "SELECT 1 AS x", compression="zstd", compression_level=10).startswith(ZSTD_MAGIC)
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT stream_export_bytes('SELECT 1', compression => 'zst')")
