"""Cluster exports: one table sharded over two data nodes, exported by a
coordinator into one S3 prefix (SeaweedFS, which checks signatures). Three
throwaway clusters on loopback, started and always stopped here: the
coordinator (with PL/Proxy where it is packaged) and nodes "a" and "b"
(pg_stream_export.node_id). The nodes are reached as a plain role, so a
row security policy can stop a node's export workers at a gate.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
from pathlib import Path

import duckdb
import psycopg
import pytest
from psycopg import errors

from conftest import PG_BIN, _sharedir, crashes_in, start_cluster, stop_cluster
from helpers import oracle_lines, run_in_thread, sqlstate_of, wait_for_server, wait_until
from stores import free_port, start_store

BUCKET = "cluster"
SECRET = "s3cr3t-" + secrets.token_hex(12)
HAS_PLPROXY = (_sharedir() / "extension" / "plproxy.control").exists()
ROWS_PER_NODE = 20_000
NODE_ROLE = "shard_reader"
NODE_PASSWORD = "pw-" + secrets.token_hex(8)

# Every built-in type family the encoder treats apart, with awkward values.
SHARD_TABLE = """
CREATE TABLE events (
    id bigint PRIMARY KEY,
    t text, n numeric, f float8, rl real, b boolean, ts timestamptz, tsn timestamp,
    d date, iv interval, j jsonb, arr int[], by bytea, u uuid, ip inet, m money
);
INSERT INTO events
SELECT g, CASE WHEN g % 5 = 0 THEN NULL ELSE 'é "q" \\ ' || chr(9) || md5(g::text) || ' ☃' END,
       g * 1.000001, g / 7.0, (g / 3.0)::real, g % 2 = 0,
       timestamptz '2001-02-03 04:05:06.789+00' + g * interval '37 minutes',
       timestamp '1999-12-31 23:59:59' + g * interval '1 second',
       date '2020-02-29' + (g % 1000), g * interval '1 day 3 hours 4.5 seconds',
       jsonb_build_object('g', g, 'nested', jsonb_build_array(g, 'x', NULL)),
       ARRAY[g, -g, NULL], decode(md5(g::text), 'hex'), md5(g::text)::uuid,
       ('10.0.' || (g % 250) || '.1')::inet, (g % 1000)::money
FROM generate_series(FIRST, LAST, 2) g;
ANALYZE events;
"""

# Stops a node's export workers (not its leader, which samples the key)
# at the row `gate_id` while the test holds advisory lock 4400.
GATE = """
CREATE FUNCTION worker_gate(id bigint) RETURNS boolean LANGUAGE plpgsql VOLATILE AS $$
BEGIN
  IF id = GATE_ID AND (SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid())
                 = 'pg_stream_export' THEN
    PERFORM pg_advisory_xact_lock_shared(4400);
  END IF;
  RETURN true;
END $$;
ALTER TABLE events ENABLE ROW LEVEL SECURITY;
CREATE POLICY gate ON events USING (worker_gate(id));
"""


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
def store(aws_dir):
    s = start_store("seaweedfs", aws_dir, "main", "testing", SECRET)
    try:
        s.client().create_bucket(Bucket=BUCKET)
        yield s
    finally:
        s.stop()


def environment(store) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": SECRET,
        "AWS_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": store.endpoint,
        "AWS_ALLOW_HTTP": "true",
    }


@pytest.fixture(scope="module")
def shards(store, aws_dir):
    """Nodes a (even ids) and b (odd ids), which want a password from the
    role the coordinator connects as, and the coordinator, which has those
    passwords only in its OS user's password file (PGPASSFILE). Every
    statement is logged, to check that no secret is."""
    servers = {}
    logged = {"log_statement": "all", "log_min_messages": "debug1"}
    try:
        for node, first in (("a", 2), ("b", 1)):
            srv = start_cluster("pg_stream_export", environment=environment(store),
                                settings={"pg_stream_export.node_id": node, **logged})
            servers[node] = srv
            with srv.connect() as c:
                c.execute(SHARD_TABLE.replace("FIRST", str(first)).replace("LAST", str(2 * ROWS_PER_NODE)))
                c.execute(GATE.replace("GATE_ID", str(first + 2 * (ROWS_PER_NODE // 2))))
                c.execute("SET log_statement = 'none'")
                c.execute(f"CREATE ROLE {NODE_ROLE} LOGIN PASSWORD '{NODE_PASSWORD}'"
                          " IN ROLE stream_export_object_store_write")
                c.execute(f"GRANT SELECT ON events TO {NODE_ROLE}")
            hba = srv.data / "pg_hba.conf"
            hba.write_text(f"host all {NODE_ROLE} 127.0.0.1/32 scram-sha-256\n" + hba.read_text())
            with srv.connect() as c:
                c.execute("SELECT pg_reload_conf()")
        passfile = aws_dir / "pgpass"
        passfile.write_text("".join(f"127.0.0.1:{servers[n].port}:e2e:{NODE_ROLE}:{NODE_PASSWORD}\n"
                                    for n in ("a", "b")))
        shutil.chown(passfile, "postgres", "postgres")
        passfile.chmod(0o600)
        servers["coordinator"] = start_cluster(
            "pg_stream_export", environment={**environment(store), "PGPASSFILE": str(passfile)}, settings=logged)
        yield servers
    finally:
        crashed = []
        for name, srv in servers.items():
            log = stop_cluster(srv)
            crashed += crashes_in(log)
            assert NODE_PASSWORD not in log and SECRET not in log, f"a secret is in the log of {name}"
        assert not crashed, "\n".join(crashed)


def dsn(srv) -> str:
    return srv.dsn(user=NODE_ROLE)


@pytest.fixture
def coordinator(shards):
    with shards["coordinator"].connect() as c:
        yield c


def objects(store, prefix: str) -> list[str]:
    listing = store.client().list_objects_v2(Bucket=BUCKET, Prefix=prefix)
    return sorted(o["Key"] for o in listing.get("Contents", []))


def node_finished(store, prefix: str, node: str) -> bool:
    """Has a run's export of `node` finished (its manifest in the node
    directory of that run, `node-<id>/<export id>/`)?"""
    return any(re.fullmatch(rf"{re.escape(prefix)}node-{node}/[0-9a-f]{{12}}/manifest\.json", k)
               for k in objects(store, f"{prefix}node-{node}/"))


def get(store, key: str) -> bytes:
    return store.client().get_object(Bucket=BUCKET, Key=key)["Body"].read()


def open_uploads(store) -> list:
    return store.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])


def export(conn, prefix: str, shards, **options):
    args = "".join(f", {k} => %({k})s" for k in options)
    return conn.execute(
        f"SELECT node, reused, partitions, rows FROM stream_export_cluster('events', 's3://{BUCKET}/{prefix}',"
        f" 'id', nodes => %(nodes)s{args}) ORDER BY node",
        {"nodes": [dsn(shards["a"]), dsn(shards["b"])], **options}).fetchall()


def record_lines(data: bytes) -> list[str]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    lines = data.decode().splitlines()
    assert lines[-1].startswith('{"_stream_export":')
    return lines[:-1]


def exported_lines(store, prefix: str) -> dict[str, list[str]]:
    """Each node's record lines, read through the manifest of manifests."""
    manifest = json.loads(get(store, f"{prefix}manifest.json"))
    lines: dict[str, list[str]] = {}
    for part in manifest["parts"]:
        lines.setdefault(part["node"], []).extend(record_lines(get(store, prefix + part["file"])))
    return lines


