"""The local PostgreSQL server for tests: reach it (starting it once when it is
down), and give a test a database of its own, dropped afterwards.

The server is 127.0.0.1:5432 with trust authentication (user postgres or root,
maintenance database `test`). `REFCOUNT_TEST_DB=postgresql` runs every
database-backed test on it (conftest.py); tests/test_postgres.py and
tests/test_pg_concurrency.py always do.
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


def sql(url: str, statement: str, *params: object) -> list[tuple[Any, ...]]:
    """Run one statement on a test database behind refcount's back; its rows."""
    with psycopg().connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        cursor = conn.execute(statement, params)
        return cursor.fetchall() if cursor.description else []
