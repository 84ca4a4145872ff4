"""The journal: file actions decided by committed transactions, carried out after.

Every writing operation journals the file actions it decides in its own
transaction (the ledger does); `settle` carries them out once it has committed,
re-checking each against the committed state, so replaying it is harmless. A
process killed at any instant leaves rows that the next start's `recover`
finishes (SPEC §7).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from refcount import interrupts
from refcount.db.engine import Engine, transaction
from refcount.db.repo import BlobRow, Repo
from refcount.domain import BlobState, FileAction
from refcount.store import Store, crash_point

log = logging.getLogger(__name__)


def recover(engine: Engine, store: Store, catch_up: Callable[[Repo], object]) -> None:
    """At the start of every writing operation: finish what a dead process left.

    index.json is caught up first (`catch_up`, in the same transaction), because
    an outside tool may have listed an image again while the journal waited: its
    blobs must be counted before a pending unlink or quarantine is re-checked.
    Called with the store's lock held.
    """
    store.clear_temp()
    with interrupts.deferred():
        with transaction(engine) as repo:
            if not repo.pending_actions():
                return
            catch_up(repo)
        settle(engine, store)


def settle(engine: Engine, store: Store) -> None:
    """Carry out the file actions committed transactions decided; idempotent.

    The rows are claimed (`FOR UPDATE SKIP LOCKED`) and the blob rows they name
    locked, so a worker never carries out an action another is carrying out, and
    no transaction re-references a blob between the re-check and the unlink.
    """
    with transaction(engine) as repo:
        actions = repo.pending_actions(claim=True)
        if not actions:
            return
        rows = repo.blobs_in((a.digest for a in actions), lock=True)
        for action in actions:
            if still_wanted(action.action, rows.get(action.digest)):
                repo.confirm_store_lock()
                _carry_out(store, action.action, action.digest)
            crash_point("settle-between-actions")
        repo.finish_actions(a.id for a in actions)


def still_wanted(action: FileAction, row: BlobRow | None) -> bool:
    """Whether the committed state still asks for `action` (a later transaction may
    have revived, restored or re-freed the blob since it was journalled)."""
    match action:
        case FileAction.QUARANTINE:
            return row is not None and row.state is BlobState.TRASH
        case FileAction.UNLINK:
            return row is None
        case FileAction.RESTORE:
            return row is not None and row.count > 0
        case FileAction.PURGE:
            return row is None or row.state is not BlobState.TRASH


def _carry_out(store: Store, action: FileAction, digest: str) -> None:
    """One action; each file it moves or removes is logged (`-vv`): the record that
    several workers never freed one blob twice."""
    match action:
        case FileAction.QUARANTINE:
            done = store.quarantine(digest)
        case FileAction.UNLINK:
            done = store.unlink_blob(digest)
        case FileAction.RESTORE:
            done = store.restore(digest)
        case FileAction.PURGE:
            done = store.purge(digest)
    if done:
        log.debug("journal: %s %s", action.value, digest)
