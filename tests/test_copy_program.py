"""COPY ... TO PROGRAM with FORMAT ndjson, and the permissions of export files."""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import time

import psycopg
import pytest

from conftest import start_cluster, stop_cluster
from helpers import function_bytes, run_in_thread, wait_until


def loaded(conn):
    conn.execute("LOAD 'pg_stream_export'")
    return conn


def mode_of(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_program_reads_the_export(conn, events_small, server_dir):
    loaded(conn)
    plain, packed = server_dir / "plain.ndjson", server_dir / "packed.ndjson.zst"
    with conn.cursor() as cur:
        cur.execute(f"COPY {events_small} TO PROGRAM 'cat > {plain}' WITH (FORMAT ndjson)")
        assert cur.rowcount == 500_000
        assert cur.statusmessage == "COPY 500000"
    expected = function_bytes(conn, events_small)
    assert plain.read_bytes() == expected
    # A pipeline of two programs, with our compression and footer.
    conn.execute(f"COPY (SELECT * FROM {events_small} WHERE ok) TO PROGRAM 'cat | cat > {packed}' "
                 "WITH (FORMAT ndjson, COMPRESSION zstd, FOOTER true)")
    assert packed.read_bytes() == function_bytes(
        conn, f"SELECT * FROM {events_small} WHERE ok", compression="zstd", footer=True)
    ok, detail = conn.execute("SELECT ok, detail FROM stream_export_verify(%s)", [str(packed)]).fetchone()
    assert ok, detail
    # FORMAT json too, and a program that decompresses.
    array = server_dir / "array.json"
    conn.execute(f"COPY (SELECT id FROM {events_small} ORDER BY id LIMIT 3) TO PROGRAM 'gzip -dc > {array}' "
                 "WITH (FORMAT 'json', FORCE_ARRAY, COMPRESSION gzip)")
    assert array.read_text().replace("\n", "").replace(" ", "") == '[{"id":1},{"id":2},{"id":3}]'


def test_a_program_that_fails_fails_the_copy(conn, events_small, server_dir):
    loaded(conn)
    with pytest.raises(psycopg.errors.ExternalRoutineException) as err:
        conn.execute(f"COPY {events_small} TO PROGRAM 'cat > /dev/null; exit 3' WITH (FORMAT ndjson)")
    assert "failed" in err.value.diag.message_primary
    # The status in DETAIL, worded as PostgreSQL's own COPY TO PROGRAM does.
    with pytest.raises(psycopg.errors.ExternalRoutineException) as csv_err:
        conn.execute("COPY (SELECT 1) TO PROGRAM 'cat > /dev/null; exit 3' WITH (FORMAT csv)")
    assert csv_err.value.diag.message_detail == "child process exited with exit code 3"
    assert err.value.diag.message_detail == csv_err.value.diag.message_detail
    assert err.value.diag.message_hint is None
    # One that stops reading early: the pipe breaks, the COPY fails, no hang.
    with pytest.raises(psycopg.errors.ExternalRoutineException):
        conn.execute(f"COPY {events_small} TO PROGRAM 'head -c 10 > /dev/null' WITH (FORMAT ndjson)")
    with pytest.raises(psycopg.errors.ExternalRoutineException):
        conn.execute(f"COPY {events_small} TO PROGRAM '{server_dir}/no-such-program' WITH (FORMAT ndjson)")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_a_failed_export_never_gives_the_program_a_clean_end(conn, events_small, server_dir):
    """An upload command (`aws s3 cp -`) stores what it read once its input
    ends cleanly; a failed export must kill it instead."""
    loaded(conn)
    out, finished = server_dir / "out", server_dir / "finished"
    program = f"cat > {out}; echo done > {finished}"
    with pytest.raises(psycopg.errors.DivisionByZero):
        conn.execute(f"COPY (SELECT 1 / (400000 - id) AS x FROM {events_small}) "
                     f"TO PROGRAM '{program}' WITH (FORMAT ndjson)")
    assert out.exists() and out.stat().st_size > 1_000_000  # it was reading
    assert not finished.exists()
    conn.execute(f"COPY (SELECT 1 AS x) TO PROGRAM '{program}' WITH (FORMAT ndjson)")
    assert finished.read_text() == "done\n" and out.read_bytes() == b'{"x":1}\n'


@pytest.mark.parametrize("stop", ["cancel", "statement_timeout"])
def test_cancel_while_the_program_does_not_read(server, events_big, server_dir, stop):
    pid_file = server_dir / f"pid-{stop}"
    with server.connect() as worker, server.connect() as observer:
        loaded(worker)
        if stop == "statement_timeout":
            worker.execute("SET statement_timeout = '3s'")
        thread, result = run_in_thread(lambda: worker.execute(
            f"COPY {events_big} TO PROGRAM 'echo $$ > {pid_file}; exec sleep 600' WITH (FORMAT ndjson)"))
        program = int(wait_until(lambda: pid_file.exists() and pid_file.read_text().strip()))
        if stop == "cancel":
            # Once the pipe is full the backend is waiting for the program.
            wait_until(lambda: observer.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s",
                [worker.info.backend_pid]).fetchone()[0] == "Extension")
            observer.execute("SELECT pg_cancel_backend(%s)", [worker.info.backend_pid])
        thread.join(60)
        assert not thread.is_alive()
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        assert not os.path.exists(f"/proc/{program}")  # killed and reaped
        assert worker.execute("SELECT 1").fetchone() == (1,)


