"""stream_export through real clients: psql and psycopg."""

import json

import psycopg


def oracle(conn, from_item: str) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT row_to_json(r)::text FROM {from_item} r ORDER BY 1")]


def test_psql_lines_equal_row_to_json(server, conn):
    conn.execute("""
        DROP TABLE IF EXISTS e2e_sample;
        CREATE TABLE e2e_sample AS
        SELECT g AS id, 'line ' || g || E' \\\\ "q" \\n é' AS note, g * 1.5 AS x
        FROM generate_series(1, 5000) g
    """)
    out = server.psql("-At", "-c", "SELECT stream_export('e2e_sample')").stdout.decode()
    lines = out.splitlines()
    assert len(lines) == 5000
    for line in lines:
        json.loads(line)
    assert sorted(lines) == oracle(conn, "e2e_sample")


def test_psycopg_streams_query_rows(conn):
    query = "SELECT g AS n, repeat('x', g % 7) AS s FROM generate_series(1, 20000) g"
    with conn.cursor() as cur:
        rows = [r[0] for r in cur.execute("SELECT stream_export(%s)", [query])]
    assert sorted(rows) == oracle(conn, f"({query})")


def test_unknown_table_sqlstate(conn):
    import psycopg
    try:
        conn.execute("SELECT stream_export('no_such_table_e2e')")
    except psycopg.errors.UndefinedTable as err:
        assert err.sqlstate == "42P01"
        assert "no_such_table_e2e" in str(err)
    else:
        raise AssertionError("expected 42P01")


def test_a_non_utf8_database_is_refused(server):
    with psycopg.connect(server.dsn("postgres"), autocommit=True) as c:
        c.execute("DROP DATABASE IF EXISTS latin1_db")
        c.execute("CREATE DATABASE latin1_db ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0")
    with psycopg.connect(server.dsn("latin1_db"), autocommit=True) as c:
        c.execute("CREATE EXTENSION pg_stream_export")
        try:
            c.execute("SELECT stream_export('SELECT 1 AS x')").fetchall()
        except psycopg.Error as err:
            assert err.sqlstate == "0A000"
            assert "UTF8" in str(err)
        else:
            raise AssertionError("a LATIN1 database must be refused")
