"""The sidecar daemon: keep a store's reference counts right while others change it.

How the pieces work together:

- `refcount.events.StoreWatch` is watchdog's observer on the store; its
  handler turns each event into "index.json changed" or "this blob's file
  changed" (a `PathSet`), hands that to the daemon and returns.
- `Daemon` owns one worker thread, which is the only user of the `Refcounter`.
  It waits for a quiet period after the last event (`debounce`), takes the
  pending `PathSet` and applies it with `Refcounter.sync(Changes(...))`: the same
  reconcile, in one transaction, as `refcount sync`. The same thread runs the
  timers: a full reconcile (`Refcounter.sync()`) on start, on SIGHUP, every
  `resync`, and after any sign of lost events; gc every `gc_interval`; and a
  check, every second, that watchdog's threads are still alive.
- `run_daemon` is the process around it: the store's daemon lock (a second
  daemon fails with StoreBusy), the metrics server, the command socket
  (`refcount.serve`: CLI commands answered from this warm process, run by a
  callable the caller passes in, since the CLI sits above this module), signal
  handlers, shutdown. A served command runs on a Refcounter of its own, so
  the reports it renders are handed to the worker (`Daemon.report_served`),
  which counts them in the metrics and refreshes the gauges: the batch its
  file events cause finds the database already in step and changes nothing.

Why a full reconcile is never far away: watchdog cannot be trusted to deliver
every event. An inotify queue overflow is only logged (and on a non-recursive
watch nothing else happens), and an emitter thread that fails simply stops. So
the daemon listens to watchdog's own warnings, checks its threads, rebuilds the
observer when one died, and resyncs on a timer; a no-op reconcile is cheap.

Why events can be trusted to be harmless: a batch names paths, not what
happened to them. Core re-reads each named blob file and index.json, and
index.json is applied only when its hash changed, so an event seen twice, or one
caused by the daemon's own frees (a quarantine is a move out of blobs/), only
costs a little work. An index.json that is empty, half-written or unparsable
(skopeo rewrites it in place) makes `sync` raise InvalidStore and change
nothing; the batch is kept and retried after a short backoff, or as soon as
the file changes again. It is never read as "no roots".

When to warn about an invalid store: a file that does not parse may be a
write in progress, so it is worth a warning only once it has stayed so for
INVALID_WARNING_AFTER. A JSON object that parses but is not an image index
(`{}`, another schemaVersion, a `manifests` that is not a list) is no write in
progress (a prefix of a JSON object never parses), so it is warned about at
once. Either way the warning then repeats with growing gaps
(`warning_delay`), and one line says when the store is valid again.
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from types import FrameType

from refcount.core import Changes, Refcounter
from refcount.errors import InvalidOption, InvalidStore, UnparsableIndex
from refcount.events import StoreWatch
from refcount.metrics import Health, Metrics, MetricsServer
from refcount.reports import DeleteReport, GcReport, SyncReport, VerifyReport
from refcount.scheduler import PathSet
from refcount.serve import CannotServe, CommandServer, Handler
from refcount.wire import SOCKET_NAME

log = logging.getLogger(__name__)

HEALTH_INTERVAL = 1.0
"""Seconds between checks that the observer's threads are alive."""
RETRY_FIRST = 0.05
RETRY_MAX = 2.0
"""Backoff, in seconds, before re-reading an index.json that did not parse."""
INVALID_WARNING_AFTER = 10.0
"""Seconds an index.json may stay unparsable before it is worth a warning; also
the first gap before a warning is repeated (the gaps then double)."""
INVALID_WARNING_MAX = 600.0
"""Longest gap, in seconds, between repeated warnings about an invalid store."""


def warning_delay(warned: int, first: float, gap: float, cap: float) -> float:
    """Seconds to wait before the next warning about a problem that lasts.

    `warned` warnings were given so far. The first is due `first` seconds after
    the problem began; each later one `gap`, 2 x `gap`, 4 x `gap`... seconds
    after the one before, never more than `cap`.
    """
    if warned <= 0:
        return first
    return min(gap * 2.0 ** min(warned - 1, 64), cap)