def no_leftovers(store, prefix: str) -> None:
    """Every part object under the prefix is listed by a node manifest, and
    no upload is open."""
    listed = set()
    for key in objects(store, prefix):
        if key.endswith("/manifest.json"):
            directory = key[: -len("manifest.json")]
            listed |= {directory + p["file"] for p in json.loads(get(store, key))["parts"]}
    parts = {k for k in objects(store, prefix) if "/part-" in k}
    assert parts <= listed, parts - listed
    assert open_uploads(store) == []


SETTINGS = "SET TimeZone = 'Asia/Kathmandu'; SET IntervalStyle = 'iso_8601'; SET extra_float_digits = 0; SET bytea_output = 'escape'"


def oracle(shards, node: str) -> list[str]:
    with shards[node].connect() as c:
        c.execute(SETTINGS)
        return oracle_lines(c, "SELECT * FROM events ORDER BY id")


def test_every_line_of_every_node_under_the_callers_settings(coordinator, shards, store):
    coordinator.execute(SETTINGS)
    rows = export(coordinator, "full/", shards, partitions_per_node=2, compression="gzip")
    assert rows == [("a", False, 2, ROWS_PER_NODE), ("b", False, 2, ROWS_PER_NODE)]
    manifest = json.loads(get(store, "full/manifest.json"))
    assert manifest["consistency"] == "per_node"
    assert manifest["totals"]["rows"] == 2 * ROWS_PER_NODE and manifest["totals"]["nodes"] == 2
    for node in manifest["nodes"]:
        # Each run writes into node directories of its own.
        assert node["directory"] == f"node-{node['node']}/{manifest['export_id']}/"
        assert node["snapshot"] and node["manifest_crc32"]
        assert node["export_id"] == manifest["export_id"]
    lines = exported_lines(store, "full/")
    for node in ("a", "b"):
        assert sorted(lines[node], key=lambda l: json.loads(l)["id"]) == oracle(shards, node)
    assert coordinator.execute(
        f"SELECT ok, parts, rows FROM stream_export_verify_manifest('s3://{BUCKET}/full/')").fetchone() \
        == (True, 4, 2 * ROWS_PER_NODE)
    # Finished: the same call again is refused, overwrite replaces it.
    assert sqlstate_of(coordinator, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                       [f"s3://{BUCKET}/full/", [dsn(shards["a"])]]) == "58P02"
    no_leftovers(store, "full/")


def test_nodes_want_the_password_the_coordinator_has_in_its_password_file(shards):
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(dsn(shards["a"]), autocommit=True, passfile="/dev/null")


