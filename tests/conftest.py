"""Shared fixtures: a fresh OCI layout, and the CLI run in-process through its error boundary.

`REFCOUNT_TEST_DB=postgresql` runs every test on the local PostgreSQL server: each
test gets a schema of its own (in one database for the run, migrated to head,
dropped afterwards), named to the library, the CLI and every subprocess through
`REFCOUNT_DEFAULT_DB`. Tests marked `sqlite_only` are skipped then (each says why).
Tests marked `no_database` never open a store's database (scripts/test.sh leaves
them out of its PostgreSQL pass); they are given one that cannot be opened.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from storekit import make_layout

from refcount.cli import main
from refcount.db.engine import DEFAULT_DB_ENV
from refcount.store import Store

MKSTORE = Path(__file__).resolve().parent.parent / "scripts" / "mkstore.py"

SEVERAL_STORES = (
    "counts several stores in one test; a PostgreSQL run gives a test one database, "
    "and a database counts one store"
)
MODULE_STORE = (
    "indexes one store for the whole module; a PostgreSQL run gives each test a "
    "database of its own, where that store is not indexed"
)
ON_POSTGRESQL = os.environ.get("REFCOUNT_TEST_DB", "sqlite") == "postgresql"
NO_DATABASE_URL = "no_database://a-test-marked-no-database-opened-a-store-database"

# Timing health checks and deadlines measure the machine, not the code: on two
# busy cores they fail at random. Property tests judge behaviour only.
settings.register_profile("refcount", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("refcount")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not ON_POSTGRESQL:
        return
    for item in items:
        marker = item.get_closest_marker("sqlite_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "SQLite-specific"
            item.add_marker(pytest.mark.skip(reason=f"sqlite_only: {why}"))


@pytest.fixture(scope="session")
def _run_schemas() -> Iterator[Any]:
    """On a PostgreSQL run: the maker of the tests' schemas, in a database of the run."""
    if not ON_POSTGRESQL:
        yield None
        return
    import pgkit

    from refcount.db.engine import make_engine, upgrade

    def migrate(url: str) -> None:
        engine = make_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()

    user, why = pgkit.reachable_user()
    if user is None:
        pytest.exit(f"REFCOUNT_TEST_DB=postgresql, but the server is unreachable ({why})", 2)
    with pgkit.fresh_database(user) as url:
        maker = pgkit.SchemaMaker.record(user, url.rsplit("/", 1)[1], migrate)
        try:
            yield maker
        finally:
            maker.close()


@contextmanager
def _in_a_fresh_schema(request: pytest.FixtureRequest) -> Iterator[None]:
    """Stores opened without naming a database count in a new schema of the run's
    PostgreSQL database, dropped on leaving."""
    maker = request.getfixturevalue("_run_schemas")
    with maker.fresh() as url, pytest.MonkeyPatch.context() as mp:
        mp.setenv(DEFAULT_DB_ENV, url)
        yield


@pytest.fixture(autouse=True)
def _database_of_the_test(request: pytest.FixtureRequest) -> Iterator[None]:
    """The database of every store the test opens without naming one.

    On a PostgreSQL run, a schema of the test's own. A `no_database` test gets a URL
    that cannot be opened, on either run, so the marker cannot go stale: a test that
    opens a store's default database fails, naming the marker. (A MonkeyPatch of its
    own: a test's `monkeypatch.undo()` must not take the database away mid-test.)
    """
    if request.node.get_closest_marker("no_database"):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv(DEFAULT_DB_ENV, NO_DATABASE_URL)
            yield
        return
    if not ON_POSTGRESQL or request.node.get_closest_marker("sqlite_only"):
        yield
        return
    with _in_a_fresh_schema(request):
        yield


AnotherDatabase = Callable[[], AbstractContextManager[None]]


@pytest.fixture
def another_database(request: pytest.FixtureRequest) -> AnotherDatabase:
    """`with another_database():` the stores opened inside count in a database of their
    own, for a test that opens a second store beside its own (on SQLite each store has
    its file anyway; on PostgreSQL it is a fresh schema, dropped on leaving)."""

    @contextmanager
    def scope() -> Iterator[None]:
        if not ON_POSTGRESQL:
            yield
            return
        with _in_a_fresh_schema(request):
            yield

    return scope


@pytest.fixture(scope="session")
def pg_user() -> str:
    """A user of the local PostgreSQL server (skips the test when it is unreachable)."""
    import pgkit

    user, why = pgkit.reachable_user()
    if user is None:
        pytest.skip(f"PostgreSQL is not reachable at {pgkit.HOST}:{pgkit.PORT} ({why})")
    return user


@pytest.fixture
def pg_url(pg_user: str) -> Iterator[str]:
    """A fresh, empty PostgreSQL database for one test; dropped afterwards."""
    import pgkit

    with pgkit.fresh_database(pg_user) as url:
        yield url


def sql_on_the_test_database(sql: str, *args: object) -> list[tuple[Any, ...]]:
    """On a PostgreSQL run: one statement (`?` placeholders, as sqlite3 takes them) on the
    test's schema, behind refcount's back, for the tests that otherwise read or tamper
    with a store's SQLite file."""
    import pgkit

    return pgkit.sql(os.environ[DEFAULT_DB_ENV], sql.replace("?", "%s"), *args)


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


def direct_env(**extra: str) -> dict[str, str]:
    """The environment of a CLI subprocess that works on the database itself, not
    through a daemon. Read at each call: on a PostgreSQL run, REFCOUNT_DEFAULT_DB
    names the test's schema only once the test has started (a copy made at import
    would send the subprocess to a SQLite file of its own)."""
    return {**os.environ, "REFCOUNT_NO_DAEMON": "1", **extra}


@pytest.fixture
def rewrites(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The byte length of each rewrite of index.json, in order (Store.replace_index
    still does the work)."""
    calls: list[int] = []
    original: Callable[..., Any] = Store.replace_index

    def counted(self: Store, data: bytes | Sequence[bytes | memoryview], expected: str) -> str:
        calls.append(len(data) if isinstance(data, bytes) else sum(len(p) for p in data))
        return str(original(self, data, expected))

    monkeypatch.setattr(Store, "replace_index", counted)
    return calls


@pytest.fixture(scope="session")
def templates(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Three small distinct layouts made by scripts/mkstore.py (copy before changing one)."""
    base = tmp_path_factory.mktemp("templates")
    made = []
    for seed, images in ((1, 3), (2, 4), (3, 2)):
        out = base / f"t{seed}"
        subprocess.run(
            [
                sys.executable,
                MKSTORE,
                str(out),
                "--images",
                str(images),
                "--layers",
                "2",
                "--seed",
                str(seed),
            ],
            check=True,
            capture_output=True,
        )
        made.append(out)
    return made


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty OCI image layout."""
    return make_layout(tmp_path / "store")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `refcount ARGS...` in-process; returns its exit code and what it printed."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        root = logging.getLogger()
        handlers = root.handlers[:]
        try:
            code = main([str(a) for a in args])
        finally:
            # main() logs to this test's captured stderr: a later test must not
            # log into it once it is closed.
            root.handlers[:] = handlers
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
