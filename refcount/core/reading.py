"""The reading use cases: tags, du, show, stats. Each reads in one transaction the
caller opened; none writes."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

from refcount import graph
from refcount.core import planner
from refcount.core.ledger import Ledger
from refcount.core.planner import tag_hint
from refcount.core.policy import Policy, now
from refcount.core.replay import Graph, Replay
from refcount.db.repo import BlobRow, Repo
from refcount.domain import BlobState
from refcount.errors import InvalidDigest, NotFound
from refcount.oci import Digest, usable_tag
from refcount.reports import BlobInfo, Damage, DuReport, Link, Stats, TagInfo, TagUsage
from refcount.store import Store

BITSET_FROM = 64
"""A set of tags holding one blob, larger than this, is also kept as a bitset (`du`)."""


def tags(repo: Repo, *, include_untagged: bool = False) -> list[TagInfo]:
    """Every tag in index.json order, with the bytes of its whole image.

    With `include_untagged`, the untagged entries too (what skopeo re-tagging
    leaves, platform manifests, referrers), so that `delete manifest` can be
    given their digests. Each entry says what relates it to the tagged images:
    the subject it refers to and that subject's tags, and the tags whose image
    (an index) lists it.

    Reads the edges and sizes once and walks each image in memory: one pass over
    the database, however many tags there are.
    """
    recorded = Graph.load(repo)
    children, parents, sizes = recorded.children, recorded.parents, recorded.sizes
    subjects = repo.subjects()
    roots = repo.roots()
    tagged: dict[str, list[tuple[int, str]]] = {}
    for root in roots:
        if root.tag is not None:
            tagged.setdefault(root.digest, []).append((root.position, root.tag))

    def tags_holding(digests: set[str]) -> tuple[str, ...]:
        found = sorted(t for d in digests for t in tagged.get(d, ()))
        return tuple(dict.fromkeys(tag for _, tag in found))

    def above(digest: str) -> set[str]:
        return graph.descendants([digest], lambda d: parents.get(d, ()))

    used = repo.last_used(r.tag for r in roots if r.tag is not None)
    result = []
    for root in roots:
        if root.tag is None and not include_untagged:
            continue
        image = graph.descendants([root.digest], lambda d: children.get(d, ()))
        subject = subjects.get(root.digest)
        result.append(
            TagInfo(
                root.tag,
                root.digest,
                root.media_type,
                sum(sizes.get(d) or 0 for d in image | {root.digest}),
                untagged=root.tag is None,
                subject=subject,
                subject_tags=tags_holding({subject} | above(subject)) if subject else (),
                included_in=tags_holding(above(root.digest) - {root.digest}),
                last_used=None if root.tag is None else used.get(root.tag),
            )
        )
    return result


def du(
    repo: Repo, store: Store, refs: Sequence[str] | None, at: datetime, policy: Policy
) -> DuReport:
    """Each tag's bytes (all tags, or those in `refs`), largest exclusive first, and
    the store's totals. Reads the edges, counts and sizes once and works in memory;
    no blob is read.

    A tag's exclusive bytes are exactly what `delete tag` frees (what its --dry-run
    prints), found by replaying the delete's plan on the counts in memory
    (`replay.Replay`). A blob another entry still holds, tagged or not, is not
    exclusive. A tag's shared bytes are the rest of its image; it
    shares with every other tag whose image holds one of its blobs.

    The totals add up: the exclusive bytes of all tags, plus the bytes that two or
    more tags' images hold (`shared`), plus what only untagged entries keep alive
    (`untagged`: 0 when every entry is tagged) are the referenced bytes, which are
    the live bytes when no referenced blob is missing or foreign. `reclaimable` is
    what gc would free now (see `sweep.collect`): orphans whose first sighting is
    older than the grace period (none while a live manifest is damaged) and
    quarantined blobs freed longer ago than the trash TTL and held by no mass free.
    Each tag lists the `problems` of its image: referenced blobs missing from
    blobs/ (counted in its figures, not on disk) and manifests that could not be
    read (what they hold is unknown; `delete tag` refuses the image), which make
    the report's exit code 1.
    A named ref that is not a tag is NotFound; nothing is reported then.
    """
    recorded = Graph.load(repo)
    by_tag = recorded.by_tag
    for ref in refs or ():
        if ref not in by_tag:
            raise no_such_tag(store, ref, set(by_tag), "du")
    images: dict[str, set[str]] = {}
    holders: dict[str, set[str]] = {}  # digest -> the tags whose image holds it
    for tag, entries in by_tag.items():
        own = {r.digest for r in entries}
        images[tag] = own | recorded.below(own)
        for digest in images[tag]:
            holders.setdefault(digest, set()).add(tag)

    exclusive = {tag: Replay(recorded, policy).delete_tag(tag) for tag in by_tag}
    used = repo.last_used(by_tag)
    # How many other tags share a blob with a tag: the size of the union of the
    # holder sets of its image's shared blobs. Those sets repeat from image to
    # image (every image built on one base holds its layers) and the popular
    # ones are large, so each distinct set is kept once, and a large one (more
    # than BITSET_FROM tags) also as a bitset over the tags: a tag's union is then
    # an OR of a few bitsets and a look at the small sets' few tags, instead of
    # copying sets of up to every tag for every tag (quadratic: 13 s at 10k).
    slot = {tag: i for i, tag in enumerate(by_tag)}
    distinct: dict[frozenset[str], frozenset[str]] = {}
    held_by = {
        d: distinct.setdefault(frozenset(h), frozenset(h)) for d, h in holders.items() if len(h) > 1
    }
    bitsets: dict[frozenset[str], int] = {}

    def bitset(group: frozenset[str]) -> int:
        if group not in bitsets:
            bits = bytearray(len(slot) // 8 + 1)
            for tag in group:
                bits[slot[tag] >> 3] |= 1 << (slot[tag] & 7)
            bitsets[group] = int.from_bytes(bits, "little")
        return bitsets[group]

    def shares_with(image: set[str]) -> int:
        """How many other tags' images hold a blob of `image` (a tag's own)."""
        groups = {held_by[d] for d in image if d in held_by}
        large = [g for g in groups if len(g) > BITSET_FROM]
        union = 0
        for group in large:
            union |= bitset(group)
        rest = {
            t
            for g in groups
            if len(g) <= BITSET_FROM
            for t in g
            if not any(t in big for big in large)
        }
        return max(union.bit_count() + len(rest) - 1, 0)

    troubled = {row.digest: damage(row) for row in repo.troubled()}
    usage = [
        TagUsage(
            tag,
            entries[0].digest,
            recorded.size(images[tag]),
            recorded.size(exclusive[tag]),
            recorded.size(images[tag] - exclusive[tag]),
            shares_with(images[tag]),
            used.get(tag),
            tuple(troubled[d] for d in sorted(images[tag] & troubled.keys())),
        )
        for tag, entries in by_tag.items()
        if refs is None or tag in refs
    ]
    everywhere: set[str] = set().union(*exclusive.values())
    shared = {d for d, held in holders.items() if len(held) > 1}
    rest = set(recorded.sizes) - everywhere - shared
    return DuReport(
        tags=tuple(sorted(usage, key=lambda u: -u.exclusive)),
        live=repo.sum_sizes(BlobState.LIVE)[1],
        shared=recorded.size(shared),
        untagged=recorded.size(rest),
        quarantined=repo.sum_sizes(BlobState.TRASH)[1],
        orphaned=repo.sum_sizes(BlobState.ORPHAN)[1],
        reclaimable=reclaimable(repo, at, policy),
    )


def du_selected(
    repo: Repo, store: Store, refs: Sequence[str], at: datetime, policy: Policy
) -> DuReport:
    """`du REF...`: the figures `du` gives the tags in `refs`, at the cost of their
    images only (milliseconds), never of the whole graph.

    `repo` is a writing transaction the caller rolls back: each tag's exclusive
    set is the plan of `delete tag TAG --dry-run` itself (`planner.plan`, in a
    savepoint undone after it; refusals aside, so a damaged image is measured
    too and listed with its problems), so the two agree by construction. Its
    total is its subtree (a recursive query), shared the rest of it, and it
    shares with the tags whose entries reach one of its blobs (the ancestors
    of its image: bounded by the answer). The store's totals `live`,
    `quarantined`, `orphaned` and `reclaimable` are aggregates of the blob rows;
    `shared` and `untagged` need every image, and are None (not computed).
    """
    wanted = list(dict.fromkeys(refs))
    entries = {tag: repo.roots_where(tag=tag) if usable_tag(tag) else [] for tag in wanted}
    for tag, rows in entries.items():
        if not rows:
            raise no_such_tag(store, tag, {r.tag for r in repo.roots()}, "du")
    used = repo.last_used(wanted)
    usage = []
    for tag, rows in entries.items():
        with repo.undone():
            ledger = Ledger(repo, store, policy, now=at)
            planner.plan(ledger, [planner.Select(f"tag {tag!r}", tag=tag)], None, refuse=False)
            exclusive = {b.digest: b.size or 0 for b in ledger.freed}
        own = {r.digest for r in rows}
        image = own | repo.below(own)
        found = repo.blobs_in(image)
        sizes = {d: found[d].size or 0 if d in found else 0 for d in image}
        usage.append(
            TagUsage(
                tag,
                rows[0].digest,
                sum(sizes.values()),
                sum(exclusive.values()),
                sum(size for d, size in sizes.items() if d not in exclusive),
                len(repo.tags_reaching(image) - {tag}),
                used.get(tag),
                tuple(damage(found[d]) for d in sorted(found) if troubled(found[d])),
            )
        )
    return DuReport(
        tags=tuple(sorted(usage, key=lambda u: -u.exclusive)),
        live=repo.sum_sizes(BlobState.LIVE)[1],
        shared=None,
        untagged=None,
        quarantined=repo.sum_sizes(BlobState.TRASH)[1],
        orphaned=repo.sum_sizes(BlobState.ORPHAN)[1],
        reclaimable=reclaimable(repo, at, policy),
    )


def troubled(row: BlobRow) -> bool:
    """A referenced blob missing from blobs/ or that could not be read (`Repo.troubled`)."""
    return row.count > 0 and (row.state is BlobState.MISSING or row.problem is not None)


def damage(row: BlobRow) -> Damage:
    """What a missing or unreadable blob means for the figures of the images holding it."""
    if row.problem is not None:
        return Damage(
            row.digest,
            "damaged",
            f"{row.problem.removeprefix(row.digest + ': ')}: what it holds is unknown "
            "and left out of the figures; "
            "`delete tag` refuses this image",
        )
    return Damage(
        row.digest,
        "missing",
        "referenced but not in blobs/: its bytes are counted but are not on disk",
    )


def reclaimable(repo: Repo, at: datetime, policy: Policy) -> int:
    """The bytes gc would free at `at` by the rules of `sweep.collect`, from the rows."""
    orphans = [] if repo.count_problems() else repo.blobs_with_state(BlobState.ORPHAN)
    trash = repo.blobs_with_state(BlobState.TRASH)
    leased = repo.leased([r.digest for r in (*orphans, *trash)], at)
    swept = {
        r.digest: r.size or 0
        for r in orphans
        if at - r.first_seen >= policy.grace and r.digest not in leased
    }
    held = {m.at for m in repo.held_mass_frees(at)}
    purged = {
        r.digest: r.size or 0
        for r in trash
        if r.freed_at is not None
        and r.digest not in leased
        and at - r.freed_at >= policy.trash_ttl
        and r.freed_at not in held
        and r.digest not in swept
    }
    return sum(swept.values()) + sum(purged.values())


def show(repo: Repo, store: Store, ref: str) -> BlobInfo:
    """Why a blob (a digest, or the manifest a tag points at) is alive."""
    digest = resolve(repo, store, ref)
    row = repo.blob(digest)
    if row is None:
        raise NotFound(f"{ref}: no such blob in the database")
    return BlobInfo(
        digest=digest,
        count=row.count,
        state=row.state,
        size=row.size,
        media_type=row.media_type,
        tags=tuple(r.tag or "" for r in repo.roots_where(digest=digest)),
        parents=tuple(Link(p, k) for p, k in sorted(repo.parents(digest))),
        children=tuple(Link(c, k) for c, k in sorted(repo.children(digest))),
        subject=row.subject,
        problem=row.problem,
        leases=tuple(repo.leases_of(digest)),
    )


def resolve(repo: Repo, store: Store, ref: str) -> str:
    """The digest a tag names, or `ref` itself when it is a digest."""
    if not ref:
        raise NotFound("empty tag: name a tag or a digest (see refcount tags)")
    if not usable_tag(ref):
        raise NotFound(f"{ref!a}: no such tag in {store.index_path}")
    if ":" in ref and ref.split(":", 1)[0] in ("sha256", "sha512"):
        return str(Digest.parse(ref))
    roots = repo.roots_where(tag=ref)
    if roots:
        return roots[0].digest
    try:
        return str(Digest.parse(ref))
    except InvalidDigest:
        raise no_such_tag(store, ref, {r.tag for r in repo.roots()}, "show") from None


def no_such_tag(store: Store, ref: str, tags: set[str | None], command: str) -> NotFound:
    """The error for a tag that is not in index.json, with what was meant if it can say."""
    if not ref:
        return NotFound("empty tag: name a tag or a digest (see refcount tags)")
    if not usable_tag(ref):
        return NotFound(f"{ref!a}: no such tag in {store.index_path}")
    hint = tag_hint(store, ref, tags, command)
    return NotFound(f"{ref}: no such tag in {store.index_path}" + (f"; {hint}" if hint else ""))


def stats(repo: Repo) -> Stats:
    live = repo.sum_sizes(BlobState.LIVE)
    trash = repo.sum_sizes(BlobState.TRASH)
    return Stats(
        roots=repo.count_roots(),
        live_blobs=live[0],
        live_bytes=live[1],
        missing_blobs=repo.sum_sizes(BlobState.MISSING)[0],
        orphan_blobs=repo.sum_sizes(BlobState.ORPHAN)[0],
        quarantined_blobs=trash[0],
        quarantined_bytes=trash[1],
        problems=repo.count_problems(),
        mass_free_held_blobs=len(held_blobs(repo)) if trash[0] else 0,
    )


def held_blobs(repo: Repo) -> list[str]:
    """Quarantined blobs that gc keeps because a mass free still holds them."""
    held = {m.at for m in repo.held_mass_frees(now())}
    if not held:
        return []
    return [r.digest for r in repo.blobs_with_state(BlobState.TRASH) if r.freed_at in held]
