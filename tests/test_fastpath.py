"""The fast path (SPEC §6): `refcount` commands answered by a running daemon.

Two copies of one store are made. A `refcount watch` daemon runs on copy A;
copy B has none. Every acceptance case runs as a real `python -m refcount`
process on both, and the two answers (exit code, stdout, stderr, with the
store's path written as STORE) must be identical. Each process runs with
`-X importtime`, so a test sees which modules it loaded: a client answered by
the daemon never loads `refcount.cli`, and one that ran the command itself
always does. That is how the tests know which path was taken, and how they
prove that the daemon path imports nothing heavy.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import pytest
import storekit as sk
import typer.main
from conftest import SEVERAL_STORES

from refcount import cli, client, layout, store, wire

DEADLINE = 10.0
HEAVY = ("sqlalchemy", "alembic", "watchdog", "rich", "prometheus_client", "typer", "refcount.core")


# --------------------------------------------------------------------------
# Running the client as a process
# --------------------------------------------------------------------------
@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str
    imported: frozenset[str]

    @property
    def served(self) -> bool:
        """The daemon answered: this process never loaded the CLI."""
        return "refcount.cli" not in self.imported

    def answer(self, store: Path) -> tuple[int, str, str]:
        """What a user sees, with the store's path (which differs per copy) as STORE."""
        return (
            self.code,
            self.out.replace(str(store), "STORE"),
            self.err.replace(str(store), "STORE"),
        )


def refcount(
    store: Path | None, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> Ran:
    """`python -X importtime -m refcount [--store STORE] ARGS...` as a process."""
    argv = [sys.executable, "-X", "importtime", "-m", "refcount"]
    if store is not None:
        argv += ["--store", str(store)]
    ran = subprocess.run(
        [*argv, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**os.environ, **(env or {})},
        cwd=cwd,
    )
    imported, err = set(), []
    for line in ran.stderr.splitlines(keepends=True):
        if line.startswith("import time:"):
            if "imported package" not in line:  # the header
                imported.add(line.rsplit("|", 1)[1].strip())
        else:
            err.append(line)
    return Ran(ran.returncode, ran.stdout, "".join(err), frozenset(imported))


def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)
    return value


def socket_of(store: Path) -> Path:
    return store / ".refcount" / "refcount.sock"


class Daemon:
    """`refcount --store S watch` as a process, its log in a file."""

    def __init__(self, store: Path, log_path: Path) -> None:
        self.store = store
        self.log_path = log_path
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refcount",
                "--store",
                str(store),
                "watch",
                "--debounce",
                "0.05",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(
            lambda: (
                self.proc.poll() is not None
                or ("full reconcile (start)" in self.log() and socket_of(store).exists())
            ),
            "the daemon to start serving",
        )
        assert self.proc.poll() is None, self.log()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, signum: int = signal.SIGKILL) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            return self.proc.wait(10)
        finally:
            self._log.close()


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[Callable[[Path], Daemon]]:
    started: list[Daemon] = []

    def start(store: Path) -> Daemon:
        started.append(Daemon(store, tmp_path / f"watch-{len(started)}.log"))
        return started[-1]

    yield start
    for daemon in started:
        daemon.stop()


def build_store(path: Path) -> Path:
    """Images sharing a base layer, a multi-arch index, a referrer; indexed by init."""
    s = sk.make_layout(path)
    base = b"base layer"
    a = sk.add_image(s, [base, b"a only"], tag="a:1")
    sk.add_image(s, [base, b"b only"], tag="b:1")
    sk.add_image(s, [b"c only"], tag="c:1")
    arm = sk.add_image(s, [base, b"arm"], tag=None, index_entry=False)
    amd = sk.add_image(s, [base, b"amd"], tag=None, index_entry=False)
    sk.add_index(s, [amd, arm], tag="multi:1")
    sk.add_referrer(s, a)
    ran = refcount(s, "init", env={"REFCOUNT_NO_DAEMON": "1"})
    assert ran.code == 0, ran.err
    return s


