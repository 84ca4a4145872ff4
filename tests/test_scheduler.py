"""The daemon's scheduler on a fake clock: debounce, backoff, timers, lost events, epochs.

No thread, no watchdog, no sleep. `Worker` plays the daemon's worker loop with
a clock of plain floats: it takes the job due now, reports an outcome from a
script, and otherwise jumps the clock to the scheduler's deadline or to the
next scripted request, whichever comes first. So every job below happens at
the exact time the scheduler chose, and the wake-ups show that nothing polls.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Literal

import pytest

from refcount.scheduler import (
    MIN_WAIT,
    Invalid,
    Invalidity,
    Job,
    JobKind,
    PathSet,
    Scheduler,
    Timing,
    Warn,
)

pytestmark = pytest.mark.no_database

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64
NEVER = 1e9  # a timer that does not fire in these tests
UNPARSABLE = Invalid("index.json: invalid JSON", in_progress=True)
NOT_AN_INDEX = Invalid("index.json: not an image index: schemaVersion is missing")
Outcome = Invalid | Literal["error"] | None
"""What the collector did with a job: None applied it, "error" is an unexpected failure."""
Request = Callable[[Scheduler, float], None]


def timing(**changes: float) -> Timing:
    """The daemon's timing with every timer off unless a test turns it on."""
    quiet: dict[str, float] = {"resync": NEVER, "gc_interval": NEVER, "health_interval": NEVER}
    return Timing(**{**quiet, **changes})


def index() -> PathSet:
    return PathSet(index=True)


def blobs(*digests: str) -> PathSet:
    return PathSet(blobs=set(digests))


def notice(paths: PathSet) -> Request:
    return lambda s, now: s.notice(paths, now)


def full(reason: str) -> Request:
    return lambda s, _now: s.request_full(reason)


@dataclass
class Worker:
    """The daemon's worker loop with a fake clock and a scripted test collector."""

    scheduler: Scheduler
    now: float = 0.0
    outcomes: list[Outcome] = field(default_factory=list)
    """What the next reconciling jobs end with, in order; then every one succeeds."""
    always: Outcome = None
    """What every reconciling job ends with once `outcomes` is used up."""
    done: list[tuple[float, Job]] = field(default_factory=list)
    warnings: list[tuple[float, Warn]] = field(default_factory=list)
    wakes: list[float] = field(default_factory=list)

    def run(self, until: float, requests: Iterable[tuple[float, Request]] = ()) -> Worker:
        script = sorted(requests, key=lambda r: r[0])
        while True:
            job = self.scheduler.next_job(self.now)
            if job is not None:
                self._collect(job)
                if job.kind is JobKind.STOP:
                    return self
                continue
            wake = self.scheduler.deadline(self.now)
            assert wake >= self.now + MIN_WAIT  # never a wait in the past: no spinning
            if script and script[0][0] <= wake:
                at, request = script.pop(0)
                self.now = max(self.now, at)
                request(self.scheduler, self.now)
            elif wake <= until:
                self.now = wake
            else:
                self.now = until
                return self
            self.wakes.append(self.now)

    def _collect(self, job: Job) -> None:
        self.done.append((self.now, job))
        if job.kind in (JobKind.HEALTH, JobKind.SERVED, JobKind.VERIFY, JobKind.DEEP):
            return  # nothing to apply: their outcomes are not the scheduler's
        outcome = self.outcomes.pop(0) if self.outcomes else self.always
        if outcome is None:
            self.scheduler.applied(job, self.now)
            return
        warn = self.scheduler.failed(
            job, self.now, outcome if isinstance(outcome, Invalid) else None
        )
        if warn is not None:
            self.warnings.append((self.now, warn))

    def jobs(self, *kinds: JobKind) -> list[tuple[float, Job]]:
        return [(t, j) for t, j in self.done if j.kind in kinds]

    def times(self, *kinds: JobKind) -> list[float]:
        return [t for t, _ in self.jobs(*kinds)]


