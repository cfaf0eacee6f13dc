"""make bench: every exporter against PostgreSQL's own COPY, side by side.

Runs each method R times round-robin on the `events` table of a tuned
throwaway cluster, checks that every NDJSON output equals the reference
(the row_to_json COPY workaround) byte for byte, samples the backend's peak
private memory, and writes a Markdown table and a chart.

Invoked by scripts/bench.sh, which builds, installs and starts the server.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import gzip
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import boto3
import psycopg
from boto3.s3.transfer import TransferConfig

RESULTS = Path(__file__).resolve().parent / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from stores import SeaweedStore  # noqa: E402  (the test harness's store launcher)

SUFFIX = {"none": ".ndjson", "gzip": ".ndjson.gz", "zstd": ".ndjson.zst"}


def rss_anon_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])
    return 0


class Sampler:
    """Peak RssAnon of one backend, sampled in a thread (started before the
    clock, so its start-up is not measured)."""

    def __init__(self, find_pid):
        self.find_pid = find_pid
        self.peak = 0
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        pid = None
        while not self.stop.is_set():
            if pid is None:
                pid = self.find_pid()
            if pid is not None:
                try:
                    self.peak = max(self.peak, rss_anon_kib(pid))
                except (FileNotFoundError, ProcessLookupError):
                    return
            self.stop.wait(0.01)

    def finish(self) -> int:
        self.stop.set()
        self.thread.join()
        return self.peak


@dataclass
class Method:
    name: str
    label: str
    output: str  # file name in the output directory
    codec: str  # "none", "gzip" or "zstd"
    ndjson: bool
    run: object  # callable(ctx) -> None
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)
    size: int = 0
    digest: str = ""
    # Set for exports to object storage: the store ("moto" or "seaweedfs")
    # and the key in its "bench" bucket; the object is downloaded to
    # `output` for the byte comparison.
    object_key: str = ""
    store: str = ""
    # Set for directory and cluster exports to a prefix: checked with
    # stream_export_verify_manifest instead of read back.
    prefix: str = ""


class Context:
    def __init__(self, args):
        self.args = args
        self.dsn = args.dsn
        self.server_dir = Path(args.server_dir)
        self.client_dir = Path(args.client_dir)
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.observer = psycopg.connect(self.dsn, autocommit=True)
        # Endpoints by store name; the profile of each in the server's AWS
        # config files has the same name.
        self.stores = {"moto": args.store}

    def server_path(self, name):
        return str(self.server_dir / name)

    def client_path(self, name):
        return self.client_dir / name


def sql_method(sql_template: str):
    def run(ctx: Context, method: Method):
        sql = sql_template.format(out=ctx.server_path(method.output))
        if method.store:
            ctx.conn.execute("SELECT set_config('pg_stream_export.object_store_profile', %s, false)",
                             [method.store])
        pid = ctx.conn.info.backend_pid
        sampler = Sampler(lambda: pid)
        start = time.perf_counter()
        ctx.conn.execute(sql)
        elapsed = time.perf_counter() - start
        if method.store:
            ctx.conn.execute("RESET pg_stream_export.object_store_profile")
        return elapsed, sampler.finish()
    return run


def psql_method(sql: str):
    """psql writing the query's output to a client file."""
    def run(ctx: Context, method: Method):
        app = f"pse-bench-{method.name}-{time.monotonic_ns()}"
        env = dict(os.environ, PGAPPNAME=app)

        def find_pid():
            row = ctx.observer.execute(
                "SELECT pid FROM pg_stat_activity WHERE application_name = %s", [app]
            ).fetchone()
            return row[0] if row else None

        sampler = Sampler(find_pid)
        out = ctx.client_path(method.output)
        start = time.perf_counter()
        with open(out, "wb") as f:
            subprocess.run(
                ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-v", "FETCH_COUNT=10000",
                 "-d", ctx.dsn, "-c", sql],
                stdout=f, check=True, env=env,
            )
        elapsed = time.perf_counter() - start
        return elapsed, sampler.finish()
    return run


