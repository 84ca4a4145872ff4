"""refcount with its database on PostgreSQL (`--db postgresql+psycopg://...`).

Needs the server on 127.0.0.1:5432 with trust authentication (user postgres or
root, maintenance database `test`). Each test gets a database of its own,
created here and dropped afterwards, so runs never see each other's rows.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import pgkit
import pytest
import storekit as sk
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from conftest import Cli, direct_env
from conftest import Result as Ran
from sqlalchemy import inspect

import refcount
from refcount.db.engine import current_revision, ensure_schema, make_engine, upgrade
from refcount.db.models import SCHEMA_HEAD, Base

psycopg = pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg)")

pytestmark = pytest.mark.postgres


def _leaked_connections() -> list[str]:
    """Collect garbage now; what unclosed psycopg connections warned about."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        gc.collect()
    return [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)]


@pytest.fixture(autouse=True)
def _no_leaked_connections() -> Iterator[None]:
    """An unclosed connection warns when it is garbage-collected: at some random later
    moment, failing an unrelated test under filterwarnings=error. Collect after each
    test here, so that a leak is reported against the test that made it."""
    _leaked_connections()
    yield
    leaked = _leaked_connections()
    assert not leaked, f"connections left open: {leaked}"


@pytest.fixture
def refcount_cli(cli: Cli) -> Cli:
    """The shared in-process CLI fixture (conftest), under this file's name for it."""
    return cli


def cfg(name: str) -> bytes:
    """An explicit config, so its digest is known from its bytes."""
    return json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()


