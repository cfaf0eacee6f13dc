"""Archival: CALL stream_export_archive exports the matching rows of a table
chunk by chunk, reads each chunk back and verifies it, and only then
deletes exactly its rows.

What must hold: the parts the catalog lists hold exactly the rows that are
gone from the table, each as row_to_json rendered it when it was deleted;
no row that changed concurrently is deleted unexported; a killed backend
deletes nothing it did not record; errors have their SQLSTATEs and delete
nothing.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
from pathlib import Path

import psycopg
import pytest

from helpers import listed_part_lines, oracle_lines, run_in_thread, sqlstate_of, wait_for_server, wait_until


def archived_lines(conn, table: str) -> list[str]:
    """Every record line of the parts the catalog lists for `table`, in
    archive and part order."""
    return listed_part_lines(
        conn, "SELECT target, rows FROM stream_export_archive_part WHERE source = %s "
              "ORDER BY finished_at, part", [table])


def make_table(conn, table: str, rows: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {table} CASCADE")
    conn.execute(f"""
        CREATE TABLE {table} (id bigint PRIMARY KEY, at timestamptz NOT NULL, note text, doc jsonb);
        INSERT INTO {table}
        SELECT g, timestamptz '2025-01-01 00:00+00' + g * interval '1 hour',
               'note ' || g || E' \\u00e9 "q" \\\\', jsonb_build_object('g', g)
        FROM generate_series(1, {rows}) g""")


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_archive_exports_verifies_then_deletes_exactly_the_matching_rows(conn, server_dir, compression):
    table = f"arch_{compression}"
    make_table(conn, table, 5000)
    condition = "at < timestamptz '2025-03-01 00:00+00' AND id % 3 <> 0"
    matching = f"SELECT * FROM {table} WHERE {condition} ORDER BY id"
    expected = oracle_lines(conn, matching)
    kept = oracle_lines(conn, f"SELECT * FROM {table} WHERE NOT ({condition}) ORDER BY id")
    notices: list[str] = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))

    conn.execute("CALL stream_export_archive(%s, %s, 'id', condition => %s, chunk_rows => 300, "
                 "compression => %s)", [table, str(server_dir), condition, compression])
    assert len(expected) == 944
    assert f"{len(expected)} rows in 4 chunk(s)" in notices[-1]
    # Gone from the table: exactly the matching rows; the others untouched.
    assert oracle_lines(conn, f"SELECT * FROM {table} ORDER BY id") == kept
    # Archived: exactly those rows, in key order, as row_to_json rendered them.
    assert archived_lines(conn, table) == expected
    parts = conn.execute(
        "SELECT part, rows, crc32, after_key, last_key, target FROM stream_export_archive_part "
        "WHERE source = %s ORDER BY part", [table]).fetchall()
    assert [p[:2] for p in parts] == [(0, 300), (1, 300), (2, 300), (3, 44)]
    assert parts[0][3] is None and all(parts[i][3] == parts[i - 1][4] for i in range(1, 4))
    suffix = {"none": "", "gzip": ".gz", "zstd": ".zst"}[compression]
    assert sorted(p.name for p in server_dir.iterdir()) == sorted(Path(p[5]).name for p in parts)
    for _, rows, crc, _, _, target in parts:
        assert target.endswith(f".ndjson{suffix}")
        assert conn.execute("SELECT ok, rows, crc32 FROM stream_export_verify(%s)",
                            [target]).fetchone() == (True, rows, crc)
    # Nothing left to archive: a second call archives nothing.
    conn.execute("CALL stream_export_archive(%s, %s, 'id', condition => %s)",
                 [table, str(server_dir), condition])
    assert "0 rows in 0 chunk(s)" in notices[-1]
    assert len(list(server_dir.iterdir())) == 4


def test_a_partition_is_archived_then_dropped(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS arch_parted;
        CREATE TABLE arch_parted (id int, day date, v text, PRIMARY KEY (id, day)) PARTITION BY RANGE (day);
        CREATE TABLE arch_parted_2024 PARTITION OF arch_parted FOR VALUES FROM ('2024-01-01') TO ('2025-01-01');
        CREATE TABLE arch_parted_2025 PARTITION OF arch_parted FOR VALUES FROM ('2025-01-01') TO ('2026-01-01');
        CREATE UNIQUE INDEX ON arch_parted_2024 (id);
        INSERT INTO arch_parted SELECT g, date '2024-06-01' + (g % 400), 'v' || g FROM generate_series(1, 2000) g;
    """)
    expected = oracle_lines(conn, "SELECT * FROM arch_parted_2024 ORDER BY id")
    conn.execute("CALL stream_export_archive('arch_parted_2024', %s, 'id', chunk_rows => 500)", [str(server_dir)])
    assert conn.execute("SELECT count(*) FROM arch_parted_2024").fetchone() == (0,)
    assert archived_lines(conn, "arch_parted_2024") == expected
    conn.execute("DROP TABLE arch_parted_2024")
    assert conn.execute("SELECT count(*) FROM arch_parted").fetchone()[0] == 2000 - len(expected)


