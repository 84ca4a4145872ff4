"""The schema: the Alembic migrations build exactly the ORM models, and refcount
brings every database to head without paying for Alembic when it is already there."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import storekit as sk
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from conftest import Cli
from conftest import Result as Ran
from sqlalchemy import Engine, inspect

import refcount
from refcount.db.engine import (
    alembic_config,
    current_revision,
    ensure_schema,
    make_engine,
    upgrade,
)
from refcount.db.models import SCHEMA_HEAD, Base

TABLES = {
    "alembic_version",
    "blobs",
    "edges",
    "last_used",
    "leases",
    "image_created",
    "index_cuts",
    "mass_frees",
    "meta",
    "pending_actions",
    "roots",
    "verify_findings",
    "verify_runs",
}


@pytest.fixture
def refcount_cli(cli: Cli) -> Cli:
    """The shared in-process CLI fixture (conftest), under this file's name for it."""
    return cli


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """An empty database on each backend: the same revisions run on both."""
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
    else:
        url = f"sqlite:///{tmp_path / 'schema.db'}"
    engine = make_engine(url)
    yield engine
    engine.dispose()


def differences(engine: Engine) -> list[object]:
    """What autogenerate would write to turn the database into Base.metadata."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def test_migrating_an_empty_database_to_head_builds_exactly_the_models(
    engine: Engine,
) -> None:
    upgrade(engine)

    assert set(inspect(engine).get_table_names()) == TABLES
    assert differences(engine) == []
    assert current_revision(engine) == SCHEMA_HEAD


def test_alembic_command_line_migrations_agree_with_the_models_both_ways(engine: Engine) -> None:
    config = alembic_config(str(engine.url))
    command.upgrade(config, "head")
    assert differences(engine) == []

    command.downgrade(config, "base")
    assert set(inspect(engine).get_table_names()) == {"alembic_version"}
    assert current_revision(engine) is None

    command.upgrade(config, "head")
    assert differences(engine) == []


def test_schema_head_names_the_newest_alembic_revision() -> None:
    scripts = ScriptDirectory.from_config(alembic_config("sqlite://"))
    assert scripts.get_heads() == [SCHEMA_HEAD]
    assert scripts.get_current_head() == SCHEMA_HEAD


def test_ensure_schema_is_idempotent(engine: Engine) -> None:
    ensure_schema(engine)
    tables = set(inspect(engine).get_table_names())
    ensure_schema(engine)
    ensure_schema(engine)

    assert current_revision(engine) == SCHEMA_HEAD
    assert set(inspect(engine).get_table_names()) == tables == TABLES
    assert differences(engine) == []
    with engine.connect() as connection:
        versions = connection.exec_driver_sql("SELECT version_num FROM alembic_version").all()
    assert versions == [(SCHEMA_HEAD,)]


@pytest.mark.sqlite_only(
    "a never-created SQLite file; a PostgreSQL run hands out migrated databases"
)
def test_db_current_on_a_fresh_store_says_there_is_no_schema_yet(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")

    ran = refcount_cli("--store", store, "db", "current")

    assert (ran.code, ran.err) == (0, "")
    assert ran.out.startswith("none")
    assert "refcount init" in ran.out


@pytest.mark.sqlite_only("the SQLite file in .refcount/")
def test_db_upgrade_brings_the_store_database_to_head_and_db_current_prints_it(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")

    upgraded = refcount_cli("--store", store, "db", "upgrade")
    current = refcount_cli("--store", store, "db", "current")
    again = refcount_cli("--store", store, "db", "upgrade")

    assert (upgraded.code, upgraded.err) == (0, "")
    assert SCHEMA_HEAD in upgraded.out
    assert (current.code, current.out, current.err) == (0, f"{SCHEMA_HEAD}\n", "")
    assert (again.code, again.err) == (0, "")
    assert (store / ".refcount" / "refcount.db").is_file()


@pytest.mark.sqlite_only("the SQLite file in .refcount/")
def test_db_commands_follow_the_db_option_to_another_database(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"

    assert refcount_cli("--store", store, "--db", url, "db", "upgrade").code == 0

    assert not (store / ".refcount" / "refcount.db").exists()
    assert refcount_cli("--store", store, "--db", url, "db", "current").out == f"{SCHEMA_HEAD}\n"
    assert refcount_cli("--store", store, "db", "current").out.startswith("none")


def test_init_migrates_a_fresh_database_to_head(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")

    assert refcount_cli("--store", store, "init").code == 0

    assert refcount_cli("--store", store, "db", "current").out == f"{SCHEMA_HEAD}\n"


def _alembic_imported_by_open(store: Path) -> bool:
    code = (
        "import sys, refcount\n"
        f"with refcount.open({str(store)!r}) as rc:\n"
        "    rc.sync()\n"
        "print('alembic' in sys.modules)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFCOUNT_")}
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, check=False
    )
    assert (proc.returncode, proc.stderr) == (0, ""), proc
    return {"True\n": True, "False\n": False}[proc.stdout]


def test_opening_a_store_already_at_head_does_not_import_alembic(tmp_path: Path) -> None:
    store = sk.make_layout(tmp_path / "store")
    # The first open must migrate, and so imports Alembic: the probe can see it.
    assert _alembic_imported_by_open(store) is True
    with refcount.open(store) as rc:
        rc.init()

    assert _alembic_imported_by_open(store) is False


def _garbage_database(tmp_path: Path) -> str:
    path = tmp_path / "not-a-database.db"
    path.write_bytes(b"this is not an SQLite database, it is plain text\n" * 100)
    return f"sqlite:///{path}"


def _missing_directory_database(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'no' / 'such' / 'dir' / 'refcount.db'}"


@pytest.mark.parametrize("make_url", [_garbage_database, _missing_directory_database])
def test_a_database_that_cannot_be_opened_is_reported_in_one_line_naming_it(
    tmp_path: Path, refcount_cli: Callable[..., Ran], make_url: Callable[[Path], str]
) -> None:
    store = sk.make_layout(tmp_path / "store")
    url = make_url(tmp_path)
    before = sk.listing(store)

    ran = refcount_cli("--store", store, "--db", url, "init")

    assert ran.code == 2
    assert ran.out == ""
    assert len(ran.err.splitlines()) == 1, ran.err
    assert ran.err.startswith("refcount: error: ") and url in ran.err
    assert sk.listing(store) == before


def test_db_current_on_a_file_that_is_not_a_database_is_an_error_not_an_empty_schema(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")
    url = _garbage_database(tmp_path)

    ran = refcount_cli("--store", store, "--db", url, "db", "current")

    assert ran.code == 2, ran
    assert not ran.out.startswith("none")
    assert len(ran.err.splitlines()) == 1 and url in ran.err


# The first release of the schema (revision 0001), as committed in the history.
FIRST_RELEASE = "b2d017c"


def _first_release(tmp_path: Path) -> Path:
    """refcount and its migrations as of FIRST_RELEASE, unpacked from git."""
    root = Path(__file__).resolve().parents[1]
    git = shutil.which("git")
    if git is None or not (root / ".git").exists():
        pytest.skip("needs a git checkout to fetch the first release's code")
    archive = tmp_path / "first.tar"
    proc = subprocess.run(
        [
            git,
            "-C",
            str(root),
            "archive",
            "-o",
            str(archive),
            FIRST_RELEASE,
            "refcount",
            "migrations",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        pytest.skip(f"commit {FIRST_RELEASE} is not in this checkout: {proc.stderr.strip()}")
    target = tmp_path / "first"
    with tarfile.open(archive) as tar:
        tar.extractall(target, filter="data")
    return target


def _run_first_release(code: Path, store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFCOUNT_")}
    env["PYTHONPATH"] = str(code)
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=code,
        check=False,
    )


@pytest.mark.sqlite_only("the first release kept its counts in a SQLite file")
def test_a_store_indexed_by_the_first_release_keeps_its_counts_after_the_upgrade(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    code = _first_release(tmp_path)
    store = sk.make_layout(tmp_path / "store")
    ma = sk.add_image(store, [b"L0", b"L1"], tag="a", config=b'{"name":"a"}')
    mb = sk.add_image(store, [b"L0", b"L2"], tag="b", config=b'{"name":"b"}')
    sk.add_image(store, [b"L0", b"L3"], tag="c", config=b'{"name":"c"}')
    first = _run_first_release(code, store, "init")
    assert first.returncode == 0, first
    first = _run_first_release(code, store, "--json", "delete", "tag", "c")
    assert first.returncode == 0, first
    assert _run_first_release(code, store, "db", "current").stdout == "0001\n"

    verify = refcount_cli("--store", store, "verify")
    assert verify.code == 0, verify
    assert refcount_cli("--store", store, "db", "current").out == f"{SCHEMA_HEAD}\n"
    with refcount.open(store) as rc:
        everything = sk.blob_files(store)
        assert {d: rc.count(d) for d in everything} == sk.expected_counts(store)

    deleted = refcount_cli("--store", store, "--json", "delete", "tag", "a")
    assert deleted.code == 0, deleted
    freed = {b["digest"] for b in json.loads(deleted.out)["freed"]}
    h = sk.sha256_digest
    assert freed == {ma["digest"], h(b'{"name":"a"}'), h(b"L1")}
    assert sk.blob_files(store) == {mb["digest"], h(b'{"name":"b"}'), h(b"L0"), h(b"L2")}
    assert refcount_cli("--store", store, "verify").code == 0


@pytest.mark.parametrize(
    ("row", "table", "model"),
    [
        ("BlobRow", "blobs", "Blob"),
        ("RootRow", "roots", "Root"),
        ("EdgeRow", "edges", "Edge"),
    ],
)
def test_the_typed_rows_and_orm_classes_name_exactly_the_tables_columns(
    row: str, table: str, model: str
) -> None:
    """The schema is defined once (tables.py); the typed rows across the Repo seam and
    the ORM classes for library users restate it for mypy, and must not drift."""
    from dataclasses import fields

    from refcount.db import models, repo, tables

    columns = [c.name for c in getattr(tables, table).columns]
    assert [f.name for f in fields(getattr(repo, row))] == columns
    assert list(getattr(models, model).__annotations__) == columns


def test_the_problem_index_is_partial_on_postgresql_without_loading_its_dialect_on_sqlite() -> None:
    """The PostgreSQL WHERE of ix_blobs_problem (as migration 0003 builds it) is in the
    metadata once a PostgreSQL engine is made, and a SQLite engine never imports that
    dialect. A fresh process, since other tests load it."""
    probe = (
        "import sys\n"
        "from sqlalchemy.schema import CreateIndex\n"
        "from refcount.db.engine import make_engine\n"
        "from refcount.db.tables import blobs\n"
        "make_engine('sqlite://')\n"
        "print('sqlalchemy.dialects.postgresql' in sys.modules)\n"
        "engine = make_engine('postgresql+psycopg://nobody@127.0.0.1/none')\n"
        "(index,) = [i for i in blobs.indexes if i.name == 'ix_blobs_problem']\n"
        "print(CreateIndex(index).compile(dialect=engine.dialect))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded, ddl = done.stdout.strip().splitlines()
    assert loaded == "False"
    assert ddl == "CREATE INDEX ix_blobs_problem ON blobs (problem) WHERE problem IS NOT NULL"
