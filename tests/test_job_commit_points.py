"""Incremental jobs and archives to an object prefix, cancelled at every
request they make to the store.

A proxy in front of the store holds one request of the call in turn, and
the test cancels the backend while it is held (the store answers 0.5 s
later). Whatever request it is:

- an incremental job (README, "Exactly once, whatever stops a run"): the
  CALL failed with 57014 and changed nothing the next run relies on (the
  catalog is as before; a part it put in place is there unrecorded, under
  the name the next run writes), or it succeeded and recorded its part.
  Either way the next CALL succeeds, and then the parts the catalog lists
  hold every row of the table exactly once, and the prefix holds nothing
  but those parts and the job's binding (a part left unrecorded was taken
  over as it is, `recovered`, or written again).
- an archive (README, "What an archive guarantees"): every row gone from
  the table is in exactly one chunk that `stream_export_archive_part`
  lists, whose object is there and holds the row's line as `row_to_json`
  gave it before; every row still in the table is in no listed chunk; a
  chunk left unlisted holds only rows still in the table. The same CALL
  again archives the rest of the batch, each row exactly once.
"""

from __future__ import annotations

import collections
import json
import urllib.parse

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import oracle_lines
from proxy import HoldingProxy, cancelled_while_held
from stores import running_store, store_environment

