"""The names and path arithmetic of an OCI image layout and of refcount's state in it.

Pure and standard-library only (the daemon client imports it on its fast path):
no file is opened here. Every other module spells a name of the store through
this one: `blobs`, `index.json`, `.refcount` and what lives in it, and the
digest grammar from which blob paths are built (SPEC §1: only sha256 and sha512,
lowercase hex of the exact length).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

OCI_LAYOUT = "oci-layout"
INDEX = "index.json"
BLOBS = "blobs"

STATE_DIR = ".refcount"
"""refcount's own directory inside the store; nothing of refcount's lives elsewhere."""
TRASH = "trash"
"""The quarantine, under STATE_DIR: freed blobs as trash/<alg>/<hex>."""
TMP = "tmp"
"""Temporary files of refcount's own writes, under STATE_DIR (cleared at every start)."""
LOCK = "lock"
DAEMON_PID = "watch.pid"
SOCKET = "refcount.sock"
STORE_ID = "store-id"
LAST_REWRITE = "last-rewrite"
DATABASE = "refcount.db"

HEX_LENGTH = {"sha256": 64, "sha512": 128}
"""The digest algorithms refcount builds paths for, and their encoded length."""
DIGEST_PATTERN = "|".join(f"{alg}:[0-9a-f]{{{n}}}" for alg, n in HEX_LENGTH.items())
"""A digest refcount accepts, as a regular expression (no anchors)."""
_ENCODED = {alg: re.compile(f"[0-9a-f]{{{n}}}") for alg, n in HEX_LENGTH.items()}


def is_blob_name(algorithm: str, encoded: str) -> bool:
    """Whether blobs/<algorithm>/<encoded> names a blob (not a tool's temp file or junk)."""
    pattern = _ENCODED.get(algorithm)
    return pattern is not None and pattern.fullmatch(encoded) is not None


def state_path(store: Path, *names: str) -> Path:
    """A path inside the store's STATE_DIR."""
    return store.joinpath(STATE_DIR, *names)


def default_database(store: Path) -> Path:
    """The SQLite file a store's counts live in unless --db says otherwise."""
    return state_path(store, DATABASE)


@dataclass(frozen=True)
class IndexFile:
    """What `classify` says of index.json."""


@dataclass(frozen=True)
class BlobFile:
    """What `classify` says of a blob file: its digest."""

    digest: str


def classify(store: Path, path: str | Path) -> IndexFile | BlobFile | None:
    """What `path` is to the store, by name only: index.json, a blob file, or
    nothing refcount counts (.umoci-*, oci-put-blob*, .refcount/, junk)."""
    where = Path(path)
    if where == store / INDEX:
        return IndexFile()
    if where.parent.parent != store / BLOBS:
        return None
    algorithm, encoded = where.parent.name, where.name
    return BlobFile(f"{algorithm}:{encoded}") if is_blob_name(algorithm, encoded) else None


def is_blob_dir(store: Path, path: str | Path) -> bool:
    """blobs/ itself or blobs/<alg>/: when one moves or goes, every blob may have."""
    where = Path(path)
    return where == store / BLOBS or where.parent == store / BLOBS
