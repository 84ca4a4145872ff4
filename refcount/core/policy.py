"""What every use case is given: the freeing policy, what changed, progress, the clock."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from refcount.extractors import DEFAULT_TIMEOUT
from refcount.store import DEFAULT_MAX_MANIFEST

REWRITE_ATTEMPTS = 5
"""How often a delete starts over when index.json changes under its rewrite."""
MASS_FREE_HOLD = timedelta(hours=1)
"""How long gc keeps the blobs of a mass free in the quarantine, whatever --trash-ttl says."""
LEASE_TTL = timedelta(hours=1)
"""How long a lease lasts unless its taker says otherwise (containerd's leases expire
too): a writer that crashed pins its blobs no longer than this."""


@dataclass(frozen=True)
class Policy:
    """How a Refcounter frees. Durations are timedeltas."""

    trash_ttl: timedelta = timedelta(minutes=10)
    """How long a freed blob waits in .refcount/trash/ before gc purges it; 0 unlinks at once."""
    grace: timedelta = timedelta(hours=1)
    """How old an orphan (a blob never reachable) must be before gc sweeps it."""
    keep_referrers: bool = False
    """Keep untagged referrers in index.json when their subject is freed."""
    keep_untagged: bool = False
    """Keep untagged entries that only the deleted tag's image reached."""
    max_manifest: int = DEFAULT_MAX_MANIFEST
    """Manifest-like blobs larger than this many bytes are not parsed (reported)."""
    extractor_timeout: timedelta = timedelta(seconds=DEFAULT_TIMEOUT)
    """How long one call of an extractor plug-in may take; its blob is damaged after."""
    mass_free_threshold: float = 0.5
    """An outside change of index.json that frees more than this fraction of the live
    bytes (or removes every root) is a mass free: held in the quarantine (SPEC §7)."""

    @property
    def timeout_seconds(self) -> float:
        return self.extractor_timeout.total_seconds()


@dataclass(frozen=True)
class Changes:
    """What the watcher saw change: index.json, and/or some blob files."""

    index: bool = False
    blobs: frozenset[str] = frozenset()


Progress = Callable[[str, int, int], None]
"""Told (phase, done, total) now and then during long work; the CLI draws a bar."""


def no_progress(_phase: str, _done: int, _total: int) -> None:
    return None


def now() -> datetime:
    return datetime.now(UTC)


def mtime(seconds: float) -> datetime:
    """A file's modification time as an aware UTC datetime."""
    return datetime.fromtimestamp(seconds, UTC)
