"""A from-scratch count of the store: verify's oracle, init's bulk build, --repair.

`scan` marks from index.json (refcount.graph.mark) reading every manifest it
reaches through the same `expand` the ledger uses; `drift` compares the result
with the database; `rebuild` replaces the database with it (no file is touched).
`load` is init's scan and rebuild in one pass: each manifest's edges go to the
database as it is read, so memory holds one row per blob, never the edges.
"""

from __future__ import annotations

import ctypes
import multiprocessing
import os
import signal
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from multiprocessing.pool import AsyncResult, Pool

from refcount import graph, interrupts
from refcount.core.expansion import LEAF, Expansion, expand, known_size
from refcount.core.ledger import orphan_row
from refcount.core.policy import Progress, mtime, no_progress, now
from refcount.db.repo import BlobRow, Repo, RootRow
from refcount.domain import BlobState, referenced_state
from refcount.extractors import DEFAULT_TIMEOUT, installed
from refcount.oci import MANIFEST_TYPES, Descriptor, Problem, Root, parse_index
from refcount.reports import Aged, Corrupt, Drift, LeaseInfo, MassFree, VerifyReport
from refcount.store import BlobFile, IndexSnapshot, Store, crash_point, hash_files

Listed = Callable[[dict[str, BlobFile]], None]
"""Called by `scan` with the blob files as soon as they are listed."""
Expanded = Callable[[str, Expansion], None]
"""Called by `scan` with each manifest-like blob read and what it holds."""


@dataclass
class Scan:
    roots: tuple[Root, ...]
    counts: Counter[str]
    files: dict[str, BlobFile]
    """Blob files in blobs/ with their size and age: every one, or (`unstated`)
    those the scan found no reference to or no size for."""
    hints: dict[str, Descriptor] = field(default_factory=dict)
    expansions: dict[str, Expansion] = field(default_factory=dict)
    """The manifest-like blobs read, and what each holds (without its children
    when the scan handed them to an `Expanded` callback instead)."""
    problems: list[str] = field(default_factory=list)
    unstated: set[str] = field(default_factory=set)
    """Referenced blobs found in blobs/ without a stat (those a descriptor gave no
    size for are stat'ed and in `files` too)."""

    def in_blobs(self, digest: str) -> bool:
        return digest in self.files or digest in self.unstated

    def state_of(self, digest: str) -> BlobState:
        """What the disk says of a referenced blob (the one rule)."""
        hint = self.hints.get(digest)
        return referenced_state(
            in_blobs=self.in_blobs(digest), foreign=hint is not None and hint.urls
        )

    def missing(self) -> tuple[str, ...]:
        absent = self.counts.keys() - self.files.keys() - self.unstated  # set arithmetic in C
        return tuple(sorted(d for d in absent if self.state_of(d) is BlobState.MISSING))

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
    listed: Listed | None = None,
    expanded: Expanded | None = None,
) -> Scan:
    """Count the store from scratch. Cost: every manifest reachable, once.
    `timeout`: seconds each extractor plug-in call may take. `listed` is called
    with the blob files as soon as they are listed, before any manifest is read
    (verify --deep starts hashing them). `expanded`, when given, takes each
    manifest's children, and the scan keeps only the rest of its expansion."""
    index = parse_index(snapshot.data, str(store.index_path))
    file_problems: list[Problem] = []
    files: dict[str, BlobFile] = {}
    if listed is not None:
        files, file_problems = store.list_blobs()
        listed(files)
    result = Scan(index.roots, Counter(), files)
    manifest_problems: list[str] = []
    for root in index.roots:
        result.hints.setdefault(root.digest, Descriptor(root.digest, root.media_type, root.size))

    visited = 0
    readable = MANIFEST_TYPES | installed().by_type.keys()
    """The media types `expand` reads (every other known type is a leaf)."""

    def children(digest: str) -> list[str]:
        nonlocal visited
        visited += 1
        if visited % 512 == 0:
            interrupts.checkpoint()
            progress("counting", visited, max(len(files), len(result.hints)))
        hint = result.hints.get(digest)
        media_type = hint.media_type if hint else None
        if media_type is not None and media_type not in readable:
            return []  # a layer or a config: what `expand` says of it without a look
        found = expand(store, digest, media_type, timeout=timeout)
        if found is None or found is LEAF:
            return []
        hints = result.hints
        for child in found.children:
            if child.digest not in hints:
                hints[child.digest] = child
        if found.problem:
            manifest_problems.append(found.problem)
        if expanded is None:
            result.expansions[digest] = found
        else:
            expanded(digest, found)
            result.expansions[digest] = replace(found, children=())
        return [c.digest for c in found.children]

    with store.reading_blobs():
        result.counts = graph.mark((r.digest for r in index.roots), children)
    if listed is None:
        file_problems = _list_after_mark(store, result)
    result.problems = [str(p) for p in (*index.problems, *file_problems)] + manifest_problems
    progress("counting", visited, visited)
    return result


