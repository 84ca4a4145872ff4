"""Deletes replayed in memory on the recorded counts: what they would free, with no write.

`du` asks what deleting each tag alone would free; `prune` asks what deleting
its chosen tags one after another frees so far, to stop a byte budget at the
right tag. Both replay the rules of the deletion planner (`planner.plan`) on
one read of the edges, counts, sizes and roots (`Graph.load`), so their
figures are what `delete tag --dry-run` would print, without a transaction
per question:

- release the deleted entries; with them the untagged entries below their
  image that no remaining tagged entry reaches (unless `keep_untagged`);
- then, as long as something is freed, the untagged referrers of what was
  freed (unless `keep_referrers`).

A `Replay` keeps its deltas between calls, so a sequence of `delete` calls
frees, in total, what one delete of all of them frees (the counts are a sum;
an untagged entry below an earlier delete is looked at again by each later
one, and goes with the one after which no remaining tag reaches it).
Cost: each call is proportional to the image it deletes and what that frees.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from refcount import graph
from refcount.core.policy import Policy
from refcount.db.repo import Repo, RootRow


@dataclass(frozen=True)
class Graph:
    """The recorded graph, read once: edges both ways, counts, sizes, roots."""

    children: dict[str, list[str]]
    parents: dict[str, list[str]]
    counts: dict[str, int]
    sizes: dict[str, int | None]
    referrers: dict[str, list[str]]  # subject -> the manifests that refer to it
    by_tag: dict[str, list[RootRow]]  # tag -> its entries, in index.json order
    tags_of: dict[str, set[str]]  # digest -> the tags of the entries pointing at it
    untagged: dict[str, list[RootRow]]  # digest -> the untagged entries pointing at it

    @classmethod
    def load(cls, repo: Repo) -> Graph:
        children: dict[str, list[str]] = {}
        parents: dict[str, list[str]] = {}
        for parent, child in repo.all_edges():
            children.setdefault(parent, []).append(child)
            parents.setdefault(child, []).append(parent)
        referrers: dict[str, list[str]] = {}
        for referrer, subject in repo.subjects().items():
            referrers.setdefault(subject, []).append(referrer)
        by_tag: dict[str, list[RootRow]] = {}
        tags_of: dict[str, set[str]] = {}
        untagged: dict[str, list[RootRow]] = {}
        for root in repo.roots():
            if root.tag is None:
                untagged.setdefault(root.digest, []).append(root)
            else:
                by_tag.setdefault(root.tag, []).append(root)
                tags_of.setdefault(root.digest, set()).add(root.tag)
        return cls(
            children, parents, repo.counts(), repo.sizes(), referrers, by_tag, tags_of, untagged
        )

    def below(self, digests: Iterable[str]) -> set[str]:
        """Every blob under `digests` (not the digests themselves unless reached)."""
        return graph.descendants(set(digests), lambda d: self.children.get(d, ()))

    def above(self, digests: Iterable[str]) -> set[str]:
        return graph.descendants(set(digests), lambda d: self.parents.get(d, ()))

    def size(self, digests: Iterable[str]) -> int:
        return sum(self.sizes.get(d) or 0 for d in digests)


class Replay:
    """A sequence of deletes on a copy of the counts; see the module docstring."""

    def __init__(self, recorded: Graph, policy: Policy) -> None:
        self.graph = recorded
        self.policy = policy
        self._delta: dict[str, int] = {}
        self.removed: dict[int, RootRow] = {}  # position -> entry, every call so far
        self._removed_tags: set[str] = set()
        self._below: set[str] = set()  # untagged digests below what was deleted so far
        self.freed: set[str] = set()  # every call so far

    def _bump(self, digest: str, by: int) -> int:
        counts = self.graph.counts
        if digest not in counts:
            return 1  # never recorded: releasing it frees nothing (Ledger._bump)
        self._delta[digest] = self._delta.get(digest, 0) + by
        return counts[digest] + self._delta[digest]

    def _release(self, entries: list[RootRow]) -> list[str]:
        self.removed.update((r.position, r) for r in entries)
        return graph.release(
            [r.digest for r in entries], self._bump, lambda d: self.graph.children.get(d, ())
        )

    def delete_tag(self, tag: str) -> set[str]:
        """Delete every entry tagged `tag`; returns what this call frees."""
        self._removed_tags.add(tag)
        return self.delete(self.graph.by_tag.get(tag, []))

    def delete(self, entries: list[RootRow]) -> set[str]:
        """Delete `entries` (and what goes with them); returns what this call frees."""
        g = self.graph
        entries = [r for r in entries if r.position not in self.removed]
        chosen = {r.position: r for r in entries}
        if not self.policy.keep_untagged:

            def tagged_and_kept(digest: str) -> bool:
                return bool(g.tags_of.get(digest, set()) - self._removed_tags)

            # Below every entry deleted so far, as one batch's planner sees it: an
            # untagged entry an earlier delete reached may go with a later one.
            self._below |= g.below(r.digest for r in entries) & g.untagged.keys()
            for digest in sorted(self._below):
                if not graph.reachable_from_any(
                    digest, tagged_and_kept, lambda d: g.parents.get(d, [])
                ):
                    kept = [r for r in g.untagged[digest] if r.position not in self.removed]
                    chosen.update((r.position, r) for r in kept)
        freed = self._release(list(chosen.values()))
        found = set(freed)
        while freed and not self.policy.keep_referrers:
            more = [
                r
                for d in {x for s in freed for x in g.referrers.get(s, ())}
                for r in g.untagged.get(d, ())
                if r.position not in self.removed
            ]
            freed = self._release(more)
            found.update(freed)
        self.freed |= found
        return found
