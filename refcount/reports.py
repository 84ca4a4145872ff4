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
class LeaseInfo:
    """A lease (SPEC §7): blobs a writer relies on until its root is in index.json."""

    lease: str
    holder: str  # who took it: "push oci-archive:x.tar:app (pid 123)", a tool's name
    created: datetime
    expires: datetime
    blobs: int = 1  # how many blobs it holds (1 when listed per blob, as `show` does)


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
class DeleteBatch:
    """A daemon's group commit: `requests` deletes served together, of which
    `written` removed entries, in one rewrite of index.json (none when 0)."""

    requests: int
    written: int
    seconds: float


@dataclass(frozen=True)
class PushReport:
    """`push`: what was added to index.json, copied, reused, and what a moved tag freed."""

    source: str
    tag: str | None  # None: the root was added untagged (a digest pushed without --tag)
    digest: str
    added: tuple[Entry, ...]  # the new entries: the root, then the referrers brought along
    copied: tuple[BlobRef, ...]  # blobs written into blobs/
    reused: int  # blobs the store already had (in blobs/, or restored from the quarantine)
    restored: tuple[str, ...]  # of those, the ones brought back from the quarantine
    replaced: tuple[Entry, ...] = ()  # entries that carried the tag before (it moved)
    freed: tuple[BlobRef, ...] = ()  # what the moved tag's old image freed

    @property
    def copied_bytes(self) -> int:
        return sum(b.size or 0 for b in self.copied)


@dataclass(frozen=True)
class TouchReport:
    """`touch`: the tags whose last use was recorded, and when."""

    ref: str
    tags: tuple[str, ...]
    used_at: datetime


@dataclass(frozen=True)
class Pruned:
    """One entry a prune chose: a tag, or (tag None) an untagged entry."""

    tag: str | None
    digest: str
    created: datetime  # when its image was made (see `created_from`)
    created_from: str  # "annotation", "config", or "first-seen" (when refcount first saw it)
    reason: str  # the rule: keep-last, older-than, unused-for, max-size, min-free, untagged


@dataclass(frozen=True)
class PruneReport:
    """`prune`: the entries chosen, and what deleting them removes and frees."""

    dry_run: bool
    chosen: tuple[Pruned, ...]
    removed: tuple[Entry, ...]  # every index.json entry removed (also untagged children)
    freed: tuple[BlobRef, ...]
    live_before: int  # live bytes before the prune
    budget_met: bool | None = None  # None: no --max-size/--min-free; False: not reachable
    policy_file: str | None = None  # the policy.toml applied, when no flags were given

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
class NeededBy:
    """A missing or corrupt blob, and the tags whose image holds it."""

    digest: str
    tags: tuple[str, ...]


@dataclass(frozen=True)
class Lap:
    """How far the deep lap has come: every blob present is hashed once per lap,
    in digest order, a slice at a time (`verify --deep --slice/--max-duration`)."""

    started: datetime | None
    """When the lap's first slice ran; None before any."""
    cursor: str | None
    """The last digest hashed this lap; None at the start of a lap."""
    done: int
    """Blobs present now whose digest is at or before the cursor: checked this lap."""
    total: int
    """Blobs present now."""

    @property
    def percent(self) -> float:
        return 100.0 if not self.total else 100.0 * self.done / self.total


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
    expired_leases: tuple[LeaseInfo, ...] = ()
    """Leases past their expiry (a push that crashed): `gc` clears them. Reported, not
    a failure: what they held is counted like any orphan."""
    checked: int = 0
    """Blobs whose content was hashed (deep only)."""
    sliced: bool = False
    """A deep slice: only the blobs after the lap's cursor were hashed (`lap`)."""
    lap: Lap | None = None
    """The lap's progress after this slice (sliced deep only)."""
    needed_by: tuple[NeededBy, ...] = ()
    """The tags that need each missing or corrupt blob a tag's image holds."""
    after: str | None = None
    """A slice hashed the blobs after this digest (None: from the first)."""
    recounted: bool = True
    """False for a deep run without its recount: only `corrupt` (and `lap`) say anything."""
    run: int | None = None
    """The id of this verify's record (None when the database is read-only)."""

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
class Finding:
    """One thing a recorded verify found."""

    kind: str
    """drift, missing, corrupt, orphan or problem."""
    digest: str | None
    detail: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class VerifyRun:
    """A verify as recorded: when, which kind, what it hashed and found."""

    id: int
    at: datetime
    seconds: float
    deep: bool
    sliced: bool
    checked: int
    ok: bool
    drift: int
    missing: int
    corrupt: int
    orphans: int
    problems: int
    after: str | None = None
    """A slice hashed the blobs after this digest (None: from the first)..."""
    through: str | None = None
    """...up to and including this one (None: nothing hashed)."""
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class VerifyStatus:
    """`verify --last`: the latest shallow and deep verify and the lap, nothing run."""

    shallow: VerifyRun | None
    deep: VerifyRun | None
    lap: Lap | None

    @property
    def ok(self) -> bool:
        """The latest verify of each kind found nothing (or none ran yet)."""
        return all(run is None or run.ok for run in (self.shallow, self.deep))

    @property
    def exit_code(self) -> ExitCode:
        return ExitCode.OK if self.ok else ExitCode.PROBLEM


