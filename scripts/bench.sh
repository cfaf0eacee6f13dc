#!/usr/bin/env bash
# make bench / make bench-memory: release build, tuned throwaway cluster, the
# events dataset, then bench/run.py (or bench/memory.py with "memory").
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
mode=${1:-speed}
N=${N:-2000000}
R=${R:-5}

scripts/setup.sh
if ! .venv/bin/python -c 'import matplotlib' 2>/dev/null; then
    echo "==> installing the plotting library into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r bench/requirements.txt
fi
echo "==> building and installing the extension (release)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null

# Shared buffers large enough to hold the table (about 300 bytes a row).
rows_for_memory=$N
[ "$mode" = memory ] && rows_for_memory=10000000
buffers_mb=$(( rows_for_memory * 360 / 1000000 + 512 ))
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
.venv/bin/python bench/run.py --dsn "$dsn" --server-dir "$out" --client-dir "$out" --rounds "$R" --rows "$N" --store "$STORE_ENDPOINT" --aws-dir "$out/aws"
