"""The watch daemon's worker: one thread doing what the scheduler says, on a collector.

How the pieces work together:

- `refcount.events.StoreWatch` is watchdog's observer on the store; its handler
  turns each event into "index.json changed" or "this blob's file changed" (a
  `PathSet`) and hands it to `Daemon.notice` on watchdog's thread.
- `refcount.scheduler.Scheduler` decides when: it coalesces the paths until a
  quiet period (`debounce`) has passed, and keeps the timers (a full reconcile
  every `resync`, gc every `gc_interval`, a health check every second), the
  backoff after a failure and the epochs. It never reads a clock: `Daemon`
  passes it the time of its `clock` (monotonic), and it never blocks.
- `Daemon` owns one worker thread and one lock (a Condition) around the
  scheduler. Requests from any thread (events, SIGHUP, lost events, served
  reports, stop) are recorded under the lock and wake the worker. The worker
  takes the job due now under the lock, or waits until the scheduler's
  deadline, and does the job outside it: a batch is `collector.sync(Changes)`,
  the same reconcile, in one transaction, as `refcount sync`; a full reconcile
  is `collector.sync()`; gc is a full reconcile then `collector.gc()`; the
  gauges come from `collector.stats()`. Those three calls (`Collector`) are all
  the daemon knows of the library: `Refcounter` is one, a test's is another.
- `refcount.watch` is the process around it (lock, signals, sockets).

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

When to warn about an invalid store: a file that does not parse
(UnparsableIndex) may be a write in progress, so it is worth a warning only
once it has stayed so for a while (`Timing.warning_after`). A JSON object that
parses but is not an image index (`{}`, another schemaVersion, a `manifests`
that is not a list) is no write in progress (a prefix of a JSON object never
parses), so it is warned about at once. Either way the warning then repeats
with growing gaps (`scheduler.warning_delay`), and one line says when the store
is valid again.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Protocol

from refcount.core import Changes
from refcount.errors import InvalidStore, RefcountError, UnparsableIndex
from refcount.events import OnLost, OnPaths, StoreWatch
from refcount.metrics import Health, Metrics
from refcount.reports import (
    DeleteBatch,
    DeleteReport,
    GcReport,
    PruneReport,
    Stats,
    SyncReport,
    VerifyReport,
)
from refcount.scheduler import Invalid, Job, JobKind, PathSet, Scheduler, Timing
from refcount.units import human_size
from refcount.verifier import PeriodicVerify

# The daemon's lines are one log, whichever module writes them (`--log-format
# json` names the logger of each line).
log = logging.getLogger("refcount.watch")


class Collector(Protocol):
    """What the daemon does to the store's counts; `Refcounter` is one.

    Each call is one operation of its own (a transaction, the store's lock);
    the daemon makes them from its worker thread only, one at a time.
    """

    def sync(self, changes: Changes | None = None) -> SyncReport:
        """Reconcile what `changes` names, or everything (None). Raises
        InvalidStore, changing nothing, when index.json is not a valid index."""
        ...

    def gc(self) -> GcReport:
        """Sweep orphans past the grace period and purge expired trash."""
        ...

    def stats(self) -> Stats:
        """The figures behind the gauges."""
        ...

    def prune_by_file(self) -> PruneReport | None:
        """Apply the store's retention policy file (None when there is none);
        InvalidPolicy, pruning nothing, when it cannot be applied."""
        ...


class EventSource(Protocol):
    """Where the daemon's events come from; `refcount.events.StoreWatch` is one."""

    def start(self) -> None:
        """Begin watching; CannotWatch when the store cannot be watched at all."""
        ...

    def alive(self) -> bool:
        """Events can arrive (for /healthz)."""
        ...

    def problem(self) -> str | None:
        """Why events may no longer arrive (a thread died, blobs/ appeared), if so."""
        ...

    def rebuild(self) -> None:
        """Watch afresh; OSError leaves nothing watching, for `problem` to report."""
        ...

    def close(self) -> None: ...


WatchFactory = Callable[[Path, OnPaths, OnLost], EventSource]
"""Makes the event source on a store, given where its paths and losses go."""


def _changes(paths: PathSet) -> Changes:
    return Changes(index=paths.index, blobs=frozenset(paths.blobs))


class Daemon:
    """Watch one store and keep its database in step; see the module docstring.

    `start()` starts the observer and the worker; the first thing the worker does
    is a full reconcile. `stop()` finishes the batch in hand and joins. Tests and
    callers wait for progress with `wait_applied()`, never with sleeps; or, with
    no worker started, run the jobs due at `clock()` themselves (`run_due`).
    """

    def __init__(
        self,
        collector: Collector,
        store: Path,
        timing: Timing,
        metrics: Metrics | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        watch: WatchFactory = StoreWatch,
        verify: PeriodicVerify | None = None,
    ) -> None:
        """`verify` runs the periodic verifies (`Timing.verify_every`,
        `Timing.deep_every`) beside the worker; without it they are not run."""
        self.collector = collector
        self.verify = verify
        self.store = store
        self.timing = timing
        self.metrics = metrics or Metrics()
        self._clock = clock
        self._cond = threading.Condition()
        self._scheduler = Scheduler(timing, clock())  # guarded by _cond
        self.events = watch(store, self.notice, self.report_lost)
        self._worker = threading.Thread(target=self._run, name="refcount-watch", daemon=True)
        self._last_success: float | None = None
        self.failed: BaseException | None = None

    # --- requests (any thread) --------------------------------------------------
    def notice(self, paths: PathSet) -> None:
        """Record changed paths; the batch is applied after the quiet period."""
        with self._cond:
            self._scheduler.notice(paths, self._clock())
            self._cond.notify_all()

    def request_full(self, reason: str) -> None:
        """Ask for a full reconcile (start, SIGHUP, a rebuilt observer)."""
        with self._cond:
            self._scheduler.request_full(reason)
            self._cond.notify_all()

    def report_lost(self, reason: str) -> None:
        """Events were lost: rebuild the observer, then reconcile fully."""
        with self._cond:
            self._scheduler.report_lost(reason)
            self._cond.notify_all()

    def report_served(self, report: object) -> None:
        """A report a command served for a client rendered: the worker counts it in
        the metrics and refreshes the gauges (it does not wait for a quiet period)."""
        with self._cond:
            self._scheduler.report_served(report)
            self._cond.notify_all()

    def request_stop(self, reason: str = "stop requested") -> None:
        with self._cond:
            if self._scheduler.stop():  # logged before the worker can act on it
                log.info("stopping (%s)", reason)
            self._cond.notify_all()

    # --- waiting (tests, callers) ---------------------------------------------
    @property
    def seen_epoch(self) -> int:
        with self._cond:
            return self._scheduler.seen_epoch

    @property
    def applied_epoch(self) -> int:
        with self._cond:
            return self._scheduler.applied_epoch

    def wait_applied(self, epoch: int | None = None, timeout: float = 10.0) -> bool:
        """Wait until everything requested up to `epoch` (default: now) is applied.

        An event the kernel has not delivered yet is not "requested": wait for
        `seen_epoch` to move first (`wait_seen`) when a change was just made.
        Returns False on timeout or when the worker has stopped.
        """
        scheduler = self._scheduler
        with self._cond:
            target = scheduler.seen_epoch if epoch is None else epoch
            return self._cond.wait_for(
                lambda: scheduler.applied_epoch >= target or not self._worker.is_alive(), timeout
            ) and (scheduler.applied_epoch >= target)

    def wait_seen(self, epoch: int, timeout: float = 10.0) -> bool:
        """Wait until some request newer than `epoch` arrived (e.g. an event)."""
        scheduler = self._scheduler
        with self._cond:
            return self._cond.wait_for(lambda: scheduler.seen_epoch > epoch, timeout)

    def health(self) -> Health:
        """What /healthz reports: ok once the first reconcile succeeded and while
        the worker and the observer run."""
        with self._cond:
            invalid = self._scheduler.invalidity(self._clock())
            pending = self._scheduler.has_work
        observer_ok = self.events.alive()
        worker_ok = self._worker.is_alive()
        degraded = None if self.verify is None else self.verify.degraded()
        ok = worker_ok and observer_ok and self._last_success is not None
        detail = {
            "status": "down" if not ok else "ok" if degraded is None else "degraded",
            "store": str(self.store),
            "worker": worker_ok,
            "observer": observer_ok,
            "pending": pending,
            "last_success_unix": self._last_success,
            "index_invalid_seconds": None if invalid is None else invalid.lasting,
        }
        if degraded is not None:
            # Degraded, not down: restarting the daemon cannot fix the store, so the
            # HTTP status stays 200 and the body says what is wrong.
            detail["reason"] = degraded
        return Health(ok, detail)

    # --- life cycle -------------------------------------------------------------
    def start(self) -> None:
        """Start watching, then reconcile fully: events during that reconcile are
        kept and applied after it, so nothing slips between the two."""
        self.events.start()
        self.request_full("start")
        self._worker.start()
        if self.verify is not None:
            self.verify.start()

    def stop(self, timeout: float = 30.0) -> None:
        self.request_stop()
        if self.verify is not None:
            self.verify.stop(timeout)
        if self._worker.is_alive():
            self._worker.join(timeout)
        self.events.close()

    def join(self, timeout: float | None = None) -> bool:
        """Wait for the worker to finish; True when it has."""
        self._worker.join(timeout)
        return not self._worker.is_alive()

    def run_due(self) -> int:
        """Do the jobs due at `clock()` on this thread, until none is; returns how
        many were done. For a daemon whose worker was not started (a test on a
        fake clock): the worker does exactly this between its waits."""
        done = 0
        while True:
            with self._cond:
                job = self._scheduler.next_job(self._clock())
            if job is None:
                return done
            done += 1
            if job.kind is JobKind.STOP:
                self._flush_on_stop(job)
                return done
            self._do(job)

    # --- the worker ---------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                job = self._next_job()
                if job.kind is JobKind.STOP:
                    self._flush_on_stop(job)
                    return
                self._do(job)
        except BaseException as exc:  # the daemon must not die silently
            self.failed = exc
            log.exception("watch: the worker failed; stopping")
        finally:
            with self._cond:
                self._scheduler.stop()
                self._cond.notify_all()

    def _next_job(self) -> Job:
        """Block until a job is due, and take it."""
        with self._cond:
            while True:
                now = self._clock()
                job = self._scheduler.next_job(now)
                if job is not None:
                    return job
                self._cond.wait(self._scheduler.deadline(now) - now)

    def _do(self, job: Job) -> None:
        match job.kind:
            case JobKind.HEALTH:
                self._check_events(job)
            case JobKind.GC:
                self._run_gc(job)
            case JobKind.PRUNE:
                self._run_prune()
            case JobKind.SERVED:
                self._record_served(job.reports)
            case JobKind.VERIFY | JobKind.DEEP:
                if self.verify is not None:
                    self.verify.request(deep=job.kind is JobKind.DEEP)
            case _:
                self._reconcile(job)

    def _reconcile(self, job: Job) -> None:
        """A batch (also a stop's last one), or a full reconcile (also gc's)."""
        full = job.full
        started = self._clock()
        try:
            report = self.collector.sync() if full else self.collector.sync(_changes(job.paths))
        except InvalidStore as exc:
            self._retry_later(job, exc)
            return
        except RefcountError as exc:  # e.g. a database that went away: one line a retry
            log.error("watch: reconcile failed: %s; a full reconcile will follow", exc)
            log.debug("watch: reconcile failed", exc_info=True)
            self.metrics.record_failure("error")
            self._retry_later(job, None)
            return
        except Exception:
            log.exception("watch: reconcile failed; a full reconcile will follow")
            self.metrics.record_failure("error")
            self._retry_later(job, None)
            return
        seconds = self._clock() - started
        # A timer's or a recovery's full reconcile should find nothing the events
        # did not already bring: what it does find is drift.
        drift = full and not job.paths and not {"start", "SIGHUP"} & set(job.reasons)
        self._applied_ok(job)
        # A batch that names index.json but changes nothing follows another
        # refcount process's delete, which the database already holds: the
        # gauges must show it too. (The events of the daemon's own frees name
        # only blob files, and are not worth the queries.)
        self._record(
            lambda: self.metrics.record_sync(report, seconds, full=full, drift=drift),
            refresh=full or report.changed or job.paths.index,
        )
        # After the figures: whoever reads the line, or sees /healthz turn ok on
        # the first success, finds this reconcile in /metrics.
        self._log_batch(job, report, seconds)
        self._last_success = time.time()

    def _retry_later(self, job: Job, exc: InvalidStore | None) -> None:
        """Hand the job back to the scheduler, which retries it after a backoff.

        For an index.json caught mid-write this is the normal path (debug log);
        the scheduler says when it is worth a warning (see the module docstring).
        """
        invalid = (
            None if exc is None else Invalid(str(exc), in_progress=isinstance(exc, UnparsableIndex))
        )
        with self._cond:
            warn = self._scheduler.failed(job, self._clock(), invalid)
        if exc is None:
            return
        self.metrics.record_failure("invalid_index")
        if warn is not None:
            log.warning(
                "%s; nothing is applied until the store is valid "
                "(invalid for %.0f s; warning again in %.0f s if it stays so)",
                exc,
                warn.lasting,
                warn.again,
            )
        else:
            log.debug("watch: %s; re-reading shortly", exc)

    def _applied_ok(self, job: Job) -> None:
        now = self._clock()
        with self._cond:
            ended = self._scheduler.invalidity(now)
        # The end of a warning is worth an info line; a write caught in progress is
        # not. Logged before the work counts as applied, so whoever waits for that
        # finds the line written.
        if ended is not None:
            log.log(
                logging.INFO if ended.warned else logging.DEBUG,
                "the store is valid again after %.0f s (was: %s)",
                ended.lasting,
                ended.error,
            )
        with self._cond:
            self._scheduler.applied(job, now)
            self._cond.notify_all()

    def _run_gc(self, job: Job) -> None:
        """A full reconcile (so its frees are counted), then sweep and purge."""
        self._reconcile(job)
        started = self._clock()
        try:
            report = self.collector.gc()
        except InvalidStore as exc:
            log.debug("watch: gc skipped: %s", exc)
            return
        except Exception:
            log.exception(
                "watch: gc failed; it runs again in %s",
                timedelta(seconds=self.timing.gc_interval),
            )
            self.metrics.record_failure("error")
            return
        seconds = self._clock() - started
        self._record(
            lambda: self.metrics.record_gc(report, seconds),
            refresh=bool(report.swept or report.purged),
        )
        self._log_gc(report, seconds)

    def _run_prune(self) -> None:
        """Apply the policy file; a file that went bad since the start is logged and
        skipped (the daemon keeps watching, and tries again next time)."""
        started = self._clock()
        try:
            report = self.collector.prune_by_file()
        except RefcountError as exc:  # a bad policy file, an invalid store, a refusal
            log.error("prune skipped: %s", exc)
            self.metrics.record_failure("error")
            return
        except Exception:
            log.exception("watch: prune failed; it runs again next time")
            self.metrics.record_failure("error")
            return
        seconds = self._clock() - started
        if report is None:
            log.warning("prune skipped: the policy file is gone")
            return
        self._record(
            lambda: self.metrics.record_prune(report, seconds), refresh=bool(report.removed)
        )
        self._log_prune(report, seconds)

    def _record_served(self, reports: tuple[object, ...]) -> None:
        """Count what commands served for clients did, then refresh the gauges once.
        Dry runs and reading commands changed nothing and are not counted."""
        counted: list[DeleteReport | GcReport | SyncReport] = []
        batches: list[DeleteBatch] = []
        changed = False
        for report in reports:
            if isinstance(report, DeleteBatch):  # the group commit its deletes were in
                batches.append(report)
            elif isinstance(report, DeleteReport | GcReport) and not report.dry_run:
                counted.append(report)
                changed = True
            elif isinstance(report, SyncReport):  # sync, init
                counted.append(report)
                self._log_found(report)
                changed = changed or report.changed
            elif isinstance(report, VerifyReport) and report.repaired:
                changed = True

        def count() -> None:
            for report in counted:
                self.metrics.record_served(report)
            for batch in batches:
                self.metrics.record_delete_batch(batch)

        self._record(count, refresh=changed)

    def _flush_on_stop(self, job: Job) -> None:
        """SIGTERM: apply what was already seen, once, without waiting for quiet.
        Whatever fails here is caught up by the next start's full reconcile."""
        if job.paths:
            self._reconcile(job)

    def _record(self, count: Callable[[], None], *, refresh: bool) -> None:
        """Count what a job did and, when `refresh`, set the gauges from the store's
        figures read now: one update of the metrics, so that no scrape shows the
        counters of a job beside gauges from before it (`Metrics.together`)."""
        stats = None
        if refresh:
            try:
                stats = self.collector.stats()
            except Exception:
                log.exception("watch: could not read figures for the metrics")
        with self.metrics.together():
            count()
            if stats is not None:
                self.metrics.record_stats(stats)

    def _check_events(self, job: Job) -> None:
        """The health check: rebuild the observer when events were lost (the job
        says why) or a thread of it stopped, then reconcile fully."""
        problem = job.reasons[0] if job.reasons else self.events.problem()
        if problem is None:
            return
        log.warning("watch: %s; rebuilding the observer and reconciling fully", problem)
        try:
            self.events.rebuild()
        except OSError as exc:
            log.error("watch: cannot watch %s: %s; retrying", self.store, exc)
            return
        log.info("watch: observer rebuilt; watching %s again", self.store)
        self.request_full(f"observer rebuilt: {problem}")

    # --- logging ------------------------------------------------------------------
    def _log_batch(self, job: Job, report: SyncReport, seconds: float) -> None:
        full = job.full
        what = (
            f"full reconcile ({', '.join(job.reasons)})"
            if full
            else f"batch: {job.paths.describe()} changed"
        )
        # Batches caused only by the daemon's own frees change nothing: keep them
        # out of the info log so that one line means one real change.
        level = logging.INFO if report.changed or full else logging.DEBUG
        log.log(
            level,
            "%s; roots +%d -%d, %d became live, %d freed (%s), %d restored, "
            "%d missing, %d new orphans; %.1f ms",
            what,
            report.roots_added,
            report.roots_removed,
            report.became_live,
            len(report.freed),
            human_size(report.freed_bytes),
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
    def _log_prune(report: PruneReport, seconds: float) -> None:
        level = logging.INFO if report.chosen else logging.DEBUG
        tags = [c.tag or c.digest for c in report.chosen]
        log.log(
            level,
            "prune: %d entries pruned%s, %d blobs freed (%s); %.1f ms",
            len(tags),
            f" ({', '.join(tags)})" if tags else "",
            len(report.freed),
            human_size(report.freed_bytes),
            seconds * 1000,
        )

    @staticmethod
    def _log_gc(report: GcReport, seconds: float) -> None:
        level = logging.INFO if report.swept or report.purged else logging.DEBUG
        log.log(
            level,
            "gc: %d orphans swept, %d trashed blobs purged, %s; %.1f ms",
            len(report.swept),
            len(report.purged),
            human_size(report.freed_bytes),
            seconds * 1000,
        )
