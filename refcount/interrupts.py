"""Interrupting a command: SIGINT and SIGTERM to a CLI process, or a daemon's client leaving.

How the pieces fit together (SPEC §7). `refcount.client.run` calls `install()`
before anything else, so from then on SIGINT and SIGTERM raise `Interrupted` in
the main thread: never a KeyboardInterrupt from deep inside an import, and
never death by the signal's default action. The CLI's error boundary turns it
into `refcount: interrupted` and exit 130 (`client.run` does the same around the
import of the CLI, where the boundary does not exist yet).

A command must be either done or not done, never half. The library marks what
must not be cut with `deferred()`: a writing operation from the start of its
transaction through the commit and the journal's settling, and the opening and
closing of a database connection (a driver interrupted half-way logs
tracebacks). Outside sections the handler raises at once, wherever the main
thread is; one that arrives inside a section is recorded and raised when the
outermost section ends, so the operation is rolled back whole, or never began.

A section named after the user's operation (`deferred("delete tag 'a'")`) that
ends normally records instead that the operation completed: the command then
goes on to return and print its report (milliseconds), and the CLI says after
it `refcount: interrupted (delete tag 'a' had completed)`, exit 130.
Long work that may follow calls `checkpoint()`, which raises a recorded
interruption outside sections.

Cancelling is the same thing for a command a daemon runs on a client's behalf
(`refcount.serve` sees the client go away): inside `cancelled_by(event)`, the
event set is a recorded interruption of that thread; sections defer it and
`checkpoint()` raises it. Signals are only ever handled by the main thread,
so what a section defers is per thread: the daemon's other threads are not
affected by its requests, nor the other way round. Without `install()` (the
library embedded in another program) and outside `cancelled_by`, every
function here is a no-op.

Standard library only: the client imports this before anything else.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType, TracebackType

EXIT_CODE = 130
"""The exit code of an interrupted command (128 + SIGINT, as shells report Ctrl-C)."""
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(BaseException):
    """SIGINT or SIGTERM to this process, or the client of a daemon's request went away.

    A BaseException, like KeyboardInterrupt, so that no `except Exception`
    on the way out swallows it; not a KeyboardInterrupt, which Typer turns
    into a silent exit 130.
    """

    def __init__(self, signum: int | None = None) -> None:
        self.signum = signum
        super().__init__("the client went away" if signum is None else signal.Signals(signum).name)


class _ThreadState(threading.local):
    depth = 0
    """Sections entered and not yet left."""
    completed: str | None = None
    """The operation that completed in this command, if one did."""
    cancel: threading.Event | None = None
    """Set when this thread's request is to be cancelled (a daemon's client left)."""
    raised = False
    """This command's Interrupted was raised: nothing more is requested of it."""


_thread = _ThreadState()
_installed = False
_pending: int | None = None
"""A signal that arrived while the main thread could not raise it."""
_done = False
"""An Interrupted is on its way out, or the process is exiting: ignore further signals."""


def install() -> None:
    """Make SIGINT and SIGTERM raise Interrupted in this process (main thread only)."""
    global _installed
    if threading.current_thread() is not threading.main_thread():
        return
    for signum in SIGNALS:
        signal.signal(signum, _handle)
    _installed = True


def _handle(signum: int, _frame: FrameType | None) -> None:
    global _pending, _done
    if _done:
        return
    if _thread.depth or _thread.completed is not None:
        if _pending is None:
            _pending = signum
        return
    _done = _thread.raised = True
    raise Interrupted(signum)


def _armed() -> bool:
    """Whether an interruption can reach this thread at all."""
    if _thread.cancel is not None:
        return True
    return _installed and threading.current_thread() is threading.main_thread()


def requested() -> bool:
    """Whether this thread's command was asked to stop and has not raised it yet."""
    if _thread.raised:
        return False
    cancel = _thread.cancel
    if cancel is not None:
        return cancel.is_set()
    return _pending is not None and threading.current_thread() is threading.main_thread()


def take() -> int | None:
    """The signal recorded in a section, now handled by the caller (who passes it
    on); None when there is none. Main thread only."""
    global _pending
    if threading.current_thread() is not threading.main_thread() or _thread.raised:
        return None
    signum, _pending = _pending, None
    return signum


