"""CALL stream_export_chunked: one committed transaction per chunk, so the
export never holds back VACUUM, and a later CALL resumes after the last
finished chunk.

The tests stop the exporter at chunk boundaries deterministically: the source
filters through chunk_gate(), which at the first row of every chunk
transaction takes a shared advisory lock that the test holds (alternating
between two locks, so the test can let exactly one chunk through)."""

from __future__ import annotations

import json
import os
import re
import signal
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from conftest import start_cluster, stop_cluster
from helpers import PeakSampler, part_lines, run_in_thread, wait_until

GATE_LOCKS = (4200, 4201)

GATE_SQL = """
CREATE OR REPLACE FUNCTION chunk_gate() RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
DECLARE n int;
BEGIN
  IF current_setting('chunk_gate.passed', true) IS DISTINCT FROM 'yes' THEN
    PERFORM set_config('chunk_gate.passed', 'yes', true);
    n := coalesce(nullif(current_setting('chunk_gate.n', true), ''), '0')::int;
    PERFORM set_config('chunk_gate.n', (n + 1)::text, false);
    PERFORM pg_advisory_xact_lock_shared(4200 + n % 2);
  END IF;
  RETURN true;
END $$;
"""


def exported_lines(directory: Path) -> list[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    lines = []
    for part in manifest["parts"]:
        lines.extend(part_lines(directory / part["file"]))
    return lines


def expected_lines(conn, table: str) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT row_to_json(t)::text FROM {table} t ORDER BY id")]


def files_in(directory: Path) -> set[str]:
    return {p.name for p in directory.iterdir()}


def manifest_files(directory: Path) -> set[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return {"manifest.json"} | {p["file"] for p in manifest["parts"]}


def journal(directory: Path) -> tuple[dict, list[dict]]:
    """The header and chunk entries of an unfinished export's journal."""
    header, *entries = [json.loads(line) for line in (directory / "progress.jsonl").read_text().splitlines()]
    return header, entries


def verify(conn, directory: Path) -> tuple:
    return conn.execute("SELECT * FROM stream_export_verify_manifest(%s)", [str(directory)]).fetchone()


def make_table(conn, name: str, rows: int) -> None:
    conn.execute(f"DROP TABLE IF EXISTS {name}")
    conn.execute(f"CREATE TABLE {name} (id int PRIMARY KEY, v int NOT NULL, note text)")
    conn.execute(f"INSERT INTO {name} SELECT g, g * 7, 'row ' || g FROM generate_series(1, %s) g", [rows])


class Gate:
    """Holds both gate locks; the exporter stops at the first row of each
    chunk until the test lets that chunk through."""

    def __init__(self, server, exporter_pid_holder: dict):
        self.conn = server.connect()
        self.conn.execute(GATE_SQL)
        for key in GATE_LOCKS:
            self.conn.execute("SELECT pg_advisory_lock(%s)", [key])
        self.held = set(GATE_LOCKS)
        self.chunk = 0
        self.pids = exporter_pid_holder

    def waiting_at(self, chunk: int) -> None:
        """Wait until the exporter stands at the gate of `chunk`."""
        key = GATE_LOCKS[chunk % 2]
        wait_until(lambda: self.conn.execute(
            "SELECT 1 FROM pg_locks WHERE pid = %s AND locktype = 'advisory' AND objid = %s AND NOT granted",
            [self.pids["pid"], key]).fetchone())
        self.chunk = chunk

    def let_one_chunk_through(self) -> None:
        """Open the gate of the current chunk; return when the exporter waits
        at the next one (and close the gate behind it)."""
        key = GATE_LOCKS[self.chunk % 2]
        self.conn.execute("SELECT pg_advisory_unlock(%s)", [key])
        self.held.discard(key)
        self.waiting_at(self.chunk + 1)
        # The previous chunk committed, so its shared lock is free again.
        self.conn.execute("SELECT pg_advisory_lock(%s)", [key])
        self.held.add(key)

    def open(self) -> None:
        for key in list(self.held):
            self.conn.execute("SELECT pg_advisory_unlock(%s)", [key])
        self.held.clear()

    def close(self) -> None:
        self.open()
        self.conn.close()


def start_exporter(server, sql: str, params: list, setup: tuple[str, ...] = ()):
    """Run the CALL on a connection of its own in a thread; the pid is known
    before the thread starts."""
    conn = server.connect()
    for statement in setup:
        conn.execute(statement)
    holder = {"pid": conn.info.backend_pid, "conn": conn, "notices": []}
    conn.add_notice_handler(lambda d: holder["notices"].append(d.message_primary))

    def run():
        try:
            return conn.execute(sql, params)
        finally:
            conn.close()

    thread, result = run_in_thread(run)
    return holder, thread, result


def start_gated(server, sql: str, params: list):
    """Hold the gate, start the CALL, and wait until it stands at the gate
    of chunk 0."""
    holder = {}
    gate = Gate(server, holder)
    try:
        exporter, thread, result = start_exporter(server, sql, params)
        holder.update(exporter)
        gate.waiting_at(0)
    except BaseException:
        gate.close()
        raise
    return gate, holder, thread, result


def test_chunks_union_equals_the_source(server, conn, server_dir):
    make_table(conn, "chunked_plain", 25_000)
    conn.execute("CALL stream_export_chunked('chunked_plain', %s, 'id', chunk_rows => 10000)", [str(server_dir)])
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_plain")
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert manifest["consistency"] == "per_chunk" and manifest["complete"] is True
    assert manifest["source"] == '"public"."chunked_plain"' and manifest["key"] == "id"
    assert [p["rows"] for p in manifest["parts"]] == [10000, 10000, 5000]
    assert [(p["after_key"], p["last_key"]) for p in manifest["parts"]] == [
        (None, "10000"), ("10000", "20000"), ("20000", "25000")]
    assert [p["to_end"] for p in manifest["parts"]] == [False, False, True]
    for part in manifest["parts"]:
        assert re.fullmatch(r"\d+:\d+:[\d,]*", part["snapshot"])
        assert part["snapshot_xmin"] == part["snapshot"].split(":")[0]
        assert conn.execute("SELECT ok FROM stream_export_verify(%s)",
                            [str(server_dir / part["file"])]).fetchone()[0]
    assert manifest["totals"]["rows"] == 25_000
    assert verify(conn, server_dir)[:3] == (True, 3, 25_000)
    assert files_in(server_dir) == manifest_files(server_dir)


@pytest.mark.parametrize("rows", [0, 20_000])
def test_empty_source_and_exact_multiple_write_no_empty_chunk(server, conn, server_dir, rows):
    make_table(conn, "chunked_edge", rows)
    conn.execute("CALL stream_export_chunked('chunked_edge', %s, 'id', chunk_rows => 10000, compression => 'gzip')",
                 [str(server_dir)])
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert [p["rows"] for p in manifest["parts"]] == ([10000, 10000] if rows else [])
    assert all(p["file"].endswith(".ndjson.gz") for p in manifest["parts"])
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_edge")
    assert verify(conn, server_dir)[:3] == (True, len(manifest["parts"]), rows)
    assert files_in(server_dir) == manifest_files(server_dir)


def test_refuses_a_transaction_block_and_bad_arguments(server, conn, server_dir):
    make_table(conn, "chunked_args", 10)
    with server.connect(autocommit=False) as c:
        with pytest.raises(errors.ActiveSqlTransaction) as info:
            c.execute("CALL stream_export_chunked('chunked_args', %s, 'id')", [str(server_dir)])
        assert "transaction block" in str(info.value)
    conn.execute("""CREATE OR REPLACE FUNCTION chunked_from_function(d text) RETURNS void LANGUAGE plpgsql
                    AS $$ BEGIN CALL stream_export_chunked('chunked_args', d, 'id'); END $$""")
    with pytest.raises(errors.ActiveSqlTransaction):
        conn.execute("SELECT chunked_from_function(%s)", [str(server_dir)])
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("CALL stream_export_chunked('chunked_args', %s, 'id', chunk_rows => 0)", [str(server_dir)])
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("CALL stream_export_chunked('chunked_args', %s, 'v')", [str(server_dir)])
    with pytest.raises(errors.NullValueNotAllowed):
        conn.execute("CALL stream_export_chunked('chunked_args', %s, NULL)", [str(server_dir)])
    assert files_in(server_dir) == set()
    # A CALL in a top-level DO block may commit.
    conn.execute(f"DO $$ BEGIN CALL stream_export_chunked('chunked_args', '{server_dir}', 'id'); END $$")
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_args")
    # Finished: a second CALL is refused unless it may overwrite.
    with pytest.raises(errors.DuplicateFile):
        conn.execute("CALL stream_export_chunked('chunked_args', %s, 'id')", [str(server_dir)])
    conn.execute("INSERT INTO chunked_args VALUES (11, 77, 'new')")
    conn.execute("CALL stream_export_chunked('chunked_args', %s, 'id', overwrite => true)", [str(server_dir)])
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_args")
    assert files_in(server_dir) == manifest_files(server_dir)


def test_needs_the_write_privilege(server, conn, server_dir):
    make_table(conn, "chunked_priv", 10)
    conn.execute("DROP ROLE IF EXISTS chunked_plain_role")
    conn.execute("CREATE ROLE chunked_plain_role LOGIN")
    conn.execute("GRANT SELECT ON chunked_priv TO chunked_plain_role")
    with psycopg.connect(server.dsn(user="chunked_plain_role"), autocommit=True) as plain:
        with pytest.raises(errors.InsufficientPrivilege):
            plain.execute("CALL stream_export_chunked('chunked_priv', %s, 'id')", [str(server_dir)])
        conn.execute("GRANT pg_write_server_files TO chunked_plain_role")
        plain.execute("CALL stream_export_chunked('chunked_priv', %s, 'id')", [str(server_dir)])
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_priv")
    conn.execute("DROP OWNED BY chunked_plain_role")
    conn.execute("DROP ROLE chunked_plain_role")


def vacuum_tuples(conn, table: str) -> tuple[int, int]:
    """(removed, dead but not yet removable) from VACUUM (VERBOSE)."""
    messages = []
    conn.add_notice_handler(lambda d: messages.append(d.message_primary))
    conn.execute(f"VACUUM (VERBOSE) {table}")
    text = "\n".join(messages)
    found = re.search(r"tuples: (\d+) removed, \d+ remain, (\d+) are dead but not yet removable", text)
    assert found, text
    return int(found.group(1)), int(found.group(2))


def dead_tuples(conn, table: str) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute("SELECT n_dead_tup FROM pg_stat_user_tables WHERE relname = %s", [table]).fetchone()[0]


def backend_xmin(conn, pid: int) -> int:
    return int(conn.execute("SELECT backend_xmin::text::bigint FROM pg_stat_activity WHERE pid = %s",
                            [pid]).fetchone()[0])


def test_xmin_advances_and_vacuum_removes_rows_deleted_during_the_export(server, conn, server_dir):
    make_table(conn, "chunked_vac_source", 5_000)
    conn.execute("DROP TABLE IF EXISTS chunked_victims")
    conn.execute("CREATE TABLE chunked_victims (id int, filler text) WITH (autovacuum_enabled = false)")
    conn.execute("INSERT INTO chunked_victims SELECT g, repeat('x', 100) FROM generate_series(1, 1000) g")
    conn.execute("VACUUM chunked_victims")
    source = "SELECT * FROM chunked_vac_source WHERE chunk_gate()"
    gate = None
    try:
        gate, holder, thread, result = start_gated(
            server, "CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000, batch_size => 100)",
            [source, str(server_dir)])
        xmins = [backend_xmin(conn, holder["pid"])]
        # Rows die while chunk 0's snapshot is held: VACUUM must keep them.
        conn.execute("DELETE FROM chunked_victims WHERE id <= 500")
        assert vacuum_tuples(conn, "chunked_victims") == (0, 500)
        assert dead_tuples(conn, "chunked_victims") == 500
        for _ in range(3):
            for _ in range(3):
                conn.execute("SELECT pg_current_xact_id()")  # other transactions come and go
            gate.let_one_chunk_through()
            xmins.append(backend_xmin(conn, holder["pid"]))
            if len(xmins) == 2:
                # The next chunk's snapshot is newer than the delete.
                assert vacuum_tuples(conn, "chunked_victims") == (500, 0)
                assert dead_tuples(conn, "chunked_victims") == 0
        assert xmins == sorted(set(xmins)), xmins  # strictly increasing
        gate.open()
        thread.join()
        assert "error" not in result, result.get("error")
    finally:
        if gate:
            gate.close()
    manifest = json.loads((server_dir / "manifest.json").read_text())
    # The xmin each chunk showed is the snapshot its manifest entry names.
    assert [int(p["snapshot_xmin"]) for p in manifest["parts"][:4]] == xmins
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_vac_source")


HISTORY_SQL = """
DROP TABLE IF EXISTS chunked_churn, chunked_history;
CREATE TABLE chunked_churn (id int PRIMARY KEY, v int NOT NULL, note text);
CREATE TABLE chunked_history (seq bigserial, id int, v int, note text, deleted bool,
                              xid xid8 DEFAULT pg_current_xact_id());
CREATE OR REPLACE FUNCTION chunked_log() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
  IF TG_OP IN ('UPDATE', 'DELETE') AND (TG_OP = 'DELETE' OR OLD.id <> NEW.id) THEN
    INSERT INTO chunked_history (id, v, note, deleted) VALUES (OLD.id, OLD.v, OLD.note, true);
  END IF;
  IF TG_OP IN ('INSERT', 'UPDATE') THEN
    INSERT INTO chunked_history (id, v, note, deleted) VALUES (NEW.id, NEW.v, NEW.note, false);
  END IF;
  RETURN NULL;
END $$;
CREATE TRIGGER chunked_log AFTER INSERT OR UPDATE OR DELETE ON chunked_churn
  FOR EACH ROW EXECUTE FUNCTION chunked_log();
INSERT INTO chunked_churn SELECT g, g, 'row ' || g FROM generate_series(1, 8000) g;
"""

# What each chunk should hold: the versions its snapshot sees, in its key range.
CHUNK_ORACLE = """
SELECT row_to_json(r)::text FROM (
  SELECT id, v, note FROM (
    SELECT DISTINCT ON (id) id, v, note, deleted FROM chunked_history
    WHERE pg_visible_in_snapshot(xid, %(snapshot)s::pg_snapshot)
      AND (%(after)s::int IS NULL OR id > %(after)s::int)
      AND (%(to_end)s OR id <= %(last)s::int)
    ORDER BY id, seq DESC) latest
  WHERE NOT deleted ORDER BY id) r
"""


def test_concurrent_writes_each_chunk_is_its_snapshot(server, conn, server_dir):
    conn.execute(HISTORY_SQL)
    source = "SELECT * FROM chunked_churn WHERE chunk_gate()"
    gate = None
    moved_up, moved_down = [], []
    try:
        gate, holder, thread, result = start_gated(
            server, "CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000, batch_size => 100)",
            [source, str(server_dir)])
        next_id = 100_000
        for step in range(6):
            # While chunk `step` waits at its gate (its snapshot taken), change
            # rows behind it, in it and ahead of it.
            for k in range(0, 8000, 250):
                target = k + 3 + step * 11
                conn.execute("UPDATE chunked_churn SET v = v + 1000, note = 'updated' WHERE id = %s", [target])
                conn.execute("DELETE FROM chunked_churn WHERE id = %s", [target + 5])
            conn.execute("INSERT INTO chunked_churn SELECT g, -g, 'inserted' FROM generate_series(%s, %s) g",
                         [next_id, next_id + 49])
            next_id += 50
            # Keys that change: one from behind the export to ahead of it
            # (exported twice, under both keys), one the other way (missed).
            low, high = 100 + step, 7990 - step
            conn.execute("UPDATE chunked_churn SET id = %s WHERE id = %s", [200_000 + step, low])
            conn.execute("UPDATE chunked_churn SET id = %s WHERE id = %s", [-1 - step, high])
            moved_up.append((low, 200_000 + step))
            moved_down.append((high, -1 - step))
            gate.let_one_chunk_through()
        gate.open()
        thread.join()
        assert "error" not in result, result.get("error")
    finally:
        if gate:
            gate.close()
    manifest = json.loads((server_dir / "manifest.json").read_text())
    parts = manifest["parts"]
    assert len(parts) >= 8
    all_ids = []
    for part in parts:
        got = part_lines(server_dir / part["file"])
        want = [r[0] for r in conn.execute(CHUNK_ORACLE, {
            "snapshot": part["snapshot"], "after": part["after_key"], "last": part["last_key"],
            "to_end": part["to_end"]})]
        assert got == want, part["chunk"]
        all_ids.extend(json.loads(line)["id"] for line in got)
    assert len(all_ids) == len(set(all_ids))  # no key twice
    # The snapshots moved on: later chunks saw changes earlier ones did not.
    assert len({p["snapshot"] for p in parts[:7]}) == 7
    # A key moved ahead of the export appears under both keys; one moved
    # behind it appears under neither.
    ids = set(all_ids)
    assert all(old in ids and new in ids for old, new in moved_up)
    assert all(old not in ids and new not in ids for old, new in moved_down)


def test_cancel_then_resume(server, conn, server_dir):
    make_table(conn, "chunked_resume", 5_500)
    source = "SELECT * FROM chunked_resume WHERE chunk_gate()"
    gate = None
    try:
        gate, holder, thread, result = start_gated(
            server, "CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000, compression => 'gzip')",
            [source, str(server_dir)])
        gate.let_one_chunk_through()
        gate.let_one_chunk_through()  # chunks 0 and 1 done, 2 waits
        conn.execute("SELECT pg_cancel_backend(%s)", [holder["pid"]])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled)
    finally:
        if gate:
            gate.close()
    header, entries = journal(server_dir)
    assert header["consistency"] == "per_chunk" and [p["chunk"] for p in entries] == [0, 1]
    assert files_in(server_dir) == {"progress.jsonl"} | {p["file"] for p in entries}
    # A crash while a chunk's line was being appended leaves it cut short:
    # that chunk is not done, and its file (here complete) is redone.
    with open(server_dir / "progress.jsonl", "a") as f:
        f.write('{"chunk": 2, "file": "part-')
    # Another source is refused: the directory holds this one's unfinished export.
    with pytest.raises(errors.ObjectNotInPrerequisiteState):
        conn.execute("CALL stream_export_chunked('chunked_resume', %s, 'id', compression => 'gzip')",
                     [str(server_dir)])
    # So is every option that changes the bytes, by name: type options
    # (a profile, or one of them) and the compression level.
    assert header["style"]["bigint_as_string"] is False and header["compression_level"] == 6
    journal_text = (server_dir / "progress.jsonl").read_text()
    for options, named in ((", profile => 'javascript'", "bigint_as_string"),
                           (", timestamptz_utc => true", "timestamptz_utc"),
                           (", compression_level => 9", "compression_level"),
                           ("", "compression")):
        compression = "" if named == "compression" else ", compression => 'gzip'"
        with pytest.raises(errors.ObjectNotInPrerequisiteState) as err:
            conn.execute(f"CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000{compression}{options})",
                         [source, str(server_dir)])
        assert f"different {named}" in err.value.diag.message_primary, err.value
    # The refused calls wrote nothing.
    assert (server_dir / "progress.jsonl").read_text() == journal_text
    assert files_in(server_dir) == {"progress.jsonl"} | {p["file"] for p in entries}
    notices = []
    conn.add_notice_handler(lambda d: notices.append(d.message_primary))
    conn.execute("CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000, compression => 'gzip')",
                 [source, str(server_dir)])
    assert any("in 6 chunk(s), 2 of them from an earlier call" in n for n in notices), notices
    assert exported_lines(server_dir) == expected_lines(conn, "chunked_resume")
    assert files_in(server_dir) == manifest_files(server_dir)  # the journal is gone
    assert verify(conn, server_dir)[:3] == (True, 6, 5_500)
    manifest = json.loads((server_dir / "manifest.json").read_text())
    assert manifest["compression_level"] == 6 and manifest["footer"] is True
    assert manifest["style"] == {name: False for name in (
        "bigint_as_string", "numeric_as_string", "timestamptz_utc", "bytea_base64", "omit_nulls")}


def test_memory_does_not_grow_with_the_number_of_chunks(server, conn, server_dir):
    """The same rows in 4 chunks and in 800: the backend's peak private
    memory is the same (nothing is kept per chunk)."""
    make_table(conn, "chunked_memory", 200_000)
    peaks = {}
    for chunk_rows in (50_000, 250):
        with server.connect() as exporter:
            exporter.execute("SELECT count(*) FROM stream_export('SELECT 1 AS x')")  # library loaded
            pid = exporter.info.backend_pid
            with PeakSampler(pid) as sampler:
                idle = sampler.peak
                exporter.execute("CALL stream_export_chunked('chunked_memory', %s, 'id', chunk_rows => %s, "
                                 "overwrite => true)", [str(server_dir), chunk_rows])
            peaks[chunk_rows] = sampler.peak - idle
        assert verify(conn, server_dir)[:3] == (True, 200_000 // chunk_rows, 200_000)
    assert peaks[250] < peaks[50_000] + 2048, peaks  # KiB


def test_kill_and_restart_then_resume(server_dir):
    """kill -9 and a fast shutdown in the middle of a chunk: the next CALL
    discards the half-written chunk and continues after the last whole one."""
    srv = start_cluster("")
    try:
        with srv.connect() as conn:
            make_table(conn, "chunked_crash", 5_500)
        source = "SELECT * FROM chunked_crash WHERE chunk_gate()"
        call = "CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 1000)"

        gate, holder, thread, result = start_gated(srv, call, [source, str(server_dir)])
        gate.let_one_chunk_through()  # chunk 0 done, chunk 1 waits with its partial file open
        assert any(name.endswith(".partial") and name.startswith("part-") for name in files_in(server_dir))
        os.kill(holder["pid"], signal.SIGKILL)
        thread.join()
        assert "error" in result
        gate.conn.close()
        # The postmaster restarts after the crash; wait until it accepts again.
        wait_until(lambda: _accepts(srv), timeout=60)
        assert [p["chunk"] for p in journal(server_dir)[1]] == [0]
        # Left by the kill: the half-written chunk 1.
        (stale,) = [p for p in server_dir.iterdir() if p.name.startswith("part-") and p.name.endswith(".partial")]
        log_before = len(srv.log_text())

        gate, holder, thread, result = start_gated(srv, call, [source, str(server_dir)])  # chunk 1, the first of this call, written afresh
        assert f'removed "{stale}"' in srv.log_text()[log_before:]
        gate.let_one_chunk_through()  # chunk 1 done, chunk 2 waits
        # A fast shutdown while chunk 2 is being written (the gate still shut).
        srv.pg_ctl("-m", "fast", "-w", "-l", str(srv.log), "restart", "-o", srv.start_options)
        thread.join()
        gate.conn.close()
        assert "error" in result
        assert [p["chunk"] for p in journal(server_dir)[1]] == [0, 1]

        with srv.connect() as conn:
            conn.execute(call, [source, str(server_dir)])
            assert exported_lines(server_dir) == expected_lines(conn, "chunked_crash")
            assert verify(conn, server_dir)[:3] == (True, 6, 5_500)
        assert files_in(server_dir) == manifest_files(server_dir)
    finally:
        stop_cluster(srv)


def _accepts(srv) -> bool:
    try:
        with srv.connect() as c:
            c.execute("SELECT 1")
        return True
    except psycopg.OperationalError:
        return False
