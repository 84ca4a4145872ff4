"""The use cases: one class, `Refcounter`, one transaction per operation.

Order of effects in every writing operation (containerd's GarbageCollect order):

1. take the store's advisory lock, then finish the journal a dead process left;
2. read index.json (the truth about roots) and catch the database up with it;
3. in one database transaction: change counts, record edges, and write a journal
   row for every file action decided (quarantine, unlink, restore, purge);
4. for a delete: replace index.json atomically, refusing if it changed since step 2;
5. commit, then carry out the journal (`_settle`) and clear it.

A crash before 5 leaves index.json as the truth and the database as it was, so
the next start's catch-up heals it; a crash during 5 leaves journal rows whose
actions are idempotent and re-checked against the committed state, so the next
start finishes them. No file is removed before the commit that decided it.

SIGINT and SIGTERM do not wait for the next start: steps 3 to 5 run in a
`refcount.interrupts.deferred` section, so an interrupted operation is rolled
back whole or finished before the interruption is raised (SPEC §7).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

from refcount import graph, interrupts
from refcount.db.engine import (
    current_revision,
    default_url,
    ensure_schema,
    make_engine,
    transaction,
)
from refcount.db.repo import Repo, RootRow
from refcount.errors import (
    BlobTooLarge,
    ConcurrentChange,
    InvalidBlob,
    InvalidDigest,
    InvalidStore,
    NotFound,
)
from refcount.oci import (
    Descriptor,
    Digest,
    Removal,
    Root,
    apply_cuts,
    cuts,
    is_manifest_type,
    parse_children,
    parse_index,
    salvage,
    usable_tag,
)
from refcount.reports import (
    Aged,
    BlobInfo,
    BlobRef,
    Corrupt,
    DeleteReport,
    Drift,
    Entry,
    GcReport,
    Link,
    Stats,
    SyncReport,
    TagInfo,
    VerifyReport,
)
from refcount.store import DEFAULT_MAX_MANIFEST, BlobFile, IndexSnapshot, Store, crash_point

log = logging.getLogger(__name__)

INDEX_HASH = "index_hash"
REWRITE_ATTEMPTS = 5
POLL = 0.1
"""Seconds between looks for an interruption while waiting on worker threads."""


@dataclass(frozen=True)
class Policy:
    """How a Refcounter frees. Durations are timedeltas."""

    trash_ttl: timedelta = timedelta(minutes=10)
    """How long a freed blob waits in .refcount/trash/ before gc purges it; 0 unlinks at once."""
    grace: timedelta = timedelta(hours=1)
    """How old an orphan (a blob never reachable) must be before gc sweeps it."""
    keep_referrers: bool = False
    """Keep untagged referrers in index.json when their subject is freed."""
    keep_untagged: bool = False
    """Keep untagged entries that only the deleted tag's image reached."""
    max_manifest: int = DEFAULT_MAX_MANIFEST
    """Manifest-like blobs larger than this many bytes are not parsed (reported)."""


@dataclass(frozen=True)
class _Select:
    """Which index.json entries a delete names."""

    tag: str | None = None
    digest: str | None = None


@dataclass(frozen=True)
class Changes:
    """What the watcher saw change: index.json, and/or some blob files."""

    index: bool = False
    blobs: frozenset[str] = frozenset()


def _now() -> datetime:
    return datetime.now(UTC)


