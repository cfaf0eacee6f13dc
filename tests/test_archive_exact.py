"""What an archive guarantees: it deletes a row only if its line reads back
into an identical row, and it changes nothing it did not export.

Each case here lost, changed or invented data before the checks existed:
foreign keys that cascade (to another table, to the same table) or set
NULL, an inheritance parent whose DELETE takes its children's rows, floats
rounded by the session's extra_float_digits, arrays whose lower bound JSON
cannot carry, a DELETE trigger or rule, a row-level security policy that
lets a role read rows it may not delete, and a condition that gives other
rows each time. Every refusal is checked by SQLSTATE, with the table and
the destination left exactly as they were.
"""

from __future__ import annotations

import json

import psycopg
import pytest

from helpers import listed_part_lines, oracle_lines, sqlstate_of


def archived_lines(conn, table: str) -> list[str]:
    return listed_part_lines(
        conn, "SELECT target, rows FROM stream_export_archive_part WHERE source = %s "
              "ORDER BY finished_at, part", [table])


def error_of(conn, sql: str, params=None) -> psycopg.Error:
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(sql, params)
    return raised.value


def snapshot_of(conn, *tables: str) -> dict[str, list[str]]:
    return {t: oracle_lines(conn, f"SELECT * FROM {t} ORDER BY 1") for t in tables}


@pytest.fixture
def orders(conn):
    """orders, and order lines that reference them with `action`."""
    def make(action: str):
        conn.execute("""
            DROP TABLE IF EXISTS ax_lines, ax_orders CASCADE;
            CREATE TABLE ax_orders (id bigint PRIMARY KEY, placed date NOT NULL);
            INSERT INTO ax_orders SELECT g, date '2020-01-01' + g FROM generate_series(1, 120) g;""")
        conn.execute(f"""
            CREATE TABLE ax_lines (id bigint PRIMARY KEY,
                                   order_id bigint REFERENCES ax_orders ON DELETE {action},
                                   item text);
            INSERT INTO ax_lines SELECT g, 1 + g % 120, 'item ' || g FROM generate_series(1, 600) g;""")
    return make


@pytest.mark.parametrize("action", ["CASCADE", "SET NULL"])
def test_a_parent_whose_references_would_change_is_refused_before_anything_is_written(
        conn, server_dir, orders, action):
    orders(action)
    before = snapshot_of(conn, "ax_orders", "ax_lines")
    e = error_of(conn, "CALL stream_export_archive('ax_orders', %s, 'id', "
                       "condition => $$placed < '2020-03-01'$$, chunk_rows => 20)", [str(server_dir)])
    assert e.sqlstate == "2BP01"
    assert "ax_lines_order_id_fkey" in e.diag.message_primary
    assert "ax_lines" in e.diag.message_primary and f"ON DELETE {action}" in e.diag.message_primary
    assert "first" in e.diag.message_hint
    assert snapshot_of(conn, "ax_orders", "ax_lines") == before
    assert list(server_dir.iterdir()) == []


def test_children_archived_first_let_the_parent_go(conn, server_dir, orders):
    orders("CASCADE")
    old = "placed < '2020-03-01'"
    old_orders = oracle_lines(conn, f"SELECT * FROM ax_orders WHERE {old} ORDER BY id")
    old_lines = oracle_lines(conn, "SELECT * FROM ax_lines WHERE order_id IN "
                                   f"(SELECT id FROM ax_orders WHERE {old}) ORDER BY id")
    kept_lines = oracle_lines(conn, "SELECT * FROM ax_lines WHERE order_id NOT IN "
                                    f"(SELECT id FROM ax_orders WHERE {old}) ORDER BY id")
    d = str(server_dir)
    conn.execute("CALL stream_export_archive('ax_lines', %s, 'id', condition => %s, chunk_rows => 100)",
                 [d, f"order_id IN (SELECT id FROM ax_orders WHERE {old})"])
    conn.execute("CALL stream_export_archive('ax_orders', %s, 'id', condition => %s, chunk_rows => 20)",
                 [d, old])
    assert archived_lines(conn, "ax_lines") == old_lines
    assert archived_lines(conn, "ax_orders") == old_orders
    assert oracle_lines(conn, "SELECT * FROM ax_lines ORDER BY id") == kept_lines


