"""The local PostgreSQL server for tests: reach it (starting it once when it is
down), and give a test a database, or a schema, of its own, dropped afterwards.

The server is 127.0.0.1:5432 with trust authentication (user postgres or root,
maintenance database `test`). `REFCOUNT_TEST_DB=postgresql` runs every
database-backed test on it (conftest.py), each in a schema of its own inside one
database for the run (`SchemaMaker`); tests/test_postgres.py and
tests/test_pg_concurrency.py always do, each test in a database of its own
(`fresh_database`).

Why schemas for the whole-suite run: a `CREATE DATABASE` copies the template's
catalogs (megabytes of WAL) and a `DROP DATABASE` waits for a checkpoint, together
0.3 to 3 s a test on a busy machine, which is most of a PostgreSQL pass of over a
thousand tests; a schema is made and dropped in about a tenth of that.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

HOST, PORT, MAINTENANCE_DB = "127.0.0.1", 5432, "test"
USERS = ("postgres", "root")
PREFIX = "refcount_t_"
READS = frozenset({"SELECT", "SHOW"})  # what a migration asks the server, left out of a replay


def psycopg() -> Any:
    import psycopg as driver

    return driver


def connect(user: str, dbname: str = MAINTENANCE_DB) -> Any:
    return psycopg().connect(
        host=HOST, port=PORT, user=user, dbname=dbname, autocommit=True, connect_timeout=3
    )


def find_user() -> tuple[str | None, str]:
    """A user the server lets in, or None and why not (each user's first error line)."""
    errors = []
    for user in USERS:
        try:
            with connect(user):
                return user, ""
        except psycopg().Error as exc:
            errors.append(f"{user}: {str(exc).strip().splitlines()[0]}")
    return None, "; ".join(errors)


def start_server() -> None:
    """One attempt to start the local cluster (no systemd in containers)."""
    pg_ctlcluster = shutil.which("pg_ctlcluster")
    versions = sorted(os.listdir("/etc/postgresql")) if os.path.isdir("/etc/postgresql") else []
    if pg_ctlcluster is None or not versions:
        return
    subprocess.run(
        [pg_ctlcluster, "--skip-systemctl-redirect", versions[-1], "main", "start"],
        capture_output=True,
        check=False,
        timeout=60,
    )


def reachable_user() -> tuple[str | None, str]:
    user, why = find_user()
    if user is None:
        start_server()
        user, why = find_user()
    return user, why


def url_of(user: str, name: str) -> str:
    return f"postgresql+psycopg://{user}@{HOST}:{PORT}/{name}"


@contextmanager
def fresh_database(user: str, template: str | None = None) -> Iterator[str]:
    """The URL of a new database (a copy of `template`, else empty); dropped after,
    even while a daemon the test started is still connected to it."""
    name = f"{PREFIX}{secrets.token_hex(6)}"
    copy = f' TEMPLATE "{template}"' if template else ""
    with connect(user) as admin:
        admin.execute(f'CREATE DATABASE "{name}"{copy}')
    try:
        yield url_of(user, name)
    finally:
        with connect(user) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class SchemaMaker:
    """Schemas migrated to head inside one database, one per test.

    Alembic migrates one schema once (`record`), and the statements it sent are
    replayed in one transaction for every new schema: the same tables, indexes and
    rows as a migration, without a migration's cost for each test. A schema's URL
    sets the connection's `search_path` to it (so the library, the CLI and every
    subprocess see only its tables) and its `application_name` to its name (so the
    connections a test left behind, a daemon's included, are found and ended
    before the schema is dropped).

    The tests' connections commit with `synchronous_commit = off`: a commit does not
    wait for the server's WAL flush. That only weakens what a crash of the *server*
    keeps (the last commits, never consistency), and no test crashes the server; the
    crash tests kill refcount's processes and connections, which stay exact. On a
    busy disk the flush is most of a small transaction's time.
    """

    def __init__(self, user: str, database: str, script: str) -> None:
        self.user, self.database, self.script = user, database, script
        self.admin = connect(user, database)
        self.admin.execute("SET synchronous_commit = off")

    @staticmethod
    def url(user: str, database: str, schema: str) -> str:
        options = f"-csearch_path%3D{schema}%20-csynchronous_commit%3Doff"
        return f"{url_of(user, database)}?options={options}&application_name={schema}"

    @classmethod
    def record(cls, user: str, database: str, migrate: Any) -> SchemaMaker:
        """Run `migrate(url)` on a scratch schema of `database`, keeping the statements
        that change it (its reads of the catalog are left out), then drop it."""
        from sqlalchemy import event
        from sqlalchemy.engine import Engine

        sent: list[str] = []

        def keep(_conn: Any, _cursor: Any, statement: str, params: Any, *_: Any) -> None:
            if statement.split(None, 1)[0].upper() not in READS:
                # Replayed as one literal script: a bound value or a `%` escape would
                # not survive that, and migrations have neither today.
                if params or "%" in statement:
                    raise AssertionError(f"cannot replay a migration statement: {statement}")
                sent.append(statement)

        scratch = f"{PREFIX}migrated"
        with connect(user, database) as admin:
            admin.execute(f'CREATE SCHEMA "{scratch}"')
            event.listen(Engine, "before_cursor_execute", keep)
            try:
                migrate(cls.url(user, database, scratch))
            finally:
                event.remove(Engine, "before_cursor_execute", keep)
            admin.execute(f'DROP SCHEMA "{scratch}" CASCADE')
        return cls(user, database, ";\n".join(sent))

    @contextmanager
    def fresh(self) -> Iterator[str]:
        """The URL of a new schema at head; dropped after, its connections ended first."""
        name = f"{PREFIX}{secrets.token_hex(6)}"
        self.admin.execute(
            f'BEGIN; CREATE SCHEMA "{name}"; SET LOCAL search_path TO "{name}"; '
            f"{self.script}; COMMIT".encode()
        )
        try:
            yield self.url(self.user, self.database, name)
        finally:
            self.admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE application_name = %s AND pid <> pg_backend_pid()",
                (name,),
            )
            self.admin.execute(f'DROP SCHEMA "{name}" CASCADE')

    def close(self) -> None:
        self.admin.close()


def sql(url: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on a test database behind refcount's back; its rows."""
    with psycopg().connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []
