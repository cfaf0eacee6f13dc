"""Connects that hang end in time (issue 38, case 5): a cluster export's
node connects (libpq) and the object store's connects, to a peer that never
completes the TCP handshake, end at pg_stream_export.node_connect_timeout
and object_connect_timeout, and a cancel, statement_timeout,
pg_terminate_backend or fast shutdown ends them within about a second.

The hanging peer is a loopback listener whose accept queue is full
(listen(0) and one connection never accepted): Linux then drops the SYNs of
every further connect, which stays in SYN-SENT as behind a firewall that
drops them. The tests see that a connect is under way in /proc/net/tcp.
"""

from __future__ import annotations

import secrets
import shutil
import socket
import tempfile
import time
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import run_in_thread, sqlstate_of, wait_until
from stores import MotoStore

BUCKET = "bounds"
SECRET = "s3cr3t-" + secrets.token_hex(12)
# The bound above which only superusers may set the connect timeouts.
BOUND = 300


@pytest.fixture(scope="module")
def hanging_port():
    """A loopback port whose connects never complete."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    probe = socket.socket()
    probe.settimeout(0.5)
    try:
        with pytest.raises(socket.timeout):
            probe.connect(("127.0.0.1", port))
    finally:
        probe.close()
    yield port
    filler.close()
    listener.close()


def connecting_to(port: int) -> bool:
    """Whether some socket of this host is in SYN-SENT towards `port`."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            fields = line.split()
            if fields[3] == "02" and int(fields[2].rsplit(":", 1)[1], 16) == port:
                return True
    return False


@pytest.fixture(scope="module")
def aws_dir():
    path = Path(tempfile.mkdtemp(prefix="pse-aws.", dir="/tmp"))
    path.chmod(0o755)
    for name in ("config", "credentials"):
        (path / name).write_text("")
        (path / name).chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def store(aws_dir, hanging_port):
    s = MotoStore(aws_dir, "bounds", "testing", SECRET)
    try:
        s.client().create_bucket(Bucket=BUCKET)
        # The profile whose store hangs on connect.
        (aws_dir / "config").write_text(
            f"[profile hanging]\nregion = us-east-1\nendpoint_url = http://127.0.0.1:{hanging_port}\n"
            "allow_http = true\n")
        (aws_dir / "credentials").write_text(
            f"[hanging]\naws_access_key_id = testing\naws_secret_access_key = {SECRET}\n")
        yield s
    finally:
        s.stop()


def environment(store, aws_dir) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": store.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
    }


def prepare(srv) -> None:
    with srv.connect() as c:
        c.execute("CREATE TABLE src AS SELECT g AS id FROM generate_series(1, 1000) g")
        c.execute("ALTER TABLE src ADD PRIMARY KEY (id)")


@pytest.fixture(scope="module")
def cluster(store, aws_dir):
    srv = start_cluster("pg_stream_export", environment=environment(store, aws_dir))
    try:
        prepare(srv)
        yield srv
    finally:
        log = stop_cluster(srv)
        if crashes_in(log):
            pytest.fail("a backend crashed:\n" + log[-5000:])


def hanging_call(kind: str, port: int, prefix: str) -> tuple[str, str]:
    """The settings and the call whose connect hangs: a cluster export with
    a node at `port`, or an export to the store of the profile `hanging`."""
    if kind == "node":
        return ("", f"SELECT * FROM stream_export_cluster('src', 's3://{BUCKET}/{prefix}/', 'id', "
                    f"nodes => ARRAY['host=127.0.0.1 port={port} dbname=e2e user=postgres'])")
    return ("SET pg_stream_export.object_store_profile = 'hanging'; ",
            f"SELECT * FROM stream_export_to_file('src', 's3://{BUCKET}/{prefix}.ndjson')")


def test_a_node_connect_ends_at_node_connect_timeout(cluster, hanging_port):
    with cluster.connect() as conn:
        conn.execute("SET pg_stream_export.node_connect_timeout = '2s'")
        _, call = hanging_call("node", hanging_port, "node-timeout")
        started = time.monotonic()
        with pytest.raises(errors.SqlclientUnableToEstablishSqlconnection) as raised:
            conn.execute(call)
        took = time.monotonic() - started
        assert 1.9 < took < 4.5, took
        assert "2000 ms" in raised.value.diag.message_primary


def test_an_object_connect_ends_at_object_connect_timeout(cluster, hanging_port):
    """Each connect ends at the timeout; a request tries three times, with
    pauses of 0.4 s and 1.6 s between (README)."""
    with cluster.connect() as conn:
        setup, call = hanging_call("object", hanging_port, "object-timeout")
        conn.execute(setup + "SET pg_stream_export.object_connect_timeout = '1s'")
        started = time.monotonic()
        with pytest.raises(errors.ConnectionFailure) as raised:
            conn.execute(call)
        took = time.monotonic() - started
        assert 2.9 < took < 7.5, took
        assert "timeout" in raised.value.diag.message_primary.lower()


