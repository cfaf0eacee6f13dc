"""Incremental jobs never lose, invent or mangle a row (issue 37).

- Exactly once on a live table: writers whose transactions commit in any
  order (ids held across runs, nextval long before the insert), runs from
  two sessions at once: the union of the parts is the table, each row once.
- A part left by a run that did not commit (ROLLBACK, a failed COMMIT) is
  taken only if it holds what the table holds now; a destination holding
  another job's or another database's parts is refused.
- The key's type is recorded and checked; names are checked at every run;
  the catalog changes only through the extension's functions; a role that
  owns jobs cannot be dropped, and DROP OWNED / REASSIGN OWNED take its jobs.
"""

from __future__ import annotations

import collections
import json
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psycopg
import pytest

from conftest import PG_BIN, _as_postgres, start_cluster, stop_cluster
from helpers import listed_part_lines, oracle_lines, part_lines, run_in_thread, sqlstate_of, wait_until


def recorded_lines(conn, job: str) -> list[str]:
    return listed_part_lines(
        conn, "SELECT target, rows FROM stream_export_job_part WHERE job = %s ORDER BY part", [job])


def oracle(conn, table: str) -> list[str]:
    return oracle_lines(conn, f"SELECT * FROM {table} ORDER BY id")


def fresh_job(conn, job: str, table: str, directory, key: str = "id") -> None:
    conn.execute("DELETE FROM stream_export_job WHERE name = %s", [job])
    conn.execute("SELECT stream_export_job_create(%s, %s, %s, %s)", [job, table, key, str(directory)])


# --- A. exactly once on a live table -------------------------------------------------

