"""One commit point per export, and nothing after it that a cancel can undo.

A directory export to an object prefix commits when its `manifest.json` is
in place. A proxy in front of the store holds one request of the export in
turn, and the test cancels the backend while it is held: whatever request
it is, afterwards the prefix holds either the new export, whole and
verified, and the call succeeded, or the old one, whole and verified, and
the call failed. Before the fix, a cancel while the store was answering the
manifest's PUT made the call fail after the manifest was committed, and the
failure's clean-up deleted the parts it lists. Chunked exports are held at
every request the same way: before their manifest the old export stays
whole and the journal lets the same CALL finish; from it on the call
succeeds, and the journal goes inside the commit point.
"""

from __future__ import annotations

import json
import re
import time
import urllib.parse
from pathlib import Path

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import run_in_thread
from proxy import HoldingProxy, cancelled_while_held
from stores import running_store, store_environment

BUCKET = "commits"
SECRET = "commit-secret"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_store("moto", tmp_path_factory.mktemp("store"), "commits", BUCKET, SECRET) as s:
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
    return cancelled_while_held(
        server, proxy, "SELECT rows FROM stream_export_to_directory('cp_src', %s, 'id', 2, overwrite => true)",
        [uri], hold_at=index, refuse=refuse, hold_suffix=hold_suffix)


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


# Chunked exports to a prefix. Each chunk is committed in a transaction of
# its own and recorded in the journal (`progress.json`, one
# `progress-NNNNNNNNNN.json` per chunk); `manifest.json`, put last, is the
# commit point. Before it, a cancel fails the call, leaves the old export
# whole, and keeps the journal so that the same CALL again finishes the
# export; from it on, the call succeeds.

CHUNKED = "CALL stream_export_chunked('cp_src', %s, 'id', chunk_rows => 5000, overwrite => true)"


def objects_under(store, prefix: str) -> list[str]:
    """The names (relative to `prefix`) of every object under it."""
    s3 = store.client()
    names: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        names += [o["Key"][len(prefix):] for o in page.get("Contents", [])]
    return sorted(names)


def manifest_of(store, prefix: str) -> dict:
    return json.loads(store.client().get_object(Bucket=BUCKET, Key=f"{prefix}manifest.json")["Body"].read())


def journal_header(store, prefix: str) -> dict | None:
    try:
        body = store.client().get_object(Bucket=BUCKET, Key=f"{prefix}progress.json")["Body"].read()
    except store.client().exceptions.NoSuchKey:
        return None
    return json.loads(body)


def only_the_export_is_there(store, prefix: str) -> None:
    """Nothing under `prefix` but the manifest and the parts it lists: no
    journal, no lease, no part of another export, no upload in progress."""
    manifest = manifest_of(store, prefix)
    assert objects_under(store, prefix) == sorted(["manifest.json"] + [p["file"] for p in manifest["parts"]])
    assert store.client().list_multipart_uploads(Bucket=BUCKET, Prefix=prefix).get("Uploads", []) == []


def chunked_call(server, uri: str) -> tuple[dict, list[str]]:
    """Run the chunked export with nothing held; (result, its NOTICEs)."""
    notices: list[str] = []
    with server.connect() as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary))
        try:
            conn.execute(CHUNKED, [uri])
            return {"value": None}, notices
        except psycopg.Error as exc:
            return {"error": exc}, notices


def chunks_noticed(notices: list[str]) -> tuple[int, int]:
    """(chunks, chunks from an earlier call) that the call's NOTICE names."""
    found = [re.search(r"in (\d+) chunk\(s\), (\d+) of them from an earlier call", n) for n in notices]
    found = [m for m in found if m]
    assert len(found) == 1, notices
    return int(found[0].group(1)), int(found[0].group(2))


def chunked_cancelled_at(server, proxy, uri: str, index: int | None, hold_suffix: str | None = None,
                         late: bool = False) -> tuple[dict, bool]:
    """Run the overwriting chunked export with request `index` (or the
    first PUT of a key ending with `hold_suffix`) held, and cancel it while
    it is held. With `late`, the held request reaches the store only once
    released, and this returns only once the store answered it. Returns
    (result, whether it was held)."""
    return cancelled_while_held(server, proxy, CHUNKED, [uri], late=late, hold_at=index,
                                hold_suffix=hold_suffix)


