"""make bench: every exporter against PostgreSQL's own COPY, side by side.

Runs each method R times round-robin on the `events` table of a tuned
throwaway cluster, checks that every NDJSON output equals the reference
(the row_to_json COPY workaround) byte for byte, samples the backend's peak
private memory, and writes a Markdown table and a chart.

Invoked by scripts/bench.sh, which builds, installs and starts the server.
"""

from __future__ import annotations

import argparse
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
    gzip_output: bool
    ndjson: bool
    run: object  # callable(ctx) -> None
    times: list = field(default_factory=list)
    peaks: list = field(default_factory=list)
    size: int = 0
    digest: str = ""
    # Set for exports to object storage: the key in the "bench" bucket; the
    # object is downloaded to `output` for the byte comparison.
    object_key: str = ""


class Context:
    def __init__(self, args):
        self.args = args
        self.dsn = args.dsn
        self.server_dir = Path(args.server_dir)
        self.client_dir = Path(args.client_dir)
        self.conn = psycopg.connect(self.dsn, autocommit=True)
        self.observer = psycopg.connect(self.dsn, autocommit=True)

    def server_path(self, name):
        return str(self.server_dir / name)

    def client_path(self, name):
        return self.client_dir / name


def sql_method(sql_template: str):
    def run(ctx: Context, method: Method):
        sql = sql_template.format(out=ctx.server_path(method.output))
        pid = ctx.conn.info.backend_pid
        sampler = Sampler(lambda: pid)
        start = time.perf_counter()
        ctx.conn.execute(sql)
        elapsed = time.perf_counter() - start
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


def file_then_upload_method():
    """What exporting to a file and then uploading it takes: the file
    export, then boto3's upload of the file (two threads and 8 MiB parts,
    as the extension's own uploads)."""
    def run(ctx: Context, method: Method):
        path = ctx.server_path(method.output)
        pid = ctx.conn.info.backend_pid
        sampler = Sampler(lambda: pid)
        start = time.perf_counter()
        ctx.conn.execute(f"SELECT * FROM stream_export_to_file('events', '{path}', overwrite => true)")
        store_client(ctx.args.store).upload_file(
            path, "bench", "uploaded.ndjson", Config=TransferConfig(max_concurrency=2, multipart_chunksize=8 << 20))
        elapsed = time.perf_counter() - start
        return elapsed, sampler.finish()
    return run


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
    found = [
        Method("copy_csv", "COPY events TO file (FORMAT csv)", "copy.csv", False, False,
               sql_method("COPY events TO '{out}' (FORMAT csv)")),
        Method("copy_row_to_json", "COPY (row_to_json) TO file, csv trick", "reference.ndjson", False, True,
               sql_method(f"COPY ({rtj}) TO '{{out}}' {csv_trick}")),
        Method("copy_row_to_json_gzip", "same TO PROGRAM 'gzip -6'", "reference.ndjson.gz", True, True,
               sql_method(f"COPY ({rtj}) TO PROGRAM 'gzip -6 > {{out}}' {csv_trick}")),
        Method("to_file", "stream_export_to_file, plain", "to_file.ndjson", False, True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', overwrite => true)")),
        Method("to_file_javascript", "stream_export_to_file, plain, profile javascript", "to_file_js.ndjson",
               False, False,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', profile => 'javascript', "
                          "overwrite => true)")),
        Method("to_file_gzip", "stream_export_to_file, gzip -6", "to_file.ndjson.gz", True, True,
               sql_method("SELECT * FROM stream_export_to_file('events', '{out}', compression => 'gzip', "
                          "compression_level => 6, overwrite => true)")),
        Method("to_directory_gzip_1", "stream_export_to_directory, gzip -6, 1 partition", "dir1", True, False,
               sql_method("SELECT * FROM stream_export_to_directory('events', '{out}', 'id', 1, "
                          "compression => 'gzip', overwrite => true)")),
        Method("to_directory_gzip_2", "stream_export_to_directory, gzip -6, 2 partitions", "dir2", True, False,
               sql_method("SELECT * FROM stream_export_to_directory('events', '{out}', 'id', 2, "
                          "compression => 'gzip', overwrite => true)")),
        Method("to_object", "stream_export_to_file, plain, to S3 (local moto)", "to_object.ndjson", False, True,
               sql_method("SELECT * FROM stream_export_to_file('events', 's3://bench/to_object.ndjson', "
                          "overwrite => true)"), object_key="to_object.ndjson"),
        Method("to_object_gzip", "stream_export_to_file, gzip -6, to S3 (local moto)", "to_object.ndjson.gz",
               True, True,
               sql_method("SELECT * FROM stream_export_to_file('events', 's3://bench/to_object.ndjson.gz', "
                          "compression => 'gzip', overwrite => true)"), object_key="to_object.ndjson.gz"),
        Method("to_file_then_upload", "stream_export_to_file, plain, then a boto3 upload of the file",
               "to_file_uploaded.ndjson", False, True, file_then_upload_method()),
        Method("chunked", "CALL stream_export_chunked, plain, default chunk_rows", "chunked", False, False,
               sql_method("CALL stream_export_chunked('events', '{out}', 'id', overwrite => true)")),
        Method("stream_export_psql", "stream_export read by psql into a file", "stream_export.ndjson", False, True,
               psql_method("SELECT stream_export('events')")),
        Method("stream_export_bytes", "stream_export_bytes read by a client", "bytes.ndjson", False, True,
               bytes_client_method("")),
        Method("stream_export_bytes_gzip", "stream_export_bytes gzip -6 read by a client", "bytes.ndjson.gz",
               True, True, bytes_client_method(", compression => 'gzip'")),
        Method("psql_row_to_json", "psql -At FETCH_COUNT=10000 row_to_json", "psql.ndjson", False, True,
               psql_method(rtj)),
    ]
    if copy_ndjson_available(ctx):
        found.insert(6, Method("copy_ndjson_psql", "COPY events TO STDOUT (FORMAT ndjson) via psql",
                               "copy_ndjson.ndjson", False, True,
                               psql_method("COPY events TO STDOUT WITH (FORMAT ndjson)")))
    else:
        print("note: COPY ... (FORMAT ndjson) is not available yet; that method is skipped")
    return found