def test_a_self_reference_that_would_cascade_outside_the_archived_rows_is_refused(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_messages;
        CREATE TABLE ax_messages (id int PRIMARY KEY, parent int REFERENCES ax_messages ON DELETE CASCADE,
                                  body text);
        INSERT INTO ax_messages SELECT g, NULL, 'root ' || g FROM generate_series(1, 50) g;
        INSERT INTO ax_messages SELECT g, g - 50, 'reply ' || g FROM generate_series(51, 70) g;""")
    before = snapshot_of(conn, "ax_messages")
    e = error_of(conn, "CALL stream_export_archive('ax_messages', %s, 'id', condition => 'id <= 50')",
                 [str(server_dir)])
    assert e.sqlstate == "2BP01" and "ax_messages_parent_fkey" in e.diag.message_primary
    assert snapshot_of(conn, "ax_messages") == before
    assert list(server_dir.iterdir()) == []
    # A whole thread at once: the replies go with their roots.
    thread = "id IN (1, 51) OR id > 60 OR id BETWEEN 11 AND 20"
    expected = oracle_lines(conn, f"SELECT * FROM ax_messages WHERE {thread} ORDER BY id")
    conn.execute("CALL stream_export_archive('ax_messages', %s, 'id', condition => %s)",
                 [str(server_dir), thread])
    assert archived_lines(conn, "ax_messages") == expected
    assert conn.execute("SELECT count(*) FROM ax_messages").fetchone() == (70 - len(expected),)


def test_the_refusal_names_the_referencing_rows(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_kids, ax_parents;
        CREATE TABLE ax_parents (id int PRIMARY KEY);
        INSERT INTO ax_parents SELECT generate_series(1, 100);
        CREATE TABLE ax_kids (id int PRIMARY KEY, parent int REFERENCES ax_parents ON DELETE CASCADE);
        INSERT INTO ax_kids VALUES (1, 95);""")
    before = snapshot_of(conn, "ax_parents", "ax_kids")
    e = error_of(conn, "CALL stream_export_archive('ax_parents', %s, 'id', chunk_rows => 30)",
                 [str(server_dir)])
    assert e.sqlstate == "2BP01" and "(parent) = '(95)'" in e.diag.message_primary
    assert snapshot_of(conn, "ax_parents", "ax_kids") == before
    assert list(server_dir.iterdir()) == []
    # Rows nothing references archive.
    conn.execute("CALL stream_export_archive('ax_parents', %s, 'id', condition => 'id < 95', chunk_rows => 30)",
                 [str(server_dir)])
    assert conn.execute("SELECT count(*) FROM ax_parents").fetchone() == (6,)


