"""The small vocabulary every layer shares: what state a blob is in, what a journal
row asks to be done to a file. Standard library only.

A blob's state follows from its count and from where its file is:

    count > 0   file in blobs/              LIVE
                absent, descriptor has urls FOREIGN (a non-distributable layer)
                absent otherwise            MISSING (someone deleted it: reported)
    count = 0   file in blobs/              ORPHAN (never reachable yet: swept after --grace)
                file in .refcount/trash/    TRASH (freed: purged after --trash-ttl)
"""

from __future__ import annotations

from enum import StrEnum


class BlobState(StrEnum):
    LIVE = "live"
    MISSING = "missing"
    FOREIGN = "foreign"
    ORPHAN = "orphan"
    TRASH = "trash"


class FileAction(StrEnum):
    """A file action a committed transaction decided (the journal, SPEC §7)."""

    QUARANTINE = "quarantine"  # blobs/ -> .refcount/trash/
    UNLINK = "unlink"  # out of blobs/ for good (--trash-ttl 0)
    RESTORE = "restore"  # .refcount/trash/ -> blobs/ (a new root needs it)
    PURGE = "purge"  # out of .refcount/trash/ for good


def referenced_state(*, in_blobs: bool, foreign: bool) -> BlobState:
    """The state of a blob with a count above zero, from what the disk shows: the
    one rule for live, foreign and missing, wherever a state is decided."""
    if in_blobs:
        return BlobState.LIVE
    return BlobState.FOREIGN if foreign else BlobState.MISSING