def gaps(times: list[float]) -> list[float]:
    return [round(later - earlier, 9) for earlier, later in itertools.pairwise(times)]


# --------------------------------------------------------------------------
# Debounce
# --------------------------------------------------------------------------
def test_a_batch_waits_for_a_quiet_period_after_the_last_event() -> None:
    worker = Worker(Scheduler(timing(debounce=0.1), 0.0)).run(
        1.0, [(0.0, notice(index())), (0.06, notice(blobs(A))), (0.12, notice(blobs(B)))]
    )
    [(at, batch)] = worker.jobs(JobKind.BATCH)
    assert at == pytest.approx(0.22)  # 0.1 after the last event, not after the first
    assert batch.paths == PathSet(index=True, blobs={A, B})
    # The worker woke for each event and once for the batch: it never polled.
    assert worker.wakes[:4] == pytest.approx([0.0, 0.06, 0.12, 0.22])
    assert len(worker.done) == 1


def test_a_stream_that_never_goes_quiet_is_still_applied_within_max_delay() -> None:
    every = [(i * 0.05, notice(blobs(f"sha256:{i:064x}"))) for i in range(41)]  # 2 s
    worker = Worker(Scheduler(timing(debounce=0.1), 0.0)).run(5.0, every)
    batches = worker.jobs(JobKind.BATCH)
    assert Timing(debounce=0.1).max_delay == 0.5
    assert batches[0][0] == pytest.approx(0.5)  # the stream never paused for 0.1 s
    assert len(batches) >= 4
    for at, batch in batches:
        times = sorted(int(d.split(":")[1], 16) * 0.05 for d in batch.paths.blobs)
        assert times[-1] <= at <= times[0] + 0.5 + 1e-9  # no event waited over max_delay
    assert sum(len(b.paths.blobs) for _, b in batches) == 41  # each event in one batch
    assert len(set().union(*(b.paths.blobs for _, b in batches))) == 41
    assert batches[-1][0] == pytest.approx(2.1)  # the end of the stream: quiet at last


def test_a_zero_debounce_applies_each_event_at_once() -> None:
    worker = Worker(Scheduler(timing(debounce=0.0), 0.0)).run(
        1.0, [(0.2, notice(blobs(A))), (0.3, notice(blobs(B)))]
    )
    assert [(t, j.paths) for t, j in worker.jobs(JobKind.BATCH)] == [
        (0.2, blobs(A)),
        (0.3, blobs(B)),
    ]


# --------------------------------------------------------------------------
# Backoff after a failure
# --------------------------------------------------------------------------
def test_a_failed_batch_is_retried_with_a_doubling_backoff_up_to_a_cap() -> None:
    scheduler = Scheduler(timing(debounce=0.1, retry_first=0.05, retry_max=0.4), 0.0)
    worker = Worker(scheduler, outcomes=[UNPARSABLE] * 6)
    worker.run(5.0, [(0.0, notice(PathSet(index=True, blobs={A})))])
    attempts = worker.jobs(JobKind.BATCH)
    assert len(attempts) == 7  # six failures, then the success
    assert gaps([t for t, _ in attempts]) == [0.05, 0.1, 0.2, 0.4, 0.4, 0.4]
    # The same batch every time: never dropped, never applied in part.
    assert {(j.paths.index, frozenset(j.paths.blobs)) for _, j in attempts} == {
        (True, frozenset({A}))
    }
    assert worker.jobs(JobKind.FULL) == []  # an invalid store asks for no full reconcile
    assert scheduler.applied_epoch == scheduler.seen_epoch
    assert not scheduler.has_work