def _interruption() -> Interrupted:
    global _done
    _thread.raised = True
    if _thread.cancel is not None:
        return Interrupted(None)
    _done = True
    return Interrupted(_pending)


class deferred:
    """A section no interruption cuts: one that arrives inside is raised when the
    outermost section ends (from the exception that ended it, if one did).

    With `what`, the user's operation: ending normally records that it
    completed, and the interruption is left for the CLI to report after the
    operation's report (or for the next `checkpoint()`). Re-entrant; costs a
    counter when nothing can interrupt the thread.

    Also for long work that must not be interrupted at just any bytecode (the
    main thread waiting on a thread pool: a signal raised inside the pool's
    locks leaves one held, and the exit hangs): such work calls `check()`
    where stopping is safe.
    """

    def __init__(self, what: str | None = None) -> None:
        self.what = what
        self._counted = False

    def __enter__(self) -> deferred:
        if _armed():
            _thread.depth += 1
            self._counted = True
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if not self._counted:
            return
        self._counted = False
        if exc is None and self.what is not None:
            _thread.completed = self.what  # first: a signal from here on is recorded
        _thread.depth -= 1
        if _thread.depth or _thread.completed is not None or not requested():
            return
        if exc is not None and not isinstance(exc, Exception):
            return  # already leaving for a reason of its own (SystemExit, Interrupted)
        raise _interruption() from exc

    def check(self) -> None:
        """Raise a recorded interruption here, as `checkpoint()` would outside this
        section; nothing happens when an enclosing section defers it."""
        if self._counted and _thread.depth == 1 and requested():
            raise _interruption()


def checkpoint() -> None:
    """Raise a recorded interruption, unless inside a section. Called by long work
    (scans, hashing) between items; costs one check when there is none."""
    if _thread.depth == 0 and requested():
        raise _interruption()


def begin() -> None:
    """A new command starts in this thread: nothing has completed in it yet."""
    _thread.completed = None


def describe() -> str:
    """The line a user reads on stderr for an interrupted command."""
    what = _thread.completed
    if what is None:
        return "refcount: interrupted"
    return f"refcount: interrupted ({what} had completed)"


def ignore_further() -> None:
    """The process is ending: signals from now on change nothing.

    SIG_IGN rather than a handler that does nothing: at exit the interpreter
    puts SIG_DFL back in place of its handlers (a late signal would then kill
    the process after it printed everything), but leaves SIG_IGN alone.
    """
    global _done
    _done = True
    if _installed and threading.current_thread() is threading.main_thread():
        for signum in SIGNALS:
            signal.signal(signum, signal.SIG_IGN)


@contextmanager
def cancelled_by(event: threading.Event) -> Iterator[None]:
    """Within: `event` being set interrupts this thread's command (a daemon's request)."""
    previous = _thread.cancel, _thread.completed, _thread.depth, _thread.raised
    _thread.cancel, _thread.completed, _thread.depth, _thread.raised = event, None, 0, False
    try:
        yield
    finally:
        _thread.cancel, _thread.completed, _thread.depth, _thread.raised = previous


def cancel_event() -> threading.Event | None:
    """The event that cancels this thread's request (`cancelled_by`), if any."""
    return _thread.cancel


class _AllSet(threading.Event):
    """Set when every one of `events` is: the requests a batch serves have all gone."""

    def __init__(self, events: list[threading.Event]) -> None:
        super().__init__()
        self.events = events

    def is_set(self) -> bool:
        return bool(self.events) and all(e.is_set() for e in self.events)


@contextmanager
def on_behalf_of(events: list[threading.Event | None]) -> Iterator[None]:
    """Within: this thread works for several requests at once (a daemon's group
    commit, `refcount.group`), so it is interrupted only once each of them is
    cancelled: one client leaving must not stop the work of the others. A
    request with no event (a CLI process's own) can never be cancelled, and
    then neither can the work."""
    armed = [e for e in events if e is not None]
    with cancelled_by(_AllSet(armed) if len(armed) == len(events) else threading.Event()):
        yield


def completed(what: str) -> None:
    """Record that this thread's operation `what` completed, though another thread
    did the work (a daemon's group commit): an interruption is then reported as
    `refcount: interrupted (WHAT had completed)`, as for work done here."""
    _thread.completed = what