def test_an_inheritance_parent_is_refused_and_its_children_archive_with_their_columns(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_m CASCADE;
        CREATE TABLE ax_m (id int PRIMARY KEY, val int);
        CREATE TABLE ax_mx (sensor text, PRIMARY KEY (id)) INHERITS (ax_m);
        INSERT INTO ax_m VALUES (1, 1);
        INSERT INTO ax_mx VALUES (2, 2, 'thermo');""")
    e = error_of(conn, "CALL stream_export_archive('ax_m', %s, 'id')", [str(server_dir)])
    assert e.sqlstate == "0A000" and "ax_mx" in e.diag.message_primary
    assert conn.execute("SELECT count(*) FROM ax_m").fetchone() == (2,)
    assert list(server_dir.iterdir()) == []
    conn.execute("CALL stream_export_archive('ax_mx', %s, 'id')", [str(server_dir)])
    assert archived_lines(conn, "ax_mx") == ['{"id":2,"val":2,"sensor":"thermo"}']
    assert oracle_lines(conn, "SELECT * FROM ax_m") == ['{"id":1,"val":1}']


def test_floats_are_archived_exactly_whatever_extra_float_digits_says(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_floats;
        CREATE TABLE ax_floats (id int PRIMARY KEY, f8 float8, f4 float4);
        INSERT INTO ax_floats VALUES (1, 0.1::float8 + 0.2, 0.1::float4 + 0.2::float4),
                                     (2, 1e-310, 3.4028235e38), (3, -0.0, 'NaN'), (4, 'Infinity', 1.17549435e-38);""")
    originals = conn.execute("SELECT id, f8, f4 FROM ax_floats ORDER BY id").fetchall()
    conn.execute("SET extra_float_digits = 1")
    expected = oracle_lines(conn, "SELECT * FROM ax_floats ORDER BY id")
    assert '"f8":0.30000000000000004' in expected[0]
    conn.execute("SET extra_float_digits = 0")
    conn.execute("CALL stream_export_archive('ax_floats', %s, 'id')", [str(server_dir)])
    assert conn.execute("SHOW extra_float_digits").fetchone() == ("0",)
    lines = archived_lines(conn, "ax_floats")
    assert lines == expected
    conn.execute("SET extra_float_digits = 1")
    back = [conn.execute("SELECT id, f8, f4 FROM json_populate_record(NULL::ax_floats, %s::json)",
                         [line]).fetchone() for line in lines]
    assert [repr(r) for r in back] == [repr(r) for r in originals]


def test_a_value_json_cannot_carry_stops_the_archive_before_its_chunk_is_deleted(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_arrays;
        CREATE TABLE ax_arrays (id int PRIMARY KEY, a int[]);
        INSERT INTO ax_arrays SELECT g, ARRAY[g, g + 1] FROM generate_series(1, 30) g;
        UPDATE ax_arrays SET a = '[0:2]={1,2,3}' WHERE id = 17;""")
    before = snapshot_of(conn, "ax_arrays")
    e = error_of(conn, "CALL stream_export_archive('ax_arrays', %s, 'id', chunk_rows => 10)",
                 [str(server_dir)])
    assert e.sqlstate == "0A000"
    message = e.diag.message_primary
    assert "id = '17'" in message and 'column "a"' in message and "[0:2]={1,2,3}" in message
    # The chunk before it was archived whole; from the bad chunk on, nothing.
    assert archived_lines(conn, "ax_arrays") == before["ax_arrays"][:10]
    assert oracle_lines(conn, "SELECT * FROM ax_arrays ORDER BY id") == before["ax_arrays"][10:]


def test_a_delete_trigger_or_rule_is_refused_with_an_error_that_is_not_a_retry(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_trig;
        CREATE TABLE ax_trig (id int PRIMARY KEY, keep boolean);
        INSERT INTO ax_trig SELECT g, g % 4 = 0 FROM generate_series(1, 40) g;
        CREATE OR REPLACE FUNCTION ax_skip() RETURNS trigger LANGUAGE plpgsql AS
            $$ BEGIN IF OLD.keep THEN RETURN NULL; END IF; RETURN OLD; END $$;
        CREATE TRIGGER ax_keep_some BEFORE DELETE ON ax_trig FOR EACH ROW EXECUTE FUNCTION ax_skip();""")
    before = snapshot_of(conn, "ax_trig")
    e = error_of(conn, "CALL stream_export_archive('ax_trig', %s, 'id')", [str(server_dir)])
    assert e.sqlstate == "0A000" and "ax_keep_some" in e.diag.message_primary
    assert snapshot_of(conn, "ax_trig") == before and list(server_dir.iterdir()) == []
    conn.execute("""
        DROP TRIGGER ax_keep_some ON ax_trig;
        CREATE TABLE IF NOT EXISTS ax_trig_log (id int);
        CREATE RULE ax_log AS ON DELETE TO ax_trig DO ALSO INSERT INTO ax_trig_log VALUES (OLD.id);""")
    e = error_of(conn, "CALL stream_export_archive('ax_trig', %s, 'id')", [str(server_dir)])
    assert e.sqlstate == "0A000" and "ax_log" in e.diag.message_primary
    assert snapshot_of(conn, "ax_trig") == before and list(server_dir.iterdir()) == []
    # Without it, the same call archives every row.
    conn.execute("DROP RULE ax_log ON ax_trig")
    conn.execute("CALL stream_export_archive('ax_trig', %s, 'id')", [str(server_dir)])
    assert archived_lines(conn, "ax_trig") == before["ax_trig"]


