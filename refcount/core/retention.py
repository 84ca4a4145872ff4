"""Retention: which tags (and untagged entries) a prune policy deletes. Pure.

Given the candidates (each tag with when its image was made) and the rules,
`choose` returns the chosen entries in the order they are deleted, each with
the rule that chose it. It reads no file and no database: the byte budgets ask
a callback what deleting one more entry frees (`prune` replays the deletes in
memory, `replay.Replay`), and the caller turns the choice into one delete.

The rule (README, "prune"):

- A tag is *eligible* when it matches a `match` glob (any tag, when there is
  none) and no `exclude` glob. A tag that is not eligible is never deleted and
  takes no keep slot. Globs are fnmatch patterns on the whole tag (`web:1.*`).
- `keep_last N` *keeps* the N newest eligible tags of each repository (the
  part of the tag before its last `:`; a tag without one is its own
  repository).
- A tag is deleted when a *selecting* rule selects it and it is eligible and
  not kept. The selecting rules: `older_than D` (made before now - D);
  `unused_for D` (last used before now - D: `refcount touch` or a push, else
  when refcount first saw its root); the
  budgets `max_size` (live bytes at most SIZE) and `min_free` (the store's
  filesystem has at least SIZE, or PCT% of its size, free), which take the
  oldest remaining tags one by one, after the other rules' choices, and stop at
  the first that brings the store within every budget; and `keep_last` itself
  when it is the only tag rule given: then it selects every eligible tag
  beyond the N newest of its repository.
- `untagged` selects the untagged entries older than the grace period that no
  tagged image needs (not a platform manifest of one, nor a referrer of
  something one holds); match/exclude/keep_last concern tags only.

Oldest first means by creation time, then by tag; newest the reverse.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from refcount.errors import InvalidPolicy


class Reason(StrEnum):
    """The rule that chose an entry."""

    KEEP_LAST = "keep-last"
    OLDER_THAN = "older-than"
    UNUSED_FOR = "unused-for"
    MAX_SIZE = "max-size"
    MIN_FREE = "min-free"
    UNTAGGED = "untagged"


@dataclass(frozen=True)
class MinFree:
    """How much of the store's filesystem must be free: bytes, or a fraction of its size."""

    bytes: int | None = None
    fraction: float | None = None

    def needed(self, total: int) -> int:
        if self.fraction is not None:
            return int(self.fraction * total)
        return self.bytes or 0


@dataclass(frozen=True)
class PrunePolicy:
    """What `prune` deletes (see the module docstring for how the rules combine)."""

    keep_last: int | None = None
    """Keep the N newest eligible tags of each repository."""
    older_than: timedelta | None = None
    """Select the tags whose image was made longer ago than this."""
    unused_for: timedelta | None = None
    """Select the tags last used (touched or pushed) longer ago than this."""
    match: tuple[str, ...] = ()
    """Globs: only the tags matching one may be deleted (every tag when empty)."""
    exclude: tuple[str, ...] = ()
    """Globs: a tag matching one is never deleted."""
    untagged: bool = False
    """Select the untagged entries past the grace period no tagged image needs."""
    max_size: int | None = None
    """Delete the oldest tags until the live bytes are at most this."""
    min_free: MinFree | None = None
    """Delete the oldest tags until the filesystem has this much free."""

    def __post_init__(self) -> None:
        if self.keep_last is not None and self.keep_last < 0:
            raise InvalidPolicy(f"keep-last {self.keep_last}: must be 0 or more")
        if self.older_than is not None and self.older_than < timedelta(0):
            raise InvalidPolicy(f"older-than {self.older_than}: must not be negative")
        if self.unused_for is not None and self.unused_for < timedelta(0):
            raise InvalidPolicy(f"unused-for {self.unused_for}: must not be negative")
        if self.max_size is not None and self.max_size < 0:
            raise InvalidPolicy(f"max-size {self.max_size}: must not be negative")

    @property
    def selects(self) -> bool:
        """Whether any rule selects anything (a policy of globs alone deletes nothing)."""
        return self.untagged or self.keep_last is not None or self.selects_tags

    @property
    def selects_tags(self) -> bool:
        """A rule other than keep_last selects tags (keep_last then only keeps)."""
        return self.budgeted or any(rule.given(self) for rule in AGE_RULES)

    @property
    def budgeted(self) -> bool:
        return self.max_size is not None or self.min_free is not None

    @property
    def dated(self) -> bool:
        """Whether a rule needs the tags' creation times."""
        return self.keep_last is not None or self.selects_tags

    def eligible(self, tag: str) -> bool:
        matched = not self.match or any(fnmatch.fnmatchcase(tag, g) for g in self.match)
        return matched and not any(fnmatch.fnmatchcase(tag, g) for g in self.exclude)


