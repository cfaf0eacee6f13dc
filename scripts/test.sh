#!/usr/bin/env bash
# make test: set up, then run the whole suite: formatting, lints, pure Rust
# tests, in-database #[pg_test]s and the end-to-end tests under tests/.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

scripts/setup.sh

echo "==> cargo fmt --check"
cargo fmt --check

echo "==> cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --features pg_test -- -D warnings

echo "==> pure Rust tests"
cargo test --lib unit_tests

echo "==> in-database tests (cargo pgrx test, as postgres)"
pgdata=$(mktemp -d /tmp/pg_stream_export-pgtest.XXXXXX)
chown postgres: "$pgdata"
rmdir "$pgdata"    # pgrx wants to create it itself
trap 'rm -rf "$pgdata"' EXIT
# The test framework writes under target/; postgres must be able to reach it.
cargo pgrx test pg15 --runas postgres --pgdata "$pgdata"

echo "==> end-to-end tests"
cargo pgrx install --release --pg-config "$PG_CONFIG" >/dev/null
.venv/bin/python -m pytest -q tests
