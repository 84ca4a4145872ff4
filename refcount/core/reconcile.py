"""Reconcile: bring the database in line with what the disk shows.

`catch_up` applies the difference between the recorded roots and index.json's
(every writing operation starts with it; a no-op costs one hash comparison),
with the safety valve for outside mass deletions. `files_changed` compares blob
files with their rows. Both work in the caller's transaction, through a Ledger.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import replace

from refcount import graph
from refcount.core.ledger import Ledger
from refcount.core.policy import MASS_FREE_HOLD, Changes
from refcount.db.repo import Repo, RootRow
from refcount.domain import BlobState
from refcount.oci import Descriptor, Root, parse_index
from refcount.reports import MassFree, SyncReport
from refcount.store import BlobsStamp, IndexSnapshot
from refcount.units import human_size, plural

log = logging.getLogger("refcount.core")
sync_log = logging.getLogger("refcount.core.sync")
"""What each sync and init did: a line per kind of change at INFO (`-v`), every
digest at DEBUG (`-vv`). A logger of its own so that the daemon, which logs one
line per batch, can leave these out."""


def catch_up(ledger: Ledger, snapshot: IndexSnapshot) -> tuple[int, int]:
    """Apply the difference between the recorded roots and index.json's; returns
    (entries added, entries removed).

    index.json is parsed only when it changed since the database last applied it
    (or lacks entry spans). Frees are journalled here; an outside change that
    frees much of the store at once is held in the quarantine (`mass_free`).
    """
    repo, store = ledger.repo, ledger.store
    if repo.index_hash() == snapshot.hash and repo.spans_complete():
        return 0, 0
    index = parse_index(snapshot.data, str(store.index_path))
    old = Counter(r.digest for r in repo.roots())
    new = Counter(r.digest for r in index.roots)
    ledger.problems.extend(str(p) for p in index.problems)
    ledger.hint(Descriptor(r.digest, r.media_type, r.size) for r in index.roots)
    added, removed = new - old, old - new
    ledger.acquire(added.elements())
    ledger.release(removed.elements())
    if store.last_rewrite() != snapshot.hash:  # an outside change, not refcount's own
        ledger.mass_free = mass_free(ledger, old.total(), removed.total(), new.total())
    ledger.dispose(hold=ledger.mass_free is not None)
    store_roots(repo, index.roots)
    repo.set_index_hash(snapshot.hash)
    return added.total(), removed.total()


def mass_free(ledger: Ledger, before: int, removed: int, after: int) -> MassFree | None:
    """The safety valve for outside mass deletions (SPEC §7).

    An outside change of index.json that frees more than the threshold of the
    live bytes, or removes every root, is more likely a broken script than a
    wish: its frees are held in the quarantine for MASS_FREE_HOLD whatever
    --trash-ttl says, so restoring index.json brings everything back.
    Cost: one sum over the blobs, only when this change frees files.
    """
    if not ledger.undisposed:
        return None
    freed = sum(ledger.undisposed.values())
    live = ledger.repo.sum_sizes(BlobState.LIVE)[1]  # the freed files still count as live here
    every_root = before > 0 and after == 0
    if not every_root and freed <= ledger.policy.mass_free_threshold * live:
        return None
    blobs = len(ledger.undisposed)
    event = MassFree(ledger.now, ledger.now + MASS_FREE_HOLD, before, removed, blobs, freed, live)
    ledger.repo.add_mass_free(event)
    log.warning(
        "MASS FREE: an outside change of %s removed %d of %d roots and frees %s, "
        "%s of %s live; they are held in %s until %s whatever --trash-ttl says: "
        "to undo, put the old index.json back and run `refcount sync`",
        ledger.store.index_path,
        removed,
        before,
        plural(blobs, "blob"),
        human_size(freed),
        human_size(live),
        ledger.store.trash_dir,
        f"{event.held_until:%Y-%m-%d %H:%M:%S} UTC",
    )
    return event


def store_roots(repo: Repo, roots: Iterable[Root]) -> None:
    """Record index.json's entries, rewriting rows only from the first that differs:
    tools mostly append, so a push costs its new entries, not the whole index.

    The cuts refcount's own deletes logged are folded into the recorded spans first
    (one UPDATE, beside the parse this follows): the file's spans then compare with
    them as they are, and an outside rewrite can move entries anywhere."""
    # Here, not at the top: scan brings its pool of processes (multiprocessing), which
    # a delete, the commonest caller of this module, never needs.
    from refcount.core.scan import root_row

    repo.compact_cuts()
    new = [root_row(r) for r in roots]
    old = repo.roots()
    same = 0
    while same < min(len(old), len(new)) and replace(old[same], position=0) == replace(
        new[same], position=0
    ):
        same += 1
    base = old[same - 1].position + 1 if same else 0
    repo.delete_roots(r.position for r in old[same:])
    repo.insert_roots([replace(r, position=base + i) for i, r in enumerate(new[same:])])


_FILE_EXPECTED = frozenset({BlobState.LIVE, BlobState.ORPHAN})
"""The states whose rows agree with a file in blobs/ (`Ledger.file_changed` leaves
them alone when there is one); every other state agrees with no file."""


def files_changed(ledger: Ledger, changes: Changes | None) -> None:
    """Compare blob files with their rows: those named in `changes`, or all of them."""
    repo, store = ledger.repo, ledger.store
    if changes is None:
        stamp = store.blobs_stamp()  # before the listing: a change during it shows next time
        if stamp is not None and unchanged_since_listed(repo.get_meta(BLOBS_STAMP), stamp):
            return
        listed_at = time.time_ns()
        states = repo.blob_state_values()
        listing = store.compare_blobs(states)
        ledger.problems.extend(str(p) for p in listing.problems)
        expected = {d for d, state in states.items() if state in _FILE_EXPECTED}
        # Per-digest work only where the disk and the rows disagree: rows whose
        # file came or went, and files without a row.
        for digest in sorted((expected ^ listing.known) | listing.new.keys()):
            file = listing.new.get(digest)
            if file is None and digest in listing.known:
                file = store.blob_file(digest)  # its mtime, for a TRASH row; or gone since
            state = states.get(digest)
            ledger.file_changed(digest, None if state is None else BlobState(state), file)
        if stamp is not None:
            repo.set_meta(BLOBS_STAMP, f"{listed_at} {stamp.text}")
        return
    rows = repo.blobs_in(changes.blobs)
    for digest in sorted(changes.blobs):
        row = rows.get(digest)
        ledger.file_changed(digest, row.state if row else None, store.blob_file(digest))


BLOBS_STAMP = "blobs_stamp"
"""A meta key: when blobs/ was last compared in full with the rows, and its stamp
(`Store.blobs_stamp`) just before."""

STAMP_MARGIN_NS = 2_000_000_000
"""How much older than a full compare the newest directory time must be for the
stamp to be trusted: above any file system's timestamp granularity (FAT's 2 s),
so a change made after the listing began cannot carry the time it had before."""


def unchanged_since_listed(recorded: str | None, stamp: BlobsStamp) -> bool:
    """Whether no blob file came or went in blobs/ since the last full compare (its
    rows then still agree with the disk: every row written since was decided from
    the disk, which did not change). A no-op full reconcile is then one lstat per
    directory instead of a listing of every blob file (331k at 100k images).

    Trusted only when the directories were last changed more than STAMP_MARGIN_NS
    before that compare began: a change within the same timestamp tick as the
    one before it would otherwise go unseen. Anything else lists in full.
    """
    if recorded is None:
        return False
    listed_at, _, text = recorded.partition(" ")
    if text != stamp.text or not listed_at.isdigit():
        return False
    return stamp.newest_ns < int(listed_at) - STAMP_MARGIN_NS


def entries_changed(recorded: Iterable[RootRow], current: Iterable[Root]) -> int:
    """How many index.json entries were added or removed since the recorded roots."""
    old = Counter((r.digest, r.tag) for r in recorded)
    new = Counter((r.digest, r.tag) for r in current)
    return (old - new).total() + (new - old).total()


def tags_needing(repo: Repo, digest: str) -> set[str]:
    """The tags whose image holds `digest` (for messages about a missing blob)."""
    ancestors = graph.descendants([digest], lambda d: [p for p, _ in repo.parents(d)])
    return {t for tags in repo.root_tags(ancestors | {digest}).values() for t in tags}


def log_missing(repo: Repo, missing: Iterable[str]) -> None:
    for digest in missing:
        tags = sorted(tags_needing(repo, digest))
        log.warning(
            "%s: referenced blob is missing from blobs/; needed by %s",
            digest,
            ", ".join(tags) or "untagged roots",
        )


def log_sync(what: str, report: SyncReport) -> None:
    """Log what a reconcile did (see `sync_log`)."""
    if not report.changed and not report.problems:
        sync_log.debug("%s: nothing changed", what)
        return
    if report.roots_added or report.roots_removed:
        sync_log.info(
            "%s: index.json: %s added, %d removed",
            what,
            plural(report.roots_added, "root"),
            report.roots_removed,
        )
    if report.became_live:
        sync_log.info("%s: %s became live", what, plural(report.became_live, "blob"))
    if report.freed:
        sync_log.info(
            "%s: %s freed (%s)",
            what,
            plural(len(report.freed), "blob"),
            human_size(report.freed_bytes),
        )
        for blob in report.freed:
            sync_log.debug("%s: freed %s (%s)", what, blob.digest, human_size(blob.size))
    kinds = [
        ("restored", report.restored, "blob restored from the trash", "blobs restored"),
        ("missing", report.missing, "referenced blob missing", "referenced blobs missing"),
        ("found", report.found, "missing blob found again", "missing blobs found again"),
        ("orphan", report.orphans, "new orphan", "new orphans"),
        ("skipped", report.problems, "problem skipped", "problems skipped"),
    ]
    for label, items, singular, several in kinds:
        if items:
            sync_log.info("%s: %s", what, plural(len(items), singular, several))
            for item in items:
                sync_log.debug("%s: %s %s", what, label, item)