@dataclass(frozen=True)
class Candidate:
    """A tag, or (tag None) an untagged entry, and when its image was made."""

    tag: str | None
    digest: str
    created: datetime
    created_from: str  # "annotation", "config", or "first-seen"
    needed: bool = False  # an untagged entry some tagged image still needs
    used: datetime | None = None
    """When the tag was last used (touched or pushed; never: when its root was first
    seen). Filled for tags when `unused_for` is given; None is never selected by it."""

    @property
    def key(self) -> str:
        """How a plan names the entry: its tag, or an untagged entry's digest."""
        return self.tag if self.tag is not None else self.digest


@dataclass(frozen=True)
class Choice:
    candidate: Candidate
    reason: Reason


@dataclass(frozen=True)
class Budget:
    """The store's figures before the prune, and what deleting one more entry frees.

    `frees(candidate)` is called once per chosen entry, in the order they are
    chosen, and answers the bytes that entry frees on top of the ones before.
    """

    live: int
    free: int
    total: int
    frees: Callable[[Candidate], int]


@dataclass(frozen=True)
class AgeRule:
    """A rule that selects each eligible, unkept tag on its own (no budget, no order)."""

    reason: Reason
    given: Callable[[PrunePolicy], bool]
    selects: Callable[[PrunePolicy, Candidate, datetime], bool]


def _older_than(policy: PrunePolicy, c: Candidate, at: datetime) -> bool:
    assert policy.older_than is not None
    return c.created < at - policy.older_than


def _unused_for(policy: PrunePolicy, c: Candidate, at: datetime) -> bool:
    assert policy.unused_for is not None
    return c.used is not None and c.used < at - policy.unused_for


AGE_RULES: tuple[AgeRule, ...] = (
    AgeRule(Reason.OLDER_THAN, lambda p: p.older_than is not None, _older_than),
    AgeRule(Reason.UNUSED_FOR, lambda p: p.unused_for is not None, _unused_for),
)
"""The selecting rules of the per-tag kind. One more is a PrunePolicy field, a
Candidate field, a Reason and a row here. A tag two rows select is reported with
the first row's reason."""


def repository(tag: str) -> str:
    """`web` for `web:1.0`; `registry:5000/web` for `registry:5000/web:1.0`; a tag
    without a `:` (`latest`) is its own repository."""
    name, colon, _version = tag.rpartition(":")
    return name if colon else tag


def _oldest_first(c: Candidate) -> tuple[datetime, str]:
    return c.created, c.key


def kept(tags: Iterable[Candidate], keep_last: int) -> set[str]:
    """The N newest tags of each repository."""
    by_repository: dict[str, list[Candidate]] = {}
    for c in tags:
        assert c.tag is not None
        by_repository.setdefault(repository(c.tag), []).append(c)
    return {
        c.key
        for group in by_repository.values()
        for c in sorted(group, key=_oldest_first, reverse=True)[:keep_last]
    }


def choose(
    candidates: Iterable[Candidate],
    policy: PrunePolicy,
    at: datetime,
    *,
    grace: timedelta,
    budget: Budget | None = None,
) -> tuple[list[Choice], bool | None]:
    """The entries `policy` deletes at time `at`, in deletion order, and whether the
    budgets are met afterwards (None when the policy has none; `budget` must be
    given when it has). Cost: a sort of the candidates, plus one `frees` call per
    chosen entry when there is a budget."""
    everything = list(candidates)
    tags = sorted(
        (c for c in everything if c.tag is not None and policy.eligible(c.tag)), key=_oldest_first
    )
    keep = kept(tags, policy.keep_last) if policy.keep_last is not None else set()
    deletable = [c for c in tags if c.key not in keep]
    chosen: dict[str, Choice] = {}
    if policy.keep_last is not None and not policy.selects_tags:
        chosen.update((c.key, Choice(c, Reason.KEEP_LAST)) for c in deletable)
    for rule in AGE_RULES:
        if rule.given(policy):
            for c in deletable:
                if c.key not in chosen and rule.selects(policy, c, at):
                    chosen[c.key] = Choice(c, rule.reason)
    if policy.untagged:
        chosen.update(
            (c.key, Choice(c, Reason.UNTAGGED))
            for c in sorted(everything, key=_oldest_first)
            if c.tag is None and not c.needed and at - c.created >= grace
        )
    order = sorted(chosen.values(), key=lambda ch: _oldest_first(ch.candidate))
    if not policy.budgeted:
        return order, None
    assert budget is not None
    freed = sum(budget.frees(ch.candidate) for ch in order)

    def unmet() -> Reason | None:
        if policy.max_size is not None and budget.live - freed > policy.max_size:
            return Reason.MAX_SIZE
        if policy.min_free is not None and budget.free + freed < policy.min_free.needed(
            budget.total
        ):
            return Reason.MIN_FREE
        return None

    for c in deletable:
        reason = unmet()
        if reason is None:
            break
        if c.key not in chosen:
            order.append(Choice(c, reason))
            freed += budget.frees(c)
    return order, unmet() is None
