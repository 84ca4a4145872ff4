"""When the watch daemon works: a state machine over a clock it is given.

How it is used: the daemon's worker (`refcount.daemon`) tells the scheduler
what happened and asks it what to do next; the scheduler runs nothing, reads
no clock, starts no thread and never blocks. Every answer depends only on the
calls made so far and on `now`, seconds on a monotonic clock the caller picks
(`time.monotonic()` in the daemon, plain floats in the tests):

- requests, from any thread of the daemon (it serializes them):
  `notice(paths, now)` for file events, `request_full(reason)` (start, SIGHUP,
  a rebuilt observer), `report_lost(reason)` when watchdog lost events,
  `report_served(report)` for what a served command did, and `stop()`;
- the worker's loop: `next_job(now)` is the job due now, or None; then
  `deadline(now)` is when to ask again unless a request comes first;
- outcomes: `applied(job, now)` when a batch or full reconcile succeeded,
  `failed(job, now, invalid)` when it did not, and `invalidity(now)` says
  what is wrong with the store meanwhile.

What it decides, in the order `next_job` weighs it:

1. stop: whatever paths are pending go with the stop, to be applied once;
2. a health check of the observer every `health_interval`, at once after lost
   events (the job then names the loss: the observer must be rebuilt);
3. the reports of served commands, which wait for nothing;
4. a full reconcile: on request, every `resync` after the last one, and after
   lost events or a failed batch;
5. a batch of the paths noticed so far, once no event came for `debounce`
   seconds, or `max_delay` after the first one when events never stop;
6. gc every `gc_interval`;
7. a prune by the store's policy file every `prune_interval` (when set);
8. a shallow verify every `verify_every`, then one deep slice every
   `deep_every` (each off when None). The daemon runs them beside the
   worker, so a long one never holds up the batches.

After a failure, 4 and 5 wait for a backoff that doubles from `retry_first`
to `retry_max`; after an invalid store a new event ends the wait (the file
changed: worth re-reading at once), after any other error (a database that
cannot be reached) it does not; a success resets it. A failed job's paths and reasons are put back,
never dropped. The invalid-store warnings follow `warning_delay`: an
index.json that does not parse may be a write in progress and is warned about
only after `warning_after`; any other invalid store at once; either then again
after gaps that double up to `warning_max`.

Epochs let callers wait without sleeping (mkdocs' `wait_for_build`): every
request that asks for work (an event, a full reconcile, the resync timer)
bumps `seen_epoch`; a job carries the epoch it was taken at, and
`applied_epoch` becomes that epoch only when the job succeeds.

Like containerd's GC scheduler (`plugins/gc/scheduler.go`) this is the policy
of when to collect, kept apart from the collecting; unlike it, the scheduler
does not even own the loop, so tests step it with a fake clock.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

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
MIN_WAIT = 0.001
"""Shortest wait `deadline` asks for, so that a loop on it never spins."""
_PAST = float("-inf")
"""A time before any `now`: due at once, whatever clock the caller uses."""
_FUTURE = float("inf")
"""A time after any `now`: never due."""


def warning_delay(warned: int, first: float, gap: float, cap: float) -> float:
    """Seconds to wait before the next warning about a problem that lasts.

    `warned` warnings were given so far. The first is due `first` seconds after
    the problem began; each later one `gap`, 2 x `gap`, 4 x `gap`... seconds
    after the one before, never more than `cap`.
    """
    if warned <= 0:
        return first
    return min(gap * 2.0 ** min(warned - 1, 64), cap)


@dataclass(frozen=True)
class Timing:
    """How the scheduler spaces its work; every figure is in seconds."""

    debounce: float = 0.1
    """Quiet period after the last event before a batch is applied; 0 applies at once."""
    resync: float = 300.0
    """Interval between full reconciles that catch whatever the events missed."""
    gc_interval: float = 300.0
    """Interval between gc runs: orphans past the grace period, trash past its TTL."""
    prune_interval: float | None = None
    """Interval between prunes by the store's policy file; None never prunes."""
    health_interval: float = HEALTH_INTERVAL
    """Interval between checks that the observer's threads are alive."""
    retry_first: float = RETRY_FIRST
    """First backoff after a failed batch or full reconcile."""
    retry_max: float = RETRY_MAX
    """Longest backoff: it doubles from `retry_first` up to this."""
    warning_after: float = INVALID_WARNING_AFTER
    """How long an unparsable index.json waits for its first warning; also the
    first gap between repeated warnings about any invalid store."""
    warning_max: float = INVALID_WARNING_MAX
    """Longest gap between repeated warnings about an invalid store."""
    verify_every: float | None = None
    """Interval between shallow verifies (recount and compare); None: never."""
    deep_every: float | None = None
    """Interval between deep verify slices (hash the lap's next blobs); None: never."""

    def __post_init__(self) -> None:
        # A zero interval would make the worker spin.
        if not self.debounce >= 0:
            raise ValueError(f"debounce {self.debounce}: must be 0 or more seconds")
        for name in ("resync", "gc_interval", "health_interval", "retry_first"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be more than 0 seconds")
        for name in ("prune_interval", "verify_every", "deep_every"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} {value}: must be more than 0 seconds")

    @property
    def max_delay(self) -> float:
        """Longest a batch waits while events keep coming, so that a store that
        never goes quiet is still applied: 5 quiet periods, at least 0.5 s."""
        return max(0.5, 5 * self.debounce)


@dataclass
class PathSet:
    """What changed since the last batch: index.json, and which blob files (digests)."""

    index: bool = False
    blobs: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return self.index or bool(self.blobs)

    def merge(self, other: PathSet) -> None:
        self.index |= other.index
        self.blobs |= other.blobs

    def take(self) -> PathSet:
        """Return the contents and empty this set."""
        taken = PathSet(self.index, self.blobs)
        self.index, self.blobs = False, set()
        return taken

    def describe(self) -> str:
        parts = ["index.json"] if self.index else []
        if self.blobs:
            parts.append(f"{len(self.blobs)} blob file{'s' if len(self.blobs) != 1 else ''}")
        return " and ".join(parts) or "nothing"


class JobKind(StrEnum):
    BATCH = "batch"
    """Apply the paths noticed (`Job.paths`)."""
    FULL = "full"
    """Reconcile everything (`Job.reasons` say why); `Job.paths` are covered by it."""
    GC = "gc"
    """A full reconcile, then gc; `Job.paths` are covered by the reconcile."""
    VERIFY = "verify"
    """Start a shallow verify (recount and compare)."""
    DEEP = "deep"
    """Start a deep verify slice (the lap's next blobs hashed)."""
    PRUNE = "prune"
    """Apply the store's retention policy file (`refcount prune`)."""
    HEALTH = "health"
    """Check the observer; with `Job.reasons`, events were lost: rebuild it."""
    SERVED = "served"
    """Count what served commands did (`Job.reports`)."""
    STOP = "stop"
    """Apply `Job.paths` once, without waiting for quiet, and stop."""


@dataclass(frozen=True)
class Job:
    """One unit of work the scheduler hands out."""

    kind: JobKind
    paths: PathSet = field(default_factory=PathSet)
    reasons: tuple[str, ...] = ()
    epoch: int = 0
    """`seen_epoch` when the job was taken: what it applies, if it succeeds."""
    reports: tuple[object, ...] = ()

    @property
    def full(self) -> bool:
        """A full reconcile: asked for (FULL), or the one gc starts with (GC)."""
        return self.kind in (JobKind.FULL, JobKind.GC)


@dataclass(frozen=True)
class Invalid:
    """Why a job failed on an invalid store (passed to `Scheduler.failed`)."""

    error: str
    """The error's one line, as it is logged."""
    in_progress: bool = False
    """index.json did not parse: perhaps a tool's write in progress. Such a
    store is one problem however its text changes; any other invalid store is
    one problem per distinct `error`."""


@dataclass(frozen=True)
class Warn:
    """`failed` says: warn about the invalid store now."""

    lasting: float
    """Seconds the store has been invalid."""
    again: float
    """Seconds until the next warning, if it stays so."""


@dataclass(frozen=True)
class Invalidity:
    """What `invalidity` says while the store is invalid."""

    lasting: float
    """Seconds since the first failure of this spell."""
    error: str
    """The last error."""
    warned: bool
    """A warning was given during this spell (its end is then worth an info line)."""


@dataclass
class _Spell:
    """The store is invalid since `since`; the warnings given about its `problem`."""

    since: float
    error: str
    problem: str
    problem_since: float
    warned: int = 0
    warned_at: float = 0.0
    warned_any: bool = False


def _due(now: float, every: float | None) -> float:
    """When a periodic job is next due: `every` from now, or never (None)."""
    return _FUTURE if every is None else now + every


class Scheduler:
    """When to apply batches, reconcile, gc and check the observer; see the module
    docstring. Not thread-safe: the daemon calls it under its own lock."""

    def __init__(self, timing: Timing, now: float) -> None:
        """The timers start at `now`: the first resync is due `timing.resync`
        later. Nothing is requested yet (the daemon asks for the start-up full
        reconcile itself)."""
        self.timing = timing
        self._pending = PathSet()
        self._full_reasons: list[str] = []
        self._served: list[object] = []
        self._first_event = 0.0
        self._last_event = 0.0
        self._retry_at = _PAST
        self._retry_delay = timing.retry_first
        self._retry_on_change = True  # the last failure was the store's: an event may end it
        self._rebuild: str | None = None  # why the observer must be rebuilt
        self._spell: _Spell | None = None  # the store is invalid
        self._stopping = False
        self._seen = 0
        self._applied = 0
        self._health_due = now + timing.health_interval
        self._resync_due = now + timing.resync
        self._gc_due = now + timing.gc_interval
        self._verify_due = _due(now, timing.verify_every)
        self._deep_due = _due(now, timing.deep_every)
        self._prune_due = _due(now, timing.prune_interval)

    # --- requests ---------------------------------------------------------------
    def notice(self, paths: PathSet, now: float) -> None:
        """Changed paths; applied as one batch once events stop for a while."""
        if not self._pending:
            self._first_event = now
        self._pending.merge(paths)
        self._last_event = now
        if self._retry_on_change:  # the file changed again: worth re-reading at once
            self._retry_at = _PAST
        self._seen += 1

    def request_full(self, reason: str) -> None:
        """Ask for a full reconcile; one reason is listed once however often asked."""
        if reason not in self._full_reasons:
            self._full_reasons.append(reason)
        self._seen += 1

    def report_lost(self, reason: str) -> None:
        """Events were lost: check (and rebuild) the observer at once, then
        reconcile fully."""
        self._rebuild = self._rebuild or reason
        self._health_due = _PAST
        self.request_full(reason)

    def report_served(self, report: object) -> None:
        """A report a command served for a client rendered; handed out at once."""
        self._served.append(report)

    def stop(self) -> bool:
        """Stop after the job in hand; True the first time it is asked."""
        first = not self._stopping
        self._stopping = True
        return first

    # --- the worker's loop ---------------------------------------------------------
    def next_job(self, now: float) -> Job | None:
        """The job due at `now`, taken (its work is no longer pending), or None."""
        timing = self.timing
        if self._stopping:
            return Job(JobKind.STOP, self._pending.take(), epoch=self._seen)
        if now >= self._health_due:
            self._health_due = now + timing.health_interval
            lost, self._rebuild = self._rebuild, None
            return Job(JobKind.HEALTH, reasons=() if lost is None else (lost,))
        if self._served:
            reports = tuple(self._served)
            self._served.clear()
            return Job(JobKind.SERVED, reports=reports)
        if now >= self._resync_due:
            self._resync_due = now + timing.resync
            self._full_reasons.append("periodic resync")
            self._seen += 1
        if self._full_reasons and now >= self._retry_at:
            reasons = tuple(self._full_reasons)
            self._full_reasons.clear()
            return Job(JobKind.FULL, self._pending.take(), reasons, self._seen)
        if self._pending and now >= self._retry_at and self._quiet(now):
            return Job(JobKind.BATCH, self._pending.take(), epoch=self._seen)
        if now >= self._gc_due:
            self._gc_due = now + timing.gc_interval
            return Job(JobKind.GC, self._pending.take(), ("before gc",), self._seen)
        if now >= self._prune_due:
            self._prune_due = _due(now, timing.prune_interval)
            return Job(JobKind.PRUNE)
        if now >= self._verify_due:
            self._verify_due = _due(now, timing.verify_every)
            return Job(JobKind.VERIFY)
        if now >= self._deep_due:
            self._deep_due = _due(now, timing.deep_every)
            return Job(JobKind.DEEP)
        return None

    def deadline(self, now: float) -> float:
        """When something falls due if nothing else is requested (never before
        `now + MIN_WAIT`). Call it after `next_job(now)` returned None."""
        deadlines = [
            self._resync_due,
            self._health_due,
            self._gc_due,
            self._prune_due,
            self._verify_due,
            self._deep_due,
        ]
        if self._full_reasons:
            deadlines.append(self._retry_at)
        if self._pending:
            quiet = min(
                self._last_event + self.timing.debounce,
                self._first_event + self.timing.max_delay,
            )
            deadlines.append(max(quiet, self._retry_at))
        if self._served or self._stopping:
            deadlines.append(now)
        return max(min(deadlines), now + MIN_WAIT)

    def _quiet(self, now: float) -> bool:
        return (
            now - self._last_event >= self.timing.debounce
            or now - self._first_event >= self.timing.max_delay
        )

    # --- outcomes ------------------------------------------------------------------
    def applied(self, job: Job, now: float) -> None:
        """`job` (a batch, a full reconcile or a stop's last batch) succeeded:
        its epoch is applied, the backoff and the invalid spell are over, and
        after a full reconcile the next resync is `resync` from now."""
        if job.full:
            self._resync_due = now + self.timing.resync
        self._spell = None
        self._applied = max(self._applied, job.epoch)
        self._retry_delay = self.timing.retry_first
        self._retry_at = _PAST

    def failed(self, job: Job, now: float, invalid: Invalid | None = None) -> Warn | None:
        """`job` failed: on an invalid store (`invalid`), or on another error.

        Its paths are pending again and it is retried after the backoff; a full
        reconcile keeps its reasons, and any other error asks for a full
        reconcile ("retry after an error"). Returns the warning due now about
        an invalid store, if one is.
        """
        self._pending.merge(job.paths)
        if job.full or invalid is None:
            for reason in job.reasons or ("retry after an error",):
                if reason not in self._full_reasons:
                    self._full_reasons.append(reason)
        self._retry_at = now + self._retry_delay
        self._retry_delay = min(self._retry_delay * 2, self.timing.retry_max)
        # A store's file changing can end an invalid spell; it cannot bring back a
        # database that went away, so such a backoff holds however busy the store.
        self._retry_on_change = invalid is not None
        if invalid is None:
            return None
        problem = "unparsable" if invalid.in_progress else invalid.error
        spell = self._spell
        if spell is None:
            spell = self._spell = _Spell(now, invalid.error, problem, now)
        if problem != spell.problem:
            spell.problem, spell.problem_since, spell.warned = problem, now, 0
        spell.error = invalid.error
        since = spell.warned_at if spell.warned else spell.problem_since
        first = self.timing.warning_after if invalid.in_progress else 0.0
        gap, cap = self.timing.warning_after, self.timing.warning_max
        if now < since + warning_delay(spell.warned, first, gap, cap):
            return None
        spell.warned += 1
        spell.warned_at = now
        spell.warned_any = True
        return Warn(now - spell.since, warning_delay(spell.warned, first, gap, cap))

    def invalidity(self, now: float) -> Invalidity | None:
        """What is wrong with the store since a job last failed on it, if anything."""
        spell = self._spell
        if spell is None:
            return None
        return Invalidity(now - spell.since, spell.error, spell.warned_any)

    # --- figures -----------------------------------------------------------------
    @property
    def seen_epoch(self) -> int:
        """Bumped by every request for work: an event, a full reconcile, the resync timer."""
        return self._seen

    @property
    def applied_epoch(self) -> int:
        """The highest `seen_epoch` whose work is fully applied."""
        return self._applied

    @property
    def stopping(self) -> bool:
        return self._stopping

    @property
    def has_work(self) -> bool:
        """Paths or a full reconcile are waiting (for quiet, or for a retry)."""
        return bool(self._pending) or bool(self._full_reasons)