def test_rows_that_commit_late_are_exported_once(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS live_events;
        CREATE TABLE live_events (id bigserial PRIMARY KEY, writer int NOT NULL, n int NOT NULL,
                                  note text, at timestamptz NOT NULL DEFAULT clock_timestamp());
    """)
    fresh_job(conn, "live", "live_events", server_dir)
    stop = threading.Event()
    errors: list[BaseException] = []

    def guarded(body):
        def run():
            try:
                body()
            except BaseException as e:  # noqa: BLE001 - reported by the test
                errors.append(e)
                stop.set()
        return run

    def writer(w: int):
        rng = random.Random(w)
        with server.connect(autocommit=False) as c:
            n = 0
            while not stop.is_set():
                n += 1
                if w == 0 and n % 15 == 1:
                    # nextval long before the insert, in the same transaction.
                    (held,) = c.execute("SELECT nextval('live_events_id_seq')").fetchone()
                    time.sleep(rng.uniform(1.0, 2.0))
                    c.execute("INSERT INTO live_events (id, writer, n, note) VALUES (%s, %s, %s, 'held')",
                              [held, w, n])
                else:
                    for _ in range(rng.randint(1, 4)):
                        c.execute("INSERT INTO live_events (writer, n, note) VALUES (%s, %s, 'x')", [w, n])
                    # Mostly short, sometimes longer than the time between runs.
                    time.sleep(rng.choice([0, 0.01, 0.05, 0.2]) if rng.random() < 0.85
                               else rng.uniform(0.6, 1.5))
                if rng.random() < 0.05:
                    c.rollback()
                else:
                    c.commit()

    def runner(r: int):
        rng = random.Random(100 + r)
        with server.connect() as c:
            while not stop.is_set():
                c.execute("CALL stream_export_increment('live')")
                time.sleep(rng.uniform(0.3, 0.5))

    threads = [threading.Thread(target=guarded(lambda w=w: writer(w))) for w in range(4)]
    threads += [threading.Thread(target=guarded(lambda r=r: runner(r))) for r in range(2)]
    for t in threads:
        t.start()
    stop.wait(18)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    # Every writer has committed or rolled back: the last runs ship the rest.
    conn.execute("CALL stream_export_increment('live')")
    conn.execute("CALL stream_export_increment('live')")

    lines = recorded_lines(conn, "live")
    expected = oracle(conn, "live_events")
    assert len(expected) > 300
    duplicated = [line for line, count in collections.Counter(lines).items() if count > 1]
    missing = sorted(set(expected) - set(lines))
    invented = sorted(set(lines) - set(expected))
    assert (missing[:5], len(missing), duplicated[:5], invented[:5]) == ([], 0, [], [])
    assert sorted(lines) == sorted(expected)
    parts = conn.execute("SELECT count(*), bool_or(recovered) FROM stream_export_job_part WHERE job = 'live'"
                         ).fetchone()
    assert parts[0] > 10 and parts[1] is False
    # The workload did commit rows late: some part holds a key below the
    # last key of the parts before it.
    shipped_up_to, late = 0, 0
    for (target,) in conn.execute("SELECT target FROM stream_export_job_part WHERE job = 'live' ORDER BY part"):
        ids = [json.loads(line)["id"] for line in part_lines(Path(target))]
        late += sum(1 for i in ids if i < shipped_up_to)
        shipped_up_to = max(shipped_up_to, *ids)
    assert late > 0


def wait_for_no_other_transaction(conn) -> None:
    """Until no other session of the server has a transaction open (the
    oldest one keeps a job's floor back)."""
    deadline = time.monotonic() + 30
    while conn.execute("""
            SELECT count(*) FROM pg_stat_activity WHERE pid <> pg_backend_pid() AND xact_start IS NOT NULL
            AND backend_type IN ('client backend', 'background worker')""").fetchone()[0]:
        assert time.monotonic() < deadline, "another session keeps a transaction open"
        time.sleep(0.1)


def test_a_new_jobs_second_run_reads_only_the_new_rows(conn, server_dir):
    rows = 20000
    conn.execute(f"""
        DROP TABLE IF EXISTS job_origin;
        CREATE TABLE job_origin (id bigserial PRIMARY KEY, v text NOT NULL);
        INSERT INTO job_origin (v) SELECT 'v' || g FROM generate_series(1, {rows}) g;
        ANALYZE job_origin;
    """)
    wait_for_no_other_transaction(conn)
    fresh_job(conn, "origin", "job_origin", server_dir)
    conn.execute("CALL stream_export_increment('origin')")
    conn.execute("INSERT INTO job_origin (v) SELECT 'new ' || g FROM generate_series(1, 100) g")
    wait_for_no_other_transaction(conn)
    # The rows the second run reads: the 100 new ones, not the first
    # part's 20,000 again. (The session's counts not yet sent to the
    # statistics are in the view too, so the run's are the difference.)
    counted = """SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables
                 WHERE relid = 'job_origin'::regclass"""
    with conn.transaction():
        (before,) = conn.execute(counted).fetchone()
        conn.execute("CALL stream_export_increment('origin')")
        (after,) = conn.execute(counted).fetchone()
    assert after - before < 1000, f"the second run read {after - before} rows"
    assert conn.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'origin' ORDER BY part"
                        ).fetchall() == [(1, rows), (2, 100)]
    # Part 1's floor is the job's run 0: the largest key when it was made.
    origin, floor = conn.execute("""
        SELECT j.origin, p.floor FROM stream_export_job j JOIN stream_export_job_part p ON p.job = j.name
        WHERE j.name = 'origin' AND p.part = 1""").fetchone()
    assert origin is not None and floor == origin
    assert recorded_lines(conn, "origin") == oracle(conn, "job_origin")


def test_a_transaction_older_than_the_job_is_still_exported_once(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_older;
        CREATE TABLE job_older (id bigserial PRIMARY KEY, v text NOT NULL);
        INSERT INTO job_older (v) SELECT 'v' || g FROM generate_series(1, 50) g;
    """)
    wait_for_no_other_transaction(conn)
    with server.connect(autocommit=False) as old:
        # Open before the job is made, with key 51: below the largest key
        # when the job is made (60), and committed after its first run.
        (held,) = old.execute("INSERT INTO job_older (v) VALUES ('old') RETURNING id").fetchone()
        conn.execute("INSERT INTO job_older (v) SELECT 'v' || g FROM generate_series(52, 60) g")
        fresh_job(conn, "older", "job_older", server_dir)
        conn.execute("CALL stream_export_increment('older')")
        old.commit()
    assert held == 51
    conn.execute("CALL stream_export_increment('older')")
    conn.execute("CALL stream_export_increment('older')")
    assert conn.execute("SELECT part, rows, floor IS NULL FROM stream_export_job_part WHERE job = 'older' "
                        "ORDER BY part").fetchall() == [(1, 59, True), (2, 1, False)]
    lines = recorded_lines(conn, "older")
    assert json.loads(lines[-1])["id"] == 51
    assert sorted(lines) == sorted(oracle(conn, "job_older"))


def test_rows_of_the_runs_own_subtransactions_are_exported_once(server, conn, server_dir):
    """Rows a run's own transaction wrote in savepoints (and in a
    procedure's exception block) before the CALL are exported by that run,
    and not again by the next, which looks again at the keys above the
    row of a transaction that was still open: the subtransactions' ids,
    like the run's own, count as seen by the run although its snapshot
    does not list them."""
    conn.execute("""
        DROP TABLE IF EXISTS job_subxact;
        CREATE TABLE job_subxact (id bigserial PRIMARY KEY, v text NOT NULL);
        INSERT INTO job_subxact (v) SELECT 'v' || g FROM generate_series(1, 10) g;
    """)
    wait_for_no_other_transaction(conn)
    fresh_job(conn, "subxact", "job_subxact", server_dir)
    conn.execute("CALL stream_export_increment('subxact')")
    with server.connect(autocommit=False) as late:
        # Key 11, open while the run exports the keys above it.
        (held,) = late.execute("INSERT INTO job_subxact (v) VALUES ('late') RETURNING id").fetchone()
        with conn.transaction():
            # A subtransaction that rolls back ends its id (the snapshot's
            # xmax passes it); the later ones are still in progress for
            # other sessions when the run takes its snapshot.
            with pytest.raises(psycopg.errors.UniqueViolation):
                with conn.transaction():
                    conn.execute("INSERT INTO job_subxact (v) VALUES ('rolled back')")
                    conn.execute("INSERT INTO job_subxact (id, v) VALUES (1, 'duplicate')")
            conn.execute("INSERT INTO job_subxact (v) VALUES ('top')")
            for n in range(3):
                with conn.transaction():
                    conn.execute("INSERT INTO job_subxact (v) VALUES (%s)", [f"savepoint {n}"])
            conn.execute("""DO $$ BEGIN
                              BEGIN INSERT INTO job_subxact (v) VALUES ('exception block');
                              EXCEPTION WHEN OTHERS THEN NULL; END;
                            END $$""")
            with conn.transaction():
                # The run itself in a savepoint that wrote too.
                conn.execute("INSERT INTO job_subxact (v) VALUES ('open savepoint')")
                conn.execute("CALL stream_export_increment('subxact')")
        late.commit()
    assert held == 11
    conn.execute("INSERT INTO job_subxact (v) VALUES ('after')")
    wait_for_no_other_transaction(conn)
    conn.execute("CALL stream_export_increment('subxact')")
    conn.execute("CALL stream_export_increment('subxact')")
    assert conn.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'subxact' ORDER BY part"
                        ).fetchall() == [(1, 10), (2, 6), (3, 2)]
    lines = recorded_lines(conn, "subxact")
    assert len(lines) == len(set(lines))
    assert sorted(lines) == sorted(oracle(conn, "job_subxact"))


def test_a_run_whose_transaction_inserts_into_the_table_after_the_call_does_not_commit(server, conn, server_dir):
    """The run's transaction draws key 11, another commits 12, the run
    exports 12, and then the transaction inserts 11: the next run would
    take 11 for a row the run saw. Its COMMIT fails (25000) and rolls
    back, in a transaction block and in a procedure alike; inserts before
    the CALL and updates after it commit. Once 11 is inserted on its own,
    every row is exported exactly once. (Row 11 used to be lost.)"""
    conn.execute("""
        DROP TABLE IF EXISTS job_after_call;
        CREATE TABLE job_after_call (id bigserial PRIMARY KEY, v text NOT NULL);
        INSERT INTO job_after_call (v) SELECT 'v' || g FROM generate_series(1, 10) g;
        CREATE OR REPLACE PROCEDURE job_after_call_proc(id bigint) LANGUAGE plpgsql AS $$
        BEGIN
            CALL stream_export_increment('after_call');
            INSERT INTO job_after_call (id, v) VALUES (id, 'after the call, in a procedure');
        END $$;
    """)
    wait_for_no_other_transaction(conn)
    fresh_job(conn, "after_call", "job_after_call", server_dir)
    conn.execute("CALL stream_export_increment('after_call')")
    conn.execute("BEGIN")
    (drawn,) = conn.execute("SELECT nextval('job_after_call_id_seq')").fetchone()
    with server.connect() as other:
        other.execute("INSERT INTO job_after_call (v) VALUES ('other')")
    conn.execute("CALL stream_export_increment('after_call')")
    conn.execute("INSERT INTO job_after_call (id, v) VALUES (%s, 'after the call')", [drawn])
    with pytest.raises(psycopg.errors.InvalidTransactionState) as refused:
        conn.execute("COMMIT")
    assert "inserted into" in str(refused.value) and "after_call" in str(refused.value)
    assert conn.execute("SELECT count(*) FROM job_after_call WHERE id = %s", [drawn]).fetchone() == (0,)
    with pytest.raises(psycopg.errors.InvalidTransactionState):
        conn.execute("CALL job_after_call_proc(%s)", [drawn])
    # A run rolled back to a savepoint protects nothing: the insert commits.
    conn.execute("BEGIN")
    conn.execute("SAVEPOINT before_run")
    conn.execute("CALL stream_export_increment('after_call')")
    conn.execute("ROLLBACK TO SAVEPOINT before_run")
    conn.execute("INSERT INTO job_after_call (v) VALUES ('after a rolled-back run')")
    conn.execute("COMMIT")
    # An inheritance child is the job's table too.
    conn.execute("CREATE TABLE job_after_call_child () INHERITS (job_after_call)")
    conn.execute("BEGIN")
    conn.execute("CALL stream_export_increment('after_call')")
    conn.execute("INSERT INTO job_after_call_child (v) VALUES ('child, after the call')")
    with pytest.raises(psycopg.errors.InvalidTransactionState):
        conn.execute("COMMIT")
    conn.execute("DROP TABLE job_after_call_child")
    # Inserts before the CALL, and updates after it, commit.
    with conn.transaction():
        conn.execute("INSERT INTO job_after_call (v) VALUES ('before the call')")
        conn.execute("CALL stream_export_increment('after_call')")
        conn.execute("UPDATE job_after_call SET v = 'updated after the call' WHERE id = 1")
    conn.execute("INSERT INTO job_after_call (id, v) VALUES (%s, 'on its own')", [drawn])
    wait_for_no_other_transaction(conn)
    conn.execute("CALL stream_export_increment('after_call')")
    conn.execute("CALL stream_export_increment('after_call')")
    lines = recorded_lines(conn, "after_call")
    ids = [json.loads(line)["id"] for line in lines]
    assert sorted(ids) == sorted(set(ids)) == [r[0] for r in conn.execute(
        "SELECT id FROM job_after_call ORDER BY id")]
    assert drawn in ids


def test_a_key_above_the_position_is_exported_when_the_largest_key_at_creation_is_gone(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_gone;
        CREATE TABLE job_gone (id bigserial PRIMARY KEY, v text NOT NULL);
        INSERT INTO job_gone (v) SELECT 'v' || g FROM generate_series(1, 10) g;
    """)
    wait_for_no_other_transaction(conn)
    fresh_job(conn, "gone", "job_gone", server_dir)
    conn.execute("DELETE FROM job_gone WHERE id = 10")
    conn.execute("CALL stream_export_increment('gone')")
    # Key 10 (the largest when the job was made) is above part 1's
    # position (9): an application that writes it again has it exported.
    conn.execute("INSERT INTO job_gone VALUES (10, 'again'), (11, 'new')")
    conn.execute("CALL stream_export_increment('gone')")
    assert conn.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'gone' ORDER BY part"
                        ).fetchall() == [(1, 9), (2, 2)]
    assert recorded_lines(conn, "gone") == oracle(conn, "job_gone")