def test_a_success_resets_the_backoff() -> None:
    scheduler = Scheduler(timing(debounce=0.0, retry_first=0.05, retry_max=10.0), 0.0)
    worker = Worker(scheduler, outcomes=[UNPARSABLE] * 4)
    worker.run(10.0, [(0.0, notice(index())), (5.0, notice(blobs(A)))])
    worker.outcomes = [UNPARSABLE, None]
    worker.run(20.0, [(10.0, notice(blobs(B)))])
    times = worker.times(JobKind.BATCH)
    assert gaps(times[:5]) == [0.05, 0.1, 0.2, 0.4]
    assert times[5] == 5.0  # then a new event, applied at once
    assert gaps(times[6:]) == [0.05]  # the next failure starts again from the first backoff


def test_a_new_event_ends_the_backoff_the_file_changed_again() -> None:
    scheduler = Scheduler(timing(debounce=0.1, retry_first=1.0), 0.0)
    worker = Worker(scheduler, outcomes=[UNPARSABLE])
    worker.run(3.0, [(0.0, notice(index())), (0.3, notice(blobs(A)))])
    (failed_at, _), (retried_at, retried) = worker.jobs(JobKind.BATCH)
    assert failed_at == pytest.approx(0.1)
    assert retried_at == pytest.approx(0.4)  # quiet after the event, not 1.1 (the backoff)
    assert retried.paths == PathSet(index=True, blobs={A})


def test_a_new_event_does_not_end_the_backoff_after_an_error_such_as_a_lost_database() -> None:
    scheduler = Scheduler(timing(debounce=0.1, retry_first=1.0), 0.0)
    worker = Worker(scheduler, outcomes=["error"])
    worker.run(3.0, [(0.0, notice(index())), (0.3, notice(blobs(A)))])
    (failed_at, _), (retried_at, retried) = worker.jobs(JobKind.BATCH, JobKind.FULL)
    assert failed_at == pytest.approx(0.1)
    assert retried_at == pytest.approx(1.1)  # the backoff, not 0.4 (quiet after the event)
    assert retried.paths == PathSet(index=True, blobs={A})


def test_an_unexpected_error_asks_for_a_full_reconcile_that_covers_the_batch() -> None:
    scheduler = Scheduler(timing(debounce=0.1, retry_first=0.05), 0.0)
    worker = Worker(scheduler, outcomes=["error"]).run(1.0, [(0.0, notice(blobs(A)))])
    (batch_at, _), (full_at, retry) = worker.jobs(JobKind.BATCH, JobKind.FULL)
    assert retry.kind is JobKind.FULL and retry.reasons == ("retry after an error",)
    assert retry.paths == blobs(A)
    assert full_at - batch_at == pytest.approx(0.05)
    assert len(worker.done) == 2


def test_a_failed_full_reconcile_keeps_its_reasons_and_is_retried_after_the_backoff() -> None:
    scheduler = Scheduler(timing(retry_first=0.05), 0.0)
    scheduler.request_full("start")
    worker = Worker(scheduler, outcomes=[NOT_AN_INDEX, NOT_AN_INDEX]).run(1.0)
    fulls = worker.jobs(JobKind.FULL)
    assert [j.reasons for _, j in fulls] == [("start",)] * 3
    assert gaps([t for t, _ in fulls]) == [0.05, 0.1]


# --------------------------------------------------------------------------
# Full reconciles, lost events, timers
# --------------------------------------------------------------------------
def test_a_full_reconcile_request_preempts_a_pending_batch_and_takes_its_paths() -> None:
    worker = Worker(Scheduler(timing(debounce=0.1), 0.0)).run(
        1.0, [(0.0, notice(blobs(A))), (0.05, full("SIGHUP"))]
    )
    [(at, job)] = worker.done  # and no batch after it
    assert job.kind is JobKind.FULL and at == 0.05  # before the batch's quiet period ended
    assert job.reasons == ("SIGHUP",) and job.paths == blobs(A)


def test_a_reason_asked_for_twice_is_one_full_reconcile_listing_it_once() -> None:
    scheduler = Scheduler(timing(), 0.0)
    for reason in ("SIGHUP", "start", "SIGHUP"):
        scheduler.request_full(reason)
    job = scheduler.next_job(0.0)
    assert job is not None and job.reasons == ("SIGHUP", "start")
    assert scheduler.next_job(0.0) is None


