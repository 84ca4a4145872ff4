"""SIGINT and SIGTERM to a CLI process, and a daemon's client that goes away (SPEC §7).

Every test runs real `python -m refcount` processes and sends them real
signals. What an interrupted command must do: exit 130 with exactly one line
on stderr, `refcount: interrupted` (or `refcount: interrupted (delete tag 'T'
had completed)` when the delete finished first, its report then printed), or
exit 0 when it was over before the signal; never a traceback; and leave the
store either as before the command or as after it, with nothing for the next
command to catch up: index.json, blobs/, the database's roots and its journal
agree before `verify` (which must then be clean) gets to look.

Aiming: a signal during the interpreter's own start-up, before any refcount
code runs, is Python's behaviour (a KeyboardInterrupt traceback, or death by
SIGTERM) and nothing refcount can handle. So each process is first watched
until /proc/PID/status shows SIGTERM in SigCgt (Python never catches SIGTERM
itself: the bit means `refcount.client.run` installed its handlers, its first
act), and the signal is sent a chosen time after that. The trials' times
cover, in even strata with a fixed seed (a failure reproduces), everything
from the import of the CLI to past the end of a `delete tag`, calibrated by an
uninterrupted run on the same machine.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
from conftest import MODULE_STORE, ON_POSTGRESQL, sql_on_the_test_database

import refcount
from refcount.serve import CommandServer
from refcount.store import Store
from refcount.wire import ACCEPTED, recv_exact, recv_size, send_frame

MKSTORE = Path(__file__).resolve().parent.parent / "scripts" / "mkstore.py"
DIRECT = {"REFCOUNT_NO_DAEMON": "1"}
TAG = "img-7"
TRIALS = 22
SEED = 20240607
DEADLINE = 20.0
INTERRUPTED = "refcount: interrupted"
COMPLETED = f"refcount: interrupted (delete tag {TAG!r} had completed)"


# --------------------------------------------------------------------------
# Processes and signals
# --------------------------------------------------------------------------
def handlers_installed(proc: subprocess.Popen[str]) -> bool:
    """Whether refcount's handlers are in place (SIGTERM caught), or the process is over."""
    if proc.poll() is not None:
        return True
    for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def spawn(store: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **(env or {})},
    )


def wait_for_handlers(proc: subprocess.Popen[str]) -> float:
    """Block until refcount's handlers are installed in `proc`; returns the monotonic time."""
    deadline = time.monotonic() + DEADLINE
    while not handlers_installed(proc):
        assert time.monotonic() < deadline, "the process never installed its handlers"
        time.sleep(0.0005)
    return time.monotonic()


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str


def finish(proc: subprocess.Popen[str]) -> Ran:
    out, err = proc.communicate(timeout=60)
    return Ran(proc.returncode, out, err)


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out after {timeout} s waiting for {what}"
        time.sleep(0.01)


# --------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------
def make_store(path: Path, images: int, layer_bytes: int = 64) -> Path:
    sizes = ["--images", str(images), "--layers", "3", "--layer-bytes", str(layer_bytes)]
    subprocess.run(
        [sys.executable, str(MKSTORE), str(path), *sizes],
        check=True,
        capture_output=True,
    )
    with refcount.open(path) as rc:
        rc.init()
    return path


@dataclass(frozen=True)
class Template:
    path: Path
    entries: frozenset[str]  # the digests of the index.json entries `delete tag TAG` removes
    freed: frozenset[str]  # the blobs it frees


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> Template:
    """A few hundred indexed images, and what deleting TAG would remove (a dry run)."""
    path = make_store(tmp_path_factory.mktemp("signals") / "store", 300)
    with refcount.open(path) as rc:
        plan = rc.delete_tag(TAG, dry_run=True)
    assert plan.freed
    return Template(
        path, frozenset(e.digest for e in plan.removed), frozenset(b.digest for b in plan.freed)
    )