def test_a_job_reads_a_table_and_nothing_else(conn, server_dir):
    conn.execute("""
        DROP VIEW IF EXISTS job_view;
        DROP TABLE IF EXISTS job_base;
        CREATE TABLE job_base (id int PRIMARY KEY, v text);
        INSERT INTO job_base SELECT g, 'v' || g FROM generate_series(1, 10) g;
        CREATE VIEW job_view AS SELECT * FROM job_base;
    """)
    conn.execute("DELETE FROM stream_export_job WHERE name LIKE 'notable%'")
    create = "SELECT stream_export_job_create(%s, %s, 'id', %s)"
    assert sqlstate_of(conn, create, ["notable1", "job_view", str(server_dir)]) == "0A000"
    assert sqlstate_of(conn, create, ["notable2", "SELECT * FROM job_base", str(server_dir)]) == "0A000"
    # A job whose source became a view fails its run with 0A000.
    conn.execute(create, ["notable3", "job_base", str(server_dir)])
    conn.execute("""
        ALTER TABLE job_base RENAME TO job_base_old;
        CREATE VIEW job_base AS SELECT * FROM job_base_old;
    """)
    try:
        assert sqlstate_of(conn, "CALL stream_export_increment('notable3')") == "0A000"
    finally:
        conn.execute("DROP VIEW job_base; ALTER TABLE job_base_old RENAME TO job_base")
    assert list(server_dir.iterdir()) == []


