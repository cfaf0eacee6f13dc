#!/usr/bin/env bash
# make demo: set up, build and install the extension, start a throwaway
# PostgreSQL (15, or PG=18), load the sample `events` table and export it.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
N=${N:-100000}

scripts/setup.sh
echo "==> building and installing the extension (release)"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null

cluster_start
trap 'cluster_stop; rm -rf "$CLUSTER_DIR"; echo "==> throwaway cluster stopped and removed"' EXIT
echo "==> throwaway $("$PG_BIN/postgres" --version) cluster running in $CLUSTER_DIR on port $PGPORT"

psql -q -X -v ON_ERROR_STOP=1 -c 'CREATE EXTENSION pg_stream_export'
echo "==> loading $N rows into events (bench/make_events.sql)"
psql -q -X -v ON_ERROR_STOP=1 -v N="$N" -c 'SET TimeZone = UTC' -f bench/make_events.sql

echo "==> SELECT stream_export('events') LIMIT 3"
PGOPTIONS='-c TimeZone=UTC' psql -X -At -v ON_ERROR_STOP=1 -c "SELECT stream_export('events') LIMIT 3"

out_dir=target/demo
mkdir -p "$out_dir"
out="$out_dir/events.ndjson"
echo "==> exporting all of events to $out"
start=$EPOCHREALTIME
PGOPTIONS='-c TimeZone=UTC' psql -X -At -v ON_ERROR_STOP=1 -c "SELECT stream_export('events')" >"$out"
end=$EPOCHREALTIME
printf '    %s lines, %s bytes in %.2f s\n' "$(wc -l <"$out")" "$(stat -c %s "$out")" "$(awk -v a="$start" -v b="$end" 'BEGIN{print b-a}')"
python3 -c 'import json,sys; [json.loads(l) for l in open(sys.argv[1], encoding="utf-8")]; print("    every line parses as JSON")' "$out"
echo "==> done: output in $out"