def program_gone(pid: int) -> bool:
    """The process has ended (gone, or a zombie nobody reaped)."""
    try:
        status = open(f"/proc/{pid}/status").read()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in status


def an_upload(server_dir, name):
    """A command that stores what it read once its input ends cleanly, as
    `aws s3 cp -` does: `ok` appears only after a clean end of input. Its
    shell writes its pid first."""
    out, ok, pid = server_dir / f"{name}.out", server_dir / f"{name}.ok", server_dir / f"{name}.pid"
    return f"echo $$ > {pid}; cat > {out} && echo ok > {ok}", out, ok, pid


def stop_mid_export(server, source, server_dir, name, stop):
    """Run COPY source TO PROGRAM an_upload in a session, and `stop` it once
    the program has read more than 1 MB; returns the COPY's error, the
    program's pid and its `ok` file, once the COPY's call ended."""
    program, out, ok, pid_file = an_upload(server_dir, name)
    with server.connect() as worker:
        loaded(worker)
        backend = worker.info.backend_pid
        thread, result = run_in_thread(lambda: worker.execute(
            f"COPY {source} TO PROGRAM '{program}' WITH (FORMAT ndjson)"))
        wait_until(lambda: out.exists() and out.stat().st_size > 1_000_000)
        stop(backend)
        thread.join(60)
        assert not thread.is_alive()
    return result.get("error"), int(pid_file.read_text()), ok


@pytest.mark.parametrize("how", ["cancel", "terminate"])
def test_a_stopped_export_never_gives_the_program_a_clean_end(server, events_big, server_dir, how):
    """pg_terminate_backend ends the backend with FATAL, where no Rust
    destructor runs: the program must still be killed, not see the end of
    its input (issue 38, case 2)."""
    function = {"cancel": "pg_cancel_backend", "terminate": "pg_terminate_backend"}[how]

    def stop(backend):
        with server.connect() as observer:
            assert observer.execute(f"SELECT {function}(%s)", [backend]).fetchone() == (True,)

    error, pid, ok = stop_mid_export(server, events_big, server_dir, how, stop)
    expected = psycopg.errors.QueryCanceled if how == "cancel" else psycopg.OperationalError
    assert isinstance(error, expected), error
    wait_until(lambda: program_gone(pid), timeout=10)
    assert not ok.exists()


def test_a_fast_shutdown_kills_the_program(server_dir):
    """`pg_ctl stop -m fast` mid-export, on a cluster of its own: the
    program is killed, and the server stops in time."""
    srv = start_cluster("")
    try:
        source = "(SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 50000000) g)"

        def stop(_backend):
            started = time.monotonic()
            srv.pg_ctl("-m", "fast", "-t", "20", "-w", "stop")
            assert time.monotonic() - started < 10

        error, pid, ok = stop_mid_export(srv, source, server_dir, "shutdown", stop)
        assert isinstance(error, psycopg.OperationalError), error
        wait_until(lambda: program_gone(pid), timeout=10)
        assert not ok.exists()
    finally:
        stop_cluster(srv)