def test_a_policy_that_hides_rows_from_delete_is_a_privilege_error(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_rls;
        CREATE TABLE ax_rls (id int PRIMARY KEY, mine boolean);
        INSERT INTO ax_rls SELECT g, g % 3 <> 0 FROM generate_series(1, 60) g;
        ALTER TABLE ax_rls ENABLE ROW LEVEL SECURITY;
        CREATE POLICY ax_read ON ax_rls FOR SELECT USING (true);
        CREATE POLICY ax_delete_mine ON ax_rls FOR DELETE USING (mine);
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ax_tenant') THEN
                CREATE ROLE ax_tenant LOGIN;
            END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO ax_tenant;
        GRANT SELECT, DELETE ON ax_rls TO ax_tenant;""")
    before = snapshot_of(conn, "ax_rls")
    with psycopg.connect(server.dsn(user="ax_tenant"), autocommit=True) as tenant:
        e = error_of(tenant, "CALL stream_export_archive('ax_rls', %s, 'id')", [str(server_dir)])
    assert e.sqlstate == "42501" and "ax_delete_mine" in e.diag.message_primary
    assert snapshot_of(conn, "ax_rls") == before


def test_a_condition_that_gives_other_rows_each_time_is_not_a_retry(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_random;
        CREATE TABLE ax_random (id int PRIMARY KEY);
        INSERT INTO ax_random SELECT generate_series(1, 400);""")
    e = error_of(conn, "CALL stream_export_archive('ax_random', %s, 'id', condition => 'random() < 0.5')",
                 [str(server_dir)])
    assert e.sqlstate == "55000"
    assert conn.execute("SELECT count(*) FROM ax_random").fetchone() == (400,)


# Every built-in type with awkward values: each must read back exactly.
TYPES = {
    "i2": ("int2", ["-32768", "0", "32767"]),
    "i8": ("int8", ["-9223372036854775808", "9007199254740993"]),
    "num": ("numeric", ["'NaN'", "1.50", "-0.000000000000000000000000001", "1e100", "'Infinity'"]),
    "f4": ("float4", ["'-Infinity'", "1.17549435e-38", "0.1"]),
    "f8": ("float8", ["-0.0", "'NaN'", "4.9e-324", "0.1"]),
    "b": ("boolean", ["true", "false"]),
    "t": ("text", [r"E'tab\tnl\ncr\rquote\"back\\slash\u0001é😀'", "''"]),
    "vc": ("varchar(9)", ["'  pad  '"]),
    "ch": ("char(5)", ["'ab'"]),
    "by": ("bytea", [r"'\x00ff5c22'", "''"]),
    "d": ("date", ["'0044-03-15 BC'", "'infinity'", "'2024-02-29'"]),
    "tm": ("time", ["'23:59:59.999999'"]),
    "ttz": ("timetz", ["'12:00:00+05:30'", "'00:00-14'"]),
    "ts": ("timestamp", ["'4713-01-01 00:00 BC'", "'-infinity'", "'2024-03-10 02:30:00.000001'"]),
    "tstz": ("timestamptz", ["'2024-03-10 02:30:00.5+00'", "'294276-12-31 23:59:59+00'"]),
    "iv": ("interval", ["'-1 year 2 mons -3 days 04:05:06.000007'", "'178000000 years'", "'-1 day +1 hour'"]),
    "u": ("uuid", ["'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11'"]),
    "js": ("json", ["'{ \"a\" : [1, 2.50, -0] , \"a\": null }'", "'\"x\"'"]),
    "jb": ("jsonb", ["'{\"b\": [1, 2.50], \"a\": {\"c\": null}}'"]),
    "a2": ("int[]", ["'{{1,2},{3,NULL}}'", "'{}'"]),
    "ta": ("text[]", ["ARRAY['a,b', NULL, 'NULL', '\"q\"', E'\\\\']"]),
    "rg": ("int4range", ["'[1,5)'", "'empty'"]),
    "tr": ("tstzrange", ["'[2024-01-01 00:00+00,)'"]),
    "mr": ("int4multirange", ["'{[1,3), [5,9)}'"]),
    "ip": ("inet", ["'192.168.0.1/24'", "'::1'"]),
    "cd": ("cidr", ["'10.0.0.0/8'"]),
    "mac": ("macaddr", ["'08:00:2b:01:02:03'"]),
    "pt": ("point", ["'(1.5,-2)'"]),
    "bx": ("box", ["'(1,2),(0,0)'"]),
    "m": ("money", ["'-12.34'"]),
    "bt": ("bit(4)", ["B'1010'"]),
    "vb": ("varbit", ["B'10'"]),
    "tv": ("tsvector", ["'a:1 fat:2 cat''s:3'"]),
    "comp": ("ax_pair", ["ROW(1, 'x y')::ax_pair", "ROW(NULL, NULL)::ax_pair"]),
    "ca": ("ax_pair[]", ["ARRAY[ROW(2, 'z')::ax_pair]"]),
    "en": ("ax_mood", ["'ok'"]),
    "dm": ("ax_positive", ["7"]),
    "oi": ("oid", ["4294967295"]),
}


