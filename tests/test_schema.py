"""The schema: the Alembic migrations build exactly the ORM models, and refcount
brings every database to head without paying for Alembic when it is already there."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import storekit as sk
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, inspect

import refcount
from refcount.cli import main
from refcount.db.engine import (
    alembic_config,
    current_revision,
    ensure_schema,
    make_engine,
    upgrade,
)
from refcount.db.models import SCHEMA_HEAD, Base

TABLES = {"alembic_version", "blobs", "edges", "meta", "pending_actions", "roots"}


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


@pytest.fixture
def refcount_cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Ran]:
    def invoke(*args: str | Path) -> Ran:
        capsys.readouterr()
        code = main([str(a) for a in args])
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return invoke


@pytest.fixture
def engine(tmp_path: Path) -> Iterator[Engine]:
    engine = make_engine(f"sqlite:///{tmp_path / 'schema.db'}")
    yield engine
    engine.dispose()


def differences(engine: Engine) -> list[object]:
    """What autogenerate would write to turn the database into Base.metadata."""
    with engine.connect() as connection:
        context = MigrationContext.configure(
            connection, opts={"compare_type": True, "compare_server_default": True}
        )
        return list(compare_metadata(context, Base.metadata))


def test_migrating_an_empty_sqlite_database_to_head_builds_exactly_the_models(
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


def test_db_current_on_a_fresh_store_says_there_is_no_schema_yet(
    tmp_path: Path, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")

    ran = refcount_cli("--store", store, "db", "current")

    assert (ran.code, ran.err) == (0, "")
    assert ran.out.startswith("none")
    assert "refcount init" in ran.out


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
        "    rc.count('sha256:' + '0' * 64)\n"
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
