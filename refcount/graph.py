"""The refcount algebra over opaque keys (SPEC §2).

Nothing here knows SQL, files or JSON: the caller passes keys and callbacks, as
containerd's tricolor collector does. The same functions run against a dict in
the tests and against the database in production.

A key's count is the number of roots pointing at it plus the number of distinct
live parents holding an edge to it. `acquire` and `release` keep that invariant
incrementally; `mark` recomputes it from scratch and is the oracle `verify`
compares with.

All walks use an explicit worklist, never recursion: a crafted store with a
cycle or a chain deeper than Python's stack still terminates, because a key is
expanded only on its own 0→1 (or 1→0) transition, which happens at most once
per key per operation.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Hashable, Iterable
from typing import TypeVar

K = TypeVar("K", bound=Hashable)

Bump = Callable[[K, int], int]
"""Add a delta to a key's count and return the new count."""


def acquire(keys: Iterable[K], bump: Bump[K], read_children: Callable[[K], Iterable[K]]) -> list[K]:
    """Count one new reference to each of `keys`; return the keys that became live.

    `read_children(k)` is called once for each key on its 0→1 transition and must
    record (and return) its distinct children. Cost: proportional to what becomes
    live plus its fan-out; keys already live cost one bump.
    """
    became_live: list[K] = []
    work = list(keys)
    while work:
        key = work.pop()
        if bump(key, +1) == 1:
            became_live.append(key)
            work.extend(read_children(key))
    return became_live


def release(
    keys: Iterable[K], bump: Bump[K], recorded_children: Callable[[K], Iterable[K]]
) -> list[K]:
    """Drop one reference to each of `keys`; return the keys that reached zero.

    `recorded_children(k)` is called once for each key on its 1→0 transition and
    returns (and forgets) the edges recorded when it became live, so nothing is
    re-parsed. Cost: proportional to what is freed plus the fan-out released.
    """
    freed: list[K] = []
    work = list(keys)
    while work:
        key = work.pop()
        if bump(key, -1) == 0:
            freed.append(key)
            work.extend(recorded_children(key))
    return freed


def mark(roots: Iterable[K], children: Callable[[K], Iterable[K]]) -> Counter[K]:
    """The from-scratch count of every key reachable from `roots`.

    Each occurrence of a key in `roots` is one reference; each distinct reachable
    parent with an edge to it is another. Memory is proportional to the reachable
    set, as is the work.
    """
    counts: Counter[K] = Counter(roots)
    work = list(counts)
    # The keys of `counts` are the "black or gray" ones (expanded or queued for
    # expansion): a key enters both at once, so no set of its own is needed.
    while work:
        key = work.pop()
        for child in set(children(key)):
            if child in counts:
                counts[child] += 1
            else:
                counts[child] = 1
                work.append(child)
    return counts


def descendants(keys: Iterable[K], children: Callable[[K], Iterable[K]]) -> set[K]:
    """Every key reachable from `keys` (excluding them unless reached again)."""
    found: set[K] = set()
    work = list(keys)
    while work:
        for child in children(work.pop()):
            if child not in found:
                found.add(child)
                work.append(child)
    return found


def reachable_from_any(
    key: K, is_target: Callable[[K], bool], parents: Callable[[K], Iterable[K]]
) -> bool:
    """Whether some ancestor of `key` (or `key` itself) satisfies `is_target`.

    Walks parents upward; cost proportional to the ancestors of `key`.
    """
    seen = {key}
    work = [key]
    while work:
        current = work.pop()
        if is_target(current):
            return True
        for parent in parents(current):
            if parent not in seen:
                seen.add(parent)
                work.append(parent)
    return False
