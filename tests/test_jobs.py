"""Incremental jobs: stream_export_job_create and CALL stream_export_increment.

Each part holds exactly the rows added after the one before, every line as
row_to_json renders it; a run with nothing new writes nothing; a role runs
only its own jobs, with its own privileges and row-level security; and a
backend killed at any point of a run (before the write, during it, after
it but before the commit, during the commit) leads, after the next run, to
every row in exactly one recorded part and no second copy of any part.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import psycopg
import pytest

from conftest import DATABASE, HAS_PG_CRON, crashes_in, start_cluster, stop_cluster
from helpers import (listed_part_lines, oracle_lines, part_lines, run_in_thread, sqlstate_of, wait_for_server,
                     wait_until)


def oracle(conn, table: str) -> list[str]:
    return oracle_lines(conn, f"SELECT * FROM {table} ORDER BY id")


def recorded_lines(conn, job: str) -> list[str]:
    """Every record line of the parts the job's history lists, in order."""
    return listed_part_lines(
        conn, "SELECT target, rows FROM stream_export_job_part WHERE job = %s ORDER BY part", [job])


def make_table(conn, table: str, rows: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"""
        CREATE TABLE {table} (id bigint PRIMARY KEY, note text, at timestamptz, doc jsonb);
        INSERT INTO {table}
        SELECT g, 'row ' || g || E' "quoted" \\\\ tab\\t', '2026-01-01 00:00+00'::timestamptz + g * interval '1 min',
               jsonb_build_object('g', g, 'odd', g % 2 = 1)
        FROM generate_series(1, {rows}) g""")


def add_rows(conn, table: str, first: int, last: int) -> None:
    conn.execute(f"INSERT INTO {table} SELECT g, 'later ' || g, now(), NULL FROM generate_series({first}, {last}) g")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_each_run_exports_exactly_the_rows_added_since_the_last(conn, server_dir, compression):
    table, job = f"job_rows_{compression}", f"rows-{compression}"
    make_table(conn, table, 2500)
    conn.execute("DELETE FROM stream_export_job WHERE name = %s", [job])
    conn.execute("SELECT stream_export_job_create(%s, %s, 'id', %s, compression => %s)",
                 [job, table, str(server_dir), compression])
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))

    conn.execute("CALL stream_export_increment(%s)", [job])
    suffix = {"none": "", "gzip": ".gz", "zstd": ".zst"}[compression]
    first = server_dir / f"{job}-00000001.ndjson{suffix}"
    assert part_lines(first) == oracle(conn, table)
    assert "part 1, 2500 rows" in notices[-1]

    add_rows(conn, table, 2501, 2600)
    conn.execute("CALL stream_export_increment(%s)", [job])
    second = server_dir / f"{job}-00000002.ndjson{suffix}"
    assert part_lines(second) == oracle(conn, f"(SELECT * FROM {table} WHERE id > 2500) s")

    # Nothing new: nothing written, nothing recorded, the position stays.
    position = conn.execute("SELECT position FROM stream_export_job WHERE name = %s", [job]).fetchone()[0]
    conn.execute("CALL stream_export_increment(%s)", [job])
    assert "no new rows" in notices[-1]
    assert sorted(p.name for p in server_dir.iterdir()) == sorted([first.name, second.name, f"{job}.job.json"])
    assert conn.execute("SELECT position, parts, rows FROM stream_export_job WHERE name = %s",
                        [job]).fetchone() == (position, 2, 2600)

    # The history says what is in each part, and verify agrees.
    history = conn.execute("""
        SELECT part, rows, crc32, recovered, after_token IS NULL, resume_token
        FROM stream_export_job_part WHERE job = %s ORDER BY part""", [job]).fetchall()
    assert [(h[0], h[1], h[3], h[4]) for h in history] == [(1, 2500, False, True), (2, 100, False, False)]
    assert history[-1][5] == position
    for path, (_, rows, crc, *_rest) in zip([first, second], history):
        assert conn.execute("SELECT ok, rows, crc32 FROM stream_export_verify(%s)",
                            [str(path)]).fetchone() == (True, rows, crc)
    assert recorded_lines(conn, job) == oracle(conn, table)

    # The stored position is the token of the last row: an export after it
    # by hand agrees that nothing is left.
    assert conn.execute("SELECT count(*) FROM stream_export(%s, key => 'id', after => %s)",
                        [table, position]).fetchone() == (0,)