@pytest.mark.parametrize("kind", ["node", "object"])
@pytest.mark.parametrize("stop", ["cancel", "statement_timeout", "terminate"])
def test_a_stop_ends_a_connect_that_hangs(cluster, hanging_port, kind, stop):
    """With the connect timeouts at 10 minutes, a stop ends the wait."""
    setup, call = hanging_call(kind, hanging_port, f"{kind}-{stop}")
    with cluster.connect() as worker, cluster.connect() as observer:
        worker.execute(setup + "SET pg_stream_export.node_connect_timeout = '10min'; "
                       "SET pg_stream_export.object_connect_timeout = '10min'")
        if stop == "statement_timeout":
            worker.execute("SET statement_timeout = '1s'")
        started = time.monotonic()
        thread, result = run_in_thread(lambda: worker.execute(call))
        wait_until(lambda: connecting_to(hanging_port), timeout=10, interval=0.01)
        if stop != "statement_timeout":
            function = "pg_cancel_backend" if stop == "cancel" else "pg_terminate_backend"
            observer.execute(f"SELECT {function}(%s)", [worker.info.backend_pid])
            started = time.monotonic()
        thread.join(30)
        took = time.monotonic() - started
        assert not thread.is_alive()
        expected = errors.AdminShutdown if stop == "terminate" else errors.QueryCanceled
        assert isinstance(result.get("error"), expected), result
        assert took < (2.5 if stop == "statement_timeout" else 1.5), took


@pytest.mark.parametrize("kind", ["node", "object"])
def test_a_fast_shutdown_ends_a_connect_that_hangs(store, aws_dir, hanging_port, kind):
    srv = start_cluster("pg_stream_export", environment=environment(store, aws_dir))
    try:
        prepare(srv)
        setup, call = hanging_call(kind, hanging_port, f"{kind}-shutdown")
        with srv.connect() as worker:
            worker.execute(setup + "SET pg_stream_export.node_connect_timeout = '10min'; "
                           "SET pg_stream_export.object_connect_timeout = '10min'")
            thread, result = run_in_thread(lambda: worker.execute(call))
            wait_until(lambda: connecting_to(hanging_port), timeout=10, interval=0.01)
            started = time.monotonic()
            srv.pg_ctl("-m", "fast", "-t", "20", "-w", "stop")
            took = time.monotonic() - started
            thread.join(30)
            assert not thread.is_alive()
            assert isinstance(result.get("error"), psycopg.OperationalError), result
            assert took < 3, took
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


@pytest.mark.parametrize("setting", ["node_connect_timeout", "object_connect_timeout"])
def test_connect_timeouts_are_bounded_for_non_superusers(cluster, setting):
    name = f"pg_stream_export.{setting}"
    with cluster.connect() as conn:
        conn.execute("DROP ROLE IF EXISTS bounded_role; CREATE ROLE bounded_role LOGIN")
        try:
            conn.execute("SET ROLE bounded_role")
            # Up to the bound, any role.
            conn.execute(f"SET {name} = '{BOUND}s'")
            assert conn.execute(f"SHOW {name}").fetchone() == ("5min",)
            conn.execute(f"SET {name} = '1s'")
            # Above it, 42501, and the value stays.
            for sql in (f"SET {name} = '{BOUND + 1}s'",
                        f"SELECT set_config('{name}', '1h', false)"):
                assert sqlstate_of(conn, sql) == "42501", sql
            assert conn.execute(f"SHOW {name}").fetchone() == ("1s",)
            with pytest.raises(errors.InsufficientPrivilege) as raised:
                conn.execute(f"SET {name} = '1h'")
            assert raised.value.diag.message_hint and "superuser" in raised.value.diag.message_hint
            # Nor through a function's SET clause it owns.
            assert sqlstate_of(conn, f"CREATE FUNCTION bounded_f() RETURNS int LANGUAGE sql "
                                     f"SET {name} = '1h' AS 'SELECT 1'") == "42501"
            conn.execute("RESET ROLE")
            # A superuser may, for itself and for the role.
            conn.execute(f"SET {name} = '1h'")
            assert conn.execute(f"SHOW {name}").fetchone() == ("1h",)
            conn.execute(f"ALTER ROLE bounded_role SET {name} = '1h'")
            with cluster.connect(user="bounded_role") as role_conn:
                assert role_conn.execute(f"SHOW {name}").fetchone() == ("1h",)
            # Values out of range are 22023 for everyone.
            assert sqlstate_of(conn, f"SET {name} = '0'") == "22023"
        finally:
            conn.execute("RESET ROLE")
            conn.execute("DROP FUNCTION IF EXISTS bounded_f()")
            conn.execute("DROP ROLE IF EXISTS bounded_role")