@pytest.mark.parametrize("settings", [
    {"DateStyle": "SQL, DMY", "TimeZone": "Pacific/Chatham", "IntervalStyle": "sql_standard",
     "extra_float_digits": "-15"},
    {"DateStyle": "German", "TimeZone": "America/St_Johns", "IntervalStyle": "iso_8601",
     "extra_float_digits": "3", "bytea_output": "escape"},
    {"DateStyle": "Postgres, MDY", "TimeZone": "Asia/Kathmandu", "IntervalStyle": "postgres_verbose",
     "extra_float_digits": "1"},
])
def test_every_built_in_type_archives_and_reads_back_exactly(conn, server_dir, settings):
    conn.execute("""
        DROP TABLE IF EXISTS ax_types;
        DROP TYPE IF EXISTS ax_pair CASCADE;
        DROP TYPE IF EXISTS ax_mood CASCADE;
        DROP DOMAIN IF EXISTS ax_positive CASCADE;
        CREATE TYPE ax_pair AS (n int, s text);
        CREATE TYPE ax_mood AS ENUM ('sad', 'ok');
        CREATE DOMAIN ax_positive AS int CHECK (VALUE > 0);
        DELETE FROM stream_export_archive_part WHERE source = 'ax_types';""")
    columns = ", ".join(f"{name} {sql_type}" for name, (sql_type, _) in TYPES.items())
    conn.execute(f"CREATE TABLE ax_types (id int PRIMARY KEY, {columns})")
    rows = max(len(values) for _, values in TYPES.values())
    for i in range(rows + 1):  # the last row is all NULLs
        values = [values[i] if i < len(values) else "NULL" for _, values in TYPES.values()]
        conn.execute(f"INSERT INTO ax_types VALUES ({i + 1}, {', '.join(values)})")
    for name, value in settings.items():
        conn.execute(f"SELECT set_config('{name}', '{value}', false)")
    float_digits = conn.execute("SHOW extra_float_digits").fetchone()[0]
    interval_style = conn.execute("SHOW IntervalStyle").fetchone()[0]
    # An archive writes floats, intervals and money in the forms that read
    # back the same in any session.
    conn.execute("SET extra_float_digits = %s" % max(1, int(float_digits)))
    conn.execute("SET IntervalStyle = postgres")
    conn.execute("SET lc_monetary = 'C'")
    expected = oracle_lines(conn, "SELECT * FROM ax_types ORDER BY id")
    kept = conn.execute("SELECT t::text FROM ax_types t ORDER BY id").fetchall()
    conn.execute(f"SET extra_float_digits = {float_digits}")
    conn.execute(f"SET IntervalStyle = {interval_style}")
    conn.execute("SET lc_monetary = 'C.UTF-8'")
    conn.execute("CALL stream_export_archive('ax_types', %s, 'id', chunk_rows => 3, compression => 'zstd')",
                 [str(server_dir)])
    assert conn.execute("SELECT count(*) FROM ax_types").fetchone() == (0,)
    lines = archived_lines(conn, "ax_types")
    assert lines == expected
    # And back: the lines restore the rows as they were.
    conn.execute("INSERT INTO ax_types SELECT r.* FROM unnest(%s::text[]) l, "
                 "json_populate_record(NULL::ax_types, l::json) r", [lines])
    conn.execute("SET extra_float_digits = %s" % max(1, int(float_digits)))
    conn.execute("SET IntervalStyle = postgres")
    conn.execute("SET lc_monetary = 'C'")
    assert conn.execute("SELECT t::text FROM ax_types t ORDER BY id").fetchall() == kept
    assert all(json.loads(line)["id"] for line in lines)