def test_duckdb_reads_the_parts_the_manifest_lists(coordinator, shards, store, tmp_path):
    export(coordinator, "duck/", shards, compression="zstd")
    manifest = json.loads(get(store, "duck/manifest.json"))
    files = []
    for part in manifest["parts"]:
        local = tmp_path / part["file"].replace("/", "_")
        local.write_bytes(get(store, "duck/" + part["file"]))
        files.append(str(local))
    db = duckdb.connect()
    count, ids, total = db.execute(
        "SELECT count(*), count(DISTINCT id), sum(id) FROM read_json(?, format = 'newline_delimited')"
        " WHERE id IS NOT NULL", [files]).fetchone()
    n = 2 * ROWS_PER_NODE
    assert (count, ids, total) == (n, n, n * (n + 1) // 2)


def test_verify_finds_a_damaged_part_and_a_replaced_node_manifest(coordinator, shards, store):
    export(coordinator, "damage/", shards)
    manifest = json.loads(get(store, "damage/manifest.json"))
    part = next(p for p in manifest["parts"] if p["node"] == "b")
    good = get(store, "damage/" + part["file"])
    bad = bytearray(good)
    bad[100] ^= 0x01
    client = store.client()
    client.put_object(Bucket=BUCKET, Key="damage/" + part["file"], Body=bytes(bad))
    ok, _, _, detail = coordinator.execute(
        f"SELECT * FROM stream_export_verify_manifest('s3://{BUCKET}/damage/')").fetchone()
    assert not ok and detail.startswith("node b:"), detail
    client.put_object(Bucket=BUCKET, Key="damage/" + part["file"], Body=good)
    node_a = "damage/" + next(n for n in manifest["nodes"] if n["node"] == "a")["manifest"]
    node_manifest = get(store, node_a)
    client.put_object(Bucket=BUCKET, Key=node_a, Body=node_manifest + b" ")
    ok, _, _, detail = coordinator.execute(
        f"SELECT * FROM stream_export_verify_manifest('s3://{BUCKET}/damage/')").fetchone()
    assert not ok and "node a:" in detail and "manifest" in detail, detail
    # Without the top-level manifest, the same call resumes: node a's
    # export still verifies on its own and is reused (and recorded as it
    # is now); node b's damaged part makes node b export again.
    client.put_object(Bucket=BUCKET, Key="damage/" + part["file"], Body=bytes(bad))
    client.delete_object(Bucket=BUCKET, Key="damage/manifest.json")
    rows = export(coordinator, "damage/", shards)
    assert [(r[0], r[1]) for r in rows] == [("a", True), ("b", False)]
    assert coordinator.execute(
        f"SELECT ok FROM stream_export_verify_manifest('s3://{BUCKET}/damage/')").fetchone() == (True,)
    no_leftovers(store, "damage/")


def test_an_unreachable_node_fails_before_anything_is_written(coordinator, shards, store):
    closed = f"host=127.0.0.1 port={free_port()} dbname=e2e user={NODE_ROLE}"
    with pytest.raises(errors.SqlclientUnableToEstablishSqlconnection) as failure:
        coordinator.execute("SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                            [f"s3://{BUCKET}/unreachable/", [dsn(shards["a"]), closed]])
    assert "node #2 of 2" in str(failure.value)
    assert [k for k in objects(store, "unreachable/") if "part-" in k or k.endswith("manifest.json")] == []


def test_a_node_error_names_the_node_and_leaves_no_top_manifest(coordinator, shards, store):
    with pytest.raises(errors.UndefinedTable) as failure:
        coordinator.execute("SELECT * FROM stream_export_cluster('no_such_table', %s, 'id', nodes => %s)",
                            [f"s3://{BUCKET}/missing/", [dsn(shards["a"]), dsn(shards["b"])]])
    assert str(failure.value).startswith("node ")
    assert "missing/manifest.json" not in objects(store, "missing/")
    no_leftovers(store, "missing/")


class Gate:
    """Advisory lock 4400 on a node, which stops its export workers."""

    def __init__(self, srv):
        self.conn = srv.connect()
        self.conn.execute("SELECT pg_advisory_lock(4400)")

    def wait_for_exporter(self):
        wait_until(lambda: self.conn.execute(
            "SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND objid = 4400 AND NOT granted").fetchone())

    def release(self):
        self.conn.execute("SELECT pg_advisory_unlock_all()")
        self.conn.close()


def node_exporting(srv) -> bool:
    """Is a node export (its leader, a client backend) still running?"""
    with srv.connect() as c:
        return bool(c.execute(
            "SELECT 1 FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'"
            " AND state = 'active'", [NODE_ROLE]).fetchone())


@pytest.mark.parametrize("how", ["cancel", "statement_timeout"])
def test_cancel_on_the_coordinator_stops_every_node(shards, store, how):
    """An export that replaces a finished one is stopped after one node
    finished its part: the export it was replacing is still whole (its
    manifest of manifests, node manifests and parts, verified, the same
    lines), and nothing of the stopped run is left but node exports that
    finished (for a resume). Before, the old manifest of manifests went
    first and the nodes replaced their exports in place, so a stopped
    overwrite left no export at all."""
    prefix = f"cancel-{how}/"
    with shards["coordinator"].connect() as c:
        export(c, prefix, shards)
    old_manifest = get(store, f"{prefix}manifest.json")
    old_lines = exported_lines(store, prefix)
    gate = Gate(shards["b"])
    coordinator = shards["coordinator"].connect()
    try:
        if how == "statement_timeout":
            coordinator.execute("SET statement_timeout = '3s'")
        thread, result = run_in_thread(lambda: export(coordinator, prefix, shards, partitions_per_node=2,
                                                      overwrite=True))
        gate.wait_for_exporter()
        if how == "cancel":
            wait_until(lambda: len([k for k in objects(store, prefix + "node-a/")
                                    if k.endswith("/manifest.json")]) == 2)
            with shards["coordinator"].connect() as c:
                c.execute("SELECT pg_cancel_backend(%s)", [coordinator.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled), result
        # The nodes' exports ended before the coordinator returned (their
        # workers are stopped by then, and exit on their own).
        assert not node_exporting(shards["b"]) and not node_exporting(shards["a"])
        wait_until(lambda: not shards["b"].connect().execute(
            "SELECT 1 FROM pg_stat_activity WHERE usename = %s", [NODE_ROLE]).fetchone())
        assert get(store, f"{prefix}manifest.json") == old_manifest
        assert exported_lines(store, prefix) == old_lines
        with shards["coordinator"].connect() as c:
            assert c.execute("SELECT ok FROM stream_export_verify_manifest(%s)",
                             [f"s3://{BUCKET}/{prefix}"]).fetchone() == (True,)
        assert [k for k in objects(store, prefix) if k.endswith("lease.json")] == []
        no_leftovers(store, prefix)
    finally:
        gate.release()
        coordinator.close()
    # The next overwrite replaces it, and removes everything of the old
    # export and of the stopped run.
    with shards["coordinator"].connect() as c:
        export(c, prefix, shards, overwrite=True)
    manifest = json.loads(get(store, f"{prefix}manifest.json"))
    kept = {n["directory"] for n in manifest["nodes"]}
    assert {k[len(prefix):].rsplit("/", 1)[0] + "/" for k in objects(store, prefix + "node-")} == kept
    no_leftovers(store, prefix)


def test_a_node_killed_mid_export_then_resume_exports_only_that_node(shards, store):
    prefix = "killed/"
    gate = Gate(shards["b"])
    coordinator = shards["coordinator"].connect()
    try:
        thread, result = run_in_thread(lambda: export(coordinator, prefix, shards, partitions_per_node=2,
                                                      compression="gzip"))
        gate.wait_for_exporter()
        # Node a finishes; node b's leader is killed while its workers wait.
        wait_until(lambda: node_finished(store, prefix, "a"))
        wait_until(lambda: [k for k in objects(store, prefix + "node-b/") if "part-" in k]
                   or open_uploads(store))
        leader = gate.conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE usename = %s AND backend_type = 'client backend'"
            " AND query LIKE '%%stream_export_cluster_node%%'", [NODE_ROLE]).fetchone()[0]
        os.kill(leader, signal.SIGKILL)
        thread.join()
        error = result.get("error")
        assert isinstance(error, psycopg.Error) and error.sqlstate.startswith(("08", "57P")), result
        assert "node b" in str(error) or '"b"' in str(error), error
    finally:
        try:
            gate.release()
        except psycopg.Error:
            pass
        coordinator.close()
    wait_for_server(shards["b"])
    assert f"{prefix}manifest.json" not in objects(store, prefix)
    assert [k for k in objects(store, prefix + "node-b/") if "part-" in k or "lease" in k] == []
    assert open_uploads(store) == []
    with shards["coordinator"].connect() as c:
        rows = export(c, prefix, shards, partitions_per_node=2, compression="gzip")
        assert [(r[0], r[1], r[3]) for r in rows] == [("a", True, ROWS_PER_NODE), ("b", False, ROWS_PER_NODE)]
        assert c.execute(f"SELECT ok FROM stream_export_verify_manifest('s3://{BUCKET}/{prefix}')").fetchone() \
            == (True,)
    lines = exported_lines(store, prefix)
    for node in ("a", "b"):
        with shards[node].connect() as c:
            assert sorted(lines[node], key=lambda l: json.loads(l)["id"]) == \
                oracle_lines(c, "SELECT * FROM events ORDER BY id")
    no_leftovers(store, prefix)


def test_a_coordinator_killed_mid_export_leaves_nodes_that_finish_and_are_reused(shards, store):
    """kill -9 of the coordinator's backend: nothing cancels the nodes, which
    finish their exports; no top-level manifest is written; once the dead
    coordinator's lease on the prefix expires, the same call reuses both
    nodes' exports."""
    prefix = "coordinator-killed/"
    gate = Gate(shards["b"])
    coordinator = shards["coordinator"].connect()
    coordinator.execute("SET pg_stream_export.object_lease_ttl = '2s'")
    try:
        thread, result = run_in_thread(lambda: export(coordinator, prefix, shards, compression="gzip"))
        gate.wait_for_exporter()
        os.kill(coordinator.info.backend_pid, signal.SIGKILL)
        thread.join()
        assert isinstance(result.get("error"), psycopg.OperationalError), result
    finally:
        gate.release()
        coordinator.close()
    wait_until(lambda: node_finished(store, prefix, "b"))
    wait_until(lambda: not node_exporting(shards["b"]))
    assert f"{prefix}manifest.json" not in objects(store, prefix)
    wait_for_server(shards["coordinator"])

    def resumed():
        with shards["coordinator"].connect() as c:
            try:
                return export(c, prefix, shards, compression="gzip")
            except errors.LockNotAvailable:
                return None  # the dead coordinator's lease, until it expires
    rows = wait_until(resumed, timeout=60, interval=0.5)
    assert [(r[0], r[1], r[3]) for r in rows] == [("a", True, ROWS_PER_NODE), ("b", True, ROWS_PER_NODE)]
    with shards["coordinator"].connect() as c:
        assert c.execute(f"SELECT ok FROM stream_export_verify_manifest('s3://{BUCKET}/{prefix}')").fetchone() \
            == (True,)
    no_leftovers(store, prefix)


def test_argument_and_privilege_errors(coordinator, shards):
    a, b = dsn(shards["a"]), dsn(shards["b"])
    cases = [
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id')", None, "22023"),
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id', nodes => %s, cluster => 'x')",
         [[a]], "22023"),
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id', nodes => %s)", [[a, a + " "]],
         "42710"),
        ("SELECT * FROM stream_export_cluster('events', '/tmp', 'id', nodes => %s)", [[a]], "0A000"),
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id', cluster => 'nope')", None,
         "42704"),
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id', nodes => %s,"
         " partitions_per_node => 0)", [[a]], "22023"),
        ("SELECT * FROM stream_export_cluster(NULL, 's3://cluster/e/', 'id', nodes => %s)", [[b]], "22004"),
        # The coordinator's own database has no node id.
        ("SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id', nodes => %s)",
         [[shards["coordinator"].dsn()]], "55000"),
    ]
    for sql, params, expected in cases:
        assert sqlstate_of(coordinator, sql, params) == expected, sql
    coordinator.execute("CREATE ROLE cluster_plain LOGIN")
    try:
        with psycopg.connect(shards["coordinator"].dsn(user="cluster_plain"), autocommit=True) as plain:
            assert sqlstate_of(plain, "SELECT * FROM stream_export_cluster('events', 's3://cluster/e/', 'id',"
                                      " nodes => %s)", [[a]]) == "42501"
    finally:
        coordinator.execute("DROP ROLE cluster_plain")