@dataclass(frozen=True)
class GcReport:
    dry_run: bool
    swept: tuple[Aged, ...] = ()
    purged: tuple[Aged, ...] = ()
    leases_cleared: tuple[LeaseInfo, ...] = ()  # expired leases (of crashed writers)

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
    last_used: datetime | None = None  # `refcount touch` or a push; None: never recorded


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
    last_used: datetime | None = None  # `refcount touch` or a push; None: never recorded
    problems: tuple[Damage, ...] = ()  # missing or damaged blobs of its image


@dataclass(frozen=True)
class DuReport:
    """`du`: each tag's bytes, largest exclusive first, and the store's totals."""

    tags: tuple[TagUsage, ...]
    live: int  # bytes of the live blobs
    shared: int | None  # bytes of the referenced blobs that two or more tags' images hold
    untagged: int | None  # referenced bytes neither exclusive to a tag nor shared by two
    # (shared and untagged need every image: None, not computed, for `du REF...`)
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
    leases: tuple[LeaseInfo, ...] = ()  # who relies on it until their root lands


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


@dataclass(frozen=True)
class ExtractorInfo:
    """One entry point of the `refcount.extractors` group, as `plugins` lists it."""

    name: str  # the entry point's name
    distribution: str | None  # the package that registered it
    version: str | None
    media_types: tuple[str, ...] = ()  # the types it reads
    refused: tuple[str, ...] = ()  # types it asked for and was not given, and why
    error: str | None = None  # why it is not used at all


@dataclass(frozen=True)
class PluginsReport:
    extractors: tuple[ExtractorInfo, ...]

    @property
    def exit_code(self) -> ExitCode:
        """1 when an installed extractor is not used at all (it did not load)."""
        return ExitCode.PROBLEM if any(e.error for e in self.extractors) else ExitCode.OK


@dataclass(frozen=True)
class RepoResult:
    """One repository's part of a command run across a root (`refcount --root`):
    its report, or the error that stopped it there."""

    repo: str
    report: Any
    error: str | None = None
    error_code: ExitCode = ExitCode.OK

    @property
    def exit_code(self) -> ExitCode:
        if self.error is not None:
            return self.error_code
        return ExitCode(getattr(self.report, "exit_code", ExitCode.OK))


@dataclass(frozen=True)
class RootReport:
    """A command run on each repository under a root, in name order."""

    root: str
    results: tuple[RepoResult, ...]

    @property
    def exit_code(self) -> ExitCode:
        """The worst of the repositories' (0 < 1 < 2 < 3 < 4 < 130)."""
        return max((r.exit_code for r in self.results), default=ExitCode.OK)


def to_json(value: Any) -> Any:
    """A report as plain JSON data, including its derived properties."""
    if isinstance(value, list | tuple):
        return [to_json(v) for v in value]
    if isinstance(value, RootReport):
        return {
            "root": value.root,
            "exit_code": int(value.exit_code),
            "repositories": [
                {
                    "repo": r.repo,
                    "exit_code": int(r.exit_code),
                    "error": r.error,
                    "report": None if r.report is None else to_json(r.report),
                }
                for r in value.results
            ],
        }
    data = asdict(value)
    for name in ("ok", "freed_bytes", "copied_bytes"):
        if hasattr(type(value), name):
            data[name] = getattr(value, name)
    return data