def test_statement_timeout_while_a_grandchild_holds_the_pipe(conn, events_big, server_dir):
    """The program does not read, and a grandchild that left its process
    group (setsid) keeps the pipe open after the group is killed: the
    timeout still ends the COPY at once, not when the grandchild exits."""
    loaded(conn)
    grandchild = server_dir / "grandchild.pid"
    script = server_dir / "holder.sh"
    script.write_text("exec 3<&0\n"
                      f"setsid sh -c 'echo $$ > {grandchild}; exec sleep 30' &\n"
                      "exec sleep 30\n")
    conn.execute("SET statement_timeout = '1s'")
    started = time.monotonic()
    try:
        with pytest.raises(psycopg.errors.QueryCanceled):
            conn.execute(f"COPY {events_big} TO PROGRAM 'sh {script}' WITH (FORMAT ndjson)")
        assert time.monotonic() - started < 5
    finally:
        if grandchild.exists():
            try:
                os.kill(int(grandchild.read_text()), signal.SIGKILL)
            except ProcessLookupError:
                pass
    conn.execute("RESET statement_timeout")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_program_needs_pg_execute_server_program(conn, events_small, server_dir):
    loaded(conn)
    conn.execute("""
        DROP ROLE IF EXISTS program_plain; DROP ROLE IF EXISTS program_runner;
        CREATE ROLE program_plain; CREATE ROLE program_runner;
        GRANT pg_execute_server_program TO program_runner;
    """)
    conn.execute(f"GRANT SELECT ON {events_small} TO program_plain, program_runner")
    target = server_dir / "by-runner.ndjson"
    conn.execute("SET ROLE program_plain")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(f"COPY {events_small} TO PROGRAM 'cat > {target}' WITH (FORMAT ndjson)")
    assert not target.exists()
    conn.execute("RESET ROLE; SET ROLE program_runner")
    conn.execute(f"COPY (SELECT id FROM {events_small} WHERE id <= 2 ORDER BY id) "
                 f"TO PROGRAM 'cat > {target}' WITH (FORMAT ndjson)")
    assert target.read_bytes() == b'{"id":1}\n{"id":2}\n'
    conn.execute("RESET ROLE")
    conn.execute(f"REVOKE SELECT ON {events_small} FROM program_plain, program_runner")
    conn.execute("DROP ROLE program_plain; DROP ROLE program_runner")


def test_export_files_get_the_mode_copy_gives(conn, server_dir):
    """PostgreSQL's own COPY TO 'file' is the oracle for the mode."""
    loaded(conn)
    conn.execute("DROP TABLE IF EXISTS mode_rows; CREATE TABLE mode_rows AS SELECT g AS id FROM generate_series(1, 100) g; ALTER TABLE mode_rows ADD PRIMARY KEY (id)")
    conn.execute(f"COPY mode_rows TO '{server_dir}/copy.csv' (FORMAT csv)")
    copy_mode = mode_of(server_dir / "copy.csv")
    assert copy_mode == 0o644, oct(copy_mode)
    conn.execute(f"COPY mode_rows TO '{server_dir}/copy.ndjson' (FORMAT ndjson)")
    conn.execute("SELECT * FROM stream_export_to_file('mode_rows', %s)", [str(server_dir / "fn.ndjson.gz")])
    (server_dir / "dir").mkdir()
    shutil.chown(server_dir / "dir", "postgres", "postgres")
    conn.execute("SELECT * FROM stream_export_to_directory('mode_rows', %s, key => 'id', partitions => 2)",
                 [str(server_dir / "dir")])
    files = [server_dir / "copy.ndjson", server_dir / "fn.ndjson.gz", *(server_dir / "dir").iterdir()]
    assert len(files) >= 4
    assert {f.name: mode_of(f) for f in files} == {f.name: copy_mode for f in files}
    # A loader that is not the server's OS user can read them.
    server_dir.chmod(0o755)
    reader = subprocess.run(["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
                             "cat", str(server_dir / "copy.ndjson")], capture_output=True)
    assert reader.returncode == 0, reader.stderr
    assert reader.stdout.count(b"\n") == 100
    # Stricter modes for those who want them.
    for mode in ("0640", "0600"):
        conn.execute(f"SET pg_stream_export.file_mode = '{mode}'")
        target = server_dir / f"strict-{mode}.ndjson"
        conn.execute("SELECT * FROM stream_export_to_file('mode_rows', %s)", [str(target)])
        assert mode_of(target) == int(mode, 8)
    conn.execute("RESET pg_stream_export.file_mode")
    with pytest.raises(psycopg.errors.InvalidParameterValue):
        conn.execute("SET pg_stream_export.file_mode = '0777'")
    assert conn.execute("SHOW pg_stream_export.file_mode").fetchone() == ("0644",)