def bytes_client_method(options: str):
    """A client reading stream_export_bytes chunks into a file."""
    def run(ctx: Context, method: Method):
        with psycopg.connect(ctx.dsn, autocommit=True) as c:
            pid = c.info.backend_pid
            sampler = Sampler(lambda: pid)
            out = ctx.client_path(method.output)
            start = time.perf_counter()
            with open(out, "wb") as f, c.cursor(binary=True) as cur:
                for (chunk,) in cur.stream(f"SELECT stream_export_bytes('events'{options})"):
                    f.write(chunk)
            elapsed = time.perf_counter() - start
            return elapsed, sampler.finish()
    return run


def store_client(endpoint: str):
    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                        aws_access_key_id="bench", aws_secret_access_key="bench")


def file_then_upload_method(store: str, codec: str):
    """What exporting to a file and then uploading it takes: the file
    export, then boto3's upload of the file (two threads and 8 MiB parts,
    as the extension's own uploads)."""
    def run(ctx: Context, method: Method):
        path = ctx.server_path(method.output)
        pid = ctx.conn.info.backend_pid
        sampler = Sampler(lambda: pid)
        start = time.perf_counter()
        ctx.conn.execute(f"SELECT * FROM stream_export_to_file('events', '{path}', compression => '{codec}', "
                         "overwrite => true)")
        store_client(ctx.stores[store]).upload_file(
            path, "bench", f"uploaded{SUFFIX[codec]}",
            Config=TransferConfig(max_concurrency=2, multipart_chunksize=8 << 20))
        elapsed = time.perf_counter() - start
        return elapsed, sampler.finish()
    return run


def object_methods(store: str, label: str) -> list[Method]:
    """An export straight to the store, and a file export then uploaded,
    for each codec."""
    found = []
    for codec in ("none", "gzip", "zstd"):
        name = f"to_object_{store}" + ("" if codec == "none" else f"_{codec}")
        what = {"none": "plain", "gzip": "gzip -6", "zstd": "zstd -3"}[codec]
        key = f"to_object{SUFFIX[codec]}"
        found.append(Method(
            name, f"stream_export_to_file, {what}, to S3 ({label})", f"{name}{SUFFIX[codec]}", codec, True,
            sql_method(f"SELECT * FROM stream_export_to_file('events', 's3://bench/{key}', "
                       f"compression => '{codec}', overwrite => true)"), object_key=key, store=store))
        found.append(Method(
            f"{name}_upload", f"same as a file, then a boto3 upload ({label})", f"{name}_upload{SUFFIX[codec]}",
            codec, True, file_then_upload_method(store, codec)))
    return found


def cluster_methods(ctx: Context) -> list[Method]:
    """A cluster export of the whole table from one node (this database,
    node "all"), from two nodes with half the rows each (databases
    shard_a and shard_b of this server), and the directory export it runs
    on each node, alone: the coordinator's overhead is the difference."""
    port = ctx.conn.info.port
    node = "host=127.0.0.1 port={port} user=postgres dbname={db}"
    one = [node.format(port=port, db="postgres")]
    two = [node.format(port=port, db=f"shard_{n}") for n in ("a", "b")]
    found = [Method(
        "prefix_zstd_1", "stream_export_to_directory, zstd -3, 1 partition, to S3 (local SeaweedFS)", "",
        "zstd", False, sql_method("SELECT * FROM stream_export_to_directory('events', 's3://bench/prefix/', "
                                  "'id', 1, compression => 'zstd', overwrite => true)"),
        store="seaweedfs", prefix="s3://bench/prefix/")]
    for name, label, nodes in (("cluster_1_node", "1 node, all rows", one),
                               ("cluster_2_nodes", "2 nodes, half the rows each", two)):
        array = "ARRAY[" + ", ".join(f"'{n}'" for n in nodes) + "]"
        found.append(Method(
            name, f"stream_export_cluster, zstd -3, {label}, to S3 (local SeaweedFS)", "", "zstd", False,
            sql_method(f"SELECT * FROM stream_export_cluster('events', 's3://bench/{name}/', 'id', "
                       f"nodes => {array}, compression => 'zstd', overwrite => true)"),
            store="seaweedfs", prefix=f"s3://bench/{name}/"))
    return found


