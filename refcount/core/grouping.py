"""Several deletes in one transaction and one rewrite of index.json (group commit).

`Refcounter.delete_groups` runs the requests of a daemon's batch
(`refcount.group`) as if they ran one after another in arrival order, but
writes index.json once. Each request is planned in a savepoint of its own
(`plan_each`): one that names a missing tag, or an image that must not be
deleted, is rolled back alone and answers exactly the error it would have
answered alone, while the others go on. The entries a planned request removes
leave the roots table at once, so the requests after it see the store as it
will be after it (a second delete of the same tag finds nothing, an untagged
child is removed by the request that drops its last tagged parent); they are
put back before the one rewrite, which cuts them out with their spans.

Each request has a Ledger of its own, so its report lists its own entries and
the blobs its own releases freed. A blob whose last two references belong to
two requests of the batch is freed by, and reported in, the later of the two:
the one whose release took its count to zero, as when they run one by one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from refcount.core import planner
from refcount.core.ledger import Ledger
from refcount.db.repo import Repo, RootRow
from refcount.errors import DeleteRefused, InvalidDigest, NotFound, RefcountError, UnusableTag
from refcount.oci import Digest
from refcount.reports import DeleteReport, Entry
from refcount.store import IndexSnapshot

ALONE = (NotFound, DeleteRefused, UnusableTag, InvalidDigest)
"""The errors that concern one request of a batch: it fails alone, the others go
on. Anything else (an invalid store, a database error, a concurrent change)
concerns the whole batch."""


@dataclass(frozen=True)
class DeleteRequest:
    """One delete of a batch: the entries of `tags` (`delete tag`), or those
    pointing at `digest` (`delete manifest`)."""

    tags: tuple[str, ...] = ()
    digest: str | None = None

    def __post_init__(self) -> None:
        if bool(self.tags) == (self.digest is not None):
            raise ValueError("a DeleteRequest names tags or a digest, not both nor neither")

    def selects(self) -> list[planner.Select]:
        """What the planner removes (InvalidDigest for a malformed digest)."""
        if self.digest is not None:
            wanted = str(Digest.parse(self.digest))
            return [planner.Select(f"manifest {wanted}", digest=wanted)]
        return [planner.Select(f"tag {t!r}", tag=t) for t in self.tags]

    def describe(self) -> str:
        """The operation as an interruption's message names it: `delete tag 'a'`."""
        return "delete " + ", ".join(s.what for s in self.selects())


@dataclass(frozen=True)
class Planned:
    """A request of the batch that will be carried out."""

    removed: tuple[RootRow, ...]
    report: DeleteReport
    what: str


def plan_each(
    repo: Repo,
    requests: Sequence[DeleteRequest],
    snapshot: IndexSnapshot,
    ledger: Callable[[], Ledger],
) -> list[Planned | RefcountError]:
    """Plan each request in turn in the caller's transaction (see the module
    docstring); returns, per request, its plan or the error it fails with alone.
    The removed entries are out of the roots table when this returns: the caller
    puts them back (`restore`) before rewriting index.json. Cost: each request's
    own plan, plus one delete of its root rows."""
    results: list[Planned | RefcountError] = []
    for request in requests:
        try:
            with repo.savepoint():
                selects = request.selects()
                own = ledger()
                removed = planner.plan(own, selects, snapshot)
                report = DeleteReport(
                    target=", ".join(
                        s.tag if s.tag is not None else s.digest or "" for s in selects
                    ),
                    dry_run=False,
                    removed=tuple(
                        Entry(repo.index_of(r.start or 0), r.digest, r.tag) for r in removed
                    ),
                    freed=tuple(own.freed),
                )
                repo.forget_created(b.digest for b in own.freed)
                repo.delete_roots(r.position for r in removed)
        except ALONE as exc:
            results.append(exc)
            continue
        results.append(Planned(tuple(removed), report, ", ".join(s.what for s in selects)))
    return results


def restore(repo: Repo, planned: Sequence[Planned]) -> list[RootRow]:
    """Put the planned requests' entries back in the roots table, as they were,
    for the one rewrite of index.json to cut them out; returns them in file order."""
    rows = sorted((r for p in planned for r in p.removed), key=lambda r: r.position)
    repo.insert_roots(rows)
    return rows
