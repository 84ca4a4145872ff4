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
PUSH = "push"
"""Blobs a push is copying, under STATE_DIR: push/<lease>/<alg>-<hex> until renamed into blobs/."""
LOCK = "lock"
DAEMON_PID = "watch.pid"
SOCKET = "refcount.sock"
STORE_ID = "store-id"
LAST_REWRITE = "last-rewrite"
DATABASE = "refcount.db"
POLICY = "policy.toml"
"""The retention policy `refcount prune` applies when given no policy flags."""

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


# --- the layout's own files -------------------------------------------------------
def index_path(store: Path) -> Path:
    return store / INDEX


def oci_layout_path(store: Path) -> Path:
    return store / OCI_LAYOUT


def blobs_dir(store: Path) -> Path:
    return store / BLOBS


def algorithm_dirs(store: Path) -> tuple[Path, ...]:
    """blobs/<alg>/ for every algorithm refcount builds paths for: where they exist,
    they must be real directories, or every blob path built below them leads elsewhere."""
    return tuple(blobs_dir(store) / algorithm for algorithm in HEX_LENGTH)


def blob_path(store: Path, algorithm: str, encoded: str) -> Path:
    """blobs/<algorithm>/<encoded>; ValueError for anything `is_blob_name` refuses,
    so no path is ever built from an unchecked name."""
    return blobs_dir(store) / _checked(algorithm, encoded)


# --- refcount's state -------------------------------------------------------------
def trash_dir(store: Path) -> Path:
    return state_path(store, TRASH)


def trashed_path(store: Path, algorithm: str, encoded: str) -> Path:
    """Where the quarantine keeps a freed blob: trash/<algorithm>/<encoded>."""
    return trash_dir(store) / _checked(algorithm, encoded)


def temp_dir(store: Path) -> Path:
    return state_path(store, TMP)


def push_dir(store: Path) -> Path:
    return state_path(store, PUSH)


_LEASE = re.compile(r"[0-9a-f]{32}")


def is_lease_name(name: str) -> bool:
    """Whether `name` is a lease id (32 lowercase hex): the only names push/ holds."""
    return _LEASE.fullmatch(name) is not None


def staging_dir(store: Path, lease: str) -> Path:
    """push/<lease>/: where one push stages the blobs it copies."""
    if not is_lease_name(lease):
        raise ValueError(f"{lease!r}: not a lease id")
    return push_dir(store) / lease


def staged_path(store: Path, lease: str, algorithm: str, encoded: str) -> Path:
    checked = _checked(algorithm, encoded)
    return staging_dir(store, lease) / f"{checked.parent}-{checked.name}"


def state_dirs(store: Path) -> tuple[Path, ...]:
    """STATE_DIR and the directories in it, parents first (the order to make them in)."""
    return state_path(store), trash_dir(store), temp_dir(store)


def index_temp(store: Path, pid: int) -> Path:
    """The temporary file a new index.json is written to before it is renamed over it."""
    return temp_dir(store) / f"{INDEX}.{pid}"


def identity_path(store: Path) -> Path:
    return state_path(store, STORE_ID)


def identity_temp(store: Path, pid: int) -> Path:
    """Beside STORE_ID, so that it can be hard-linked into place."""
    return state_path(store, f"{STORE_ID}.{pid}.tmp")


def policy_path(store: Path) -> Path:
    return state_path(store, POLICY)


def last_rewrite_path(store: Path) -> Path:
    return state_path(store, LAST_REWRITE)


def lock_path(store: Path) -> Path:
    """The advisory lock refcount writers serialize on."""
    return state_path(store, LOCK)


def daemon_pid_path(store: Path, run_dir: Path | None = None) -> Path:
    """The watch daemon's lock, which holds its pid (in `run_dir` when it has one)."""
    return run_dir / DAEMON_PID if run_dir is not None else state_path(store, DAEMON_PID)


def socket_path(store: Path, run_dir: Path | None = None) -> Path:
    """The daemon's command socket (in `run_dir` when it has one)."""
    return run_dir / SOCKET if run_dir is not None else state_path(store, SOCKET)


def directories_to(store: Path, path: Path) -> tuple[Path, ...]:
    """The directories from just below `store` down to `path`'s parent, parents first:
    what must each be a real directory (not a link) for `path` to lie inside the store,
    and the order to make them in, one level at a time. `path` must lie below `store`."""
    parts = path.relative_to(store).parts[:-1]
    return tuple(store.joinpath(*parts[: i + 1]) for i in range(len(parts)))


def _checked(algorithm: str, encoded: str) -> Path:
    if not is_blob_name(algorithm, encoded):
        raise ValueError(f"{algorithm}:{encoded}: not a digest refcount builds paths for")
    return Path(algorithm, encoded)


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
    if where == index_path(store):
        return IndexFile()
    if where.parent.parent != blobs_dir(store):
        return None
    algorithm, encoded = where.parent.name, where.name
    return BlobFile(f"{algorithm}:{encoded}") if is_blob_name(algorithm, encoded) else None


def is_blob_dir(store: Path, path: str | Path) -> bool:
    """blobs/ itself or blobs/<alg>/: when one moves or goes, every blob may have."""
    where = Path(path)
    return where == blobs_dir(store) or where.parent == blobs_dir(store)