def copy_ndjson_available(ctx: Context) -> bool:
    try:
        ctx.conn.execute("LOAD 'pg_stream_export'")
        with ctx.conn.cursor() as cur:
            with cur.copy("COPY (SELECT 1 AS x) TO STDOUT WITH (FORMAT ndjson)") as copy:
                for _ in copy:
                    pass
        return True
    except psycopg.Error:
        return False


def methods(ctx: Context) -> list[Method]:
    csv_trick = "(FORMAT csv, QUOTE e'\\x01', DELIMITER e'\\x02')"
    rtj = "SELECT row_to_json(e) FROM events e"
    threads = os.cpu_count()
    found = [
        Method("copy_csv", "COPY events TO file (FORMAT csv)", "copy.csv", "none", False,
               sql_method("COPY events TO '{out}' (FORMAT csv)")),
        Method("copy_row_to_json", "COPY (row_to_json) TO file, csv trick", "reference.ndjson", "none", True,
               sql_method(f"COPY ({rtj}) TO '{{out}}' {csv_trick}")),
        Method("copy_row_to_json_gzip", "same TO PROGRAM 'gzip -6'", "reference.ndjson.gz", "gzip", True,
               sql_method(f"COPY ({rtj}) TO PROGRAM 'gzip -6 > {{out}}' {csv_trick}")),
        Method("copy_row_to_json_pigz", f"same TO PROGRAM 'pigz -6 -p {threads}'", "pigz.ndjson.gz", "gzip", True,
               sql_method(f"COPY ({rtj}) TO PROGRAM 'pigz -6 -p {threads} > {{out}}' {csv_trick}")),
        Method("copy_row_to_json_zstd", f"same TO PROGRAM 'zstd -3 -T{threads}'", "reference.ndjson.zst", "zstd",
               True, sql_method(f"COPY ({rtj}) TO PROGRAM 'zstd -3 -T{threads} -q -c > {{out}}' {csv_trick}")),
        Method("to_file", "stream_export_to_file, plain", "to_file.ndjson", "none", True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', overwrite => true)")),
        Method("to_file_javascript", "stream_export_to_file, plain, profile javascript", "to_file_js.ndjson",
               "none", False,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', profile => 'javascript', "
                          "overwrite => true)")),
        Method("to_file_gzip", "stream_export_to_file, gzip -6", "to_file.ndjson.gz", "gzip", True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', compression => 'gzip', "
                          "compression_level => 6, overwrite => true)")),
        Method("to_file_zstd", "stream_export_to_file, zstd -3", "to_file.ndjson.zst", "zstd", True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', compression => 'zstd', "
                          "overwrite => true)")),
        Method("to_file_zstd_1", "stream_export_to_file, zstd -1", "to_file_1.ndjson.zst", "zstd", True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', compression => 'zstd', "
                          "compression_level => 1, overwrite => true)")),
        Method("to_directory_gzip_1", "stream_export_to_directory, gzip -6, 1 partition", "dir1", "gzip", False,
               sql_method("SELECT * FROM stream_export_to_directory('events', '{out}', 'id', 1, "
                          "compression => 'gzip', overwrite => true)")),
        Method("to_directory_gzip_2", "stream_export_to_directory, gzip -6, 2 partitions", "dir2", "gzip", False,
               sql_method("SELECT * FROM stream_export_to_directory('events', '{out}', 'id', 2, "
                          "compression => 'gzip', overwrite => true)")),
        Method("to_directory_zstd_2", "stream_export_to_directory, zstd -3, 2 partitions", "dirz", "zstd", False,
               sql_method("SELECT * FROM stream_export_to_directory('events', '{out}', 'id', 2, "
                          "compression => 'zstd', overwrite => true)")),
        *object_methods("moto", "local moto"),
        *object_methods("seaweedfs", "local SeaweedFS"),
        *cluster_methods(ctx),
        Method("chunked", "CALL stream_export_chunked, plain, default chunk_rows", "chunked", "none", False,
               sql_method("CALL stream_export_chunked('events', '{out}', 'id', overwrite => true)")),
        Method("stream_export_psql", "stream_export read by psql into a file", "stream_export.ndjson", "none", True,
               psql_method("SELECT stream_export('events')")),
        Method("stream_export_bytes", "stream_export_bytes read by a client", "bytes.ndjson", "none", True,
               bytes_client_method("")),
        Method("stream_export_bytes_gzip", "stream_export_bytes gzip -6 read by a client", "bytes.ndjson.gz",
               "gzip", True, bytes_client_method(", compression => 'gzip'")),
        Method("stream_export_bytes_zstd", "stream_export_bytes zstd -3 read by a client", "bytes.ndjson.zst",
               "zstd", True, bytes_client_method(", compression => 'zstd'")),
        Method("psql_row_to_json", "psql -At FETCH_COUNT=10000 row_to_json", "psql.ndjson", "none", True,
               psql_method(rtj)),
    ]
    if copy_ndjson_available(ctx):
        at = next(i for i, m in enumerate(found) if m.name == "to_file_gzip")
        found[at:at] = [
            Method("copy_ndjson_psql", "COPY events TO STDOUT (FORMAT ndjson) via psql",
                   "copy_ndjson.ndjson", "none", True,
                   psql_method("COPY events TO STDOUT WITH (FORMAT ndjson)")),
            Method("copy_ndjson_zstd_psql", "COPY events TO STDOUT (FORMAT ndjson, COMPRESSION zstd) via psql",
                   "copy_ndjson.ndjson.zst", "zstd", True,
                   psql_method("COPY events TO STDOUT WITH (FORMAT ndjson, COMPRESSION zstd)")),
        ]
    else:
        print("note: COPY ... (FORMAT ndjson) is not available yet; that method is skipped")
    only = os.environ.get("BENCH_ONLY")
    if only:
        # The baseline and the reference always run.
        wanted = {"copy_csv", "copy_row_to_json", *only.split(",")}
        found = [m for m in found if m.name in wanted]
    return found


