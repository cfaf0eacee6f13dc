"""Object storage: exports to s3:// URIs against real S3-compatible servers
(moto, and SeaweedFS, which checks SigV4 signatures) that this module starts
on loopback and always stops. The module runs once against each.

The cluster gets its AWS configuration the way a production server does:
environment variables of the server process, and shared config and
credentials files with profiles (pointed to by AWS_CONFIG_FILE and
AWS_SHARED_CREDENTIALS_FILE). The files are read for every export, so tests
add profiles for other stores while the cluster runs. The stores are
inspected with boto3, independently of the extension's own client.
"""

from __future__ import annotations

import gzip
import json
import secrets
import shutil
import socket
import tempfile
import threading
import time
import zlib
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import run_in_thread, wait_until, zstd_decompress
from stores import MotoStore, SeaweedStore, Store, free_port, start_store

BUCKET = "exports"
# A secret that must never show up in the log or in pg_stat_activity.
SECRET = "s3cr3t-" + secrets.token_hex(12)
# The stores every test that takes `store` runs against: moto, and
# SeaweedFS, which checks signatures as a real store does.
STORE_KINDS = ["moto", "seaweedfs"]
# For a test about something else than the store (a fake store of its own,
# a store started and killed by the test): moto only.
moto_only = pytest.mark.parametrize("store", ["moto"], indirect=True)


@pytest.fixture(scope="module")
def aws_dir():
    """The server's shared AWS config and credentials files."""
    path = Path(tempfile.mkdtemp(prefix="pse-aws.", dir="/tmp"))
    path.chmod(0o755)
    (path / "config").write_text("")
    (path / "credentials").write_text("")
    for f in ("config", "credentials"):
        (path / f).chmod(0o644)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def add_profile(aws_dir: Path, name: str, *, endpoint: str, key_id: str, secret: str) -> None:
    with open(aws_dir / "config", "a") as f:
        f.write(f"[profile {name}]\nregion = us-east-1\nendpoint_url = {endpoint}\nallow_http = true\n")
    with open(aws_dir / "credentials", "a") as f:
        f.write(f"[{name}]\naws_access_key_id = {key_id}\naws_secret_access_key = {secret}\n")


@pytest.fixture(scope="module", params=STORE_KINDS)
def store(aws_dir, request):
    s = start_store(request.param, aws_dir, "main", "testing", SECRET)
    try:
        s.client().create_bucket(Bucket=BUCKET)
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="module")
def cluster(store, aws_dir):
    srv = start_cluster("pg_stream_export", environment={
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": store.endpoint,
        "AWS_ALLOW_HTTP": "true",
        "AWS_CONFIG_FILE": str(aws_dir / "config"),
        "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
    }, settings={"log_statement": "all", "log_min_messages": "debug1"})
    try:
        with srv.connect() as c:
            c.execute("""
                CREATE TABLE obj_src AS
                SELECT g AS id,
                       md5(g::text) || E' \\u00e9\\t"\\\\ \\u2603' AS t,
                       (g * 1.5)::numeric AS n,
                       timestamptz '2020-01-01 00:00+00' + g * interval '1 minute' AS ts,
                       CASE WHEN g % 7 = 0 THEN NULL ELSE jsonb_build_object('g', g, 'a', ARRAY[g, -g]) END AS j
                FROM generate_series(1, 200000) g""")
            c.execute("ALTER TABLE obj_src ADD PRIMARY KEY (id)")
            c.execute("""
                CREATE FUNCTION upload_gate(id int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
                BEGIN
                  IF id = 150000 THEN PERFORM pg_advisory_xact_lock_shared(4300); END IF;
                  RETURN true;
                END $$""")
            # The same gate, for the workers of a directory export only (its
            # leader samples the key through a row security policy).
            c.execute("""
                CREATE FUNCTION worker_gate(id int) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
                BEGIN
                  IF id = 150000 AND (SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid())
                                     = 'pg_stream_export' THEN
                    PERFORM pg_advisory_xact_lock_shared(4300);
                  END IF;
                  RETURN true;
                END $$""")
        yield srv
    finally:
        log = stop_cluster(srv)
        if crashes_in(log):
            pytest.fail("a backend crashed during the object storage tests:\n" + log[-5000:])


@pytest.fixture
def conn(cluster):
    with cluster.connect() as c:
        yield c


def get(store: Store, key: str) -> bytes:
    return store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def exists(store: Store, key: str) -> bool:
    listing = store.client().list_objects_v2(Bucket=BUCKET, Prefix=key)
    return any(o["Key"] == key for o in listing.get("Contents", []))


def open_uploads(store: Store, bucket: str = BUCKET) -> list:
    return store.client().list_multipart_uploads(Bucket=bucket).get("Uploads", [])


def expected_lines(conn, table: str = "obj_src") -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT row_to_json(r)::text FROM {table} r ORDER BY id")]


@pytest.mark.parametrize("compression", ["none", "gzip", "zstd"])
def test_object_equals_the_file_export_and_round_trips(conn, store, server_dir, compression):
    suffix = {"none": ".ndjson", "gzip": ".ndjson.gz", "zstd": ".ndjson.zst"}[compression]
    uri = f"s3://{BUCKET}/round/obj{suffix}"
    path = server_dir / f"obj{suffix}"
    row = conn.execute(
        "SELECT path, rows, bytes, file_bytes, crc32 FROM stream_export_to_file("
        "'SELECT * FROM obj_src ORDER BY id', %s, compression => %s, footer => true)",
        [uri, compression]).fetchone()
    conn.execute("SELECT stream_export_to_file('SELECT * FROM obj_src ORDER BY id', %s, "
                 "compression => %s, footer => true)", [str(path), compression])
    data = get(store, f"round/obj{suffix}")
    assert data == path.read_bytes()
    assert row[0] == uri and row[1] == 200_000 and row[3] == len(data)
    if compression == "gzip":
        # One gzip member: a single-member decoder reads all and leaves nothing.
        d = zlib.decompressobj(31)
        text = d.decompress(data) + d.flush()
        assert d.eof and d.unused_data == b""
    elif compression == "zstd":
        text = zstd_decompress(data)
    else:
        text = data
    lines = text.decode().splitlines()
    assert lines[:-1] == expected_lines(conn)
    footer = json.loads(lines[-1])["_stream_export"]
    assert footer["rows"] == 200_000 and footer["crc32"] == row[4]
    ok, rows, _, crc, detail = conn.execute("SELECT * FROM stream_export_verify(%s)", [uri]).fetchone()
    assert ok and rows == 200_000 and crc == row[4], detail
    assert open_uploads(store) == []


