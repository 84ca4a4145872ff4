"""The deletion planner: which entries a delete removes, what it frees, whether it
may, and the rewrite of index.json that carries it out.

Cost: the deleted image's subtree and its ancestors' rows, plus reading and
writing index.json's bytes once (the entries are cut out by their recorded byte
spans; the rest of the file is not parsed while the database is current).

How a rewrite stays O(what is deleted) in the database and O(file) only in bytes:

- **One read.** The snapshot comes from `Store.read_index`, which knows the hash of
  the version of index.json it last read or wrote by its fingerprint (inode, size,
  mtime, ctime), and hands the held snapshot out again to the check before the swap
  in `Store.replace_index`; the RENAME_EXCHANGE check compares the inode swapped
  out. A fingerprint taken in the file clock's current tick proves nothing (a
  same-size write in that tick keeps it), so then the bytes are hashed, as before.
  The new bytes are written from the kept slices and hashed once, in memory.
- **No span shifted.** Entries keep the spans recorded at the last parse (or append);
  each delete adds its cut ranges to `index_cuts`, and spans are read through that
  log (`oci.CutLog`: a binary search per offset). The kept entries' rows are not
  touched; the log is folded into the spans (one UPDATE) every COMPACT_AT cuts and
  whenever index.json is parsed again after an outside change.
- **One rewrite for many entries.** `rewrite_index` takes every removed entry of a
  plan (a batch of tags, a prune, a group of daemon-served deletes) and any appended
  ones (a push) and writes the file once, in one transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from refcount import graph
from refcount.core.ledger import Ledger
from refcount.db.repo import Repo, RootRow
from refcount.errors import ConcurrentChange, DeleteRefused, NotFound, UnusableTag
from refcount.oci import (
    CutLog,
    Removal,
    append_entries,
    cuts,
    entry_tag,
    kept_pieces,
    parse_index,
    usable_tag,
)
from refcount.store import IndexSnapshot, Store, crash_point


@dataclass(frozen=True)
class Select:
    """Which index.json entries a delete names, and how messages call them."""

    what: str  # "tag 'a'", "manifest sha256:..."
    tag: str | None = None
    digest: str | None = None

    @property
    def kind(self) -> str:
        return "tag" if self.tag is not None else "manifest"


def plan(
    ledger: Ledger,
    selects: list[Select],
    snapshot: IndexSnapshot | None,
    *,
    refuse: bool = True,
) -> list[RootRow]:
    """Release the entries the `selects` name, the untagged children only they reach
    and (cascading) the untagged referrers of what is freed; journal the frees.
    Returns the entries to cut out of index.json, in file order: several deletes
    are one plan, so they cost one transaction and one rewrite.

    Every select must name an entry (NotFound naming each that does not: nothing
    is deleted). Refuses (DeleteRefused) an image holding a damaged blob, and any
    free while a live manifest could not be read at all (what it needs is unknown);
    with `refuse` False (`du`, which reports those images' problems instead, and
    rolls the plan back) it plans them all the same. `snapshot` (None: the caller
    checked that every select names an entry) explains a select that names none.
    """
    repo, policy = ledger.repo, ledger.policy
    removed: dict[int, RootRow] = {}
    unknown = []
    for select in selects:
        named = (
            repo.roots_where(tag=select.tag, digest=select.digest)
            if select.tag is None or usable_tag(select.tag)
            else []
        )
        if not named:
            unknown.append(select)
        if refuse:
            refuse_damaged(repo, {r.digest for r in named}, select.what)
        removed.update((r.position, r) for r in named)
    if len(unknown) == 1 and snapshot is not None:
        explain_not_found(ledger.store, snapshot, unknown[0])
    if unknown:
        names = ", ".join(ascii(s.tag) if s.tag is not None else s.what for s in unknown)
        raise NotFound(f"{names}: no such tags in {ledger.store.index_path}; nothing deleted")
    what = ", ".join(s.what for s in selects)
    if not policy.keep_untagged:
        removed.update((r.position, r) for r in untagged_children(repo, removed))
    freed = ledger.release(r.digest for r in removed.values())
    while freed and not policy.keep_referrers:
        referrers = [
            r
            for r in repo.roots_where(digests=repo.referrers_of(freed), untagged=True)
            if r.position not in removed
        ]
        removed.update((r.position, r) for r in referrers)
        freed = ledger.release(r.digest for r in referrers)
    ledger.dispose()  # refcount's own deletes are never a mass free
    blind = repo.blind_manifests() if ledger.freed and refuse else []
    if blind:
        raise DeleteRefused(
            f"{what}: not deleted: live manifests {', '.join(blind)} could not be read, "
            "so the blobs they need are unknown; fix or delete them first"
        )
    return sorted(removed.values(), key=lambda r: r.position)


def refuse_damaged(repo: Repo, roots: set[str], what: str) -> None:
    """Refuse to delete an image whose own manifests could not be parsed.

    Their children were never counted, so freeing would leave them behind (or,
    worse, a later repair could count them differently); the user fixes or
    removes the broken blob first. Cost: the image's own subtree.
    """
    below = graph.descendants(roots, lambda d: [c for c, _ in repo.children(d)])
    for row in repo.blobs_in(below | roots).values():
        if row.problem is not None:
            raise DeleteRefused(
                f"{what}: not deleted: its image holds a damaged blob: {row.problem}"
            )


def untagged_children(repo: Repo, removed: dict[int, RootRow]) -> list[RootRow]:
    """Untagged entries below the deleted roots that no remaining tagged root reaches.

    Cost: the deleted image's subtree, and the ancestors of each candidate.
    """
    deleted = {r.digest for r in removed.values()}
    below = graph.descendants(deleted, lambda d: [c for c, _ in repo.children(d)])

    def tagged_and_kept(digest: str) -> bool:
        return any(
            r.tag is not None and r.position not in removed for r in repo.roots_where(digest=digest)
        )

    return [
        r
        for r in repo.roots_where(digests=below, untagged=True)
        if r.position not in removed
        and not graph.reachable_from_any(
            r.digest, tagged_and_kept, lambda d: [p for p, _ in repo.parents(d)]
        )
    ]


COMPACT_AT = 256
"""Cuts kept in `index_cuts` before they are folded into the recorded spans: one
pass over the roots every this many removed runs, instead of one per delete."""


def rewrite_index(
    repo: Repo,
    store: Store,
    snapshot: IndexSnapshot,
    removed: list[RootRow],
    appended: Sequence[dict[str, Any]] = (),
) -> list[RootRow]:
    """Cut the removed entries out of index.json's bytes, add the `appended` entries
    at the end (a push), and replace the file; returns the rows of the added entries.

    The spans come from the database; each is checked to still hold the entry it
    should before anything is written (ConcurrentChange makes the caller start
    over with a fresh parse). The roots recorded follow the new file without
    parsing it, and without touching the rows of the entries kept: cut entries
    go, the cuts are logged (the later spans are read through the log), added
    entries get their spans in the log's coordinates.
    """
    log = repo.cut_log()
    ranges = cut_ranges(repo, store, snapshot, removed, log)
    pieces = kept_pieces(snapshot.data, ranges)
    data: bytes | list[memoryview] = pieces  # written as they are: no copy
    cut = log.cut(ranges)
    positions = [r.position for r in removed]
    added: list[RootRow] = []
    anew = False
    if appended:
        last = repo.last_root()
        after = log.current(last[1]) if last is not None and last[1] is not None else None
        data, spans = append_entries(
            b"".join(pieces), list(appended), str(store.index_path), None if removed else after
        )
        # With no entry left, append_entries writes the index anew: its spans start
        # a fresh coordinate space, and the cuts (of rows all gone) no longer apply.
        anew = not repo.roots_remain(positions)
        place = (lambda offset: offset) if anew else cut.recorded
        base = (last[0] if last is not None else -1) + 1
        added = [
            RootRow(
                base + i,
                e["digest"],
                entry_tag(e),
                e.get("mediaType"),
                e.get("size"),
                place(start),
                place(start) + end - start,
            )
            for i, (e, (start, end)) in enumerate(zip(appended, spans, strict=True))
        ]
    crash_point("delete-before-index")
    repo.confirm_store_lock()
    new_hash = store.replace_index(data, snapshot.hash)
    repo.delete_roots(positions)
    if anew:
        repo.clear_cuts()
    else:
        repo.record_cuts(log, cut)
    repo.insert_roots(added)
    if len(cut) >= COMPACT_AT:
        repo.compact_cuts()
    repo.set_index_hash(new_hash)
    return added


def cut_ranges(
    repo: Repo, store: Store, snapshot: IndexSnapshot, removed: list[RootRow], log: CutLog
) -> list[tuple[int, int]]:
    """The byte ranges of index.json that hold the removed entries (and their commas),
    highest first; ConcurrentChange when a recorded span no longer holds its entry."""
    positions = [r.position for r in removed]
    removals = []
    for root in removed:
        assert root.start is not None and root.end is not None
        start = log.current(root.start)
        end = start + root.end - root.start
        if not _span_holds(snapshot.data, start, end, root.digest):
            repo.set_index_hash("")
            raise ConcurrentChange(f"{store.index_path}: entry moved; re-reading")
        before, after = repo.kept_neighbours(root.start, positions)
        removals.append(
            Removal(
                start,
                end,
                None if before is None else log.current(before),
                None if after is None else log.current(after),
            )
        )
    return cuts(removals)


def _span_holds(data: bytes, start: int, end: int, digest: str) -> bool:
    """Whether index.json's bytes at the span are the recorded entry."""
    try:
        entry = json.loads(data[start:end])
    except ValueError:
        return False
    return isinstance(entry, dict) and entry.get("digest") == digest