def check_cancelled_chunked_state(store, prefix: str, before: tuple[str, list[str]], old_parts: set[str],
                                  where) -> int:
    """After a cancelled call: the old export as it was, no lease, and
    nothing but the old export, the journal and parts of the journal's
    export. Returns how many chunks the journal lists."""
    assert exported_lines(store, prefix) == before, where
    names = objects_under(store, prefix)
    assert "lease.json" not in names, (where, names)
    header = journal_header(store, prefix)
    entries = [n for n in names if n.startswith("progress-")]
    if header is None:
        assert entries == [], (where, names)
    assert entries == [f"progress-{i:010d}.json" for i in range(len(entries))], (where, names)
    for name in names:
        if name in ("manifest.json", "progress.json") or name in entries or name in old_parts:
            continue
        assert header is not None and name.startswith(f"part-{header['export_id']}-"), (where, names)
    return len(entries)


def test_a_cancel_at_any_request_of_a_chunked_export_leaves_one_whole_export(server, proxy, store):
    """Every request of an overwriting chunked export held in turn and the
    call cancelled meanwhile. Before the manifest's PUT the call fails, the
    old export is there whole and verified, and the same CALL again
    finishes the new export from the chunks the journal lists; from the
    manifest's PUT on, the call succeeds with the new export whole and
    verified, its journal removed. Either way, after the next successful
    call the prefix holds that export and nothing else."""
    prefix = "chunked-every-step/"
    uri = f"s3://{BUCKET}/{prefix}"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("CALL stream_export_chunked('cp_src', %s, 'id', chunk_rows => 5000)", [uri])
    only_the_export_is_there(store, prefix)
    index, outcomes, journal_left, not_exported_again, failed_but_committed = 0, [], [], [], []
    try:
        while True:
            with server.connect() as conn:
                before = exported_lines(store, prefix)
                old_parts = {p["file"] for p in manifest_of(store, prefix)["parts"]}
                conn.execute("UPDATE cp_src SET t = %s WHERE id = 1", [f"chunked step {index}"])
                now = lines_of(conn)
            result, held = chunked_cancelled_at(server, proxy, uri, index)
            if not held:
                # The export made fewer requests than that: every one was tried.
                assert "error" not in result, (index, result)
                assert exported_lines(store, prefix)[1] == now
                only_the_export_is_there(store, prefix)
                break
            method, path = proxy.requests[index]
            where = (index, method, path, result)
            with server.connect() as conn:
                assert verified(conn, uri), where
            if "error" in result and exported_lines(store, prefix)[0] != before[0]:
                # Failed, yet the new export is in place: wrong; go on to
                # see every request where that happens.
                failed_but_committed.append((index, method, Path(path).name, type(result["error"]).__name__))
                proxy.reset()
                again, notices = chunked_call(server, uri)
                assert "error" not in again, (where, again)
            elif "error" in result:
                assert isinstance(result["error"], psycopg.errors.QueryCanceled), where
                journaled = check_cancelled_chunked_state(store, prefix, before, old_parts, where)
                # The same CALL again goes on after the chunks the journal lists.
                proxy.reset()
                again, notices = chunked_call(server, uri)
                assert "error" not in again, (where, again)
                assert chunks_noticed(notices) == (4, journaled), (where, notices)
            else:
                after = exported_lines(store, prefix)
                assert after[1] == now and after[0] != before[0], where
                names = objects_under(store, prefix)
                assert "lease.json" not in names, (where, names)
                journal = [n for n in names if n.startswith("progress")]
                if journal:
                    journal_left.append((index, method, Path(path).name, journal))
                # The next call, with overwrite, is a new export of the
                # table as it is then (not the finished one again), and
                # removes what is left.
                with server.connect() as conn:
                    conn.execute("UPDATE cp_src SET t = %s WHERE id = 1", [f"after step {index}"])
                    later = lines_of(conn)
                proxy.reset()
                again, notices = chunked_call(server, uri)
                assert "error" not in again, (where, again)
                redone = exported_lines(store, prefix)
                if chunks_noticed(notices) != (4, 0) or redone[1] != later or redone[0] == after[0]:
                    not_exported_again.append((index, method, Path(path).name, notices,
                                               redone[0] == after[0], redone[1] == later))
            with server.connect() as conn:
                assert verified(conn, uri), where
                if "error" in result:
                    assert exported_lines(store, prefix)[1] == lines_of(conn), where
            only_the_export_is_there(store, prefix)
            outcomes.append(("failed" if "error" in result else "committed", method, Path(path).name))
            index += 1
    finally:
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = md5(id::text) WHERE id = 1")
    for i, outcome in enumerate(outcomes):
        print(i, *outcome)  # shown with a failure
    print("journal left:", journal_left)
    print("not exported again:", not_exported_again)
    # A call whose export is committed succeeds: (index, method, request,
    # error) of each call that failed with the new export in place.
    assert failed_but_committed == [], (failed_but_committed, outcomes)
    # One session makes every request in order: exactly those before the
    # manifest's PUT fail.
    commit = [i for i, o in enumerate(outcomes) if o[1] == "PUT" and o[2].startswith("manifest.json")]
    assert len(commit) == 1, outcomes
    assert [o[0] for o in outcomes] == ["failed"] * commit[0] + ["committed"] * (len(outcomes) - commit[0]), \
        outcomes
    # A call that succeeded removed its journal: the journal is deleted once
    # the manifest is in place (README, object storage; ARCHITECTURE.md,
    # commit points: "journal removed, lease released").
    assert journal_left == [], (journal_left, outcomes)
    # An overwriting call after one that succeeded exports anew. (index,
    # method, request, NOTICEs, same export id as before, lines equal the
    # table) of each that did not.
    assert not_exported_again == [], not_exported_again


