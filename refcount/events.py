"""The watchdog adapter: file events in, changed paths and "events were lost" out.

The only module that imports watchdog. How its pieces work together:

- `StoreWatch` owns watchdog's observer on one store: it watches the store's
  directory (tools replace index.json by rename) and, recursively, blobs/. The
  daemon starts it, asks it now and then for a `problem()` (a thread that
  died, blobs/ that appeared), `rebuild()`s it when there is one, and closes it.
- `StoreEventHandler` runs on watchdog's dispatcher thread. It only names each
  event's paths with `refcount.layout.classify` ("index.json changed", "this
  blob's file changed": a `PathSet`), hands that over and returns. It never
  reads a file or the database.
- `_WatchdogSpy` listens to watchdog's own log, the only place where it says
  that events were lost (an inotify queue overflow; watchdog issue #654), and
  `_StopNoise` drops the one error watchdog logs on every clean stop.

Both callbacks run on watchdog's threads and must return quickly: the daemon
only records what they say under its lock.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from watchdog.events import (
    DirCreatedEvent,
    DirDeletedEvent,
    DirMovedEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver

from refcount.errors import CannotWatch
from refcount.layout import BLOBS, BlobFile, IndexFile, classify, is_blob_dir
from refcount.scheduler import PathSet

# The daemon's lines are one log, whichever module writes them (`--log-format
# json` names the logger of each line).
log = logging.getLogger("refcount.watch")

OnPaths = Callable[[PathSet], None]
"""Takes the paths an event named; called on watchdog's thread."""
OnLost = Callable[[str], None]
"""Takes why events may have been lost; called on watchdog's threads."""

# The events that can mean a file appeared, changed or went away. Opens and
# closes without writing are left out, so inotify does not even report them.
_EVENTS: list[type[FileSystemEvent]] = [
    FileCreatedEvent,
    FileModifiedEvent,
    FileClosedEvent,
    FileMovedEvent,
    FileDeletedEvent,
    DirCreatedEvent,
    DirMovedEvent,
    DirDeletedEvent,
]


class StoreEventHandler(FileSystemEventHandler):
    """Turns watchdog events into paths for the daemon; runs on watchdog's thread.

    Moves count at both ends: the source (the file left that name) and
    `dest_path` (a tool's temp file renamed into place). Directory changes under
    blobs/ ask for a full reconcile: the events for their contents may be lost.
    """

    def __init__(self, store: Path, on_paths: OnPaths, on_lost: OnLost) -> None:
        super().__init__()
        self.store = store
        self.on_paths = on_paths
        self.on_lost = on_lost

    def on_any_event(self, event: FileSystemEvent) -> None:
        # An exception here would kill watchdog's dispatcher thread; the daemon
        # would notice, but a full reconcile is the cheaper answer.
        try:
            self._record(event)
        except Exception:
            log.exception("watch: could not handle %r", event)
            self.on_lost("an event could not be handled")

    def _record(self, event: FileSystemEvent) -> None:
        paths = [os.fsdecode(event.src_path)]
        if isinstance(event, FileMovedEvent | DirMovedEvent) and event.dest_path:
            paths.append(os.fsdecode(event.dest_path))
        if event.is_directory:
            if isinstance(event, DirMovedEvent | DirDeletedEvent) and any(
                is_blob_dir(self.store, p) for p in paths
            ):
                self.on_lost(f"{paths[0]}: directory moved or deleted")
            return  # a new directory's contents arrive as their own events
        changed = PathSet()
        for path in paths:
            match classify(self.store, path):
                case IndexFile():
                    changed.index = True
                case BlobFile(digest):
                    changed.blobs.add(digest)
        if changed:
            self.on_paths(changed)


class _WatchdogSpy(logging.Handler):
    """Hears watchdog report lost events, which it does only in its log.

    An inotify queue overflow is logged as a warning mentioning "overflow"; a
    failure to rebuild watches is logged with a traceback. Other records (an
    emitter complaining while it is being stopped) are not about lost events:
    dead threads are found by the liveness check instead.
    """

    def __init__(self, on_lost: OnLost) -> None:
        super().__init__(logging.WARNING)
        self.on_lost = on_lost

    def emit(self, record: logging.LogRecord) -> None:
        if "overflow" in str(record.msg).lower() or record.exc_info:
            self.on_lost(f"watchdog: {record.getMessage()}")