@pytest.mark.skipif(not HAS_PLPROXY, reason="PL/Proxy is packaged for PostgreSQL 15 only")
def test_a_plproxy_cluster(coordinator, shards, store):
    coordinator.execute("CREATE EXTENSION IF NOT EXISTS plproxy")
    coordinator.execute(
        "CREATE SERVER shards FOREIGN DATA WRAPPER plproxy OPTIONS (p0 %s, p1 %s)"
        % tuple("'" + f"host=127.0.0.1 port={shards[n].port} dbname=e2e" + "'" for n in ("a", "b")))
    coordinator.execute(f"CREATE USER MAPPING FOR PUBLIC SERVER shards OPTIONS (user '{NODE_ROLE}')")
    try:
        # The same cluster serves PL/Proxy's own RUN ON ALL functions.
        coordinator.execute("""
            CREATE FUNCTION shard_rows() RETURNS SETOF bigint LANGUAGE plproxy AS $$
                CLUSTER 'shards'; RUN ON ALL; SELECT count(*) FROM events; $$""")
        assert sorted(r[0] for r in coordinator.execute("SELECT shard_rows()")) == [ROWS_PER_NODE] * 2
        rows = coordinator.execute(
            f"SELECT node, rows FROM stream_export_cluster('events', 's3://{BUCKET}/plproxy/', 'id',"
            " cluster => 'shards') ORDER BY node").fetchall()
        assert rows == [("a", ROWS_PER_NODE), ("b", ROWS_PER_NODE)]
        lines = exported_lines(store, "plproxy/")
        for node in ("a", "b"):
            with shards[node].connect() as c:
                assert sorted(lines[node], key=lambda l: json.loads(l)["id"]) == \
                    oracle_lines(c, "SELECT * FROM events ORDER BY id")
    finally:
        coordinator.execute("DROP FUNCTION IF EXISTS shard_rows()")
        coordinator.execute("DROP SERVER shards CASCADE")


