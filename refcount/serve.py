"""The daemon's command socket: `refcount` commands answered from a warm process.

How the pieces fit together (SPEC §6): `refcount.client` finds
`STORE/.refcount/refcount.sock`, connects and sends one request; the
`CommandServer` here, started by `refcount.watch`, runs it with the callable it
was given (the CLI's `serve_request`, passed down by the `watch` command, so
this module knows nothing of the CLI) and sends back what the command printed.

The exchange on one connection, every frame a 4-byte big-endian length and
that many bytes of UTF-8 JSON:

    client -> server   {"argv": [...], "stdout_isatty": false}
    server -> client   the single byte ACCEPTED, once the request is read whole
    server -> client   {"code": int, "out": str, "err": str}

The ACCEPTED byte is what lets the client fall back safely: a client that never
got it knows the command did not run (the daemon was gone, stopping, or refused
it) and runs it itself; one that got it and then lost the connection must not
run it again, since the command may have done its work.

The client sends nothing after its request, so end of file on the connection
means it went away or was interrupted (it shuts its side and waits for the
answer): a request whose client is gone before it starts is not run, and while
one runs a small thread watches the connection and sets the request's cancel
event, which stops the command at its next checkpoint, as SIGINT stops a CLI
process (`refcount.interrupts`). The next request does not wait for abandoned
work.

Who may connect: the socket is made mode 0600 before it listens, and a peer
whose uid (SO_PEERCRED) is not the daemon's is refused anyway (root ignores file
modes).

Each connection is served on a thread of its own (at most MAX_SERVING at once;
more wait in the listen backlog). Requests the caller's `concurrent(argv)`
accepts (the CLI's deletes, which join the daemon's group commit,
`refcount.group`) run as soon as they are read, beside each other and beside
the rest; every other request runs one at a time, as it always did: it is
accepted only when the one before it is done, so a client that gave up
meanwhile is never run. Each takes the store's lock like any CLI process, so
the watcher's batches go on between them.

Only the standard library is imported here.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from refcount.errors import CannotServe, ExitCode
from refcount.wire import ACCEPTED, recv_exact, recv_size, send_frame, short_path

log = logging.getLogger(__name__)

MAX_REQUEST = 1 << 20
"""Largest request frame read, in bytes (an argv; a bigger one is not a client's)."""
READ_TIMEOUT = 10.0
"""Seconds a connected peer has to send its request before it is dropped."""
POLL = 0.2
"""Seconds between checks for a stop while waiting for connections."""
MAX_SERVING = 32
"""Connections served at once (a thread each); more wait in the listen backlog."""
BACKLOG = 64
"""Connections the kernel holds before they are accepted: twenty clients at once
must not find it full (a client whose connect times out runs the command itself)."""
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid

Handler = Callable[[list[str], threading.Event], tuple[int, str, str]]
"""Runs one command line; returns (exit code, stdout, stderr). The event is set
when the client goes away: the command should stop (and answer exit 130). It
is called from several threads at once for the requests `concurrent` accepts."""
Concurrent = Callable[[list[str]], bool]
"""Whether a command line may run beside others (else: one at a time)."""


def _never(_argv: list[str]) -> bool:
    return False


class _BadRequest(Exception):
    pass


def _read_request(sock: socket.socket) -> list[str]:
    size = recv_size(sock)
    if size > MAX_REQUEST:
        raise _BadRequest(f"a request of {size} bytes")
    try:
        request = json.loads(recv_exact(sock, size))
    except ValueError as exc:
        raise _BadRequest(f"not JSON: {exc}") from None
    argv = request.get("argv") if isinstance(request, dict) else None
    if not isinstance(argv, list) or not all(isinstance(a, str) for a in argv):
        raise _BadRequest("no argv list of strings")
    return argv


def _hung_up(conn: socket.socket) -> bool:
    """Whether the peer closed or shut its side; call only when `conn` is readable."""
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True


def _gone(conn: socket.socket) -> bool:
    """Whether the peer has already closed or shut its side (no waiting)."""
    poller = select.poll()
    poller.register(conn.fileno(), select.POLLIN)
    return bool(poller.poll(0)) and _hung_up(conn)


class _PeerWatch:
    """While a request runs: set `cancel` when its client hangs up.

    A thread polls the connection and a pipe; leaving the block writes to the
    pipe, so the thread ends at once and the connection is the serving
    thread's alone again before it answers.
    """

    def __init__(self, conn: socket.socket, cancel: threading.Event) -> None:
        self.conn = conn
        self.cancel = cancel
        self._wake_read, self._wake_write = os.pipe()
        self._thread = threading.Thread(target=self._run, name="refcount-serve-peer", daemon=True)

    def __enter__(self) -> _PeerWatch:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        os.write(self._wake_write, b"\0")
        self._thread.join()
        os.close(self._wake_read)
        os.close(self._wake_write)

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self.conn.fileno(), select.POLLIN | select.POLLRDHUP)
        poller.register(self._wake_read, select.POLLIN)
        while True:
            ready = dict(poller.poll())
            if self._wake_read in ready:
                return
            if _hung_up(self.conn):
                self.cancel.set()
                return
            # Bytes the protocol does not send: not a hang-up; stop looking.
            poller.unregister(self.conn.fileno())


