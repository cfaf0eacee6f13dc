"""A store in front of a real one that holds a chosen request: how the
tests put a cancel at each step of an export's conversation with the
store."""

from __future__ import annotations

import http.client
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from helpers import run_in_thread


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
        self.refuse_deletes: str | None = None
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
                if proxy.refuse_deletes and self.command == "DELETE" and proxy.refuse_deletes in self.path:
                    return self._answer(503, [], b"<Error><Code>SlowDown</Code></Error>")
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
              late: bool = False, refuse_deletes: str | None = None) -> None:
        """Start counting requests again, with what to hold; with
        `refuse_deletes`, every DELETE of a path containing it is answered
        503 without reaching the store."""
        with self.lock:
            self.refuse_deletes = refuse_deletes
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


def cancelled_while_held(server, proxy: HoldingProxy, sql: str, params: list, *, late: bool = False,
                         **hold) -> tuple[dict, bool]:
    """Run `sql` on a connection of its own with the request `hold` names
    held (`hold_at`, `hold_suffix`, `refuse`: see `HoldingProxy.reset`),
    cancel the backend while it is held, and let the store answer 0.5 s
    later (a delay of the workload, not a synchronisation: a slower signal
    only makes the case weaker, never wrong). Returns (the call's result:
    its rows, or None, or its error; whether the request was held); with
    `late`, only once the store answered the held request."""
    proxy.reset(late=late, **hold)
    conn = server.connect()
    pid = conn.info.backend_pid

    def call():
        cursor = conn.execute(sql, params)
        return cursor.fetchall() if cursor.description else None

    thread, result = run_in_thread(call)
    was_held = False
    while thread.is_alive() and not was_held:
        was_held = proxy.held.wait(0.05)
    was_held = was_held or proxy.held.is_set()
    timer = None
    if was_held:
        with server.connect() as other:
            other.execute("SELECT pg_cancel_backend(%s)", [pid])
        timer = threading.Timer(0.5, proxy.release.set)
        timer.start()
    thread.join(120)
    assert not thread.is_alive()
    if timer is not None:
        timer.cancel()
    proxy.release.set()
    if was_held and late:
        assert proxy.forwarded.wait(60)
    conn.close()
    return result, was_held
