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
	scripts/install.sh

fmt:
	cargo fmt

clippy:
	cargo clippy --all-targets --features pg_test -- -D warnings
	cargo clippy --all-targets --no-default-features --features "pg18 pg_test" -- -D warnings