ReportSink = Callable[[object], None]
"""Takes each report a served command renders; called on the serving thread."""


@dataclass(frozen=True)
class WatchOptions:
    """How the daemon schedules its work (checked when made: InvalidOption)."""

    debounce: float = 0.1
    """Quiet period, in seconds, after the last event before a batch is applied."""
    resync: timedelta = timedelta(minutes=5)
    """Interval between full reconciles that catch whatever the events missed."""
    metrics_addr: str | None = None
    """HOST:PORT for /metrics and /healthz; None serves nothing."""
    gc_interval: timedelta = timedelta(minutes=5)
    """Interval between gc runs: orphans past the grace period, trash past its TTL."""

    def __post_init__(self) -> None:
        # A zero interval would make the worker spin on full reconciles.
        if not self.debounce >= 0:
            raise InvalidOption(f"--debounce {self.debounce}: must be 0 or more seconds")
        for name, value in (("--resync", self.resync), ("--gc-interval", self.gc_interval)):
            if value <= timedelta(0):
                raise InvalidOption(f"{name} {value}: must be longer than 0")

    @property
    def max_delay(self) -> float:
        """Longest a batch waits while events keep coming, so that a store that
        never goes quiet is still applied: 5 quiet periods, at least 0.5 s."""
        return max(0.5, 5 * self.debounce)


# ---------------------------------------------------------------------------
# The daemon
# ---------------------------------------------------------------------------
@dataclass
class _Job:
    """One unit of work the worker took from the shared state."""

    kind: str  # "batch", "full", "gc", "health", "served" or "stop"
    paths: PathSet = field(default_factory=PathSet)
    reasons: tuple[str, ...] = ()
    epoch: int = 0
    reports: tuple[object, ...] = ()  # "served": what commands run for clients rendered