def test_a_large_object_goes_up_in_parts(conn, store, server_dir):
    conn.execute("SET pg_stream_export.object_part_size = '5MB'")
    uri = f"s3://{BUCKET}/multi/obj.ndjson"
    file_bytes = conn.execute("SELECT file_bytes FROM stream_export_to_file('obj_src', %s)", [uri]).fetchone()[0]
    conn.execute("SELECT stream_export_to_file('obj_src', %s)", [str(server_dir / "obj.ndjson")])
    head = store.client().head_object(Bucket=BUCKET, Key="multi/obj.ndjson")
    parts = int(head["ETag"].strip('"').rsplit("-", 1)[1])
    assert file_bytes > 3 * 5 * 2**20 and parts == -(-file_bytes // (5 * 2**20)) and parts >= 3
    assert get(store, "multi/obj.ndjson") == (server_dir / "obj.ndjson").read_bytes()
    # A small export is one PUT (no part suffix in its ETag).
    conn.execute("SELECT stream_export_to_file('SELECT 1 AS x', %s)", [f"s3://{BUCKET}/multi/small.ndjson"])
    assert "-" not in store.client().head_object(Bucket=BUCKET, Key="multi/small.ndjson")["ETag"]
    assert get(store, "multi/small.ndjson") == b'{"x":1}\n'


def test_copy_to_an_object(conn, store, server_dir):
    conn.execute("COPY obj_src TO 's3://exports/copy/obj.ndjson.gz' WITH (FORMAT ndjson, COMPRESSION gzip)")
    conn.execute(f"COPY obj_src TO '{server_dir}/obj.ndjson.gz' WITH (FORMAT ndjson, COMPRESSION gzip)")
    assert get(store, "copy/obj.ndjson.gz") == (server_dir / "obj.ndjson.gz").read_bytes()
    assert gzip.decompress(get(store, "copy/obj.ndjson.gz")).decode().splitlines() == expected_lines(conn)
    # COPY TO replaces, as it does a file.
    conn.execute("COPY (SELECT 1 AS x) TO 's3://exports/copy/obj.ndjson.gz' WITH (FORMAT ndjson, COMPRESSION gzip)")
    assert gzip.decompress(get(store, "copy/obj.ndjson.gz")) == b'{"x":1}\n'


def test_overwrite_rules_match_the_file_export(conn, store):
    uri = f"s3://{BUCKET}/over/obj.ndjson"
    conn.execute("SELECT stream_export_to_file('SELECT 1 AS x', %s)", [uri])
    with pytest.raises(errors.DuplicateFile):
        conn.execute("SELECT stream_export_to_file('SELECT 2 AS x', %s)", [uri])
    assert get(store, "over/obj.ndjson") == b'{"x":1}\n'
    conn.execute("SELECT stream_export_to_file('SELECT 2 AS x', %s, overwrite => true)", [uri])
    assert get(store, "over/obj.ndjson") == b'{"x":2}\n'


def test_keys_with_spaces_and_unicode(conn, store):
    key = "odd keys/a b+c=d&e é ☃ (1).ndjson"
    conn.execute("SELECT stream_export_to_file('SELECT 1 AS x', %s, footer => true)", [f"s3://{BUCKET}/{key}"])
    assert get(store, key).startswith(b'{"x":1}\n')
    assert conn.execute("SELECT ok FROM stream_export_verify(%s)", [f"S3://{BUCKET}/{key}"]).fetchone()[0]


def part_objects(store: Store, prefix: str) -> list[str]:
    listing = store.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def test_directory_export_with_two_partitions(conn, store):
    prefix = f"s3://{BUCKET}/dir/"
    row = conn.execute("SELECT directory, partitions, rows FROM stream_export_to_directory("
                       "'obj_src', 's3://exports/dir', 'id', 2, compression => 'gzip')").fetchone()
    assert row == (prefix, 2, 200_000)
    manifest = json.loads(get(store, "dir/manifest.json"))
    names = [p["file"] for p in manifest["parts"]]
    assert part_objects(store, "dir/") == sorted(["dir/manifest.json"] + [f"dir/{n}" for n in names])
    lines = []
    for name in names:
        lines += gzip.decompress(get(store, f"dir/{name}")).decode().splitlines()[:-1]
    assert lines == expected_lines(conn)
    assert conn.execute("SELECT ok, parts, rows FROM stream_export_verify_manifest(%s)",
                        [prefix]).fetchone() == (True, 2, 200_000)
    # A finished export is there: refused without overwrite, replaced with it.
    with pytest.raises(errors.DuplicateFile):
        conn.execute("SELECT * FROM stream_export_to_directory('obj_src', %s, 'id', 2)", [prefix])
    conn.execute("SELECT * FROM stream_export_to_directory('obj_src', %s, 'id', 3, overwrite => true)", [prefix])
    manifest = json.loads(get(store, "dir/manifest.json"))
    assert len(manifest["parts"]) == 3
    assert part_objects(store, "dir/") == sorted(
        ["dir/manifest.json"] + [f"dir/{p['file']}" for p in manifest["parts"]])
    assert open_uploads(store) == []


def test_verify_finds_damaged_objects(conn, store):
    conn.execute("SELECT stream_export_to_file('obj_src', 's3://exports/damage/obj.ndjson', footer => true)")
    data = bytearray(get(store, "damage/obj.ndjson"))
    data[1000] ^= 0x01
    store.client().put_object(Bucket=BUCKET, Key="damage/obj.ndjson", Body=bytes(data))
    ok, _, _, _, detail = conn.execute(
        "SELECT * FROM stream_export_verify('s3://exports/damage/obj.ndjson')").fetchone()
    assert not ok and "CRC" in detail.upper(), detail
    conn.execute("SELECT * FROM stream_export_to_directory('obj_src', 's3://exports/damage/dir/', 'id', 2)")
    assert conn.execute("SELECT ok FROM stream_export_verify_manifest('s3://exports/damage/dir/')").fetchone()[0]
    manifest = json.loads(get(store, "damage/dir/manifest.json"))
    victim = f"damage/dir/{manifest['parts'][1]['file']}"
    truncated = get(store, victim)[:-5000]
    store.client().put_object(Bucket=BUCKET, Key=victim, Body=truncated)
    ok, parts, _, detail = conn.execute(
        "SELECT * FROM stream_export_verify_manifest('s3://exports/damage/dir/')").fetchone()
    assert not ok and parts == 2 and manifest["parts"][1]["file"] in detail, detail
    store.client().delete_object(Bucket=BUCKET, Key=victim)
    ok, _, _, detail = conn.execute(
        "SELECT * FROM stream_export_verify_manifest('s3://exports/damage/dir/')").fetchone()
    assert not ok and "cannot be read" in detail, detail
    with pytest.raises(errors.UndefinedFile):
        conn.execute("SELECT * FROM stream_export_verify('s3://exports/damage/none.ndjson')")


def wait_at_gate(holder, pid: int | None = None) -> None:
    """Wait until an exporter (`pid`, or any backend) waits at the gate
    (upload_gate or worker_gate: advisory lock 4300, which `holder` holds)."""
    wait_until(lambda: holder.execute(
        "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4300 AND NOT granted"
        " AND (%s::int IS NULL OR pid = %s)", [pid, pid]).fetchone())


def make_gated_copy(conn, table: str, gate: str) -> None:
    """A copy of obj_src that the role obj_rls (which may write to object
    storage) reads through a row security policy calling `gate`."""
    conn.execute(f"DROP TABLE IF EXISTS {table}; DROP ROLE IF EXISTS obj_rls")
    conn.execute(f"CREATE TABLE {table} AS SELECT * FROM obj_src")
    conn.execute(f"ALTER TABLE {table} ADD PRIMARY KEY (id)")
    conn.execute(f"ANALYZE {table}")
    conn.execute("CREATE ROLE obj_rls LOGIN IN ROLE stream_export_object_store_write")
    conn.execute(f"GRANT SELECT ON {table} TO obj_rls")
    conn.execute(f"ALTER TABLE {table} ENABLE ROW LEVEL SECURITY")
    conn.execute(f"CREATE POLICY gate ON {table} USING ({gate}(id))")


def drop_gated_copy(conn, table: str) -> None:
    conn.execute(f"DROP TABLE {table}")
    conn.execute("DROP ROLE obj_rls")


class GatedExport:
    """An export of obj_src that stops at row 150,000 (after several parts
    went up) on an advisory lock the test holds."""

    def __init__(self, cluster, uri: str, setup: str = ""):
        self.holder = cluster.connect()
        self.holder.execute("SELECT pg_advisory_lock(4300)")
        self.exporter = cluster.connect()
        self.pid = self.exporter.info.backend_pid
        if setup:
            self.exporter.execute(setup)
        self.exporter.execute("SET pg_stream_export.object_part_size = '5MB'")
        self.thread, self.result = run_in_thread(lambda: self.exporter.execute(
            "SELECT * FROM stream_export_to_file("
            "'SELECT * FROM obj_src WHERE upload_gate(id)', %s)", [uri]).fetchall())
        wait_at_gate(self.holder, self.pid)

    def release(self) -> None:
        self.holder.execute("SELECT pg_advisory_unlock(4300)")

    def finish(self):
        self.thread.join()
        return self.result

    def close(self) -> None:
        self.release()
        self.thread.join()
        self.holder.close()
        self.exporter.close()


def wait_for_parts(store: Store, key: str, at_least: int = 1) -> str:
    """Wait until the upload of `key` has `at_least` parts in the store."""
    def parts_up():
        for upload in open_uploads(store):
            if upload["Key"] == key:
                parts = store.client().list_parts(Bucket=BUCKET, Key=key, UploadId=upload["UploadId"])
                if len(parts.get("Parts", [])) >= at_least:
                    return upload["UploadId"]
        return None
    return wait_until(parts_up)


def test_cancel_mid_upload_leaves_no_object_and_no_upload(cluster, store):
    gate = GatedExport(cluster, f"s3://{BUCKET}/cancel/obj.ndjson")
    try:
        wait_for_parts(store, "cancel/obj.ndjson", 2)
        gate.holder.execute("SELECT pg_cancel_backend(%s)", [gate.pid])
        result = gate.finish()
        assert isinstance(result.get("error"), errors.QueryCanceled)
    finally:
        gate.close()
    assert open_uploads(store) == [] and not exists(store, "cancel/obj.ndjson")


def test_statement_timeout_mid_upload_leaves_nothing(cluster, store):
    gate = GatedExport(cluster, f"s3://{BUCKET}/timeout/obj.ndjson", setup="SET statement_timeout = '8s'")
    try:
        wait_for_parts(store, "timeout/obj.ndjson", 2)
        result = gate.finish()
        assert isinstance(result.get("error"), errors.QueryCanceled)
        assert "statement timeout" in str(result["error"])
    finally:
        gate.close()
    assert open_uploads(store) == [] and not exists(store, "timeout/obj.ndjson")


def test_a_terminated_backend_aborts_its_upload(cluster, store):
    gate = GatedExport(cluster, f"s3://{BUCKET}/terminate/obj.ndjson")
    try:
        wait_for_parts(store, "terminate/obj.ndjson", 2)
        gate.holder.execute("SELECT pg_terminate_backend(%s)", [gate.pid])
        result = gate.finish()
        assert isinstance(result.get("error"), psycopg.OperationalError)
        # The exit callback aborts the upload before the process is gone.
        wait_until(lambda: gate.holder.execute(
            "SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)", [gate.pid]).fetchone()[0])
    finally:
        gate.close()
    assert open_uploads(store) == [] and not exists(store, "terminate/obj.ndjson")


def test_the_store_killed_mid_upload(cluster, store, aws_dir):
    doomed = start_store(store.kind, aws_dir, "doomed", "testing", SECRET)
    try:
        doomed.client().create_bucket(Bucket=BUCKET)
        profile = f"doomed-{store.kind}"
        add_profile(aws_dir, profile, endpoint=doomed.endpoint, key_id="testing", secret=SECRET)
        gate = GatedExport(cluster, f"s3://{BUCKET}/killed/obj.ndjson",
                           setup=f"SET pg_stream_export.object_store_profile = '{profile}'")
        try:
            wait_for_parts(doomed, "killed/obj.ndjson", 1)
            doomed.kill()
            gate.release()
            result = gate.finish()
            assert isinstance(result.get("error"), errors.ConnectionFailure), result
            assert "s3://exports/killed/obj.ndjson" in str(result["error"])
            # The session is still usable.
            assert gate.exporter.execute("SELECT 1").fetchone() == (1,)
        finally:
            gate.close()
    finally:
        doomed.stop()


def test_an_object_that_appears_during_the_export_is_not_replaced(cluster, store):
    gate = GatedExport(cluster, f"s3://{BUCKET}/race/obj.ndjson")
    try:
        wait_for_parts(store, "race/obj.ndjson", 1)
        store.client().put_object(Bucket=BUCKET, Key="race/obj.ndjson", Body=b"theirs\n")
        gate.release()
        result = gate.finish()
        assert isinstance(result.get("error"), errors.DuplicateFile), result
    finally:
        gate.close()
    assert get(store, "race/obj.ndjson") == b"theirs\n"
    assert open_uploads(store) == []


def stop_sessions_of(holder, role: str) -> None:
    """After a failed assertion: end the role's sessions (and so their
    workers) before the table they read is dropped."""
    holder.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %s", [role])
    holder.execute("SELECT pg_advisory_unlock_all()")
    wait_until(lambda: not holder.execute(
        "SELECT 1 FROM pg_stat_activity WHERE usename = %s", [role]).fetchone())


def test_a_failed_directory_export_leaves_no_objects(cluster, conn, store):
    """One partition done and uploaded, the other stopped at a gate (a row
    security policy, so the workers meet it too): a cancel of the leader
    removes the finished part and aborts the unfinished upload."""
    make_gated_copy(conn, "obj_gated", "worker_gate")
    holder = cluster.connect()
    exporter = psycopg.connect(cluster.dsn(user="obj_rls"), autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(4300)")
        exporter.execute("SET pg_stream_export.object_part_size = '5MB'")
        thread, result = run_in_thread(lambda: exporter.execute(
            "SELECT * FROM stream_export_to_directory('obj_gated', 's3://exports/failed/', 'id', 2)").fetchall())
        wait_at_gate(holder)
        wait_until(lambda: [k for k in part_objects(store, "failed/") if "/part-" in k])
        holder.execute("SELECT pg_cancel_backend(%s)", [exporter.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        assert part_objects(store, "failed/") == [] and open_uploads(store) == []
    finally:
        stop_sessions_of(holder, "obj_rls")
        holder.close()
        exporter.close()
        drop_gated_copy(conn, "obj_gated")


def chunk_lines(store: Store, prefix: str) -> list[str]:
    manifest = json.loads(get(store, f"{prefix}manifest.json"))
    lines = []
    for part in manifest["parts"]:
        lines += get(store, f"{prefix}{part['file']}").decode().splitlines()[:-1]
    return lines


def test_chunked_export_to_a_prefix(conn, store):
    conn.execute("CALL stream_export_chunked('obj_src', 's3://exports/chunked/', 'id', chunk_rows => 60000)")
    manifest = json.loads(get(store, "chunked/manifest.json"))
    assert manifest["consistency"] == "per_chunk" and manifest["complete"] is True
    assert [p["rows"] for p in manifest["parts"]] == [60000, 60000, 60000, 20000]
    assert part_objects(store, "chunked/") == sorted(
        ["chunked/manifest.json"] + [f"chunked/{p['file']}" for p in manifest["parts"]])
    assert chunk_lines(store, "chunked/") == expected_lines(conn)
    assert conn.execute("SELECT ok, parts, rows FROM stream_export_verify_manifest('s3://exports/chunked/')"
                        ).fetchone() == (True, 4, 200_000)
    with pytest.raises(errors.DuplicateFile):
        conn.execute("CALL stream_export_chunked('obj_src', 's3://exports/chunked/', 'id')")
    conn.execute("CALL stream_export_chunked('obj_src', 's3://exports/chunked/', 'id', overwrite => true)")
    manifest = json.loads(get(store, "chunked/manifest.json"))
    assert [p["rows"] for p in manifest["parts"]] == [200000]
    assert part_objects(store, "chunked/") == sorted(
        ["chunked/manifest.json", f"chunked/{manifest['parts'][0]['file']}"])
    assert open_uploads(store) == []


def test_chunked_export_to_a_prefix_resumes_after_a_cancel(cluster, conn, store):
    """Chunks of 60,000 rows; a row security policy stops the export at
    row 150,000 (chunk 2). After a cancel the journal objects list chunks 0
    and 1; the next CALL does the rest."""
    make_gated_copy(conn, "obj_chunks", "upload_gate")
    holder = cluster.connect()
    exporter = psycopg.connect(cluster.dsn(user="obj_rls"), autocommit=True)
    call = "CALL stream_export_chunked('obj_chunks', 's3://exports/resume/', 'id', chunk_rows => 60000)"
    # Each chunk's rows in key order through the index, so the gate is met
    # in chunk 2 and not while an earlier chunk scans the whole table.
    exporter.execute("SET enable_seqscan = off")
    exporter.execute("SET enable_bitmapscan = off")
    try:
        holder.execute("SELECT pg_advisory_lock(4300)")
        thread, result = run_in_thread(lambda: exporter.execute(call))
        wait_at_gate(holder)
        holder.execute("SELECT pg_cancel_backend(%s)", [exporter.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        objects = part_objects(store, "resume/")
        assert [k for k in objects if "progress" in k] == [
            "resume/progress-0000000000.json", "resume/progress-0000000001.json", "resume/progress.json"]
        assert len([k for k in objects if "/part-" in k]) == 2
        assert open_uploads(store) == []
        holder.execute("SELECT pg_advisory_unlock(4300)")
        notices = []
        exporter.add_notice_handler(lambda d: notices.append(d.message_primary))
        exporter.execute(call)
        assert any("4 chunk(s), 2 of them from an earlier call" in n for n in notices), notices
        assert chunk_lines(store, "resume/") == expected_lines(conn)
        assert [k for k in part_objects(store, "resume/") if "progress" in k] == []
        assert conn.execute("SELECT ok, parts FROM stream_export_verify_manifest('s3://exports/resume/')"
                            ).fetchone() == (True, 4)
    finally:
        stop_sessions_of(holder, "obj_rls")
        holder.close()
        exporter.close()
        drop_gated_copy(conn, "obj_chunks")


def test_errors_have_their_sqlstates(conn, store, aws_dir):
    cases = [
        ("s3://no-such-bucket/x.ndjson", errors.UndefinedFile),
        ("s3://Bad_Bucket/x.ndjson", errors.InvalidParameterValue),
        ("s3://exports/", errors.InvalidParameterValue),
        ("s3://user:pw@exports/x.ndjson", errors.InvalidParameterValue),
        ("gs://exports/x.ndjson", errors.FeatureNotSupported),
        ("az://container/x.ndjson", errors.FeatureNotSupported),
    ]
    for uri, error in cases:
        with pytest.raises(error):
            conn.execute("SELECT stream_export_to_file('SELECT 1', %s)", [uri])
    with pytest.raises(errors.FeatureNotSupported):
        conn.execute("CALL stream_export_chunked('obj_src', 'gs://exports/chunked/', 'id')")
    port = free_port()  # nothing listens there
    add_profile(aws_dir, f"unreachable-{store.kind}", endpoint=f"http://127.0.0.1:{port}", key_id="k",
                secret=SECRET)
    conn.execute(f"SET pg_stream_export.object_store_profile = 'unreachable-{store.kind}'")
    with pytest.raises(errors.ConnectionFailure) as raised:
        conn.execute("SELECT stream_export_to_file('SELECT 1', 's3://exports/x.ndjson')")
    assert "s3://exports/x.ndjson" in str(raised.value)
    conn.execute("SET pg_stream_export.object_store_profile = 'no-such-profile'")
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SELECT stream_export_to_file('SELECT 1', 's3://exports/x.ndjson')")
    conn.execute("RESET pg_stream_export.object_store_profile")
    with pytest.raises(errors.InvalidParameterValue):
        conn.execute("SET pg_stream_export.object_part_size = '1MB'")


@pytest.fixture(scope="module")
def auth_store(aws_dir, store):
    """A store of the same kind with its own users: one that may write, one
    that may only read. moto checks signatures and IAM policies after the
    first 7 requests, which set it up; SeaweedFS checks them always."""
    kind = store.kind
    if kind == "moto":
        s = MotoStore(aws_dir, "auth", "testing", SECRET, {"INITIAL_NO_AUTH_ACTION_COUNT": "7"})
        iam = s.client(service="iam")
        keys = {}
        for user, actions in (("writer", ["s3:*"]), ("reader", ["s3:GetObject", "s3:ListBucket"])):
            iam.create_user(UserName=user)
            keys[user] = iam.create_access_key(UserName=user)["AccessKey"]
            iam.put_user_policy(UserName=user, PolicyName="p", PolicyDocument=json.dumps({
                "Version": "2012-10-17",
                "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
    else:
        keys = {user: {"AccessKeyId": f"AKIA{user.upper():0<16}", "SecretAccessKey": secrets.token_hex(20)}
                for user in ("writer", "reader")}
        s = SeaweedStore(aws_dir, "auth", "testing", SECRET, identities=[
            ("writer", keys["writer"]["AccessKeyId"], keys["writer"]["SecretAccessKey"],
             ["Read", "Write", "List", "Tagging"]),
            ("reader", keys["reader"]["AccessKeyId"], keys["reader"]["SecretAccessKey"], ["Read", "List"]),
        ])
    try:
        s.client().create_bucket(Bucket=BUCKET)
        for name, key_id, secret in (
            ("writer", keys["writer"]["AccessKeyId"], keys["writer"]["SecretAccessKey"]),
            ("reader", keys["reader"]["AccessKeyId"], keys["reader"]["SecretAccessKey"]),
            ("wrong-secret", keys["writer"]["AccessKeyId"], SECRET),
            ("unknown-key", "AKIAUNKNOWNUNKNOWN00", SECRET),
        ):
            add_profile(aws_dir, f"auth-{kind}-{name}", endpoint=s.endpoint, key_id=key_id, secret=secret)
        yield s, keys
    finally:
        s.stop()


def test_credentials_and_access_are_checked_by_the_store(conn, auth_store):
    store, keys = auth_store
    kind = store.kind
    writer = store.client(keys["writer"]["AccessKeyId"], keys["writer"]["SecretAccessKey"])
    conn.execute("SET pg_stream_export.object_part_size = '5MB'")
    # Signed requests the store accepts: a multipart upload and a read.
    conn.execute(f"SET pg_stream_export.object_store_profile = 'auth-{kind}-writer'")
    conn.execute("SELECT stream_export_to_file('obj_src', 's3://exports/auth/obj.ndjson', footer => true)")
    etag = writer.head_object(Bucket=BUCKET, Key="auth/obj.ndjson")["ETag"]
    assert int(etag.strip('"').rsplit("-", 1)[1]) >= 3
    assert conn.execute("SELECT ok FROM stream_export_verify('s3://exports/auth/obj.ndjson')").fetchone()[0]
    # A user the policy lets read but not write.
    conn.execute(f"SET pg_stream_export.object_store_profile = 'auth-{kind}-reader'")
    with pytest.raises(errors.InsufficientPrivilege) as raised:
        conn.execute("SELECT stream_export_to_file('obj_src', 's3://exports/auth/denied.ndjson')")
    assert "AccessDenied" in str(raised.value)
    assert conn.execute("SELECT ok FROM stream_export_verify('s3://exports/auth/obj.ndjson')").fetchone()[0]
    for profile in (f"auth-{kind}-wrong-secret", f"auth-{kind}-unknown-key"):
        conn.execute("SELECT set_config('pg_stream_export.object_store_profile', %s, false)", [profile])
        with pytest.raises(errors.InvalidAuthorizationSpecification):
            conn.execute("SELECT stream_export_to_file('obj_src', 's3://exports/auth/bad.ndjson', overwrite => true)")
        with pytest.raises(errors.InvalidAuthorizationSpecification):
            conn.execute("SELECT * FROM stream_export_verify('s3://exports/auth/obj.ndjson')")
    uploads = writer.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    assert uploads == []
    keys_there = [o["Key"] for o in writer.list_objects_v2(Bucket=BUCKET).get("Contents", [])]
    assert keys_there == ["auth/obj.ndjson"]


def test_roles_guard_object_storage(cluster, conn, store):
    conn.execute("DROP ROLE IF EXISTS obj_plain")
    conn.execute("CREATE ROLE obj_plain LOGIN")
    conn.execute("GRANT SELECT ON obj_src TO obj_plain")
    conn.execute("SELECT stream_export_to_file('SELECT 1 AS x', 's3://exports/roles/seed.ndjson', footer => true)")
    plain = psycopg.connect(cluster.dsn(user="obj_plain"), autocommit=True)
    try:
        for sql in (
            "SELECT stream_export_to_file('obj_src', 's3://exports/roles/x.ndjson')",
            "COPY obj_src TO 's3://exports/roles/x.ndjson' WITH (FORMAT ndjson)",
            "SELECT stream_export_to_directory('obj_src', 's3://exports/roles/d/', 'id', 2)",
            "SELECT stream_export_verify('s3://exports/roles/seed.ndjson')",
            "SELECT stream_export_verify_manifest('s3://exports/roles/d/')",
        ):
            with pytest.raises(errors.InsufficientPrivilege):
                plain.execute(sql)
        # pg_write_server_files is about server files, not object storage.
        conn.execute("GRANT pg_write_server_files, pg_read_server_files TO obj_plain")
        with pytest.raises(errors.InsufficientPrivilege):
            plain.execute("SELECT stream_export_to_file('obj_src', 's3://exports/roles/x.ndjson')")
        conn.execute("GRANT stream_export_object_store_write TO obj_plain")
        plain.execute("SELECT stream_export_to_file('obj_src', 's3://exports/roles/x.ndjson')")
        plain.execute("COPY obj_src TO 's3://exports/roles/y.ndjson' WITH (FORMAT ndjson)")
        with pytest.raises(errors.InsufficientPrivilege):
            plain.execute("SELECT stream_export_verify('s3://exports/roles/seed.ndjson')")
        conn.execute("GRANT stream_export_object_store_read TO obj_plain")
        assert plain.execute("SELECT ok FROM stream_export_verify('s3://exports/roles/seed.ndjson')").fetchone()[0]
        assert exists(store, "roles/x.ndjson") and exists(store, "roles/y.ndjson")
    finally:
        plain.close()
        conn.execute("DROP OWNED BY obj_plain")
        conn.execute("DROP ROLE obj_plain")


def test_no_secret_reaches_the_log_or_the_activity_view(cluster, conn):
    """Runs last in this module: every error above went to the log."""
    activity = conn.execute("SELECT string_agg(coalesce(query, ''), ' ') FROM pg_stat_activity").fetchone()[0]
    settings = conn.execute("SELECT string_agg(setting, ' ') FROM pg_settings").fetchone()[0]
    log = cluster.log_text()
    assert "could not upload" in log and "SignatureDoesNotMatch" in log
    for text in (activity, settings, log):
        assert SECRET not in text


# --- a store that stops answering ---------------------------------------------

class StallingStore:
    """A loopback TCP server that plays a store which stops answering.

    `silent`: accepts every connection and never answers. `parts`: answers
    HEAD (no object), CreateMultipartUpload and AbortMultipartUpload, and
    never answers (nor reads) an UploadPart. `body`: answers a GET with its
    headers and the first bytes of the body, then stalls. `stalled` is set
    once a request is being held; `seen` lists the request lines."""

    def __init__(self, mode: str):
        self.mode = mode
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(16)
        self.listener.settimeout(0.2)
        self.endpoint = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.stalled = threading.Event()
        self.done = threading.Event()
        self.seen: list[str] = []
        self.held: list[socket.socket] = []
        self.threads = [threading.Thread(target=self._accept)]
        self.threads[0].start()

    def _accept(self):
        while not self.done.is_set():
            try:
                sock, _ = self.listener.accept()
            except socket.timeout:
                continue
            thread = threading.Thread(target=self._serve, args=(sock,))
            self.threads.append(thread)
            thread.start()

    def _hold(self, sock):
        self.held.append(sock)
        self.stalled.set()
        self.done.wait()

    def _serve(self, sock):
        sock.settimeout(0.2)
        buffered = b""
        while not self.done.is_set():
            if self.mode == "silent":
                return self._hold(sock)
            while b"\r\n\r\n" not in buffered:
                try:
                    block = sock.recv(65536)
                except socket.timeout:
                    if self.done.is_set():
                        return sock.close()
                    continue
                if not block:
                    return sock.close()
                buffered += block
            head, _, buffered = buffered.partition(b"\r\n\r\n")
            line = head.split(b"\r\n")[0].decode()
            self.seen.append(line)
            method, target = line.split()[:2]
            length = 0
            for header in head.split(b"\r\n")[1:]:
                name, _, value = header.decode().partition(":")
                if name.strip().lower() == "content-length":
                    length = int(value)
            if method == "PUT" and "partNumber" in target:
                return self._hold(sock)  # the part's body is never read
            while len(buffered) < length:
                buffered += sock.recv(65536)
            buffered = buffered[length:]
            if self.mode == "body" and method == "GET":
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b'{"x":1}\n')
                return self._hold(sock)
            if method == "HEAD":
                answer = b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n"
            elif method == "POST" and "uploads" in target:
                xml = (b"<InitiateMultipartUploadResult><Bucket>b</Bucket><Key>k</Key>"
                       b"<UploadId>stalled-upload</UploadId></InitiateMultipartUploadResult>")
                answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(xml), xml)
            elif method == "DELETE":
                answer = b"HTTP/1.1 204 No Content\r\n\r\n"
            else:
                return self._hold(sock)
            sock.sendall(answer)

    def close(self):
        self.done.set()
        for thread in self.threads:
            thread.join()
        for sock in self.held:
            sock.close()
        self.listener.close()


@pytest.fixture
def stalling(aws_dir, request):
    store = StallingStore(request.param)
    add_profile(aws_dir, f"stalling-{id(store)}", endpoint=store.endpoint, key_id="testing", secret=SECRET)
    store.profile = f"stalling-{id(store)}"
    yield store
    store.close()


def start_stalled(cluster, stalling, sql: str, setup: str = ""):
    """Run `sql` against the stalling store in a thread; return when the
    store holds one of its requests."""
    conn = cluster.connect()
    conn.execute("SELECT set_config('pg_stream_export.object_store_profile', %s, false)", [stalling.profile])
    if setup:
        conn.execute(setup)
    pid = conn.info.backend_pid
    thread, result = run_in_thread(lambda: conn.execute(sql).fetchall())
    assert stalling.stalled.wait(60), "the export never reached the store"
    return conn, pid, thread, result


EXPORT_TO_STALLED = f"SELECT * FROM stream_export_to_file('obj_src', 's3://{BUCKET}/stalled/obj.ndjson')"


def ended_within(thread, seconds: float) -> float:
    """Join `thread`; how long it took (bounded far above the one second an
    interrupted request takes, far below the store timeouts' minutes)."""
    started = time.monotonic()
    thread.join(timeout=seconds)
    assert not thread.is_alive(), f"still waiting on the store after {seconds} s"
    return time.monotonic() - started


@moto_only  # the stalling store is a fake of its own
@pytest.mark.parametrize("stalling", ["silent", "parts"], indirect=True)
def test_cancel_ends_a_stalled_request(cluster, stalling):
    conn, pid, thread, result = start_stalled(cluster, stalling, EXPORT_TO_STALLED)
    try:
        with cluster.connect() as c:
            c.execute("SELECT pg_cancel_backend(%s)", [pid])
        ended_within(thread, 15)
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        assert "user request" in str(result["error"])
        # The session goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        conn.close()
    if stalling.mode == "parts":
        assert any(line.startswith("DELETE ") for line in stalling.seen), stalling.seen  # aborted


@moto_only  # the stalling store is a fake of its own
@pytest.mark.parametrize("stalling", ["silent", "parts"], indirect=True)
def test_statement_timeout_ends_a_stalled_request(cluster, stalling):
    conn, pid, thread, result = start_stalled(cluster, stalling, EXPORT_TO_STALLED,
                                              setup="SET statement_timeout = '3s'")
    try:
        ended_within(thread, 20)
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        assert "statement timeout" in str(result["error"])
    finally:
        conn.close()


@moto_only  # the stalling store is a fake of its own
@pytest.mark.parametrize("stalling", ["body"], indirect=True)
def test_cancel_ends_a_stalled_read(cluster, stalling):
    verify = f"SELECT * FROM stream_export_verify('s3://{BUCKET}/stalled/obj.ndjson')"
    conn, pid, thread, result = start_stalled(cluster, stalling, verify)
    try:
        with cluster.connect() as c:
            c.execute("SELECT pg_cancel_backend(%s)", [pid])
        ended_within(thread, 15)
        assert isinstance(result.get("error"), errors.QueryCanceled), result
    finally:
        conn.close()


@moto_only  # the stalling store is a fake of its own
@pytest.mark.parametrize("stalling", ["silent", "parts"], indirect=True)
def test_terminate_ends_a_stalled_request(cluster, stalling):
    conn, pid, thread, result = start_stalled(cluster, stalling, EXPORT_TO_STALLED)
    try:
        with cluster.connect() as c:
            c.execute("SELECT pg_terminate_backend(%s)", [pid])
            ended_within(thread, 15)
            assert isinstance(result.get("error"), psycopg.OperationalError), result
            wait_until(lambda: c.execute("SELECT NOT EXISTS (SELECT FROM pg_stat_activity WHERE pid = %s)",
                                         [pid]).fetchone()[0], timeout=15)
    finally:
        conn.close()


@pytest.mark.parametrize("stalling", ["parts"], indirect=True)
def test_fast_shutdown_with_a_stalled_upload(aws_dir, stalling):
    srv = start_cluster("pg_stream_export", environment={
        "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_REGION": "us-east-1",
        "AWS_CONFIG_FILE": str(aws_dir / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(aws_dir / "credentials"),
    })
    try:
        with srv.connect() as c:
            c.execute("CREATE TABLE obj_src AS SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 300000) g")
        conn, pid, thread, result = start_stalled(srv, stalling, EXPORT_TO_STALLED)
        try:
            started = time.monotonic()
            srv.pg_ctl("-m", "fast", "-w", "-t", "60", "stop")
            assert time.monotonic() - started < 20
            ended_within(thread, 15)
            assert isinstance(result.get("error"), psycopg.OperationalError), result
        finally:
            conn.close()
        assert any(line.startswith("DELETE ") for line in stalling.seen), stalling.seen  # aborted at exit
    finally:
        log = stop_cluster(srv)
        assert not crashes_in(log), log[-3000:]


# --- one export per prefix -----------------------------------------------------

def lease_of(store: Store, prefix: str):
    try:
        answer = store.client().get_object(Bucket=BUCKET, Key=f"{prefix}lease.json")
    except store.client().exceptions.NoSuchKey:
        return None
    return json.loads(answer["Body"].read()), answer["ETag"]


def test_one_export_per_prefix_and_leftovers_are_removed(cluster, conn, store):
    """A chunked export holds the prefix's lease while it runs (renewed,
    here every second); a second chunked or directory export to the prefix
    gets 55P03 and writes nothing. The next export to hold the lease removes
    what dead exports left: a stray part object and a multipart upload."""
    make_gated_copy(conn, "obj_leased", "upload_gate")
    holder = cluster.connect()
    exporter = psycopg.connect(cluster.dsn(user="obj_rls"), autocommit=True)
    call = "CALL stream_export_chunked('obj_leased', 's3://exports/leased/', 'id', chunk_rows => 60000)"
    exporter.execute("SET enable_seqscan = off")
    exporter.execute("SET enable_bitmapscan = off")
    exporter.execute("SET pg_stream_export.object_lease_ttl = '3s'")
    try:
        holder.execute("SELECT pg_advisory_lock(4300)")
        thread, result = run_in_thread(lambda: exporter.execute(call))
        wait_at_gate(holder)
        lease, etag = lease_of(store, "leased/")
        assert f"pid {exporter.info.backend_pid} " in lease["holder"]
        # Renewed while it runs: the lease object changes, twice.
        seen = {etag}
        wait_until(lambda: seen.add(lease_of(store, "leased/")[1]) or len(seen) >= 3, timeout=30)
        before = part_objects(store, "leased/")
        with pytest.raises(errors.LockNotAvailable) as err:
            conn.execute("CALL stream_export_chunked('obj_src', 's3://exports/leased/', 'id')")
        assert "another export" in str(err.value)
        with pytest.raises(errors.LockNotAvailable):
            conn.execute("SELECT * FROM stream_export_to_directory('obj_src', 's3://exports/leased/', 'id', 2, "
                         "overwrite => true)")
        assert part_objects(store, "leased/") == before and thread.is_alive()
        holder.execute("SELECT pg_cancel_backend(%s)", [exporter.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        assert lease_of(store, "leased/") is None  # released
        # What dead exports leave: a part object and an unfinished upload.
        s3 = store.client()
        s3.put_object(Bucket=BUCKET, Key="leased/part-0123456789ab-00000.ndjson", Body=b'{"x":1}\n')
        s3.create_multipart_upload(Bucket=BUCKET, Key="leased/part-0123456789ab-00001.ndjson")
        holder.execute("SELECT pg_advisory_unlock(4300)")
        exporter.execute(call)
        assert chunk_lines(store, "leased/") == expected_lines(conn)
        manifest = json.loads(get(store, "leased/manifest.json"))
        assert part_objects(store, "leased/") == sorted(
            ["leased/manifest.json"] + [f"leased/{p['file']}" for p in manifest["parts"]])
        assert [u for u in open_uploads(store) if u["Key"].startswith("leased/")] == []
    finally:
        stop_sessions_of(holder, "obj_rls")
        holder.close()
        exporter.close()
        drop_gated_copy(conn, "obj_leased")


def test_a_terminated_directory_export_leaves_nothing_for_long(cluster, conn, store):
    """A directory export whose leader is terminated (no destructor runs)
    releases its lease at exit; the part its workers had put is removed by
    the next export to the prefix."""
    make_gated_copy(conn, "obj_dir_gated", "worker_gate")
    holder = cluster.connect()
    exporter = psycopg.connect(cluster.dsn(user="obj_rls"), autocommit=True)
    try:
        holder.execute("SELECT pg_advisory_lock(4300)")
        exporter.execute("SET pg_stream_export.object_part_size = '5MB'")
        thread, result = run_in_thread(lambda: exporter.execute(
            "SELECT * FROM stream_export_to_directory('obj_dir_gated', 's3://exports/terminated/', 'id', 2)"
        ).fetchall())
        wait_at_gate(holder)
        wait_until(lambda: [k for k in part_objects(store, "terminated/") if "/part-" in k])
        holder.execute("SELECT pg_terminate_backend(%s)", [exporter.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), psycopg.OperationalError), result
        holder.execute("SELECT pg_advisory_unlock(4300)")
        wait_until(lambda: lease_of(store, "terminated/") is None)
        wait_until(lambda: not holder.execute(
            "SELECT 1 FROM pg_stat_activity WHERE backend_type = 'pg_stream_export'").fetchone())
        assert [k for k in part_objects(store, "terminated/") if "/part-" in k]  # left behind
        conn.execute("SELECT * FROM stream_export_to_directory('obj_src', 's3://exports/terminated/', 'id', 2)")
        manifest = json.loads(get(store, "terminated/manifest.json"))
        assert part_objects(store, "terminated/") == sorted(
            ["terminated/manifest.json"] + [f"terminated/{p['file']}" for p in manifest["parts"]])
        assert [u for u in open_uploads(store) if u["Key"].startswith("terminated/")] == []
    finally:
        holder.execute("SELECT pg_advisory_unlock_all()")
        stop_sessions_of(holder, "obj_rls")
        holder.close()
        exporter.close()
        drop_gated_copy(conn, "obj_dir_gated")


# --- archival and incremental jobs under a prefix ------------------------------

def object_lines(store: Store, key: str) -> list[str]:
    """The record lines of an export object with a footer."""
    data = get(store, key)
    if key.endswith(".gz"):
        data = gzip.decompress(data)
    elif key.endswith(".zst"):
        data = zstd_decompress(data)
    lines = data.decode().splitlines()
    assert lines[-1].startswith('{"_stream_export":'), key
    return lines[:-1]


def test_archive_and_incremental_jobs_to_a_prefix(conn, store):
    conn.execute("""
        DROP TABLE IF EXISTS obj_arch;
        CREATE TABLE obj_arch AS SELECT * FROM obj_src WHERE id <= 50000;
        ALTER TABLE obj_arch ADD PRIMARY KEY (id)""")
    archived = expected_lines(conn, "(SELECT * FROM obj_arch WHERE id % 2 = 0)")
    conn.execute("CALL stream_export_archive('obj_arch', 's3://exports/archive/', 'id', condition => 'id % 2 = 0', "
                 "chunk_rows => 10000, compression => 'zstd')")
    parts = conn.execute("SELECT target, rows FROM stream_export_archive_part WHERE source = 'obj_arch' "
                         "ORDER BY part").fetchall()
    assert [rows for _, rows in parts] == [10000, 10000, 5000]
    keys = [target.removeprefix(f"s3://{BUCKET}/") for target, _ in parts]
    assert part_objects(store, "archive/") == sorted(keys)
    assert [line for key in keys for line in object_lines(store, key)] == archived
    assert conn.execute("SELECT count(*), bool_and(id % 2 = 1) FROM obj_arch").fetchone() == (25000, True)

    # An incremental job of what is left, then of what comes after.
    conn.execute("SELECT stream_export_job_create('obj-job', 'obj_arch', 'id', 's3://exports/jobs/', "
                 "compression => 'gzip')")
    conn.execute("CALL stream_export_increment('obj-job')")
    conn.execute("INSERT INTO obj_arch SELECT * FROM obj_src WHERE id > 50000 AND id <= 50100")
    conn.execute("CALL stream_export_increment('obj-job')")
    conn.execute("CALL stream_export_increment('obj-job')")  # nothing new: no object
    # The parts, and the binding that says whose job writes here.
    assert part_objects(store, "jobs/") == ["jobs/obj-job-00000001.ndjson.gz", "jobs/obj-job-00000002.ndjson.gz",
                                            "jobs/obj-job.job.json"]
    assert (object_lines(store, "jobs/obj-job-00000001.ndjson.gz")
            + object_lines(store, "jobs/obj-job-00000002.ndjson.gz")) == expected_lines(conn, "obj_arch")
    assert conn.execute("SELECT array_agg(rows ORDER BY part) FROM stream_export_job_part WHERE job = 'obj-job'"
                        ).fetchone() == ([25000, 100],)
    assert open_uploads(store) == []


class DamagingProxy:
    """A store in front of a real one that hands every request on and its
    answer back, but flips one byte in the body of each GET of an archive
    chunk: what a store with a bad disk, or a broken network path, gives."""

    def __init__(self, upstream: str):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
        import http.client
        import urllib.parse
        host = urllib.parse.urlsplit(upstream)
        damaged = self.damaged = []

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _pass(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                up = http.client.HTTPConnection(host.hostname, host.port, timeout=60)
                up.request(self.command, self.path, body=body,
                           headers={k: v for k, v in self.headers.items() if k.lower() != "connection"})
                answer = up.getresponse()
                data = answer.read()
                if self.command == "GET" and "/archive-" in self.path and answer.status == 200 and data:
                    data = bytearray(data)
                    data[len(data) // 2] ^= 0x20
                    data = bytes(data)
                    damaged.append(self.path)
                self.send_response(answer.status)
                for k, v in answer.getheaders():
                    if k.lower() not in ("content-length", "connection", "transfer-encoding"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                up.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join()


@moto_only  # a proxy of its own in front of the store
def test_an_archive_chunk_that_reads_back_damaged_deletes_nothing(cluster, conn, store, aws_dir):
    proxy = DamagingProxy(store.endpoint)
    add_profile(aws_dir, "damaging", endpoint=proxy.endpoint, key_id="testing", secret=SECRET)
    try:
        conn.execute("""
            DROP TABLE IF EXISTS obj_arch_bad;
            CREATE TABLE obj_arch_bad AS SELECT * FROM obj_src WHERE id <= 20000;
            ALTER TABLE obj_arch_bad ADD PRIMARY KEY (id)""")
        conn.execute("SET pg_stream_export.object_store_profile = 'damaging'")
        for compression in ["none", "gzip"]:
            with pytest.raises(errors.IoError) as failure:
                conn.execute("CALL stream_export_archive('obj_arch_bad', 's3://exports/damaged/', 'id', "
                             "chunk_rows => 5000, compression => %s)", [compression])
            message = failure.value.diag.message_primary
            assert message.startswith("archive chunk 0 (") and "did not verify" in message, message
            assert "none of its rows were deleted" in message
        assert len(proxy.damaged) == 2
        assert conn.execute("SELECT count(*) FROM obj_arch_bad").fetchone() == (20000,)
        assert conn.execute("SELECT count(*) FROM stream_export_archive_part WHERE source = 'obj_arch_bad'"
                            ).fetchone() == (0,)
    finally:
        conn.execute("RESET pg_stream_export.object_store_profile")
        proxy.close()