def _mtime(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


@dataclass(frozen=True)
class _Expansion:
    """What a manifest-like blob holds: distinct children (never itself), and why
    it is not fully trusted when it is not."""

    children: tuple[Descriptor, ...]
    media_type: str | None
    subject: str | None = None
    problem: str | None = None
    blind: bool = False  # could not be read at all: what it holds is unknown


_LEAF = _Expansion((), None)


def _expand(store: Store, digest: str, media_type: str | None) -> _Expansion | None:
    """Read a blob's children; `_LEAF` for a blob never read, None when it is absent.

    A manifest that cannot be parsed, or parses with problems, also holds every
    digest its bytes mention (`salvage`): whatever it may need is never freed
    because of damage. One function, so the incremental path and verify's
    from-scratch count always agree.
    """
    if media_type is not None and not is_manifest_type(media_type):
        return _LEAF  # a layer or config: a leaf, never read
    try:
        data = store.read_blob(digest)
    except BlobTooLarge as exc:
        salvaged = salvage(store.read_chunks(digest))
        return _Expansion(_distinct(salvaged, digest), media_type, problem=str(exc))
    except InvalidBlob as exc:
        return _Expansion((), media_type, problem=str(exc), blind=True)
    if data is None:
        return None
    if media_type is None and data.lstrip()[:1] != b"{":
        return _Expansion((), None)
    try:
        parsed = parse_children(media_type, data, digest)
    except InvalidBlob as exc:
        return _Expansion(_distinct(salvage([data]), digest), media_type, problem=str(exc))
    problems = [str(p) for p in parsed.problems]
    if any(child.digest == digest for child in parsed.children):
        problems.append(f"{digest}: refers to itself; edge ignored")
    children = parsed.children + (salvage([data]) if problems else ())
    return _Expansion(
        _distinct(children, digest),
        parsed.media_type or media_type,
        parsed.subject,
        "; ".join(problems) or None,
    )


def _distinct(children: Iterable[Descriptor], parent: str) -> tuple[Descriptor, ...]:
    """One edge per distinct child (a layer listed twice counts once), none to itself."""
    unique: dict[str, Descriptor] = {}
    for child in children:
        if child.digest != parent:
            unique.setdefault(child.digest, child)
    return tuple(unique.values())


# ---------------------------------------------------------------------------
# One transaction's work: the callbacks graph.acquire/release need, on a Repo.
# ---------------------------------------------------------------------------
@dataclass
class _Work:
    repo: Repo
    store: Store
    policy: Policy
    now: datetime = field(default_factory=_now)
    hints: dict[str, Descriptor] = field(default_factory=dict)
    became_live: int = 0
    freed: list[BlobRef] = field(default_factory=list)
    freed_digests: set[str] = field(default_factory=set)
    restored: set[str] = field(default_factory=set)
    missing: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def hint(self, descriptors: Iterable[Descriptor]) -> list[str]:
        """Remember what descriptors say about their blobs; return their digests."""
        digests = []
        for descriptor in descriptors:
            self.hints.setdefault(descriptor.digest, descriptor)
            digests.append(descriptor.digest)
        return digests

    def acquire(self, digests: Iterable[str]) -> None:
        self.became_live += len(graph.acquire(digests, self._bump, self._read_children))

    def release(self, digests: Iterable[str]) -> list[str]:
        freed = graph.release(digests, self._bump, self.repo.take_edges)
        for digest in freed:
            self.free(digest)
        return freed

    def _bump(self, digest: str, delta: int) -> int:
        count = self.repo.add_count(digest, delta)
        if count is None:  # first sight of this blob
            if delta < 0:
                return 1  # never recorded: releasing it frees nothing
            self._create(digest)
            return 1
        if count == 1 and delta > 0:
            self._revive(digest)
        return count

    def _presence(self, digest: str) -> str:
        if self.store.blob_file(digest) is not None:
            return "live"
        if self.store.in_trash(digest):
            self.repo.add_actions("restore", [digest], self.now)
            self.restored.add(digest)
            return "live"
        hint = self.hints.get(digest)
        if hint is not None and hint.urls:
            return "foreign"
        self._note_missing(digest)
        return "missing"

    def _create(self, digest: str) -> None:
        hint = self.hints.get(digest)
        file = self.store.blob_file(digest)
        self.repo.insert_blob(
            digest=digest,
            size=hint.size if hint and hint.size is not None else (file.size if file else None),
            media_type=hint.media_type if hint else None,
            count=1,
            state=self._presence(digest),
            expanded=False,
            first_seen=self.now,
        )

    def _revive(self, digest: str) -> None:
        """A blob with count 0 (an orphan or in the trash) became live again."""
        row = self.repo.blob(digest)
        assert row is not None
        values: dict[str, Any] = {"state": self._presence(digest), "freed_at": None}
        if row.state == "trash" and digest not in self.restored:
            # An outside tool wrote the blob again: the quarantined copy is surplus.
            self.repo.add_actions("purge", [digest], self.now)
        if row.media_type is None and digest in self.hints:
            values["media_type"] = self.hints[digest].media_type
        self.repo.update_blob(digest, **values)

    def _read_children(self, digest: str) -> list[str]:
        """Parse a manifest-like blob that just became live and record its edges."""
        row = self.repo.blob(digest)
        assert row is not None
        found = _expand(self.store, digest, row.media_type)
        if found is None or found is _LEAF:
            return []
        self.repo.add_edges(digest, [(c.digest, c.kind) for c in found.children])
        if found.problem:
            self.problems.append(found.problem)
        self.repo.update_blob(
            digest,
            expanded=not found.blind,
            subject=found.subject,
            media_type=found.media_type,
            problem=found.problem[:1000] if found.problem else None,
        )
        return self.hint(found.children)

    def free(self, digest: str) -> None:
        row = self.repo.blob(digest)
        assert row is not None
        if self.store.blob_file(digest) is None:
            self.repo.delete_blob(digest)  # missing or foreign: nothing on disk to free
        elif self.policy.trash_ttl > timedelta(0):
            self.repo.update_blob(digest, state="trash", freed_at=self.now)
            self.repo.add_actions("quarantine", [digest], self.now)
        else:
            self.repo.delete_blob(digest)
            self.repo.add_actions("unlink", [digest], self.now)
        self.freed.append(BlobRef(digest, row.size, row.media_type))
        self.freed_digests.add(digest)

    def _note_missing(self, digest: str) -> None:
        if digest not in self.missing:
            self.missing.append(digest)

    # --- blob files changed on disk -------------------------------------------
    def file_changed(self, digest: str, state: str | None, file: BlobFile | None) -> None:
        """Bring one blob's row in line with whether its file is in blobs/ now.

        A referenced blob that vanished is recorded as missing; its count and the
        counts of everything it holds are left alone (SPEC §6). A blob freed or
        restored by this same transaction moves only when the journal runs after
        commit, so what the disk shows of it now is stale: skip it.
        """
        if digest in self.freed_digests or digest in self.restored:
            return
        if state == "live" and file is None:
            self.repo.update_blob(digest, state="missing")
            self._note_missing(digest)
        elif state in ("missing", "foreign") and file is not None:
            row = self.repo.blob(digest)
            self.repo.update_blob(digest, state="live")
            if state == "missing":
                self.found.append(digest)
            if row is not None and not row.expanded:
                self.acquire(self._read_children(digest))
        elif state == "orphan" and file is None:
            self.repo.delete_blob(digest)
        elif state == "trash" and file is not None:  # an outside tool wrote it again
            self.repo.update_blob(
                digest, state="orphan", freed_at=None, first_seen=_mtime(file.mtime)
            )
            self.repo.add_actions("purge", [digest], self.now)
            self.orphans.append(digest)
        elif state is None and file is not None:
            self.repo.insert_blob(
                digest=digest,
                size=file.size,
                media_type=None,
                count=0,
                state="orphan",
                expanded=False,
                first_seen=_mtime(file.mtime),
            )
            self.orphans.append(digest)

    def sync_report(self, added: int = 0, removed: int = 0) -> SyncReport:
        return SyncReport(
            roots_added=added,
            roots_removed=removed,
            became_live=self.became_live,
            freed=tuple(self.freed),
            restored=tuple(sorted(self.restored)),
            missing=tuple(self.missing),
            found=tuple(self.found),
            orphans=tuple(self.orphans),
            problems=tuple(self.problems),
        )


# ---------------------------------------------------------------------------
# A from-scratch count of the store: the oracle of verify, and the bulk build.
# ---------------------------------------------------------------------------
@dataclass
class _Scan:
    roots: tuple[Root, ...]
    counts: Counter[str]
    edges: dict[str, dict[str, str]]  # parent -> child -> kind
    hints: dict[str, Descriptor]
    parsed: dict[str, tuple[str | None, str | None, str | None]]  # media type, subject, problem
    files: dict[str, Any]
    problems: list[str]
    blind: set[str]  # manifests that could not be read at all


Progress = Callable[[str, int, int], None]
"""Told (phase, done, total) now and then during long work; the CLI draws a bar."""


def _no_progress(_phase: str, _done: int, _total: int) -> None:
    return None


def _root_row(root: Root) -> RootRow:
    return RootRow(
        root.position, root.digest, root.tag, root.media_type, root.size, root.start, root.end
    )


def _store_roots(repo: Repo, new: list[RootRow]) -> None:
    """Record index.json's entries, rewriting rows only from the first that differs:
    tools mostly append, so a push costs its new entries, not the whole index."""
    old = repo.roots()
    same = 0
    while same < min(len(old), len(new)) and replace(old[same], position=0) == replace(
        new[same], position=0
    ):
        same += 1
    base = old[same - 1].position + 1 if same else 0
    repo.delete_roots(r.position for r in old[same:])
    repo.insert_roots([replace(r, position=base + i) for i, r in enumerate(new[same:])])


def _span_holds(data: bytes, root: RootRow) -> bool:
    """Whether index.json's bytes at the recorded span are the recorded entry."""
    try:
        entry = json.loads(data[root.start : root.end])
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("digest") == root.digest


def _scan(store: Store, snapshot: IndexSnapshot, progress: Progress = _no_progress) -> _Scan:
    index = parse_index(snapshot.data, str(store.index_path))
    files, file_problems = store.list_blobs()
    visited = 0
    hints: dict[str, Descriptor] = {}
    for root in index.roots:
        hints.setdefault(root.digest, Descriptor(root.digest, root.media_type, root.size))
    edges: dict[str, dict[str, str]] = {}
    parsed: dict[str, tuple[str | None, str | None, str | None]] = {}
    blind: set[str] = set()
    problems = [str(p) for p in (*index.problems, *file_problems)]

    def children(digest: str) -> list[str]:
        nonlocal visited
        visited += 1
        if visited % 512 == 0:
            interrupts.checkpoint()
            progress("counting", visited, len(files))
        hint = hints.get(digest)
        found = _expand(store, digest, hint.media_type if hint else None)
        if found is None or found is _LEAF:
            return []
        for child in found.children:
            hints.setdefault(child.digest, child)
        if found.problem:
            problems.append(found.problem)
        edges[digest] = {c.digest: c.kind for c in found.children}
        parsed[digest] = (found.media_type, found.subject, found.problem)
        if found.blind:
            blind.add(digest)
        return list(edges[digest])

    counts = graph.mark((r.digest for r in index.roots), children)
    progress("counting", len(files), len(files))
    return _Scan(index.roots, counts, edges, hints, parsed, files, problems, blind)


def _result(future: Future[Corrupt | None], section: interrupts.deferred) -> Corrupt | None:
    """The future's result, looking for an interruption every POLL seconds meanwhile."""
    while True:
        section.check()
        try:
            return future.result(timeout=POLL)
        except TimeoutError:
            continue


# ---------------------------------------------------------------------------
class Refcounter:
    """Reference counts for one OCI layout, kept in one database.

    Every method is one operation: it takes the store's lock when it writes,
    runs one transaction, and returns a frozen report.
    """

    def __init__(self, store: Store, db_url: str | None = None, policy: Policy | None = None):
        self.store = store
        self.progress: Progress = _no_progress
        self.policy = policy or Policy()
        store.ensure_state_dir()
        self.engine = make_engine(db_url or default_url(store.path))
        ensure_schema(self.engine)

    def close(self) -> None:
        with interrupts.deferred():  # a driver cut while closing logs tracebacks
            self.engine.dispose()

    def schema_revision(self) -> str | None:
        return current_revision(self.engine)

    def __enter__(self) -> Refcounter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # --- reconcile ------------------------------------------------------------
    def init(self) -> SyncReport:
        """Index the store: a bulk build on an empty database, else a full sync."""
        with self.store.locked():
            self._recover()
            with transaction(self.engine) as repo:
                empty = repo.get_meta(INDEX_HASH) is None
            if not empty:
                with interrupts.deferred("init"):
                    return self._sync_locked(None)
            snapshot = self.store.read_index()
            scan = _scan(self.store, snapshot, self.progress)
            with interrupts.deferred("init"), transaction(self.engine) as repo:
                self._rebuild(repo, scan, snapshot.hash)
                live = sum(1 for c in scan.counts.values() if c > 0)
            return SyncReport(
                roots_added=len(scan.roots),
                became_live=live,
                missing=tuple(sorted(d for d in scan.counts if self._is_missing(scan, d))),
                orphans=tuple(sorted(set(scan.files) - set(scan.counts))),
                problems=tuple(scan.problems),
            )

    def sync(self, changes: Changes | None = None) -> SyncReport:
        """Apply what changed on disk since the database last looked.

        With `changes` (from the watcher) only those parts are looked at; without,
        every blob file is compared too. index.json that does not parse raises
        InvalidStore and changes nothing: it is never read as "no roots".
        """
        with self.store.locked(), interrupts.deferred("sync"):
            self._recover()
            return self._sync_locked(changes)

    def _sync_locked(self, changes: Changes | None) -> SyncReport:
        """Callers hold the lock and keep interruptions out (refcount.interrupts): this
        runs from the transaction through the journal, done or not done."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            work = _Work(repo, self.store, self.policy)
            added, removed = self._catch_up(work, snapshot)
            if changes is None:
                files, problems = self.store.list_blobs()
                work.problems.extend(str(p) for p in problems)
                states = repo.blob_states()
                for digest in sorted(set(files) | set(states)):
                    work.file_changed(digest, states.get(digest), files.get(digest))
            else:
                rows = repo.blobs_in(changes.blobs)
                for digest in sorted(changes.blobs):
                    row = rows.get(digest)
                    work.file_changed(
                        digest, row.state if row else None, self.store.blob_file(digest)
                    )
            report = work.sync_report(added, removed)
            crash_point("sync-before-commit")
        crash_point("sync-after-commit")
        self._log_missing(report.missing)
        self._settle()
        return report

    def _catch_up(self, work: _Work, snapshot: IndexSnapshot) -> tuple[int, int]:
        """Apply the difference between the recorded roots and index.json's.

        A no-op costs one hash comparison: index.json is parsed only when it
        changed since the database last applied it (or lacks entry spans).
        """
        repo = work.repo
        if repo.get_meta(INDEX_HASH) == snapshot.hash and repo.spans_complete():
            return 0, 0
        index = parse_index(snapshot.data, str(self.store.index_path))
        old = Counter(r.digest for r in repo.roots())
        new = Counter(r.digest for r in index.roots)
        work.problems.extend(str(p) for p in index.problems)
        work.hint(Descriptor(r.digest, r.media_type, r.size) for r in index.roots)
        added, removed = new - old, old - new
        work.acquire(added.elements())
        work.release(removed.elements())
        _store_roots(repo, [_root_row(r) for r in index.roots])
        repo.set_meta(INDEX_HASH, snapshot.hash)
        return sum(added.values()), sum(removed.values())

    # --- delete ---------------------------------------------------------------
    def delete_tag(self, tag: str, *, dry_run: bool = False) -> DeleteReport:
        """Remove every index.json entry tagged `tag` and free what nothing else needs."""
        return self._delete(tag, _Select(tag=tag), f"tag {tag!r}", dry_run)

    def delete_manifest(self, digest: str, *, dry_run: bool = False) -> DeleteReport:
        """Remove every index.json entry pointing at `digest` (tagged or not)."""
        wanted = str(Digest.parse(digest))
        return self._delete(wanted, _Select(digest=wanted), f"manifest {wanted}", dry_run)

    def _delete(self, target: str, selects: _Select, what: str, dry_run: bool) -> DeleteReport:
        with self.store.locked():
            self._recover()
            for _attempt in range(REWRITE_ATTEMPTS):
                # index.json rewritten, committed and the journal carried out, or
                # none of it: an interruption waits for the end of the attempt.
                try:
                    with interrupts.deferred(None if dry_run else f"delete {what}"):
                        report = self._delete_once(target, selects, what, dry_run)
                        if not dry_run:
                            crash_point("delete-after-commit")
                            self._settle()
                except ConcurrentChange:
                    continue
                return report
        raise ConcurrentChange(f"{self.store.index_path}: kept changing; {what} not deleted")

    def _delete_once(self, target: str, selects: _Select, what: str, dry_run: bool) -> DeleteReport:
        """One attempt. Cost: the deleted image, plus reading and writing index.json's
        bytes once; the rest of index.json is not parsed while the database is current."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            self._catch_up(_Work(repo, self.store, self.policy), snapshot)
            work = _Work(repo, self.store, self.policy)
            removed = {
                r.position: r
                for r in (
                    repo.roots_where(tag=selects.tag, digest=selects.digest)
                    if selects.tag is None or usable_tag(selects.tag)
                    else []
                )
            }
            if not removed:
                self._explain_not_found(snapshot, target, what)
            self._refuse_damaged(repo, {r.digest for r in removed.values()}, what)
            if not self.policy.keep_untagged:
                removed.update((r.position, r) for r in self._untagged_children(repo, removed))
            freed = work.release(r.digest for r in removed.values())
            while freed and not self.policy.keep_referrers:
                referrers = [
                    r
                    for r in repo.roots_where(digests=repo.referrers_of(freed), untagged=True)
                    if r.position not in removed
                ]
                removed.update((r.position, r) for r in referrers)
                freed = work.release(r.digest for r in referrers)
            blind = repo.blind_manifests() if work.freed else []
            if blind:
                raise InvalidBlob(
                    f"{what}: not deleted: live manifests {', '.join(blind)} could not be read, "
                    "so the blobs they need are unknown; fix or delete them first"
                )
            ordered = sorted(removed.values(), key=lambda r: r.position)
            report = DeleteReport(
                target=target,
                dry_run=dry_run,
                removed=tuple(Entry(repo.index_of(r.start or 0), r.digest, r.tag) for r in ordered),
                freed=tuple(work.freed),
            )
            if dry_run:
                repo.rollback()
                return report
            self._rewrite_index(repo, snapshot, ordered)
            crash_point("delete-before-commit")
        log.info(
            "deleted %s: %d entries, %d blobs freed (%d bytes)",
            what,
            len(report.removed),
            len(report.freed),
            report.freed_bytes,
        )
        return report

    def _explain_not_found(self, snapshot: IndexSnapshot, target: str, what: str) -> NoReturn:
        for problem in parse_index(snapshot.data, str(self.store.index_path)).problems:
            if problem.tag == target:
                raise InvalidStore(str(problem))
        shown = target if target.isprintable() else ascii(target)
        raise NotFound(f"{shown}: no such {what.split()[0]} in {self.store.index_path}")

    def _rewrite_index(self, repo: Repo, snapshot: IndexSnapshot, removed: list[RootRow]) -> None:
        """Cut the removed entries out of index.json's bytes and replace the file.

        The spans come from the database; each is checked to still hold the entry
        it should before anything is written (ConcurrentChange makes the caller
        start over with a fresh parse).
        """
        positions = [r.position for r in removed]
        removals = []
        for root in removed:
            if not _span_holds(snapshot.data, root):
                repo.set_meta(INDEX_HASH, "")
                raise ConcurrentChange(f"{self.store.index_path}: entry moved; re-reading")
            assert root.start is not None and root.end is not None
            before, after = repo.kept_neighbours(root.start, positions)
            removals.append(Removal(root.start, root.end, before, after))
        ranges = cuts(removals)
        crash_point("delete-before-index")
        new_hash = self.store.replace_index(apply_cuts(snapshot.data, ranges), snapshot.hash)
        repo.delete_roots(positions)
        for start, end in ranges:  # highest first, so lower offsets stay valid
            repo.shift_spans(end, end - start)
        repo.set_meta(INDEX_HASH, new_hash)

    @staticmethod
    def _refuse_damaged(repo: Repo, roots: set[str], what: str) -> None:
        """Refuse to delete an image whose own manifests could not be parsed.

        Their children were never counted, so freeing would leave them behind (or,
        worse, a later repair could count them differently); the user fixes or
        removes the broken blob first. Cost: the image's own subtree.
        """
        below = graph.descendants(roots, lambda d: [c for c, _ in repo.children(d)])
        for row in repo.blobs_in(below | roots).values():
            if row.problem is not None:
                raise InvalidBlob(
                    f"{what}: not deleted: its image holds a damaged blob: {row.problem}"
                )

    def _untagged_children(self, repo: Repo, removed: dict[int, RootRow]) -> list[RootRow]:
        """Untagged entries below the deleted roots that no remaining tagged root reaches.

        Cost: the deleted image's subtree, and the ancestors of each candidate.
        """
        deleted = {r.digest for r in removed.values()}
        below = graph.descendants(deleted, lambda d: [c for c, _ in repo.children(d)])

        def tagged_and_kept(digest: str) -> bool:
            return any(
                r.tag is not None and r.position not in removed
                for r in repo.roots_where(digest=digest)
            )

        return [
            r
            for r in repo.roots_where(digests=below, untagged=True)
            if r.position not in removed
            and not graph.reachable_from_any(
                r.digest, tagged_and_kept, lambda d: [p for p, _ in repo.parents(d)]
            )
        ]

    # --- the journal -----------------------------------------------------------
    def _recover(self) -> None:
        """At the start of every operation: finish what a dead process left.

        index.json is caught up first, because an outside tool may have listed an
        image again while the journal waited; its blobs must be counted before a
        pending unlink or quarantine is re-checked against the database.
        """
        self.store.clear_temp()
        with interrupts.deferred():
            with transaction(self.engine) as repo:
                if not repo.pending_actions():
                    return
                self._catch_up(_Work(repo, self.store, self.policy), self.store.read_index())
            self._settle()

    def _settle(self) -> None:
        """Carry out the file actions committed transactions decided; idempotent."""
        with transaction(self.engine) as repo:
            actions = repo.pending_actions()
            if not actions:
                return
            rows = repo.blobs_in(a.digest for a in actions)
            for action in actions:
                row = rows.get(action.digest)
                if action.action == "quarantine" and row is not None and row.state == "trash":
                    self.store.quarantine(action.digest)
                elif action.action == "unlink" and row is None:
                    self.store.unlink_blob(action.digest)
                elif action.action == "restore" and row is not None and row.count > 0:
                    self.store.restore(action.digest)
                elif action.action == "purge" and (row is None or row.state != "trash"):
                    self.store.purge(action.digest)
                crash_point("settle-between-actions")
            repo.finish_actions(a.id for a in actions)

    # --- gc -------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, grace: timedelta | None = None) -> GcReport:
        """Sweep orphans older than the grace period; purge trash older than its TTL."""
        grace = self.policy.grace if grace is None else grace
        with self.store.locked(), interrupts.deferred(None if dry_run else "gc"):
            self._recover()
            if not dry_run:
                self._sync_locked(None)
            now = _now()
            with transaction(self.engine) as repo:
                work = _Work(repo, self.store, self.policy, now)
                swept = []
                damaged = repo.count_problems()
                if damaged:
                    log.warning(
                        "gc: not sweeping orphans while %d live manifests could not be read "
                        "(they may need them); see refcount verify",
                        damaged,
                    )
                for row in [] if damaged else repo.blobs_with_state("orphan"):
                    file = self.store.blob_file(row.digest)
                    if file is None or now - _mtime(file.mtime) < grace:
                        continue
                    swept.append(
                        Aged(row.digest, file.size, (now - _mtime(file.mtime)).total_seconds())
                    )
                    work.free(row.digest)
                purged = []
                for row in repo.blobs_with_state("trash"):
                    if row.freed_at is None or now - row.freed_at < self.policy.trash_ttl:
                        continue
                    if row.digest in {a.digest for a in swept}:
                        continue
                    purged.append(
                        Aged(row.digest, row.size or 0, (now - row.freed_at).total_seconds())
                    )
                    repo.delete_blob(row.digest)
                    repo.add_actions("purge", [row.digest], now)
                report = GcReport(dry_run, tuple(swept), tuple(purged))
                if dry_run:
                    repo.rollback()
                    return report
            crash_point("gc-after-commit")
            self._settle()
            return report

    # --- verify ---------------------------------------------------------------
    def verify(self, *, deep: bool = False, repair: bool = False) -> VerifyReport:
        """Recount from scratch and compare with the database (SPEC §5).

        `repair` rewrites the database to match the disk; it never deletes content.
        """
        with self.store.locked():
            self._recover()
            snapshot = self.store.read_index()
            scan = _scan(self.store, snapshot, self.progress)
            with (
                interrupts.deferred("verify --repair") if repair else nullcontext(),
                transaction(self.engine, write=repair) as repo,
            ):
                recorded = repo.counts()
                drift = tuple(
                    Drift(d, scan.counts.get(d, 0), recorded.get(d, 0))
                    for d in sorted(set(recorded) | set(scan.counts))
                    if scan.counts.get(d, 0) != recorded.get(d, 0)
                )
                states = repo.blob_states()
                drift += tuple(
                    Drift(d, scan.counts[d], recorded.get(d, 0), states.get(d), actual)
                    for d in sorted(scan.counts)
                    if scan.counts[d] == recorded.get(d, 0)
                    and states.get(d) != (actual := self._disk_state(scan, d))
                )
                if repair and drift:
                    self._rebuild(repo, scan, snapshot.hash)
                    log.warning("verify --repair: %d counts rewritten from the disk", len(drift))
                freed_at = {r.digest: r.freed_at for r in repo.blobs_with_state("trash")}
        now = _now()
        orphans = tuple(
            Aged(d, f.size, (now - _mtime(f.mtime)).total_seconds())
            for d, f in sorted(scan.files.items())
            if d not in scan.counts
        )
        quarantined = tuple(
            Aged(d, f.size, (now - (freed_at.get(d) or _mtime(f.mtime))).total_seconds())
            for d, f in sorted(self.store.list_trash().items())
        )
        return VerifyReport(
            deep=deep,
            repaired=repair and bool(drift),
            roots=len(scan.roots),
            live=len(scan.counts),
            drift=drift,
            missing=tuple(sorted(d for d in scan.counts if self._is_missing(scan, d))),
            orphans=orphans,
            quarantined=quarantined,
            corrupt=self._check_content(scan) if deep else (),
            problems=tuple(scan.problems),
        )

    @staticmethod
    def _disk_state(scan: _Scan, digest: str) -> str:
        if digest in scan.files:
            return "live"
        hint = scan.hints.get(digest)
        return "foreign" if hint is not None and hint.urls else "missing"

    @staticmethod
    def _is_missing(scan: _Scan, digest: str) -> bool:
        hint = scan.hints.get(digest)
        return digest not in scan.files and not (hint is not None and hint.urls)

    def _check_content(self, scan: _Scan) -> tuple[Corrupt, ...]:
        def check(digest: str) -> Corrupt | None:
            actual = self.store.hash_blob(digest)
            if actual is None:
                return Corrupt(digest, "unreadable")
            if actual != digest.split(":", 1)[1]:
                return Corrupt(digest, f"content hashes to {actual}")
            hint = scan.hints.get(digest)
            size = scan.files[digest].size
            if hint is not None and hint.size is not None and hint.size != size:
                return Corrupt(digest, f"size {size} differs from descriptor size {hint.size}")
            return None

        found: list[Corrupt] = []
        # A signal must not land inside the pool's locks (one left held hangs the
        # exit): the section takes it at `section.check()`, between results. Then
        # the blobs not started are dropped, not hashed first; the workers finish
        # the one in hand.
        with interrupts.deferred() as section:
            pool = ThreadPoolExecutor(max_workers=4)
            try:
                futures = [pool.submit(check, digest) for digest in sorted(scan.files)]
                for done, future in enumerate(futures, 1):
                    result = _result(future, section)
                    if result is not None:
                        found.append(result)
                    if done % 512 == 0 or done == len(scan.files):
                        self.progress("hashing", done, len(scan.files))
            finally:
                pool.shutdown(wait=False, cancel_futures=True)
        return tuple(found)

    def _rebuild(self, repo: Repo, scan: _Scan, index_hash: str) -> None:
        """Replace the database with what the scan found (no file is touched)."""
        now = _now()
        trash = {r.digest: r for r in repo.blobs_with_state("trash")}
        rows: list[dict[str, Any]] = []
        for digest, count in scan.counts.items():
            hint = scan.hints.get(digest)
            file = scan.files.get(digest)
            media_type, subject, problem = scan.parsed.get(digest, (None, None, None))
            state = "live" if file else ("foreign" if hint and hint.urls else "missing")
            rows.append(
                {
                    "digest": digest,
                    "count": count,
                    "state": state,
                    "size": hint.size
                    if hint and hint.size is not None
                    else (file.size if file else None),
                    "media_type": media_type or (hint.media_type if hint else None),
                    "expanded": digest in scan.parsed and digest not in scan.blind,
                    "subject": subject,
                    "problem": problem[:1000] if problem else None,
                    "first_seen": now,
                    "freed_at": None,
                }
            )
        for digest, file in scan.files.items():
            if digest not in scan.counts:
                rows.append(
                    {
                        "digest": digest,
                        "count": 0,
                        "state": "orphan",
                        "size": file.size,
                        "media_type": None,
                        "expanded": False,
                        "subject": None,
                        "problem": None,
                        "first_seen": _mtime(file.mtime),
                        "freed_at": None,
                    }
                )
        for digest, row in trash.items():
            if digest not in scan.counts and digest not in scan.files:
                rows.append({**row.__dict__})
        edges = [
            {"parent": parent, "child": child, "kind": kind}
            for parent, kids in scan.edges.items()
            for child, kind in kids.items()
        ]
        roots = [_root_row(r) for r in scan.roots]
        repo.replace_all(rows, edges, roots)
        repo.set_meta(INDEX_HASH, index_hash)

    # --- reading --------------------------------------------------------------
    def tags(self) -> list[TagInfo]:
        """Every tag in index.json order, with the bytes of its whole image.

        Reads the edges and sizes once and walks each image in memory: one pass
        over the database, however many tags there are.
        """
        self.sync_roots()
        with transaction(self.engine, write=False) as repo:
            children: dict[str, list[str]] = {}
            for parent, child in repo.all_edges():
                children.setdefault(parent, []).append(child)
            sizes = repo.sizes()
            result = []
            for root in repo.roots():
                if root.tag is None:
                    continue
                image = graph.descendants([root.digest], lambda d: children.get(d, ()))
                total = sum(sizes.get(d) or 0 for d in image | {root.digest})
                result.append(TagInfo(root.tag, root.digest, root.media_type, total))
            return result

    def show(self, ref: str) -> BlobInfo:
        """Why a blob (a digest, or the manifest a tag points at) is alive."""
        self.sync_roots()
        with transaction(self.engine, write=False) as repo:
            digest = self._resolve(repo, ref)
            row = repo.blob(digest)
            if row is None:
                raise NotFound(f"{ref}: no such blob in the database")
            tags = tuple(r.tag or "" for r in repo.roots_where(digest=digest))
            return BlobInfo(
                digest=digest,
                count=row.count,
                state=row.state,
                size=row.size,
                media_type=row.media_type,
                tags=tags,
                parents=tuple(Link(p, k) for p, k in sorted(repo.parents(digest))),
                children=tuple(Link(c, k) for c, k in sorted(repo.children(digest))),
                subject=row.subject,
                problem=row.problem,
            )

    def count(self, digest: str) -> int:
        """The recorded reference count of a blob (0 when unknown)."""
        with transaction(self.engine, write=False) as repo:
            row = repo.blob(str(Digest.parse(digest)))
            return 0 if row is None else row.count

    def _resolve(self, repo: Repo, ref: str) -> str:
        if not usable_tag(ref):
            raise NotFound(f"{ref!a}: no such tag in {self.store.index_path}")
        if ":" in ref and ref.split(":", 1)[0] in ("sha256", "sha512"):
            return str(Digest.parse(ref))
        roots = repo.roots_where(tag=ref)
        if not roots:
            try:
                return str(Digest.parse(ref))
            except InvalidDigest:
                raise NotFound(f"{ref}: no such tag in {self.store.index_path}") from None
        return roots[0].digest

    def sync_roots(self) -> None:
        """Catch the database up with index.json when it changed (cheap when not)."""
        snapshot = self.store.read_index()
        with transaction(self.engine, write=False) as repo:
            if repo.get_meta(INDEX_HASH) == snapshot.hash:
                return
        # Not `sync()`: this catch-up is not the operation the user asked for.
        with self.store.locked(), interrupts.deferred():
            self._recover()
            self._sync_locked(Changes(index=True))

    def stats(self) -> Stats:
        with transaction(self.engine, write=False) as repo:
            live = repo.sum_sizes("live")
            trash = repo.sum_sizes("trash")
            return Stats(
                roots=repo.count_roots(),
                live_blobs=live[0],
                live_bytes=live[1],
                missing_blobs=repo.sum_sizes("missing")[0],
                orphan_blobs=repo.sum_sizes("orphan")[0],
                quarantined_blobs=trash[0],
                quarantined_bytes=trash[1],
                problems=repo.count_problems(),
            )

    def _log_missing(self, missing: Iterable[str]) -> None:
        missing = list(missing)
        if not missing:
            return
        with transaction(self.engine, write=False) as repo:
            for digest in missing:
                tags = sorted(self._tags_needing(repo, digest))
                log.warning(
                    "%s: referenced blob is missing from blobs/; needed by %s",
                    digest,
                    ", ".join(tags) or "untagged roots",
                )

    @staticmethod
    def _tags_needing(repo: Repo, digest: str) -> set[str]:
        ancestors = graph.descendants([digest], lambda d: [p for p, _ in repo.parents(d)]) | {
            digest
        }
        return {t for tags in repo.root_tags(ancestors).values() for t in tags}


def open(
    store: str | Path,
    db: str | None = None,
    *,
    trash_ttl: timedelta | None = None,
    grace: timedelta | None = None,
    keep_referrers: bool = False,
    keep_untagged: bool = False,
    max_manifest: int = DEFAULT_MAX_MANIFEST,
) -> Refcounter:
    """Open a store's reference counts, creating or upgrading the database as needed."""
    defaults = Policy()
    policy = replace(
        defaults,
        trash_ttl=defaults.trash_ttl if trash_ttl is None else trash_ttl,
        grace=defaults.grace if grace is None else grace,
        keep_referrers=keep_referrers,
        keep_untagged=keep_untagged,
        max_manifest=max_manifest,
    )
    return Refcounter(Store(store, max_manifest=max_manifest), db, policy)
