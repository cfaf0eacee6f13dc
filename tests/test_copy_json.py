"""PostgreSQL 19's COPY spelling on every supported version:
`COPY ... TO ... (FORMAT 'json' [, FORCE_ARRAY])`, and the same array output
from the functions (`force_array => true`).

The oracle is PostgreSQL: every line is `row_to_json(r)::text` of the same
row, and an array parses to what `json_agg` computes.
"""

from __future__ import annotations

import gzip
import json

import psycopg
import pytest

from helpers import oracle_lines
from test_copy import copy_out, function_bytes, loaded

NASTY = '''
    DROP TABLE IF EXISTS nasty_json;
    CREATE TABLE nasty_json (
        id int PRIMARY KEY, t text, n numeric, f float8, ts timestamptz, b bytea,
        j jsonb, arr text[], "Odd ""Name""" int
    );
    INSERT INTO nasty_json VALUES
        (1, E'quote " backslash \\\\ newline \\n tab \\t é 漢 😀', 1.50, 'NaN', '2024-02-29 12:00:00+05:30',
         '\\x00ff', '{"a": [1, null], "b": "\\u0001"}', '{"x,y",NULL,""}', 7),
        (2, NULL, NULL, '-Infinity', 'infinity', NULL, 'null', '{}', NULL),
        (3, '', -0.000, 1e300, '0001-01-01 00:00:00+00 BC', '\\x', '[]', NULL, -1);
'''

SETTINGS = ["SET DateStyle = 'SQL, DMY'; SET TimeZone = 'Asia/Kolkata'; SET extra_float_digits = 0",
            "SET DateStyle = 'ISO'; SET TimeZone = 'UTC'; SET extra_float_digits = 1"]


@pytest.fixture
def nasty(conn):
    loaded(conn)
    conn.execute(NASTY)
    return conn


def as_array(lines: list[str]) -> bytes:
    """PostgreSQL 19's FORCE_ARRAY layout, built from the oracle's lines."""
    body = "".join((" " if i == 0 else ",") + line + "\n" for i, line in enumerate(lines))
    return ("[\n" + body + "]\n").encode()


@pytest.mark.parametrize("settings", SETTINGS)
def test_format_json_is_row_to_json_line_by_line(nasty, settings):
    nasty.execute(settings)
    data, rows = copy_out(nasty, "COPY nasty_json TO STDOUT (FORMAT 'json')")
    expected = oracle_lines(nasty, "SELECT * FROM nasty_json")
    assert rows == 3
    assert data == "".join(line + "\n" for line in expected).encode()
    # Upper case means the same.
    assert copy_out(nasty, "COPY nasty_json TO STDOUT WITH (FORMAT 'JSON')")[0] == data
    # The same bytes as FORMAT ndjson.
    assert copy_out(nasty, "COPY nasty_json TO STDOUT (FORMAT ndjson)")[0] == data


def test_format_json_unquoted_parses_only_before_postgresql_16(nasty):
    """Since 16 the parser reads FORMAT followed by the keyword JSON as the
    SQL/JSON clause, so COPY's unquoted `FORMAT json` is a syntax error
    there before any extension sees the statement (19 changed its grammar).
    `FORMAT 'json'` works on every version, 19 included."""
    statement = "COPY nasty_json TO STDOUT (FORMAT json)"
    if nasty.info.server_version < 160000:
        assert copy_out(nasty, statement)[0] == copy_out(nasty, "COPY nasty_json TO STDOUT (FORMAT 'json')")[0]
    else:
        with pytest.raises(psycopg.errors.SyntaxError):
            copy_out(nasty, statement)


def test_a_column_list_gives_just_those_keys_in_that_order(nasty):
    data, _ = copy_out(nasty, 'COPY nasty_json ("Odd ""Name""", t, id) TO STDOUT (FORMAT \'json\')')
    expected = oracle_lines(nasty, 'SELECT "Odd ""Name""", t, id FROM nasty_json')
    assert data.decode().splitlines() == expected
    assert list(json.loads(data.decode().splitlines()[0])) == ['Odd "Name"', "t", "id"]


@pytest.mark.parametrize("settings", SETTINGS)
def test_force_array_is_postgresql_19s_layout(nasty, settings):
    nasty.execute(settings)
    data, rows = copy_out(nasty, "COPY (SELECT * FROM nasty_json ORDER BY id) TO STDOUT (FORMAT 'json', FORCE_ARRAY)")
    expected = oracle_lines(nasty, "SELECT * FROM nasty_json ORDER BY id")
    assert rows == 3
    assert data == as_array(expected)
    agg = nasty.execute("SELECT json_agg(r ORDER BY id)::text FROM nasty_json r").fetchone()[0]
    assert json.loads(data) == json.loads(agg)
    # FORCE_ARRAY true/false spelled out.
    assert copy_out(nasty, "COPY (SELECT * FROM nasty_json ORDER BY id) TO STDOUT "
                           "(FORMAT 'json', FORCE_ARRAY true)")[0] == data
    plain, _ = copy_out(nasty, "COPY (SELECT * FROM nasty_json ORDER BY id) TO STDOUT (FORMAT 'json', FORCE_ARRAY false)")
    assert plain == "".join(line + "\n" for line in expected).encode()