def blob_present(store: Path, digest: str) -> bool:
    algorithm, encoded = digest.split(":", 1)
    return (store / "blobs" / algorithm / encoded).is_file()


def db_rows(store: Path, sql: str) -> list[tuple[Any, ...]]:
    if ON_POSTGRESQL:
        return sql_on_the_test_database(sql)
    connection = sqlite3.connect(f"file:{store / '.refcount' / 'refcount.db'}?mode=ro", uri=True)
    try:
        return connection.execute(sql).fetchall()
    finally:
        connection.close()


def delete_state(store: Path, template: Template) -> str:
    """'done' or 'not done', asserting that the store is wholly one or the other."""
    manifests = json.loads((store / "index.json").read_bytes())["manifests"]
    listed = {m["digest"] for m in manifests}
    tagged = any(
        m.get("annotations", {}).get("org.opencontainers.image.ref.name") == TAG for m in manifests
    )
    recorded = {tag for (tag,) in db_rows(store, "SELECT tag FROM roots WHERE tag IS NOT NULL")}
    (index_hash,) = db_rows(store, "SELECT value FROM meta WHERE key = 'index_hash'")[0]
    assert db_rows(store, "SELECT action, digest FROM pending_actions") == [], "journal left"
    assert index_hash == Store(store).read_index().hash, "the database is behind index.json"
    assert (TAG in recorded) == tagged, "the database's roots disagree with index.json"
    if tagged:
        assert template.entries <= listed
        missing = [d for d in template.freed if not blob_present(store, d)]
        assert not missing, f"not deleted, yet its blobs are gone: {missing}"
        return "not done"
    assert not template.entries & listed, "the tag is gone but not its untagged children"
    kept = [d for d in template.freed if blob_present(store, d)]
    assert not kept, f"deleted, yet its blobs are still in blobs/: {kept}"
    return "done"


def verify_ok(store: Path) -> bool:
    """What `refcount verify` would exit 0 for (through the library: no interpreter start)."""
    with refcount.open(store) as rc:
        return rc.verify().ok


# --------------------------------------------------------------------------
# Interrupting a delete at random moments
# --------------------------------------------------------------------------
@pytest.mark.sqlite_only(MODULE_STORE)
def test_an_interrupted_delete_is_done_or_not_done_and_says_which(
    template: Template, tmp_path: Path
) -> None:
    calibration = tmp_path / "calibration"
    shutil.copytree(template.path, calibration, symlinks=True)
    proc = spawn(calibration, "delete", "tag", TAG, env=DIRECT)
    started = wait_for_handlers(proc)
    whole = finish(proc)
    span = time.monotonic() - started
    assert whole.code == 0 and whole.err == "", whole.err
    report = whole.out

    rng = random.Random(SEED)
    outcomes = []
    for trial in range(TRIALS):
        store = tmp_path / f"trial-{trial}"
        shutil.copytree(template.path, store, symlinks=True)
        # Even strata over [0, 1.3 x span]: the import of the CLI, the open,
        # the delete, its report, the exit, and a little after.
        delay = 1.3 * span * (trial + rng.random()) / TRIALS
        signum = signal.SIGTERM if trial % 4 == 3 else signal.SIGINT
        proc = spawn(store, "delete", "tag", TAG, env=DIRECT)
        wait_for_handlers(proc)
        time.sleep(delay)
        proc.send_signal(signum)
        ran = finish(proc)
        what = f"trial {trial}: {signum.name} {delay:.3f} s after the handlers: exit {ran.code}"
        assert "Traceback" not in ran.err, f"{what}\n{ran.err}"
        state = delete_state(store, template)
        if ran.code == 0:
            assert (ran.out, ran.err, state) == (report, "", "done"), what
        else:
            assert ran.code == 130, f"{what}\n{ran.err}"
            assert ran.err.splitlines() in ([INTERRUPTED], [COMPLETED]), f"{what}\n{ran.err}"
            if ran.err.splitlines() == [COMPLETED]:
                assert (ran.out, state) == (report, "done"), what
            else:
                assert (ran.out, state) == ("", "not done"), what
        assert verify_ok(store), what
        outcomes.append((round(delay, 3), signum.name, ran.code, state))
    states = {state for *_, state in outcomes}
    assert states == {"done", "not done"}, outcomes


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_during_the_import_of_the_cli_prints_one_line_and_exits_130(
    template: Template, signum: signal.Signals
) -> None:
    """Sent as soon as the handlers are in place, the signal lands in the import of the CLI
    (hundreds of milliseconds of Typer and SQLAlchemy); `-X importtime` shows that
    import had begun (a cut import still gets its line). On a busy machine the signal
    can land just before the import instead: every attempt must end in the one line,
    and one of at most five must have landed in the import."""
    argv = ["-X", "importtime", "-m", "refcount", "--store", str(template.path), "tags"]
    for _attempt in range(5):
        proc = subprocess.Popen(
            [sys.executable, *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **DIRECT},
        )
        wait_for_handlers(proc)
        proc.send_signal(signum)
        ran = finish(proc)
        imported = {
            line.rsplit("|", 1)[1].strip()
            for line in ran.err.splitlines()
            if line.startswith("import time:") and "imported package" not in line
        }
        said = [line for line in ran.err.splitlines() if not line.startswith("import time:")]
        assert (ran.code, ran.out, said) == (130, "", [INTERRUPTED]), ran.err
        if "refcount.cli" in imported:
            return
    pytest.fail("in five attempts the signal never landed in the import of refcount.cli")


