"""The `refcount` entry point: hand the command to the store's daemon, or run it here.

Starting Python and importing SQLAlchemy costs far more than a `delete tag`
itself (SPEC §6, issue 5). When a `refcount watch` daemon runs on the store, it
listens on `STORE/.refcount/refcount.sock` and runs CLI commands in its warm
process; this module finds that socket, sends the command line and prints the
answer. It imports only the standard library, and `refcount/__init__.py` loads
nothing eagerly, so on that path the process never imports the library, Typer,
SQLAlchemy or rich.

Everything else runs here, through `refcount.cli.main`, exactly as if there were
no daemon: no socket, a socket nobody listens on (a killed daemon's), a refused
connection, `REFCOUNT_NO_DAEMON=1`, a command the daemon does not serve (`watch`,
`db`), `du --html FILE` (the file is written by this process, with this user's
rights and working directory, never by the daemon), help, `-v` (the log lines a
user asks for are this process's, at the level asked for), anything this small
parser is not sure of (an unknown option: the CLI's own error is the right
answer), and a relative SQLite URL (it would mean another file in the daemon's
working directory).

The answer is the same either way: the daemon runs the same Typer app through
the same error boundary (`refcount.cli.serve_request`), with this process's
store made absolute and its REFCOUNT_DB sent along; stdout is never a terminal
there, so no progress bar is drawn on the daemon path.

A command is run at most once: the daemon sends one ACCEPTED byte when it has
the whole request, and only a client that never received it runs the command
itself. A connection lost after it is an error (exit 3), since the command may
have done its work. The protocol is described in `refcount.serve`, which this
module cannot import at module level; `tests/test_fastpath.py` checks that the
two agree.

Interruptions (SPEC §7, `refcount.interrupts`): `run()` makes SIGINT and
SIGTERM raise `Interrupted` before it does anything else, and whatever is
running then (this module, the import of the CLI, a command) ends with
`refcount: interrupted`, exit 130, never a traceback. Once the daemon may have
the request, an interruption is passed on to it instead: the client shuts its
side of the connection, which the daemon takes as "stop the command", and
waits up to CANCEL_WAIT seconds for the answer, which says whether it ran.
"""

from __future__ import annotations

import gc
import json
import math
import os
import socket
import sys
import time
from collections.abc import Mapping
from contextlib import suppress

from refcount import interrupts
from refcount.argv import GLOBAL_FLAGS, GLOBAL_VALUE_OPTIONS, normalise
from refcount.layout import SOCKET, STATE_DIR
from refcount.wire import ACCEPTED, recv_exact, recv_size, send_frame, short_path

NO_DAEMON_ENV = "REFCOUNT_NO_DAEMON"
CONNECT_TIMEOUT = 1.0
"""Seconds to wait for the daemon to take the connection before running here."""
INTERNAL_ERROR = 3  # refcount.errors.ExitCode.INTERNAL (the errors module is not loaded here)
CANCEL_WAIT = 5.0
"""Seconds an interrupted client waits for the daemon to say whether the command ran."""
POLL = 0.1
"""Seconds between looks for an interruption while waiting for the daemon."""

SERVED = frozenset({"init", "sync", "delete", "verify", "gc", "tags", "du", "show", "touch"})
"""refcount.cli.SERVED_COMMANDS: what the daemon runs for a client."""
_VALUE_OPTIONS = GLOBAL_VALUE_OPTIONS
_FLAG_OPTIONS = GLOBAL_FLAGS - {"--verbose"}  # -v: the log lines asked for are this process's


class _NotSent(Exception):
    """The daemon did not take the command: run it here."""


class _GaveUp(Exception):
    """Interrupted, and the daemon did not say in time whether the command ran."""


class _Exchange:
    """The socket, read with interruptions passed on to the daemon.

    Reads happen inside `interrupts.deferred()`, so a signal never cuts one in
    half (a byte read and dropped would garble the answer); every POLL seconds
    of waiting, this looks for one. The first shuts the client's side of the
    connection, which the daemon takes as "stop the command"
    (`refcount.serve`), and reading goes on for at most CANCEL_WAIT seconds; a
    second one gives up at once.
    """

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.cancelled = False
        self.signum: int | None = None
        self._deadline = math.inf

    def recv(self, bufsize: int, /) -> bytes:
        while True:
            try:
                return self.sock.recv(bufsize)
            except TimeoutError:
                self._look()

    def _look(self) -> None:
        signum = interrupts.take()
        if signum is not None:
            if self.cancelled:
                raise _GaveUp
            self.cancelled, self.signum = True, signum
            with suppress(OSError):
                self.sock.shutdown(socket.SHUT_WR)
            self._deadline = time.monotonic() + CANCEL_WAIT
        if time.monotonic() > self._deadline:
            raise _GaveUp