def test_job_errors_have_their_sqlstates(conn, server_dir):
    make_table(conn, "job_errors", 10)
    conn.execute("CREATE TABLE IF NOT EXISTS job_errors_dup (id int, v text)")
    conn.execute("DELETE FROM stream_export_job WHERE name LIKE 'err%'")
    d = str(server_dir)
    create = "SELECT stream_export_job_create(%s, %s, %s, %s, compression => %s, compression_level => %s)"
    cases = [
        (["bad/name", "job_errors", "id", d, "none", None], "22023"),
        (["part-1", "job_errors", "id", d, "none", None], "22023"),
        (["", "job_errors", "id", d, "none", None], "22023"),
        (["err1", "job_errors", "id", d, "lz4", None], "22023"),
        (["err1", "job_errors", "id", d, "zstd", 20], "22023"),
        (["err1", "no_such_table", "id", d, "none", None], "42P01"),
        (["err1", "job_errors", "nope", d, "none", None], "42703"),
        (["err1", "job_errors_dup", "id", d, "none", None], "22023"),
        (["err1", "job_errors", "id", d + "/missing", "none", None], "58P01"),
        (["err1", "job_errors", "id", "relative/dir", "none", None], "42501"),
        ([None, "job_errors", "id", d, "none", None], "22004"),
        (["err1", "job_errors", "id", None, "none", None], "22004"),
    ]
    for args, code in cases:
        assert sqlstate_of(conn, create, args) == code, args
    # Nothing was recorded by the refused calls.
    assert conn.execute("SELECT count(*) FROM stream_export_job WHERE name LIKE 'err%'").fetchone() == (0,)
    conn.execute(create, ["err1", "job_errors", "id", d, "none", None])
    assert sqlstate_of(conn, create, ["err1", "job_errors", "id", d, "none", None]) == "42710"
    assert sqlstate_of(conn, "CALL stream_export_increment('no-such-job')") == "42704"
    assert sqlstate_of(conn, "CALL stream_export_increment(NULL)") == "22004"
    # The source went away: the run fails as an export of it would, and
    # nothing is recorded.
    conn.execute("DROP TABLE job_errors")
    assert sqlstate_of(conn, "CALL stream_export_increment('err1')") == "42P01"
    assert conn.execute("SELECT parts FROM stream_export_job WHERE name = 'err1'").fetchone() == (0,)
    assert list(server_dir.iterdir()) == []