BUCKET = "jobcommits"
SECRET = "job-commit-secret"
FOOTER = '{"_stream_export":'


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_store("moto", tmp_path_factory.mktemp("store"), "jobcommits", BUCKET, SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(store):
    p = HoldingProxy(store.endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def server(proxy):
    srv = start_cluster("pg_stream_export", environment=store_environment(proxy.endpoint, SECRET))
    try:
        yield srv
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), "\n".join(crashes_in(log))


def call_cancelled_at(server, proxy, sql: str, params: list, index: int) -> tuple[dict, bool]:
    """Run `sql` with request `index` held, and cancel it while the request
    is held. Returns (result, whether the request was held)."""
    return cancelled_while_held(server, proxy, sql, params, hold_at=index)


def key_of(uri: str) -> str:
    parts = urllib.parse.urlsplit(uri)
    assert parts.scheme == "s3" and parts.netloc == BUCKET, uri
    return parts.path.lstrip("/")


def objects_under(store, prefix: str) -> set[str]:
    """The names (relative to `prefix`) of every object under it."""
    names: set[str] = set()
    for page in store.client().get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        names |= {o["Key"][len(prefix):] for o in page.get("Contents", [])}
    return names


def records_of(store, key: str) -> list[str]:
    """The record lines of the object `key`, which must end with a footer."""
    lines = store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()
    assert lines and lines[-1].startswith(FOOTER), (key, lines[-1:] if lines else lines)
    return [line for line in lines if not line.startswith(FOOTER)]


# Incremental job.

# (job and table name, rows per step, the text of row g): small parts, one
# PUT each; parts of 12 MB, a multipart upload each (8 MB parts).
JOB_CASES = {
    "single": (3, "'step ' || %(step)s || ' row ' || g"),
    "multipart": (3, "repeat(md5(%(step)s || ' ' || g), 131072)"),
}


class JobCase:
    def __init__(self, name: str):
        self.name = name
        self.job = f"j_{name}"
        self.table = f"job_src_{name}"
        self.prefix = f"jobs-{name}/"
        self.rows, self.text = JOB_CASES[name]
        self.increment = f"CALL stream_export_increment('{self.job}')"

    def part_name(self, part: int) -> str:
        return f"{self.job}-{part:08d}.ndjson"

    def add_rows(self, conn, step: int) -> None:
        conn.execute(f"INSERT INTO {self.table} (t) SELECT {self.text} FROM generate_series(1, %(rows)s) g",
                     {"step": step, "rows": self.rows})

    def parts(self, conn) -> list[tuple[int, str, int, bool]]:
        return conn.execute("SELECT part, target, rows, recovered FROM stream_export_job_part "
                            "WHERE job = %s ORDER BY part", [self.job]).fetchall()

    def table_lines(self, conn) -> list[str]:
        return sorted(oracle_lines(conn, f"SELECT * FROM {self.table} ORDER BY id"))

    def recorded(self, store, conn, where) -> tuple[list[tuple], list[str]]:
        """The catalog's parts, and the record lines of every one of them
        (each object there, named as the README says, holding the rows
        listed)."""
        parts = self.parts(conn)
        assert [p[0] for p in parts] == list(range(1, len(parts) + 1)), (where, parts)
        lines: list[str] = []
        for part, target, rows, _ in parts:
            assert target == f"s3://{BUCKET}/{self.prefix}{self.part_name(part)}", (where, target)
            records = records_of(store, key_of(target))
            assert len(records) == rows, (where, target, rows, len(records))
            lines += records
        return parts, sorted(lines)

    def only_the_job_is_there(self, store, parts, where, leftover_allowed: str | None = None) -> set[str]:
        """Nothing under the prefix but the job's binding and its recorded
        parts (and, when given, the part a run that did not commit may
        leave under the name the next run writes). Returns what is there
        beyond. (An unfinished multipart upload may stay: README, "the
        store's lifecycle rules remove it".)"""
        names = objects_under(store, self.prefix)
        expected = {f"{self.job}.job.json"} | {key_of(t)[len(self.prefix):] for _, t, _, _ in parts}
        extra = names - expected
        assert expected <= names, (where, sorted(names), sorted(expected))
        allowed = {leftover_allowed} if leftover_allowed else set()
        assert extra <= allowed, (where, sorted(extra))
        return extra

    def check_exact(self, store, server, where) -> list[tuple]:
        """The job's invariant: the recorded parts hold every row of the
        table exactly once, and nothing else is under the prefix."""
        with server.connect() as conn:
            parts, lines = self.recorded(store, conn, where)
            table = self.table_lines(conn)
        missing = (collections.Counter(table) - collections.Counter(lines)).elements()
        surplus = (collections.Counter(lines) - collections.Counter(table)).elements()
        missing, surplus = [m[:80] for m in missing], [s[:80] for s in surplus]
        assert (missing, surplus) == ([], []), (where, "missing", missing, "twice or not in the table", surplus)
        self.only_the_job_is_there(store, parts, where)
        return parts


@pytest.mark.parametrize("case", list(JOB_CASES))
def test_a_cancel_at_any_request_of_a_job_run_ships_every_row_exactly_once(server, proxy, store, case):
    """Every request of a run held in turn and the run cancelled meanwhile:
    the run fails and changes nothing recorded (a part it put in place is
    left under the next part's name), or it succeeds with its part
    recorded; the next run succeeds, and then every row of the table is in
    exactly one recorded part, and nothing else is under the prefix."""
    job = JobCase(case)
    uri = f"s3://{BUCKET}/{job.prefix}"
    with server.connect() as conn:
        conn.execute(f"CREATE TABLE {job.table} (id bigserial PRIMARY KEY, t text NOT NULL)")
        conn.execute(f"INSERT INTO {job.table} (t) SELECT md5(g::text) FROM generate_series(1, 50) g")
        conn.execute("SELECT stream_export_job_create(%s, %s, 'id', %s)", [job.job, job.table, uri])
    proxy.reset()
    with server.connect() as conn:
        conn.execute(job.increment)
    parts = job.check_exact(store, server, "first run")
    assert len(parts) == 1 and parts[0][2] == 50, parts
    # The requests of one run with new rows, for the record.
    with server.connect() as conn:
        job.add_rows(conn, -1)
    proxy.reset()
    with server.connect() as conn:
        conn.execute(job.increment)
    print("requests of a run:", [(m, p[:90]) for m, p in proxy.requests])
    job.check_exact(store, server, "second run")
    index, outcomes = 0, []
    while True:
        with server.connect() as conn:
            job.add_rows(conn, index)
            before_parts, before_lines = job.recorded(store, conn, (index, "before"))
            now = job.table_lines(conn)
        result, held = call_cancelled_at(server, proxy, job.increment, [], index)
        if not held:
            # The run made fewer requests than that: every one was tried.
            assert "error" not in result, (index, result)
            parts = job.check_exact(store, server, (index, "unheld"))
            assert len(parts) == len(before_parts) + 1 and not parts[-1][3], parts
            break
        method, path = proxy.requests[index]
        where = (index, method, path[:90], repr(result.get("error")))
        with server.connect() as conn:
            parts, lines = job.recorded(store, conn, where)
        if "error" in result:
            # Failed: the catalog is as it was; a part put in place is
            # there unrecorded, under the name the next run writes.
            assert isinstance(result["error"], psycopg.errors.QueryCanceled), where
            assert (parts, lines) == (before_parts, before_lines), where
            leftover = job.only_the_job_is_there(store, parts, where,
                                                 leftover_allowed=job.part_name(len(before_parts) + 1))
        else:
            # Succeeded: its part is recorded, with the table's new rows.
            assert len(parts) == len(before_parts) + 1 and lines == now, (where, parts)
            leftover = job.only_the_job_is_there(store, parts, where)
        # The next run, with nothing held, succeeds and ships what is left.
        proxy.reset()
        with server.connect() as conn:
            conn.execute(job.increment)
        parts = job.check_exact(store, server, (where, "next run"))
        if "error" in result:
            assert len(parts) == len(before_parts) + 1, (where, parts)
            # A part left whole and unrecorded holds exactly what the table
            # holds in its key range (nothing changed since): taken over as
            # it is (README: "records the part as it is (recovered = true)
            # only if that gives the same rows ...; otherwise it writes the
            # part again").
            assert parts[-1][3] == bool(leftover), (where, "recovered", parts[-1], leftover)
        else:
            assert len(parts) == len(before_parts) + 1, (where, "a run with no new rows wrote", parts)
        outcomes.append(("failed" if "error" in result else "succeeded", method, path[:90],
                         "part left" if leftover else ""))
        index += 1
    for i, outcome in enumerate(outcomes):
        print(i, *outcome)  # shown with a failure
    # A run makes every request before its commit point (the CALL's
    # transaction commit), so a cancel can always fail it; the steps met a
    # cancel both before the part was in place and once it was (left
    # unrecorded, then taken over by the next run).
    assert "failed" in {o[0] for o in outcomes}, outcomes
    assert any(o[0] == "failed" and o[3] for o in outcomes), outcomes
    assert any(o[0] == "failed" and not o[3] for o in outcomes), outcomes


# Archive.

ARCHIVE_PREFIX = "archive/"
ARCHIVE = ("CALL stream_export_archive('arch_src', %s, 'id', condition => %s, chunk_rows => 3)")
BATCH_ROWS = 7  # three chunks: 3, 3 and 1 rows


def archive_state(store, server, where) -> tuple[dict[int, str], list[tuple[int, str, str]], set[str]]:
    """(the table's rows by id, (id, line, target) of every record line of
    every chunk the catalog lists, the listed targets' names)."""
    with server.connect() as conn:
        table = dict(conn.execute("SELECT id, row_to_json(r)::text FROM arch_src r").fetchall())
        chunks = conn.execute("SELECT target, rows FROM stream_export_archive_part "
                              "WHERE source = 'arch_src' ORDER BY archive_id, part").fetchall()
    recorded: list[tuple[int, str, str]] = []
    names: set[str] = set()
    for target, rows in chunks:
        key = key_of(target)
        assert key.startswith(ARCHIVE_PREFIX), (where, target)
        names.add(key[len(ARCHIVE_PREFIX):])
        try:
            records = records_of(store, key)
        except store.client().exceptions.NoSuchKey:
            raise AssertionError((where, "a listed chunk is not there", target))
        assert len(records) == rows, (where, target, rows, len(records))
        recorded += [(json.loads(line)["id"], line, target) for line in records]
    return table, recorded, names


def check_archive(store, server, known: dict[int, str], where) -> tuple[dict[int, str], set[str]]:
    """The archive's invariant; returns the table's rows and the listed
    chunks' names."""
    table, recorded, names = archive_state(store, server, where)
    # The table holds only rows it was given, unchanged.
    assert {i: known.get(i) for i in table} == table, where
    times = collections.Counter(i for i, _, _ in recorded)
    for i, line, target in recorded:
        assert i not in table, (where, "archived but still in the table", i, target)
        assert line == known.get(i), (where, "archived line is not the row's", i, line, known.get(i), target)
    gone = [i for i in known if i not in table]
    assert [i for i in gone if times[i] != 1] == [], \
        (where, "gone but not archived exactly once", {i: times[i] for i in gone if times[i] != 1})
    return table, names


def archive_objects(store) -> set[str]:
    return objects_under(store, ARCHIVE_PREFIX)


def add_batch(server, batch: int, known: dict[int, str]) -> None:
    with server.connect() as conn:
        conn.execute("INSERT INTO arch_src SELECT %s * 100 + g, %s, 'batch ' || %s || ' row ' || g, "
                     "(%s * 100 + g) / 7.0 FROM generate_series(1, %s) g", [batch, batch, batch, batch, BATCH_ROWS])
        known.update(conn.execute("SELECT id, row_to_json(r)::text FROM arch_src r WHERE batch = %s",
                                  [batch]).fetchall())


def test_a_cancel_at_any_request_of_an_archive_loses_no_row_and_archives_none_twice(server, proxy, store):
    """Every request of an archive call held in turn (a fresh batch of rows
    each time, three chunks) and the call cancelled meanwhile: it fails with
    57014; the rows gone are each in exactly one listed chunk, with their
    lines; the rows left are in none; and the same CALL again archives the
    rest of the batch."""
    uri = f"s3://{BUCKET}/{ARCHIVE_PREFIX}"
    known: dict[int, str] = {}
    with server.connect() as conn:
        conn.execute("CREATE TABLE arch_src (id bigint PRIMARY KEY, batch int NOT NULL, t text, n numeric)")
    add_batch(server, 0, known)  # never archived
    kept = {i for i in known}
    # A whole call first, with nothing held.
    add_batch(server, 1, known)
    proxy.reset()
    with server.connect() as conn:
        conn.execute(ARCHIVE, [uri, "batch = 1"])
    print("requests of a call:", proxy.requests)
    table, _ = check_archive(store, server, known, "first call")
    assert set(table) == kept
    index, batch, outcomes, wrong_errors = 0, 1, [], []
    while True:
        batch += 1
        add_batch(server, batch, known)
        batch_ids = {i for i in known if i // 100 == batch}
        condition = f"batch = {batch}"
        before_objects = archive_objects(store)
        result, held = call_cancelled_at(server, proxy, ARCHIVE, [uri, condition], index)
        if not held:
            # The call made fewer requests than that: every one was tried.
            assert "error" not in result, (index, result)
            table, _ = check_archive(store, server, known, (index, "unheld"))
            assert set(table) == kept
            break
        method, path = proxy.requests[index]
        where = (index, method, path, repr(result.get("error")))
        table, listed = check_archive(store, server, known, where)
        if "error" in result:
            if not isinstance(result["error"], psycopg.errors.QueryCanceled):
                # A cancel reported as something else: go on, to see every
                # request where that happens.
                error = result["error"]
                wrong_errors.append((index, method, path, getattr(error, "sqlstate", None),
                                     str(error).splitlines()[0]))
        else:
            # It succeeded: the whole batch is archived.
            assert batch_ids.isdisjoint(table), (where, sorted(batch_ids & set(table)))
        # A chunk whose transaction did not commit may be left, unlisted:
        # its rows are still in the table.
        for name in sorted(archive_objects(store) - before_objects - listed):
            ids = [json.loads(line)["id"] for line in records_of(store, ARCHIVE_PREFIX + name)]
            assert set(ids) <= set(table), (where, "an unlisted chunk holds rows gone from the table", name, ids)
        # The same CALL again, with nothing held, archives the rest.
        proxy.reset()
        with server.connect() as conn:
            conn.execute(ARCHIVE, [uri, condition])
        table, _ = check_archive(store, server, known, (where, "again"))
        assert set(table) == kept, (where, "again", sorted(set(table) - kept))
        outcomes.append(("failed" if "error" in result else "succeeded", method, path))
        index += 1
    for i, outcome in enumerate(outcomes):
        print(i, *outcome)  # shown with a failure
    # A cancel fails the call with 57014 (query_canceled), whatever request
    # it meets: (index, method, request, SQLSTATE, message) of each that did not.
    assert wrong_errors == [], wrong_errors
    assert "failed" in {o[0] for o in outcomes}, outcomes
