"""The prune use case's reading side: the candidates, their creation times, the budget.

`choose` gathers what `retention.choose` needs from the database (one read of
the graph, `replay.Graph`) and the store (the root manifests and configs of
the eligible tags, read once and cached in `image_created`), and returns the
plan as `planner.Select`s for the same delete path as `delete tag`.

When an image was made: its root manifest's (or index's)
`org.opencontainers.image.created` annotation, else its config's `created`,
else when refcount first saw the root manifest (`blobs.first_seen`). A tag
with several entries is as new as its newest. Untagged entries are aged by
when refcount first saw them (the grace period guards pushes in progress).

When a tag was last used (`unused_for`): its `last_used` row (`refcount touch`,
or the push that made it); a tag never touched counts as used when refcount
first saw its root (the newest sighting, for a tag of several entries).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from refcount.core.planner import Select
from refcount.core.policy import Policy
from refcount.core.replay import Graph, Replay
from refcount.core.retention import Budget, Candidate, Choice, PrunePolicy
from refcount.core.retention import choose as choose_by_rules
from refcount.db.repo import Repo
from refcount.domain import BlobState
from refcount.errors import InvalidBlob
from refcount.oci import config_created, manifest_created
from refcount.store import Store

NONE = "none"  # image_created.source when neither the manifest nor its config says


def read_created(store: Store, digest: str) -> tuple[datetime | None, str]:
    """(created, source) from a root manifest's bytes and its config's: two reads at most."""
    try:
        data = store.read_blob(digest)
        found = manifest_created(data) if data is not None else None
        if found is None:
            return None, NONE
        if found.annotation is not None:
            return found.annotation, "annotation"
        config = store.read_blob(found.config) if found.config is not None else None
    except InvalidBlob:
        return None, NONE
    created = config_created(config) if config is not None else None
    return (created, "config") if created is not None else (None, NONE)


def cache_created(repo: Repo, store: Store, rules: PrunePolicy) -> int:
    """Read and record the creation time of every eligible tag's root manifest not
    cached yet; returns how many were read. Only when a rule needs dates."""
    if not rules.dated:
        return 0
    digests = {r.digest for r in repo.roots() if r.tag is not None and rules.eligible(r.tag)}
    missing = digests - repo.created_of(digests).keys()
    repo.record_created({d: read_created(store, d) for d in sorted(missing)})
    return len(missing)


@dataclass(frozen=True)
class Plan:
    choices: list[Choice]
    selects: list[Select]
    budget_met: bool | None
    live: int  # bytes live before the prune


def needed_untagged(recorded: Graph) -> set[str]:
    """What the tagged images need: their blobs, and (repeatedly) the referrers of
    those and what the referrers hold."""
    tagged = set(recorded.tags_of)
    needed = tagged | recorded.below(tagged)
    frontier = needed
    while frontier:
        new = {r for s in frontier for r in recorded.referrers.get(s, ()) if r not in needed}
        new |= recorded.below(new) - needed
        needed |= new
        frontier = new
    return needed


def candidates(repo: Repo, recorded: Graph, rules: PrunePolicy, at: datetime) -> list[Candidate]:
    """The eligible tags (dated when a rule needs it) and, for `untagged`, the untagged
    entries with whether a tagged image needs them. A root with no blob row yet (never
    the case once caught up) counts as seen at `at`: the newest, kept longest."""
    seen = repo.first_seen(
        {r.digest for rows in recorded.by_tag.values() for r in rows} | recorded.untagged.keys()
    )
    first_seen = defaultdict(lambda: at, seen)
    created = repo.created_of(first_seen) if rules.dated else {}

    def dated(digest: str) -> tuple[datetime, str]:
        when, source = created.get(digest, (None, NONE))
        return (when, source) if when is not None else (first_seen[digest], "first-seen")

    eligible = {tag: rows for tag, rows in recorded.by_tag.items() if rules.eligible(tag)}
    used = repo.last_used(eligible) if rules.unused_for is not None else {}

    def last_use(tag: str) -> datetime | None:
        if rules.unused_for is None:
            return None
        return used.get(tag) or max(first_seen[r.digest] for r in eligible[tag])

    found = []
    for tag, rows in eligible.items():
        when, source = max(dated(r.digest) for r in rows)
        found.append(Candidate(tag, rows[0].digest, when, source, used=last_use(tag)))
    if rules.untagged:
        needed = needed_untagged(recorded)
        found += [
            Candidate(None, d, first_seen[d], "first-seen", needed=d in needed)
            for d in recorded.untagged
        ]
    return found


def choose(
    repo: Repo,
    rules: PrunePolicy,
    policy: Policy,
    at: datetime,
    space: Callable[[], tuple[int, int]],
) -> Plan:
    """What `rules` delete at `at`, as selects for `planner.plan`; `space` gives the
    filesystem's (free, total) bytes, asked only for `min_free`."""
    recorded = Graph.load(repo)
    live = repo.sum_sizes(BlobState.LIVE)[1]
    replay = Replay(recorded, policy)

    def frees(c: Candidate) -> int:
        if c.tag is not None:
            return recorded.size(replay.delete_tag(c.tag))
        return recorded.size(replay.delete(recorded.untagged[c.digest]))

    budget = None
    if rules.budgeted:
        free, total = space() if rules.min_free is not None else (0, 0)
        budget = Budget(live, free, total, frees)
    choices, met = choose_by_rules(
        candidates(repo, recorded, rules, at), rules, at, grace=policy.grace, budget=budget
    )
    selects = [
        Select(f"tag {c.candidate.tag!r}", tag=c.candidate.tag)
        if c.candidate.tag is not None
        else Select(f"manifest {c.candidate.digest}", digest=c.candidate.digest)
        for c in choices
    ]
    return Plan(choices, selects, met, live)
