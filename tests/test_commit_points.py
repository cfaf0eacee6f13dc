"""One commit point per export, and nothing after it that a cancel can undo.

A directory export to an object prefix commits when its `manifest.json` is
in place. A proxy in front of the store holds one request of the export in
turn, and the test cancels the backend while it is held: whatever request
it is, afterwards the prefix holds either the new export, whole and
verified, and the call succeeded, or the old one, whole and verified, and
the call failed. Before the fix, a cancel while the store was answering the
manifest's PUT made the call fail after the manifest was committed, and the
failure's clean-up deleted the parts it lists.
"""

from __future__ import annotations

import http.client
import time
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import run_in_thread
from stores import start_store

BUCKET = "commits"
SECRET = "commit-secret"


class HoldingProxy:
    """A store in front of a real one. Request number `hold_at` (counted
    from `reset`), or the first PUT of a key ending with `hold_suffix`, is
    handed on and its answer held until `release` is set; `held` is set
    while it is held. With `refuse`, the held request and every PUT of a
    key ending with `hold_suffix` are answered 503 instead, without reaching
    the store. With `late`, the held request reaches the store only once
    released (even if its client is gone by then), as a store that has a
    request's whole body stores it a while later; `forwarded` is set once
    the store answered it."""

    def __init__(self, upstream: str):
        self.upstream = urllib.parse.urlsplit(upstream)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str]] = []
        self.hold_at: int | None = None
        self.hold_suffix: str | None = None
        self.refuse = False
        self.late = False
        self.held = threading.Event()
        self.forwarded = threading.Event()
        self.release = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self, status: int, headers, data: bytes):
                try:
                    self._send(status, headers, data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client went away (a late request's)

            def _send(self, status: int, headers, data: bytes):
                self.send_response(status)
                for k, v in headers:
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            def _pass(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    index = len(proxy.requests)
                    proxy.requests.append((self.command, self.path))
                    matches = (proxy.hold_suffix is not None and self.command == "PUT"
                               and self.path.endswith(proxy.hold_suffix))
                    hold = index == proxy.hold_at or (matches and not proxy.held.is_set())
                if proxy.refuse and (hold or matches):
                    if hold:
                        proxy.held.set()
                        proxy.release.wait(60)
                    return self._answer(503, [], b"<Error><Code>SlowDown</Code></Error>")
                late = hold and proxy.late
                if late:
                    proxy.held.set()
                    proxy.release.wait(60)
                up = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                up.request(self.command, self.path, body=body,
                           headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                answer = up.getresponse()
                data = answer.read()
                up.close()
                if late:
                    proxy.forwarded.set()
                elif hold:
                    proxy.held.set()
                    proxy.release.wait(60)
                self._answer(answer.status, answer.getheaders(), data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()

    def reset(self, hold_at: int | None = None, refuse: bool = False, hold_suffix: str | None = None,
              late: bool = False) -> None:
        with self.lock:
            self.requests = []
            self.hold_at = hold_at
            self.hold_suffix = hold_suffix
            self.refuse = refuse
            self.late = late
        self.held.clear()
        self.forwarded.clear()
        self.release.clear()

    def close(self):
        self.release.set()
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    s = start_store("moto", tmp_path_factory.mktemp("store"), "commits", "testing", SECRET)
    try:
        s.client().create_bucket(Bucket=BUCKET)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def proxy(store):
    p = HoldingProxy(store.endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(proxy):
    srv = start_cluster("pg_stream_export", environment={
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": proxy.endpoint,
        "AWS_ALLOW_HTTP": "true",
    })
    try:
        with srv.connect() as c:
            c.execute("""
                CREATE TABLE cp_src (id int PRIMARY KEY, t text);
                INSERT INTO cp_src SELECT g, md5(g::text) FROM generate_series(1, 20000) g;""")
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


def lines_of(conn) -> list[str]:
    return [r[0] for r in conn.execute("SELECT row_to_json(r)::text FROM cp_src r ORDER BY id")]


def exported_lines(store, prefix: str) -> tuple[str, list[str]]:
    """The export id of the manifest under `prefix` and the record lines of
    the parts it lists, in part order."""
    import json
    s3 = store.client()
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}manifest.json")["Body"].read())
    lines: list[str] = []
    for part in manifest["parts"]:
        data = s3.get_object(Bucket=BUCKET, Key=prefix + part["file"])["Body"].read().decode()
        lines += [line for line in data.splitlines() if not line.startswith('{"_stream_export":')]
    return manifest["export_id"], sorted(lines, key=lambda line: int(line.split(",")[0][6:]))


def verified(conn, uri: str) -> bool:
    ok, _, _, detail = conn.execute("SELECT * FROM stream_export_verify_manifest(%s)", [uri]).fetchone()
    assert ok, detail
    return ok


def export_cancelled_at(server, proxy, uri: str, index: int | None, refuse: bool = False,
                        hold_suffix: str | None = None):
    """Run an overwriting directory export with request `index` (or the
    first PUT of a key ending with `hold_suffix`) held, and cancel it while
    the request is held. Returns (result, whether it was held)."""
    proxy.reset(hold_at=index, refuse=refuse, hold_suffix=hold_suffix)
    conn = server.connect()
    pid = conn.info.backend_pid
    thread, result = run_in_thread(lambda: conn.execute(
        "SELECT rows FROM stream_export_to_directory('cp_src', %s, 'id', 2, overwrite => true)",
        [uri]).fetchall())
    was_held = False
    while thread.is_alive() and not was_held:
        was_held = proxy.held.wait(0.05)
    if was_held:
        with server.connect() as other:
            other.execute("SELECT pg_cancel_backend(%s)", [pid])
        # The cancel is signalled; the store answers a little later (a
        # delay of the workload, not a synchronisation: a slower signal
        # only makes the case weaker, never wrong).
        timer = threading.Timer(0.5, proxy.release.set)
        timer.start()
    thread.join(120)
    assert not thread.is_alive()
    if was_held:
        timer.cancel()
    conn.close()
    return result, was_held


def test_a_cancel_while_the_store_answers_the_manifest_put_keeps_the_export(server, proxy, store):
    uri = f"s3://{BUCKET}/manifest-late/"
    with server.connect() as conn:
        expected = lines_of(conn)
    proxy.reset()
    with server.connect() as conn:
        conn.execute("SELECT * FROM stream_export_to_directory('cp_src', %s, 'id', 2)", [uri])
    result, held = export_cancelled_at(server, proxy, uri, None, hold_suffix="/manifest.json")
    assert held
    # Committed, so the call succeeded, and everything it lists is there.
    assert "error" not in result, result
    assert result["value"] == [(20000,)]
    with server.connect() as conn:
        assert verified(conn, uri)
    assert exported_lines(store, "manifest-late/")[1] == expected


def test_a_manifest_put_that_fails_after_a_cancel_leaves_the_old_export_whole(server, proxy, store):
    uri = f"s3://{BUCKET}/manifest-refused/"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("SELECT * FROM stream_export_to_directory('cp_src', %s, 'id', 2)", [uri])
        old_id, old_lines = exported_lines(store, "manifest-refused/")
    with server.connect() as conn:
        conn.execute("UPDATE cp_src SET t = 'changed' WHERE id % 100 = 0")
    try:
        # Every attempt of the manifest's PUT is refused (the store's
        # retries included: each is answered 503 once released).
        result, held = export_cancelled_at(server, proxy, uri, None, refuse=True,
                                           hold_suffix="/manifest.json")
        assert held
        assert "error" in result
        with server.connect() as conn:
            assert verified(conn, uri)
        assert exported_lines(store, "manifest-refused/") == (old_id, old_lines)
    finally:
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = md5(id::text) WHERE id % 100 = 0")


def test_a_cancel_at_any_request_leaves_one_whole_export(server, proxy, store):
    """The old export or the new one, whole, whatever request the cancel
    meets; the call fails exactly when the old one is still there, and
    succeeds exactly when the new one is."""
    uri = f"s3://{BUCKET}/every-step/"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("SELECT * FROM stream_export_to_directory('cp_src', %s, 'id', 2)", [uri])
    index, outcomes = 0, []
    while True:
        with server.connect() as conn:
            before = exported_lines(store, "every-step/")
            conn.execute("UPDATE cp_src SET t = %s WHERE id = 1", [f"step {index}"])
            now = lines_of(conn)
        result, held = export_cancelled_at(server, proxy, uri, index)
        if not held:
            # The export made fewer requests than that: every one was tried.
            assert "error" not in result, (index, result)
            break
        method, path = proxy.requests[index]
        with server.connect() as conn:
            assert verified(conn, uri), (index, method, path)
        after = exported_lines(store, "every-step/")
        if "error" in result:
            assert isinstance(result["error"], psycopg.errors.QueryCanceled), (index, path, result)
            assert after == before, (index, method, path)
        else:
            assert after[1] == now and after[0] != before[0], (index, method, path)
        outcomes.append(("failed" if "error" in result else "committed", method, Path(path).name))
        index += 1
    # Both outcomes were met. Which one a request gets depends on when the
    # cancel lands (the workers' requests run beside the leader), so only
    # the requests of the leader before its first part fail for sure.
    assert {o[0] for o in outcomes} == {"failed", "committed"}, outcomes
    assert [o[0] for o in outcomes[:5]] == ["failed"] * 5, outcomes
    assert outcomes[-1][0] == "committed", outcomes


def test_a_store_that_never_answers_the_manifest_put_holds_a_cancel_back_a_bounded_time(server, proxy, store):
    """The store takes the manifest but its answer never comes: the commit
    waits at most a third of the lease's time to live, then reads the
    manifest back to decide, and the call succeeds."""
    uri = f"s3://{BUCKET}/never-answers/"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("SELECT * FROM stream_export_to_directory('cp_src', %s, 'id', 2)", [uri])
        old_id = exported_lines(store, "never-answers/")[0]
        expected = lines_of(conn)
    proxy.reset(hold_suffix="/manifest.json")
    conn = server.connect()
    conn.execute("SET pg_stream_export.object_lease_ttl = 6")
    pid = conn.info.backend_pid
    thread, result = run_in_thread(lambda: conn.execute(
        "SELECT rows FROM stream_export_to_directory('cp_src', %s, 'id', 2, overwrite => true)", [uri]).fetchall())
    try:
        assert proxy.held.wait(60)
        started = time.monotonic()
        with server.connect() as other:
            other.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(30)
        assert not thread.is_alive(), "a commit the store never answers held the call for 30 s"
        assert time.monotonic() - started < 15
    finally:
        proxy.release.set()
        thread.join(60)
        conn.close()
    assert result.get("value") == [(20000,)], result
    with server.connect() as conn:
        assert verified(conn, uri)
    new_id, lines = exported_lines(store, "never-answers/")
    assert new_id != old_id and lines == expected


def cancel_while_held(server, proxy, sql: str, params: list):
    """Run `sql`, cancel it while the proxy holds its request, and release
    the request only later: after the call ended, or after 3 s while it
    still waits for the store's answer (as it must, when the request is one
    that makes an object appear). Returns the call's result once the store
    answered the held request."""
    conn = server.connect()
    pid = conn.info.backend_pid
    thread, result = run_in_thread(lambda: conn.execute(sql, params).fetchall())
    try:
        assert proxy.held.wait(60)
        with server.connect() as other:
            other.execute("SELECT pg_cancel_backend(%s)", [pid])
        thread.join(3)
    finally:
        proxy.release.set()
        thread.join(120)
        conn.close()
    assert not thread.is_alive()
    assert proxy.forwarded.wait(60)
    return result


def test_a_part_the_store_stores_after_a_cancel_is_not_left_behind(server, proxy, store):
    """The store has a part's whole PUT but stores it only a while later,
    and the export is cancelled meanwhile: the worker waits for the answer
    rather than cutting the request short, so the failure's clean-up finds
    the part and removes it. (A request cut short let the store store the
    part after the clean-up had looked: a part of no export was left.)"""
    prefix = "part-late/"
    proxy.reset(hold_suffix=".ndjson", late=True)
    result = cancel_while_held(
        server, proxy, "SELECT rows FROM stream_export_to_directory('cp_src', %s, 'id', 2)",
        [f"s3://{BUCKET}/{prefix}"])
    assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
    listing = store.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    assert [o["Key"] for o in listing.get("Contents", [])] == []
    assert store.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []) == []


def test_a_cancel_while_the_store_stores_a_single_object_late_keeps_the_export(server, proxy, store):
    """A single-object export's commit point is the PUT of its object: a
    cancel while the store takes it comes too late, and the call succeeds
    with the object in place. (The PUT was cut short, the call failed, and
    the store stored the object afterwards: an export its caller was told
    had failed.)"""
    key = "single-late/cp_src.ndjson"
    proxy.reset(hold_suffix=".ndjson", late=True)
    result = cancel_while_held(
        server, proxy, "SELECT rows, crc32 FROM stream_export_to_file('cp_src', %s, footer => true)", [f"s3://{BUCKET}/{key}"])
    assert "error" not in result, result
    [(rows, crc)] = result["value"]
    assert rows == 20000
    data = store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode()
    with server.connect() as conn:
        assert sorted(data.splitlines()[:-1]) == sorted(lines_of(conn))
        ok = conn.execute("SELECT ok FROM stream_export_verify(%s)", [f"s3://{BUCKET}/{key}"]).fetchone()[0]
    assert ok
    assert f'"crc32":"{crc}"' in data.splitlines()[-1]
