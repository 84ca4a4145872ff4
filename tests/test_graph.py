"""The refcount algebra on graph literals, against its own from-scratch oracle."""

from __future__ import annotations

from collections import Counter

import pytest

from refcount import graph

pytestmark = pytest.mark.no_database


class Counts:
    """The algebra's callbacks over a dict: counts and recorded edges."""

    def __init__(self, edges: dict[str, list[str]]) -> None:
        self.edges = edges
        self.count: Counter[str] = Counter()
        self.recorded: dict[str, list[str]] = {}

    def bump(self, key: str, delta: int) -> int:
        self.count[key] += delta
        return self.count[key]

    def read(self, key: str) -> list[str]:
        self.recorded[key] = sorted(set(self.edges.get(key, [])))
        return self.recorded[key]

    def forget(self, key: str) -> list[str]:
        return self.recorded.pop(key, [])

    def push(self, *roots: str) -> list[str]:
        return graph.acquire(roots, self.bump, self.read)

    def delete(self, *roots: str) -> list[str]:
        return graph.release(roots, self.bump, self.forget)

    def live(self) -> dict[str, int]:
        return {k: v for k, v in self.count.items() if v > 0}


def oracle(roots: list[str], edges: dict[str, list[str]]) -> dict[str, int]:
    return dict(graph.mark(roots, lambda k: edges.get(k, [])))


#   a     b          two images sharing a base layer
#   |\   /|
#   | base |
#   ca     cb        (their own configs)
SHARED = {"a": ["ca", "base"], "b": ["cb", "base"]}


def test_shared_layer_survives_until_its_last_user_is_deleted() -> None:
    counts = Counts(SHARED)
    assert sorted(counts.push("a", "b")) == ["a", "b", "base", "ca", "cb"]
    assert (
        counts.live() == oracle(["a", "b"], SHARED) == {"a": 1, "b": 1, "ca": 1, "cb": 1, "base": 2}
    )
    assert sorted(counts.delete("a")) == ["a", "ca"]
    assert counts.live() == oracle(["b"], SHARED)
    assert sorted(counts.delete("b")) == ["b", "base", "cb"]
    assert counts.live() == {}


#   i ──> m1 ──> l
#    └──> m2 ──┘      an index; both platform manifests share a layer; m1 also a root
INDEX = {"i": ["m1", "m2"], "m1": ["l"], "m2": ["l"]}


def test_a_manifest_that_is_also_a_root_keeps_its_subtree() -> None:
    counts = Counts(INDEX)
    counts.push("i", "m1")
    assert counts.live() == oracle(["i", "m1"], INDEX) == {"i": 1, "m1": 2, "m2": 1, "l": 2}
    assert sorted(counts.delete("i")) == ["i", "m2"]
    assert counts.live() == oracle(["m1"], INDEX) == {"m1": 1, "l": 1}


def test_the_same_root_twice_is_two_references() -> None:
    counts = Counts(SHARED)
    counts.push("a", "a")
    assert counts.delete("a") == []
    assert counts.live() == oracle(["a"], SHARED)


#   a ──> b ──> a     a crafted cycle (file names that do not match content)
CYCLE = {"a": ["b"], "b": ["a"]}


def test_cycles_terminate_on_push_and_delete() -> None:
    counts = Counts(CYCLE)
    assert sorted(counts.push("a")) == ["a", "b"]
    assert counts.live() == {"a": 2, "b": 1}
    assert counts.delete("a") == []  # the cycle keeps itself: verify reports it as drift
    assert oracle([], CYCLE) == {}


def test_mark_counts_distinct_parents_once() -> None:
    assert oracle(["m"], {"m": ["l", "l"]}) == {"m": 1, "l": 1}


def test_a_chain_deeper_than_the_recursion_limit_is_handled() -> None:
    depth = 50_000
    chain = {f"n{i}": [f"n{i + 1}"] for i in range(depth)}
    counts = Counts(chain)
    assert len(counts.push("n0")) == depth + 1
    assert len(counts.delete("n0")) == depth + 1
    assert len(oracle(["n0"], chain)) == depth + 1


def test_descendants_and_ancestor_search() -> None:
    assert graph.descendants(["i"], lambda k: INDEX.get(k, [])) == {"m1", "m2", "l"}
    parents = {"l": ["m1", "m2"], "m1": ["i"], "m2": ["i"]}
    assert graph.reachable_from_any("l", {"i"}.__contains__, lambda k: parents.get(k, []))
    assert not graph.reachable_from_any("m2", {"m1"}.__contains__, lambda k: parents.get(k, []))