def test_lost_events_lead_to_a_rebuild_of_the_observer_then_a_full_reconcile() -> None:
    scheduler = Scheduler(timing(health_interval=1.0), 0.0)
    scheduler.notice(blobs(A), 0.2)
    scheduler.report_lost("watchdog: Inotify queue overflowed")
    scheduler.report_lost("an emitter thread stopped")  # the first loss is the one named
    check = scheduler.next_job(0.3)  # at once: the health check is not waited for
    assert check == Job(JobKind.HEALTH, reasons=("watchdog: Inotify queue overflowed",))
    # The worker rebuilds the observer and asks for the full reconcile that follows.
    scheduler.request_full("observer rebuilt: watchdog: Inotify queue overflowed")
    reconcile = scheduler.next_job(0.3)
    assert reconcile is not None and reconcile.kind is JobKind.FULL
    assert reconcile.reasons == (
        "watchdog: Inotify queue overflowed",
        "an emitter thread stopped",
        "observer rebuilt: watchdog: Inotify queue overflowed",
    )
    assert reconcile.paths == blobs(A)
    assert scheduler.next_job(0.3) is None
    # The next check is a plain one, a health interval later.
    assert scheduler.deadline(0.3) == pytest.approx(1.3)
    assert scheduler.next_job(1.3) == Job(JobKind.HEALTH)


def test_the_observer_is_checked_every_health_interval() -> None:
    worker = Worker(Scheduler(timing(health_interval=1.0), 0.0)).run(3.5)
    assert worker.times(JobKind.HEALTH) == [1.0, 2.0, 3.0]
    assert all(job.reasons == () for _, job in worker.done)


def test_the_resync_timer_fires_on_time_and_any_full_reconcile_pushes_it_back() -> None:
    scheduler = Scheduler(timing(resync=10.0), 0.0)
    worker = Worker(scheduler).run(36.0, [(15.0, full("SIGHUP"))])
    assert [(t, j.reasons) for t, j in worker.jobs(JobKind.FULL)] == [
        (10.0, ("periodic resync",)),
        (15.0, ("SIGHUP",)),
        (25.0, ("periodic resync",)),
        (35.0, ("periodic resync",)),
    ]
    assert scheduler.seen_epoch == scheduler.applied_epoch == 4


def test_the_gc_timer_fires_on_time_and_takes_the_paths_its_reconcile_covers() -> None:
    scheduler = Scheduler(timing(debounce=0.1, gc_interval=7.0, resync=10.0), 0.0)
    worker = Worker(scheduler).run(15.0, [(6.95, notice(blobs(A)))])
    assert [(t, j.kind, j.reasons) for t, j in worker.done] == [
        (7.0, JobKind.GC, ("before gc",)),
        # gc's full reconcile pushed the resync from 10 to 17.
        (14.0, JobKind.GC, ("before gc",)),
    ]
    assert worker.done[0][1].paths == blobs(A)  # not yet quiet, but covered by the reconcile
    assert not scheduler.has_work


def test_served_reports_are_handed_out_before_any_other_work_and_ask_for_none() -> None:
    scheduler = Scheduler(timing(debounce=0.0), 0.0)
    scheduler.notice(blobs(A), 0.0)
    scheduler.request_full("start")
    seen = scheduler.seen_epoch
    scheduler.report_served("a delete's report")
    scheduler.report_served("a gc's report")
    assert scheduler.next_job(0.0) == Job(
        JobKind.SERVED, reports=("a delete's report", "a gc's report")
    )
    assert scheduler.seen_epoch == seen
    job = scheduler.next_job(0.0)
    assert job is not None and job.kind is JobKind.FULL