# --- B. recovery only of what is this job's and still true ---------------------------

def test_a_rolled_back_run_is_not_recovered(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_rollback;
        CREATE TABLE job_rollback (id int PRIMARY KEY, v text);
        INSERT INTO job_rollback SELECT g, 'v' || g FROM generate_series(1, 10) g;
    """)
    fresh_job(conn, "rollback", "job_rollback", server_dir)
    conn.execute("CALL stream_export_increment('rollback')")
    conn.execute("INSERT INTO job_rollback SELECT g, 'v' || g FROM generate_series(11, 20) g")
    with conn.transaction(force_rollback=True):
        conn.execute("DELETE FROM job_rollback WHERE id = 15")
        conn.execute("CALL stream_export_increment('rollback')")
    # The part the rolled-back run left is there, without row 15.
    assert (server_dir / "rollback-00000002.ndjson").exists()
    conn.execute("CALL stream_export_increment('rollback')")
    assert conn.execute("SELECT part, rows, recovered FROM stream_export_job_part WHERE job = 'rollback' "
                        "ORDER BY part").fetchall() == [(1, 10, False), (2, 10, False)]
    assert recorded_lines(conn, "rollback") == oracle(conn, "job_rollback")


def test_a_run_whose_commit_failed_is_not_recovered(server, server_dir):
    with server.connect(autocommit=False) as c:
        c.execute("""
            DROP TABLE IF EXISTS job_fk_child;
            DROP TABLE IF EXISTS job_fk_parent;
            CREATE TABLE job_fk_parent (id int PRIMARY KEY);
            CREATE TABLE job_fk_child (id int PRIMARY KEY,
                parent int REFERENCES job_fk_parent DEFERRABLE INITIALLY DEFERRED);
            INSERT INTO job_fk_parent VALUES (1);
            INSERT INTO job_fk_child SELECT g, 1 FROM generate_series(1, 10) g;
        """)
        c.commit()
        c.execute("DELETE FROM stream_export_job WHERE name = 'fk'")
        c.execute("SELECT stream_export_job_create('fk', 'job_fk_child', 'id', %s)", [str(server_dir)])
        c.execute("CALL stream_export_increment('fk')")
        c.commit()
        c.execute("INSERT INTO job_fk_child SELECT g, 1 FROM generate_series(11, 20) g")
        c.commit()
        c.execute("INSERT INTO job_fk_child VALUES (21, 999)")  # no such parent: COMMIT fails
        c.execute("CALL stream_export_increment('fk')")
        with pytest.raises(psycopg.Error) as failed:
            c.commit()
        assert failed.value.sqlstate == "23503"
    with server.connect() as c:
        notices: list[str] = []
        c.add_notice_handler(lambda d: notices.append(d.message_primary))
        c.execute("CALL stream_export_increment('fk')")
        assert "recovered" not in notices[-1]
        assert c.execute("SELECT part, rows, recovered FROM stream_export_job_part WHERE job = 'fk' "
                         "ORDER BY part").fetchall() == [(1, 10, False), (2, 10, False)]
        assert recorded_lines(c, "fk") == oracle(c, "job_fk_child")


def test_a_restored_copy_of_the_database_does_not_take_the_destination(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_restored;
        CREATE TABLE job_restored (id int PRIMARY KEY, v text);
        INSERT INTO job_restored SELECT g, 'prod ' || g FROM generate_series(1, 50) g;
    """)
    fresh_job(conn, "restored", "job_restored", server_dir)
    conn.execute("CALL stream_export_increment('restored')")
    with server.connect(dbname="postgres") as admin:
        admin.execute("DROP DATABASE IF EXISTS e2e_staging")
        # The copy holds the job, its history and its table, as a restore would.
        conn.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                     "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        conn.close()
        admin.execute("CREATE DATABASE e2e_staging TEMPLATE e2e")
    try:
        with server.connect(dbname="e2e_staging") as staging:
            staging.execute("INSERT INTO job_restored SELECT g, 'staging ' || g FROM generate_series(51, 100) g")
            before = sorted(p.name for p in server_dir.iterdir())
            try:
                staging.execute("CALL stream_export_increment('restored')")
                raise AssertionError("the copy wrote into production's destination")
            except psycopg.Error as e:
                assert e.sqlstate == "55000"
                assert '"e2e"' in e.diag.message_primary and "restored" in e.diag.message_primary
            assert sorted(p.name for p in server_dir.iterdir()) == before
        with server.connect() as prod:
            # A second job pointed at the same destination is refused too.
            fresh_job(prod, "restored-2", "job_restored", server_dir)
            prod.execute("SELECT stream_export_job_drop('restored-2')")
            prod.execute("INSERT INTO job_restored SELECT g, 'prod ' || g FROM generate_series(51, 60) g")
            prod.execute("CALL stream_export_increment('restored')")
            assert recorded_lines(prod, "restored") == oracle(prod, "job_restored")
    finally:
        with server.connect(dbname="postgres") as admin:
            admin.execute("DROP DATABASE IF EXISTS e2e_staging")