# A cluster export for a role that is not a superuser (issue 38): its nodes
# are foreign servers it may use, reached with its own user mapping's
# password, never with the coordinator's files or as the server's
# superuser.

GRANTEE = "cluster_grantee"


@pytest.fixture
def grantee(shards):
    """A plain role with EXECUTE on stream_export_cluster and the object
    store, USAGE on foreign servers node_a and node_b (of the extension's
    stream_export_nodes wrapper), and user mappings with the nodes'
    password (made with statement logging off: no secret in any log)."""
    coordinator = shards["coordinator"]
    with coordinator.connect() as c:
        c.execute("SET log_statement = 'none'")
        c.execute(f"CREATE ROLE {GRANTEE} LOGIN IN ROLE stream_export_object_store_write")
        c.execute(f"GRANT EXECUTE ON FUNCTION stream_export_cluster(text, text, text, text[], text, integer,"
                  f" text, integer, boolean, text) TO {GRANTEE}")
        for node in ("a", "b"):
            c.execute(f"CREATE SERVER node_{node} FOREIGN DATA WRAPPER stream_export_nodes"
                      f" OPTIONS (host '127.0.0.1', port '{shards[node].port}', dbname 'e2e')")
            c.execute(f"GRANT USAGE ON FOREIGN SERVER node_{node} TO {GRANTEE}")
            c.execute(f"CREATE USER MAPPING FOR {GRANTEE} SERVER node_{node}"
                      f" OPTIONS (user '{NODE_ROLE}', password '{NODE_PASSWORD}')")
    try:
        with psycopg.connect(coordinator.dsn(user=GRANTEE), autocommit=True) as conn:
            yield conn
    finally:
        with coordinator.connect() as c:
            c.execute("SET log_statement = 'none'")
            for name in c.execute("SELECT srvname FROM pg_foreign_server s JOIN pg_foreign_data_wrapper w"
                                  " ON w.oid = s.srvfdw WHERE w.fdwname = 'stream_export_nodes'").fetchall():
                c.execute(f"DROP SERVER {name[0]} CASCADE")
            c.execute(f"DROP OWNED BY {GRANTEE}")
            c.execute(f"DROP ROLE {GRANTEE}")


def grantee_export(conn, prefix: str, nodes=("node_a", "node_b"), **options):
    args = "".join(f", {k} => %({k})s" for k in options)
    return conn.execute(
        f"SELECT node, reused, partitions, rows FROM stream_export_cluster('events', 's3://{BUCKET}/{prefix}',"
        f" 'id', nodes => %(nodes)s{args}) ORDER BY node", {"nodes": list(nodes), **options}).fetchall()


def test_a_grantee_exports_through_foreign_servers_with_its_own_password(grantee, shards, store):
    rows = grantee_export(grantee, "grantee/", partitions_per_node=2)
    assert rows == [("a", False, 2, ROWS_PER_NODE), ("b", False, 2, ROWS_PER_NODE)]
    lines = exported_lines(store, "grantee/")
    for node in ("a", "b"):
        with shards[node].connect() as c:
            assert sorted(lines[node], key=lambda l: json.loads(l)["id"]) == \
                oracle_lines(c, "SELECT * FROM events ORDER BY id")
    no_leftovers(store, "grantee/")


def test_a_grantee_cannot_reach_a_node_as_the_servers_superuser(grantee, shards, store):
    coordinator = shards["coordinator"]
    socket_dir = coordinator.directory
    # A connection string, to the coordinator's own socket as postgres.
    assert sqlstate_of(grantee, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                       [f"s3://{BUCKET}/escalate/", [f"host={socket_dir} port={coordinator.port} dbname=e2e"
                                                     " user=postgres"]]) == "42501"
    with coordinator.connect() as c:
        c.execute("SET log_statement = 'none'")
        # A server of its own with a user mapping as postgres: the node
        # (trust) does not ask for the password, which the grantee must use.
        c.execute("CREATE SERVER self FOREIGN DATA WRAPPER stream_export_nodes"
                  f" OPTIONS (host '127.0.0.1', port '{coordinator.port}', dbname 'e2e')")
        c.execute(f"GRANT USAGE ON FOREIGN SERVER self TO {GRANTEE}")
        c.execute(f"CREATE USER MAPPING FOR {GRANTEE} SERVER self OPTIONS (user 'postgres', password 'guess')")
        # The server's files are not the grantee's: a passfile or service
        # in the server's options is refused; so is a mapping without a
        # password, and a server the grantee may not use.
        c.execute("CREATE SERVER filed FOREIGN DATA WRAPPER stream_export_nodes"
                  f" OPTIONS (host '127.0.0.1', port '{shards['a'].port}', dbname 'e2e', passfile '/tmp/x')")
        c.execute(f"GRANT USAGE ON FOREIGN SERVER filed TO {GRANTEE}")
        c.execute(f"CREATE USER MAPPING FOR {GRANTEE} SERVER filed OPTIONS (user '{NODE_ROLE}', password 'x')")
        c.execute("CREATE SERVER nopass FOREIGN DATA WRAPPER stream_export_nodes"
                  f" OPTIONS (host '127.0.0.1', port '{shards['a'].port}', dbname 'e2e')")
        c.execute(f"GRANT USAGE ON FOREIGN SERVER nopass TO {GRANTEE}")
        c.execute(f"CREATE USER MAPPING FOR {GRANTEE} SERVER nopass OPTIONS (user '{NODE_ROLE}')")
        c.execute("CREATE SERVER unusable FOREIGN DATA WRAPPER stream_export_nodes"
                  f" OPTIONS (host '127.0.0.1', port '{shards['a'].port}', dbname 'e2e')")
    for nodes, expected in ((["self"], "2F003"), (["filed"], "42501"), (["nopass"], "2F003"),
                            (["unusable"], "42501"), (["no_such_server"], "42704")):
        assert sqlstate_of(grantee, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                           [f"s3://{BUCKET}/escalate/", nodes]) == expected, nodes
    assert [k for k in objects(store, "escalate/") if "part-" in k] == []
    # A superuser keeps connection strings (and reaches the coordinator's
    # own database only to be told it is the coordinator).
    with coordinator.connect() as c:
        assert sqlstate_of(c, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                           [f"s3://{BUCKET}/escalate/", [f"host={socket_dir} port={coordinator.port} dbname=e2e"
                                                         " user=postgres"]]) == "55000"


