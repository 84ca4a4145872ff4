"""Several writers on one store and one PostgreSQL database (SPEC §7, issue 12).

The store's writer lock is a PostgreSQL advisory lock keyed by the store's
identity, so it holds for writers on other hosts, which share no flock; the
journal is claimed with `FOR UPDATE SKIP LOCKED`; a writer whose connection
dies mid-operation leaves what the next command finishes; deadlocks are
retried. "Another host" here is a plain psycopg connection: it takes no flock.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pgkit
import pytest
import storekit as sk
from conftest import Cli

import refcount
from refcount.core import journal
from refcount.core.policy import now
from refcount.db.engine import (
    CONTENTION_ATTEMPTS,
    make_engine,
    store_lock_key,
    transaction,
    upgrade,
)
from refcount.domain import FileAction
from refcount.errors import DatabaseContention, DatabaseError
from refcount.layout import identity_path
from refcount.store import Store, at_point

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg)")

pytestmark = pytest.mark.postgres

WAIT = 30.0  # seconds: a bound on waiting for the server, never an expected duration


def two_images(store: Path) -> dict[str, set[str]]:
    """a and b share L0; returns the blobs only a needs and those b needs."""
    a = sk.add_image(store, [b"L0", b"La"], tag="a")
    b = sk.add_image(store, [b"L0", b"Lb"], tag="b")
    only_b = sk.closure(store, b["digest"])
    return {"only_a": sk.closure(store, a["digest"]) - only_b, "b": only_b}


def connect(url: str, *, autocommit: bool = True) -> Any:
    driver = pgkit.psycopg()
    return driver.connect(
        url.replace("postgresql+psycopg://", "postgresql://"), autocommit=autocommit
    )


def waiting_for_lock(url: str, locktype: str) -> bool:
    rows = pgkit.sql(
        url, "SELECT count(*) FROM pg_locks WHERE locktype = %s AND NOT granted", locktype
    )
    return bool(rows[0][0])


def index_tags(store: Path) -> list[str | None]:
    return [sk.tag_of(e) for e in sk.read_index(store)["manifests"]]


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    return {f"{alg.name}:{p.name}" for alg in trash.iterdir() for p in alg.iterdir()}


@pytest.fixture
def indexed(store: Path, pg_url: str) -> Iterator[tuple[Path, str, dict[str, set[str]]]]:
    blobs = two_images(store)
    with refcount.open(store, pg_url) as rc:
        rc.init()
    yield store, pg_url, blobs


def test_a_delete_waits_while_another_host_holds_the_store_advisory_lock(
    indexed: tuple[Path, str, dict[str, set[str]]],
) -> None:
    store, url, blobs = indexed
    identity = identity_path(store).read_text().strip()
    before = sk.listing(store)
    other_host = connect(url)
    other_host.execute("SELECT pg_advisory_lock(%s)", (store_lock_key(identity),))
    outcome: list[object] = []

    def delete() -> None:
        with refcount.open(store, url) as rc:
            outcome.append(rc.delete_tag("a"))

    worker = threading.Thread(target=delete)
    try:
        worker.start()
        sk.wait_until(lambda: waiting_for_lock(url, "advisory"), "the delete to wait for the lock")
        assert worker.is_alive()
        assert sk.listing(store) == before  # index.json untouched, nothing freed yet
    finally:
        other_host.execute("SELECT pg_advisory_unlock(%s)", (store_lock_key(identity),))
        other_host.close()
        worker.join(WAIT)

    assert len(outcome) == 1
    assert sk.blob_files(store) == blobs["b"]
    assert trash_files(store) == blobs["only_a"]


def test_settle_skips_journal_rows_another_worker_has_claimed(store: Path, pg_url: str) -> None:
    sk.add_image(store, [b"kept"], tag="k")
    with refcount.open(store, pg_url) as rc:
        rc.init()
        engine = rc.engine
        x = sk.write_blob(store, b"stray x", sk.OCI_LAYER)["digest"]
        y = sk.write_blob(store, b"stray y", sk.OCI_LAYER)["digest"]
        with transaction(engine) as repo:
            repo.add_actions(FileAction.UNLINK, [x, y], now())
        other_worker = connect(pg_url, autocommit=False)
        try:
            claimed = other_worker.execute(
                "SELECT id FROM pending_actions WHERE digest = %s FOR UPDATE", (x,)
            ).fetchall()
            assert len(claimed) == 1

            journal.settle(engine, Store(store))

            assert x in sk.blob_files(store) and y not in sk.blob_files(store)
            rows = pgkit.sql(pg_url, "SELECT digest FROM pending_actions")
            assert rows == [(x,)]
        finally:
            other_worker.rollback()
            other_worker.close()

        journal.settle(engine, Store(store))
        assert x not in sk.blob_files(store)
        assert pgkit.sql(pg_url, "SELECT digest FROM pending_actions") == []


def kill_other_backends(url: str) -> None:
    """What a lost network does to a sidecar: the server ends its sessions."""
    pgkit.sql(
        url,
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )


@pytest.mark.parametrize(
    "point", ["delete-before-index", "delete-before-commit", "settle-between-actions"]
)
def test_a_connection_lost_mid_delete_leaves_what_the_next_command_heals(
    indexed: tuple[Path, str, dict[str, set[str]]], cli: Cli, point: str
) -> None:
    store, url, blobs = indexed

    with (
        at_point(point, lambda: kill_other_backends(url)),
        pytest.raises(DatabaseError),
        refcount.open(store, url) as rc,
    ):
        rc.delete_tag("a")

    healed = cli("--store", store, "--db", url, "verify")
    assert healed.code == 0, healed
    if point == "delete-before-index":
        # Lost before index.json was replaced: nothing happened, a is still there.
        assert sk.blob_files(store) == blobs["b"] | blobs["only_a"]
        assert index_tags(store) == ["a", "b"]
    else:
        assert index_tags(store) == ["b"]
        assert sk.blob_files(store) == blobs["b"]
        assert trash_files(store) == blobs["only_a"]
    assert pgkit.sql(url, "SELECT count(*) FROM pending_actions") == [(0,)]


def test_a_real_deadlock_is_reported_as_contention(pg_url: str) -> None:
    engine = make_engine(pg_url)
    upgrade(engine)
    pgkit.sql(pg_url, "INSERT INTO meta (key, value) VALUES ('x', '1'), ('y', '1')")
    other = connect(pg_url, autocommit=False)
    other.execute("SET deadlock_timeout = '60s'")  # our side detects it, and loses
    other.execute("UPDATE meta SET value = 'other' WHERE key = 'x'")
    blocked = threading.Thread(
        target=lambda: other.execute("UPDATE meta SET value = 'other' WHERE key = 'y'")
    )
    try:
        with (
            pytest.raises(DatabaseContention, match="deadlock"),
            transaction(engine) as repo,
        ):
            repo.set_meta("y", "ours")
            blocked.start()
            sk.wait_until(lambda: waiting_for_lock(pg_url, "transactionid"), "the other side")
            repo.set_meta("x", "ours")
        blocked.join(WAIT)
        other.commit()
    finally:
        other.close()
        engine.dispose()
    assert pgkit.sql(pg_url, "SELECT value FROM meta WHERE key IN ('x', 'y')") == [
        ("other",),
        ("other",),
    ]


def test_a_delete_aborted_by_contention_is_retried_and_logged(
    indexed: tuple[Path, str, dict[str, set[str]]], caplog: pytest.LogCaptureFixture
) -> None:
    store, url, blobs = indexed
    aborts = iter([DatabaseContention("deadlock detected"), None])

    def abort_once() -> None:
        exc = next(aborts)
        if exc is not None:
            raise exc

    with (
        caplog.at_level(logging.WARNING),
        at_point("delete-before-index", abort_once),
        refcount.open(store, url) as rc,
    ):
        report = rc.delete_tag("a")

    assert {b.digest for b in report.freed} == blobs["only_a"]
    assert index_tags(store) == ["b"]
    retries = [r for r in caplog.records if "retrying (1 of" in r.getMessage()]
    assert len(retries) == 1 and "deadlock detected" in retries[0].getMessage()


def test_contention_that_persists_ends_in_one_error_after_bounded_retries(
    indexed: tuple[Path, str, dict[str, set[str]]], cli: Cli
) -> None:
    store, url, _ = indexed
    before = sk.listing(store)
    attempts: list[int] = []

    def always_abort() -> None:
        attempts.append(1)
        raise DatabaseContention("deadlock detected")

    with at_point("delete-before-index", always_abort):
        ran = cli("--store", store, "--db", url, "delete", "tag", "a")

    assert ran.code == 2
    assert ran.err.strip().splitlines()[-1] == "refcount: error: deadlock detected"
    assert len(attempts) == CONTENTION_ATTEMPTS
    assert sk.listing(store) == before