@pytest.fixture
def pair(tmp_path: Path, daemons: Callable[[Path], Daemon]) -> tuple[Path, Path]:
    """(A, B): two identical indexed stores; a daemon serves A, none runs on B."""
    a = build_store(tmp_path / "a" / "store")
    b = tmp_path / "b" / "store"
    shutil.copytree(a, b, symlinks=True)
    daemons(a)
    return a, b


def both(pair: tuple[Path, Path], *args: str) -> tuple[int, str, str]:
    """Run ARGS on A through the daemon and on B directly; they must answer alike."""
    a, b = pair
    served = refcount(a, *args)
    direct = refcount(b, *args, env={"REFCOUNT_NO_DAEMON": "1"})
    assert served.served, f"{args}: the daemon did not answer on A"
    assert not direct.served
    assert served.answer(a) == direct.answer(b), args
    return served.answer(a)


def test_du_answers_identically_through_the_daemon(pair: tuple[Path, Path]) -> None:
    code, out, _ = both(pair, "du")
    assert code == 0 and out.startswith("TAG ") and "EXCLUSIVE" in out.splitlines()[0]
    code, out, _ = both(pair, "--json", "du", "a:1")
    assert code == 0 and [t["tag"] for t in json.loads(out)["tags"]] == ["a:1"]
    code, out, err = both(pair, "du", "nope")
    assert (code, out) == (1, "") and "nope: no such tag" in err


def tamper_count(store: Path, digest: str) -> None:
    """Make the database disagree with the disk (no file event: the daemon does not see it)."""
    connection = sqlite3.connect(store / ".refcount" / "refcount.db", timeout=10)
    try:
        with connection:
            connection.execute("UPDATE blobs SET count = count + 1 WHERE digest = ?", (digest,))
    finally:
        connection.close()


# --------------------------------------------------------------------------
# Identical answers both ways
# --------------------------------------------------------------------------
# A and B are copies of one store (one identity): on PostgreSQL they would share the test's
# database, and a count tampered with on each would be tampered with twice.
@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_the_acceptance_cases_answer_identically_through_the_daemon_and_directly(
    pair: tuple[Path, Path],
) -> None:
    a, _ = pair
    base = sk.sha256_digest(b"base layer")  # a:1 keeps it through every delete below
    manifest_a = next(e["digest"] for e in sk.read_index(a)["manifests"] if sk.tag_of(e) == "a:1")

    code, out, _ = both(pair, "tags")
    assert code == 0 and "multi:1" in out
    code, out, _ = both(pair, "--json", "tags")
    assert code == 0 and {t["tag"] for t in json.loads(out)} == {"a:1", "b:1", "c:1", "multi:1"}
    assert both(pair, "show", "a:1")[0] == 0
    assert both(pair, "--json", "show", base)[0] == 0
    code, out, _ = both(pair, "verify")
    assert code == 0 and out.startswith("OK: ")

    code, out, _ = both(pair, "delete", "tag", "b:1", "--dry-run")
    assert code == 0 and out.startswith("would remove 1 index.json entry:")
    code, out, _ = both(pair, "delete", "tag", "b:1")
    assert code == 0 and out.startswith("removed 1 index.json entry:")
    code, out, _ = both(pair, "--json", "delete", "tag", "multi:1")
    assert code == 0 and json.loads(out)["freed"]
    code, out, _ = both(pair, "delete", "manifest", manifest_a, "--dry-run")
    assert code == 0 and "would free" in out

    assert both(pair, "delete", "tag", "b:1") == (
        1,
        "",
        "refcount: error: b:1: no such tag in STORE/index.json\n",
    )
    code, out, _ = both(pair, "delete", "tag", "b:1", "--json")  # options after the command
    assert code == 1 and json.loads(out)["exit_code"] == 1
    code, out, _ = both(pair, "tags", "--all")
    assert code == 0 and out.startswith("TAG ") and "RELATION" in out.splitlines()[0]
    code, out, err = both(pair, "show", "sha256:zz")
    assert (code, out) == (2, "") and err.startswith("refcount: error: sha256:zz: ")
    code, _, err = both(pair, "delete", "tag")  # a usage error, found by Typer
    assert code == 2 and "Missing argument" in err
    assert both(pair, "gc", "--dry-run")[0] == 0
    assert both(pair, "sync")[0] == 0

    for copy in pair:
        tamper_count(copy, base)
    code, out, _ = both(pair, "verify")
    assert code == 1 and f"drift {base}" in out
    code, _, err = both(pair, "verify", "--repair")  # its warning is a log line on stderr
    assert "counts rewritten" in err
    assert both(pair, "verify")[0] == 0


