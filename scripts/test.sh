#!/usr/bin/env bash
# make test: set up, then run the whole suite: formatting, pure Rust tests,
# and for each PostgreSQL version (PG_VERSIONS="18" for one): lints, then,
# for 15, 16 and 18, in-database #[pg_test]s and the end-to-end tests under
# tests/; 17 is compiled and linted only (headers, no server binaries).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

scripts/setup.sh

echo "==> cargo fmt --check"
cargo fmt --check

echo "==> layers: every dependency points down (ARCHITECTURE.md)"
python3 scripts/check_layers.py

echo "==> pure Rust tests"
cargo test --lib unit_tests

pgdata=""
trap '[ -z "$pgdata" ] || rm -rf "$pgdata"' EXIT
for version in ${PG_VERSIONS:-$PG_TESTED $PG_COMPILED_ONLY}; do
    bin=$(pg_bin_of "$version")
    features=(--no-default-features --features "pg$version pg_test")

    echo "==> PostgreSQL $version: cargo clippy --all-targets -- -D warnings"
    cargo clippy --all-targets "${features[@]}" -- -D warnings
    case " $PG_COMPILED_ONLY " in *" $version "*)
        echo "==> PostgreSQL $version: compiled and linted only (no server binaries here)"
        continue ;;
    esac

    echo "==> PostgreSQL $version: in-database tests (cargo pgrx test, as postgres)"
    pgdata=$(mktemp -d /tmp/pg_stream_export-pgtest.XXXXXX)
    chown postgres: "$pgdata"
    rmdir "$pgdata"    # pgrx wants to create it itself
    # The test framework writes under target/; postgres must be able to reach it.
    cargo pgrx test "pg$version" --runas postgres --pgdata "$pgdata"
    rm -rf "$pgdata"

    echo "==> PostgreSQL $version: end-to-end tests"
    cargo pgrx install --release --pg-config "$bin/pg_config" >/dev/null
    PG_BIN="$bin" .venv/bin/python -m pytest -q tests
done