def explain_not_found(store: Store, snapshot: IndexSnapshot, select: Select) -> NoReturn:
    """The error for a delete that names no entry, saying what was meant if it can."""
    target = select.tag if select.tag is not None else select.digest or ""
    index = parse_index(snapshot.data, str(store.index_path))
    for problem in index.problems:
        if problem.tag == target:
            raise UnusableTag(str(problem))
    if select.kind == "tag" and not target:
        raise NotFound("empty tag: name a tag (see refcount tags)")
    shown = target if target.isprintable() else ascii(target)
    hint = None
    if select.kind == "tag":
        hint = tag_hint(store, target, {r.tag for r in index.roots}, "delete tag")
    raise NotFound(
        f"{shown}: no such {select.kind} in {store.index_path}" + (f"; {hint}" if hint else "")
    )


def tag_hint(store: Store, ref: str, tags: set[str | None], command: str) -> str | None:
    """What the user may have meant by a tag that does not exist, or None.

    A digest given as a tag (`delete tag sha256:...`), and umoci's `LAYOUT:TAG`
    form: `L:b` where L is this store (by path or by name) and b one of its
    tags, or L another directory holding an OCI layout.
    """
    prefix, colon, rest = ref.partition(":")
    if not colon or not rest or not ref.isprintable():
        return None
    if prefix in ("sha256", "sha512"):
        return (
            f"to delete by digest: refcount delete manifest {ref}"
            if command == "delete tag"
            else None
        )
    try:
        here = prefix == store.path.name or Path(prefix).resolve() == store.path
        elsewhere = not here and (Path(prefix) / "oci-layout").is_file()
    except (OSError, ValueError):
        return None
    if (here and rest in tags) or elsewhere:
        return f"did you mean: refcount --store {prefix} {command} {rest}?"
    return None
