"""The reading use cases: tags, show, stats. Each reads in one transaction the
caller opened; none writes."""

from __future__ import annotations

from refcount import graph
from refcount.core.planner import tag_hint
from refcount.core.policy import now
from refcount.db.repo import Repo
from refcount.domain import BlobState
from refcount.errors import InvalidDigest, NotFound
from refcount.oci import Digest, usable_tag
from refcount.reports import BlobInfo, Link, Stats, TagInfo
from refcount.store import Store


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
    children: dict[str, list[str]] = {}
    parents: dict[str, list[str]] = {}
    for parent, child in repo.all_edges():
        children.setdefault(parent, []).append(child)
        parents.setdefault(child, []).append(parent)
    sizes = repo.sizes()
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
            )
        )
    return result


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
        hint = tag_hint(store, ref, {r.tag for r in repo.roots()}, "show")
        raise NotFound(
            f"{ref}: no such tag in {store.index_path}" + (f"; {hint}" if hint else "")
        ) from None


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