class _StopNoise(logging.Filter):
    """Drops the error watchdog's inotify emitter logs when it is stopped mid-read
    ("queue_events() called when the thread is inactive"): it happens on every
    clean shutdown or observer rebuild and means nothing was lost."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "thread is inactive" in str(record.msg):
            log.debug("watchdog: %s", record.getMessage())
            return False
        return True


_STOP_NOISE = _StopNoise()

REBUILD_WAIT = 2.0
"""Seconds a rebuild waits for the old observer to stop: beyond an emitter's 0.5 s
wait for the other half of a move, it should take milliseconds."""


class StoreWatch:
    """watchdog's observer on one store, and the checks that it still reports.

    `start()` raises CannotWatch when the store cannot be watched at all;
    `rebuild()` raises OSError and leaves no observer, which `problem()` then
    reports, so the daemon's next health check tries again.
    """

    def __init__(self, store: Path, on_paths: OnPaths, on_lost: OnLost) -> None:
        self.store = store
        self.blobs = store / BLOBS
        self._handler = StoreEventHandler(store, on_paths, on_lost)
        self._spy = _WatchdogSpy(on_lost)
        self.observer: BaseObserver | None = None
        self._closing: threading.Thread | None = None  # stops the last observer
        self._watching_blobs = False

    def start(self) -> None:
        try:
            self.observer = self._build()
        except OSError as exc:  # e.g. the inotify watch or instance limit is reached
            raise CannotWatch(f"{self.store}: cannot watch: {exc.strerror or exc}") from None
        logging.getLogger("watchdog").addHandler(self._spy)
        # Never removed: an observer being closed may still log it afterwards.
        # addFilter ignores a filter it already has.
        logging.getLogger("watchdog.observers.inotify").addFilter(_STOP_NOISE)

    def alive(self) -> bool:
        return self.observer is not None and self.observer.is_alive()

    def problem(self) -> str | None:
        """Why the observer can no longer be trusted to report events, if it cannot."""
        observer = self.observer
        if observer is None or not observer.is_alive():
            return "the observer thread stopped"
        expected = 2 if self._watching_blobs else 1
        emitters = list(observer.emitters)
        if len(emitters) < expected or not all(e.is_alive() for e in emitters):
            return "an emitter thread stopped"
        # The inotify reader thread is watchdog-internal; check it when present.
        reader = getattr(observer, "_inotify_fd", None)
        if isinstance(reader, threading.Thread) and not reader.is_alive():
            return "the inotify reader thread stopped"
        if not self._watching_blobs and self._has_blobs():
            return "blobs/ appeared"
        return None

    def rebuild(self) -> None:
        """Stop and join the observer, then start a new one (OSError: none runs now).

        Each watchdog observer owns an inotify instance, and a user has few of
        them (fs.inotify.max_user_instances, 128 by default, shared by every
        daemon of that user): two observers never run at once. One that does not
        stop within REBUILD_WAIT is left to finish, and none is started beside it;
        the next health check tries again.
        """
        self._close_observer(REBUILD_WAIT)
        closing = self._closing
        if closing is not None and closing.is_alive():
            raise OSError(errno.EBUSY, "the previous observer has not stopped yet")
        self.observer = self._build()

    def close(self) -> None:
        self._close_observer()
        logging.getLogger("watchdog").removeHandler(self._spy)

    def _build(self) -> BaseObserver:
        """Watch the store's directory (index.json is replaced by rename) and,
        recursively, blobs/ (a new blobs/<alg>/ is picked up by watchdog)."""
        observer = Observer(timeout=0.25)  # its inotify instance is open from here
        try:
            observer.schedule(self._handler, str(self.store), event_filter=_EVENTS)
            self._watching_blobs = self._has_blobs()
            if self._watching_blobs:
                observer.schedule(
                    self._handler, str(self.blobs), recursive=True, event_filter=_EVENTS
                )
            observer.start()  # adds the watches: ENOENT, ENOSPC (the watch limit)...
        except BaseException:
            # Not started, it is still alive: its reader thread holds the instance.
            # Left so, every failed rebuild (one a second) would keep one open.
            _stop_observer(observer)
            raise
        return observer

    def _has_blobs(self) -> bool:
        """blobs/ exists as a real directory (a symbolic link is never followed)."""
        return self.blobs.is_dir() and not self.blobs.is_symlink()

    def _close_observer(self, wait: float = 0.1) -> None:
        """Stop the observer, waiting at most `wait` seconds for its threads.

        watchdog's stop() joins its emitters, and an emitter holding an unpaired
        move (every quarantine is a move out of blobs/) first sleeps out its 0.5 s
        pairing delay. That must not hold up a SIGTERM or a rebuild: the threads
        are daemon threads and finish on their own.
        """
        observer, self.observer = self.observer, None
        if observer is None:
            return
        closer = threading.Thread(
            target=_stop_observer, args=(observer,), name="refcount-watch-close", daemon=True
        )
        self._closing = closer
        closer.start()
        closer.join(wait)


def _stop_observer(observer: BaseObserver) -> None:
    """Stop `observer` and its threads; its inotify instance is closed on return
    (watchdog's stop() joins the reader thread that owns it)."""
    try:
        observer.stop()
        if observer.is_alive():  # one that never started has no thread to join
            observer.join(5.0)
    except Exception:
        log.debug("watch: error while stopping the observer", exc_info=True)
