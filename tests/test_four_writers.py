"""Four writers, one store, one database (issue 12): two `watch` daemons, each with
a run directory of its own (two hosts sharing the store), and two scripts: one
pushing with `refcount push` and deleting, one building images with umoci and
pruning, both running `gc`. Afterwards `verify` is clean, every blob a root needs
is there, nothing unneeded outlives grace + trash TTL, and the journal's log
shows no blob freed twice. On PostgreSQL (the advisory lock) and on SQLite (two
daemons on one host, the flock).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import storekit as sk

pytestmark = [pytest.mark.tools, pytest.mark.slow]

ROUNDS = 4  # operations per script: bounded, so the whole test stays well under a minute
GRACE, TRASH_TTL = 5, 1  # seconds; the grace period covers umoci's blobs before its index.json
DEADLINE = 60.0
FREES = {"quarantine", "unlink"}
JOURNAL_LINE = re.compile(r"journal: (quarantine|unlink|restore|purge) (sha256:[0-9a-f]{64})")


class Run:
    """Every refcount process of the test, with its stderr kept for the journal's log."""

    def __init__(self, store: Path, db: str | None, logs: Path) -> None:
        self.store, self.db, self.logs = store, db, logs
        self.env = {k: v for k, v in os.environ.items() if k != "REFCOUNT_RUN_DIR"}
        self.lock = threading.Lock()
        self.count = 0

    def argv(self, *args: str) -> list[str]:
        db = () if self.db is None else ("--db", self.db)
        timing = ("--grace", f"{GRACE}s", "--trash-ttl", f"{TRASH_TTL}s")
        return [sys.executable, "-m", "refcount", "-vv", "--store", str(self.store), *db, *timing]

    def _log(self) -> Path:
        with self.lock:
            self.count += 1
            return self.logs / f"{self.count:04d}.log"

    def cli(
        self, *args: str, ok: tuple[int, ...] = (0,), served_by: Path | None = None
    ) -> subprocess.CompletedProcess[str]:
        """`refcount ARGS`; `served_by` a daemon's run directory: that daemon runs it."""
        env = self.env if served_by is None else {**self.env, "REFCOUNT_RUN_DIR": str(served_by)}
        with self._log().open("w") as err:
            ran = subprocess.run(
                [*self.argv(), *args],
                stdout=subprocess.PIPE,
                stderr=err,
                text=True,
                env=env,
                timeout=DEADLINE,
                check=False,
            )
        assert ran.returncode in ok, (args, ran.returncode)
        return ran

    def daemon(self, run_dir: Path) -> subprocess.Popen[str]:
        run_dir.mkdir()
        log = self._log()
        command = [
            *self.argv(),
            "watch",
            "--run-dir",
            str(run_dir),
            "--debounce",
            "0.05",
            "--gc-interval",
            "1s",
            "--resync",
            "3s",
        ]
        with log.open("w") as err:  # the daemon writes to its own copy
            return subprocess.Popen(command, stderr=err, text=True, env=self.env)

    def journal(self) -> list[tuple[str, str]]:
        return [
            (m[1], m[2])
            for path in sorted(self.logs.iterdir())
            for m in JOURNAL_LINE.finditer(path.read_text())
        ]


def pusher(run: Run, sources: Path, daemon: Path) -> None:
    """`refcount push` an image, delete the previous one (served by `daemon`), gc now
    and then."""
    for i in range(ROUNDS):
        run.cli("push", f"{sources}:p{i}")
        if i:
            # umoci (the other script) rewrites index.json without refcount's lock, as
            # an outside tool does: its read-modify-write may drop the entry this push
            # just added, and the tag is then gone already (exit 1, no such tag). The
            # store must be exact afterwards either way (checked below).
            run.cli("delete", "tag", f"p{i - 1}", served_by=daemon, ok=(0, 1))
        if i % 3 == 2:
            run.cli("gc", served_by=daemon)


def builder(run: Run, store: Path, scratch: Path, daemon: Path) -> None:
    """umoci builds an image in the store (an outside tool: no lock); prune deletes
    the one built two rounds before."""
    for i in range(ROUNDS):
        layer = scratch / f"f{i}"
        layer.write_text(f"umoci layer {i}\n")
        sk.run(["umoci", "new", "--image", f"{store}:u{i}"])
        sk.run(["umoci", "insert", "--image", f"{store}:u{i}", str(layer), f"/f{i}"])
        if i >= 2:
            run.cli("prune", "--match", f"u{i - 2}", "--older-than", "1s", "--yes")
        if i % 3 == 1:
            run.cli("gc", served_by=daemon)


