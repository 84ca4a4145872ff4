"""gc: sweep orphans past the grace period, purge quarantined blobs past the TTL."""

from __future__ import annotations

import logging
from datetime import timedelta

from refcount.core.ledger import Ledger
from refcount.core.policy import mtime
from refcount.domain import BlobState, FileAction
from refcount.reports import Aged, GcReport

log = logging.getLogger("refcount.core")


def collect(ledger: Ledger, grace: timedelta, *, dry_run: bool) -> GcReport:
    """Free the orphans older than `grace` and journal the purge of trash older than
    the trash TTL (a mass free's blobs stay until its hold ends), in the ledger's
    transaction. A blob an unexpired lease holds is neither swept nor purged;
    expired leases are cleared (what they held is swept like any orphan). No
    orphan is swept while a live manifest is damaged: it may need them."""
    repo, store, at = ledger.repo, ledger.store, ledger.now
    swept = []
    damaged = repo.count_problems()
    if damaged:
        log.warning(
            "gc: not sweeping orphans while %d live manifests could not be read "
            "(they may need them); see refcount verify",
            damaged,
        )
    orphans = [] if damaged else repo.blobs_with_state(BlobState.ORPHAN)
    trash = repo.blobs_with_state(BlobState.TRASH)
    leased = repo.leased([r.digest for r in (*orphans, *trash)], at)
    for row in orphans:
        file = store.blob_file(row.digest)
        if file is None or at - mtime(file.mtime) < grace or row.digest in leased:
            continue
        swept.append(Aged(row.digest, file.size, (at - mtime(file.mtime)).total_seconds()))
        ledger.free(row.digest)
    ledger.dispose()
    held = {m.at for m in repo.held_mass_frees(at)}
    swept_digests = {a.digest for a in swept}
    purged = []
    for row in trash:
        if row.freed_at is None or at - row.freed_at < ledger.policy.trash_ttl:
            continue
        if row.freed_at in held or row.digest in swept_digests or row.digest in leased:
            continue
        purged.append(Aged(row.digest, row.size or 0, (at - row.freed_at).total_seconds()))
        repo.delete_blob(row.digest)
        repo.add_actions(FileAction.PURGE, [row.digest], at)
    expired = tuple(repo.expired_leases(at))
    repo.clear_expired_leases(at)
    return GcReport(dry_run, tuple(swept), tuple(purged), expired)