class CommandServer:
    """Serve `handler` on a Unix socket at `path`, a thread per connection.

    Call `start()` only while holding the store's daemon lock: a socket file
    already there is then a dead daemon's and is replaced. `close()` stops
    accepting, lets the requests in hand finish (up to `timeout`), and removes
    the socket file.
    """

    def __init__(self, path: Path, handler: Handler, concurrent: Concurrent = _never) -> None:
        self.path = path
        self.handler = handler
        self.concurrent = concurrent
        self._stopping = threading.Event()
        self._listener: socket.socket | None = None
        self._thread = threading.Thread(target=self._run, name="refcount-serve", daemon=True)
        self._slots = threading.BoundedSemaphore(MAX_SERVING)
        self._one_at_a_time = threading.Lock()
        self._serving: set[threading.Thread] = set()
        self._serving_lock = threading.Lock()

    def start(self) -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(str(self.path)) as name:
                with suppress(FileNotFoundError):
                    os.unlink(name)  # a killed daemon's socket: nobody answers on it
                listener.bind(name)
                # Nobody can connect before listen(), so 0600 is in place before
                # anyone could use the file's first, wider mode.
                os.chmod(name, 0o600)
            listener.listen(BACKLOG)
            listener.settimeout(POLL)
        except OSError as exc:
            listener.close()
            raise CannotServe(
                f"{self.path}: cannot serve commands: {exc.strerror or exc}"
            ) from None
        self._listener = listener
        self._thread.start()
        log.debug("serving commands on %s", self.path)

    def close(self, timeout: float = 30.0) -> None:
        self._stopping.set()
        deadline = time.monotonic() + timeout
        if self._thread.is_alive():
            self._thread.join(timeout)
        with self._serving_lock:
            serving = list(self._serving)
        for thread in serving:
            thread.join(max(0.0, deadline - time.monotonic()))
        listener, self._listener = self._listener, None
        if listener is None:
            return
        try:
            with short_path(str(self.path)) as name:
                os.unlink(name)
        except OSError:
            pass
        listener.close()

    def _run(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            if not self._slots.acquire(timeout=POLL):
                continue  # MAX_SERVING in hand: the next waits in the backlog
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                self._slots.release()
                continue
            except OSError as exc:
                self._slots.release()
                if exc.errno in (errno.EINTR, errno.ECONNABORTED, errno.EMFILE, errno.ENFILE):
                    self._stopping.wait(POLL)  # out of descriptors: try again soon
                    continue
                log.error("serve: cannot accept on %s: %s; no longer serving", self.path, exc)
                return
            thread = threading.Thread(
                target=self._serve_connection, args=(conn,), name="refcount-serve-conn"
            )
            with self._serving_lock:
                self._serving.add(thread)
            thread.start()

    def _serve_connection(self, conn: socket.socket) -> None:
        try:
            with conn:
                self._serve_one(conn)
        except Exception:
            log.exception("serve: a request failed")
        finally:
            with self._serving_lock:
                self._serving.discard(threading.current_thread())
            self._slots.release()

    @contextmanager
    def _turn(self, argv: list[str]) -> Iterator[bool]:
        """Yields whether the request may run now: at once for a concurrent one,
        else once the one-at-a-time request before it is done (False: the daemon
        is stopping, and the client runs the command itself)."""
        if self.concurrent(argv):
            yield True
            return
        while not self._one_at_a_time.acquire(timeout=POLL):
            if self._stopping.is_set():
                yield False
                return
        try:
            yield True
        finally:
            self._one_at_a_time.release()

    def _serve_one(self, conn: socket.socket) -> None:
        conn.settimeout(READ_TIMEOUT)
        pid, uid, _gid = _PEERCRED.unpack(
            conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _PEERCRED.size)
        )
        if uid != os.geteuid():
            log.warning(
                "serve: refused a connection from pid %d of uid %d (not the daemon's uid %d)",
                pid,
                uid,
                os.geteuid(),
            )
            return  # closed without ACCEPTED: that client runs the command itself
        try:
            argv = _read_request(conn)
        except (_BadRequest, OSError) as exc:
            log.warning("serve: dropped a request from pid %d: %s", pid, exc)
            return
        with self._turn(argv) as now:
            if now:
                self._run_request(conn, pid, argv)

    def _run_request(self, conn: socket.socket, pid: int, argv: list[str]) -> None:
        """Accept the request, run it and answer, unless its client went away
        before it ran (it wants nothing run)."""
        if _gone(conn):  # interrupted while the daemon was busy: it wants nothing run
            log.debug("serve: pid %d went away before its request ran", pid)
            return
        try:
            conn.sendall(ACCEPTED)
        except OSError:  # the client gave up; it runs the command itself
            log.debug("serve: pid %d went away before its request ran", pid)
            return
        log.debug("serve: pid %d: running %s", pid, " ".join(argv))
        cancel = threading.Event()
        try:
            with _PeerWatch(conn, cancel):
                code, out, err = self.handler(argv, cancel)
        except Exception as exc:  # the handler maps errors itself; this is a bug
            log.exception("serve: the command failed")
            code, out, err = (
                ExitCode.INTERNAL,
                "",
                f"refcount: internal error in the daemon: {exc!r}\n",
            )
        if cancel.is_set():
            log.info("serve: pid %d went away or was interrupted; its command exited %d", pid, code)
        conn.settimeout(None)  # the answer may be large; the client reads it whole
        try:
            send_frame(conn, {"code": code, "out": out, "err": err})
        except OSError as exc:
            if cancel.is_set():
                log.debug("serve: pid %d is gone; no answer sent: %s", pid, exc)
            else:
                log.warning("serve: could not answer pid %d: %s", pid, exc)