def test_the_client_finds_the_store_as_the_cli_does_and_sends_it_absolute(
    pair: tuple[Path, Path],
) -> None:
    a, _ = pair
    by_option = refcount(None, "--store", "store", "tags", cwd=a.parent)
    by_equals = refcount(None, "--store=store", "tags", cwd=a.parent)
    by_env = refcount(None, "tags", env={"REFCOUNT_STORE": "store"}, cwd=a.parent)
    by_cwd = refcount(None, "tags", cwd=a)
    assert all(r.served for r in (by_option, by_equals, by_env, by_cwd))
    assert by_option.out == by_equals.out == by_env.out == by_cwd.out
    assert by_option.code == 0 and "a:1" in by_option.out


def test_refcount_db_of_the_client_is_what_the_daemon_uses(pair: tuple[Path, Path]) -> None:
    a, b = pair
    url = f"sqlite:///{a.parent / 'elsewhere.db'}"
    made = refcount(a, "init", env={"REFCOUNT_DB": url})
    assert made.served and made.code == 0, made.err
    assert (a.parent / "elsewhere.db").exists()  # made by the daemon, for this client
    ran = refcount(a, "--json", "tags", env={"REFCOUNT_DB": url})
    assert ran.served and ran.code == 0, ran.err
    direct_url = f"sqlite:///{b.parent / 'elsewhere.db'}"
    direct_env = {"REFCOUNT_DB": direct_url, "REFCOUNT_NO_DAEMON": "1"}
    assert refcount(b, "init", env=direct_env).code == 0
    direct = refcount(b, "--json", "tags", env=direct_env)
    assert ran.answer(a) == direct.answer(b)


# --------------------------------------------------------------------------
# What the client imports; when it runs the command itself
# --------------------------------------------------------------------------
def test_the_client_answered_by_the_daemon_imports_nothing_heavy(pair: tuple[Path, Path]) -> None:
    a, _ = pair
    ran = refcount(a, "delete", "tag", "c:1")
    assert ran.code == 0 and ran.served
    heavy = sorted(m for m in ran.imported if m.split(".")[0] in HEAVY or m in HEAVY)
    assert heavy == [], heavy
    assert {m for m in ran.imported if m.startswith("refcount")} == {
        "refcount",
        "refcount.client",
        "refcount.argv",
        "refcount.interrupts",
        "refcount.layout",
        "refcount.wire",
    }  # and refcount/__main__.py, which runs as __main__


@pytest.mark.parametrize(
    ("args", "env"),
    [
        (("tags",), {"REFCOUNT_NO_DAEMON": "1"}),
        (("-v", "tags"), {}),
        (("tags", "--help"), {}),
        (("db", "current"), {}),
    ],
    ids=["REFCOUNT_NO_DAEMON", "verbose", "help", "db"],
)
def test_some_commands_always_run_in_the_client(
    pair: tuple[Path, Path], args: tuple[str, ...], env: dict[str, str]
) -> None:
    a, _ = pair
    ran = refcount(a, *args, env=env)
    assert ran.code == 0, ran.err
    assert not ran.served


def test_after_a_killed_daemon_the_stale_socket_is_ignored_then_replaced(
    pair: tuple[Path, Path], daemons: Callable[[Path], Daemon]
) -> None:
    a, b = pair
    pid = int((a / ".refcount" / "watch.pid").read_text())
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: _nobody_listens(socket_of(a)), "the daemon to die")
    assert stat.S_ISSOCK(socket_of(a).lstat().st_mode)  # left behind
    ran = refcount(a, "delete", "tag", "c:1")
    assert not ran.served
    assert ran.answer(a) == refcount(b, "delete", "tag", "c:1").answer(b)

    daemons(a)  # a new daemon takes the stale name over
    again = refcount(a, "delete", "tag", "a:1")
    assert again.served
    assert again.answer(a) == refcount(b, "delete", "tag", "a:1").answer(b)