@pytest.fixture
def shared_store(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """index.json: a -> Ma (Ca, L0, L1); b -> Mb (Cb, L0, L2). L0 is shared."""
    store = sk.make_layout(tmp_path / "store")
    ma = sk.add_image(store, [b"L0", b"L1"], tag="a", config=cfg("a"))
    mb = sk.add_image(store, [b"L0", b"L2"], tag="b", config=cfg("b"))
    h = sk.sha256_digest
    names = {
        "Ma": ma["digest"],
        "Mb": mb["digest"],
        "Ca": h(cfg("a")),
        "Cb": h(cfg("b")),
        "L0": h(b"L0"),
        "L1": h(b"L1"),
        "L2": h(b"L2"),
    }
    return store, names


def counts(store: Path, url: str, digests: set[str]) -> dict[str, int]:
    with refcount.open(store, url) as rc:
        return {d: rc.count(d) for d in digests}


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    return {f"{alg.name}:{p.name}" for alg in trash.iterdir() for p in alg.iterdir()}


# --------------------------------------------------------------------------


def test_migrating_an_empty_postgresql_database_to_head_builds_exactly_the_models(
    pg_url: str,
) -> None:
    engine = make_engine(pg_url)
    try:
        upgrade(engine)
        ensure_schema(engine)  # already at head: a no-op

        assert current_revision(engine) == SCHEMA_HEAD
        assert set(inspect(engine).get_table_names()) == {
            "alembic_version",
            *Base.metadata.tables,
        }
        with engine.connect() as connection:
            context = MigrationContext.configure(
                connection, opts={"compare_type": True, "compare_server_default": True}
            )
            assert compare_metadata(context, Base.metadata) == []
    finally:
        engine.dispose()


def test_deleting_a_tag_with_counts_on_postgresql_frees_only_what_the_other_image_lacks(
    shared_store: tuple[Path, dict[str, str]],
    pg_url: str,
    refcount_cli: Callable[..., Ran],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, n = shared_store
    everything = set(n.values())

    init = refcount_cli("--store", store, "--db", pg_url, "init")
    assert (init.code, init.err) == (0, "")
    assert counts(store, pg_url, everything) == sk.expected_counts(store)
    assert counts(store, pg_url, {n["L0"]}) == {n["L0"]: 2}

    deleted = refcount_cli("--store", store, "--db", pg_url, "--json", "delete", "tag", "a")

    assert (deleted.code, deleted.err) == (0, "")
    freed = {b["digest"] for b in deleted.json()["freed"]}
    assert freed == {n["Ma"], n["Ca"], n["L1"]}
    assert sk.blob_files(store) == {n["Mb"], n["Cb"], n["L0"], n["L2"]}
    assert trash_files(store) == freed
    expected = sk.expected_counts(store)
    assert counts(store, pg_url, everything) == {d: expected.get(d, 0) for d in everything}
    # The counts live in PostgreSQL, not in a SQLite file beside the store.
    assert not (store / ".refcount" / "refcount.db").exists()

    monkeypatch.setenv("REFCOUNT_DB", pg_url)  # the environment names the same database
    verify = refcount_cli("--store", store, "verify")
    assert verify.code == 0, verify
    assert not (store / ".refcount" / "refcount.db").exists()


def test_verify_repair_on_postgresql_restores_tampered_counts_without_deleting_content(
    shared_store: tuple[Path, dict[str, str]], pg_url: str, refcount_cli: Callable[..., Ran]
) -> None:
    store, n = shared_store
    assert refcount_cli("--store", store, "--db", pg_url, "init").code == 0
    before = sk.listing(store)
    pgkit.sql(pg_url, "UPDATE blobs SET count = 7 WHERE digest = %s", n["L0"])
    pgkit.sql(pg_url, "DELETE FROM blobs WHERE digest = %s", n["L2"])

    found = refcount_cli("--store", store, "--db", pg_url, "verify")
    assert found.code == 1
    assert n["L0"] in found.out and n["L2"] in found.out

    repaired = refcount_cli("--store", store, "--db", pg_url, "verify", "--repair")
    assert repaired.code == 0, repaired
    again = refcount_cli("--store", store, "--db", pg_url, "verify")
    assert again.code == 0, again
    assert sk.listing(store) == before
    assert counts(store, pg_url, set(n.values())) == sk.expected_counts(store)

    # The repaired database frees correctly: b alone holds L0 now, so deleting a keeps it.
    deleted = refcount_cli("--store", store, "--db", pg_url, "--json", "delete", "tag", "a")
    assert deleted.code == 0, deleted
    assert {b["digest"] for b in deleted.json()["freed"]} == {n["Ma"], n["Ca"], n["L1"]}
    assert counts(store, pg_url, {n["L0"], n["L2"]}) == {n["L0"]: 1, n["L2"]: 1}


def test_several_sidecars_upgrading_one_empty_postgresql_database_at_once_all_succeed(
    shared_store: tuple[Path, dict[str, str]], pg_url: str
) -> None:
    store, _ = shared_store
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFCOUNT_")}
    command = [sys.executable, "-m", "refcount", "--store", str(store), "--db", pg_url]
    procs = [
        subprocess.Popen(
            [*command, "db", "upgrade"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for _ in range(4)
    ]
    results = [(*p.communicate(timeout=60), p.returncode) for p in procs]

    assert [code for _, _, code in results] == [0, 0, 0, 0], results
    assert all(SCHEMA_HEAD in out for out, _, _ in results)
    engine = make_engine(pg_url)
    try:
        assert current_revision(engine) == SCHEMA_HEAD
    finally:
        engine.dispose()


def test_dry_run_and_gc_on_postgresql_change_exactly_what_they_report(
    shared_store: tuple[Path, dict[str, str]], pg_url: str, refcount_cli: Callable[..., Ran]
) -> None:
    store, n = shared_store
    base = ("--store", store, "--db", pg_url, "--json")
    assert refcount_cli(*base, "init").code == 0
    orphan = sk.write_blob(store, b"an upload nobody finished", sk.OCI_LAYER)["digest"]
    before = sk.listing(store)

    planned = refcount_cli(*base, "delete", "tag", "a", "--dry-run")
    assert planned.code == 0, planned
    assert sk.listing(store) == before
    assert counts(store, pg_url, {n["Ma"], n["L0"]}) == {n["Ma"]: 1, n["L0"]: 2}

    done = refcount_cli(*base, "delete", "tag", "a")
    assert done.code == 0, done
    assert planned.json()["freed"] == done.json()["freed"]
    assert planned.json()["removed"] == done.json()["removed"]

    swept = refcount_cli(*base, "--trash-ttl", "0", "gc", "--grace", "0")
    assert swept.code == 0, swept
    assert [a["digest"] for a in swept.json()["swept"]] == [orphan]
    assert {a["digest"] for a in swept.json()["purged"]} == {n["Ma"], n["Ca"], n["L1"]}
    assert sk.blob_files(store) == {n["Mb"], n["Cb"], n["L0"], n["L2"]}
    assert trash_files(store) == set()
    assert refcount_cli(*base, "verify").code == 0


def test_verify_repair_on_postgresql_keeps_the_quarantine_purgeable(
    shared_store: tuple[Path, dict[str, str]], pg_url: str, refcount_cli: Callable[..., Ran]
) -> None:
    store, n = shared_store
    base = ("--store", store, "--db", pg_url)
    assert refcount_cli(*base, "init").code == 0
    assert refcount_cli(*base, "delete", "tag", "a").code == 0
    pgkit.sql(pg_url, "UPDATE blobs SET count = count + 1 WHERE digest = %s", n["Mb"])

    assert refcount_cli(*base, "verify").code == 1
    assert refcount_cli(*base, "verify", "--repair").code == 0
    assert trash_files(store) == {n["Ma"], n["Ca"], n["L1"]}

    purged = refcount_cli(*base, "--json", "--trash-ttl", "0", "gc")
    assert purged.code == 0, purged
    assert {a["digest"] for a in purged.json()["purged"]} == {n["Ma"], n["Ca"], n["L1"]}
    assert trash_files(store) == set()
    assert refcount_cli(*base, "verify").code == 0


UNREACHABLE = "postgresql+psycopg://postgres:s3cret@127.0.0.1:1/refcount"


@pytest.mark.parametrize("command", [["init"], ["delete", "tag", "a"]])
def test_an_unreachable_postgresql_server_is_one_error_line_without_the_password(
    shared_store: tuple[Path, dict[str, str]], refcount_cli: Callable[..., Ran], command: list[str]
) -> None:
    store, _ = shared_store
    before = sk.listing(store)

    ran = refcount_cli("--store", store, "--db", UNREACHABLE, *command)

    assert ran.code == 2
    assert len(ran.err.splitlines()) == 1, ran.err
    assert ran.err.startswith("refcount: error: ")
    assert "127.0.0.1:1" in ran.err and "s3cret" not in ran.err
    assert sk.listing(store) == before


def test_db_current_on_an_unreachable_server_is_an_error_not_an_empty_schema(
    shared_store: tuple[Path, dict[str, str]], refcount_cli: Callable[..., Ran]
) -> None:
    store, _ = shared_store

    ran = refcount_cli("--store", store, "--db", UNREACHABLE, "db", "current")

    assert ran.code == 2, ran
    assert not ran.out.startswith("none")
    assert len(ran.err.splitlines()) == 1 and "s3cret" not in ran.err


def test_db_current_on_postgresql_prints_none_before_and_the_head_after_upgrade(
    tmp_path: Path, pg_url: str, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")

    before = refcount_cli("--store", store, "--db", pg_url, "db", "current")
    upgraded = refcount_cli("--store", store, "--db", pg_url, "db", "upgrade")
    after = refcount_cli("--store", store, "--db", pg_url, "db", "current")

    assert (before.code, before.err) == (0, "") and before.out.startswith("none")
    assert (upgraded.code, upgraded.err) == (0, "")
    assert (after.code, after.out, after.err) == (0, f"{SCHEMA_HEAD}\n", "")


def test_db_current_leaves_no_postgresql_connection_open(
    tmp_path: Path, pg_url: str, refcount_cli: Callable[..., Ran]
) -> None:
    store = sk.make_layout(tmp_path / "store")
    assert refcount_cli("--store", store, "--db", pg_url, "db", "upgrade").code == 0
    assert _leaked_connections() == []

    current = refcount_cli("--store", store, "--db", pg_url, "db", "current")

    assert current.out == f"{SCHEMA_HEAD}\n"
    assert _leaked_connections() == []


def test_a_second_store_on_one_postgresql_database_is_refused(
    refcount_cli: Cli, pg_url: str, tmp_path: Path
) -> None:
    first = sk.make_layout(tmp_path / "first")
    second = sk.make_layout(tmp_path / "second")
    sk.add_image(first, [b"L0", b"L1"], tag="a", config=cfg("a"))
    sk.add_image(second, [b"L9"], tag="z", config=cfg("z"))
    assert refcount_cli("--store", first, "--db", pg_url, "init").code == 0
    second_before = sk.listing(second, include_refcount=True)

    for command in (["init"], ["sync"], ["delete", "tag", "z"], ["tags"]):
        ran = refcount_cli("--store", second, "--db", pg_url, *command)
        assert ran.code == 2, ran
        lines = ran.err.strip().splitlines()
        assert len(lines) == 1 and "already counts the store at" in lines[0], ran.err
        assert str(first) in lines[0] and str(second) in lines[0]
    assert sk.listing(second, include_refcount=True) == second_before
    verify = refcount_cli("--store", first, "--db", pg_url, "--json", "verify")
    assert verify.code == 0 and verify.json()["roots"] == 1


def test_a_push_on_postgresql_is_leased_against_a_delete_landing_mid_push(
    tmp_path: Path, pg_url: str
) -> None:
    from refcount.store import at_point

    store = sk.make_layout(tmp_path / "store")
    sk.add_image(store, [b"shared layer", b"b layer"], tag="b")
    src = sk.make_layout(tmp_path / "src")
    app = sk.add_image(src, [b"shared layer", b"app layer"], tag="app")
    shared = sk.sha256_digest(b"shared layer")

    def delete_b() -> None:
        with refcount.open(store, pg_url) as other:
            assert len(other.show(shared).leases) == 1
            assert shared not in {f.digest for f in other.delete_tag("b").freed}

    with refcount.open(store, pg_url) as rc:
        rc.init()
        with at_point("push-before-index", delete_b):
            rc.push(f"{src}:app")
        rc.touch("app")
        assert set(rc.last_used(["app", "b"])) == {"app"}
        assert rc.verify().ok
        assert rc.show(shared).leases == ()
    assert sk.closure(src, app["digest"]) <= sk.blob_files(store)


def test_du_ref_on_postgresql_gives_each_tag_the_figures_du_of_all_gives_it(
    shared_store: tuple[Path, dict[str, str]],
    pg_url: str,
    refcount_cli: Callable[..., Ran],
) -> None:
    store, n = shared_store
    assert refcount_cli("--store", store, "--db", pg_url, "init").code == 0
    every = refcount_cli("--store", store, "--db", pg_url, "--json", "du").json()
    before = sk.listing(store)
    for usage in every["tags"]:
        alone = refcount_cli("--store", store, "--db", pg_url, "--json", "du", usage["tag"])
        assert (alone.code, alone.err) == (0, "")
        assert alone.json()["tags"] == [usage]
        assert alone.json()["shared"] is None
        dry = refcount_cli(
            "--store", store, "--db", pg_url, "--json", "delete", "tag", usage["tag"], "--dry-run"
        )
        assert usage["exclusive"] == dry.json()["freed_bytes"]
    assert sk.listing(store) == before
    assert counts(store, pg_url, set(n.values())) == sk.expected_counts(store)


def test_a_missing_postgresql_driver_is_exit_2_with_the_install_hint(
    shared_store: tuple[Path, dict[str, str]],
    refcount_cli: Callable[..., Ran],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    store, _ = shared_store
    before = sk.listing(store, include_refcount=True)
    monkeypatch.setitem(sys.modules, "psycopg", None)  # `import psycopg` fails

    for command in (["init"], ["tags"], ["delete", "tag", "a"]):
        ran = refcount_cli("--store", store, "--db", "postgresql+psycopg://u@127.0.0.1/x", *command)

        assert ran.code == 2, ran
        assert len(ran.err.splitlines()) == 1, ran.err
        assert "driver is not installed" in ran.err
        assert ran.err.rstrip().endswith("pip install 'refcount[postgres]'")
    assert sk.listing(store, include_refcount=True) == before


# --------------------------------------------------------------------------
# A daemon whose database went away
# --------------------------------------------------------------------------
def inotify_instances(pid: int) -> int:
    """How many inotify instances process `pid` holds (each a per-user resource)."""
    held = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):  # closed since the listing
            held += os.readlink(fd) == "anon_inode:inotify"
    return held


def test_a_daemon_whose_database_was_dropped_retries_holds_one_observer_and_stops_on_sigterm(
    tmp_path: Path, pg_user: str, pg_url: str
) -> None:
    store = sk.make_layout(tmp_path / "store")
    sk.add_image(store, [b"layer"], tag="a")
    log_path = tmp_path / "watch.log"

    def log() -> str:
        return log_path.read_text(errors="replace")

    def wait_for(what: str, times: int = 1, sample: Callable[[], None] = lambda: None) -> None:
        deadline = time.monotonic() + 20
        while log().count(what) < times:
            assert daemon.poll() is None, log()
            assert time.monotonic() < deadline, f"{what!r} x{times} not in the log:\n{log()}"
            sample()
            time.sleep(0.005)

    with log_path.open("wb") as out:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "refcount", "--store", str(store), "--db", pg_url, "watch"],
            env=direct_env(),
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for("full reconcile (start)")
        at_start = inotify_instances(daemon.pid)
        held: list[int] = []

        def sample() -> None:
            held.append(inotify_instances(daemon.pid))

        with pgkit.connect(pg_user) as admin:
            admin.execute(f'DROP DATABASE "{pg_url.rsplit("/", 1)[1]}" WITH (FORCE)')
        for round_ in range(1, 5):
            sk.add_image(store, [f"layer {round_}".encode()], tag=f"t{round_}")
            wait_for("reconcile failed", round_, sample)
            # blobs/ moved away and back, as a tool swapping a directory in does:
            # every blob may have changed, so the daemon rebuilds its observer.
            (store / "blobs").rename(tmp_path / "blobs")
            (tmp_path / "blobs").rename(store / "blobs")
            wait_for("observer rebuilt;", round_, sample)  # watching again
        # The store's directory goes away for a while (an unmount): every rebuild
        # fails, once a health check (a second), and none may leave an instance open.
        away = tmp_path / "away"
        store.rename(away)
        (away / "blobs").rename(away / "blobs.old")
        wait_for("cannot watch", 3, sample)
        (away / "blobs.old").rename(away / "blobs")
        away.rename(store)
        wait_for("observer rebuilt;", 5, sample)
        sample()

        assert at_start >= 1 and max(held) <= at_start, held
        assert "database" in log() and "Traceback" not in log()
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(10) == 0, log()
    finally:
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)