def _list_after_mark(store: Store, found: Scan) -> list[Problem]:
    """List blobs/ knowing what is referenced: a referenced name is neither
    validated again (it was, as a descriptor's digest) nor stat'ed unless no
    descriptor gave its size (`Store.compare_blobs`); 331k stat calls and name
    checks were a fifth of an init at 100k images."""
    listing = store.compare_blobs(found.counts)
    found.files.update(listing.new)
    found.unstated = listing.known  # the set itself: a second one of 331k costs 16 MB
    for digest in listing.known:
        hint = found.hints.get(digest)
        if (hint is None or hint.size is None) and (file := store.blob_file(digest)):
            found.files[digest] = file  # also in `unstated`: either means "in blobs/"
    return listing.problems


def drift(repo: Repo, found: Scan) -> tuple[Drift, ...]:
    """Counts that differ from the recount, then (counts agreeing) recorded states
    that differ from what the disk shows. Cost: set arithmetic over the rows, and
    per-digest work only for the blobs that can differ."""
    recorded = repo.counts()
    counts: tuple[Drift, ...] = ()
    if recorded != found.counts:  # a compare in C, the common answer at 100k rows
        counts = tuple(
            Drift(d, found.counts.get(d, 0), recorded.get(d, 0))
            for d in sorted(set(recorded) | set(found.counts))
            if found.counts.get(d, 0) != recorded.get(d, 0)
        )
    states = repo.blob_state_values()
    counted = found.counts.keys()
    present = found.files.keys() | found.unstated
    live = {d for d, state in states.items() if state == BlobState.LIVE}
    # A counted blob whose file is there should be live; one whose file is not is
    # foreign or missing, decided one by one.
    suspects = ((counted & present) - live) | (counted - present)
    drifted = []
    for d in sorted(suspects):
        state = states.get(d)
        recorded_state = None if state is None else BlobState(state)
        if found.counts[d] == recorded.get(d, 0) and recorded_state != (
            actual := found.state_of(d)
        ):
            drifted.append(Drift(d, found.counts[d], recorded.get(d, 0), recorded_state, actual))
    return counts + tuple(drifted)


def rebuild(repo: Repo, found: Scan, index_hash: str) -> None:
    """Replace the database with what the scan found (no file is touched)."""
    trash = repo.blobs_with_state(BlobState.TRASH)
    repo.clear_graph()
    repo.bulk_edges(
        (parent, child.digest, child.kind)
        for parent, expansion in found.expansions.items()
        for child in expansion.children
    )
    _store_rows(repo, found, index_hash, trash)


def load(
    repo: Repo,
    store: Store,
    snapshot: IndexSnapshot,
    progress: Progress = no_progress,
    timeout: float = DEFAULT_TIMEOUT,
    check: Callable[[], None] = interrupts.checkpoint,
) -> Scan:
    """init's bulk build on an empty database: `scan` and `rebuild` in one pass.
    `check` is called between batches of blobs (it raises to stop the load).

    The edges of every EDGE_BATCH manifests are inserted as the scan reads them,
    so memory holds the blob rows (one per blob) and one batch of edges, not the
    edge lists of the whole store. All of it is the caller's one transaction: a
    crash before its commit leaves the database as empty as it was, and the
    next start indexes the store again from the beginning.
    """
    batch: list[tuple[str, str, str]] = []

    def expanded(parent: str, expansion: Expansion) -> None:
        batch.extend((parent, child.digest, child.kind) for child in expansion.children)
        if len(batch) >= EDGE_BATCH:
            repo.bulk_edges(batch)
            batch.clear()

    def checked(stage: str, done: int, total: int) -> None:
        check()
        progress(stage, done, total)

    with repo.bulk_build():
        found = scan(store, snapshot, checked, timeout, expanded=expanded)
        repo.bulk_edges(batch)
        crash_point("init-mid-load")
        _store_rows(repo, found, snapshot.hash, trash=[])
    return found


EDGE_BATCH = 20_000
"""Edges buffered by `load` between inserts (about 4,000 image manifests)."""


def _store_rows(repo: Repo, found: Scan, index_hash: str, trash: list[BlobRow]) -> None:
    """The blob and root rows of a scan (its edges are in already), and the
    quarantined blobs' rows kept from before (their files are still in the trash).
    Blob rows are made one at a time, in key order (an append to the B-tree)."""
    repo.bulk_blobs(_blob_rows(found, trash))
    repo.bulk_roots(root_row(r) for r in found.roots)
    repo.set_index_hash(index_hash)


def _blob_rows(found: Scan, trash: list[BlobRow]) -> Iterator[BlobRow]:
    at = now()
    hints, files, expansions, counts = found.hints, found.files, found.expansions, found.counts
    for digest in sorted(counts):
        hint = hints.get(digest)
        file = files.get(digest)
        expansion = expansions.get(digest)
        in_blobs = file is not None or digest in found.unstated
        yield BlobRow(
            digest=digest,
            size=known_size(hint, file.size if file else None),
            media_type=(expansion.media_type if expansion else None)
            or (hint.media_type if hint else None),
            count=counts[digest],
            state=referenced_state(in_blobs=in_blobs, foreign=hint is not None and hint.urls),
            expanded=expansion is not None and not expansion.blind,
            subject=expansion.subject if expansion else None,
            problem=expansion.problem if expansion else None,
            first_seen=at,
        )
    for digest in found.orphans():
        yield orphan_row(digest, found.files[digest])
    for row in trash:
        if row.digest not in found.counts and not found.in_blobs(row.digest):
            yield row