# --------------------------------------------------------------------------
# Epochs and stopping
# --------------------------------------------------------------------------
def test_epochs_advance_only_when_the_work_is_applied() -> None:
    scheduler = Scheduler(timing(debounce=0.0, retry_first=1.0), 0.0)
    scheduler.notice(blobs(A), 0.0)
    assert (scheduler.seen_epoch, scheduler.applied_epoch) == (1, 0)
    first = scheduler.next_job(0.0)
    assert first is not None and first.epoch == 1
    scheduler.failed(first, 0.0, UNPARSABLE)
    assert scheduler.applied_epoch == 0  # a failure applies nothing
    retry = scheduler.next_job(1.0)
    assert retry is not None and retry.epoch == 1
    scheduler.notice(blobs(B), 1.0)  # arrives while the retry is in hand
    scheduler.applied(retry, 1.0)
    assert (scheduler.seen_epoch, scheduler.applied_epoch) == (2, 1)  # B is not applied yet
    last = scheduler.next_job(1.0)
    assert last is not None and last.paths == blobs(B)
    scheduler.applied(last, 1.0)
    assert scheduler.applied_epoch == scheduler.seen_epoch == 2
    scheduler.applied(retry, 1.0)  # a late report of older work never moves it back
    assert scheduler.applied_epoch == 2


def test_stop_takes_what_is_pending_once_before_anything_else() -> None:
    scheduler = Scheduler(timing(debounce=10.0, health_interval=1.0), 0.0)
    scheduler.notice(blobs(A), 0.0)
    scheduler.request_full("SIGHUP")
    assert scheduler.stop() and not scheduler.stop()  # True only the first time
    assert scheduler.stopping
    assert scheduler.next_job(5.0) == Job(JobKind.STOP, blobs(A), epoch=2)
    assert scheduler.next_job(5.0) == Job(JobKind.STOP, PathSet(), epoch=2)


# --------------------------------------------------------------------------
# Warnings about an invalid store
# --------------------------------------------------------------------------
def test_an_unparsable_index_is_warned_about_after_a_delay_then_less_and_less_often() -> None:
    scheduler = Scheduler(timing(debounce=0.0, warning_after=10.0, warning_max=160.0), 0.0)
    worker = Worker(scheduler, always=UNPARSABLE)
    worker.run(700.0, [(0.0, notice(index()))])
    times = [t for t, _ in worker.warnings]
    # Re-read every 2 s at most (the backoff's cap), warned at the first re-read due.
    expected = [10.0, 10.0, 20.0, 40.0, 80.0, 160.0, 160.0, 160.0]
    assert times[0] >= 10.0
    for gap, least in zip(gaps([0.0, *times]), expected, strict=False):
        assert least <= gap < least + 2.0
    assert len(times) == 8  # and not one more: 700 s hold only these
    lasting, again = worker.warnings[2][1].lasting, worker.warnings[2][1].again
    assert lasting == pytest.approx(times[2]) and again == 40.0
    assert len(worker.jobs(JobKind.BATCH)) > 300  # re-read all along


def test_an_index_that_parses_but_is_no_image_index_is_warned_about_at_once() -> None:
    scheduler = Scheduler(timing(debounce=0.0), 0.0)
    worker = Worker(scheduler, always=NOT_AN_INDEX).run(35.0, [(1.0, notice(index()))])
    assert [t for t, _ in worker.warnings][:3] == pytest.approx([1.0, 11.15, 31.15], abs=2.0)
    assert worker.warnings[0][1] == Warn(lasting=0.0, again=10.0)