def test_a_second_job_does_not_take_another_jobs_destination(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_second;
        CREATE TABLE job_second (id int PRIMARY KEY);
        INSERT INTO job_second SELECT generate_series(1, 30);
    """)
    fresh_job(conn, "second", "job_second", server_dir)
    conn.execute("CALL stream_export_increment('second')")
    # Dropped and made again: a new job, which finds the old one's parts.
    conn.execute("SELECT stream_export_job_drop('second')")
    fresh_job(conn, "second", "job_second", server_dir)
    before = {p.name: p.read_bytes() for p in server_dir.iterdir()}
    assert sqlstate_of(conn, "CALL stream_export_increment('second')") == "55000"
    assert {p.name: p.read_bytes() for p in server_dir.iterdir()} == before


# --- C. the key's type --------------------------------------------------------------

def test_a_changed_key_type_stops_the_job(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_keytype;
        CREATE TABLE job_keytype (id int PRIMARY KEY, v text);
        INSERT INTO job_keytype SELECT g, 'v' || g FROM generate_series(1, 20) g;
    """)
    fresh_job(conn, "keytype", "job_keytype", server_dir)
    assert conn.execute("SELECT key_type FROM stream_export_job WHERE name = 'keytype'").fetchone() == ("integer",)
    conn.execute("CALL stream_export_increment('keytype')")
    conn.execute("ALTER TABLE job_keytype ALTER id TYPE text")
    try:
        conn.execute("CALL stream_export_increment('keytype')")
        raise AssertionError("ran with a changed key type")
    except psycopg.Error as e:
        assert e.sqlstate == "55000"
        message = e.diag.message_primary
        assert '"id"' in message and "integer" in message and "text" in message
    # A table made again under the name, with a uuid key.
    conn.execute("""
        DROP TABLE job_keytype;
        CREATE TABLE job_keytype (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), v text);
        INSERT INTO job_keytype (v) SELECT 'u' || g FROM generate_series(1, 5) g;
    """)
    assert sqlstate_of(conn, "CALL stream_export_increment('keytype')") == "55000"
    assert conn.execute("SELECT parts FROM stream_export_job WHERE name = 'keytype'").fetchone() == (1,)


# --- D. names, the catalog, roles ---------------------------------------------------

def make_role(conn, role: str) -> None:
    conn.execute(f"""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = '{role}') THEN
                CREATE ROLE {role} LOGIN;
            END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO {role};
    """)