def daemon_argv(argv: list[str], environ: Mapping[str, str]) -> list[str] | None:
    """The command line to send to the daemon, or None when it must run here.

    The store is resolved as the CLI resolves it (the last `--store`, before or
    after the command, else REFCOUNT_STORE, else the working directory), made
    absolute and put first; REFCOUNT_DB becomes `--db` unless the command line has
    one. Global options other than `--store` are sent as they are, before the
    command (`refcount.argv`).
    """
    if environ.get(NO_DAEMON_ENV, "") not in ("", "0"):
        return None
    if "--help" in argv or "-h" in argv:
        return None
    argv = normalise(argv)
    store: str | None = None
    root: str | None = None
    repo: str | None = None
    db: str | None = None
    rest: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        name, eq, value = arg.partition("=")
        if name in _VALUE_OPTIONS:
            if not eq:
                if i + 1 >= len(argv):
                    return None
                i += 1
                value = argv[i]
            if name == "--store":
                store = value
            elif name == "--root":
                root = value
            elif name == "--repo":
                repo = value
            else:
                if name == "--db":
                    db = value
                rest.append(f"{name}={value}")
        elif arg in _FLAG_OPTIONS:
            rest.append(arg)
        elif arg.startswith("-"):  # -v, --verbose, --, or something the CLI must judge
            return None
        else:
            break
        i += 1
    command = argv[i:]
    if not command or command[0] not in SERVED:
        return None
    if command[0] == "delete" and (len(command) < 2 or command[1] not in ("tag", "manifest")):
        return None
    if command[0] == "du" and any(a == "--html" or a.startswith("--html=") for a in command):
        return None  # the file is the user's: written by this process, as this user, here
    if db is None and environ.get("REFCOUNT_DB"):
        db = environ["REFCOUNT_DB"]
        rest.append(f"--db={db}")
    if db is not None and _relative_sqlite(db):
        return None
    if root is not None:  # one repository's daemon serves it; across the root, run here
        if repo is None or store is not None or ".." in repo.split("/"):
            return None
        return ["--root", os.path.abspath(root), "--repo", repo, *rest, *command]
    if repo is not None:
        return None
    if store is None:
        store = environ.get("REFCOUNT_STORE") or "."
    return ["--store", os.path.abspath(store), *rest, *command]


def _socket_of(request: list[str]) -> str:
    """The socket of the store a `daemon_argv` request is for (`--root R --repo N`: R/N;
    a store's daemon may keep it in REFCOUNT_RUN_DIR, as `watch --run-dir` does)."""
    if request[0] == "--root":
        return os.path.join(request[1], request[3], STATE_DIR, SOCKET)
    run_dir = os.environ.get("REFCOUNT_RUN_DIR") or os.path.join(request[1], STATE_DIR)
    return os.path.join(run_dir, SOCKET)


def _relative_sqlite(url: str) -> bool:
    """A SQLite URL naming a file relative to the working directory."""
    scheme, sep, path = url.partition(":///")
    return bool(sep) and scheme.split("+")[0] == "sqlite" and not path.startswith("/")


