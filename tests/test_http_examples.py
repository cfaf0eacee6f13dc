"""The HTTP examples (examples/node-http, examples/python-http) end to end:
each server is started against the test cluster, read with curl and with a
client that hangs up, and its memory is watched while it streams."""

from __future__ import annotations

import gzip
import json
import os
import shlex
import socket
import subprocess
import time

import psycopg
import pytest

from conftest import REPO, _free_port
from helpers import proc_status_kib, wait_until, zstd_decompress

EXAMPLES = REPO / "examples"


class ExampleServer:
    def __init__(self, kind: str, server, source: str):
        self.port = _free_port()
        # COPY ... (FORMAT ndjson) needs the library loaded in the session:
        # shared_preload_libraries on a real server, PGOPTIONS here.
        env = dict(os.environ, PGHOST="127.0.0.1", PGPORT=str(server.port), PGDATABASE="e2e",
                   PGUSER="postgres", PGOPTIONS="-c session_preload_libraries=pg_stream_export",
                   PORT=str(self.port), EXPORT_SOURCE=source, EXPORT_KEY="id")
        if kind == "node":
            # As `npm start` runs it, but without npm in between (its pid is node's).
            cwd = EXAMPLES / "node-http"
            command = shlex.split(json.loads((cwd / "package.json").read_text())["scripts"]["start"])
        else:
            venv = EXAMPLES / "python-http" / ".venv" / "bin"
            command = [str(venv / "uvicorn"), "app:app", "--host", "127.0.0.1", "--port", str(self.port),
                       "--no-access-log"]
            cwd = EXAMPLES / "python-http"
        self.process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE)
        wait_until(self._accepts, timeout=30)

    def _accepts(self) -> bool:
        if self.process.poll() is not None:
            raise AssertionError(f"the example server exited: {self.process.stderr.read().decode()}")
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def url(self, query: str = "") -> str:
        return f"http://127.0.0.1:{self.port}/export{query}"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(params=["node", "python"])
def kind(request):
    return request.param


def curl(url: str, *extra: str, compressed: bool = True) -> subprocess.CompletedProcess:
    """curl, as a user runs it: --compressed (it then asks for zstd, gzip and
    more, and decodes), or without it, the body as sent."""
    return subprocess.run(["curl", "-sS", "--fail", *(["--compressed"] if compressed else []), "-D", "-",
                           *extra, url], capture_output=True, check=False, timeout=300)


