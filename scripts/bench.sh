#!/usr/bin/env bash
# make bench / make bench-memory: release build, tuned throwaway cluster, the
# events dataset, then bench/run.py (or bench/memory.py with "memory"), then
# the incremental job row (its own table of JOB_N rows, 10 million by
# default). BENCH_ONLY=name,... runs only those methods of bench/run.py;
# BENCH_ONLY=job_increment runs only the job row (without the events table).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
mode=${1:-speed}
N=${N:-2000000}
R=${R:-5}
JOB_N=${JOB_N:-10000000}

# Which parts run: the methods of bench/run.py unless BENCH_ONLY names only
# job_increment; the job row unless BENCH_ONLY leaves it out.
only=${BENCH_ONLY:-}
run_methods=1
run_job=1
if [ -n "$only" ]; then
    others=$(tr ',' '\n' <<<"$only" | grep -vx job_increment || true)
    [ -n "$others" ] || run_methods=0
    tr ',' '\n' <<<"$only" | grep -qx job_increment || run_job=0
fi
report=bench/results/latest.md
[ -z "$only" ] || report=bench/results/latest-only.md
mkdir -p bench/results

scripts/setup.sh
if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    echo "==> installing the plotting library into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt
fi
echo "==> building and installing the extension (release)"
# Installed by rename (new files, not rewritten in place), so that servers
# still running elsewhere keep the library they have mapped.
pkg=$(mktemp -d /tmp/pg_stream_export-pkg.XXXXXX)
cargo pgrx package --pg-config "$PG_CONFIG" --out-dir "$pkg" >/dev/null
(cd "$pkg" && find . -type f) | while read -r f; do
    dest="/${f#./}"
    mkdir -p "$(dirname "$dest")"
    cp "$pkg/$f" "$dest.new.$$" && mv -f "$dest.new.$$" "$dest"
done
rm -rf "$pkg"

# Shared buffers large enough to hold the table (about 300 bytes a row),
# and the job row's table (about 120 bytes a row with its index).
rows_for_memory=$N
[ "$mode" = memory ] && rows_for_memory=10000000
[ "$mode" = memory ] || [ "$run_methods" = 1 ] || rows_for_memory=0
buffers_mb=$(( rows_for_memory * 360 / 1000000 + 512 ))
[ "$mode" = memory ] || [ "$run_job" = 0 ] || buffers_mb=$(( buffers_mb + JOB_N * 120 / 1000000 ))
out=$(mktemp -d /tmp/pg_stream_export-bench.XXXXXX)
trap 'cluster_stop; [ -z "${STORE_PID:-}" ] || kill "$STORE_PID" 2>/dev/null; rm -rf "${CLUSTER_DIR:-}" "$out"' EXIT
store_start "$out"
# Profiles for the stores (moto here, SeaweedFS started by bench/run.py) go
# into these files, which the server reads at every export.
mkdir -p "$out/aws" && touch "$out/aws/config" "$out/aws/credentials" && chmod 644 "$out/aws/"*
CLUSTER_ENV="AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench AWS_REGION=us-east-1 AWS_ENDPOINT_URL=$STORE_ENDPOINT AWS_ALLOW_HTTP=true AWS_CONFIG_FILE=$out/aws/config AWS_SHARED_CREDENTIALS_FILE=$out/aws/credentials"
cluster_start -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c jit=off \
    -c pg_stream_export.progress=5s -c TimeZone=UTC -c shared_buffers=${buffers_mb}MB -c max_wal_size=8GB -c checkpoint_timeout=1h \
    -c shared_preload_libraries=pg_stream_export
mkdir -p "$out/dir1" "$out/dir2" "$out/dirz" "$out/chunked"
chown -R postgres: "$out"
echo "==> cluster in $CLUSTER_DIR on port $PGPORT, shared_buffers ${buffers_mb}MB; outputs in $out"
dsn="host=127.0.0.1 port=$PGPORT user=postgres dbname=postgres"
psql -q -X -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION pg_stream_export' -c 'CREATE EXTENSION pg_prewarm'

if [ "$mode" = memory ]; then
    .venv/bin/python bench/memory.py --dsn "$dsn" --server-dir "$out"
    exit
