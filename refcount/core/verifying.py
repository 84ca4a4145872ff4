"""Periodic verification: the deep lap, and the record of every verify.

A deep lap hashes every blob present once, a slice at a time, in digest order:
the cursor (`meta` rows `deep_cursor` and `deep_lap_started`) is the last digest
hashed, so a slice is the next N digests after it (`slice_of`), and a blob
written behind the cursor waits for the next lap. The lap ends when a slice
reaches the last digest present: the cursor is cleared and the next slice
starts a new lap from the first digest.

Every verify, shallow or deep, is recorded (`record`): when, how long, the
blobs hashed (a slice's range), how many problems of each kind and the
findings with their digests and the tags that need them. `status` reads the
latest of each kind back for `verify --last`, nothing run.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from refcount.core.reconcile import tags_needing
from refcount.db.repo import DEEP_CURSOR, DEEP_LAP_STARTED, Repo
from refcount.errors import InvalidOption
from refcount.reports import Finding, Lap, NeededBy, VerifyReport, VerifyRun, VerifyStatus
from refcount.units import human_size


def check_options(
    *,
    deep: bool,
    repair: bool,
    max_blobs: int | None,
    max_duration: timedelta | None,
    recount: bool,
) -> None:
    """Refuse a verify that cannot be run as asked (InvalidOption, exit 2)."""
    if not recount and (not deep or repair):
        raise InvalidOption("a verify without its recount must be --deep, without --repair")
    if (max_blobs is not None or max_duration is not None) and not deep:
        raise InvalidOption("--slice and --max-duration need --deep")
    if max_blobs is not None and max_blobs < 1:
        raise InvalidOption(f"--slice {max_blobs}: must be 1 or more blobs")
    if max_duration is not None and max_duration <= timedelta(0):
        raise InvalidOption(
            f"--max-duration {max_duration.total_seconds():g}s: must be longer than 0"
        )


def lap_position(repo: Repo, present: Sequence[str], at: datetime) -> tuple[str | None, datetime]:
    """Where the lap stands for a slice starting at `at`: the cursor (None: from the
    first digest) and when the lap started. A cursor past every digest present
    (the blobs after it were freed) ends the lap: a new one starts at `at`."""
    cursor = repo.get_meta(DEEP_CURSOR) or None
    started = repo.get_meta(DEEP_LAP_STARTED) or None
    if cursor is None or bisect_right(present, cursor) >= len(present):
        return None, at if cursor is not None or started is None else datetime.fromisoformat(
            started
        )
    return cursor, at if started is None else datetime.fromisoformat(started)


def slice_of(present: Sequence[str], cursor: str | None, limit: int | None) -> list[str]:
    """The digests after `cursor` (all from the first when None), at most `limit`."""
    rest = present[bisect_right(present, cursor) if cursor is not None else 0 :]
    return list(rest if limit is None else rest[:limit])


@dataclass(frozen=True)
class Slice:
    """What a deep run hashes: `todo`, of the digests `present` (sorted), from after
    `cursor` (None: the first); `started`: when its lap started."""

    present: list[str]
    cursor: str | None
    started: datetime
    todo: list[str]


def plan_slice(repo: Repo | None, files: Iterable[str], limit: int | None, at: datetime) -> Slice:
    """The slice of the lap a run starting at `at` hashes; with no `repo` (not
    sliced), every digest of `files` and the lap left alone."""
    present = sorted(files)
    cursor, started = (None, at) if repo is None else lap_position(repo, present, at)
    return Slice(present, cursor, started, slice_of(present, cursor, limit))


def lap_after(
    present: Sequence[str], cursor: str | None, last: str | None, started: datetime
) -> Lap:
    """The lap once a slice from `cursor` hashed through `last` (None: nothing)."""
    through = last if last is not None else cursor
    done = bisect_right(present, through) if through is not None else 0
    return Lap(started, through, done, len(present))


def save_lap(repo: Repo, lap: Lap) -> None:
    """Keep the cursor for the next slice; a finished lap clears it."""
    finished = lap.done >= lap.total
    repo.set_meta(DEEP_CURSOR, "" if finished or lap.cursor is None else lap.cursor)
    repo.set_meta(
        DEEP_LAP_STARTED, "" if finished or lap.started is None else lap.started.isoformat()
    )


def needed_by(repo: Repo, digests: Sequence[str]) -> tuple[NeededBy, ...]:
    """The tags that need each of `digests` (missing or corrupt blobs)."""
    return tuple(NeededBy(d, tuple(sorted(tags_needing(repo, d)))) for d in sorted(set(digests)))


def findings(report: VerifyReport) -> tuple[Finding, ...]:
    """What `report` found, one finding per blob (or per unnamed problem)."""
    tags = {n.digest: n.tags for n in report.needed_by}
    found = [
        Finding(
            "drift",
            d.digest,
            f"expected {d.expected}, recorded {d.recorded}"
            if d.expected_state is None
            else f"state is {d.expected_state}, recorded {d.recorded_state}",
        )
        for d in report.drift
    ]
    found += [
        Finding("missing", d, "referenced but not in blobs/", tags.get(d, ()))
        for d in report.missing
    ]
    found += [
        Finding("corrupt", c.digest, c.reason, tags.get(c.digest, ())) for c in report.corrupt
    ]
    found += [
        Finding("orphan", a.digest, f"{human_size(a.size)}, {a.age_seconds:.0f}s old")
        for a in report.orphans
    ]
    found += [Finding("problem", None, p) for p in report.problems]
    return tuple(found)


def record(repo: Repo, report: VerifyReport, at: datetime, seconds: float) -> int:
    """Record `report` (started `at`, took `seconds`); its id."""
    checked = report.lap
    run = VerifyRun(
        id=0,
        at=at,
        seconds=seconds,
        deep=report.deep,
        sliced=report.sliced,
        checked=report.checked,
        ok=report.ok,
        drift=0 if report.repaired else len(report.drift),
        missing=len(report.missing),
        corrupt=len(report.corrupt),
        orphans=len(report.orphans),
        problems=len(report.problems),
        after=report.after,
        through=checked.cursor if checked is not None and report.checked else None,
        findings=findings(report),
    )
    return repo.add_verify_run(run, report.lap)


def status(repo: Repo) -> VerifyStatus:
    """The latest shallow and deep verify, with their findings, and the lap."""

    def latest(deep: bool) -> VerifyRun | None:
        runs = repo.verify_runs(deep=deep, last=1)
        if not runs:
            return None
        run = runs[0]
        return VerifyRun(**{**run.__dict__, "findings": repo.verify_findings(run.id)})

    return VerifyStatus(latest(False), latest(True), repo.recorded_lap())