def output_file(ctx: Context, method: Method) -> Path:
    server = ctx.server_dir / method.output
    return server if server.exists() else ctx.client_path(method.output)


def sorted_digest(lines: list[bytes]) -> str:
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line)
    return h.hexdigest()


def open_decompressed(path: Path, codec: str):
    """A binary reader of the file's NDJSON."""
    if codec == "gzip":
        return gzip.open(path, "rb")
    if codec == "zstd":
        return subprocess.Popen(["zstd", "-d", "-c", "-q", str(path)], stdout=subprocess.PIPE).stdout
    return open(path, "rb")


def digest_of(path: Path, codec: str) -> tuple[str, int]:
    if path.is_dir():
        # A directory export is in key order, not scan order: compare its
        # parts' lines (footers dropped) with the reference's, both sorted.
        manifest = json.loads((path / "manifest.json").read_text())
        lines: list[bytes] = []
        size = 0
        for part in manifest["parts"]:
            part_path = path / part["file"]
            size += part_path.stat().st_size
            with open_decompressed(part_path, codec) as f:
                lines.extend(f.read().splitlines(keepends=True)[:-1])
        return "sorted:" + sorted_digest(lines), size
    h = hashlib.sha256()
    with open_decompressed(path, codec) as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest(), path.stat().st_size


