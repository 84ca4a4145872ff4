"""A from-scratch count of the store: verify's oracle, init's bulk build, --repair.

`scan` marks from index.json (refcount.graph.mark) reading every manifest it
reaches through the same `expand` the ledger uses; `drift` compares the result
with the database; `rebuild` replaces the database with it (no file is touched).
"""

from __future__ import annotations

import time
from collections import Counter, deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from refcount import graph, interrupts
from refcount.core.expansion import LEAF, Expansion, expand, known_size
from refcount.core.ledger import orphan_row
from refcount.core.policy import Progress, mtime, no_progress, now
from refcount.db.repo import BlobRow, EdgeRow, Repo, RootRow
from refcount.domain import BlobState, referenced_state
from refcount.extractors import DEFAULT_TIMEOUT
from refcount.oci import Descriptor, Root, parse_index
from refcount.reports import Aged, Corrupt, Drift, LeaseInfo, MassFree, VerifyReport
from refcount.store import BlobFile, IndexSnapshot, Store


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


_GONE = Corrupt("", "gone")
"""`check`'s answer for a blob whose file left blobs/ since it was listed."""


def check_content(
    store: Store,
    found: Scan,
    progress: Progress,
    *,
    digests: Sequence[str] | None = None,
    deadline: float | None = None,
    workers: int = 4,
) -> Hashed:
    """Hash blob files (all those `found` lists, or `digests` of them) and compare
    sizes with descriptors (verify --deep).

    Needs no lock: a blob freed meanwhile (its file gone) is skipped, not reported.
    With `deadline` (time.monotonic()) no blob is started after it, but at least one
    is: the work in hand finishes, so the overshoot is one blob per worker.
    """

    def check(digest: str) -> Corrupt | None:
        actual = store.hash_blob(digest)
        if actual is None:
            return _GONE if store.blob_file(digest) is None else Corrupt(digest, "unreadable")
        if actual != digest.split(":", 1)[1]:
            return Corrupt(digest, f"content hashes to {actual}")
        hint = found.hints.get(digest)
        size = found.files[digest].size
        if hint is not None and hint.size is not None and hint.size != size:
            return Corrupt(digest, f"size {size} differs from descriptor size {hint.size}")
        return None

    todo = sorted(found.files) if digests is None else list(digests)
    outcomes = _in_threads(check, todo, progress, workers, deadline)
    checked = tuple(todo[: len(outcomes)])
    return Hashed(
        checked=checked,
        corrupt=tuple(o for o in outcomes if o is not None and o is not _GONE),
        skipped=tuple(d for d, o in zip(checked, outcomes, strict=True) if o is _GONE),
    )


def _in_threads(
    check: Callable[[str], Corrupt | None],
    digests: list[str],
    progress: Progress,
    workers: int,
    deadline: float | None,
) -> list[Corrupt | None]:
    """`check` digests in a pool, in order, until the deadline; their outcomes, in order.

    A few blobs are in the pool at a time (twice `workers`), so that stopping at
    the deadline leaves no hashing started for nothing. A signal must not land
    inside the pool's locks (one left held hangs the exit): the section takes it
    at `section.check()`, between results. Then the blobs not started are
    dropped, not hashed first; the workers finish the one in hand.
    """
    outcomes: list[Corrupt | None] = []
    with interrupts.deferred() as section:
        pool = ThreadPoolExecutor(max_workers=workers)
        try:
            in_hand: deque[Future[Corrupt | None]] = deque()
            submitted = 0
            while True:
                while (
                    len(in_hand) < 2 * workers
                    and submitted < len(digests)
                    and (submitted == 0 or deadline is None or time.monotonic() < deadline)
                ):
                    in_hand.append(pool.submit(check, digests[submitted]))
                    submitted += 1
                if not in_hand:
                    break
                outcomes.append(_result(in_hand.popleft(), section))
                if len(outcomes) % 512 == 0 or len(outcomes) == len(digests):
                    progress("hashing", len(outcomes), len(digests))
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
    return outcomes


POLL = 0.1
"""Seconds between looks for an interruption while waiting on worker threads."""


def _result(future: Future[Corrupt | None], section: interrupts.deferred) -> Corrupt | None:
    """The future's result, looking for an interruption every POLL seconds meanwhile."""
    while True:
        section.check()
        try:
            return future.result(timeout=POLL)
        except TimeoutError:
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