def test_archive_errors_have_their_sqlstates_and_delete_nothing(server, conn, server_dir):
    make_table(conn, "arch_err", 100)
    conn.execute("CREATE OR REPLACE VIEW arch_err_view AS SELECT * FROM arch_err")
    conn.execute("DROP TABLE IF EXISTS arch_err_nokey; CREATE TABLE arch_err_nokey (id int, v text)")
    conn.execute("INSERT INTO arch_err_nokey VALUES (1, 'a'), (1, 'b')")
    d = str(server_dir)
    call = "CALL stream_export_archive(%s, %s, %s, condition => %s, chunk_rows => %s, compression => %s)"
    cases = [
        (["arch_err_view", d, "id", None, 10, "none"], "42809"),
        (["SELECT * FROM arch_err", d, "id", None, 10, "none"], "42809"),
        (["no_such_table", d, "id", None, 10, "none"], "42P01"),
        (["arch_err", d, "nope", None, 10, "none"], "42703"),
        (["arch_err_nokey", d, "id", None, 10, "none"], "22023"),
        (["arch_err", d, "id", "id <", 10, "none"], "42601"),
        (["arch_err", d, "id", "no_column > 1", 10, "none"], "42703"),
        (["arch_err", d, "id", "true) UNION ALL (SELECT * FROM arch_err", 10, "none"], "42601"),
        (["arch_err", d, "id", None, 0, "none"], "22023"),
        (["arch_err", d, "id", None, 10, "lz4"], "22023"),
        (["arch_err", d + "/missing", "id", None, 10, "none"], "58P01"),
        ([None, d, "id", None, 10, "none"], "22004"),
        (["arch_err", d, None, None, 10, "none"], "22004"),
    ]
    for args, code in cases:
        assert sqlstate_of(conn, call, args) == code, args
    # It commits, so it runs only on its own.
    with server.connect(autocommit=False) as tx:
        assert sqlstate_of(tx, "CALL stream_export_archive('arch_err', %s, 'id')", [d]) == "25001"
    # Without DELETE on the table: refused before anything is written.
    conn.execute("""
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'arch_reader') THEN
                CREATE ROLE arch_reader LOGIN;
            END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO arch_reader;
        GRANT SELECT ON arch_err TO arch_reader;
    """)
    with psycopg.connect(server.dsn(user="arch_reader"), autocommit=True) as reader:
        assert sqlstate_of(reader, "CALL stream_export_archive('arch_err', %s, 'id')", [d]) == "42501"
    assert conn.execute("SELECT count(*) FROM arch_err").fetchone() == (100,)
    assert list(server_dir.iterdir()) == []
    assert conn.execute("SELECT count(*) FROM stream_export_archive_part WHERE source LIKE 'arch_err%'"
                        ).fetchone() == (0,)