def _nobody_listens(path: Path) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.connect(str(path))
        except ConnectionRefusedError:
            return True
    return False


def test_a_clean_stop_removes_the_socket(daemons: Callable[[Path], Daemon], tmp_path: Path) -> None:
    c = build_store(tmp_path / "c" / "store")
    daemon = daemons(c)
    assert daemon.stop(signal.SIGTERM) == 0
    assert not socket_of(c).exists()


# --------------------------------------------------------------------------
# The socket
# --------------------------------------------------------------------------
def test_the_socket_is_mode_0600(pair: tuple[Path, Path]) -> None:
    mode = socket_of(pair[0]).lstat().st_mode
    assert stat.S_ISSOCK(mode)
    assert stat.S_IMODE(mode) == 0o600


def test_the_daemon_refuses_to_run_watch_or_db_for_a_client(pair: tuple[Path, Path]) -> None:
    a, _ = pair
    for command in (["watch"], ["db", "upgrade"]):
        code, out, err = client.ask_daemon(str(socket_of(a)), ["--store", str(a), *command])
        assert (code, out) == (2, "")
        assert err == f"refcount: error: {command[0]}: not run by the daemon; run it directly\n"


def test_a_store_whose_socket_path_is_too_long_for_sockaddr_is_still_served(
    tmp_path: Path, daemons: Callable[[Path], Daemon]
) -> None:
    deep = build_store(tmp_path / ("d" * 80) / "store")
    assert len(str(socket_of(deep))) > 108
    daemons(deep)
    ran = refcount(deep, "tags")
    assert ran.served and ran.code == 0 and "multi:1" in ran.out


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as another user (setuid)")
def test_a_peer_of_another_uid_is_refused_even_when_the_file_mode_lets_it_in(
    pair: tuple[Path, Path], daemons: Callable[[Path], Daemon]
) -> None:
    """A forked child becomes `nobody` and connects. The socket's 0600 (and the
    0700 of .refcount/) would stop it before connect(); the test widens both, so
    that the daemon's own SO_PEERCRED check is what is tested. The daemon closes
    without ACCEPTED and runs nothing."""
    a, _ = pair
    state = socket_of(a).parent
    os.chmod(socket_of(a), 0o666)
    os.chmod(state, 0o711)
    request = json.dumps({"argv": ["--store", str(a), "delete", "tag", "a:1"]}).encode()
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: only system calls, then _exit
        outcome = "no outcome"
        try:
            os.chdir(state)  # its ancestors are root's 0700 tmp
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(DEADLINE)
                sock.connect(layout.SOCKET)
                try:
                    sock.sendall(len(request).to_bytes(4, "big") + request)
                    outcome = "refused" if sock.recv(1) == b"" else "accepted"
                except (BrokenPipeError, ConnectionResetError):  # closed before reading
                    outcome = "refused"
        except BaseException as exc:
            outcome = repr(exc)
        finally:
            os.write(writer, outcome.encode())
            os._exit(0)
    os.close(writer)
    os.waitpid(pid, 0)
    with os.fdopen(reader) as pipe:
        outcome = pipe.read()
    os.chmod(state, 0o700)
    assert outcome == "refused"
    log = (a.parent.parent / "watch-0.log").read_text()
    assert "refused a connection from pid" in log and "of uid 65534" in log
    assert "a:1" in {sk.tag_of(e) for e in sk.read_index(a)["manifests"]}


# --------------------------------------------------------------------------
# The client's own parts
# --------------------------------------------------------------------------
def test_the_client_agrees_with_the_modules_it_cannot_import() -> None:
    assert client.STATE_DIR == store.STATE_DIR
    assert client.SERVED == cli.SERVED_COMMANDS
    assert client.INTERNAL_ERROR == cli.INTERNAL_ERROR
    # Every global option of the CLI is known to the client's parser: one taking a
    # value, a flag, or one that makes the client run the command itself.
    command = typer.main.get_command(cli.app)
    direct = {"-v", "--verbose", "-h", "--help", "--version"}
    for param in command.params:
        names = {*param.opts, *param.secondary_opts}
        takes_value = not getattr(param, "is_flag", False) and not getattr(param, "count", False)
        known = client._VALUE_OPTIONS if takes_value else client._FLAG_OPTIONS | direct
        assert names <= known, names