class Daemon:
    """Watch one store and keep its database in step; see the module docstring.

    `start()` starts the observer and the worker; the first thing the worker does
    is a full reconcile. `stop()` finishes the batch in hand and joins. Tests and
    callers wait for progress with `wait_applied()`, never with sleeps.
    """

    def __init__(
        self,
        refcounter: Refcounter,
        options: WatchOptions,
        metrics: Metrics | None = None,
    ) -> None:
        self.rc = refcounter
        self.options = options
        self.metrics = metrics or Metrics()
        self.store = refcounter.store.path
        self._cond = threading.Condition()
        # Guarded by _cond: what the handler and signals asked for.
        self._pending = PathSet()
        self._full_reasons: list[str] = []
        self._served: list[object] = []
        self._first_event = 0.0
        self._last_event = 0.0
        self._retry_at = 0.0
        self._retry_delay = RETRY_FIRST
        self._invalid_since: float | None = None  # the store is invalid since
        self._problem: str | None = None  # what is wrong with it (see _retry_later)
        self._problem_since = 0.0
        self._warned = 0  # warnings given about `_problem`
        self._warned_at = 0.0
        self._invalid_error = ""  # the last error, for the line saying it is over
        self._warned_any = False  # a warning was given since `_invalid_since`
        self._stopping = False
        self._seen = 0  # bumped for every request (event, resync, signal)
        self._applied = 0  # the highest `_seen` whose work is fully applied
        self._rebuild_reason: str | None = None
        now = time.monotonic()
        self._health_due = now + HEALTH_INTERVAL  # moved up by report_lost
        # Only the worker touches these.
        self._resync_due = now + options.resync.total_seconds()
        self._gc_due = now + options.gc_interval.total_seconds()
        self.events = StoreWatch(self.store, self.notice, self.report_lost)
        self._worker = threading.Thread(target=self._run, name="refcount-watch", daemon=True)
        self._last_success: float | None = None
        self.failed: BaseException | None = None

    # --- requests (any thread) --------------------------------------------------
    def notice(self, paths: PathSet) -> None:
        """Record changed paths; the batch is applied after the quiet period."""
        with self._cond:
            now = time.monotonic()
            if not self._pending:
                self._first_event = now
            self._pending.merge(paths)
            self._last_event = now
            self._retry_at = 0.0  # the file changed again: worth re-reading at once
            self._seen += 1
            self._cond.notify_all()

    def request_full(self, reason: str) -> None:
        """Ask for a full reconcile (start, SIGHUP, a rebuilt observer)."""
        with self._cond:
            if reason not in self._full_reasons:
                self._full_reasons.append(reason)
            self._seen += 1
            self._cond.notify_all()

    def report_lost(self, reason: str) -> None:
        """Events were lost: rebuild the observer, then reconcile fully."""
        with self._cond:
            self._rebuild_reason = self._rebuild_reason or reason
            self._health_due = 0.0  # check (and rebuild) at once
        self.request_full(reason)

    def report_served(self, report: object) -> None:
        """A report a command served for a client rendered: the worker counts it in
        the metrics and refreshes the gauges (it does not wait for a quiet period)."""
        with self._cond:
            self._served.append(report)
            self._cond.notify_all()

    def request_stop(self, reason: str = "stop requested") -> None:
        with self._cond:
            if not self._stopping:
                log.info("stopping (%s)", reason)
            self._stopping = True
            self._cond.notify_all()

    # --- waiting (tests, callers) ---------------------------------------------
    @property
    def seen_epoch(self) -> int:
        with self._cond:
            return self._seen

    @property
    def applied_epoch(self) -> int:
        with self._cond:
            return self._applied

    def wait_applied(self, epoch: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until everything requested up to `epoch` (default: now) is applied.

        An event the kernel has not delivered yet is not "requested": wait for
        `seen_epoch` to move first (`wait_seen`) when a change was just made.
        Returns False on timeout or when the worker has stopped.
        """
        with self._cond:
            target = self._seen if epoch is None else epoch
            return self._cond.wait_for(
                lambda: self._applied >= target or not self._worker.is_alive(), timeout
            ) and (self._applied >= target)

    def wait_seen(self, epoch: int, timeout: float = 10.0) -> bool:
        """Wait until some request newer than `epoch` arrived (e.g. an event)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._seen > epoch, timeout)

    def health(self) -> Health:
        """What /healthz reports: ok once the first reconcile succeeded and while
        the worker and the observer run."""
        with self._cond:
            invalid_for = (
                None if self._invalid_since is None else time.monotonic() - self._invalid_since
            )
            pending = bool(self._pending) or bool(self._full_reasons)
        observer_ok = self.events.alive()
        worker_ok = self._worker.is_alive()
        detail = {
            "store": str(self.store),
            "worker": worker_ok,
            "observer": observer_ok,
            "pending": pending,
            "last_success_unix": self._last_success,
            "index_invalid_seconds": invalid_for,
        }
        return Health(worker_ok and observer_ok and self._last_success is not None, detail)

    # --- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Start watching, then reconcile fully: events during that reconcile are
        kept and applied after it, so nothing slips between the two."""
        self.events.start()
        self.request_full("start")
        self._worker.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self._worker.is_alive():
            self._worker.join(timeout)
        self.events.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish; True when it has."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    # --- the worker ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job.kind == "stop":
                    self._flush_on_stop(job)
                    return
                self._do(job)
        except BaseException as exc:  # the daemon must not die silently
            self.failed = exc
            log.exception("watch: the worker failed; stopping")
        finally:
            with self._cond:
                self._stopping = True
                self._cond.notify_all()

    def _next_job(self) -> _Job:
        """Block until there is something to do, and take it (under the lock)."""
        with self._cond:
            while True:
                now = time.monotonic()
                if self._stopping:
                    return _Job("stop", self._pending.take(), epoch=self._seen)
                if now >= self._health_due:
                    self._health_due = now + HEALTH_INTERVAL
                    return _Job("health")
                if self._served:
                    reports = tuple(self._served)
                    self._served.clear()
                    return _Job("served", reports=reports)
                if now >= self._resync_due:
                    self._resync_due = now + self.options.resync.total_seconds()
                    self._full_reasons.append("periodic resync")
                    self._seen += 1
                if self._full_reasons and now >= self._retry_at:
                    reasons = tuple(self._full_reasons)
                    self._full_reasons.clear()
                    return _Job("full", self._pending.take(), reasons, self._seen)
                if self._pending and now >= self._retry_at and self._quiet(now):
                    return _Job("batch", self._pending.take(), epoch=self._seen)
                if now >= self._gc_due:
                    self._gc_due = now + self.options.gc_interval.total_seconds()
                    return _Job("gc", self._pending.take(), epoch=self._seen)
                self._cond.wait(self._next_deadline(now) - now)

    def _quiet(self, now: float) -> bool:
        return (
            now - self._last_event >= self.options.debounce
            or now - self._first_event >= self.options.max_delay
        )

    def _next_deadline(self, now: float) -> float:
        deadlines = [self._resync_due, self._health_due, self._gc_due]
        if self._full_reasons:
            deadlines.append(self._retry_at)
        if self._pending:
            quiet = min(
                self._last_event + self.options.debounce,
                self._first_event + self.options.max_delay,
            )
            deadlines.append(max(quiet, self._retry_at))
        return max(min(deadlines), now + 0.001)

    def _do(self, job: _Job) -> None:
        if job.kind == "health":
            self._check_observer()
        elif job.kind == "gc":
            self._run_gc(job)
        elif job.kind == "served":
            self._record_served(job.reports)
        else:
            self._reconcile(job)

    def _reconcile(self, job: _Job) -> None:
        full = job.kind == "full"
        started = time.monotonic()
        try:
            changes = Changes(index=job.paths.index, blobs=frozenset(job.paths.blobs))
            report = self.rc.sync() if full else self.rc.sync(changes)
        except InvalidStore as exc:
            self._retry_later(job, exc)
            return
        except Exception:
            log.exception("watch: reconcile failed; a full reconcile will follow")
            self.metrics.record_failure("error")
            self._retry_later(job, None)
            return
        seconds = time.monotonic() - started
        if full:
            self._resync_due = time.monotonic() + self.options.resync.total_seconds()
        # A timer's or a recovery's full reconcile should find nothing the events
        # did not already bring: what it does find is drift.
        drift = full and not job.paths and not {"start", "SIGHUP"} & set(job.reasons)
        self._applied_ok(job.epoch)
        self.metrics.record_sync(report, seconds, full=full, drift=drift)
        self._log_batch(job, report, seconds)
        # A batch that names index.json but changes nothing follows another
        # refcount process's delete, which the database already holds: the
        # gauges must show it too. (The events of the daemon's own frees name
        # only blob files, and are not worth the queries.)
        if full or report.changed or job.paths.index:
            self._refresh_stats()

    def _retry_later(self, job: _Job, exc: InvalidStore | None) -> None:
        """Put the job's work back and try again after a backoff.

        For an index.json caught mid-write this is the normal path (debug log).
        The warnings follow the module docstring: an unparsable file after
        INVALID_WARNING_AFTER, any other invalid store at once, then again
        after `warning_delay`. A new problem (another document) starts its own
        schedule; an unparsable file is one problem however its text changes.
        """
        now = time.monotonic()
        with self._cond:
            self._pending.merge(job.paths)
            if job.kind == "full" or exc is None:
                for reason in job.reasons or ("retry after an error",):
                    if reason not in self._full_reasons:
                        self._full_reasons.append(reason)
            self._retry_at = now + self._retry_delay
            self._retry_delay = min(self._retry_delay * 2, RETRY_MAX)
            if exc is None:
                return
            unparsable = isinstance(exc, UnparsableIndex)
            problem = "unparsable" if unparsable else str(exc)
            if self._invalid_since is None:
                self._invalid_since = now
            if problem != self._problem:
                self._problem, self._problem_since, self._warned = problem, now, 0
            self._invalid_error = str(exc)
            since = self._warned_at if self._warned else self._problem_since
            first = INVALID_WARNING_AFTER if unparsable else 0.0
            due = since + warning_delay(
                self._warned, first, INVALID_WARNING_AFTER, INVALID_WARNING_MAX
            )
            warn = now >= due
            if warn:
                self._warned += 1
                self._warned_at = now
                self._warned_any = True
            lasting = now - self._invalid_since
            again = warning_delay(self._warned, first, INVALID_WARNING_AFTER, INVALID_WARNING_MAX)
        self.metrics.record_failure("invalid_index")
        if warn:
            log.warning(
                "%s; nothing is applied until the store is valid "
                "(invalid for %.0f s; warning again in %.0f s if it stays so)",
                exc,
                lasting,
                again,
            )
        else:
            log.debug("watch: %s; re-reading shortly", exc)

    def _applied_ok(self, epoch: int) -> None:
        with self._cond:
            since, warned, error = self._invalid_since, self._warned_any, self._invalid_error
            self._invalid_since, self._problem, self._warned_any = None, None, False
        # The end of a warning is worth an info line; a write caught in progress is
        # not. Logged before the work counts as applied, so whoever waits for that
        # finds the line written.
        if since is not None:
            log.log(
                logging.INFO if warned else logging.DEBUG,
                "the store is valid again after %.0f s (was: %s)",
                time.monotonic() - since,
                error,
            )
        with self._cond:
            self._applied = max(self._applied, epoch)
            self._retry_delay = RETRY_FIRST
            self._retry_at = 0.0
            self._cond.notify_all()
        self._last_success = time.time()

    def _run_gc(self, job: _Job) -> None:
        """A full reconcile (so its frees are counted), then sweep and purge."""
        self._reconcile(_Job("full", job.paths, ("before gc",), job.epoch))
        started = time.monotonic()
        try:
            report = self.rc.gc()
        except InvalidStore as exc:
            log.debug("watch: gc skipped: %s", exc)
            return
        except Exception:
            log.exception("watch: gc failed; it runs again in %s", self.options.gc_interval)
            self.metrics.record_failure("error")
            return
        seconds = time.monotonic() - started
        self.metrics.record_gc(report, seconds)
        self._log_gc(report, seconds)
        if report.swept or report.purged:
            self._refresh_stats()

    def _record_served(self, reports: tuple[object, ...]) -> None:
        """Count what commands served for clients did, then refresh the gauges once.
        Dry runs and reading commands changed nothing and are not counted."""
        changed = False
        for report in reports:
            if isinstance(report, DeleteReport | GcReport) and not report.dry_run:
                self.metrics.record_served(report)
                changed = True
            elif isinstance(report, SyncReport):  # sync, init
                self.metrics.record_served(report)
                self._log_found(report)
                changed = changed or report.changed
            elif isinstance(report, VerifyReport) and report.repaired:
                changed = True
        if changed:
            self._refresh_stats()

    def _flush_on_stop(self, job: _Job) -> None:
        """SIGTERM: apply what was already seen, once, without waiting for quiet.
        Whatever fails here is caught up by the next start's full reconcile."""
        if job.paths:
            self._reconcile(_Job("batch", job.paths, epoch=job.epoch))

    def _refresh_stats(self) -> None:
        try:
            self.metrics.record_stats(self.rc.stats())
        except Exception:
            log.exception("watch: could not read figures for the metrics")

    # --- logging ------------------------------------------------------------------
    def _log_batch(self, job: _Job, report: SyncReport, seconds: float) -> None:
        what = (
            f"full reconcile ({', '.join(job.reasons)})"
            if job.kind == "full"
            else f"batch: {job.paths.describe()} changed"
        )
        # Batches caused only by the daemon's own frees change nothing: keep them
        # out of the info log so that one line means one real change.
        level = logging.INFO if report.changed or job.kind == "full" else logging.DEBUG
        log.log(
            level,
            "%s; roots +%d -%d, %d became live, %d freed (%d bytes), %d restored, "
            "%d missing, %d new orphans; %.1f ms",
            what,
            report.roots_added,
            report.roots_removed,
            report.became_live,
            len(report.freed),
            report.freed_bytes,
            len(report.restored),
            len(report.missing),
            len(report.orphans),
            seconds * 1000,
        )
        self._log_found(report)
        for problem in report.problems:
            log.debug("skipped: %s", problem)

    @staticmethod
    def _log_found(report: SyncReport) -> None:
        """The good news that goes with core's "referenced blob is missing" warning:
        once per blob, on its transition back from missing to live."""
        for digest in report.found:
            log.info("%s: missing blob is back in blobs/", digest)

    @staticmethod
    def _log_gc(report: GcReport, seconds: float) -> None:
        level = logging.INFO if report.swept or report.purged else logging.DEBUG
        log.log(
            level,
            "gc: %d orphans swept, %d trashed blobs purged, %d bytes; %.1f ms",
            len(report.swept),
            len(report.purged),
            report.freed_bytes,
            seconds * 1000,
        )

    # --- the observer -------------------------------------------------------------
    def _check_observer(self) -> None:
        with self._cond:
            lost, self._rebuild_reason = self._rebuild_reason, None
        problem = lost or self.events.problem()
        if problem is None:
            return
        log.warning("watch: %s; rebuilding the observer and reconciling fully", problem)
        try:
            self.events.rebuild()
        except OSError as exc:
            log.error("watch: cannot watch %s: %s; retrying", self.store, exc)
            return
        self.request_full(f"observer rebuilt: {problem}")