def test_a_foreign_key_declared_on_a_partition_is_checked(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_plines, ax_porders;
        CREATE TABLE ax_porders (id int PRIMARY KEY);
        INSERT INTO ax_porders SELECT generate_series(1, 10);
        CREATE TABLE ax_plines (id int, order_id int, region text) PARTITION BY LIST (region);
        CREATE TABLE ax_plines_a PARTITION OF ax_plines FOR VALUES IN ('a');
        CREATE TABLE ax_plines_b PARTITION OF ax_plines FOR VALUES IN ('b');
        ALTER TABLE ax_plines_b ADD FOREIGN KEY (order_id) REFERENCES ax_porders ON DELETE CASCADE;
        INSERT INTO ax_plines SELECT g, g, CASE WHEN g % 2 = 0 THEN 'a' ELSE 'b' END FROM generate_series(1, 10) g;""")
    before = snapshot_of(conn, "ax_porders", "ax_plines")
    e = error_of(conn, "CALL stream_export_archive('ax_porders', %s, 'id', condition => 'id <= 5')",
                 [str(server_dir)])
    assert e.sqlstate == "2BP01" and "ax_plines_b" in e.diag.message_primary
    assert snapshot_of(conn, "ax_porders", "ax_plines") == before


def test_a_self_reference_through_a_partitioned_parent_counts_rows_not_keys(conn, server_dir):
    # Keys are unique in the archived partition only: (5, 2) in the other
    # partition is not archived just because a (5, 1) is.
    conn.execute("""
        DROP TABLE IF EXISTS ax_tree;
        CREATE TABLE ax_tree (id int, p int, parent_id int, parent_p int, PRIMARY KEY (id, p),
                              FOREIGN KEY (parent_id, parent_p) REFERENCES ax_tree (id, p) ON DELETE CASCADE)
            PARTITION BY LIST (p);
        CREATE TABLE ax_tree_1 PARTITION OF ax_tree FOR VALUES IN (1);
        CREATE TABLE ax_tree_2 PARTITION OF ax_tree FOR VALUES IN (2);
        CREATE UNIQUE INDEX ON ax_tree_1 (id);
        INSERT INTO ax_tree VALUES (3, 1, NULL, NULL), (5, 1, NULL, NULL), (5, 2, 3, 1);""")
    before = snapshot_of(conn, "ax_tree")
    e = error_of(conn, "CALL stream_export_archive('ax_tree_1', %s, 'id')", [str(server_dir)])
    assert e.sqlstate == "2BP01"
    assert snapshot_of(conn, "ax_tree") == before


def test_rows_the_caller_cannot_see_in_a_referencing_table_stop_the_archive(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_rlines, ax_rorders;
        CREATE TABLE ax_rorders (id int PRIMARY KEY);
        INSERT INTO ax_rorders SELECT generate_series(1, 10);
        CREATE TABLE ax_rlines (id int PRIMARY KEY, order_id int REFERENCES ax_rorders ON DELETE CASCADE,
                                region text);
        INSERT INTO ax_rlines SELECT g, g, CASE WHEN g <= 5 THEN 'eu' ELSE 'us' END FROM generate_series(1, 10) g;
        ALTER TABLE ax_rlines ENABLE ROW LEVEL SECURITY;
        CREATE POLICY ax_eu ON ax_rlines USING (region = 'eu');
        DO $$ BEGIN
            IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'ax_clerk') THEN CREATE ROLE ax_clerk LOGIN; END IF;
        END $$;
        GRANT pg_write_server_files, pg_read_server_files TO ax_clerk;
        GRANT SELECT, DELETE ON ax_rorders TO ax_clerk;
        GRANT SELECT ON ax_rlines TO ax_clerk;""")
    before = snapshot_of(conn, "ax_rorders", "ax_rlines")
    with psycopg.connect(server.dsn(user="ax_clerk"), autocommit=True) as clerk:
        # The clerk sees no line of orders 6..10: the cascade would still
        # remove the hidden 'us' lines.
        e = error_of(clerk, "CALL stream_export_archive('ax_rorders', %s, 'id', condition => 'id > 5')",
                     [str(server_dir)])
    assert e.sqlstate == "42501" and "row-level security" in e.diag.message_primary
    assert snapshot_of(conn, "ax_rorders", "ax_rlines") == before