def test_force_array_of_no_rows_and_one_row(nasty):
    assert copy_out(nasty, "COPY (SELECT 1 AS x WHERE false) TO STDOUT (FORMAT 'json', FORCE_ARRAY)")[0] == b"[\n]\n"
    assert copy_out(nasty, "COPY (SELECT 1 AS x) TO STDOUT (FORMAT 'json', FORCE_ARRAY)")[0] == b'[\n {"x":1}\n]\n'


def test_force_array_combines_with_compression_and_footer(nasty, server_dir):
    target = server_dir / "array.json.gz"
    nasty.execute(f"COPY (SELECT * FROM nasty_json ORDER BY id) TO '{target}' "
                  "(FORMAT 'json', FORCE_ARRAY, COMPRESSION gzip, FOOTER)")
    document = json.loads(gzip.decompress(target.read_bytes()))
    expected = [json.loads(line) for line in oracle_lines(nasty, "SELECT * FROM nasty_json ORDER BY id")]
    assert document[:-1] == expected
    assert document[-1]["_stream_export"]["rows"] == 3
    ok, rows, _, _, detail = nasty.execute("SELECT * FROM stream_export_verify(%s)", [str(target)]).fetchone()
    assert ok and rows == 3, detail
    # STDOUT: the same bytes as the function with the same options.
    packed, _ = copy_out(nasty, "COPY nasty_json TO STDOUT (FORMAT 'json', FORCE_ARRAY, COMPRESSION gzip, FOOTER)")
    assert packed == function_bytes(nasty, "nasty_json", compression="gzip", footer=True, force_array=True)


def test_the_functions_give_the_same_array(nasty, server_dir):
    source = "SELECT * FROM nasty_json ORDER BY id"
    expected = as_array(oracle_lines(nasty, source))
    assert function_bytes(nasty, source, force_array=True) == expected
    lines = [r[0] for r in nasty.execute("SELECT stream_export(%s, force_array => true)", [source]).fetchall()]
    assert ("\n".join(lines) + "\n").encode() == expected
    target = server_dir / "f.json"
    row = nasty.execute("SELECT rows, bytes FROM stream_export_to_file(%s, %s, force_array => true)",
                        [source, str(target)]).fetchone()
    assert row == (3, len(expected) - 2)  # everything but the closing bracket
    assert target.read_bytes() == expected
    # With a footer, the text lines joined verify like the file does.
    footed = [r[0] for r in nasty.execute("SELECT stream_export(%s, force_array => true, footer => true)",
                                          [source]).fetchall()]
    (server_dir / "lines.json").write_text("\n".join(footed) + "\n")
    target = server_dir / "footed.json"
    nasty.execute("SELECT stream_export_to_file(%s, %s, force_array => true, footer => true)", [source, str(target)])
    assert target.read_text() == (server_dir / "lines.json").read_text()
    ok, rows, _, _, detail = nasty.execute("SELECT * FROM stream_export_verify(%s)", [str(target)]).fetchone()
    assert ok and rows == 3, detail


@pytest.mark.parametrize("statement, error", [
    # PostgreSQL 19's errors.
    ("COPY nasty_json TO STDOUT (FORCE_ARRAY)", psycopg.errors.InvalidParameterValue),
    ("COPY nasty_json TO STDOUT (FORMAT csv, FORCE_ARRAY)", psycopg.errors.InvalidParameterValue),
    ("COPY nasty_json TO STDOUT (FORMAT ndjson, FORCE_ARRAY)", psycopg.errors.InvalidParameterValue),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', HEADER)", psycopg.errors.SyntaxError),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', DELIMITER ',')", psycopg.errors.SyntaxError),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', NULL 'x')", psycopg.errors.SyntaxError),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', DEFAULT 'x')", psycopg.errors.SyntaxError),
    ("COPY nasty_json FROM STDIN (FORMAT 'json')", psycopg.errors.FeatureNotSupported),
    # And ours.
    ("COPY nasty_json TO STDOUT (FORMAT 'json', FORCE_ARRAY 'maybe')", psycopg.errors.SyntaxError),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', COMPRESSION lz4)", psycopg.errors.InvalidParameterValue),
    ("COPY nasty_json TO STDOUT (FORMAT 'json', ENCODING 'LATIN1')", psycopg.errors.InvalidParameterValue),
    ("COPY nasty_json FROM PROGRAM 'cat' (FORMAT 'json')", psycopg.errors.FeatureNotSupported),
])
def test_errors(nasty, statement, error):
    with pytest.raises(error):
        copy_out(nasty, statement)
    assert nasty.execute("SELECT 1").fetchone() == (1,)



def test_copy_from_json_has_postgresql_19s_error(nasty):
    with pytest.raises(psycopg.errors.FeatureNotSupported) as err:
        copy_out(nasty, "COPY nasty_json FROM STDIN (FORMAT 'json')")
    assert err.value.diag.message_primary == "COPY FORMAT JSON is not supported for COPY FROM"
