"""Engines, transactions and the schema version.

SQLite (the default, one file per store) gets WAL so readers never block the
writer, a busy timeout so concurrent refcount processes queue instead of
failing, and `BEGIN IMMEDIATE` so a writer takes the write lock when its
transaction starts, not halfway through, where it could deadlock with another.
pysqlite would otherwise emit its own deferred BEGIN; the documented recipe
below turns that off and emits ours.

On PostgreSQL several hosts may write one store, so an flock beside the store
does not serialize them: an engine made by `with_store_lock` takes the store's
advisory lock (`pg_advisory_xact_lock`, keyed by the store's identity) as the
first statement of every write transaction. Everything a writer does to
`index.json` and to blob files happens inside such a transaction, and the
server gives the lock back when the transaction ends, commits or not, or when
its connection dies, so a lost sidecar never leaves the store locked.
Deadlocks and serialization failures come out as `DatabaseContention`;
`retry_contention` runs an operation again a bounded number of times.

`ensure_schema` compares `alembic_version` with `SCHEMA_HEAD` and imports
Alembic only when an upgrade is actually needed, which keeps start-up cheap.

Under `--root` one PostgreSQL database counts every repository, each in a
schema of its own (`make_engine(url, schema=...)`; the names come from
`refcount.roots`). The schema is chosen in one place: an engine event makes
that schema alone the `search_path` of every transaction, so every
unqualified table, the queries, the migrations and Alembic's own
`alembic_version` land there and a table of another schema is never visible.
The schema itself is created by the first `upgrade`, under an advisory lock of
its own (two `CREATE SCHEMA IF NOT EXISTS` at once can still collide in the
catalog). The queries (`refcount.db.repo`), the migrations and the use cases
know nothing of schemas.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import URL, Engine, create_engine, event, func, inspect, make_url, select, text
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.schema import CreateSchema, DropSchema

from refcount.db.repo import Repo
from refcount.db.tables import SCHEMA_HEAD, add_postgresql_options, metadata
from refcount.errors import DatabaseContention, DatabaseError
from refcount.interrupts import deferred
from refcount.layout import default_database

BUSY_TIMEOUT_MS = 60_000
STORE_LOCK = "refcount_store_lock"
"""Execution option: the advisory-lock key every write transaction takes first."""
SCHEMA = "refcount_schema"
"""Execution option: the PostgreSQL schema of the engine's tables (None: the default)."""
SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
"""The schema names accepted: PostgreSQL identifiers that need no quoting."""
CONTENTION_STATES = frozenset({"40001", "40P01"})  # serialization_failure, deadlock_detected
CONTENTION_ATTEMPTS = 5
DEFAULT_DB_ENV = "REFCOUNT_DEFAULT_DB"
"""The database of a store opened without one named (tests point a whole run at
PostgreSQL through it); unset, each store has its SQLite file in `.refcount/`."""

log = logging.getLogger(__name__)
T = TypeVar("T")


def default_url(store: Path) -> str:
    return f"sqlite:///{default_database(store)}"


def environment_url() -> str | None:
    """The database `REFCOUNT_DEFAULT_DB` names for stores opened without one."""
    return os.environ.get(DEFAULT_DB_ENV) or None