@pytest.fixture(params=["postgresql", "sqlite"])
def database(request: pytest.FixtureRequest) -> Iterator[str | None]:
    if request.param == "sqlite":
        yield None
    else:
        yield request.getfixturevalue("pg_url")


def test_two_daemons_and_two_scripts_on_one_store_leave_it_exact(
    tmp_path: Path, database: str | None
) -> None:
    sk.need_tool("umoci")
    store = sk.make_layout(tmp_path / "store")
    sk.add_image(store, [b"base layer", b"kept layer"], tag="kept")
    sources = sk.make_layout(tmp_path / "sources")
    for i in range(ROUNDS):
        sk.add_image(sources, [b"base layer", f"pushed layer {i}".encode()], tag=f"p{i}")
    logs = tmp_path / "logs"
    logs.mkdir()
    run = Run(store, database, logs)
    run.cli("init")
    daemons = [run.daemon(tmp_path / "host-a"), run.daemon(tmp_path / "host-b")]
    try:
        sk.wait_until(
            lambda: all((tmp_path / h / "watch.pid").exists() for h in ("host-a", "host-b")),
            "both daemons to hold their run directories",
        )
        scripts = [
            threading.Thread(target=pusher, args=(run, sources, tmp_path / "host-a")),
            threading.Thread(target=builder, args=(run, store, tmp_path, tmp_path / "host-b")),
        ]
        failures: list[BaseException] = []
        for script in scripts:
            script.run = _catching(script.run, failures)  # type: ignore[method-assign]
            script.start()
        for script in scripts:
            script.join(DEADLINE * 2)
        assert not failures, failures
        assert [d.poll() for d in daemons] == [None, None], "a daemon died"

        # Every blob a remaining root needs is there, at once and at the end.
        assert sk.reachable(store) <= sk.blob_files(store)
        # Nothing unneeded outlives grace + trash TTL: the daemons' gc timers remove it.
        trash = store / ".refcount" / "trash"
        sk.wait_until(
            lambda: (
                sk.blob_files(store) == sk.reachable(store)
                and not any(p.is_file() for p in trash.rglob("*"))
            ),
            "the daemons to free what no root needs",
        )
    finally:
        for d in daemons:
            d.terminate()
        for d in daemons:
            d.wait(DEADLINE)
    assert [d.returncode for d in daemons] == [0, 0]
    assert run.cli("verify").returncode == 0
    tags = {sk.tag_of(e) for e in sk.read_index(store)["manifests"]}
    assert {"kept", f"p{ROUNDS - 1}"} <= tags
    assert not tags & {f"p{i}" for i in range(ROUNDS - 1)}

    # The journal's log: a blob is freed again only after it was restored.
    actions = run.journal()
    frees = Counter(d for a, d in actions if a in FREES)
    restores = Counter(d for a, d in actions if a == "restore")
    assert frees, "the log records the frees"
    assert {d: n for d, n in frees.items() if n > restores[d] + 1} == {}
    purges = Counter(d for a, d in actions if a == "purge")
    assert {d: n for d, n in purges.items() if n > 1} == {}


def _catching(target: Callable[[], None], failures: list[BaseException]) -> Callable[[], None]:
    def run() -> None:
        try:
            target()
        except BaseException as exc:
            failures.append(exc)

    return run


def test_a_run_dir_that_is_not_a_directory_is_refused_and_one_run_dir_holds_one_daemon(
    tmp_path: Path,
) -> None:
    store = sk.make_layout(tmp_path / "store")
    sk.add_image(store, [b"a layer"], tag="a")
    logs = tmp_path / "logs"
    logs.mkdir()
    run = Run(store, None, logs)
    run.cli("init")
    before = sk.listing(store, include_refcount=True)

    missing = run.cli("watch", "--run-dir", str(tmp_path / "nowhere"), ok=(2,))
    assert sk.listing(store, include_refcount=True) == before
    assert "--run-dir" in (logs / "0002.log").read_text() and missing.stdout == ""

    first = run.daemon(tmp_path / "host-a")
    try:
        sk.wait_until(lambda: (tmp_path / "host-a" / "watch.pid").exists(), "the daemon")
        assert not (store / ".refcount" / "watch.pid").exists()
        run.cli("watch", "--run-dir", str(tmp_path / "host-a"), ok=(4,))
        assert "already runs" in (logs / "0004.log").read_text()
    finally:
        first.terminate()
        first.wait(DEADLINE)
    assert first.returncode == 0
    assert not (tmp_path / "host-a" / "watch.pid").exists()
