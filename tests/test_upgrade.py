"""Extension upgrades: a database on 0.1.0 updated with ALTER EXTENSION
ends up with exactly the objects of a fresh install of this version."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import PG_BIN, REPO

OLD = "0.1.0"
OLD_SCRIPT = REPO / "tests" / "fixtures" / f"pg_stream_export--{OLD}.sql"


def current_version() -> str:
    for line in (REPO / "Cargo.toml").read_text().splitlines():
        if line.startswith("version = "):
            return line.split('"')[1]
    raise AssertionError("no version in Cargo.toml")


@pytest.fixture(scope="module")
def old_install_script():
    """Put 0.1.0's install script (as 0.1.0 generated it) next to the
    installed extension, for CREATE EXTENSION ... VERSION '0.1.0'."""
    sharedir = subprocess.run([str(PG_BIN / "pg_config"), "--sharedir"], capture_output=True, text=True,
                              check=True).stdout.strip()
    target = Path(sharedir) / "extension" / OLD_SCRIPT.name
    previous = target.read_bytes() if target.exists() else None
    shutil.copyfile(OLD_SCRIPT, target)
    try:
        yield target
    finally:
        if previous is None:
            target.unlink()
        else:
            target.write_bytes(previous)


def extension_objects(conn) -> dict[str, str]:
    """Every member of the extension, with its full definition for functions
    and procedures (arguments, defaults, strictness, volatility, symbol,
    comment) and views (query, comment), and its ACL."""
    rows = conn.execute("""
        SELECT pg_describe_object(d.classid, d.objid, 0),
               CASE WHEN d.classid = 'pg_proc'::regclass
                    THEN pg_get_functiondef(d.objid) || coalesce((SELECT proacl::text FROM pg_proc
                                                                 WHERE oid = d.objid), '')
                         || coalesce(obj_description(d.objid, 'pg_proc'), '')
                    WHEN d.classid = 'pg_class'::regclass
                    THEN coalesce(pg_get_viewdef(d.objid), '') || coalesce((SELECT relacl::text FROM pg_class
                                                                 WHERE oid = d.objid), '')
                         || coalesce(obj_description(d.objid, 'pg_class'), '')
                    ELSE '' END
        FROM pg_depend d
        JOIN pg_extension e ON e.oid = d.refobjid
        WHERE d.refclassid = 'pg_extension'::regclass AND d.deptype = 'e' AND e.extname = 'pg_stream_export'
    """).fetchall()
    return dict(rows)


def test_alter_extension_update_gives_a_fresh_installs_objects(server, old_install_script):
    new = current_version()
    assert new != OLD
    with server.connect(dbname="postgres") as admin:
        for name in ("upgraded", "fresh"):
            admin.execute(f"DROP DATABASE IF EXISTS {name}")
            admin.execute(f"CREATE DATABASE {name}")
    with server.connect(dbname="upgraded") as up, server.connect(dbname="fresh") as fresh:
        up.execute(f"CREATE EXTENSION pg_stream_export VERSION '{OLD}'")
        assert up.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stream_export'"
                          ).fetchone() == (OLD,)
        old_objects = extension_objects(up)
        # The old functions work before the update, on the new library.
        assert up.execute("SELECT stream_export('SELECT 1 AS x')").fetchone() == ('{"x":1}',)
        assert up.execute("SELECT stream_export_bytes('SELECT 1 AS x', chunk_size => 1024)").fetchone() == (
            b'{"x":1}\n',)
        up.execute("ALTER EXTENSION pg_stream_export UPDATE")
        assert up.execute("SELECT extversion FROM pg_extension WHERE extname = 'pg_stream_export'"
                          ).fetchone() == (new,)
        fresh.execute("CREATE EXTENSION pg_stream_export")
        upgraded, installed = extension_objects(up), extension_objects(fresh)
        assert sorted(upgraded) == sorted(installed)
        for name, definition in installed.items():
            assert upgraded[name] == definition, name
        assert upgraded != old_objects  # the update did change something
        # And it works: the new option on the updated database.
        lines = [r[0] for r in up.execute("SELECT stream_export('SELECT 1 AS x', force_array => true)").fetchall()]
        assert lines == ["[", ' {"x":1}', "]"]
    with server.connect(dbname="postgres") as admin:
        admin.execute("DROP DATABASE upgraded")
        admin.execute("DROP DATABASE fresh")