class FakeServer:
    """A listener that answers like PostgreSQL asking for a clear-text
    password, and keeps every byte it is sent."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(8)
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]
        self.received = bytearray()
        self.connections = 0
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except socket.timeout:
                continue
            self.connections += 1
            conn.settimeout(2)
            try:
                while True:
                    head = conn.recv(8)
                    self.received += head
                    if len(head) < 8:
                        break
                    length, code = struct.unpack("!ii", head)
                    if code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
                        conn.sendall(b"N")
                        continue
                    self.received += conn.recv(max(length - 8, 0))
                    conn.sendall(b"R" + struct.pack("!ii", 8, 3))  # AuthenticationCleartextPassword
                    while chunk := conn.recv(4096):
                        self.received += chunk
                    break
            except OSError:
                pass
            finally:
                conn.close()

    def close(self):
        self.stopped.set()
        self.thread.join()
        self.sock.close()


def test_a_grantee_cannot_send_the_servers_password_file_to_a_listener_of_its_own(grantee, shards, aws_dir):
    """The coordinator's password file has a password for
    shard-a.internal; the grantee points that name at its own listener."""
    stolen = "pf-" + secrets.token_hex(8)
    passfile = aws_dir / "pgpass"
    original = passfile.read_text()
    passfile.write_text(original + f"shard-a.internal:*:*:*:{stolen}\n")
    fake = FakeServer()
    try:
        sneaky = f"host=shard-a.internal hostaddr=127.0.0.1 port={fake.port} dbname=e2e user={NODE_ROLE}"
        assert sqlstate_of(grantee, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                           [f"s3://{BUCKET}/exfil/", [sneaky]]) == "42501"
        with shards["coordinator"].connect() as c:
            c.execute("SET log_statement = 'none'")
            c.execute("CREATE SERVER sneaky FOREIGN DATA WRAPPER stream_export_nodes"
                      f" OPTIONS (host 'shard-a.internal', hostaddr '127.0.0.1', port '{fake.port}', dbname 'e2e')")
            c.execute(f"GRANT USAGE ON FOREIGN SERVER sneaky TO {GRANTEE}")
            c.execute(f"CREATE USER MAPPING FOR {GRANTEE} SERVER sneaky OPTIONS (user 'x', password 'mine')")
        assert sqlstate_of(grantee, "SELECT * FROM stream_export_cluster('events', %s, 'id', nodes => %s)",
                           [f"s3://{BUCKET}/exfil/", ["sneaky"]]) == "42501"
    finally:
        fake.close()
        passfile.write_text(original)
    assert stolen.encode() not in bytes(fake.received)
    assert fake.connections == 0


def test_the_coordinator_as_its_own_node_is_refused_at_once_under_its_own_lock(shards):
    """Listed as a node inside a transaction that locks the source, the
    coordinator's own database would wait on that lock until a timeout."""
    coordinator = shards["coordinator"]
    with coordinator.connect() as c:
        c.execute("CREATE TABLE IF NOT EXISTS own_rows AS SELECT g AS id FROM generate_series(1, 100) g")
        c.execute("ALTER DATABASE e2e SET pg_stream_export.node_id = 'coordinator'")
    try:
        with coordinator.connect(autocommit=False) as c:
            c.execute("SET statement_timeout = '20s'")
            c.execute("LOCK TABLE own_rows")
            started = time.monotonic()
            assert sqlstate_of(c, "SELECT * FROM stream_export_cluster('own_rows', %s, 'id', nodes => %s)",
                               [f"s3://{BUCKET}/own/", [coordinator.dsn()]]) == "55000"
            assert time.monotonic() - started < 10
            c.rollback()
    finally:
        with coordinator.connect() as c:
            c.execute("ALTER DATABASE e2e RESET pg_stream_export.node_id")
            c.execute("DROP TABLE IF EXISTS own_rows")


def node_function(conn, directory: str, export_id: str, **options):
    args = "".join(f", {k} => %({k})s" for k in options)
    return conn.execute(
        "SELECT * FROM stream_export_cluster_node('hand_rows', %(d)s, 'id', 1, 'none', NULL, 'default',"
        f" %(id)s{args})", {"d": directory, "id": export_id, **options}).fetchall()


@pytest.fixture
def writer(shards, server_dir):
    """A member of pg_write_server_files (and of the object store roles)
    on the coordinator, with a table of its own and a finished directory
    export of it."""
    coordinator = shards["coordinator"]
    with coordinator.connect() as c:
        c.execute("CREATE ROLE hand_writer LOGIN IN ROLE pg_write_server_files, pg_read_server_files,"
                  " stream_export_object_store_write, stream_export_object_store_read")
        c.execute("CREATE TABLE hand_rows AS SELECT g AS id, md5(g::text) AS t FROM generate_series(1, 3000) g")
        c.execute("ALTER TABLE hand_rows ADD PRIMARY KEY (id)")
        c.execute("GRANT SELECT ON hand_rows TO hand_writer")
    try:
        with psycopg.connect(coordinator.dsn(user="hand_writer"), autocommit=True) as conn:
            conn.execute("SELECT * FROM stream_export_to_directory('hand_rows', %s, 'id', 2)",
                         [str(server_dir) + "/"])
            yield conn
    finally:
        with coordinator.connect() as c:
            c.execute("DROP TABLE hand_rows")
            c.execute("DROP OWNED BY hand_writer")
            c.execute("DROP ROLE hand_writer")