def store_lock_key(identity: str) -> int:
    """The advisory-lock key of a store: its identity hashed to a signed 64-bit int."""
    digest = hashlib.sha256(f"refcount-store:{identity}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def with_store_lock(engine: Engine, identity: str) -> Engine:
    """`engine`, whose write transactions on PostgreSQL first take the store's
    advisory lock; on SQLite `engine` itself (one host: the flock serializes)."""
    if engine.dialect.name != "postgresql":
        return engine
    return engine.execution_options(**{STORE_LOCK: store_lock_key(identity)})


def retry_contention(operation: Callable[[], T], what: str) -> T:
    """Run `operation`; run it again (bounded, with jittered backoff, logged) when the
    database aborted it for a deadlock or a serialization failure."""
    for attempt in range(1, CONTENTION_ATTEMPTS + 1):
        try:
            return operation()
        except DatabaseContention as exc:
            if attempt == CONTENTION_ATTEMPTS:
                raise
            log.warning("%s: %s; retrying (%d of %d)", what, exc, attempt, CONTENTION_ATTEMPTS - 1)
            time.sleep(min(0.05 * 2**attempt, 1.0) * random.uniform(0.5, 1.0))
    raise AssertionError("unreachable")


def backend_name(url: str) -> str | None:
    """The database a URL names (`sqlite`, `postgresql`), or None for no valid URL."""
    try:
        return make_url(url).get_backend_name()
    except (SQLAlchemyError, ValueError):
        return None


def make_engine(url: str, *, read_only: bool = False, schema: str | None = None) -> Engine:
    """An engine for `url`; nothing is opened or created until first used.

    `read_only` opens a SQLite file without ever writing to it or beside it
    (for reading commands on a store this process cannot write): SQLite's
    `mode=ro`, and on a read-only file system also `immutable=1`, since a WAL
    database cannot otherwise be opened where its `-shm` file cannot be made.

    `schema` (PostgreSQL only; a name matching SCHEMA_NAME) keeps every table of
    the engine in that schema (see the module docstring); it is created by the
    first `upgrade`. Such an engine keeps at most one idle connection (not five):
    `watch --root` holds an engine per repository, and the server's
    `max_connections` bounds how many repositories one process can watch.
    """
    if schema is not None:
        _check_schema(url, schema)
    try:
        parsed = make_url(url)
        if read_only and parsed.get_backend_name() == "sqlite" and parsed.database:
            parsed = _read_only_sqlite(parsed.database)
        pooling = {} if schema is None else {"pool_size": 1}
        engine = create_engine(parsed, future=True, **pooling)
    except ImportError as exc:
        raise DatabaseError(
            f"{redact_url(url)}: cannot open database: its driver is not installed "
            f"({exc.name or _one_line(exc)}){_install_hint(url)}"
        ) from None
    except (SQLAlchemyError, ValueError) as exc:
        raise DatabaseError(f"{redact_url(url)}: cannot open database: {_one_line(exc)}") from None
    if engine.dialect.name == "sqlite":
        _configure_sqlite(engine, read_only=read_only)
    elif engine.dialect.name == "postgresql":
        add_postgresql_options()
    if schema is not None:
        _search_only(engine, schema)
        return engine.execution_options(**{SCHEMA: schema})
    return engine


def _check_schema(url: str, schema: str) -> None:
    if backend_name(url) != "postgresql":
        raise DatabaseError(
            f"{redact_url(url)}: a schema per repository needs PostgreSQL; "
            "on SQLite each repository keeps its own database"
        )
    if not SCHEMA_NAME.fullmatch(schema):
        raise DatabaseError(f"schema {schema!r}: not a lowercase PostgreSQL identifier")


def _search_only(engine: Engine, schema: str) -> None:
    """Every transaction of `engine` sees `schema` and nothing else (pg_catalog aside).

    Set as the first statement of each transaction, for that transaction only
    (`set_config(..., is_local => true)`), rather than once per session: behind a
    pooler in transaction mode (PgBouncer) consecutive transactions of one
    connection may run on different server sessions, and a session setting would
    then reach another repository's transaction, or another program's.
    """

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        connection.execute(select(func.set_config("search_path", schema, True)))


def schema_lock_key(schema: str) -> int:
    """The advisory-lock key that serializes creating and dropping one schema."""
    digest = hashlib.sha256(f"refcount-schema:{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def drop_schema(url: str, schema: str) -> bool:
    """Drop `schema` and everything in it, if it exists; whether it existed.

    For the schema of a repository that is gone (`watch --root` forgets it): its
    rows are derived from files that no longer exist. The caller makes sure the
    repository is gone; this refuses (DatabaseError, nothing dropped) `public`
    and a schema holding any table refcount did not make.
    """
    _check_schema(url, schema)
    if schema == "public":
        raise DatabaseError("schema public: not a repository's schema; not dropped")
    engine = make_engine(url)
    try:
        with deferred(), engine.begin() as connection:
            connection.execute(select(func.pg_advisory_xact_lock(schema_lock_key(schema))))
            inspector = inspect(connection)
            if not inspector.has_schema(schema):
                return False
            ours = {*metadata.tables, "alembic_version"}
            others = sorted(set(inspector.get_table_names(schema=schema)) - ours)
            if others:
                raise DatabaseError(
                    f"schema {schema}: holds tables refcount did not make "
                    f"({', '.join(others[:3])}); not dropped"
                )
            connection.execute(DropSchema(schema, cascade=True))
        return True
    except SQLAlchemyError as exc:
        raise DatabaseError(f"{redact_url(url)}: drop schema {schema}: {_one_line(exc)}") from None
    finally:
        engine.dispose()


def _install_hint(url: str) -> str:
    return ": pip install 'refcount[postgres]'" if backend_name(url) == "postgresql" else ""


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL (None for another database, or an in-memory one)."""
    try:
        parsed = make_url(url)
    except (SQLAlchemyError, ValueError):
        return None
    database = parsed.database
    if parsed.get_backend_name() != "sqlite" or not database or database == ":memory:":
        return None
    return Path(database.removeprefix("file:").split("?", 1)[0])


def _read_only_sqlite(database: str) -> URL:
    path = Path(database).absolute()
    query = {"mode": "ro", "uri": "true"}
    try:
        if os.statvfs(path.parent).f_flag & os.ST_RDONLY:
            query["immutable"] = "1"
    except OSError:
        pass
    return URL.create("sqlite", database=f"file:{path}", query=query)


def _configure_sqlite(engine: Engine, *, read_only: bool) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we emit BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        if not read_only:
            cursor.execute("PRAGMA journal_mode = WAL")
            cursor.execute("PRAGMA synchronous = NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        mode = connection.get_execution_options().get("refcount_begin", "IMMEDIATE")
        connection.exec_driver_sql(f"BEGIN {mode}")


def _one_line(exc: BaseException) -> str:
    """The driver's own message, first line only (SQLAlchemy appends help links)."""
    text = str(getattr(exc, "orig", None) or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def redact_url(url: str) -> str:
    """A URL safe to print: never show a password."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (SQLAlchemyError, ValueError):
        return "database URL"


@contextmanager
def transaction(engine: Engine, *, write: bool = True) -> Iterator[Repo]:
    """One transaction, yielding a Repo; commits on success, rolls back on error.

    A caller that wants to discard its work (a dry run) calls `repo.rollback()`.

    Opening, commit or rollback, and closing are never cut by an interruption
    (`refcount.interrupts`): one that lands inside SQLAlchemy's pool logs
    "Exception closing connection" with a traceback and may leave a connection
    for the garbage collector. The body is not protected here; an interruption
    there rolls the transaction back. Writers protect theirs (refcount.core).
    """
    stack = ExitStack()
    try:
        try:
            with deferred():
                connection = stack.enter_context(engine.connect())
                if not write and engine.dialect.name == "sqlite":
                    connection = connection.execution_options(refcount_begin="DEFERRED")
                tx = stack.enter_context(connection.begin())
                repo = Repo(connection, tx)
                key = connection.get_execution_options().get(STORE_LOCK)
                if write and key is not None:
                    repo.lock_store(key)
            yield repo
        except BaseException as exc:
            with deferred():
                if not stack.__exit__(type(exc), exc, exc.__traceback__):
                    raise
        else:
            with deferred():
                stack.close()
    except SQLAlchemyError as exc:
        message = f"{redact_url(str(engine.url))}: {_one_line(exc)}"
        if getattr(getattr(exc, "orig", None), "sqlstate", None) in CONTENTION_STATES:
            raise DatabaseContention(message) from None
        raise DatabaseError(message) from None


def current_revision(engine: Engine) -> str | None:
    """The schema revision, or None for a database refcount has not set up yet."""
    database = sqlite_file(str(engine.url))
    if database is not None and not database.exists():
        return None  # the default database file is created by the first command that writes
    try:
        with deferred(), engine.connect() as connection:
            if not inspect(connection).has_table("alembic_version"):
                return None
            return connection.execute(text("SELECT version_num FROM alembic_version")).scalar()
    except SQLAlchemyError as exc:
        raise DatabaseError(f"{redact_url(str(engine.url))}: {_one_line(exc)}") from None


def ensure_schema(engine: Engine) -> None:
    """Bring the database to SCHEMA_HEAD; cheap when it is already there."""
    if current_revision(engine) == SCHEMA_HEAD:
        return
    upgrade(engine)


_MIGRATING = threading.Lock()
"""Alembic's `context` and `op` are module-level proxies to the migration that
runs: two at once in one process (the daemons of `watch --root`, one per
repository, each upgrading its own database on its first reconcile) would run
each other's statements on the wrong database. One migration at a time."""


def upgrade(engine: Engine, revision: str = "head") -> None:
    from alembic import command

    try:
        # A migration is done or not done.
        with _MIGRATING, deferred(), engine.begin() as connection:
            schema = connection.get_execution_options().get(SCHEMA)
            if schema is not None:  # its search_path names it; now it exists
                connection.execute(select(func.pg_advisory_xact_lock(schema_lock_key(schema))))
                connection.execute(CreateSchema(schema, if_not_exists=True))
            config = alembic_config(str(engine.url))
            config.attributes["connection"] = connection
            command.upgrade(config, revision)
    except SQLAlchemyError as exc:
        raise DatabaseError(
            f"{redact_url(str(engine.url))}: migration failed: {_one_line(exc)}"
        ) from None


def alembic_config(url: str) -> Any:
    """Alembic configured in code, so it never depends on the current directory."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def migrations_dir() -> Path:
    packaged = Path(__file__).resolve().parent.parent / "_migrations"
    if packaged.is_dir():
        return packaged
    return Path(__file__).resolve().parents[2] / "migrations"


__all__ = [
    "Engine",
    "alembic_config",
    "backend_name",
    "current_revision",
    "default_url",
    "drop_schema",
    "ensure_schema",
    "environment_url",
    "make_engine",
    "migrations_dir",
    "redact_url",
    "retry_contention",
    "schema_lock_key",
    "sqlite_file",
    "store_lock_key",
    "transaction",
    "upgrade",
    "with_store_lock",
]