def test_the_client_builds_the_daemons_command_line(tmp_path: Path) -> None:
    env = {"REFCOUNT_STORE": str(tmp_path)}
    build = client.daemon_argv
    assert build(["tags"], env) == ["--store", str(tmp_path), "tags"]
    assert build(["--store", "x", "--json", "show", "a"], {}) == [
        "--store",
        os.path.abspath("x"),
        "--json",
        "show",
        "a",
    ]
    assert build(["--store=x", "--store", "y", "gc"], {})[:2] == ["--store", os.path.abspath("y")]
    assert build(["tags", "--store", "x", "--json"], {}) == [
        "--store",
        os.path.abspath("x"),
        "--json",
        "tags",
    ]
    assert build(["delete", "tag", "--store=x", "a", "--keep-untagged"], {}) == [
        "--store",
        os.path.abspath("x"),
        "--keep-untagged",
        "delete",
        "tag",
        "a",
    ]
    assert build(["--grace", "1h", "gc"], env) == ["--store", str(tmp_path), "--grace=1h", "gc"]
    assert build(["sync"], {**env, "REFCOUNT_DB": "postgresql://h/db"}) == [
        "--store",
        str(tmp_path),
        "--db=postgresql://h/db",
        "sync",
    ]
    assert build(["--db", "sqlite:////abs.db", "sync"], {**env, "REFCOUNT_DB": "x://"}) == [
        "--store",
        str(tmp_path),
        "--db=sqlite:////abs.db",
        "sync",
    ]
    for argv, environ in [
        (["tags"], {"REFCOUNT_NO_DAEMON": "1"}),
        (["-vv", "tags"], {}),
        (["--verbose", "tags"], {}),
        (["--bogus", "tags"], {}),
        (["watch"], {}),
        (["db", "current"], {}),
        (["delete"], {}),
        (["delete", "--help"], {}),
        (["delete", "tag", "-h"], {}),
        ([], {}),
        (["--store"], {}),
        (["--version"], {}),
        (["tags", "-v"], {}),
        (["--db", "sqlite:///relative.db", "tags"], {}),
        (["tags"], {"REFCOUNT_DB": "sqlite+pysqlite:///relative.db"}),
        (["du", "--html", "du.html"], {}),
        (["--json", "du", "a", "--html=du.html"], {}),
    ]:
        assert build(argv, environ) is None, argv
    assert build(["du", "a"], env) == ["--store", str(tmp_path), "du", "a"]


def _one_shot_server(path: Path, behave: Callable[[socket.socket], None]) -> threading.Thread:
    """A stand-in daemon on `path` that answers one connection with `behave`."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(path))
    listener.listen(1)

    def serve_once() -> None:
        with listener:
            conn, _ = listener.accept()
            with conn:
                behave(conn)

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    return thread


def _read_request(conn: socket.socket) -> None:
    size = int.from_bytes(conn.recv(4), "big")
    while size:
        size -= len(conn.recv(size))


@pytest.mark.parametrize(
    ("behave", "expected"),
    [
        (lambda conn: None, "direct"),  # closed at once, as a refused peer is
        (lambda conn: _read_request(conn), "direct"),  # read, then closed: never ran
        (lambda conn: (_read_request(conn), conn.sendall(wire.ACCEPTED)), 3),  # ran, then lost
    ],
    ids=["closed", "read-not-accepted", "accepted-then-lost"],
)
def test_the_client_runs_a_command_itself_only_when_the_daemon_never_took_it(
    store: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    behave: Callable[[socket.socket], None],
    expected: object,
) -> None:
    (store / ".refcount").mkdir()
    thread = _one_shot_server(socket_of(store), behave)
    monkeypatch.setattr(client, "_direct", lambda argv: "direct")
    result = client.main(["--store", str(store), "delete", "tag", "a:1"])
    thread.join(DEADLINE)
    assert result == expected
    if expected == 3:
        assert "it may or may not have taken effect" in capsys.readouterr().err