def test_the_node_function_by_hand_follows_every_rule_of_a_directory_export(writer, shards, store,
                                                                               server_dir):
    """Called outside a coordinator's run, stream_export_cluster_node is a
    directory export: no replacing a finished export (or a cluster's
    manifest of manifests) without overwrite, and an export id that is the
    finished export's is refused before any of its parts is removed."""
    directory = str(server_dir) + "/"
    before = {p.name: p.read_bytes() for p in server_dir.iterdir()}
    finished_id = json.loads(before["manifest.json"])["export_id"]
    assert sqlstate_of(writer, "SELECT * FROM stream_export_cluster_node('hand_rows', %s, 'id', 1, 'none',"
                               " NULL, 'default', %s)", [directory, secrets.token_hex(6)]) == "58P02"
    assert {p.name: p.read_bytes() for p in server_dir.iterdir()} == before
    assert sqlstate_of(writer, "SELECT * FROM stream_export_cluster_node('hand_rows', %s, 'id', 1, 'none',"
                               " NULL, 'default', %s, overwrite => true)", [directory, finished_id]) == "58P02"
    assert {p.name: p.read_bytes() for p in server_dir.iterdir()} == before
    assert writer.execute("SELECT ok, parts, rows FROM stream_export_verify_manifest(%s)",
                          [directory]).fetchone() == (True, 2, 3000)
    # A cluster's manifest of manifests is not replaced either.
    with shards["coordinator"].connect() as c:
        export(c, "by-hand/", shards)
    top = get(store, "by-hand/manifest.json")
    assert sqlstate_of(writer, "SELECT * FROM stream_export_cluster_node('hand_rows', %s, 'id', 1, 'none',"
                               " NULL, 'default', %s)", [f"s3://{BUCKET}/by-hand/", secrets.token_hex(6)]) \
        == "58P02"
    assert get(store, "by-hand/manifest.json") == top
    # With overwrite and an id of its own it is what stream_export_to_directory would do.
    assert node_function(writer, directory, secrets.token_hex(6), overwrite=True)[0][1] == 3000


def rewrite_manifest(server_dir, change) -> None:
    path = server_dir / "manifest.json"
    manifest = json.loads(path.read_text())
    change(manifest)
    path.write_text(json.dumps(manifest))


def verdict(conn, uri: str):
    return conn.execute("SELECT ok, detail FROM stream_export_verify_manifest(%s)", [uri]).fetchone()


def test_verify_refuses_a_part_listed_twice(writer, server_dir):
    directory = str(server_dir) + "/"

    def twice(manifest):
        manifest["parts"].append(manifest["parts"][0])
        manifest["totals"]["rows"] += manifest["parts"][0]["rows"]
    rewrite_manifest(server_dir, twice)
    ok, detail = verdict(writer, directory)
    assert not ok and "more than once" in detail, detail

    def many(manifest):
        first = manifest["parts"][0]
        manifest["parts"] = [first] * 100_000
        manifest["totals"]["rows"] = first["rows"] * 100_000
    rewrite_manifest(server_dir, many)
    started = time.monotonic()
    ok, detail = verdict(writer, directory)
    assert not ok and "more than once" in detail, detail
    assert time.monotonic() - started < 10


def test_verify_refuses_a_node_listed_twice(coordinator, shards, store):
    export(coordinator, "node-twice/", shards)
    manifest = json.loads(get(store, "node-twice/manifest.json"))
    node_a = next(n for n in manifest["nodes"] if n["node"] == "a")
    manifest["nodes"].append(node_a)
    manifest["parts"] += [p for p in manifest["parts"] if p["node"] == "a"]
    manifest["totals"]["rows"] += node_a["rows"]
    store.client().put_object(Bucket=BUCKET, Key="node-twice/manifest.json", Body=json.dumps(manifest).encode())
    ok, detail = verdict(coordinator, f"s3://{BUCKET}/node-twice/")
    assert not ok and detail.startswith("node a:") and "more than once" in detail, detail


def test_verify_reads_a_60_mib_manifest_in_bounded_memory(writer, server_dir):
    from helpers import PeakSampler
    part = json.loads((server_dir / "manifest.json").read_text())["parts"][0]
    parts = []
    size = 0
    while size < 60 << 20:
        entry = dict(part, file=f"part-{secrets.token_hex(6)}-00000.ndjson")
        parts.append(entry)
        size += len(json.dumps(entry)) + 2
    rewrite_manifest(server_dir, lambda m: m.update(parts=parts))
    assert (server_dir / "manifest.json").stat().st_size > 60 << 20
    pid = writer.info.backend_pid
    with PeakSampler(pid) as peak:
        assert sqlstate_of(writer, "SELECT * FROM stream_export_verify_manifest(%s)",
                           [str(server_dir) + "/"]) == "54000"
    assert peak.peak < 200 * 1024, f"{peak.peak} KiB"


@pytest.mark.skipif(not HAS_PLPROXY, reason="PL/Proxy is packaged for PostgreSQL 15 only")
def test_a_plproxy_partition_uri_and_partition_n_keep_the_password_out_of_errors_and_logs(coordinator, shards,
                                                                                         store, grantee):
    """Partitions written as URIs (and with PL/Proxy's partition_N
    spelling), the password in the user mapping: the export works, and a
    wrong password shows in no error and no log."""
    coordinator.execute("CREATE EXTENSION IF NOT EXISTS plproxy")
    wrong = "wrong-" + secrets.token_hex(8)
    uri = {n: f"postgresql://127.0.0.1:{shards[n].port}/e2e" for n in ("a", "b")}
    coordinator.execute("SET log_statement = 'none'")
    coordinator.execute(f"CREATE SERVER uri_shards FOREIGN DATA WRAPPER plproxy"
                        f" OPTIONS (p0 '{uri['a']}', p1 '{uri['b']}')")
    coordinator.execute(f"CREATE SERVER spelled FOREIGN DATA WRAPPER plproxy"
                        f" OPTIONS (partition_0 '{uri['a']}', partition_1 '{uri['b']}')")
    coordinator.execute(f"CREATE SERVER wrong_pw FOREIGN DATA WRAPPER plproxy OPTIONS (p0 '{uri['a']}')")
    for server, password in (("uri_shards", NODE_PASSWORD), ("spelled", NODE_PASSWORD), ("wrong_pw", wrong)):
        coordinator.execute(f"CREATE USER MAPPING FOR PUBLIC SERVER {server}"
                            f" OPTIONS (user '{NODE_ROLE}', password '{password}')")
        coordinator.execute(f"GRANT USAGE ON FOREIGN SERVER {server} TO {GRANTEE}")
    coordinator.execute("RESET log_statement")
    try:
        for server, conn, prefix in (("uri_shards", coordinator, "plproxy-uri/"),
                                     ("spelled", grantee, "plproxy-spelled/")):
            rows = conn.execute(
                f"SELECT node, rows FROM stream_export_cluster('events', 's3://{BUCKET}/{prefix}', 'id',"
                f" cluster => '{server}') ORDER BY node").fetchall()
            assert rows == [("a", ROWS_PER_NODE), ("b", ROWS_PER_NODE)], server
        for conn in (coordinator, grantee):
            with pytest.raises(psycopg.Error) as failure:
                conn.execute(f"SELECT * FROM stream_export_cluster('events', 's3://{BUCKET}/plproxy-wrong/',"
                             " 'id', cluster => 'wrong_pw')")
            error = failure.value
            text = " ".join(str(x) for x in (error, error.diag.message_detail, error.diag.message_hint,
                                             error.diag.context))
            assert wrong not in text and "password" in text, text
        for srv in (shards["coordinator"], shards["a"]):
            assert wrong not in srv.log_text()
    finally:
        coordinator.execute("SET log_statement = 'none'")
        for server in ("uri_shards", "spelled", "wrong_pw"):
            coordinator.execute(f"DROP SERVER IF EXISTS {server} CASCADE")