def split_raw(raw: bytes) -> tuple[dict, bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    headers = {}
    for line in head.decode().split("\r\n")[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return headers, body


def split_response(raw: bytes) -> tuple[dict, list[str]]:
    headers, body = split_raw(raw)
    return headers, body.decode().splitlines()


# (Accept-Encoding, the Content-Encoding the examples answer with).
NEGOTIATION = [
    (None, "gzip"),
    ("gzip", "gzip"),
    ("zstd", "zstd"),
    ("gzip, deflate, br, zstd", "zstd"),
    ("zstd;q=0.5, gzip", "gzip"),
    ("gzip;q=0.8, zstd", "zstd"),
    ("zstd;q=0, gzip", "gzip"),
    ("*", "zstd"),
    ("br", "gzip"),
]


def test_the_encoding_follows_accept_encoding(server, conn, kind):
    conn.execute("DROP TABLE IF EXISTS http_tiny")
    conn.execute("CREATE TABLE http_tiny (id int PRIMARY KEY, t text)")
    conn.execute("INSERT INTO http_tiny SELECT g, md5(g::text) FROM generate_series(1, 1000) g")
    want = export_lines(conn, "SELECT stream_export('http_tiny', key => 'id', profile => 'javascript')")
    example = ExampleServer(kind, server, "http_tiny")
    try:
        for accept, encoding in NEGOTIATION:
            result = curl(example.url(), *(["-H", f"Accept-Encoding: {accept}"] if accept else []),
                          compressed=False)
            assert result.returncode == 0, result.stderr
            headers, body = split_raw(result.stdout)
            assert headers["content-encoding"] == encoding, (accept, headers)
            assert headers["vary"] == "Accept-Encoding"
            text = gzip.decompress(body) if encoding == "gzip" else zstd_decompress(body)
            assert text.decode().splitlines()[:-1] == want, accept
    finally:
        example.stop()


def export_lines(conn, sql: str, params=()) -> list[str]:
    return [r[0] for r in conn.execute(sql, params)]


def test_curl_gets_the_javascript_profile_export(server, conn, events_small, kind):
    example = ExampleServer(kind, server, events_small)
    try:
        result = curl(example.url())
        # No Accept-Encoding at all: gzip, the default.
        plain_curl = curl(example.url(), compressed=False)
    finally:
        example.stop()
    assert result.returncode == 0, result.stderr
    headers, lines = split_response(result.stdout)
    assert headers["content-type"] == "application/x-ndjson"
    # curl --compressed accepts zstd and gzip alike: zstd.
    assert headers["content-encoding"] == "zstd" and headers["vary"] == "Accept-Encoding"
    assert plain_curl.returncode == 0, plain_curl.stderr
    gzip_headers, gzip_body = split_raw(plain_curl.stdout)
    assert gzip_headers["content-encoding"] == "gzip"
    assert gzip.decompress(gzip_body).decode().splitlines()[:-1] == lines[:-1]
    want = export_lines(conn, "SELECT stream_export(%s, key => 'id', footer => true, profile => 'javascript')",
                        [events_small])
    assert len(lines) == len(want) == 500_001
    assert lines[:-1] == want[:-1]
    # The footer covers the same rows; its token names the COPY's source.
    got_footer, want_footer = json.loads(lines[-1])["_stream_export"], json.loads(want[-1])["_stream_export"]
    assert {k: got_footer[k] for k in ("rows", "bytes", "crc32")} == {
        k: want_footer[k] for k in ("rows", "bytes", "crc32")}
    assert got_footer["resume_token"]


def test_a_resumed_request_continues_after_the_token(server, conn, events_small, kind):
    # A token after key 250000, as the footer of an export that stopped there gives it.
    conn.execute("LOAD 'pg_stream_export'")
    with conn.cursor() as cur:
        with cur.copy(f"COPY {events_small} TO STDOUT (FORMAT ndjson, KEY 'id', KEY_TO '250001', FOOTER, "
                      "PROFILE 'javascript')") as copy:
            first = b"".join(bytes(block) for block in copy).decode().splitlines()
    token = json.loads(first[-1])["_stream_export"]["resume_token"]
    example = ExampleServer(kind, server, events_small)
    try:
        result = curl(example.url("?after=" + token))
        bad = curl(example.url("?after=not-a-token"), "-o", "/dev/null", "-w", "%{http_code}")
    finally:
        example.stop()
    assert result.returncode == 0, result.stderr
    _, lines = split_response(result.stdout)
    want = export_lines(conn, "SELECT stream_export(%s, key => 'id', profile => 'javascript')",
                        [f"SELECT * FROM {events_small} WHERE id > 250000"])
    assert lines[:-1] == want
    assert [json.loads(line)["id"] for line in first[:-1]][-1] == "250000"
    assert json.loads(lines[0])["id"] == "250001"
    assert bad.stdout.decode().endswith("400")


def test_resume_from_the_last_line_a_client_received(server, conn, events_small, kind):
    # The README's resume flow: a client whose stream broke after some line
    # asks stream_export_resume_token for that line's token and passes it on.
    example = ExampleServer(kind, server, events_small)
    try:
        first = curl(example.url())
        assert first.returncode == 0, first.stderr
        _, lines = split_response(first.stdout)
        last_line = lines[123_456]
        token = conn.execute("SELECT stream_export_resume_token(%s, 'id', %s)",
                             [events_small, last_line]).fetchone()[0]
        result = curl(example.url("?after=" + token))
    finally:
        example.stop()
    assert result.returncode == 0, result.stderr
    _, rest = split_response(result.stdout)
    # Appended to what the client had, the rest is the whole export.
    assert lines[:123_457] + rest[:-1] == lines[:-1]


def exporting_backends(conn, source: str) -> list:
    return conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE %s AND pid <> pg_backend_pid()",
        [f"COPY%{source}%"]).fetchall()


def test_a_client_that_hangs_up_stops_the_export(server, conn, events_big, kind):
    example = ExampleServer(kind, server, events_big)
    try:
        with socket.create_connection(("127.0.0.1", example.port)) as sock:
            sock.sendall(f"GET /export HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n".encode())
            received = 0
            while received < 1 << 20:
                block = sock.recv(65536)
                assert block, "the response ended early"
                received += len(block)
            assert exporting_backends(conn, events_big)  # the export is running
        # Hung up: within a few seconds no backend is exporting any more.
        started = time.monotonic()
        wait_until(lambda: not exporting_backends(conn, events_big), timeout=10)
        assert time.monotonic() - started < 10
        assert example.process.poll() is None  # the server itself carries on
    finally:
        example.stop()


def test_the_server_stays_flat_while_streaming_millions_of_rows(server, conn, events_big, kind):
    example = ExampleServer(kind, server, events_big)
    try:
        result = subprocess.run(["curl", "-sS", "--fail", "-o", "/dev/null", "-w", "%{size_download}",
                                 example.url()], capture_output=True, timeout=600)
        assert result.returncode == 0, result.stderr
        peak = proc_status_kib(example.process.pid, "VmHWM")  # peak resident set
    finally:
        example.stop()
    assert int(result.stdout) > 100 << 20  # the whole 5M-row export went through
    assert peak < 100 * 1024, f"peak RSS {peak / 1024:.1f} MiB"