def test_a_chunk_the_store_stores_after_a_cancel_is_not_left_behind(server, proxy, store):
    """The PUT of each chunk's part in turn reaches the store only after
    the call was cancelled. The call fails, the old export stays whole and
    verified, and the next call finishes the export from the chunks the
    journal lists: then the prefix holds nothing that its manifest does not
    list (the late part is rewritten or removed)."""
    prefix = "chunked-late/"
    uri = f"s3://{BUCKET}/{prefix}"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("CALL stream_export_chunked('cp_src', %s, 'id', chunk_rows => 5000)", [uri])
    # The requests of one whole overwriting call: which of them put parts.
    proxy.reset()
    result, _ = chunked_call(server, uri)
    assert "error" not in result, result
    part_puts = [i for i, (m, p) in enumerate(proxy.requests)
                 if m == "PUT" and Path(urllib.parse.urlsplit(p).path).name.startswith("part-")]
    assert len(part_puts) == 4, proxy.requests
    try:
        for chunk, index in enumerate(part_puts):
            with server.connect() as conn:
                before = exported_lines(store, prefix)
                old_parts = {p["file"] for p in manifest_of(store, prefix)["parts"]}
                conn.execute("UPDATE cp_src SET t = %s WHERE id = 1", [f"late chunk {chunk}"])
            result, held = chunked_cancelled_at(server, proxy, uri, index, late=True)
            assert held, chunk
            method, path = proxy.requests[index]
            where = (chunk, index, method, path, result)
            assert method == "PUT" and f"-{chunk:05d}." in path, where
            assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), where
            with server.connect() as conn:
                assert verified(conn, uri), where
            journaled = check_cancelled_chunked_state(store, prefix, before, old_parts, where)
            assert journaled == chunk, (where, objects_under(store, prefix))
            proxy.reset()
            again, notices = chunked_call(server, uri)
            assert "error" not in again, (where, again)
            assert chunks_noticed(notices) == (4, chunk), (where, notices)
            with server.connect() as conn:
                assert verified(conn, uri), where
                assert exported_lines(store, prefix)[1] == lines_of(conn), where
            only_the_export_is_there(store, prefix)
    finally:
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = md5(id::text) WHERE id = 1")


