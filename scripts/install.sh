#!/usr/bin/env bash
# make install: build and install the extension (release) into the
# PostgreSQL the scripts work on (15, or PG=18).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh
cargo pgrx install --release --pg-config "$PG_CONFIG"