def test_archive_runs_with_the_callers_privileges_and_row_security(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS arch_rls;
        CREATE TABLE arch_rls (id int PRIMARY KEY, tenant text, v text);
        INSERT INTO arch_rls SELECT g, CASE WHEN g % 4 = 0 THEN 'other' ELSE 'mine' END, 'v' || g
        FROM generate_series(1, 400) g;
        ALTER TABLE arch_rls ENABLE ROW LEVEL SECURITY;
        CREATE POLICY mine ON arch_rls USING (tenant = 'mine');
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'arch_owner') THEN
                CREATE ROLE arch_owner LOGIN;
            END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO arch_owner;
        GRANT SELECT, DELETE ON arch_rls TO arch_owner;
    """)
    mine = oracle_lines(conn, "SELECT * FROM arch_rls WHERE tenant = 'mine' ORDER BY id")
    with psycopg.connect(server.dsn(user="arch_owner"), autocommit=True) as owner:
        owner.execute("CALL stream_export_archive('arch_rls', %s, 'id', chunk_rows => 100)", [str(server_dir)])
        assert archived_lines(owner, "arch_rls") == mine
        assert owner.execute("SELECT count(*) FROM arch_rls").fetchone() == (0,)
    # The rows the role could not see are still there; the catalog is the
    # role's own.
    assert conn.execute("SELECT count(*), bool_and(tenant = 'other') FROM arch_rls").fetchone() == (100, True)
    assert conn.execute("SELECT DISTINCT owner::text FROM stream_export_archive_part WHERE source = 'arch_rls'"
                        ).fetchall() == [("arch_owner",)]
    with psycopg.connect(server.dsn(user="arch_reader"), autocommit=True) as other:
        assert other.execute("SELECT count(*) FROM stream_export_archive_part WHERE source = 'arch_rls'"
                             ).fetchone() == (0,)


def test_rows_changed_by_a_concurrent_writer_are_never_deleted_unexported(server, conn, server_dir):
    """A writer inserts rows into the window and updates rows in it while
    the archive runs; the archive retries a chunk a conflict rolled back.
    Every row ends up either still in the table or in a listed part, never
    both, never twice, and a listed part holds the row's last version."""
    table, rows = "arch_busy", 20_000
    conn.execute(f"DROP TABLE IF EXISTS {table}")
    conn.execute(f"""
        CREATE TABLE {table} (id bigint PRIMARY KEY, old boolean NOT NULL, v int NOT NULL);
        INSERT INTO {table} SELECT g, g % 2 = 0, 0 FROM generate_series(1, {rows}) g""")
    last_value = {i: 0 for i in range(1, rows + 1)}
    old = {i: i % 2 == 0 for i in range(1, rows + 1)}
    stop = threading.Event()
    counts = {"updates": 0, "inserts": 0}

    def write():
        rng = random.Random(7)
        next_id = rows + 1
        with server.connect() as w:
            while not stop.is_set():
                if rng.random() < 0.3:
                    # Inserted into the window: keys interleave with those
                    # being archived only by being new (the largest).
                    w.execute(f"INSERT INTO {table} VALUES (%s, true, 0)", [next_id])
                    last_value[next_id], old[next_id] = 0, True
                    next_id += 1
                    counts["inserts"] += 1
                else:
                    target = rng.randrange(1, next_id)
                    value = rng.randrange(1, 1_000_000)
                    if w.execute(f"UPDATE {table} SET v = %s WHERE id = %s", [value, target]).rowcount == 1:
                        last_value[target] = value
                        counts["updates"] += 1

    writer, result = run_in_thread(write)
    attempts = 0
    try:
        while True:
            attempts += 1
            try:
                conn.execute(f"CALL stream_export_archive('{table}', %s, 'id', condition => 'old', "
                             "chunk_rows => 200)", [str(server_dir)])
            except psycopg.errors.SerializationFailure:
                assert attempts < 200
                continue
            if counts["updates"] > 300 and counts["inserts"] > 100:
                break
    finally:
        stop.set()
        writer.join()
    assert "error" not in result, result
    # Once more with the writer gone: every old row is archived.
    conn.execute(f"CALL stream_export_archive('{table}', %s, 'id', condition => 'old')", [str(server_dir)])

    archived = {}
    for line in archived_lines(conn, table):
        value = json.loads(line)
        assert value["id"] not in archived, f"row {value['id']} archived twice"
        archived[value["id"]] = value
    remaining = {r[0]: r for r in conn.execute(f"SELECT id, old, v FROM {table}")}
    assert not set(archived) & set(remaining)
    assert set(archived) | set(remaining) == set(last_value)
    for id_, value in archived.items():
        assert value["old"] is True
        assert value["v"] == last_value[id_], f"row {id_} archived as {value['v']}, last written {last_value[id_]}"
    assert all(not r[1] for r in remaining.values())
    assert all(r[2] == last_value[i] for i, r in remaining.items())


