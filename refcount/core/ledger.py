"""The ledger: one transaction's changes to the counts, and the blob state machine.

`Ledger` supplies the callbacks `refcount.graph.acquire`/`release` need (bump a
count, read a new parent's children, take a freed parent's edges) on a `Repo`,
decides each blob's state from the disk (`refcount.domain.referenced_state`,
the one rule) and journals the file actions that follow (quarantine, unlink,
restore, purge), to be carried out after the commit (`journal.settle`).
It never removes a file itself.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from refcount import graph
from refcount.core.expansion import LEAF, expand, known_size
from refcount.core.policy import Policy, mtime, now
from refcount.db.repo import BlobRow, Repo
from refcount.domain import BlobState, FileAction, referenced_state
from refcount.oci import Descriptor
from refcount.reports import BlobRef, MassFree, SyncReport
from refcount.store import BlobFile, Store


@dataclass
class Ledger:
    repo: Repo
    store: Store
    policy: Policy
    now: datetime = field(default_factory=now)
    hints: dict[str, Descriptor] = field(default_factory=dict)
    """What descriptors said about blobs met in this transaction (type, size, urls)."""
    became_live: int = 0
    freed: list[BlobRef] = field(default_factory=list)
    freed_digests: set[str] = field(default_factory=set)
    restored: set[str] = field(default_factory=set)
    held: list[str] = field(default_factory=list)
    """Blobs that reached zero but stay, because a lease holds them."""
    missing: list[str] = field(default_factory=list)
    found: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    mass_free: MassFree | None = None
    undisposed: dict[str, int] = field(default_factory=dict)
    """Freed blobs whose file's fate `dispose` has not decided yet -> their bytes."""

    def hint(self, descriptors: Iterable[Descriptor]) -> list[str]:
        """Remember what descriptors say about their blobs; return their digests."""
        digests = []
        for descriptor in descriptors:
            self.hints.setdefault(descriptor.digest, descriptor)
            digests.append(descriptor.digest)
        return digests

    # --- counts ---------------------------------------------------------------------
    def acquire(self, digests: Iterable[str]) -> None:
        self.became_live += len(graph.acquire(digests, self._bump, self._read_children))

    def release(self, digests: Iterable[str]) -> list[str]:
        """Drop a reference to each of `digests`; returns the blobs freed. A blob whose
        count reaches zero while a lease holds it is not freed: it stays in blobs/ as an
        orphan (counted again when its writer's root lands, swept by gc only once no
        lease holds it and it is older than the grace period)."""
        reached_zero = graph.release(digests, self._bump, self.repo.take_edges)
        leased = self.repo.leased(reached_zero, self.now) if reached_zero else set()
        freed = []
        for digest in reached_zero:
            if digest in leased and self.store.blob_file(digest) is not None:
                self.repo.mark_orphan(digest, self.now)
                self.held.append(digest)
            else:
                self.free(digest)
                freed.append(digest)
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

    def state_of(self, digest: str) -> BlobState:
        """The state of a blob that just got a count above zero. A quarantined copy
        is restored (journalled); a missing one is noted for the report."""
        in_blobs = self.store.blob_file(digest) is not None
        if not in_blobs and self.store.in_trash(digest):
            self.repo.add_actions(FileAction.RESTORE, [digest], self.now)
            self.restored.add(digest)
            in_blobs = True
        hint = self.hints.get(digest)
        state = referenced_state(in_blobs=in_blobs, foreign=hint is not None and hint.urls)
        if state is BlobState.MISSING:
            self._note_missing(digest)
        return state

    def _create(self, digest: str) -> None:
        hint = self.hints.get(digest)
        file = self.store.blob_file(digest)
        self.repo.insert_blob(
            BlobRow(
                digest=digest,
                size=known_size(hint, file.size if file else None),
                media_type=hint.media_type if hint else None,
                count=1,
                state=self.state_of(digest),
                expanded=False,
                subject=None,
                problem=None,
                first_seen=self.now,
            )
        )

    def _revive(self, digest: str) -> None:
        """A blob with count 0 (an orphan or in the trash) became live again."""
        row = self.repo.blob(digest)
        assert row is not None
        state = self.state_of(digest)
        if row.state is BlobState.TRASH and digest not in self.restored:
            # An outside tool wrote the blob again: the quarantined copy is surplus.
            self.repo.add_actions(FileAction.PURGE, [digest], self.now)
        hint = self.hints.get(digest)
        self.repo.revive(digest, state, hint.media_type if hint else None)

    def _read_children(self, digest: str) -> list[str]:
        """Parse a manifest-like blob that just became live and record its edges."""
        row = self.repo.blob(digest)
        assert row is not None
        found = expand(self.store, digest, row.media_type, timeout=self.policy.timeout_seconds)
        if found is None or found is LEAF:
            return []
        self.repo.add_edges(digest, [(c.digest, c.kind) for c in found.children])
        if found.problem:
            self.problems.append(found.problem)
        self.repo.record_expansion(
            digest,
            expanded=not found.blind,
            media_type=found.media_type,
            subject=found.subject,
            problem=found.problem,
        )
        return self.hint(found.children)

    # --- freeing ----------------------------------------------------------------------
    def free(self, digest: str) -> None:
        """The blob's count reached zero. What happens to its file is decided by
        `dispose`, once the whole operation's frees are known (a mass free is
        held in the quarantine whatever the trash TTL says)."""
        row = self.repo.blob(digest)
        assert row is not None
        if self.store.blob_file(digest) is None:
            self.repo.delete_blob(digest)  # missing or foreign: nothing on disk to free
        else:
            self.undisposed[digest] = row.size or 0
        self.freed.append(BlobRef(digest, row.size, row.media_type))
        self.freed_digests.add(digest)

    def dispose(self, *, hold: bool = False) -> None:
        """Journal the files freed since the last call: quarantine them, or with a
        zero trash TTL (and no `hold`) unlink them."""
        digests = list(self.undisposed)
        self.undisposed.clear()
        if hold or self.policy.trash_ttl > timedelta(0):
            for digest in digests:
                self.repo.mark_freed(digest, self.now)
            self.repo.add_actions(FileAction.QUARANTINE, digests, self.now)
        else:
            for digest in digests:
                self.repo.delete_blob(digest)
            self.repo.add_actions(FileAction.UNLINK, digests, self.now)

    def _note_missing(self, digest: str) -> None:
        if digest not in self.missing:
            self.missing.append(digest)

    # --- blob files changed on disk -----------------------------------------------------
    def file_changed(self, digest: str, state: BlobState | None, file: BlobFile | None) -> None:
        """Bring one blob's row in line with whether its file is in blobs/ now.

        A referenced blob that vanished is recorded as missing; its count and the
        counts of everything it holds are left alone (SPEC §6). A blob freed or
        restored by this same transaction moves only when the journal runs after
        commit, so what the disk shows of it now is stale: skip it.
        """
        if digest in self.freed_digests or digest in self.restored:
            return
        if state is BlobState.LIVE and file is None:
            self.repo.set_state(digest, BlobState.MISSING)
            self._note_missing(digest)
        elif state in (BlobState.MISSING, BlobState.FOREIGN) and file is not None:
            row = self.repo.blob(digest)
            self.repo.set_state(digest, BlobState.LIVE)
            if state is BlobState.MISSING:
                self.found.append(digest)
            if row is not None and not row.expanded:
                self.acquire(self._read_children(digest))
        elif state is BlobState.ORPHAN and file is None:
            self.repo.delete_blob(digest)
        elif state is BlobState.TRASH and file is not None:  # an outside tool wrote it again
            self.repo.mark_orphan(digest, mtime(file.mtime))
            self.repo.add_actions(FileAction.PURGE, [digest], self.now)
            self.orphans.append(digest)
        elif state is None and file is not None:
            self.repo.insert_blob(orphan_row(digest, file))
            self.orphans.append(digest)

    def report(self, added: int = 0, removed: int = 0) -> SyncReport:
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
            mass_free=self.mass_free,
        )


def orphan_row(digest: str, file: BlobFile) -> BlobRow:
    """The row of a file in blobs/ that nothing references (yet)."""
    return BlobRow(
        digest=digest,
        size=file.size,
        media_type=None,
        count=0,
        state=BlobState.ORPHAN,
        expanded=False,
        subject=None,
        problem=None,
        first_seen=mtime(file.mtime),
    )
