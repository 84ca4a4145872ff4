"""The watch daemon's periodic verify: one thread beside the worker.

How it fits: the scheduler says when (`JobKind.VERIFY` every `verify_every`,
`JobKind.DEEP` every `deep_every`); the daemon's worker hands the job to
`PeriodicVerify.request`, which returns at once, so a verify never holds up the
batches for longer than one of them: the verifier thread runs it on a
`Refcounter` of its own (a `Verifier`). A shallow verify takes the store's lock
for its recount, as a full reconcile does; a deep one only hashes (no recount,
no lock: `recount=False`), at most `DeepSlice.max_blobs` blobs or for
`DeepSlice.max_duration`, from the lap's cursor in the database.

What a found problem does: it is logged once, when first found, with its digest
and the tags that need it; it is counted in the metrics, and the verify itself
recorded it in the database. Nothing is repaired or deleted (`verify --repair`
stays a command). What is known wrong is kept here: the shallow problems (drift,
missing blobs, unreadable manifests) as the last shallow verify found them; a
corrupt blob until a later slice hashes it again and finds it right, or
it left the store. /healthz says "degraded", with the reason, while anything is
known wrong.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Protocol

from refcount import interrupts
from refcount.errors import InvalidStore
from refcount.metrics import Metrics
from refcount.reports import Drift, VerifyReport, VerifyRun, VerifyStatus
from refcount.units import plural

log = logging.getLogger("refcount.watch")

SHALLOW_PROBLEMS = ("drift", "missing", "problem")
"""What every verify looks at; a deep verify also finds `corrupt` blobs."""


class Verifier(Protocol):
    """What the daemon verifies with; `Refcounter` is one. Called from the
    verifier thread only, one call at a time."""

    def verify(
        self,
        *,
        deep: bool = False,
        repair: bool = False,
        max_blobs: int | None = None,
        max_duration: timedelta | None = None,
        recount: bool = True,
    ) -> VerifyReport: ...

    def verify_status(self) -> VerifyStatus: ...


@dataclass(frozen=True)
class DeepSlice:
    """How much one deep run hashes: at most `max_blobs` blobs and/or for at most
    `max_duration`; both None hashes every blob each run."""

    max_blobs: int | None = None
    max_duration: timedelta | None = None

    def describe(self) -> str:
        parts = [] if self.max_blobs is None else [plural(self.max_blobs, "blob")]
        if self.max_duration is not None:
            parts.append(f"{self.max_duration.total_seconds():g} s")
        return " or ".join(parts) or "every blob"


def kind_of(deep: bool) -> str:
    return "deep" if deep else "shallow"


class PeriodicVerify:
    """Run the verifies the scheduler asks for, one at a time, on a thread of its own."""

    def __init__(self, verifier: Verifier, metrics: Metrics, deep_slice: DeepSlice) -> None:
        self.verifier = verifier
        self.metrics = metrics
        self.deep_slice = deep_slice
        self._cond = threading.Condition()
        self._queue: list[bool] = []  # deep or not, in the order asked
        self._running: bool | None = None
        self._done = 0
        self._known: dict[tuple[str, str], str] = {}  # (kind, digest or text) -> detail
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="refcount-verify", daemon=True)

    # --- the daemon's side ----------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def request(self, deep: bool) -> None:
        """Ask for a verify; one of a kind already waiting or running absorbs it."""
        with self._cond:
            if deep in self._queue or self._running is deep:
                log.debug(
                    "verify: a %s verify is still running; not starting another", kind_of(deep)
                )
                return
            self._queue.append(deep)
            self._cond.notify_all()

    def stop(self, timeout: float = 30.0) -> None:
        """Stop: a verify in hand is interrupted at its next checkpoint."""
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def wait_done(self, count: int, timeout: float = 10.0) -> bool:
        """Wait until `count` verifies have finished (tests)."""
        with self._cond:
            return self._cond.wait_for(lambda: self._done >= count, timeout)

    def degraded(self) -> str | None:
        """Why the store is not right, as far as the verifies know; None when it is."""
        with self._cond:
            known = sorted(self._known)
        if not known:
            return None
        kinds: dict[str, int] = {}
        for kind, _ in known:
            kinds[kind] = kinds.get(kind, 0) + 1
        named = ", ".join(key for _, key in known[:3]) + (", ..." if len(known) > 3 else "")
        counts = ", ".join(f"{n} {kind}" for kind, n in sorted(kinds.items()))
        return f"verify found {counts}: {named}"

    # --- the thread -------------------------------------------------------------
    def _run(self) -> None:
        self._seed()
        while True:
            with self._cond:
                self._cond.wait_for(lambda: bool(self._queue) or self._stop.is_set())
                if self._stop.is_set():
                    return
                deep = self._running = self._queue.pop(0)
            try:
                self._verify_once(deep)
            finally:
                with self._cond:
                    self._running = None
                    self._done += 1
                    self._cond.notify_all()

    def _seed(self) -> None:
        """The gauges start from what was recorded before this daemon started."""
        try:
            status = self.verifier.verify_status()
        except Exception:
            log.exception("verify: could not read the recorded verifies")
            return
        for run in (status.shallow, status.deep):
            if run is not None:
                self._record_run(run)

    def _record_run(self, run: VerifyRun) -> None:
        self.metrics.record_verify(
            kind_of(run.deep),
            at=run.at.timestamp(),
            ok=run.ok,
            problems={
                "drift": run.drift,
                "missing": run.missing,
                "corrupt": run.corrupt,
                "problem": run.problems,
                "orphan": run.orphans,
            },
        )

    def _verify_once(self, deep: bool) -> None:
        started = time.monotonic()
        cut = self.deep_slice if deep else DeepSlice()
        try:
            with interrupts.cancelled_by(self._stop):
                # A deep run only hashes: the shallow ones recount, under the
                # store's lock, which a deep one then never takes.
                report = self.verifier.verify(
                    deep=deep,
                    max_blobs=cut.max_blobs,
                    max_duration=cut.max_duration,
                    recount=not deep,
                )
        except interrupts.Interrupted:
            log.debug("verify: interrupted by the daemon's stop")
            return
        except InvalidStore as exc:
            log.warning("verify (%s) skipped: %s", kind_of(deep), exc)
            return
        except Exception:
            log.exception("verify (%s) failed; it runs again at its next period", kind_of(deep))
            self.metrics.record_failure("error")
            return
        self._apply(report, time.monotonic() - started)

    def _apply(self, report: VerifyReport, seconds: float) -> None:
        """Update what is known wrong, log what is new, feed the gauges."""
        tags = {n.digest: n.tags for n in report.needed_by}
        found = {("drift", d.digest): _drift(d) for d in report.drift}
        if report.repaired:
            found.clear()
        found |= {("missing", d): "referenced but not in blobs/" for d in report.missing}
        found |= {("problem", p): p for p in report.problems}
        corrupt = {("corrupt", c.digest): c.reason for c in report.corrupt}
        with self._cond:
            before = dict(self._known)
            kept = {
                k: v
                for k, v in before.items()
                if (k[0] == "corrupt" and not _covered(report, k[1]) and k not in corrupt)
                or (k[0] != "corrupt" and not report.recounted)
            }
            self._known = found | kept | corrupt
            known = dict(self._known)
        for (kind, key), detail in sorted(known.items()):
            if (kind, key) in before:
                continue
            if kind == "problem":
                log.warning("verify: %s", detail)
                continue
            needed = tags.get(key)
            log.warning(
                "verify: %s %s: %s%s",
                kind,
                key,
                detail,
                "" if needed is None else f"; needed by {', '.join(needed) or 'untagged roots'}",
            )
        lap = report.lap
        counts = {
            kind: sum(1 for k in known if k[0] == kind) for kind in (*SHALLOW_PROBLEMS, "corrupt")
        }
        self.metrics.record_verify(
            kind_of(report.deep),
            at=time.time(),
            ok=report.ok,
            problems={**counts, "orphan": len(report.orphans)},
            lap=None if lap is None else lap.percent / 100,
            hashed=report.checked,
        )
        what = "deep slice" if report.sliced else kind_of(report.deep)
        hashed = f", {plural(report.checked, 'blob')} hashed" if report.deep else ""
        progress = "" if lap is None else f", lap {lap.percent:.0f}% of {plural(lap.total, 'blob')}"
        summary = ", ".join(f"{n} {kind}" for kind, n in counts.items() if n)
        log.log(
            logging.INFO if report.ok else logging.WARNING,
            "verify (%s): %s%s%s; %.1f ms",
            what,
            "OK" if report.ok else f"FAILED ({summary or 'see the lines above'})",
            hashed,
            progress,
            seconds * 1000,
        )


def _drift(d: Drift) -> str:
    if d.expected_state is None:
        return f"count expected {d.expected}, recorded {d.recorded}"
    return f"state is {d.expected_state}, recorded {d.recorded_state}"


def _covered(report: VerifyReport, digest: str) -> bool:
    """Whether `report` hashed `digest` (or would have, had it been present)."""
    if not report.deep:
        return False
    if report.lap is None:
        return True  # a whole deep verify
    through = report.lap.cursor
    return (
        through is not None
        and (report.after is None or digest > report.after)
        and (digest <= through)
    )
