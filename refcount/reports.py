"""The frozen values the library returns; the CLI renders them as text or JSON."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from refcount.errors import ExitCode


@dataclass(frozen=True)
class BlobRef:
    digest: str
    size: int | None
    media_type: str | None


@dataclass(frozen=True)
class Entry:
    """An index.json entry removed (or to be removed) by a command."""

    position: int
    digest: str
    tag: str | None


@dataclass(frozen=True)
class MassFree:
    """One outside change of index.json that would have freed much of the store at once:
    its frees went to the quarantine, kept there at least until `held_until`."""

    at: datetime
    held_until: datetime
    roots_before: int
    roots_removed: int
    blobs: int
    bytes: int
    live_bytes: int


@dataclass(frozen=True)
class SyncReport:
    roots_added: int = 0
    roots_removed: int = 0
    became_live: int = 0
    freed: tuple[BlobRef, ...] = ()
    restored: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    found: tuple[str, ...] = ()  # missing blobs whose file came back
    orphans: tuple[str, ...] = ()  # new files nothing references yet
    problems: tuple[str, ...] = ()
    mass_free: MassFree | None = None  # this sync's frees were held in the quarantine

    @property
    def freed_bytes(self) -> int:
        return sum(b.size or 0 for b in self.freed)

    @property
    def exit_code(self) -> ExitCode:
        """1 when referenced blobs were found missing (the command ran and found a
        problem, SPEC §4); the counts are recorded either way."""
        return ExitCode.PROBLEM if self.missing else ExitCode.OK

    @property
    def changed(self) -> bool:
        return any(
            (
                self.roots_added,
                self.roots_removed,
                self.became_live,
                self.freed,
                self.restored,
                self.missing,
                self.found,
                self.orphans,
            )
        )


@dataclass(frozen=True)
class DeleteReport:
    target: str
    dry_run: bool
    removed: tuple[Entry, ...]
    freed: tuple[BlobRef, ...]

    @property
    def freed_bytes(self) -> int:
        return sum(b.size or 0 for b in self.freed)


@dataclass(frozen=True)
class Drift:
    """A blob whose recorded count (or, counts agreeing, recorded state) is wrong."""

    digest: str
    expected: int
    recorded: int
    recorded_state: str | None = None
    expected_state: str | None = None


@dataclass(frozen=True)
class Aged:
    digest: str
    size: int
    age_seconds: float


@dataclass(frozen=True)
class Corrupt:
    digest: str
    reason: str


@dataclass(frozen=True)
class VerifyReport:
    deep: bool
    repaired: bool
    roots: int
    live: int
    drift: tuple[Drift, ...] = ()
    missing: tuple[str, ...] = ()
    orphans: tuple[Aged, ...] = ()
    quarantined: tuple[Aged, ...] = ()
    corrupt: tuple[Corrupt, ...] = ()
    problems: tuple[str, ...] = ()
    behind: int = 0
    """index.json entries changed since the database last applied it (only when the
    store is read-only, so the database could not catch up first; counts unchecked)."""
    mass_frees: tuple[MassFree, ...] = ()
    """Mass frees whose blobs are still held in the quarantine."""

    @property
    def ok(self) -> bool:
        """Everything agrees (drift counts as fixed once repaired). Orphans,
        quarantined blobs and mass frees held in the quarantine are consistent
        states: they are reported (a mass free loudly), not failures."""
        drift = self.drift and not self.repaired
        return not (drift or self.missing or self.corrupt or self.problems or self.behind)

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.PROBLEM


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    swept: tuple[Aged, ...] = ()
    purged: tuple[Aged, ...] = ()

    @property
    def freed_bytes(self) -> int:
        return sum(a.size for a in (*self.swept, *self.purged))


@dataclass(frozen=True)
class TagInfo:
    """An index.json entry as `tags` lists it (untagged ones only when asked)."""

    tag: str | None  # None: an untagged entry
    digest: str
    media_type: str | None
    size: int | None  # bytes of the whole image: the root and every blob below it
    untagged: bool = False
    subject: str | None = None  # a referrer: the manifest it refers to
    subject_tags: tuple[str, ...] = ()  # the tags whose image holds that subject
    included_in: tuple[str, ...] = ()  # the tags whose image lists this manifest (an index)


@dataclass(frozen=True)
class Damage:
    """A blob of an image that `du` counts but cannot vouch for."""

    digest: str
    kind: str  # `missing`: referenced, not in blobs/; `damaged`: a manifest that cannot be read
    reason: str  # one line saying what follows for the figures and for `delete tag`


@dataclass(frozen=True)
class TagUsage:
    """One tag's bytes as `du` counts them (see `refcount.core.reading.du`)."""

    tag: str
    digest: str  # of its first index.json entry
    total: int  # bytes of the whole image (of all its entries): the roots and all below
    exclusive: int  # bytes `delete tag` would free: the same set its --dry-run prints
    shared: int  # bytes of the image that deleting the tag would not free
    shares_with: int  # how many other tags' images hold a blob of this one
    problems: tuple[Damage, ...] = ()  # missing or damaged blobs of its image


@dataclass(frozen=True)
class DuReport:
    """`du`: each tag's bytes, largest exclusive first, and the store's totals."""

    tags: tuple[TagUsage, ...]
    live: int  # bytes of the live blobs
    shared: int  # bytes of the referenced blobs that two or more tags' images hold
    untagged: int  # referenced bytes neither exclusive to a tag nor shared by two
    quarantined: int  # bytes in .refcount/trash/
    orphaned: int  # bytes of blobs nothing has referenced
    reclaimable: int  # what gc would free now: orphans past the grace, trash past its TTL

    @property
    def exit_code(self) -> ExitCode:
        """1 when a listed tag's image has a missing or damaged blob (SPEC §4: the
        command ran and found a problem); the figures are reported either way."""
        return ExitCode.PROBLEM if any(u.problems for u in self.tags) else ExitCode.OK


@dataclass(frozen=True)
class Link:
    digest: str
    kind: str


@dataclass(frozen=True)
class BlobInfo:
    digest: str
    count: int
    state: str
    size: int | None
    media_type: str | None
    tags: tuple[str, ...]  # index.json entries pointing at it, by tag ("" = untagged)
    parents: tuple[Link, ...]  # why it is alive
    children: tuple[Link, ...]
    subject: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Stats:
    roots: int
    live_blobs: int
    live_bytes: int
    missing_blobs: int
    orphan_blobs: int
    quarantined_blobs: int
    quarantined_bytes: int
    problems: int = 0
    mass_free_held_blobs: int = 0


def to_json(value: Any) -> Any:
    """A report as plain JSON data, including its derived properties."""
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    data = asdict(value)
    for name in ("ok", "freed_bytes"):
        if hasattr(type(value), name):
            data[name] = getattr(value, name)
    return data