# --- kill -9 between the write and the commit -----------------------------------

def test_a_killed_archive_deletes_nothing_it_did_not_record(scratch, server_dir):
    c = scratch.connect()
    make_table(c, "arch_kill", 3000)
    original = oracle_lines(c, "SELECT * FROM arch_kill ORDER BY id")
    # The second chunk's record waits at a gate: by then its part is in
    # place, checked, and its rows deleted, all uncommitted.
    c.execute("""
        CREATE OR REPLACE FUNCTION arch_gate() RETURNS trigger LANGUAGE plpgsql AS
        $$ BEGIN IF NEW.part = 1 THEN PERFORM pg_advisory_xact_lock(515151); END IF; RETURN NEW; END $$;
        CREATE TRIGGER arch_gate BEFORE INSERT ON stream_export_archive_part
            FOR EACH ROW EXECUTE FUNCTION arch_gate();
    """)
    gate = scratch.connect(autocommit=False)
    gate.execute("SELECT pg_advisory_xact_lock(515151)")

    def call():
        with scratch.connect() as a:
            a.execute("CALL stream_export_archive('arch_kill', %s, 'id', chunk_rows => 1000)", [str(server_dir)])
    thread, result = run_in_thread(call)
    pid = wait_until(lambda: c.execute(
        "SELECT pid FROM pg_stat_activity WHERE query LIKE 'CALL stream_export_archive%%' "
        "AND wait_event = 'advisory'").fetchone(), timeout=60)[0]
    # The call shows as one export in the activity view, counting every
    # chunk so far.
    assert c.execute("SELECT rows >= 2000, format LIKE '%%archive%%' FROM stream_export_activity "
                     "WHERE pid = %s", [pid]).fetchone() == (True, True)
    os.kill(pid, signal.SIGKILL)
    thread.join(60)
    assert "error" in result
    gate.close()

    wait_for_server(scratch)
    c = scratch.connect()
    c.execute("DROP TRIGGER arch_gate ON stream_export_archive_part")
    # Chunk 0 is archived and gone; chunk 1's rows are all still there.
    assert c.execute("SELECT part, rows FROM stream_export_archive_part").fetchall() == [(0, 1000)]
    assert c.execute("SELECT min(id), count(*) FROM arch_kill").fetchone() == (1001, 2000)
    # The next call archives the rest; listed parts plus nothing left in
    # the table give every row once.
    c.execute("CALL stream_export_archive('arch_kill', %s, 'id', chunk_rows => 1000)", [str(server_dir)])
    assert c.execute("SELECT count(*) FROM arch_kill").fetchone() == (0,)
    assert archived_lines(c, "arch_kill") == original
    listed = {Path(t).name for (t,) in c.execute("SELECT target FROM stream_export_archive_part")}
    on_disk = {p.name for p in server_dir.iterdir()}
    # The killed call's chunk 1 file is there, unlisted (its rows were not
    # deleted, and were archived again); nothing else is.
    assert listed <= on_disk and len(on_disk - listed) == 1