def test_owners_change_the_catalog_only_through_the_functions(server, conn, server_dir):
    make_role(conn, "job_plain")
    conn.execute("""
        DROP TABLE IF EXISTS job_catalog;
        CREATE TABLE job_catalog (id int PRIMARY KEY);
        INSERT INTO job_catalog SELECT generate_series(1, 10);
        GRANT SELECT ON job_catalog TO job_plain;
        DELETE FROM stream_export_job WHERE name = 'plain';
    """)
    with psycopg.connect(server.dsn(user="job_plain"), autocommit=True) as plain:
        plain.execute("SELECT stream_export_job_create('plain', 'job_catalog', 'id', %s)", [str(server_dir)])
        plain.execute("CALL stream_export_increment('plain')")
        for statement in ["UPDATE stream_export_job SET name = '../esc' WHERE name = 'plain'",
                          "UPDATE stream_export_job SET position = NULL WHERE name = 'plain'",
                          "UPDATE stream_export_job_part SET rows = 0 WHERE job = 'plain'",
                          "DELETE FROM stream_export_job_part WHERE job = 'plain'",
                          "DELETE FROM stream_export_job WHERE name = 'plain'",
                          """INSERT INTO stream_export_job (name, source, key, destination)
                             VALUES ('mine', 'job_catalog', 'id', '/tmp')"""]:
            assert sqlstate_of(plain, statement) == "42501", statement
        # Still readable, and removable through the function.
        assert plain.execute("SELECT parts FROM stream_export_job WHERE name = 'plain'").fetchone() == (1,)
        plain.execute("SELECT stream_export_job_drop('plain')")
        assert plain.execute("SELECT count(*) FROM stream_export_job_part WHERE job = 'plain'").fetchone() == (0,)
        assert sqlstate_of(plain, "SELECT stream_export_job_drop('plain')") == "42704"


