"""A cluster export's one commit point: its manifest of manifests.

Two nodes and a coordinator reach the store through a proxy that holds one
request in turn (the coordinator's or a node's, whichever is that request),
and the test cancels the coordinator while it is held. Afterwards the
prefix holds either the export the call was overwriting, whole, verified
and with its lines, and the call failed; or the new export, whole and
verified, with the table's lines now, and the call succeeded. Before, an
overwrite deleted the old manifest of manifests first and the nodes
replaced their exports in place, so most steps left no export at all.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from conftest import crashes_in, start_cluster, stop_cluster
from helpers import oracle_lines
from proxy import HoldingProxy, cancelled_while_held
from stores import running_store, store_environment

BUCKET = "clusters"
SECRET = "cluster-commit-secret"
ROWS_PER_NODE = 4000


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    with running_store("moto", tmp_path_factory.mktemp("store"), "clusters", BUCKET, SECRET) as s:
        yield s


@pytest.fixture(scope="module")
def proxy(store):
    p = HoldingProxy(store.endpoint)
    yield p
    p.close()


@pytest.fixture(scope="module")
def servers(proxy):
    environment = store_environment(proxy.endpoint, SECRET)
    started = {}
    try:
        for node, first in (("a", 1), ("b", 2)):
            srv = start_cluster("pg_stream_export", environment=environment,
                                settings={"pg_stream_export.node_id": node})
            started[node] = srv
            with srv.connect() as c:
                c.execute(f"""
                    CREATE TABLE cp_src (id int PRIMARY KEY, t text);
                    INSERT INTO cp_src SELECT g, md5(g::text)
                    FROM generate_series({first}, {2 * ROWS_PER_NODE}, 2) g;""")
        started["coordinator"] = start_cluster("pg_stream_export", environment=environment)
        yield started
    finally:
        crashed = []
        for srv in started.values():
            crashed += crashes_in(stop_cluster(srv))
        assert not crashed, "\n".join(crashed)


def export_sql(servers) -> tuple[str, list]:
    nodes = [servers[n].dsn() for n in ("a", "b")]
    return ("SELECT node, rows FROM stream_export_cluster('cp_src', %s, 'id', nodes => %s,"
            " partitions_per_node => 2, overwrite => true) ORDER BY node", nodes)


def table_lines(servers) -> list[str]:
    lines = []
    for node in ("a", "b"):
        with servers[node].connect() as c:
            lines += oracle_lines(c, "SELECT * FROM cp_src ORDER BY id")
    return sorted(lines)


def exported(store, prefix: str) -> tuple[str, list[str]]:
    """The export id of the manifest of manifests under `prefix`, and the
    record lines of every part it lists."""
    s3 = store.client()
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"{prefix}manifest.json")["Body"].read())
    lines: list[str] = []
    for part in manifest["parts"]:
        data = s3.get_object(Bucket=BUCKET, Key=prefix + part["file"])["Body"].read().decode()
        lines += [line for line in data.splitlines() if not line.startswith('{"_stream_export":')]
    return manifest["export_id"], sorted(lines)


def verified(servers, uri: str) -> None:
    with servers["coordinator"].connect() as c:
        ok, _, _, detail = c.execute("SELECT * FROM stream_export_verify_manifest(%s)", [uri]).fetchone()
    assert ok, detail


def test_a_cancel_at_any_request_of_a_cluster_export_leaves_one_whole_export(servers, proxy, store):
    prefix = "every-step/"
    uri = f"s3://{BUCKET}/{prefix}"
    sql, nodes = export_sql(servers)
    proxy.reset()
    with servers["coordinator"].connect() as c:
        c.execute(sql, [uri, nodes])
    index, outcomes = 0, []
    while True:
        before = exported(store, prefix)
        with servers["a"].connect() as c:
            c.execute("UPDATE cp_src SET t = %s WHERE id = 1", [f"step {index}"])
        now = table_lines(servers)
        result, was_held = cancelled_while_held(servers["coordinator"], proxy, sql, [uri, nodes],
                                                hold_at=index)
        if not was_held:
            assert "error" not in result, result
            break
        method, path = proxy.requests[index]
        verified(servers, uri)
        after = exported(store, prefix)
        if "error" in result:
            assert isinstance(result["error"], psycopg.errors.QueryCanceled), (index, method, path, result)
            assert after == before, (index, method, path)
        else:
            assert after[1] == now and after[0] != before[0], (index, method, path)
        outcomes.append(("failed" if "error" in result else "committed", method, path))
        index += 1
    # Both outcomes were met; the coordinator's first requests (its lease,
    # the prefix's manifest and record) come before any node's, so a cancel
    # there fails for sure, and the last request is the commit's clean-up.
    assert {o[0] for o in outcomes} == {"failed", "committed"}, outcomes
    assert [o[0] for o in outcomes[:3]] == ["failed"] * 3, outcomes
    assert outcomes[-1][0] == "committed", outcomes
    assert exported(store, prefix)[1] == table_lines(servers)