def test_lines_read_back_the_same_whatever_the_restoring_session_says(server, conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_styles;
        CREATE TABLE ax_styles (id int PRIMARY KEY, iv interval, m money);
        INSERT INTO ax_styles VALUES (1, interval '-1 day -2 hours', 1234.5), (2, interval '1 year -3 mons 4 days', -0.01);""")
    original = conn.execute("SELECT iv::text, m::numeric::text FROM ax_styles ORDER BY id").fetchall()
    conn.execute("SET IntervalStyle = sql_standard")
    conn.execute("SET lc_monetary = 'C.UTF-8'")
    conn.execute("CALL stream_export_archive('ax_styles', %s, 'id')", [str(server_dir)])
    lines = archived_lines(conn, "ax_styles")
    for style in ("postgres", "sql_standard", "iso_8601", "postgres_verbose"):
        with server.connect() as restoring:
            restoring.execute(f"SET IntervalStyle = {style}")
            restoring.execute("SET lc_monetary = 'C'")
            back = restoring.execute(
                "SELECT (r.iv = o.iv), r.m::numeric::text FROM unnest(%s::text[]) WITH ORDINALITY l(line, n) "
                "CROSS JOIN LATERAL json_populate_record(NULL::ax_styles, l.line::json) r "
                "JOIN (VALUES (1, interval '-1 day -2 hours'), (2, interval '1 year -3 mons 4 days')) o(id, iv) "
                "ON o.id = r.id ORDER BY n", [lines]).fetchall()
            assert back == [(True, original[0][1]), (True, original[1][1])], style


def test_an_archive_refuses_session_replication_role_replica(conn, server_dir):
    conn.execute("""
        DROP TABLE IF EXISTS ax_replica;
        CREATE TABLE ax_replica (id int PRIMARY KEY);
        INSERT INTO ax_replica SELECT generate_series(1, 10);""")
    conn.execute("SET session_replication_role = replica")
    try:
        assert sqlstate_of(conn, "CALL stream_export_archive('ax_replica', %s, 'id')", [str(server_dir)]) == "55000"
    finally:
        conn.execute("RESET session_replication_role")
    assert conn.execute("SELECT count(*) FROM ax_replica").fetchone() == (10,)
    assert list(server_dir.iterdir()) == []