def test_the_name_is_checked_at_every_run(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS job_renamed;
        CREATE TABLE job_renamed (id int PRIMARY KEY);
        INSERT INTO job_renamed SELECT generate_series(1, 10);
    """)
    fresh_job(conn, "renamed", "job_renamed", server_dir)
    # Only a superuser can still change the row by hand.
    conn.execute("UPDATE stream_export_job SET name = '../esc' WHERE name = 'renamed'")
    try:
        assert sqlstate_of(conn, "CALL stream_export_increment('../esc')") == "22023"
    finally:
        conn.execute("DELETE FROM stream_export_job WHERE name = '../esc'")
    assert list(server_dir.iterdir()) == []
    assert not (server_dir.parent / "esc-00000001.ndjson").exists()


def test_a_role_that_owns_jobs_is_not_dropped_without_them(server, conn, server_dir):
    conn.execute("LOAD 'pg_stream_export'")  # the hook is in the library
    for role in ("job_leaving", "job_heir"):
        conn.execute(f"DROP OWNED BY {role}" if conn.execute(
            "SELECT FROM pg_roles WHERE rolname = %s", [role]).fetchone() else "SELECT")
        make_role(conn, role)
    conn.execute("""
        DROP TABLE IF EXISTS job_roles;
        CREATE TABLE job_roles (id int PRIMARY KEY);
        INSERT INTO job_roles SELECT generate_series(1, 10);
        GRANT SELECT ON job_roles TO job_leaving, job_heir;
    """)
    with psycopg.connect(server.dsn(user="job_leaving"), autocommit=True) as leaving:
        for job in ("leaving-a", "leaving-b"):
            leaving.execute("SELECT stream_export_job_create(%s, 'job_roles', 'id', %s)", [job, str(server_dir)])
    # Nothing but its jobs holds the role back.
    conn.execute("REVOKE ALL ON job_roles FROM job_leaving")
    try:
        conn.execute("DROP ROLE job_leaving")
        raise AssertionError("a role that owns jobs was dropped")
    except psycopg.Error as e:
        assert e.sqlstate == "2BP01"
        assert "leaving-a" in e.diag.message_primary and '"e2e"' in e.diag.message_primary
        assert "DROP OWNED" in (e.diag.message_hint or "")
    # REASSIGN OWNED gives the jobs away; DROP OWNED removes what is left.
    conn.execute("REASSIGN OWNED BY job_leaving TO job_heir")
    assert conn.execute("SELECT array_agg(owner::text ORDER BY name) FROM stream_export_job "
                        "WHERE name LIKE 'leaving-%'").fetchone() == (["job_heir", "job_heir"],)
    # The pin moved with the jobs.
    assert "job_heir" in pins(conn) and "job_leaving" not in pins(conn)
    conn.execute("DROP OWNED BY job_leaving")
    conn.execute("DROP ROLE job_leaving")
    with psycopg.connect(server.dsn(user="job_heir"), autocommit=True) as heir:
        heir.execute("CALL stream_export_increment('leaving-a')")
    conn.execute("REVOKE ALL ON job_roles FROM job_heir")
    conn.execute("DROP OWNED BY job_heir")
    assert conn.execute("SELECT count(*) FROM stream_export_job WHERE name LIKE 'leaving-%'").fetchone() == (0,)
    conn.execute("DROP ROLE job_heir")


def pins(conn) -> list[str]:
    """The roles pinned by a policy on stream_export_job_owners."""
    return [r[0] for r in conn.execute(
        "SELECT r.rolname::text FROM pg_policy p JOIN pg_roles r ON r.oid = ANY (p.polroles) "
        "WHERE p.polrelid = 'stream_export_job_owners'::regclass ORDER BY 1")]


def test_a_role_that_owns_jobs_is_pinned_without_the_library_and_from_any_database(server, conn, server_dir):
    """Without the library loaded, and from another database, DROP ROLE of
    a role that owns jobs is refused (2BP01); DROP OWNED BY it, in a
    session that never loaded the library, removes its jobs, and then the
    role can be dropped. (Before, DROP ROLE from another database, or
    after DROP OWNED in a session without the library, left its jobs with
    an owner that no longer exists.)"""
    role = "job_pinned"
    if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", [role]).fetchone():
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    make_role(conn, role)
    conn.execute("""
        DROP TABLE IF EXISTS job_pinned;
        CREATE TABLE job_pinned (id int PRIMARY KEY);
        INSERT INTO job_pinned SELECT generate_series(1, 10);
    """)
    conn.execute(f"GRANT SELECT ON job_pinned TO {role}")
    with psycopg.connect(server.dsn(user=role), autocommit=True) as owner:
        owner.execute("SELECT stream_export_job_create('pinned-a', 'job_pinned', 'id', %s)", [str(server_dir)])
        owner.execute("SELECT stream_export_job_create('pinned-b', 'job_pinned', 'id', %s)", [str(server_dir)])
        owner.execute("CALL stream_export_increment('pinned-a')")
    conn.execute(f"REVOKE ALL ON job_pinned FROM {role}")
    assert role in pins(conn)
    # From another database, where neither the extension nor its library is.
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as other:
        with pytest.raises(psycopg.errors.DependentObjectsStillExist) as refused:
            other.execute(f"DROP ROLE {role}")
        assert "1 object in database e2e" in (refused.value.diag.message_detail or "")
    # A session of this database that never loaded the library.
    with psycopg.connect(server.dsn(), autocommit=True) as plain:
        with pytest.raises(psycopg.errors.DependentObjectsStillExist) as refused:
            plain.execute(f"DROP ROLE {role}")
        assert "stream_export_job_owners" in (refused.value.diag.message_detail or "")
        plain.execute(f"DROP OWNED BY {role}")
    assert conn.execute("SELECT count(*) FROM stream_export_job WHERE name LIKE 'pinned-%'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM stream_export_job_part WHERE job LIKE 'pinned-%'").fetchone() == (0,)
    assert role not in pins(conn)
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as other:
        other.execute(f"DROP ROLE {role}")
    # The last job of an owner dropped by the function releases the pin.
    make_role(conn, role)
    conn.execute(f"GRANT SELECT ON job_pinned TO {role}")
    with psycopg.connect(server.dsn(user=role), autocommit=True) as owner:
        owner.execute("SELECT stream_export_job_create('pinned-c', 'job_pinned', 'id', %s)", [str(server_dir)])
        assert role in pins(conn)
        owner.execute("SELECT stream_export_job_drop('pinned-c')")
    assert role not in pins(conn)
    conn.execute(f"REVOKE ALL ON job_pinned FROM {role}")
    conn.execute(f"DROP ROLE {role}")


def test_an_owners_last_job_dropped_while_its_next_is_made_leaves_it_pinned(server, conn, server_dir):
    """One session drops an owner's last job (its pin goes) and has not
    committed; another makes the owner's next job. The second waits for
    the first, then pins the owner again: the role cannot be dropped.
    (Without the wait it saw the old pin, made none, and DROP ROLE
    succeeded once the first committed.)"""
    role = "job_racer"
    if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", [role]).fetchone():
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    make_role(conn, role)
    conn.execute("DROP TABLE IF EXISTS job_race; CREATE TABLE job_race (id int PRIMARY KEY)")
    conn.execute(f"GRANT SELECT ON job_race TO {role}")
    with psycopg.connect(server.dsn(user=role), autocommit=True) as first, \
            psycopg.connect(server.dsn(user=role), autocommit=True) as second:
        first.execute("SELECT stream_export_job_create('race-old', 'job_race', 'id', %s)", [str(server_dir)])
        first.execute("BEGIN")
        first.execute("SELECT stream_export_job_drop('race-old')")
        thread, result = run_in_thread(lambda: second.execute(
            "SELECT stream_export_job_create('race-new', 'job_race', 'id', %s)", [str(server_dir)]))
        wait_until(lambda: conn.execute(
            "SELECT FROM pg_locks WHERE NOT granted AND relation = 'stream_export_job_owners'::regclass"
        ).fetchone() is not None)
        first.execute("COMMIT")
        thread.join(60)
        assert not thread.is_alive() and "error" not in result, result
    assert pins(conn).count(role) == 1
    conn.execute(f"REVOKE ALL ON job_race FROM {role}")
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as other:
        with pytest.raises(psycopg.errors.DependentObjectsStillExist):
            other.execute(f"DROP ROLE {role}")
    conn.execute(f"DROP OWNED BY {role}")
    conn.execute(f"DROP ROLE {role}")


def test_drop_owned_under_session_replication_role_replica_still_removes_the_jobs(server, conn, server_dir):
    """Triggers and event triggers of the default kind do not fire under
    session_replication_role = replica; the pins' do (ENABLE ALWAYS), so
    DROP OWNED there removes the jobs with the pin, and a job made under
    it is pinned."""
    role = "job_replica"
    if conn.execute("SELECT FROM pg_roles WHERE rolname = %s", [role]).fetchone():
        conn.execute(f"DROP OWNED BY {role}")
        conn.execute(f"DROP ROLE {role}")
    make_role(conn, role)
    conn.execute("DROP TABLE IF EXISTS job_replica; CREATE TABLE job_replica (id int PRIMARY KEY)")
    conn.execute(f"GRANT SELECT ON job_replica TO {role}")
    conn.execute(f"SET ROLE {role}")
    conn.execute("SELECT stream_export_job_create('replica-a', 'job_replica', 'id', %s)", [str(server_dir)])
    conn.execute("RESET ROLE")
    conn.execute("SET session_replication_role = replica")
    try:
        conn.execute(f"SET ROLE {role}")
        conn.execute("SELECT stream_export_job_create('replica-b', 'job_replica', 'id', %s)", [str(server_dir)])
        conn.execute("RESET ROLE")
        conn.execute(f"REVOKE ALL ON job_replica FROM {role}")
        with psycopg.connect(server.dsn(), autocommit=True) as plain:
            plain.execute("SET session_replication_role = replica")
            plain.execute(f"DROP OWNED BY {role}")
    finally:
        conn.execute("RESET session_replication_role")
    assert conn.execute("SELECT count(*) FROM stream_export_job WHERE name LIKE 'replica-%'").fetchone() == (0,)
    assert role not in pins(conn)
    conn.execute(f"DROP ROLE {role}")


def test_frozen_rows_more_than_two_billion_ids_old_are_not_late(server_dir):
    """A frozen row keeps its raw xmin. Once the server is more than 2^31
    ids past it, that xmin widened against a run's snapshot lands after the
    snapshot, and a window that reaches the row (here: a job made and run
    in one transaction, whose floor is "from the start") took every such
    row for a late one and exported it again."""
    srv = start_cluster("")

    def next_xid() -> int:
        out = subprocess.run(_as_postgres([str(PG_BIN / "pg_controldata"), str(srv.data)]),
                             check=True, capture_output=True, text=True).stdout
        return int(next(line for line in out.splitlines() if "NextXID" in line).split(":")[-1])

    def freeze_all() -> None:
        with srv.connect("postgres") as c:
            c.execute("UPDATE pg_database SET datallowconn = true WHERE datname = 'template0'")
        for database in ("postgres", "template0", "template1", "e2e"):
            with srv.connect(database) as c:
                c.execute("VACUUM FREEZE")
        with srv.connect("postgres") as c:
            c.execute("UPDATE pg_database SET datallowconn = false WHERE datname = 'template0'")
            c.execute("CHECKPOINT")

    def jump_to(xid: int) -> None:
        srv.pg_ctl("-m", "fast", "-w", "stop")
        segment = srv.data / "pg_xact" / f"{xid >> 20:04X}"
        if not segment.exists():
            segment.write_bytes(b"\0" * 262144)
            shutil.chown(segment, "postgres", "postgres")
        subprocess.run(_as_postgres([str(PG_BIN / "pg_resetwal"), "-x", str(xid), "-f", str(srv.data)]),
                       check=True, capture_output=True)
        srv.start()

    try:
        with srv.connect() as c:
            c.execute("CREATE TABLE job_frozen (id bigserial PRIMARY KEY, v text NOT NULL);"
                      " INSERT INTO job_frozen (v) SELECT 'old ' || g FROM generate_series(1, 10) g")
        freeze_all()
        jump_to(next_xid() + 2**31 - 60_000_000)
        freeze_all()
        jump_to(next_xid() + 100_000_000)
        with srv.connect() as c:
            (raw,) = c.execute("SELECT min(xmin::text::bigint) FROM job_frozen").fetchone()
            (now,) = c.execute("SELECT pg_current_xact_id()::text::bigint").fetchone()
            assert now - raw > 2**31
            with c.transaction():
                c.execute("SELECT stream_export_job_create('frozen', 'job_frozen', 'id', %s)", [str(server_dir)])
                c.execute("CALL stream_export_increment('frozen')")
            c.execute("INSERT INTO job_frozen (v) VALUES ('new')")
            c.execute("CALL stream_export_increment('frozen')")
            assert c.execute("SELECT part, rows FROM stream_export_job_part WHERE job = 'frozen' ORDER BY part"
                             ).fetchall() == [(1, 10), (2, 1)]
            assert sorted(recorded_lines(c, "frozen")) == sorted(oracle(c, "job_frozen"))
    finally:
        stop_cluster(srv)
