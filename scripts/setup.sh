#!/usr/bin/env bash
# Install everything the build, the demo and the tests need, skipping what is
# already there: Debian packages, cargo-pgrx at the pinned version, the pgrx
# configuration for Debian's PostgreSQL 15, and the Python test client.
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

# --- pgrx init against Debian's PostgreSQL 15 ---------------------------------
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if ! grep -qs "^pg15 = \"$PG_CONFIG\"" "$pgrx_config"; then
    step "cargo pgrx init --pg15=$PG_CONFIG"
    cargo pgrx init --pg15="$PG_CONFIG"
else
    step "pgrx configured for $PG_CONFIG"
fi

# --- Python client for the end-to-end tests -----------------------------------
if [ ! -x .venv/bin/python ] || ! .venv/bin/python -c 'import pytest, psycopg' 2>/dev/null; then
    step "creating .venv with pytest and psycopg"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
else
    step "Python test client present"
fi