def test_a_role_runs_only_its_own_jobs_with_its_own_privileges(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_rls;
        CREATE TABLE job_rls (id int PRIMARY KEY, tenant text, v text);
        INSERT INTO job_rls SELECT g, CASE WHEN g % 3 = 0 THEN 'other' ELSE 'mine' END, 'v' || g
        FROM generate_series(1, 300) g;
        ALTER TABLE job_rls ENABLE ROW LEVEL SECURITY;
        DROP POLICY IF EXISTS mine ON job_rls;
        CREATE POLICY mine ON job_rls USING (tenant = 'mine');
        DELETE FROM stream_export_job WHERE name IN ('tenant', 'secret');
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'JobOwner') THEN
                CREATE ROLE "JobOwner" LOGIN;
            END IF;
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'job_other') THEN
                CREATE ROLE job_other LOGIN;
            END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO "JobOwner", job_other;
        GRANT SELECT ON job_rls TO "JobOwner";
    """)
    # A role whose name needs quoting (mixed case) owns the job.
    with psycopg.connect(server.dsn(user="JobOwner"), autocommit=True) as owner:
        owner.execute("SELECT stream_export_job_create('tenant', 'job_rls', 'id', %s)", [str(server_dir)])
        owner.execute("CALL stream_export_increment('tenant')")
        lines = recorded_lines(owner, "tenant")
        # Row-level security applied: only the owner's rows, as its SELECT sees them.
        assert lines == oracle(owner, "job_rls")
        assert len(lines) == 200
        assert owner.execute("SELECT owner::text FROM stream_export_job WHERE name = 'tenant'"
                             ).fetchone() == ('"JobOwner"',)
        # A job may not be given away.
        assert sqlstate_of(owner, "UPDATE stream_export_job SET owner = 'job_other' WHERE name = 'tenant'") == "42501"

    with psycopg.connect(server.dsn(user="job_other"), autocommit=True) as other:
        # Another role sees neither the job nor its history, and cannot run,
        # change or remove it.
        assert other.execute("SELECT count(*) FROM stream_export_job WHERE name = 'tenant'").fetchone() == (0,)
        assert other.execute("SELECT count(*) FROM stream_export_job_part WHERE job = 'tenant'").fetchone() == (0,)
        assert sqlstate_of(other, "CALL stream_export_increment('tenant')") == "42704"
        # The catalog changes only through the extension's functions.
        assert sqlstate_of(other, "UPDATE stream_export_job SET position = NULL WHERE name = 'tenant'") == "42501"
        assert sqlstate_of(other, "DELETE FROM stream_export_job WHERE name = 'tenant'") == "42501"
        assert sqlstate_of(other, "SELECT stream_export_job_drop('tenant')") == "42704"
        # Nor plant a job in another role's name.
        assert sqlstate_of(other, """INSERT INTO stream_export_job (name, owner, source, key, destination)
                                     VALUES ('planted', '"JobOwner"', 'job_rls', 'id', '/tmp')""") == "42501"
        # Its own job over a table it may not read is refused when defined.
        assert sqlstate_of(other, "SELECT stream_export_job_create('secret', 'job_rls', 'id', %s)",
                           [str(server_dir)]) == "42501"

    # A superuser sees every job but runs only its own: the export would run
    # with the superuser's privileges, not the owner's.
    assert sqlstate_of(conn, "CALL stream_export_increment('tenant')") == "42501"
    conn.execute('SET ROLE "JobOwner"')
    try:
        conn.execute("CALL stream_export_increment('tenant')")
    finally:
        conn.execute("RESET ROLE")
    assert conn.execute("SELECT parts FROM stream_export_job WHERE name = 'tenant'").fetchone() == (1,)


def test_two_runs_of_one_job_take_turns(server, conn, server_dir):
    make_table(conn, "job_turns", 1000)
    conn.execute("DELETE FROM stream_export_job WHERE name = 'turns'")
    conn.execute("SELECT stream_export_job_create('turns', 'job_turns', 'id', %s)", [str(server_dir)])
    with server.connect(autocommit=False) as holder:
        holder.execute("SELECT FROM stream_export_job WHERE name = 'turns' FOR UPDATE")
        first = start_run(server, "turns")
        second = start_run(server, "turns")
        wait_until(lambda: conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'CALL stream_export_increment%%' "
            "AND wait_event_type = 'Lock'").fetchone()[0] == 2)
        add_rows(conn, "job_turns", 1001, 1010)
        holder.rollback()
    assert first() is None and second() is None
    # One run wrote part 1 with every row; the other found nothing new.
    assert conn.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'turns'").fetchall() == [(1, 1010)]
    assert recorded_lines(conn, "turns") == oracle(conn, "job_turns")


def start_run(srv, job: str):
    """CALL the job in a thread; returns a function that waits for it and
    gives the error the run ended with (None if it succeeded)."""
    def call():
        with srv.connect() as c:
            c.execute("CALL stream_export_increment(%s)", [job])
    thread, result = run_in_thread(call)

    def finished():
        thread.join(timeout=120)
        assert not thread.is_alive()
        return result.get("error")
    return finished


# --- kill -9 at every point of a run ------------------------------------------

def backend_of(conn, wait_event: str | None = None) -> int | None:
    row = conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CALL stream_export_increment%%' "
        "AND pid <> pg_backend_pid() AND (%s::text IS NULL OR wait_event = %s)",
        [wait_event, wait_event]).fetchone()
    return row[0] if row else None




def kill_and_recover(srv, pid: int, finished) -> None:
    os.kill(pid, signal.SIGKILL)
    assert finished() is not None  # the run did not complete
    wait_for_server(srv)


def prepare(srv, directory: Path, job: str, rows: int):
    c = srv.connect()
    make_table(c, job.replace("-", "_"), rows)
    c.execute("SELECT stream_export_job_create(%s, %s, 'id', %s, compression => 'gzip')",
              [job, job.replace("-", "_"), str(directory)])
    return c


def assert_exactly_once(c, job: str, directory: Path, parts: int) -> None:
    table = job.replace("-", "_")
    assert recorded_lines(c, job) == oracle(c, table)
    files = sorted(p.name for p in directory.iterdir())
    # The parts, and the binding of the destination to the job.
    assert files == [f"{job}-{n:08d}.ndjson.gz" for n in range(1, parts + 1)] + [f"{job}.job.json"], files


def test_killed_before_the_write(scratch, server_dir):
    c = prepare(scratch, server_dir, "before-write", 5000)
    # The run waits for the job's row, which another session holds.
    holder = scratch.connect(autocommit=False)
    holder.execute("SELECT FROM stream_export_job WHERE name = 'before-write' FOR UPDATE")
    finished = start_run(scratch, "before-write")
    wait_until(lambda: backend_of(c, "transactionid") is not None)
    kill_and_recover(scratch, backend_of(c), finished)
    holder.close()
    c = scratch.connect()
    assert c.execute("SELECT parts FROM stream_export_job WHERE name = 'before-write'").fetchone() == (0,)
    c.execute("CALL stream_export_increment('before-write')")
    assert_exactly_once(c, "before-write", server_dir, 1)


def test_killed_during_the_write(scratch, server_dir):
    # Big and slow enough to be caught writing: gzip at level 9.
    c = prepare(scratch, server_dir, "during-write", 1_000_000)
    c.execute("UPDATE stream_export_job SET compression_level = 9 WHERE name = 'during-write'")
    finished = start_run(scratch, "during-write")
    partial = server_dir / "during-write-00000001.ndjson.gz.partial"
    wait_until(lambda: partial.exists() and partial.stat().st_size > 0, timeout=60)
    kill_and_recover(scratch, backend_of(c) or 0, finished)
    c = scratch.connect()
    add_rows(c, "during_write", 1_000_001, 1_000_100)
    c.execute("CALL stream_export_increment('during-write')")
    assert_exactly_once(c, "during-write", server_dir, 1)


def test_killed_after_the_write_before_the_commit(scratch, server_dir):
    c = prepare(scratch, server_dir, "after-write", 5000)
    # A gate between the part being in place and its record: the INSERT of
    # the record waits for an advisory lock the test holds.
    c.execute("""
        CREATE OR REPLACE FUNCTION job_gate() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN PERFORM pg_advisory_xact_lock(424242); RETURN NEW; END $$;
        CREATE TRIGGER job_gate BEFORE INSERT ON stream_export_job_part
            FOR EACH ROW EXECUTE FUNCTION job_gate();
    """)
    gate = scratch.connect(autocommit=False)
    gate.execute("SELECT pg_advisory_xact_lock(424242)")
    try:
        finished = start_run(scratch, "after-write")
        wait_until(lambda: backend_of(c, "advisory") is not None)
        part = server_dir / "after-write-00000001.ndjson.gz"
        assert part.exists()  # in place, not recorded
        before = (part.stat().st_ino, part.read_bytes())
        kill_and_recover(scratch, backend_of(c), finished)
    finally:
        gate.close()
    c = scratch.connect()
    c.execute("DROP TRIGGER job_gate ON stream_export_job_part")
    assert c.execute("SELECT parts, position FROM stream_export_job WHERE name = 'after-write'").fetchone() == (0, None)
    add_rows(c, "after_write", 5001, 5050)
    notices: list[str] = []
    c.add_notice_handler(lambda d: notices.append(d.message_primary))
    c.execute("CALL stream_export_increment('after-write')")
    # The part left in place is taken as it is, not written again: the rows
    # added since go into the next part.
    assert "recovered" in notices[-1]
    assert (part.stat().st_ino, part.read_bytes()) == before
    assert c.execute("SELECT rows, recovered FROM stream_export_job_part WHERE job = 'after-write'"
                     ).fetchall() == [(5000, True)]
    c.execute("CALL stream_export_increment('after-write')")
    assert c.execute("SELECT part, rows, recovered FROM stream_export_job_part WHERE job = 'after-write' "
                     "ORDER BY part").fetchall() == [(1, 5000, True), (2, 50, False)]
    assert_exactly_once(c, "after-write", server_dir, 2)


def test_killed_during_the_commit(scratch, server_dir):
    c = prepare(scratch, server_dir, "in-commit", 5000)
    # The commit record is written and flushed, then the backend waits for a
    # synchronous standby that never comes: killed there, the commit holds.
    c.execute("ALTER SYSTEM SET synchronous_standby_names = 'nobody'")
    c.execute("SELECT pg_reload_conf()")
    try:
        wait_until(lambda: scratch.connect().execute("SHOW synchronous_standby_names").fetchone()[0] == "nobody")
        finished = start_run(scratch, "in-commit")
        wait_until(lambda: backend_of(c, "SyncRep") is not None)
        kill_and_recover(scratch, backend_of(c), finished)
    finally:
        c = scratch.connect()
        c.execute("ALTER SYSTEM RESET synchronous_standby_names")
        c.execute("SELECT pg_reload_conf()")
    wait_until(lambda: scratch.connect().execute("SHOW synchronous_standby_names").fetchone()[0] == "")
    assert c.execute("SELECT parts FROM stream_export_job WHERE name = 'in-commit'").fetchone() == (1,)
    add_rows(c, "in_commit", 5001, 5020)
    c.execute("CALL stream_export_increment('in-commit')")
    assert c.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'in-commit' ORDER BY part"
                     ).fetchall() == [(1, 5000), (2, 20)]
    assert_exactly_once(c, "in-commit", server_dir, 2)


# --- scheduled with pg_cron -----------------------------------------------------

@pytest.mark.skipif(not HAS_PG_CRON, reason="pg_cron is not packaged for this PostgreSQL build")
def test_a_pg_cron_schedule_ships_every_row_once(server_dir):
    """The README's recipe: pg_cron runs the job every minute (1.4, the
    Debian package, schedules by the minute); rows are added between runs;
    the parts together are the table, each row once."""
    srv = start_cluster("pg_stream_export,pg_cron",
                        settings={"cron.database_name": DATABASE, "cron.use_background_workers": "on"})
    try:
        c = srv.connect()
        c.execute("CREATE EXTENSION pg_cron")
        make_table(c, "cron_events", 3000)
        c.execute("SELECT stream_export_job_create('cron-events', 'cron_events', 'id', %s, compression => 'gzip')",
                  [str(server_dir)])
        c.execute("SELECT cron.schedule('ship-cron-events', '* * * * *', "
                  "$$CALL stream_export_increment('cron-events')$$)")

        def runs(status: str) -> int:
            return c.execute("SELECT count(*) FROM cron.job_run_details WHERE status = %s", [status]).fetchone()[0]

        def parts() -> int:
            return c.execute("SELECT parts FROM stream_export_job WHERE name = 'cron-events'").fetchone()[0]

        wait_until(lambda: parts() == 1, timeout=150, interval=0.5)
        add_rows(c, "cron_events", 3001, 3333)
        wait_until(lambda: parts() == 2, timeout=150, interval=0.5)
        c.execute("SELECT cron.unschedule('ship-cron-events')")
        wait_until(lambda: c.execute("SELECT count(*) FROM cron.job_run_details WHERE status = 'running'"
                                     ).fetchone()[0] == 0, timeout=60, interval=0.5)
        assert runs("failed") == 0
        assert runs("succeeded") >= 2
        assert recorded_lines(c, "cron-events") == oracle(c, "cron_events")
        assert c.execute("SELECT array_agg(rows ORDER BY part) FROM stream_export_job_part "
                         "WHERE job = 'cron-events'").fetchone()[0] == [3000, 333]
        assert_exactly_once(c, "cron-events", server_dir, 2)
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))
