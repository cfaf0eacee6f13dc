# The two commands of the README, and a few helpers.
.PHONY: demo test bench bench-memory setup install fmt clippy

demo:
	scripts/demo.sh

test:
	scripts/test.sh

bench:
	scripts/bench.sh speed

bench-memory:
	scripts/bench.sh memory

setup:
	scripts/setup.sh

install: setup
	cargo pgrx install --release --pg-config /usr/lib/postgresql/15/bin/pg_config

fmt:
	cargo fmt

clippy:
	cargo clippy --all-targets --features pg_test -- -D warnings