def validate_reference(path: Path) -> int:
    lines = 0
    with open(path, "rb") as f:
        for line in f:
            json.loads(line)
            lines += 1
    return lines


def first_difference(a: Path, b: Path, b_codec: str) -> str:
    with open(a, "rb") as fa, open_decompressed(b, b_codec) as fb:
        for n, (la, lb) in enumerate(zip(fa, fb), 1):
            if la != lb:
                return f"line {n}:\n  reference: {la[:300]!r}\n  output:    {lb[:300]!r}"
    return "outputs differ in length"


def fmt_mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dsn", required=True)
    parser.add_argument("--server-dir", required=True)
    parser.add_argument("--client-dir", required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--rows", type=int, required=True)
    parser.add_argument("--store", required=True, help="endpoint of the local moto server (profile moto)")
    parser.add_argument("--aws-dir", required=True, help="the directory of the server's AWS config files")
    args = parser.parse_args()
    ctx = Context(args)
    aws_dir = Path(args.aws_dir)
    seaweed = SeaweedStore(aws_dir, "bench", "bench", "bench")
    try:
        seaweed.client().create_bucket(Bucket="bench")
        ctx.stores["seaweedfs"] = seaweed.endpoint
        for name, endpoint in ctx.stores.items():
            with open(aws_dir / "config", "a") as f:
                f.write(f"[profile {name}]\nregion = us-east-1\nendpoint_url = {endpoint}\nallow_http = true\n")
            with open(aws_dir / "credentials", "a") as f:
                f.write(f"[{name}]\naws_access_key_id = bench\naws_secret_access_key = bench\n")
        return measure(ctx, args)
    finally:
        seaweed.stop()


def measure(ctx: Context, args) -> int:
    rows = ctx.conn.execute("SELECT count(*) FROM events").fetchone()[0]
    found = methods(ctx)
    for r in range(1, args.rounds + 1):
        for m in found:
            elapsed, peak = m.run(ctx, m)
            m.times.append(elapsed)
            m.peaks.append(peak)
            print(f"round {r}/{args.rounds}  {m.name:26s} {elapsed:7.2f} s  backend {peak / 1024:6.1f} MiB", flush=True)

    # The objects, downloaded for the comparison (each store holds the last
    # export of each key: compare right after that key's method).
    for m in found:
        if m.object_key:
            store_client(ctx.stores[m.store]).download_file("bench", m.object_key, str(ctx.server_dir / m.output))
    # Correctness: every NDJSON output equals the reference, byte for byte.
    reference = ctx.server_dir / "reference.ndjson"
    ref_lines = validate_reference(reference)
    if ref_lines != rows:
        print(f"!!! reference has {ref_lines} lines, table has {rows} rows")
        return 1
    ref_digest, _ = digest_of(reference, False)
    with open(reference, "rb") as f:
        ref_sorted = "sorted:" + sorted_digest(f.readlines())
    failed = False
    for m in found:
        if m.prefix:
            ctx.conn.execute("SELECT set_config('pg_stream_export.object_store_profile', %s, false)", [m.store])
            ok, _, checked, detail = ctx.conn.execute(
                "SELECT * FROM stream_export_verify_manifest(%s)", [m.prefix]).fetchone()
            ctx.conn.execute("RESET pg_stream_export.object_store_profile")
            manifest = json.load(store_client(ctx.stores[m.store]).get_object(
                Bucket="bench", Key=m.prefix.split("/", 3)[3] + "manifest.json")["Body"])
            m.size = manifest["totals"]["file_bytes"]
            if not ok or checked != rows:
                failed = True
                print(f"!!! {m.name}: the export does not verify ({checked} rows): {detail}")
            continue
        path = output_file(ctx, m)
        m.digest, m.size = digest_of(path, m.codec)
        if path.is_dir() and m.digest != ref_sorted:
            failed = True
            print(f"!!! MISMATCH: the parts of {m.name} differ from the reference's lines")
        elif m.ndjson and m.digest != ref_digest:
            failed = True
            print(f"!!! MISMATCH: {m.name} differs from the reference: {first_difference(reference, path, m.codec)}")

    base = statistics.median(next(m for m in found if m.name == "copy_csv").times)
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    server_version = ctx.conn.execute("SHOW server_version").fetchone()[0]
    header = (
        f"`make bench`, {now}: {os.cpu_count()} cores, {mem_gib:.0f} GiB, {platform.system()} "
        f"{platform.release()}, PostgreSQL {server_version}, events N = {rows:,} "
        f"({args.rounds} rounds, medians; table warm in shared buffers, fsync off, TimeZone UTC, jit off)\n"
    )
    table = [
        "| method | median s | min s | max s | rows/s | MB/s (NDJSON) | output | × COPY csv | backend peak private |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    ndjson_bytes = reference.stat().st_size
    for m in found:
        med = statistics.median(m.times)
        table.append(
            f"| {m.label} | {med:.2f} | {min(m.times):.2f} | {max(m.times):.2f} | {rows / med:,.0f} | "
            f"{ndjson_bytes / med / 1e6:,.0f} | {fmt_mb(m.size)} | {med / base:.2f} | {max(m.peaks) / 1024:.1f} MiB |"
        )

    def median(name):
        return statistics.median(next((m.times for m in found if m.name == name), [float("nan")]))

    def ratio(a, b):
        return median(a) / median(b)

    size = collections.defaultdict(lambda: float("nan"), {m.name: m.size for m in found})
    targets = [
        f"- stream_export_to_file plain / COPY csv: {ratio('to_file', 'copy_csv'):.2f} (target <= 1.0)",
        f"- row_to_json COPY workaround / stream_export_to_file plain: {ratio('copy_row_to_json', 'to_file'):.2f}x faster (target >= 2)",
        f"- COPY TO PROGRAM gzip -6 / stream_export_to_file gzip: {ratio('copy_row_to_json_gzip', 'to_file_gzip'):.2f}x faster (target >= 2), "
        f"output {size['to_file_gzip'] / size['copy_row_to_json_gzip']:.3f}x the size of gzip -6 (target <= 1.05)",
        f"- psql row_to_json / stream_export via psql: {ratio('psql_row_to_json', 'stream_export_psql'):.2f}x faster",
    ]
    targets.append(
        f"- stream_export_to_file plain, profile javascript / default: {ratio('to_file_javascript', 'to_file'):.2f} (target <= 1.10)")
    targets.append(
        f"- stream_export_to_file gzip -6 / plain: {ratio('to_file_gzip', 'to_file'):.2f}x the time (target <= 2)")
    targets.append(
        f"- stream_export_to_file zstd -3 / gzip -6: {ratio('to_file_zstd', 'to_file_gzip'):.2f}x the time "
        f"(target <= 0.6); / COPY TO PROGRAM 'zstd -3 -T{os.cpu_count()}': "
        f"{ratio('to_file_zstd', 'copy_row_to_json_zstd'):.2f}x the time (target <= 0.8), "
        f"{size['to_file_zstd'] / size['copy_row_to_json_zstd']:.3f}x the size (target <= 1.05)")
    targets.append(
        f"- COPY TO PROGRAM 'pigz -6 -p {os.cpu_count()}' / stream_export_to_file gzip -6: "
        f"{ratio('copy_row_to_json_pigz', 'to_file_gzip'):.2f}x the time")
    for store, label in (("moto", "local moto"), ("seaweedfs", "local SeaweedFS")):
        for codec, file_method in (("none", "to_file"), ("gzip", "to_file_gzip"), ("zstd", "to_file_zstd")):
            name = f"to_object_{store}" + ("" if codec == "none" else f"_{codec}")
            targets.append(
                f"- to S3 ({label}), {codec}: file export then upload / straight to S3: "
                f"{ratio(f'{name}_upload', name):.2f}x the time (target >= 1); throughput of a file export / "
                f"straight to S3: {ratio(file_method, name):.2f} (target >= 0.9 where the store is not the limit)")
    targets.append(
        f"- CALL stream_export_chunked / stream_export_to_file, plain: {ratio('chunked', 'to_file'):.2f} (target <= 1.15)")
    targets.append(
        f"- directory export gzip, 1 partition / 2 partitions: {ratio('to_directory_gzip_1', 'to_directory_gzip_2'):.2f}x faster "
        f"with 2 (target >= 1.7 on 2 cores)")
    targets.append(
        f"- cluster export zstd -3 to S3, 1 node / that node's directory export alone: "
        f"{ratio('cluster_1_node', 'prefix_zstd_1'):.3f} (coordinator overhead, target < 1.05); "
        f"2 nodes with half the rows each / 1 node with all: {ratio('cluster_2_nodes', 'cluster_1_node'):.2f}x the time; "
        f"per node: {rows / median('cluster_1_node'):,.0f} rows/s with 1 node, "
        f"{rows / 2 / median('cluster_2_nodes'):,.0f} rows/s each with 2 (one core each here, beside the store)")
    if any(m.name == "copy_ndjson_psql" for m in found):
        targets.append(f"- psql row_to_json / COPY (FORMAT ndjson) via psql: {ratio('psql_row_to_json', 'copy_ndjson_psql'):.2f}x faster (target >= 2)")
        targets.append(
            f"- COPY (FORMAT ndjson, COMPRESSION zstd) via psql / COPY TO PROGRAM 'zstd -3 -T{os.cpu_count()}': "
            f"{ratio('copy_ndjson_zstd_psql', 'copy_row_to_json_zstd'):.2f}x the time")
    report = header + "\n" + "\n".join(table) + "\n\nRatios against the targets (same run):\n\n" + "\n".join(targets) + "\n"
    print()
    print(report)
    RESULTS.mkdir(exist_ok=True)
    if os.environ.get("BENCH_ONLY"):
        (RESULTS / "latest-only.md").write_text(report)
        print(f"written: {RESULTS / 'latest-only.md'} (BENCH_ONLY run: not the full report)")
        return 1 if failed else 0
    (RESULTS / "latest.md").write_text(report)
    chart(found, rows, RESULTS / "latest.png",
          f"make bench, {now}, PostgreSQL {server_version}, {os.cpu_count()} cores, events N = {rows:,}")
    print(f"written: {RESULTS / 'latest.md'} and {RESULTS / 'latest.png'}")
    return 1 if failed else 0


# One colour per kind of exporter, with a legend.
KIND_COLOURS = {
    "pg_stream_export": "#1f77b4",
    "PostgreSQL built-in (COPY)": "#7f7f7f",
    "psql client-side": "#ff7f0e",
}


def kind_of(method) -> str:
    if method.name.startswith("psql_"):
        return "psql client-side"
    if method.name.startswith("copy_") and method.name != "copy_ndjson_psql":
        return "PostgreSQL built-in (COPY)"
    return "pg_stream_export"


def chart(found, rows, path: Path, title: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.patches import Patch

    labels = [m.label for m in found]
    speeds = [rows / statistics.median(m.times) / 1e6 for m in found]
    kinds = [kind_of(m) for m in found]
    fig, ax = plt.subplots(figsize=(10, 0.5 * len(found) + 1.5))
    ax.barh(labels[::-1], speeds[::-1], color=[KIND_COLOURS[k] for k in kinds[::-1]])
    for y, v in enumerate(speeds[::-1]):
        ax.text(v, y, f" {v:.2f}", va="center", fontsize=8)
    ax.set_xlabel("million rows per second (median; higher is better)")
    ax.set_title(title, fontsize=10)
    ax.legend(handles=[Patch(color=KIND_COLOURS[k], label=k) for k in KIND_COLOURS if k in kinds],
              loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(main())