# --------------------------------------------------------------------------
# Long work stops promptly
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def big(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A store whose `verify --deep` takes a few seconds (its hashing, in a pool of
    processes, is a small part of that: most is the recount)."""
    return make_store(tmp_path_factory.mktemp("signals-big") / "store", 6000, layer_bytes=1024)


@pytest.mark.sqlite_only(MODULE_STORE)
def test_verify_deep_stops_soon_after_sigint_instead_of_hashing_every_blob(big: Path) -> None:
    proc = spawn(big, "verify", "--deep", env=DIRECT)
    started = wait_for_handlers(proc)
    assert finish(proc).code == 0
    span = time.monotonic() - started

    # Aim at the last phase (hashing, in a pool of processes). The machine's load can
    # make a run quicker than the one measured: one that completes before the
    # signal is tried again earlier; one that is interrupted must stop at once.
    for fraction in (0.85, 0.6, 0.4, 0.25):
        proc = spawn(big, "verify", "--deep", env=DIRECT)
        wait_for_handlers(proc)
        time.sleep(fraction * span)
        sent = time.monotonic()
        proc.send_signal(signal.SIGINT)
        ran = finish(proc)
        if ran.code == 0:
            continue
        assert (ran.code, ran.out, ran.err) == (130, "", INTERRUPTED + "\n")
        assert time.monotonic() - sent < 0.1 * span + 1.0
        return
    pytest.fail("every verify --deep finished before its SIGINT")


# --------------------------------------------------------------------------
# The daemon: the client goes away, the work stops
# --------------------------------------------------------------------------
class Daemon:
    """`refcount -vv --store S watch` as a process, its log in a file."""

    def __init__(self, store: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refcount", "-vv", "--store", str(store), "watch"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        sock = store / ".refcount" / "refcount.sock"
        wait_until(
            lambda: (
                self.proc.poll() is not None
                or ("full reconcile (start)" in self.log() and sock.exists())
            ),
            "the daemon to serve",
        )
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            self._log.close()


@pytest.fixture
def daemon(big: Path, tmp_path: Path) -> Iterator[Daemon]:
    started = Daemon(big, tmp_path / "watch.log")
    yield started
    if started.proc.poll() is None and started.stop() != 0:
        started.proc.kill()


def served(daemon: Daemon, proc: subprocess.Popen[str]) -> bool:
    return f"serve: pid {proc.pid}: running" in daemon.log()


@pytest.mark.sqlite_only(MODULE_STORE)
def test_a_served_verify_deep_stops_when_its_client_is_interrupted(
    big: Path, daemon: Daemon
) -> None:
    started = time.monotonic()
    proc = spawn(big, "verify", "--deep")
    whole = finish(proc)
    full = time.monotonic() - started
    assert whole.code == 0 and served(daemon, proc), daemon.log()
    alone = time.monotonic()
    assert finish(spawn(big, "tags")).code == 0
    tags_alone = time.monotonic() - alone  # a client's own cost, with nothing in the way

    proc = spawn(big, "verify", "--deep")
    wait_until(lambda: served(daemon, proc), "the daemon to take the request")
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    ran = finish(proc)
    tags = spawn(big, "tags")
    listed = finish(tags)
    elapsed = time.monotonic() - sent
    assert (ran.code, ran.out, ran.err) == (130, "", INTERRUPTED + "\n"), daemon.log()
    assert listed.code == 0 and TAG in listed.out and served(daemon, tags)
    assert f"serve: pid {proc.pid} went away or was interrupted" in daemon.log()
    assert elapsed - tags_alone < 0.5 * full, (
        f"tags returned {elapsed:.2f} s after the signal ({tags_alone:.2f} s alone); "
        f"a whole deep verify took {full:.2f} s"
    )


# --------------------------------------------------------------------------
# The command socket: a client that hangs up
# --------------------------------------------------------------------------
class Recorder:
    """A handler that runs until released or cancelled, and records what it saw."""

    def __init__(self) -> None:
        self.ran: list[list[str]] = []
        self.release = threading.Event()

    def __call__(self, argv: list[str], cancel: threading.Event) -> tuple[int, str, str]:
        self.ran.append(argv)
        deadline = time.monotonic() + DEADLINE
        while not (cancel.is_set() or self.release.is_set()):
            assert time.monotonic() < deadline
            time.sleep(0.01)
        if cancel.is_set():
            return 130, "", INTERRUPTED + "\n"
        return 0, f"ran {' '.join(argv)}\n", ""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, Recorder]]:
    path = tmp_path / "refcount.sock"
    handler = Recorder()
    commands = CommandServer(path, handler)
    commands.start()
    yield path, handler
    handler.release.set()
    commands.close()


def connect(path: Path, argv: list[str]) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(DEADLINE)
    sock.connect(str(path))
    send_frame(sock, {"argv": argv, "stdout_isatty": False})
    return sock


def test_a_client_that_shuts_its_side_cancels_its_command_and_still_gets_the_answer(
    server: tuple[Path, Recorder],
) -> None:
    path, handler = server
    with connect(path, ["verify", "--deep"]) as sock:
        assert sock.recv(1) == ACCEPTED
        sock.shutdown(socket.SHUT_WR)
        answer = json.loads(recv_exact(sock, recv_size(sock)))
    assert answer == {"code": 130, "out": "", "err": INTERRUPTED + "\n"}
    assert handler.ran == [["verify", "--deep"]]


def test_a_request_whose_client_hung_up_while_the_daemon_was_busy_never_runs(
    server: tuple[Path, Recorder],
) -> None:
    path, handler = server
    with connect(path, ["delete", "tag", "first"]) as first:
        assert first.recv(1) == ACCEPTED
        with connect(path, ["delete", "tag", "second"]) as second:
            second.shutdown(socket.SHUT_WR)  # interrupted while the first one runs
            handler.release.set()
            assert json.loads(recv_exact(first, recv_size(first)))["code"] == 0
            assert second.recv(1) == b""  # closed without ACCEPTED: not run
    assert handler.ran == [["delete", "tag", "first"]]