fi
# The incremental job row: a job on a table of JOB_N rows (one INSERT of
# generate_series, a bigserial key), its first run, then two increments of
# 1,000 new rows each, timed by psql (\timing, the CALL's round trip).
job_bench() {
    local rows=$JOB_N log="$out/job.log"
    mkdir -p "$out/job" && chown postgres: "$out/job"
    echo "==> incremental job: loading $rows rows into job_events"
    psql -q -X -v ON_ERROR_STOP=1 -v rows="$rows" <<'SQL' || return 1
DROP TABLE IF EXISTS job_events;
CREATE TABLE job_events (id bigserial PRIMARY KEY, created_at timestamptz NOT NULL DEFAULT clock_timestamp(),
                         user_id int NOT NULL, kind text NOT NULL, amount numeric(12,2), note text);
INSERT INTO job_events (user_id, kind, amount, note)
SELECT g % 100000, (ARRAY['click','view','purchase','signup','logout','refund'])[1 + g % 6],
       (g % 100000) / 100.0, 'event ' || g || ' of the job benchmark'
FROM generate_series(1, :rows) AS g;
VACUUM (ANALYZE) job_events;
SQL
    psql -q -X -c "SELECT pg_prewarm('job_events')" >/dev/null
    echo "==> incremental job: create, first run, then 1,000 new rows before each of two runs"
    psql -X -v ON_ERROR_STOP=1 -v dir="$out/job" >"$log" 2>&1 <<'SQL' || { cat "$log"; return 1; }
\timing on
\echo step create
SELECT stream_export_job_create('bench', 'job_events', 'id', :'dir', compression => 'zstd');
\echo step first
CALL stream_export_increment('bench');
\echo step insert
INSERT INTO job_events (user_id, kind, note) SELECT g, 'click', 'new ' || g FROM generate_series(1, 1000) AS g;
\echo step second
CALL stream_export_increment('bench');
\echo step insert
INSERT INTO job_events (user_id, kind, note) SELECT g, 'click', 'new ' || g FROM generate_series(1, 1000) AS g;
\echo step third
CALL stream_export_increment('bench');
\echo step end
SQL
    # The time psql printed for each step's statement (the last one before
    # the next "step" line).
    local times
    times=$(awk '/^step /{if (s != "") print s, t; s=$2} /^Time: /{t=$2} END{}' "$log")
    ms() { awk -v s="$1" '$1 == s {print $2}' <<<"$times"; }
    grouped() { sed -e ':a' -e 's/\B[0-9]\{3\}\>/,&/' -e 'ta' <<<"$1"; }
    local parts
    parts=$(psql -X -At -c "SELECT string_agg(rows::text, ', ' ORDER BY part) FROM stream_export_job_part WHERE job = 'bench'")
    [ "$parts" = "$rows, 1000, 1000" ] || { cat "$log"; echo "!!! job parts hold $parts rows, not $rows, 1000, 1000"; return 1; }
    local second third
    second=$(ms second); third=$(ms third)
    {
        echo
        echo "Incremental job (\`make bench\` row job_increment, PostgreSQL $(psql -X -At -c 'SHOW server_version'), $(nproc) cores; zstd parts; timed by psql):"
        echo
        echo "| method | second run | third run | target |"
        echo "|---|---:|---:|---|"
        printf '| incremental job: 1,000 new rows in a %s-row table | %.1f ms | %.1f ms | < 1 s each |\n' \
            "$(grouped "$rows")" "$second" "$third"
        echo
        printf -- '- making the job (one index lookup of the largest key): %.1f ms; its first run (%s rows into part 1): %.1f s\n' \
            "$(ms create)" "$(grouped "$rows")" "$(awk -v t="$(ms first)" 'BEGIN{print t / 1000}')"
    } | tee -a "$report"
}

if [ "$run_methods" = 0 ]; then
    : >"$report"
    job_bench
    echo "written: $report"
    exit
fi
echo "==> loading $N rows into events"
PGOPTIONS='-c TimeZone=UTC' psql -q -X -v ON_ERROR_STOP=1 -v N="$N" -f bench/make_events.sql
psql -q -X -c "SELECT pg_prewarm('events')" >/dev/null
# The cluster export rows: this database is the node "all" (every row), and
# two databases copied from it are nodes "a" and "b" with half the rows
# each (even and odd ids), compacted as if loaded that way.
psql -q -X -v ON_ERROR_STOP=1 -c "ALTER DATABASE postgres SET pg_stream_export.node_id = 'all'"
for node in a b; do
    keep=$([ $node = a ] && echo 0 || echo 1)
    psql -q -X -v ON_ERROR_STOP=1 -c "DROP DATABASE IF EXISTS shard_$node" -c "CREATE DATABASE shard_$node TEMPLATE postgres" \
        -c "ALTER DATABASE shard_$node SET pg_stream_export.node_id = '$node'"
    psql -q -X -v ON_ERROR_STOP=1 -d shard_$node -c "DELETE FROM events WHERE id % 2 <> $keep" \
        -c "VACUUM FULL events" -c "ANALYZE events" -c "SELECT pg_prewarm('events')" >/dev/null
done
status=0
.venv/bin/python bench/run.py --dsn "$dsn" --server-dir "$out" --client-dir "$out" --rounds "$R" --rows "$N" --store "$STORE_ENDPOINT" --aws-dir "$out/aws" || status=$?
if [ "$run_job" = 1 ]; then
    job_bench || status=1
    echo "written: the job row appended to $report"
fi
exit "$status"