def test_a_cancel_while_a_chunked_export_removes_its_journal_keeps_the_export(server, proxy, store):
    """The cancel meets the removal of the journal, after the manifest is in
    place: the call succeeds (the export is committed). Then the table
    changes and the next overwriting call is cancelled at its second
    chunk: the export committed before is still whole and verified, and
    the call after that exports the table as it is."""
    prefix = "chunked-journal/"
    uri = f"s3://{BUCKET}/{prefix}"
    proxy.reset()
    with server.connect() as conn:
        conn.execute("CALL stream_export_chunked('cp_src', %s, 'id', chunk_rows => 5000)", [uri])
    proxy.reset()
    result, _ = chunked_call(server, uri)
    assert "error" not in result, result
    removal = [i for i, (m, p) in enumerate(proxy.requests)
               if m == "DELETE" and p.endswith(f"/{prefix}progress-0000000000.json")]
    assert len(removal) == 1, proxy.requests
    problems = []
    try:
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = 'journal 1' WHERE id = 1")
            first = lines_of(conn)
        result, held = chunked_cancelled_at(server, proxy, uri, removal[0])
        assert held
        committed = exported_lines(store, prefix)
        assert committed[1] == first
        if "error" in result:
            problems.append(("the committed call failed", result["error"]))
        with server.connect() as conn:
            assert verified(conn, uri)
            conn.execute("UPDATE cp_src SET t = 'journal 2' WHERE id = 1")
        # Cancelled before its commit point: the export committed before
        # stays whole.
        result, held = chunked_cancelled_at(server, proxy, uri, None, hold_suffix="-00001.ndjson")
        assert held
        assert isinstance(result.get("error"), psycopg.errors.QueryCanceled), result
        with server.connect() as conn:
            ok, _, _, detail = conn.execute("SELECT * FROM stream_export_verify_manifest(%s)", [uri]).fetchone()
        if not ok:
            problems.append(("the committed export no longer verifies", detail))
        elif exported_lines(store, prefix) != committed:
            problems.append(("the committed export changed", exported_lines(store, prefix)[0], committed[0]))
        proxy.reset()
        result, notices = chunked_call(server, uri)
        assert "error" not in result, result
        with server.connect() as conn:
            assert verified(conn, uri)
            assert exported_lines(store, prefix)[1] == lines_of(conn)
        only_the_export_is_there(store, prefix)
    finally:
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = md5(id::text) WHERE id = 1")
    assert problems == [], problems


def test_a_journal_the_store_would_not_delete_is_never_resumed(server, proxy, store):
    """The store refuses to delete the journal of a chunked export that
    committed: the next overwriting call does not take that journal up (it
    used to resume it: the old rows committed again under the old export
    id); it fails (58030) until the store deletes again, and then exports
    the table afresh."""
    prefix = "journal-kept/"
    uri = f"s3://{BUCKET}/{prefix}"
    proxy.reset(refuse_deletes=f"/{prefix}progress")
    try:
        result, _ = chunked_call(server, uri)
        assert "error" not in result, result
        first_id, _ = exported_lines(store, prefix)
        assert journal_header(store, prefix) is not None
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = 'after the first' WHERE id = 1")
        result, _ = chunked_call(server, uri)
        assert isinstance(result.get("error"), psycopg.errors.IoError), result
        assert exported_lines(store, prefix)[0] == first_id
        proxy.reset()
        result, notices = chunked_call(server, uri)
        assert "error" not in result, result
        assert chunks_noticed(notices)[1] == 0
        with server.connect() as conn:
            new_id, lines = exported_lines(store, prefix)
            assert new_id != first_id and lines == lines_of(conn)
        only_the_export_is_there(store, prefix)
    finally:
        proxy.reset()
        with server.connect() as conn:
            conn.execute("UPDATE cp_src SET t = md5(id::text) WHERE id = 1")
