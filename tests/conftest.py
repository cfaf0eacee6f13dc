"""End-to-end harness: one throwaway PostgreSQL cluster per test session (the
version whose binaries PG_BIN names; 15 from Debian by default).

The cluster runs as the `postgres` OS user (PostgreSQL refuses root) in a
fresh directory under /tmp, on a free local port, with the installed
extension created in its own database. It is stopped and removed when the
session ends, also when tests fail. At the end the server log is checked for
backends killed by a signal: a crash fails the run.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psycopg
import pytest

PG_BIN = Path(os.environ.get("PG_BIN", "/usr/lib/postgresql/15/bin"))


def _sharedir() -> Path:
    out = subprocess.run([str(PG_BIN / "pg_config"), "--sharedir"], capture_output=True, text=True, check=True)
    return Path(out.stdout.strip())


# The PostgreSQL 16 build the tests use ships no contrib modules.
HAS_PG_STAT_STATEMENTS = (_sharedir() / "extension" / "pg_stat_statements.control").exists()
# pg_cron is packaged by Debian for its PostgreSQL 15 only.
HAS_PG_CRON = (_sharedir() / "extension" / "pg_cron.control").exists()
REPO = Path(__file__).resolve().parent.parent
DATABASE = "e2e"


def _as_postgres(cmd: list[str]) -> list[str]:
    if os.geteuid() == pwd.getpwnam("postgres").pw_uid:
        return cmd
    return ["sudo", "-u", "postgres", "--", *cmd]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    directory: Path
    port: int
    environment: dict[str, str] = field(default_factory=dict)
    start_options: str = ""

    @property
    def data(self) -> Path:
        return self.directory / "data"

    @property
    def log(self) -> Path:
        return self.directory / "server.log"

    def dsn(self, dbname: str = DATABASE, user: str = "postgres") -> str:
        return f"host=127.0.0.1 port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname: str = DATABASE, **kwargs) -> psycopg.Connection:
        kwargs.setdefault("autocommit", True)
        return psycopg.connect(self.dsn(dbname), **kwargs)

    def psql(self, *args: str, input: bytes | None = None, check: bool = True,
             options: str = "") -> subprocess.CompletedProcess:
        """Run the real psql client against the test database."""
        env = dict(os.environ, PGOPTIONS=options) if options else None
        return subprocess.run(
            ["psql", "-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", self.dsn(), *args],
            input=input, capture_output=True, check=check, env=env,
        )

    def pg_ctl(self, *args: str) -> None:
        env = [f"{k}={v}" for k, v in self.environment.items()]
        subprocess.run(_as_postgres(["env", *env, str(PG_BIN / "pg_ctl"), "-D", str(self.data), *args]),
                       check=True, capture_output=True)

    def start(self) -> None:
        self.pg_ctl("-l", str(self.log), "-w", "start", "-o", self.start_options)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


# What a crashed backend leaves in the server log: a process killed by a
# signal it did not ask for, or a Rust panic that could not unwind.
CRASH_MARKS = ("terminated by signal 6", "terminated by signal 11", "terminated by signal 7",
               "non-unwinding panic", "panic in a function that cannot unwind")


def start_cluster(preload: str, *, environment: dict[str, str] | None = None,
                  settings: dict[str, str] | None = None) -> Server:
    """initdb and start a throwaway cluster as postgres on a free port, with
    the test database and the extension created. Stop it with stop_cluster."""
    directory = Path(tempfile.mkdtemp(prefix="pg_stream_export-e2e.", dir="/tmp"))
    shutil.chown(directory, "postgres", "postgres")
    srv = Server(directory=directory, port=_free_port(), environment=environment or {})
    try:
        subprocess.run(
            _as_postgres([str(PG_BIN / "initdb"), "-D", str(srv.data), "-U", "postgres",
                          "--auth=trust", "--encoding=UTF8", "--locale=C.UTF-8"]),
            check=True, capture_output=True,
        )
        srv.start_options = (f"-c port={srv.port} -c listen_addresses=127.0.0.1 "
                             f"-c unix_socket_directories={directory} -c fsync=off "
                             f"-c shared_preload_libraries={preload}"
                             + "".join(f" -c {k}={v}" for k, v in (settings or {}).items()))
        srv.start()
        with psycopg.connect(srv.dsn("postgres"), autocommit=True) as conn:
            conn.execute(f"CREATE DATABASE {DATABASE}")
        with srv.connect() as conn:
            conn.execute("CREATE EXTENSION pg_stream_export")
    except BaseException:
        stop_cluster(srv)
        raise
    return srv


def stop_cluster(srv: Server) -> str:
    """Stop and remove a cluster; returns its server log."""
    try:
        srv.pg_ctl("-m", "fast", "-w", "stop")
    except subprocess.CalledProcessError:
        pass
    log = srv.log.read_text(errors="replace") if srv.log.exists() else ""
    shutil.rmtree(srv.directory, ignore_errors=True)
    return log


def crashes_in(log: str) -> list[str]:
    return [line for line in log.splitlines() if any(mark in line for mark in CRASH_MARKS)]


@pytest.fixture(scope="session")
def server():
    # pg_stat_statements has a ProcessUtility hook of its own: the COPY
    # integration must chain it. RUST_BACKTRACE=1 is set as it is where Rust
    # is installed: errors must look the same with it.
    srv = start_cluster("pg_stat_statements" if HAS_PG_STAT_STATEMENTS else "",
                        environment={"RUST_BACKTRACE": "1"})
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        if "terminated by signal" in log or crashes_in(log):
            pytest.fail("a backend crashed during the end-to-end tests:\n" + log[-5000:])


def load_events(server: Server, table: str, rows: int) -> None:
    """Build the benchmark table `events` with `rows` rows and rename it."""
    sql = (REPO / "bench" / "make_events.sql").read_text()
    server.psql("-v", f"N={rows}", input=sql.encode(), options="-c TimeZone=UTC")
    with server.connect() as c:
        c.execute(f"DROP TABLE IF EXISTS {table}")
        c.execute(f"ALTER TABLE events RENAME TO {table}")


@pytest.fixture(scope="session")
def events_big(server):
    """The benchmark table with 5,000,000 rows (loaded once per session)."""
    load_events(server, "events_big", 5_000_000)
    return "events_big"


@pytest.fixture(scope="session")
def events_small(server):
    """The benchmark table with 500,000 rows."""
    load_events(server, "events_small", 500_000)
    return "events_small"


@pytest.fixture(scope="module")
def scratch():
    """A cluster of the module's own, with the library preloaded, for tests
    that kill backends (which restarts every session of a cluster)."""
    srv = start_cluster("pg_stream_export")
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


@pytest.fixture
def conn(server):
    with server.connect() as connection:
        yield connection


@pytest.fixture
def server_dir():
    """A fresh directory the server (user postgres) owns and can write; root,
    running the tests, can write and read in it too."""
    path = Path(tempfile.mkdtemp(prefix="pse-e2e.", dir="/tmp"))
    shutil.chown(path, "postgres", "postgres")
    yield path
    shutil.rmtree(path, ignore_errors=True)
