"""Key exports are exact on every source, or refused: inheritance parents
whose unique index does not cover their children, views that repeat a key
(UNION ALL, values equal but spelled differently) or hold NULL keys past the
first batch, partitioned tables. Every entry point that walks a key is
checked: stream_export, the directory export and the chunked export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import psycopg
import pytest

from helpers import part_lines


def lines_of(conn, source: str, **options) -> list[str]:
    named = "".join(f", {name} => %s" for name in options)
    return [r[0] for r in conn.execute(
        f"SELECT stream_export(%s, key => 'id', batch_size => 100{named})", [source, *options.values()])]


def expected(conn, source: str) -> list[str]:
    return [r[0] for r in conn.execute(f"SELECT row_to_json(s)::text FROM {source} s ORDER BY id")]


def manifest_lines(directory: Path) -> list[str]:
    manifest = json.loads((directory / "manifest.json").read_text())
    return [line for part in manifest["parts"] for line in part_lines(directory / part["file"])]


def directory_export(conn, source: str, directory: Path) -> list[str]:
    conn.execute("SELECT * FROM stream_export_to_directory(%s, %s, 'id', 2, batch_size => 100)",
                 [source, str(directory)])
    return sorted(manifest_lines(directory), key=lambda line: json.loads(line)["id"])


def chunked_export(conn, source: str, directory: Path) -> list[str]:
    conn.execute("CALL stream_export_chunked(%s, %s, 'id', chunk_rows => 300, batch_size => 100)",
                 [source, str(directory)])
    return manifest_lines(directory)


def fresh_dir(path: Path) -> Path:
    """An empty directory the server owns."""
    shutil.rmtree(path, ignore_errors=True)
    path.mkdir(parents=True)
    for part in (path, *path.parents):
        if part == Path("/tmp"):
            break
        shutil.chown(part, "postgres", "postgres")
    return path


def every_walk(conn, source: str, directory: Path):
    """The lines of each key walk of `source`, by entry point."""
    yield "stream_export", lambda: lines_of(conn, source)
    yield "directory", lambda: directory_export(conn, source, fresh_dir(directory / "dir"))
    yield "chunked", lambda: chunked_export(conn, source, fresh_dir(directory / "chunked"))


@pytest.fixture
def inheritance(conn):
    conn.execute("DROP TABLE IF EXISTS inh_parent CASCADE")
    conn.execute("CREATE TABLE inh_parent (id int PRIMARY KEY, note text)")
    conn.execute("CREATE TABLE inh_child () INHERITS (inh_parent)")
    conn.execute("ALTER TABLE inh_child ADD PRIMARY KEY (id)")
    yield
    conn.execute("DROP TABLE IF EXISTS inh_parent CASCADE")


def test_inheritance_parent_with_repeated_keys_is_refused(conn, server_dir, inheritance):
    # Each table's own primary key holds, but the parent's does not cover
    # the child: 1..1000 are in both (the export used to drop rows at batch
    # boundaries without a word).
    conn.execute("INSERT INTO inh_parent SELECT g, 'parent' FROM generate_series(1, 1000) g")
    conn.execute("INSERT INTO inh_child SELECT g, 'child' FROM generate_series(1, 1000) g")
    for name, walk in every_walk(conn, "inh_parent", server_dir):
        with pytest.raises(psycopg.Error) as err:
            walk()
        assert err.value.sqlstate == "22023", (name, err.value)
        assert "not unique" in str(err.value), (name, err.value)


def test_inheritance_parent_with_unique_keys_is_exact(conn, server_dir, inheritance):
    conn.execute("INSERT INTO inh_parent SELECT g, 'parent' FROM generate_series(1, 2000, 2) g")
    conn.execute("INSERT INTO inh_child SELECT g, 'child' FROM generate_series(2, 2000, 2) g")
    want = expected(conn, "inh_parent")
    assert len(want) == 2000
    for name, walk in every_walk(conn, "inh_parent", server_dir):
        assert walk() == want, name


def test_views_that_repeat_a_key_are_refused(conn, server_dir):
    conn.execute("DROP VIEW IF EXISTS twice, spelled_twice")
    conn.execute("CREATE VIEW twice AS SELECT g AS id FROM generate_series(1, 1000) g "
                 "UNION ALL SELECT g FROM generate_series(1, 1000) g")
    # 1.0 and 1.00 are one value to ORDER BY and >, two to a byte compare.
    conn.execute("CREATE VIEW spelled_twice AS SELECT g::numeric AS id FROM generate_series(1, 1000) g "
                 "UNION ALL SELECT (g::numeric(10, 2)) FROM generate_series(100, 200) g")
    for source in ("twice", "spelled_twice"):
        for name, walk in every_walk(conn, source, server_dir / source):
            with pytest.raises(psycopg.Error) as err:
                walk()
            assert err.value.sqlstate == "22023", (source, name, err.value)


def test_null_keys_past_the_first_batch_are_refused(conn, server_dir):
    # NULL sorts last: with more rows than one batch, the NULL row used to
    # be left out silently.
    conn.execute("DROP VIEW IF EXISTS late_null")
    conn.execute("CREATE VIEW late_null AS SELECT g AS id FROM generate_series(1, 1000) g "
                 "UNION ALL SELECT NULL::int")
    for name, walk in every_walk(conn, "late_null", server_dir):
        with pytest.raises(psycopg.Error) as err:
            walk()
        assert err.value.sqlstate == "22023", (name, err.value)
        assert "NULL" in str(err.value), (name, err.value)
    # A range leaves NULL keys out, as key_from <= key < key_to says.
    in_range = [r[0] for r in conn.execute(
        "SELECT stream_export('late_null', key => 'id', key_from => '1', batch_size => 100)")]
    assert len(in_range) == 1000


def test_partitioned_tables(conn, server_dir):
    conn.execute("DROP TABLE IF EXISTS parted, parted_other CASCADE")
    conn.execute("CREATE TABLE parted (id int PRIMARY KEY, note text) PARTITION BY RANGE (id)")
    conn.execute("CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (MINVALUE) TO (700)")
    conn.execute("CREATE TABLE parted_2 PARTITION OF parted FOR VALUES FROM (700) TO (MAXVALUE)")
    conn.execute("INSERT INTO parted SELECT g, 'row ' || g FROM generate_series(1, 1500) g")
    want = expected(conn, "parted")
    for name, walk in every_walk(conn, "parted", server_dir / "parted"):
        assert walk() == want, name
    # A column unique in each partition but not across them: no proof.
    conn.execute("CREATE TABLE parted_other (id int NOT NULL, part int NOT NULL) PARTITION BY LIST (part)")
    conn.execute("CREATE TABLE parted_other_1 PARTITION OF parted_other FOR VALUES IN (1)")
    conn.execute("CREATE TABLE parted_other_2 PARTITION OF parted_other FOR VALUES IN (2)")
    conn.execute("CREATE UNIQUE INDEX ON parted_other_1 (id)")
    conn.execute("CREATE UNIQUE INDEX ON parted_other_2 (id)")
    conn.execute("INSERT INTO parted_other SELECT g, 1 + g % 2 FROM generate_series(1, 500) g")
    with pytest.raises(psycopg.Error) as err:
        lines_of(conn, "parted_other")
    assert err.value.sqlstate == "22023"
    conn.execute("DROP TABLE parted, parted_other CASCADE")


def test_invalid_unique_index_is_no_proof(server, conn):
    # A failed CREATE UNIQUE INDEX CONCURRENTLY leaves an invalid index
    # that enforces nothing.
    conn.execute("DROP TABLE IF EXISTS half_indexed")
    conn.execute("CREATE TABLE half_indexed (id int NOT NULL)")
    conn.execute("INSERT INTO half_indexed VALUES (1), (1), (2)")
    with pytest.raises(psycopg.Error):
        conn.execute("CREATE UNIQUE INDEX CONCURRENTLY half_indexed_id ON half_indexed (id)")
    assert conn.execute("SELECT indisvalid FROM pg_index WHERE indexrelid = 'half_indexed_id'::regclass"
                        ).fetchone() == (False,)
    with pytest.raises(psycopg.Error) as err:
        lines_of(conn, "half_indexed")
    assert err.value.sqlstate == "22023"
    conn.execute("DROP TABLE half_indexed")