def ask_daemon(socket_path: str, argv: list[str]) -> tuple[int, str, str]:
    """Have the daemon on `socket_path` run `argv`; returns (code, stdout, stderr).

    Raises _NotSent when the command did not run there (no daemon, a stale
    socket, refused, busy past CONNECT_TIMEOUT), OSError when the connection
    was lost after the daemon took the command, Interrupted when the client was
    interrupted before the daemon took it (it never will), and _GaveUp when the
    daemon took it and did not answer in time after an interruption. After one,
    the answer is the daemon's (exit 130: it stopped or says what had completed),
    or exit 130 added to it when the daemon had finished before it noticed.
    """
    request = {"argv": argv, "stdout_isatty": False}
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(CONNECT_TIMEOUT)
        try:
            with short_path(socket_path) as name:
                sock.connect(name)
        except OSError as exc:
            raise _NotSent from exc
        # The answer, once here, is printed whole: an interruption after it (but
        # not one passed on to the daemon) is reported after it (see main).
        with interrupts.deferred("the command"):
            exchange = _Exchange(sock)
            try:
                sock.settimeout(None)
                send_frame(sock, request)
                # A daemon that is busy reads this only when the command before it
                # is done: wait as long as that takes (Ctrl-C stops waiting).
                sock.settimeout(POLL)
                accepted = exchange.recv(1) == ACCEPTED
            except (OSError, _GaveUp) as exc:
                accepted = False
                if not exchange.cancelled:
                    raise _NotSent from exc
            if not accepted:
                if exchange.cancelled:  # a daemon never runs a request whose client left
                    raise interrupts.Interrupted(exchange.signum)
                raise _NotSent
            answer = json.loads(recv_exact(exchange, recv_size(exchange)))
    code, out, err = int(answer["code"]), str(answer["out"]), str(answer["err"])
    if exchange.cancelled and code != interrupts.EXIT_CODE:
        return interrupts.EXIT_CODE, out, f"{err}{interrupts.describe()}\n"
    return code, out, err


def _direct(argv: list[str]) -> int:
    """Run the command in this process.

    The library's import makes some 200,000 objects (SQLAlchemy, Typer, refcount's
    own), none of them garbage, and that many new objects set off full collections
    of the cyclic garbage collector during the import and again in the command,
    some 60 ms of a direct `delete tag`. So the collector pauses while the library
    is imported, then those objects are frozen out of its reach (`gc.freeze`):
    what the command itself allocates is collected as usual.
    """
    gc.disable()
    try:
        from refcount.cli import main
    finally:
        gc.freeze()
        gc.enable()
    return main(argv)


def main(argv: list[str] | None = None) -> int:
    """Run `refcount ARGV`, through the daemon when one serves the store."""
    args = sys.argv[1:] if argv is None else argv
    request = daemon_argv(args, os.environ)
    if request is None:
        return _direct(args)
    socket_path = _socket_of(request)
    if not os.path.exists(socket_path):
        return _direct(args)
    try:
        code, out, err = ask_daemon(socket_path, request)
    except _NotSent:
        return _direct(args)
    except _GaveUp:
        print(
            f"refcount: interrupted before the daemon ({socket_path}) said whether the "
            "command ran; it may or may not take effect: check with `refcount verify`",
            file=sys.stderr,
        )
        return interrupts.EXIT_CODE
    except (OSError, ValueError, KeyError) as exc:
        print(
            f"refcount: error: {socket_path}: lost the daemon while it ran the command "
            f"({exc}); it may or may not have taken effect: check with `refcount verify`",
            file=sys.stderr,
        )
        return INTERNAL_ERROR
    sys.stdout.write(out)
    sys.stdout.flush()
    sys.stderr.write(err)
    sys.stderr.flush()
    if code != interrupts.EXIT_CODE and interrupts.requested():  # came after the answer
        print(interrupts.describe(), file=sys.stderr)
        return interrupts.EXIT_CODE
    return code


def run() -> None:
    """The console script and `python -m refcount`."""
    interrupts.install()  # first: from here on SIGINT and SIGTERM end in one line, exit 130
    try:
        try:
            code = main()
        finally:
            interrupts.ignore_further()  # exiting now: a late signal changes nothing
    except interrupts.Interrupted:
        print(interrupts.describe(), file=sys.stderr)
        code = interrupts.EXIT_CODE
    _exit(code)


def _exit(code: int) -> None:
    """End the process once its output is out, skipping the interpreter's teardown.

    Every operation has finished or been rolled back by now (interruptions wait for
    the end of a section), so teardown has nothing left to keep safe; but the
    finalizers of libraries it runs (SQLAlchemy's weak-reference callbacks, for one)
    can print an "Exception ignored ... Traceback" of their own when a signal left
    objects half collected, and no traceback may reach a user.
    """
    logging = sys.modules.get("logging")
    if logging is not None:
        logging.shutdown()  # whatever its handlers hold is written out
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # a closed pipe (`| head`) has nothing to say
            stream.flush()
    os._exit(code)
