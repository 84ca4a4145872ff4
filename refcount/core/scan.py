"""A from-scratch count of the store: verify's oracle, init's bulk build, --repair.

`scan` marks from index.json (refcount.graph.mark) reading every manifest it
reaches through the same `expand` the ledger uses; `drift` compares the result
with the database; `rebuild` replaces the database with it (no file is touched).
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from multiprocessing.pool import AsyncResult

from refcount import graph, interrupts
from refcount.core.expansion import LEAF, Expansion, expand, known_size
from refcount.core.ledger import orphan_row
from refcount.core.policy import Progress, mtime, no_progress, now
from refcount.db.repo import BlobRow, EdgeRow, Repo, RootRow
from refcount.domain import BlobState, referenced_state
from refcount.extractors import DEFAULT_TIMEOUT
from refcount.oci import Descriptor, Root, parse_index
from refcount.reports import Aged, Corrupt, Drift, LeaseInfo, MassFree, VerifyReport
from refcount.store import BlobFile, IndexSnapshot, Store, hash_files


@dataclass
class Scan:
    roots: tuple[Root, ...]
    counts: Counter[str]
    files: dict[str, BlobFile]
    hints: dict[str, Descriptor] = field(default_factory=dict)
    expansions: dict[str, Expansion] = field(default_factory=dict)
    """The manifest-like blobs read, and what each holds."""
    problems: list[str] = field(default_factory=list)

    def state_of(self, digest: str) -> BlobState:
        """What the disk says of a referenced blob (the one rule)."""
        hint = self.hints.get(digest)
        return referenced_state(
            in_blobs=digest in self.files, foreign=hint is not None and hint.urls
        )

    def missing(self) -> tuple[str, ...]:
        return tuple(sorted(d for d in self.counts if self.state_of(d) is BlobState.MISSING))

    def orphans(self) -> list[str]:
        return sorted(set(self.files) - set(self.counts))


def root_row(root: Root) -> RootRow:
    return RootRow(
        root.position, root.digest, root.tag, root.media_type, root.size, root.start, root.end
    )


def scan(
    store: Store,
    snapshot: IndexSnapshot,
    progress: Progress = no_progress,
    timeout: float = DEFAULT_TIMEOUT,
) -> Scan:
    """Count the store from scratch. Cost: every manifest reachable, once.
    `timeout`: seconds each extractor plug-in call may take."""
    index = parse_index(snapshot.data, str(store.index_path))
    files, file_problems = store.list_blobs()
    result = Scan(index.roots, Counter(), files)
    result.problems = [str(p) for p in (*index.problems, *file_problems)]
    for root in index.roots:
        result.hints.setdefault(root.digest, Descriptor(root.digest, root.media_type, root.size))

    visited = 0

    def children(digest: str) -> list[str]:
        nonlocal visited
        visited += 1
        if visited % 512 == 0:
            interrupts.checkpoint()
            progress("counting", visited, len(files))
        hint = result.hints.get(digest)
        found = expand(store, digest, hint.media_type if hint else None, timeout=timeout)
        if found is None or found is LEAF:
            return []
        for child in found.children:
            result.hints.setdefault(child.digest, child)
        if found.problem:
            result.problems.append(found.problem)
        result.expansions[digest] = found
        return [c.digest for c in found.children]

    result.counts = graph.mark((r.digest for r in index.roots), children)
    progress("counting", len(files), len(files))
    return result


def drift(repo: Repo, found: Scan) -> tuple[Drift, ...]:
    """Counts that differ from the recount, then (counts agreeing) recorded states
    that differ from what the disk shows."""
    recorded = repo.counts()
    counts = tuple(
        Drift(d, found.counts.get(d, 0), recorded.get(d, 0))
        for d in sorted(set(recorded) | set(found.counts))
        if found.counts.get(d, 0) != recorded.get(d, 0)
    )
    states = repo.blob_states()
    return counts + tuple(
        Drift(d, found.counts[d], recorded.get(d, 0), states.get(d), actual)
        for d in sorted(found.counts)
        if found.counts[d] == recorded.get(d, 0) and states.get(d) != (actual := found.state_of(d))
    )


def rebuild(repo: Repo, found: Scan, index_hash: str) -> None:
    """Replace the database with what the scan found (no file is touched)."""
    at = now()
    rows: list[BlobRow] = []
    for digest, count in found.counts.items():
        hint = found.hints.get(digest)
        file = found.files.get(digest)
        expansion = found.expansions.get(digest)
        rows.append(
            BlobRow(
                digest=digest,
                size=known_size(hint, file.size if file else None),
                media_type=(expansion.media_type if expansion else None)
                or (hint.media_type if hint else None),
                count=count,
                state=found.state_of(digest),
                expanded=expansion is not None and not expansion.blind,
                subject=expansion.subject if expansion else None,
                problem=expansion.problem if expansion else None,
                first_seen=at,
            )
        )
    rows += [orphan_row(d, found.files[d]) for d in found.orphans()]
    rows += [
        row
        for row in repo.blobs_with_state(BlobState.TRASH)
        if row.digest not in found.counts and row.digest not in found.files
    ]
    edges = [
        EdgeRow(parent, child.digest, child.kind)
        for parent, expansion in found.expansions.items()
        for child in expansion.children
    ]
    repo.replace_all(rows, edges, [root_row(r) for r in found.roots])
    repo.set_index_hash(index_hash)


@dataclass(frozen=True)
class Hashed:
    """What `check_content` hashed: `checked` is a prefix of the digests asked for,
    in order (the whole list unless the deadline came first)."""

    checked: tuple[str, ...]
    corrupt: tuple[Corrupt, ...]
    skipped: tuple[str, ...] = ()
    """Blobs gone from blobs/ since they were listed (freed meanwhile): never reported."""


def check_content(
    store: Store,
    found: Scan,
    progress: Progress,
    *,
    digests: Sequence[str] | None = None,
    deadline: float | None = None,
    workers: int | None = None,
) -> Hashed:
    """Hash blob files (all those `found` lists, or `digests` of them) and compare
    sizes with descriptors (verify --deep).

    Needs no lock: a blob freed meanwhile (its file gone) is skipped, not reported.
    With `deadline` (time.monotonic()) no blob is started after it, but at least one
    is: the work in hand finishes, so the overshoot is one blob per worker.
    `workers`: processes hashing (default: one per core this process may use).
    """
    todo = sorted(found.files) if digests is None else list(digests)
    hashes = _hash_all(store, todo, progress, workers or _cores(), deadline)
    checked = tuple(todo[: len(hashes)])
    corrupt: list[Corrupt] = []
    skipped: list[str] = []
    for digest, actual in zip(checked, hashes, strict=True):
        hint = found.hints.get(digest)
        size = found.files[digest].size
        if actual is None:
            if store.blob_file(digest) is None:
                skipped.append(digest)
            else:
                corrupt.append(Corrupt(digest, "unreadable"))
        elif actual != digest.split(":", 1)[1]:
            corrupt.append(Corrupt(digest, f"content hashes to {actual}"))
        elif hint is not None and hint.size is not None and hint.size != size:
            corrupt.append(Corrupt(digest, f"size {size} differs from descriptor size {hint.size}"))
    return Hashed(checked=checked, corrupt=tuple(corrupt), skipped=tuple(skipped))


BATCH = 256
"""Blobs per task of the hashing pool; a list of at most this many is hashed here."""


def _cores() -> int:
    return len(os.sched_getaffinity(0))


def _hash_all(
    store: Store,
    digests: list[str],
    progress: Progress,
    workers: int,
    deadline: float | None,
) -> list[str | None]:
    """The hex digests of `digests`' files, in order, until the deadline (a prefix).

    Batches of BATCH digests go to a pool of `workers` processes, two batches per
    worker in hand at a time, so that stopping at the deadline leaves little
    hashing started for nothing; each worker stops its batch at the deadline.
    A list of one batch or less is hashed in this process. A signal must not
    land inside the pool's locks (one left held hangs the exit): the section
    takes it at `section.check()`, between results, and then the workers are
    terminated, their batches dropped.
    """
    if len(digests) <= BATCH:
        alone = store.hash_batch(digests, deadline)
        progress("hashing", len(alone), len(digests))
        return alone
    root = str(store.path)
    batches = [digests[i : i + BATCH] for i in range(0, len(digests), BATCH)]
    hashes: list[str | None] = []
    with interrupts.deferred() as section:
        # fork: the workers need nothing imported again, and ignore SIGINT (the
        # terminal sends it to the whole group): this process stops them.
        pool = multiprocessing.get_context("fork").Pool(workers, initializer=_worker_signals)
        try:
            in_hand: deque[tuple[int, AsyncResult[list[str | None]]]] = deque()
            submitted = 0
            while True:
                while (
                    len(in_hand) < 2 * workers
                    and submitted < len(batches)
                    and (submitted == 0 or deadline is None or time.monotonic() < deadline)
                ):
                    batch = batches[submitted]
                    task = pool.apply_async(hash_files, (root, batch, deadline, submitted == 0))
                    in_hand.append((len(batch), task))
                    submitted += 1
                if not in_hand:
                    break
                size, task = in_hand.popleft()
                done = _result(task, section)
                hashes += done
                progress("hashing", len(hashes), len(digests))
                if len(done) < size:  # the deadline came: the rest is not a prefix
                    break
        finally:
            pool.terminate()
    return hashes


def _worker_signals() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


POLL = 0.1
"""Seconds between looks for an interruption while waiting on the workers."""


def _result(task: AsyncResult[list[str | None]], section: interrupts.deferred) -> list[str | None]:
    """The task's result, looking for an interruption every POLL seconds meanwhile."""
    while True:
        section.check()
        try:
            return task.get(timeout=POLL)
        except multiprocessing.TimeoutError:
            continue


def report(
    found: Scan,
    *,
    deep: bool,
    repaired: bool,
    drift: tuple[Drift, ...],
    trash: list[BlobRow],
    corrupt: tuple[Corrupt, ...],
    behind: int,
    mass_frees: tuple[MassFree, ...],
    quarantined: dict[str, BlobFile],
    expired_leases: tuple[LeaseInfo, ...] = (),
) -> VerifyReport:
    """verify's report: the comparison, and the store's orphans and quarantine with ages."""
    at = now()
    freed_at = {r.digest: r.freed_at for r in trash}
    return VerifyReport(
        deep=deep,
        repaired=repaired,
        roots=len(found.roots),
        live=len(found.counts),
        drift=drift,
        missing=found.missing(),
        orphans=tuple(
            Aged(d, found.files[d].size, (at - mtime(found.files[d].mtime)).total_seconds())
            for d in found.orphans()
        ),
        quarantined=tuple(
            Aged(d, f.size, (at - (freed_at.get(d) or mtime(f.mtime))).total_seconds())
            for d, f in sorted(quarantined.items())
        ),
        corrupt=corrupt,
        problems=tuple(found.problems),
        behind=behind,
        mass_frees=mass_frees,
        expired_leases=expired_leases,
    )
