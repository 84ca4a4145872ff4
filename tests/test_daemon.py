"""The daemon's worker on a test collector and a fake clock, without its thread.

containerd tests its GC scheduler against a test collector; here `Recorder`
is the Collector (sync, gc, stats) and `FakeWatch` the event source, and the
test moves a clock of plain floats and calls `Daemon.run_due()`, which does
what the worker thread does between its waits. So these tests show what the
daemon asks of the library, when, and what it makes of the answers, with no
store, database, observer or sleep. tests/test_watch.py runs the real thing.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from refcount import interrupts
from refcount.core import Changes
from refcount.daemon import Daemon
from refcount.errors import InvalidStore, UnparsableIndex
from refcount.events import OnLost, OnPaths
from refcount.reports import (
    Aged,
    BlobRef,
    Corrupt,
    DeleteReport,
    GcReport,
    Lap,
    NeededBy,
    Stats,
    SyncReport,
    VerifyReport,
    VerifyRun,
    VerifyStatus,
)
from refcount.scheduler import PathSet, Timing
from refcount.verifier import DeepSlice, PeriodicVerify

STORE = Path("/srv/store")
A = "sha256:" + "a" * 64
FREED = SyncReport(roots_removed=1, freed=(BlobRef(A, 10, None),))
STATS = Stats(
    roots=2,
    live_blobs=5,
    live_bytes=500,
    missing_blobs=0,
    orphan_blobs=0,
    quarantined_blobs=1,
    quarantined_bytes=10,
)


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Recorder:
    """A test collector: records each call with the time, answers from a script."""

    clock: Clock
    syncs: list[SyncReport | Exception] = field(default_factory=list)
    """What the next syncs return or raise, in order; then an empty report."""
    calls: list[tuple[float, str, Changes | None]] = field(default_factory=list)
    gc_report: GcReport = field(default_factory=lambda: GcReport(dry_run=False))
    during_stats: Callable[[], None] | None = None

    def sync(self, changes: Changes | None = None) -> SyncReport:
        self.calls.append((self.clock(), "sync", changes))
        outcome = self.syncs.pop(0) if self.syncs else SyncReport()
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    def gc(self) -> GcReport:
        self.calls.append((self.clock(), "gc", None))
        return self.gc_report

    def stats(self) -> Stats:
        self.calls.append((self.clock(), "stats", None))
        if self.during_stats is not None:
            self.during_stats()
        return STATS

    def kinds(self) -> list[str]:
        return [kind for _, kind, _ in self.calls]


class FakeWatch:
    """An event source the test controls: it hands paths over and reports problems."""

    def __init__(self, store: Path, on_paths: OnPaths, on_lost: OnLost) -> None:
        self.store, self.on_paths, self.on_lost = store, on_paths, on_lost
        self.trouble: str | None = None
        self.rebuilds = 0
        self.broken = False  # rebuild() fails as if the inotify limit were reached

    def start(self) -> None:
        """Nothing to start: a test delivers paths and losses through the callbacks."""

    def alive(self) -> bool:
        return self.trouble is None

    def problem(self) -> str | None:
        return self.trouble

    def rebuild(self) -> None:
        if self.broken:
            raise OSError(24, "Too many open files")
        self.rebuilds += 1
        self.trouble = None

    def close(self) -> None:
        """Nothing to close (see `start`)."""


@dataclass
class Rig:
    daemon: Daemon
    collector: Recorder
    clock: Clock
    watch: FakeWatch

    def at(self, seconds: float) -> int:
        """Move the clock `seconds` on and do what is due then."""
        self.clock.now += seconds
        return self.daemon.run_due()

    def value(self, name: str, **labels: str) -> float:
        found = self.daemon.metrics.registry.get_sample_value(name, labels)
        return 0.0 if found is None else found


def rig(**timing: float) -> Rig:
    clock = Clock()
    collector = Recorder(clock)
    made: list[FakeWatch] = []

    def watch(store: Path, on_paths: OnPaths, on_lost: OnLost) -> FakeWatch:
        made.append(FakeWatch(store, on_paths, on_lost))
        return made[0]

    quiet = {"debounce": 0.125, "resync": 3600.0, "gc_interval": 3600.0, "health_interval": 1.0}
    daemon = Daemon(collector, STORE, Timing(**{**quiet, **timing}), clock=clock, watch=watch)
    daemon.request_full("start")
    daemon.run_due()
    return Rig(daemon, collector, clock, made[0])


@pytest.fixture
def logs(caplog: pytest.LogCaptureFixture) -> Callable[[], list[str]]:
    caplog.set_level(logging.DEBUG, "refcount.watch")
    return lambda: [r.getMessage() for r in caplog.records]


def test_the_start_up_reconcile_is_a_full_sync_then_the_gauges() -> None:
    r = rig()
    assert r.collector.calls == [(100.0, "sync", None), (100.0, "stats", None)]
    assert r.daemon.applied_epoch == r.daemon.seen_epoch == 1
    assert r.value("refcount_roots") == 2
    assert r.value("refcount_batches_applied_total", kind="full") == 1


def test_a_reconcile_shows_in_health_and_the_log_only_once_its_figures_are_in_the_metrics(
    logs: Callable[[], list[str]],
) -> None:
    clock = Clock()
    collector = Recorder(clock)
    daemon = Daemon(collector, STORE, Timing(), clock=clock, watch=FakeWatch)
    seen: list[tuple[object, bool]] = []
    collector.during_stats = lambda: seen.append(
        (
            daemon.health().detail["last_success_unix"],
            any(m.startswith("full reconcile (start)") for m in logs()),
        )
    )
    daemon.request_full("start")
    daemon.run_due()
    # While the gauges are read, /healthz still says "not yet" and the line is not out.
    assert seen == [(None, False)]
    assert daemon.health().detail["last_success_unix"] is not None
    assert any(m.startswith("full reconcile (start)") for m in logs())


def test_events_become_one_sync_of_their_changes_after_the_quiet_period() -> None:
    r = rig()
    r.collector.calls.clear()
    r.collector.syncs = [FREED]
    r.watch.on_paths(PathSet(index=True))
    assert r.at(0.0625) == 0  # not quiet yet
    r.watch.on_paths(PathSet(blobs={A}))
    assert r.at(0.0625) == 0  # the quiet period starts again
    assert r.at(0.0625) == 1
    assert r.collector.calls == [
        (100.1875, "sync", Changes(index=True, blobs=frozenset({A}))),
        (100.1875, "stats", None),  # the batch changed something
    ]
    assert r.daemon.applied_epoch == r.daemon.seen_epoch
    assert r.value("refcount_freed_blobs_total", reason="released") == 1


def test_a_batch_of_the_daemons_own_frees_that_changes_nothing_reads_no_figures() -> None:
    r = rig()
    r.collector.calls.clear()
    r.watch.on_paths(PathSet(blobs={A}))
    r.at(0.125)
    assert r.collector.kinds() == ["sync"]


def test_an_unparsable_index_is_re_read_with_backoff_warned_about_late_and_its_end_logged(
    logs: Callable[[], list[str]],
) -> None:
    r = rig(warning_after=1.0, retry_first=0.25, retry_max=0.5)
    r.collector.calls.clear()
    r.collector.syncs = [UnparsableIndex("index.json: invalid JSON")] * 4
    r.watch.on_paths(PathSet(index=True))
    for _ in range(16):
        r.at(0.125)
    syncs = [(t, c) for t, kind, c in r.collector.calls if kind == "sync"]
    # Quiet after 0.125 s, then backoffs of 0.25, 0.5 and 0.5 s (the cap).
    assert [t - 100.0 for t, _ in syncs] == [0.125, 0.375, 0.875, 1.375, 1.875]
    assert {c for _, c in syncs} == {Changes(index=True)}  # the same batch each time
    warnings = [m for m in logs() if "nothing is applied" in m]
    assert warnings == [  # only once it lasted warning_after
        "index.json: invalid JSON; nothing is applied until the store is valid "
        "(invalid for 1 s; warning again in 1 s if it stays so)"
    ]
    assert sum("re-reading shortly" in m for m in logs()) == 3
    assert logs().count("the store is valid again after 2 s (was: index.json: invalid JSON)") == 1
    assert r.value("refcount_reconcile_failures_total", reason="invalid_index") == 4
    assert r.daemon.applied_epoch == r.daemon.seen_epoch
    assert r.daemon.health().detail["index_invalid_seconds"] is None


def test_an_unexpected_error_is_followed_by_a_full_reconcile() -> None:
    r = rig(retry_first=0.5)
    r.collector.calls.clear()
    r.collector.syncs = [RuntimeError("database is locked")]
    r.watch.on_paths(PathSet(blobs={A}))
    r.at(0.125)
    assert r.value("refcount_reconcile_failures_total", reason="error") == 1
    assert r.at(0.375) == 0  # the backoff
    assert r.at(0.125) == 1
    assert r.collector.calls[1:] == [(100.625, "sync", None), (100.625, "stats", None)]


def test_an_invalid_store_during_a_full_reconcile_is_retried_and_shows_in_health() -> None:
    r = rig(retry_first=0.5)
    r.collector.syncs = [InvalidStore("index.json: not an image index: schemaVersion is missing")]
    r.daemon.request_full("SIGHUP")
    r.at(0.0)
    assert r.daemon.health().detail["index_invalid_seconds"] == 0.0
    r.clock.now += 0.3
    assert r.daemon.health().detail["index_invalid_seconds"] == pytest.approx(0.3)
    assert r.daemon.health().detail["pending"] is True
    r.at(0.2)
    assert r.collector.kinds()[-2:] == ["sync", "stats"]
    assert r.daemon.health().detail["pending"] is False


def test_lost_events_rebuild_the_observer_then_reconcile_fully(
    logs: Callable[[], list[str]],
) -> None:
    r = rig()
    r.collector.calls.clear()
    r.watch.on_lost("watchdog: Inotify queue overflowed")
    assert r.at(0.0) == 2  # the rebuild, then the full reconcile; no waiting
    assert r.watch.rebuilds == 1
    assert r.collector.kinds() == ["sync", "stats"]
    assert r.collector.calls[0][2] is None
    assert any(
        m.startswith(
            "full reconcile (watchdog: Inotify queue overflowed, "
            "observer rebuilt: watchdog: Inotify queue overflowed); roots +0 -0"
        )
        for m in logs()
    )


def test_a_dead_emitter_is_found_at_the_next_health_check_and_a_failed_rebuild_retried() -> None:
    r = rig()
    r.collector.calls.clear()
    r.watch.trouble = "an emitter thread stopped"
    r.watch.broken = True
    assert not r.daemon.health().detail["observer"]
    assert r.at(1.0) == 1  # the health check: the rebuild fails, no reconcile yet
    assert r.collector.calls == []
    r.watch.broken = False
    assert r.at(1.0) == 2  # the next check rebuilds, then the full reconcile
    assert r.watch.rebuilds == 1 and r.collector.kinds() == ["sync", "stats"]


def test_the_gc_timer_reconciles_fully_then_collects_then_reads_the_figures() -> None:
    r = rig(gc_interval=60.0)
    r.collector.calls.clear()
    r.collector.gc_report = GcReport(dry_run=False, swept=(Aged(A, 7, 4000.0),))
    r.at(59.0)
    assert "gc" not in r.collector.kinds()
    r.at(1.0)
    assert r.collector.kinds() == ["sync", "stats", "gc", "stats"]
    assert r.value("refcount_freed_blobs_total", reason="orphan") == 1


def test_served_reports_are_counted_at_once_and_dry_runs_are_not() -> None:
    r = rig()
    r.collector.calls.clear()
    freed = (BlobRef(A, 10, None),)
    r.daemon.report_served(DeleteReport("img0", dry_run=True, removed=(), freed=freed))
    r.daemon.report_served(DeleteReport("img1", dry_run=False, removed=(), freed=freed))
    assert r.at(0.0) == 1
    assert r.collector.kinds() == ["stats"]  # no reconcile: the database is in step
    assert r.value("refcount_freed_blobs_total", reason="deleted") == 1


def test_a_stop_applies_what_was_noticed_once_without_waiting_for_quiet() -> None:
    r = rig(debounce=10.0)
    r.collector.calls.clear()
    r.watch.on_paths(PathSet(blobs={A}))
    r.daemon.request_stop("SIGTERM")
    assert r.at(0.0) == 1
    assert r.collector.calls == [(100.0, "sync", Changes(blobs=frozenset({A})))]
    assert r.daemon.applied_epoch == r.daemon.seen_epoch
    assert r.at(0.0) == 1 and len(r.collector.calls) == 1  # nothing left to apply


# --- periodic verifies -------------------------------------------------------------
B = "sha256:" + "b" * 64
C = "sha256:" + "c" * 64


class ScriptedVerifier:
    """A test verifier: answers from a script, each call waiting for `go` first."""

    def __init__(self, *reports: VerifyReport, status: VerifyStatus | None = None) -> None:
        self.reports = list(reports)
        self.calls: list[tuple[bool, int | None]] = []
        self.go = threading.Event()
        self.go.set()
        self.status = status or VerifyStatus(None, None, None)

    def verify(
        self,
        *,
        deep: bool = False,
        repair: bool = False,
        max_blobs: int | None = None,
        max_duration: timedelta | None = None,
        recount: bool = True,
    ) -> VerifyReport:
        assert recount is not deep  # the daemon's deep runs only hash
        self.calls.append((deep, max_blobs))
        while not self.go.wait(0.01):
            interrupts.checkpoint()  # as the real scan and hashing do between blobs
        return self.reports.pop(0)

    def verify_status(self) -> VerifyStatus:
        return self.status


def shallow(**found: object) -> VerifyReport:
    return VerifyReport(deep=False, repaired=False, roots=2, live=5, **found)  # type: ignore[arg-type]


def deep_slice(after: str | None, through: str, **found: object) -> VerifyReport:
    lap = Lap(None, through, 3, 6)
    return VerifyReport(
        deep=True,
        repaired=False,
        roots=2,
        live=5,
        sliced=True,
        after=after,
        lap=lap,
        checked=3,
        recounted=False,
        **found,  # type: ignore[arg-type]
    )


def verify_rig(verifier: ScriptedVerifier, **timing: float) -> tuple[Rig, PeriodicVerify]:
    r = rig(**timing)
    periodic = PeriodicVerify(verifier, r.daemon.metrics, DeepSlice(max_blobs=3))
    r.daemon.verify = periodic
    periodic.start()
    return r, periodic


def test_a_periodic_verify_runs_beside_the_worker_which_goes_on_with_batches(
    logs: Callable[[], list[str]],
) -> None:
    verifier = ScriptedVerifier(shallow(missing=(A,), needed_by=(NeededBy(A, ("web",)),)))
    verifier.go.clear()  # the verify takes its time
    r, periodic = verify_rig(verifier, verify_every=60.0)
    try:
        r.at(60.0)
        r.daemon.notice(PathSet(index=True))
        r.collector.calls.clear()
        r.at(1.0)  # the batch is applied while the verify still runs
        assert r.collector.kinds() == ["sync", "stats"]
        assert "reason" not in r.daemon.health().detail
        registry = r.daemon.metrics.registry
        assert registry.get_sample_value("refcount_verify_ok", {"kind": "shallow"}) is None
        verifier.go.set()
        assert periodic.wait_done(1)
    finally:
        periodic.stop()
    assert verifier.calls == [(False, None)]  # shallow: no slice limit
    # (No worker thread runs here, so the daemon reads "down"; tests/test_watch.py
    # shows a running one "degraded".)
    assert r.daemon.health().detail["reason"] == f"verify found 1 missing: {A}"
    assert r.value("refcount_verify_ok", kind="shallow") == 0
    assert r.value("refcount_verify_problems", problem="missing") == 1
    assert f"verify: missing {A}: referenced but not in blobs/; needed by web" in logs()


def test_a_problem_is_logged_once_while_it_lasts_and_health_recovers_when_it_is_gone(
    logs: Callable[[], list[str]],
) -> None:
    verifier = ScriptedVerifier(shallow(missing=(A,)), shallow(missing=(A,)), shallow())
    r, periodic = verify_rig(verifier, verify_every=10.0)
    try:
        for n in range(1, 4):
            r.at(10.0)
            assert periodic.wait_done(n)
    finally:
        periodic.stop()
    assert sum(1 for line in logs() if line.startswith(f"verify: missing {A}")) == 1
    assert "reason" not in r.daemon.health().detail
    assert r.value("refcount_verify_ok", kind="shallow") == 1
    assert r.value("refcount_verify_problems", problem="missing") == 0


def test_a_corrupt_blob_stays_known_until_a_slice_hashes_it_again() -> None:
    # Digests A < B < C; the lap hashes (-, B] then (B, C] then (-, B] again.
    verifier = ScriptedVerifier(
        deep_slice(None, B, corrupt=(Corrupt(A, "content hashes to 00"),)),
        deep_slice(B, C),
        deep_slice(None, B),
    )
    r, periodic = verify_rig(verifier, deep_every=5.0)
    seen = []
    try:
        for n in range(1, 4):
            r.at(5.0)
            assert periodic.wait_done(n)
            seen.append(r.value("refcount_verify_problems", problem="corrupt"))
    finally:
        periodic.stop()
    assert seen == [1, 1, 0]
    assert verifier.calls == [(True, 3)] * 3  # each deep run one slice of at most 3 blobs
    assert r.value("refcount_verify_deep_lap_progress_ratio") == 0.5
    assert r.value("refcount_verify_blobs_hashed_total") == 9


def test_a_deep_run_that_only_hashes_keeps_what_the_shallow_one_found() -> None:
    verifier = ScriptedVerifier(shallow(missing=(A,)), deep_slice(None, B))
    r, periodic = verify_rig(verifier, verify_every=10.0, deep_every=15.0)
    try:
        r.at(10.0)
        assert periodic.wait_done(1)
        r.at(5.0)
        assert periodic.wait_done(2)
    finally:
        periodic.stop()
    assert verifier.calls == [(False, None), (True, 3)]
    assert r.value("refcount_verify_problems", problem="missing") == 1
    assert r.value("refcount_verify_ok", kind="deep") == 1
    assert r.daemon.health().detail["reason"] == f"verify found 1 missing: {A}"


def test_the_gauges_start_from_the_recorded_verifies() -> None:
    at = datetime(2026, 12, 1, 6, 0, tzinfo=UTC)
    run = VerifyRun(1, at, 0.5, False, False, 0, False, 0, 2, 0, 0, 0)
    verifier = ScriptedVerifier(status=VerifyStatus(run, None, None))
    r, periodic = verify_rig(verifier)
    try:
        assert wait_for(
            lambda: (
                r.value("refcount_verify_ok", kind="shallow") == 0
                and r.value("refcount_verify_last_timestamp_seconds", kind="shallow")
                == at.timestamp()
            )
        )
    finally:
        periodic.stop()
    assert r.value("refcount_verify_problems", problem="missing") == 2
    assert r.value("refcount_verify_last_success_timestamp_seconds", kind="shallow") == 0


def test_stopping_interrupts_a_verify_in_hand_and_a_second_request_waits_for_it() -> None:
    verifier = ScriptedVerifier(shallow())
    verifier.go.clear()  # never finishes by itself
    r, periodic = verify_rig(verifier, verify_every=1.0)
    r.at(1.0)
    assert wait_for(lambda: verifier.calls == [(False, None)])
    r.at(1.0)  # due again while the first still runs: not queued twice
    periodic.request(deep=False)
    periodic.stop(timeout=5.0)
    assert not periodic._thread.is_alive()
    assert verifier.calls == [(False, None)]


def wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition another thread makes true (the verifier's)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_batchs_counters_and_the_gauges_after_it_reach_the_metrics_in_one_update() -> None:
    r = rig()
    released = ("refcount_freed_blobs_total", {"reason": "released"})
    seen: list[float | None] = []
    # While the daemon reads the store's figures for the gauges, a scrape must not
    # show the batch's frees already counted beside the gauges from before it.
    r.collector.during_stats = lambda: seen.append(
        r.daemon.metrics.registry.get_sample_value(*released)
    )
    r.collector.syncs = [FREED]
    r.watch.on_paths(PathSet(index=True))
    assert r.at(0.25) == 1
    assert seen == [0.0]
    assert r.value("refcount_freed_blobs_total", reason="released") == 1
    assert r.value("refcount_roots") == STATS.roots