def output_file(ctx: Context, method: Method) -> Path:
    server = ctx.server_dir / method.output
    return server if server.exists() else ctx.client_path(method.output)


def sorted_digest(lines: list[bytes]) -> str:
    h = hashlib.sha256()
    for line in sorted(lines):
        h.update(line)
    return h.hexdigest()


def digest_of(path: Path, is_gzip: bool) -> tuple[str, int]:
    if path.is_dir():
        # A directory export is in key order, not scan order: compare its
        # parts' lines (footers dropped) with the reference's, both sorted.
        manifest = json.loads((path / "manifest.json").read_text())
        lines: list[bytes] = []
        size = 0
        for part in manifest["parts"]:
            part_path = path / part["file"]
            size += part_path.stat().st_size
            data = gzip.decompress(part_path.read_bytes()) if is_gzip else part_path.read_bytes()
            lines.extend(data.splitlines(keepends=True)[:-1])
        return "sorted:" + sorted_digest(lines), size
    h = hashlib.sha256()
    opener = gzip.open if is_gzip else open
    with opener(path, "rb") as f:
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


def first_difference(a: Path, b: Path, b_gzip: bool) -> str:
    opener = gzip.open if b_gzip else open
    with open(a, "rb") as fa, opener(b, "rb") as fb:
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
    parser.add_argument("--store", required=True, help="endpoint of the local S3-compatible server")
    args = parser.parse_args()
    ctx = Context(args)
    rows = ctx.conn.execute("SELECT count(*) FROM events").fetchone()[0]
    found = methods(ctx)
    for r in range(1, args.rounds + 1):
        for m in found:
            elapsed, peak = m.run(ctx, m)
            m.times.append(elapsed)
            m.peaks.append(peak)
            print(f"round {r}/{args.rounds}  {m.name:26s} {elapsed:7.2f} s  backend {peak / 1024:6.1f} MiB", flush=True)

    # The objects, downloaded for the comparison.
    store = store_client(args.store)
    for m in found:
        if m.object_key:
            store.download_file("bench", m.object_key, str(ctx.server_dir / m.output))
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
        path = output_file(ctx, m)
        m.digest, m.size = digest_of(path, m.gzip_output)
        if path.is_dir() and m.digest != ref_sorted:
            failed = True
            print(f"!!! MISMATCH: the parts of {m.name} differ from the reference's lines")
        elif m.ndjson and m.digest != ref_digest:
            failed = True
            print(f"!!! MISMATCH: {m.name} differs from the reference: {first_difference(reference, path, m.gzip_output)}")

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

    def ratio(a, b):
        return statistics.median(next(m for m in found if m.name == a).times) / statistics.median(
            next(m for m in found if m.name == b).times)

    size = {m.name: m.size for m in found}
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
        f"- to S3 (local moto) / to a file, plain: {ratio('to_object', 'to_file'):.2f}; gzip: "
        f"{ratio('to_object_gzip', 'to_file_gzip'):.2f}; a file export then a boto3 upload of it / "
        f"straight to S3, plain: {ratio('to_file_then_upload', 'to_object'):.2f}x")
    targets.append(
        f"- CALL stream_export_chunked / stream_export_to_file, plain: {ratio('chunked', 'to_file'):.2f} (target <= 1.15)")
    targets.append(
        f"- directory export gzip, 1 partition / 2 partitions: {ratio('to_directory_gzip_1', 'to_directory_gzip_2'):.2f}x faster "
        f"with 2 (target >= 1.7 on 2 cores)")
    if any(m.name == "copy_ndjson_psql" for m in found):
        targets.append(f"- psql row_to_json / COPY (FORMAT ndjson) via psql: {ratio('psql_row_to_json', 'copy_ndjson_psql'):.2f}x faster (target >= 2)")
    report = header + "\n" + "\n".join(table) + "\n\nRatios against the targets (same run):\n\n" + "\n".join(targets) + "\n"
    print()
    print(report)
    RESULTS.mkdir(exist_ok=True)
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