# ---------------------------------------------------------------------------
# The process
# ---------------------------------------------------------------------------
@contextmanager
def _signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop after the batch in hand; SIGHUP asks for a full reconcile.

    Handlers run in the main thread between bytecodes; they only set flags
    under the daemon's condition, which the main thread never holds.
    """

    def stop(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    def resync(_signum: int, _frame: FrameType | None) -> None:
        daemon.request_full("SIGHUP")

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
        signal.SIGINT: signal.signal(signal.SIGINT, stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, resync),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_daemon(
    open_refcounter: Callable[[], Refcounter],
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None = None,
) -> None:
    """Run the watch daemon in this process until SIGTERM or SIGINT.

    With `serve`, CLI commands sent to `STORE/.refcount/refcount.sock` are run
    with the handler `serve(sink)` makes (see `refcount.serve`), which must pass
    every report a command renders to `sink`, so that the metrics count what
    the daemon's clients did. The socket exists only while the daemon
    holds the store's daemon lock, and is removed on a clean stop, as is the
    lock's file, `.refcount/watch.pid`.

    Raises StoreBusy when another daemon holds the store, InvalidAddress for a
    bad `metrics_addr`. A socket that cannot be made is logged, and the daemon
    watches without it. Returns normally after a clean stop.
    """
    with open_refcounter() as rc:
        lock = rc.store.hold_daemon_lock()
        try:
            _serve(rc, options, serve)
        finally:
            rc.store.release_daemon_lock(lock)


def _duration(value: timedelta) -> str:
    """A duration as the options spell it: 5m, 1h, 90s, 0."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds else "0"