def audit_lines(srv, marker: str) -> list[str]:
    return [line for line in srv.log_text().splitlines()
            if "pg_stream_export: export" in line and marker in line]


def test_a_grantees_cluster_export_shows_in_activity_and_every_audit_line(grantee, shards, store):
    prefix = "audited/"
    gate = Gate(shards["b"])
    try:
        thread, result = run_in_thread(lambda: grantee_export(grantee, prefix))
        gate.wait_for_exporter()
        with shards["coordinator"].connect() as c:
            shown = c.execute("SELECT role, destination FROM stream_export_activity"
                              " WHERE destination LIKE %s", [f"%{prefix}%"]).fetchall()
        assert shown == [(GRANTEE, f"s3://{BUCKET}/{prefix}")], shown
    finally:
        gate.release()
    thread.join()
    assert result.get("value") and len(result["value"]) == 2, result
    coordinator_lines = wait_until(lambda: audit_lines(shards["coordinator"], f"s3://{BUCKET}/{prefix}"))
    assert any("export completed" in l and f'role="{GRANTEE}"' in l for l in coordinator_lines), coordinator_lines
    for node in ("a", "b"):
        lines = wait_until(lambda: audit_lines(shards[node], f"{prefix}node-{node}/"))
        assert any(f'role="{NODE_ROLE}" requested_by="{GRANTEE}"' in l and "export completed" in l
                   for l in lines), lines


@pytest.mark.parametrize("change", ["TimeZone", "profile"])
def test_a_resume_with_other_settings_exports_the_finished_node_again(shards, store, change):
    """A cluster export fails after node a finished; the same call with
    another TimeZone (or type options profile) exports node a again, so the
    dataset is uniform."""
    prefix = f"resume-{change.lower()}/"
    gate = Gate(shards["b"])
    coordinator = shards["coordinator"].connect()
    try:
        coordinator.execute("SET TimeZone = 'UTC'")
        thread, result = run_in_thread(lambda: export(coordinator, prefix, shards, compression="gzip"))
        gate.wait_for_exporter()
        wait_until(lambda: node_finished(store, prefix, "a"))
        with shards["coordinator"].connect() as c:
            c.execute("SELECT pg_cancel_backend(%s)", [coordinator.info.backend_pid])
        thread.join()
        assert isinstance(result.get("error"), errors.QueryCanceled), result
    finally:
        gate.release()
    assert node_finished(store, prefix, "a")
    options = {"compression": "gzip"}
    if change == "TimeZone":
        coordinator.execute("SET TimeZone = 'Asia/Tokyo'")
    else:
        options["profile"] = "javascript"
    rows = export(coordinator, prefix, shards, **options)
    assert [(r[0], r[1]) for r in rows] == [("a", False), ("b", False)]
    lines = exported_lines(store, prefix)
    for node in ("a", "b"):
        if change == "TimeZone":
            with shards[node].connect() as c:
                c.execute("SET TimeZone = 'Asia/Tokyo'")
                assert sorted(lines[node], key=lambda l: json.loads(l)["id"]) == \
                    oracle_lines(c, "SELECT * FROM events ORDER BY id")
        else:
            # The javascript profile writes bigints as strings.
            assert all(isinstance(json.loads(l)["id"], str) for l in lines[node]), node
    # The same call again, under the same settings, reuses both.
    coordinator.execute("SELECT pg_catalog.set_config('TimeZone', current_setting('TimeZone'), false)")
    store.client().delete_object(Bucket=BUCKET, Key=f"{prefix}manifest.json")
    rows = export(coordinator, prefix, shards, **options)
    assert [(r[0], r[1]) for r in rows] == [("a", True), ("b", True)]
    coordinator.close()
    no_leftovers(store, prefix)


def test_a_cluster_export_removes_only_the_node_directories_it_made(coordinator, shards, store):
    """Objects under the prefix whose names start with "node-" but that no
    cluster export made (a note, another export's directory) stay through
    an export and an overwrite; the replaced export's node directories go.
    (The clean-up after the commit point removed everything under node-*.)"""
    prefix = "foreign/"
    client = store.client()
    foreign = [f"{prefix}node-notes.txt", f"{prefix}node-archive/manifest.json",
               f"{prefix}node-archive/part-0123456789ab-00000.ndjson", f"{prefix}node-a/readme.txt"]
    for key in foreign:
        body = (json.dumps({"parts": [{"file": "part-0123456789ab-00000.ndjson"}]}).encode()
                if key.endswith("manifest.json") else b"not a cluster export's\n")
        client.put_object(Bucket=BUCKET, Key=key, Body=body)
    export(coordinator, prefix, shards)
    first = {n["directory"] for n in json.loads(get(store, f"{prefix}manifest.json"))["nodes"]}
    export(coordinator, prefix, shards, overwrite=True)
    second = {n["directory"] for n in json.loads(get(store, f"{prefix}manifest.json"))["nodes"]}
    keys = objects(store, prefix)
    assert all(key in keys for key in foreign), keys
    assert not any(key.startswith(prefix + d) for d in first for key in keys)
    assert all(any(key.startswith(prefix + d) for key in keys) for d in second)
    no_leftovers(store, prefix)