def test_another_invalid_document_starts_its_own_warning_schedule() -> None:
    scheduler = Scheduler(timing(debounce=0.0, retry_first=1.0, retry_max=1.0), 0.0)
    batch = Job(JobKind.BATCH, index())
    assert scheduler.failed(batch, 0.0, NOT_AN_INDEX) == Warn(0.0, 10.0)
    assert scheduler.failed(batch, 1.0, NOT_AN_INDEX) is None  # the same one: in 10 s
    other = Invalid("index.json: not an image index: schemaVersion is 3, not 2")
    assert scheduler.failed(batch, 2.0, other) == Warn(2.0, 10.0)  # a new one: at once
    # An unparsable file is a new problem too, and waits for its own delay.
    assert scheduler.failed(batch, 3.0, UNPARSABLE) is None
    assert scheduler.failed(batch, 12.9, UNPARSABLE) is None
    assert scheduler.failed(batch, 13.0, UNPARSABLE) == Warn(13.0, 10.0)
    # Whatever the text of an unparsable file, it stays one problem.
    assert scheduler.failed(batch, 14.0, Invalid("index.json: truncated", True)) is None


def test_invalidity_tells_how_long_the_store_is_invalid_until_a_success() -> None:
    scheduler = Scheduler(timing(debounce=0.0), 0.0)
    assert scheduler.invalidity(0.0) is None
    batch = Job(JobKind.BATCH, index())
    scheduler.failed(batch, 1.0, UNPARSABLE)
    assert scheduler.invalidity(4.0) == Invalidity(3.0, UNPARSABLE.error, warned=False)
    scheduler.failed(batch, 11.0, NOT_AN_INDEX)  # warned at once
    assert scheduler.invalidity(12.0) == Invalidity(11.0, NOT_AN_INDEX.error, warned=True)
    scheduler.applied(batch, 12.0)
    assert scheduler.invalidity(12.0) is None
    scheduler.failed(batch, 20.0, UNPARSABLE)  # a new spell, warned about from scratch
    assert scheduler.invalidity(20.0) == Invalidity(0.0, UNPARSABLE.error, warned=False)


def test_shallow_and_deep_verifies_fall_due_on_their_own_periods() -> None:
    scheduler = Scheduler(timing(verify_every=6.0, deep_every=4.0), 0.0)
    worker = Worker(scheduler).run(12.5)
    assert worker.times(JobKind.VERIFY) == [6.0, 12.0]
    assert worker.times(JobKind.DEEP) == [4.0, 8.0, 12.0]
    assert worker.wakes == [4.0, 6.0, 8.0, 12.0]  # woken for them, not polling


def test_verifies_are_off_by_default_and_wait_behind_a_due_batch() -> None:
    assert Worker(Scheduler(timing(), 0.0)).run(1e6).jobs(JobKind.VERIFY, JobKind.DEEP) == []
    scheduler = Scheduler(timing(debounce=0.5, verify_every=1.0, deep_every=1.0), 0.0)
    worker = Worker(scheduler).run(1.6, [(0.5, notice(index()))])
    assert [(t, j.kind) for t, j in worker.done] == [
        (1.0, JobKind.BATCH),
        (1.0, JobKind.VERIFY),
        (1.0, JobKind.DEEP),
    ]


def test_timings_that_would_make_the_worker_spin_are_refused() -> None:
    for bad in ({"verify_every": 0.0}, {"deep_every": -2.0}):
        with pytest.raises(ValueError, match="must be more than 0 seconds"):
            Timing(**bad)
    for bad in ({"resync": 0.0}, {"gc_interval": -1.0}, {"debounce": float("nan")}):
        with pytest.raises(ValueError, match="must be"):
            Timing(**bad)


def test_a_prune_falls_due_every_prune_interval_and_never_without_one() -> None:
    scheduler = Scheduler(timing(prune_interval=30.0), 0.0)
    assert scheduler.next_job(29.0) is None
    assert scheduler.deadline(29.0) == 30.0
    job = scheduler.next_job(30.0)
    assert job is not None and job.kind is JobKind.PRUNE
    assert scheduler.next_job(59.0) is None
    again = scheduler.next_job(60.0)
    assert again is not None and again.kind is JobKind.PRUNE
    never = Scheduler(timing(), 0.0)
    assert never.deadline(0.0) == NEVER  # only the timers turned off: no prune is due ever
    with pytest.raises(ValueError, match="prune_interval"):
        Timing(prune_interval=0)