def _serve(
    rc: Refcounter, options: WatchOptions, serve: Callable[[ReportSink], Handler] | None
) -> None:
    metrics = Metrics()
    daemon = Daemon(rc, options, metrics)
    server = (
        MetricsServer(options.metrics_addr, metrics, daemon.health)
        if options.metrics_addr
        else None
    )
    commands = (
        None
        if serve is None
        else CommandServer(rc.store.state_dir / SOCKET_NAME, serve(daemon.report_served))
    )
    log.info(
        "watching %s (debounce %.3g s, resync every %s, gc every %s, grace %s, trash TTL %s)",
        rc.store.path,
        options.debounce,
        *map(_duration, (options.resync, options.gc_interval)),
        *map(_duration, (rc.policy.grace, rc.policy.trash_ttl)),
    )
    try:
        with _signals(daemon):
            daemon.start()
            if commands is not None:
                try:
                    commands.start()
                except CannotServe as exc:  # watching matters more than the shortcut
                    log.warning("%s; refcount commands will run on their own", exc)
                    commands = None
            # Wake up now and then: a signal handler runs only between bytecodes.
            while not daemon.join(0.5):
                pass
    finally:
        if commands is not None:  # first: a request in hand finishes, none starts
            commands.close()
        daemon.stop()
        if server is not None:
            server.close()
    if daemon.failed is not None:
        raise daemon.failed
    log.info("stopped")