@dataclass(frozen=True)
class Hashed:
    """What `check_content` hashed: `checked` is a prefix of the digests asked for,
    in order (the whole list unless the deadline came first)."""

    checked: tuple[str, ...]
    corrupt: tuple[Corrupt, ...]
    skipped: tuple[str, ...] = ()
    """Blobs gone from blobs/ since they were listed (freed meanwhile): never reported."""


class Hashing:
    """Blob files being hashed in the background (`hashing`): `digests`, in order,
    in batches of BATCH, by a pool of processes (None: in this process, at `take`).

    Every batch is handed to the pool at once; each worker stops its batch at the
    deadline, so no blob is started after it, but the first one is: the overshoot
    is one blob per worker. The caller goes on meanwhile (the recount), then
    `take`s the hashes.
    """

    def __init__(
        self, store: Store, digests: list[str], deadline: float | None, workers: int
    ) -> None:
        self.store, self.digests, self.deadline = store, digests, deadline
        self.pool: Pool | None = None
        self.tasks: list[tuple[int, AsyncResult[list[str | None]]]] = []
        if len(digests) <= BATCH:
            return  # forking would cost more than it saves
        root = str(store.path)
        with interrupts.deferred():  # not half-made: `close` must find it whole
            # fork: the workers import nothing again, and ignore SIGINT (a terminal
            # sends it to the whole group): this process stops them (`close`).
            self.pool = multiprocessing.get_context("fork").Pool(
                workers, _worker_start, (os.getpid(),)
            )
            for start in range(0, len(digests), BATCH):
                batch = digests[start : start + BATCH]
                task = self.pool.apply_async(hash_files, (root, batch, deadline, start == 0))
                self.tasks.append((len(batch), task))

    def take(self, progress: Progress) -> list[str | None]:
        """The hex digests, in order, until the deadline (a prefix of `digests`).

        A signal must not land inside the pool's locks (one left held hangs the
        exit): the section takes it at `section.check()`, between results."""
        if self.pool is None:
            alone = self.store.hash_batch(self.digests, self.deadline)
            progress("hashing", len(alone), len(self.digests))
            return alone
        hashes: list[str | None] = []
        with interrupts.deferred() as section:
            for size, task in self.tasks:
                done = _result(task, section)
                hashes += done
                progress("hashing", len(hashes), len(self.digests))
                if len(done) < size:  # the deadline came: what follows is no prefix
                    break
        return hashes

    def close(self) -> None:
        """Stop the workers, their batches dropped if not taken."""
        if self.pool is not None:
            with interrupts.deferred():
                self.pool.terminate()


@contextmanager
def hashing(
    store: Store, digests: Sequence[str], deadline: float | None, workers: int | None = None
) -> Iterator[Hashing]:
    """Start hashing `digests` (see `Hashing`); the workers are stopped on the way out.
    `workers`: processes (default: one per core this process may use)."""
    started = Hashing(store, list(digests), deadline, workers or len(os.sched_getaffinity(0)))
    try:
        yield started
    finally:
        started.close()


def check_content(store: Store, found: Scan, progress: Progress, started: Hashing) -> Hashed:
    """Compare the hashes `started` makes with the blobs' names, and their files'
    sizes with descriptors (verify --deep).

    Needs no lock: a blob freed meanwhile (its file gone) is skipped, not reported.
    """
    hashes = started.take(progress)
    checked = tuple(started.digests[: len(hashes)])
    corrupt: list[Corrupt] = []
    skipped: list[str] = []
    for digest, actual in zip(checked, hashes, strict=True):
        hint = found.hints.get(digest)
        file = found.files.get(digest)
        if actual is None:
            if store.blob_file(digest) is None:
                skipped.append(digest)
            else:
                corrupt.append(Corrupt(digest, "unreadable"))
        elif actual != digest.split(":", 1)[1]:
            corrupt.append(Corrupt(digest, f"content hashes to {actual}"))
        elif hint is not None and hint.size is not None and file and hint.size != file.size:
            corrupt.append(
                Corrupt(digest, f"size {file.size} differs from descriptor size {hint.size}")
            )
    return Hashed(checked=checked, corrupt=tuple(corrupt), skipped=tuple(skipped))


BATCH = 256
"""Blobs per task of the hashing pool; a list of at most this many is hashed here."""


PR_SET_PDEATHSIG = 1


def _worker_start(parent: int) -> None:
    """A hashing worker ignores SIGINT, dies of SIGTERM (`Pool.terminate`), and is
    killed with its parent: the file descriptors it inherited (the store's lock
    among them) never outlive the verify that forked it, even one killed -9."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the parent died before the prctl
        os._exit(1)


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
