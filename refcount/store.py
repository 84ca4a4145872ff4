"""All I/O on the OCI layout.

Paths are built only from a validated `Digest`. Files are opened with
O_NOFOLLOW and checked to be regular files, so a symbolic link planted in the
store is never followed out of it, never read and never deleted through. The
directories blob paths are built below (blobs/, blobs/<alg>/, the trash) are
checked with lstat on the way to every blob, and made one level at a time, so
no path is ever built, read or created through a linked directory either; a
store whose blobs/ or blobs/<alg>/ is one is refused when it is opened.
Everything refcount creates, renames or deletes lies in `blobs/` or
`.refcount/`; the one exception is replacing `index.json` itself, which is
written as a temporary file inside `.refcount/` and renamed over it (same
filesystem, so the replacement is atomic).

Every name and path of the layout (blobs/, index.json, .refcount/ and what
lives in it) comes from `refcount.layout`; this module adds the I/O.

index.json is read and hashed only when needed: the store remembers the hash of the
version it last read or wrote under that version's `Fingerprint`, and the snapshot
it last read while its caller still holds it; while the file keeps that fingerprint
the hash is not computed again and the snapshot not read again. Every outside writer
changes the fingerprint (a rename-in brings another inode; an in-place rewrite a new
mtime and ctime), except one writing in the same tick of the file clock as the
recorded version: a fingerprint is therefore trusted only once that clock has
passed its mtime (`trusted`), and otherwise the bytes are hashed as they always were.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import json
import os
import pwd
import re
import stat
import sys
import threading
import time
import weakref
from collections.abc import Callable, Container, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from refcount import layout
from refcount.errors import (
    BlobTooLarge,
    CannotWriteOutput,
    ConcurrentChange,
    InvalidBlob,
    InvalidPolicy,
    InvalidStore,
    StoreBusy,
    StoreNotWritable,
)
from refcount.oci import ContentCheck, Digest, Problem

DEFAULT_MAX_MANIFEST = 4 * 1024 * 1024
POLICY_LIMIT = 1 << 20
"""The largest policy.toml read, in bytes."""
# The names as this module spelled them before refcount.layout; kept for the
# modules that still import them from here.
STATE_DIR = layout.STATE_DIR
IDENTITY_FILE = layout.STORE_ID
LAST_REWRITE = layout.LAST_REWRITE
_IDENTITY = re.compile(r"[0-9a-f]{32}")
CRASH_ENV = "REFCOUNT_CRASH_AT"


def crash_point(name: str) -> None:
    """Fault injection for tests: exit hard (status 137) when REFCOUNT_CRASH_AT names this point.

    The points: sync-before-commit, sync-after-commit (every sync and daemon batch),
    delete-before-index, index-before-rename, delete-before-commit,
    delete-after-commit, settle-between-actions, gc-after-commit, push-after-lease,
    push-mid-copy (after each blob staged), push-before-index, push-before-commit,
    init-mid-load (init's bulk build, its edges written and its blobs not yet).

    A test in the same process can also run code at a point (`at_point`): that is how
    a delete is made to land between a push's decisions and its index.json write.
    """
    hook = _HOOKS.get(name)
    if hook is not None:
        hook()
    if os.environ.get(CRASH_ENV) == name:
        os._exit(137)


_HOOKS: dict[str, Callable[[], None]] = {}


@contextlib.contextmanager
def at_point(name: str, hook: Callable[[], None]) -> Iterator[None]:
    """Run `hook` whenever `crash_point(name)` is reached inside the block (tests)."""
    _HOOKS[name] = hook
    try:
        yield
    finally:
        _HOOKS.pop(name, None)


@dataclass(frozen=True, slots=True)
class BlobFile:
    size: int
    mtime: float


@dataclass(frozen=True)
class BlobListing:
    """What `Store.compare_blobs` found in blobs/."""

    known: set[str]
    """The known digests that are regular files there."""
    new: dict[str, BlobFile]
    """Every other regular blob file, by digest."""
    problems: list[Problem]
    """The entries that are not blobs (ignored)."""


@dataclass(frozen=True)
class BlobsStamp:
    """The modification times of blobs/ and of each directory in it (`Store.blobs_stamp`)."""

    text: str
    newest_ns: int


@dataclass(frozen=True)
class Fingerprint:
    """What `stat` says of one version of index.json: which file, how long, when
    last written and changed. Every outside writer changes it: a rename-in (umoci)
    brings another inode, an in-place rewrite (skopeo) a later mtime and ctime."""

    device: int
    inode: int
    size: int
    mtime_ns: int
    ctime_ns: int

    @classmethod
    def of(cls, info: os.stat_result) -> Fingerprint:
        return cls(info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns, info.st_ctime_ns)

    def same_file(self, info: os.stat_result) -> bool:
        """`info` is this version, by all but its ctime (which a rename updates)."""
        return (info.st_dev, info.st_ino, info.st_size, info.st_mtime_ns) == (
            self.device,
            self.inode,
            self.size,
            self.mtime_ns,
        )


@dataclass(frozen=True)
class IndexSnapshot:
    data: bytes
    hash: str
    fingerprint: Fingerprint | None = None
    """Set when the fingerprint alone tells this version from any later one (see
    `trusted`); None when only the bytes can (the file was written too recently)."""


# CLOCK_REALTIME_COARSE: the clock Linux stamps file times from (5 in <time.h>).
_COARSE_CLOCK: int | None = getattr(
    time, "CLOCK_REALTIME_COARSE", 5 if sys.platform.startswith("linux") else None
)


def _clock_ns() -> int:
    return time.clock_gettime_ns(_COARSE_CLOCK) if _COARSE_CLOCK is not None else time.time_ns()


def trusted(fingerprint: Fingerprint, seen_at_ns: int) -> bool:
    """Whether any write after `seen_at_ns` (the file clock's time when the bytes
    were known to match `fingerprint`) is bound to change the fingerprint.

    A write stamps the file with the file clock's time, rounded down to the
    filesystem's granularity. When that clock has already passed the recorded
    mtime by more than a granule, a later write must stamp a later mtime. When it
    has not (the file was written in this very tick: racy, as git calls it), an
    outside write of the same size in the same tick would look identical, so the
    bytes must be hashed instead. The granularity is guessed from the mtime itself:
    whole seconds mean a coarse filesystem (FAT's 2 s), whole microseconds 10 ms;
    anything finer (ext4, xfs, btrfs, tmpfs) is taken as exact. Without the coarse
    clock (not Linux) two seconds of margin are kept.
    """
    mtime = fingerprint.mtime_ns
    if mtime % 1_000_000_000 == 0:
        granule = 2_000_000_000
    elif mtime % 1_000 == 0:
        granule = 10_000_000
    else:
        granule = 1
    if _COARSE_CLOCK is None:
        granule = max(granule, 2_000_000_000)
    return seen_at_ns >= mtime + granule


class Store:
    """An OCI image layout directory. Construction validates it (SPEC §1)."""

    def __init__(self, path: str | os.PathLike[str], *, max_manifest: int = DEFAULT_MAX_MANIFEST):
        self.path = Path(path).absolute()
        self.max_manifest = max_manifest
        self._blob_dirs: dict[str, int | None] | None = None
        """blobs/<alg>/ opened once per algorithm, within `reading_blobs`."""
        if not self.path.is_dir():
            raise InvalidStore(f"{self.path}: not a directory")
        self._check_layout_file()
        self._regular(self.index_path, layout.INDEX)
        self.check_blob_dirs()
        self.state_dir = layout.state_path(self.path)
        self.trash_dir = layout.trash_dir(self.path)
        self._known: weakref.ref[IndexSnapshot] | None = None
        """The snapshot `read_index` last made, while its caller holds it (a delete,
        until its check before the swap): no copy of index.json outlives its use."""
        self._hashed: tuple[Fingerprint, str] | None = None
        """The trusted fingerprint and the hash of the version last read or written."""

    @property
    def index_path(self) -> Path:
        return layout.index_path(self.path)

    def _regular(self, path: Path, what: str) -> os.stat_result:
        try:
            info = path.lstat()
        except FileNotFoundError:
            raise InvalidStore(f"{path}: {what} is missing: not an OCI layout") from None
        except OSError as exc:
            raise InvalidStore(f"{path}: {what}: {exc.strerror}") from None
        if not stat.S_ISREG(info.st_mode):
            kind = "a symbolic link" if stat.S_ISLNK(info.st_mode) else "not a regular file"
            raise InvalidStore(f"{path}: {what} is {kind}")
        return info

    def _check_layout_file(self) -> None:
        path = layout.oci_layout_path(self.path)
        self._regular(path, layout.OCI_LAYOUT)
        try:
            version = json.loads(_read_nofollow(path, 64 * 1024)).get("imageLayoutVersion")
        except (ValueError, AttributeError, OSError):
            raise InvalidStore(f"{path}: {layout.OCI_LAYOUT} is not valid JSON") from None
        if not isinstance(version, str) or not version.startswith("1."):
            raise InvalidStore(f"{path}: unsupported imageLayoutVersion {version!r}")

    def check_blob_dirs(self) -> None:
        """Refuse a blobs/, blobs/sha256/ or blobs/sha512/ that is a symbolic link or
        not a directory (a missing one is fine: a hand-made empty layout has none).

        Every blob path is built below them. Through a link, refcount would count
        files outside the store, move them into its trash, and make directories
        there to restore one; reading such a store as "no blobs" instead would
        report every blob missing. So it is refused, naming the path, when the
        store is opened, before any command reads or writes anything; `_in` and
        `list_blobs` check again for a store changed since (a daemon runs long).
        Other entries directly under blobs/ hold no path refcount builds: they
        are reported and ignored by `list_blobs`.
        """
        if _real_directory(layout.blobs_dir(self.path)):
            for directory in layout.algorithm_dirs(self.path):
                _real_directory(directory)

    def check_state_dir(self) -> None:
        """Refuse a .refcount that is a link or not a directory (missing is fine)."""
        _real_directory(self.state_dir)

    def ensure_state_dir(self) -> None:
        """Create .refcount/ (and its trash and tmp) as real directories, or refuse."""
        for directory in layout.state_dirs(self.path):
            _make_directory(directory)

    # --- who may change the store -------------------------------------------------
    def writable(self) -> bool:
        """Whether this process may change the store: the layout's directory, and
        blobs/ and .refcount/ where they exist (a read-only mount, another user)."""
        return self._unwritable() is None

    def check_writable(self) -> None:
        """Raise StoreNotWritable, naming the store and why, unless `writable()`."""
        reason = self._unwritable()
        if reason is not None:
            raise StoreNotWritable(
                f"{self.path}: {reason}: this command changes the store "
                "(reading commands such as tags, show and verify work without writing)"
            )

    def check_readable(self) -> None:
        """Refuse, naming the user, a .refcount/ this process may not read (another
        user's store: its database lives there)."""
        state = self.state_dir
        if state.is_dir() and not os.access(state, os.R_OK | os.X_OK):
            raise InvalidStore(
                f"{state}: not readable by user {_user_name(os.geteuid())} (it belongs to "
                f"{_user_name(state.stat().st_uid)}): run refcount as the store's owner"
            )
        database = layout.default_database(self.path)
        if database.is_file() and not os.access(database, os.R_OK):
            raise InvalidStore(
                f"{database}: not readable by user {_user_name(os.geteuid())} (it belongs to "
                f"{_user_name(database.stat().st_uid)}): run refcount as the store's owner"
            )

    def _unwritable(self) -> str | None:
        for path in (self.path, self.state_dir, layout.blobs_dir(self.path)):
            if path.is_symlink() or not path.is_dir():
                continue
            if not os.access(path, os.W_OK | os.X_OK):
                try:
                    if os.statvfs(path).f_flag & os.ST_RDONLY:
                        return "read-only file system"
                except OSError:
                    pass
                return f"{path.name}/ is not writable by user {_user_name(os.geteuid())}" + (
                    f" (it belongs to {_user_name(path.stat().st_uid)})"
                )
        return None

    # --- the store's identity -------------------------------------------------------
    def read_identity(self) -> str | None:
        """The id in .refcount/store-id that databases record for this store; None
        when it has none yet. InvalidStore for a damaged file."""
        if not self._real_state_dir():
            return None
        path = layout.identity_path(self.path)
        try:
            text = _read_nofollow(path, 256).decode("ascii", "replace").strip()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except (OSError, _TooLarge) as exc:
            why = getattr(exc, "strerror", None) or "too large"
            raise InvalidStore(f"{path}: cannot read the store's identity: {why}") from None
        if not _IDENTITY.fullmatch(text):
            raise InvalidStore(f"{path}: not a store identity (32 hex digits)")
        return text

    def _real_state_dir(self) -> bool:
        """.refcount/ exists as a real directory (a link is never followed)."""
        try:
            return stat.S_ISDIR(self.state_dir.lstat().st_mode)
        except OSError:
            return False

    def last_rewrite(self) -> str | None:
        """The hash of the index.json refcount itself last wrote (see `replace_index`)."""
        if not self._real_state_dir():
            return None
        try:
            return _read_nofollow(layout.last_rewrite_path(self.path), 128).decode("ascii").strip()
        except (OSError, _TooLarge, UnicodeDecodeError):
            return None

    def read_policy(self) -> bytes | None:
        """`.refcount/policy.toml`'s bytes, or None when there is none.

        Never follows a symbolic link (the file, or `.refcount/` itself): a link,
        a directory or an unreadable file is InvalidPolicy, so that a policy never
        comes from outside the store. Capped at 1 MiB.
        """
        path = layout.policy_path(self.path)
        if not self.state_dir.exists() and not self.state_dir.is_symlink():
            return None
        if not self._real_state_dir():
            raise InvalidPolicy(f"{path}: {self.state_dir} is not a directory; not followed")
        try:
            return _read_nofollow(path, POLICY_LIMIT)
        except FileNotFoundError:
            return None
        except _TooLarge:
            raise InvalidPolicy(f"{path}: larger than {POLICY_LIMIT} bytes") from None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise InvalidPolicy(f"{path}: is a symbolic link; not followed") from None
            raise InvalidPolicy(f"{path}: cannot read: {exc.strerror}") from None

    def free_space(self) -> tuple[int, int]:
        """(bytes free to an unprivileged writer, bytes in all) of the filesystem
        holding the store's blobs (os.statvfs)."""
        info = os.statvfs(self.path / layout.BLOBS)
        return info.f_bavail * info.f_frsize, info.f_blocks * info.f_frsize

    def claim_identity(self, identity: str) -> str:
        """Give the store `identity` unless it has one already; returns the store's.

        Created exclusively and whole (a temp file linked into place), so racing
        processes on one store all end up with the one that won.
        """
        path = layout.identity_path(self.path)
        temp = layout.identity_temp(self.path, os.getpid())
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "w") as handle:
                handle.write(identity + "\n")
                handle.flush()
                os.fsync(handle.fileno())
            os.link(temp, path)
        except FileExistsError:
            pass
        finally:
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        _fsync_dir(self.state_dir)
        found = self.read_identity()
        assert found is not None
        return found

    def clear_temp(self) -> None:
        """Remove temporary files a dead refcount process left in .refcount/tmp/.

        Called with the store's lock held, when no other refcount writer can be
        in the middle of writing one.
        """
        for entry in os.scandir(layout.temp_dir(self.path)):
            if entry.is_file(follow_symlinks=False):
                os.unlink(entry.path)

    # --- index.json ---------------------------------------------------------
    def read_index(self) -> IndexSnapshot:
        """index.json's bytes and hash. The file is not read again while its fingerprint
        is still that of the snapshot last read (and held), and not hashed while it is
        that of the version last read or written (whose hash is known).

        So a delete reads the file once and hashes only what it writes; its check
        before the swap reads nothing. A fingerprint that is not trusted (racy, see
        `trusted`) is never used: the file is read and hashed, as is any file whose
        fingerprint changed.
        """
        info = self._regular(self.index_path, layout.INDEX)
        known = self._known_snapshot()
        if known is not None and Fingerprint.of(info) == known.fingerprint:
            return known
        try:
            fd = os.open(self.index_path, os.O_RDONLY | os.O_NOFOLLOW)
        except OSError as exc:
            raise InvalidStore(f"{self.index_path}: cannot read: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            seen_at = _clock_ns()
            before = os.fstat(handle.fileno())
            try:
                data = handle.read()
            except OSError as exc:
                raise InvalidStore(f"{self.index_path}: cannot read: {exc.strerror}") from None
            after = os.fstat(handle.fileno())
        if not stat.S_ISREG(before.st_mode):
            raise InvalidStore(f"{self.index_path}: cannot read: not a regular file")
        fingerprint = Fingerprint.of(after)
        steady = Fingerprint.of(before) == fingerprint and len(data) == after.st_size
        hashed = self._hashed
        if steady and hashed is not None and hashed[0] == fingerprint:
            snapshot = IndexSnapshot(data, hashed[1], fingerprint)
        else:
            trust = steady and trusted(fingerprint, seen_at)
            snapshot = IndexSnapshot(
                data, hashlib.sha256(data).hexdigest(), fingerprint if trust else None
            )
            if trust:
                self._hashed = (fingerprint, snapshot.hash)
        self._known = weakref.ref(snapshot)
        return snapshot

    def _known_snapshot(self) -> IndexSnapshot | None:
        return None if self._known is None else self._known()

    def replace_index(self, data: bytes | Sequence[bytes | memoryview], expected_hash: str) -> str:
        """Atomically replace index.json with `data` (bytes, or pieces written in order),
        unless it changed since it was read.

        Raises ConcurrentChange when the file is no longer the version whose hash is
        `expected_hash` (an outside tool wrote it meanwhile); the caller re-reads and
        retries. Outside tools take no lock, so the check and the rename cannot be
        one step; instead the new file is swapped in with RENAME_EXCHANGE and the
        file swapped out is checked: if it is not the version that was read, an
        outside write landed in between, and it is swapped back. Returns the new hash.

        Both checks compare fingerprints when the version read has a trusted one
        (`read_index`), and hash the file otherwise. The new bytes are hashed once,
        from memory, while the kernel writes and syncs them; nothing is read back.
        A writer that puts the old mtime back (`touch -r`) in the instant between
        the check and the swap is seen only when the fingerprint was not trusted:
        the exchange itself changes the ctime that would tell.
        """
        pieces = [data] if isinstance(data, bytes) else list(data)
        known = self._known_snapshot()
        expected = known.fingerprint if known is not None and known.hash == expected_hash else None
        mode = stat.S_IMODE(self.index_path.lstat().st_mode)
        temp = layout.index_temp(self.path, os.getpid())
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
            with _Hashing(pieces) as hashing:
                try:
                    _write_pieces(fd, pieces)
                    os.fsync(fd)
                    written = os.fstat(fd)
                finally:
                    os.close(fd)
            new_hash = hashing.hexdigest
            crash_point("index-before-rename")
            # Tells a later catch-up that this change of index.json was refcount's own
            # (a delete killed before its commit), not an outside mass deletion. Not
            # fsynced: losing it only makes the catch-up more careful.
            _write_small(layout.last_rewrite_path(self.path), new_hash)
            if self.read_index().hash != expected_hash:
                raise ConcurrentChange(
                    f"{self.index_path}: changed while refcount was rewriting it"
                )
            # Until the rename nobody else writes the temp file; from the rename on, a
            # write stamps a later mtime only if the clock has moved past ours by now.
            renamed_at = _clock_ns()
            if _exchange(temp, self.index_path):
                if not self._swapped_out_is(temp, expected, expected_hash):
                    _exchange(temp, self.index_path)
                    raise ConcurrentChange(f"{self.index_path}: written by another tool just now")
            else:
                os.rename(temp, self.index_path)
        finally:
            self._known = None  # the version read is gone (or, on failure, in doubt)
            with contextlib.suppress(FileNotFoundError):
                temp.unlink()
        _fsync_dir(self.path)
        self._remember_written(new_hash, written, renamed_at)
        return new_hash

    def _swapped_out_is(self, path: Path, expected: Fingerprint | None, expected_hash: str) -> bool:
        """Whether the file RENAME_EXCHANGE took out of index.json's place is the
        version read: its inode, size and mtime (the exchange itself changed its
        ctime) when that version's fingerprint is trusted, else its hash."""
        if expected is not None:
            return expected.same_file(path.lstat())
        return hashlib.sha256(_read_nofollow(path, None)).hexdigest() == expected_hash

    def _remember_written(self, new_hash: str, written: os.stat_result, renamed_at: int) -> None:
        """Remember the hash of the version just written under its fingerprint, when
        that fingerprint is trusted (see `trusted`: the clock had passed the temp
        file's mtime at the rename) and index.json is still that file, unchanged."""
        with contextlib.suppress(OSError):
            info = self.index_path.lstat()
            if Fingerprint.of(written).same_file(info) and trusted(
                Fingerprint.of(written), renamed_at
            ):
                self._hashed = (Fingerprint.of(info), new_hash)

    # --- files written for the user -----------------------------------------------
    def write_output(self, path: str | os.PathLike[str], data: bytes) -> Path:
        """Write a file the user asked for (`du --html FILE`) atomically; returns its path.

        The data goes to a temporary file beside it (`.NAME.refcount-PID.tmp`, made
        exclusively, never through a link), is synced, and is renamed over FILE:
        a reader sees the old file or the new one, never half of one, and a
        failed write leaves any existing FILE untouched. FILE itself must not be
        a symbolic link (rename would replace the link, not write where it
        points: refused, so that nobody is surprised either way) nor a directory,
        and must not be one of the store's own files: index.json, oci-layout, or
        anything under blobs/ or .refcount/. CannotWriteOutput, naming FILE, for
        all of these and for any OSError (no such directory, permission denied).
        """
        target = Path(path).absolute()
        try:
            info: os.stat_result | None = target.lstat()
        except FileNotFoundError:
            info = None
        except OSError as exc:
            raise CannotWriteOutput(f"{target}: cannot write: {exc.strerror}") from None
        if info is not None and stat.S_ISLNK(info.st_mode):
            raise CannotWriteOutput(f"{target}: is a symbolic link; not written through")
        if info is not None and not stat.S_ISREG(info.st_mode):
            raise CannotWriteOutput(f"{target}: exists and is not a regular file")
        self._refuse_own_file(target)
        temp = target.with_name(f".{target.name}.refcount-{os.getpid()}.tmp")
        try:
            fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.rename(temp, target)
            _fsync_dir(target.parent)
        except OSError as exc:
            with contextlib.suppress(OSError):
                temp.unlink()
            raise CannotWriteOutput(f"{target}: cannot write: {exc.strerror}") from None
        return target

    def _refuse_own_file(self, target: Path) -> None:
        """CannotWriteOutput when `target` (directories resolved) is one of the store's files."""
        try:
            where = Path(os.path.realpath(target.parent)) / target.name
        except OSError as exc:
            raise CannotWriteOutput(f"{target}: cannot write: {exc.strerror}") from None
        store = Path(os.path.realpath(self.path))
        own = where in (layout.index_path(store), layout.oci_layout_path(store)) or any(
            where.is_relative_to(d) for d in (layout.blobs_dir(store), layout.state_path(store))
        )
        if own:
            raise CannotWriteOutput(
                f"{target}: is the store's own file ({where.relative_to(store)}); "
                "write the report outside blobs/ and .refcount/"
            )

    # --- blobs --------------------------------------------------------------
    def _in(self, path: Path, *, create: bool = False) -> Path | None:
        """`path`, a blob's file in blobs/ or in the trash, when every directory on
        the way is a real one; None when one is missing. A directory on the way
        that is a symbolic link or not a directory is never entered, nor read as
        "absent": InvalidStore names it.

        With `create`, the missing directories are made one level at a time
        (blobs/, then blobs/<alg>/), each checked to be a real directory before
        the next is made in it: nothing is ever created through a link, inside
        the store or out of it.
        """
        for directory in layout.directories_to(self.path, path):
            if create:
                _make_directory(directory)
            elif not _real_directory(directory):
                return None
        return path

    def _blob(self, digest: str, *, create: bool = False) -> Path | None:
        parsed = Digest.parse(digest)
        path = layout.blob_path(self.path, parsed.algorithm, parsed.encoded)
        return self._in(path, create=create)

    def _trashed(self, digest: str, *, create: bool = False) -> Path | None:
        parsed = Digest.parse(digest)
        path = layout.trashed_path(self.path, parsed.algorithm, parsed.encoded)
        return self._in(path, create=create)

    def blob_file(self, digest: str) -> BlobFile | None:
        """The blob's file in blobs/ when it is a regular file; None otherwise."""
        path = self._blob(digest)
        return None if path is None else _regular_file(path)

    def in_trash(self, digest: str) -> bool:
        path = self._trashed(digest)
        return path is not None and _regular_file(path) is not None

    def read_blob(self, digest: str) -> bytes | None:
        """A manifest-like blob's bytes, from blobs/ or else the quarantine; None if absent.

        Raises InvalidBlob for a file that is a link, not regular, unreadable or
        larger than `max_manifest`.
        """
        parsed = Digest.parse(digest)
        if self._blob_dirs is None:
            directory = _open_blob_dir(str(self.path), parsed.algorithm)
        elif parsed.algorithm in self._blob_dirs:
            directory = self._blob_dirs[parsed.algorithm]
        else:
            directory = _open_blob_dir(str(self.path), parsed.algorithm)
            self._blob_dirs[parsed.algorithm] = directory
        try:
            fast = _read_small_blob(directory, parsed.encoded, self.max_manifest)
        finally:
            if self._blob_dirs is None and directory is not None:
                os.close(directory)
        if fast is not None:
            return fast
        for where in (self._blob, self._trashed):  # absent, refused or odd: look closely
            path = where(digest)
            if path is None:
                continue
            try:
                return _read_nofollow(path, self.max_manifest)
            except FileNotFoundError:
                continue
            except _TooLarge:
                raise BlobTooLarge(
                    f"{path}: manifest larger than the {self.max_manifest}-byte limit"
                ) from None
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise InvalidBlob(f"{path}: is a symbolic link; not followed") from None
                raise InvalidBlob(f"{path}: cannot read: {exc.strerror}") from None
        return None

    @contextlib.contextmanager
    def reading_blobs(self) -> Iterator[None]:
        """Within, `read_blob` opens blobs relative to blobs/<alg>/ opened once
        (without following a link) rather than once per read: a scan reads every
        manifest of the store, and the two opens per read were a tenth of it."""
        self._blob_dirs = {}
        try:
            yield
        finally:
            dirs, self._blob_dirs = self._blob_dirs, None
            for fd in dirs.values():
                if fd is not None:
                    os.close(fd)

    def list_blobs(self) -> tuple[dict[str, BlobFile], list[Problem]]:
        """Every regular blob file under blobs/, and the entries that are not blobs."""
        listing = self.compare_blobs(frozenset())
        return listing.new, listing.problems

    def compare_blobs(self, known: Container[str]) -> BlobListing:
        """blobs/ against the digests in `known` (those the database holds): a name in
        `known` is neither validated again nor stat'ed, so a no-op full reconcile
        costs one directory read and a set lookup per file; every other name is
        validated and stat'ed (see `BlobListing`)."""
        listing = BlobListing(set(), {}, [])
        root = layout.blobs_dir(self.path)
        if not _real_directory(root):  # InvalidStore for a link (see check_blob_dirs)
            return listing
        try:
            self._scan_blobs(root, known, listing)
        except OSError as exc:
            raise InvalidStore(f"{exc.filename or root}: cannot list: {exc.strerror}") from None
        return listing

    @staticmethod
    def _scan_blobs(root: Path, known: Container[str], listing: BlobListing) -> None:
        with os.scandir(root) as listed:
            algorithms = list(listed)
        for algorithm in algorithms:
            if algorithm.name in layout.HEX_LENGTH:
                _real_directory(Path(algorithm.path))  # InvalidStore for a link or a file
            elif not algorithm.is_dir(follow_symlinks=False):
                listing.problems.append(Problem(algorithm.path, "not a directory; ignored"))
                continue
            prefix = f"{algorithm.name}:"
            found = listing.known.add
            with os.scandir(algorithm.path) as entries:
                # The loop a no-op sync pays per blob file: one lookup and d_type.
                for entry in entries:
                    name = prefix + entry.name
                    if name in known:
                        if entry.is_file(follow_symlinks=False):  # d_type: no system call
                            found(name)
                        else:
                            listing.problems.append(
                                Problem(entry.path, "not a regular file; ignored")
                            )
                    elif not layout.is_blob_name(algorithm.name, entry.name):
                        listing.problems.append(Problem(entry.path, "not a blob name; ignored"))
                    elif not entry.is_file(follow_symlinks=False):
                        listing.problems.append(Problem(entry.path, "not a regular file; ignored"))
                    else:
                        info = entry.stat(follow_symlinks=False)
                        listing.new[name] = BlobFile(info.st_size, info.st_mtime)

    def blobs_stamp(self) -> BlobsStamp | None:
        """blobs/'s and its directories' modification times; None when they cannot be
        read. Creating, removing or renaming any entry in one of them changes its
        time, so an equal stamp means no blob file came or went in between, provided
        the times were not within the file system's granularity of the earlier look
        (the caller's margin: `refcount.core.reconcile.files_changed`)."""
        root = layout.blobs_dir(self.path)
        try:
            times = [("", os.lstat(root).st_mtime_ns)]
            with os.scandir(root) as listed:
                times += [(e.name, e.stat(follow_symlinks=False).st_mtime_ns) for e in listed]
        except OSError:
            return None
        times.sort()
        return BlobsStamp(" ".join(f"{n}={t}" for n, t in times), max(t for _, t in times))

    def list_trash(self) -> dict[str, BlobFile]:
        found: dict[str, BlobFile] = {}
        if not self.trash_dir.is_dir():
            return found
        for algorithm in os.scandir(self.trash_dir):
            if algorithm.is_dir(follow_symlinks=False):
                for entry in os.scandir(algorithm.path):
                    if entry.is_file(follow_symlinks=False):
                        info = entry.stat(follow_symlinks=False)
                        found[f"{algorithm.name}:{entry.name}"] = BlobFile(
                            info.st_size, info.st_mtime
                        )
        return found

    def blob_digests(self) -> frozenset[str]:
        """The digest of every blob name in blobs/ and in the quarantine (no stat:
        one directory read per algorithm), for salvaging a damaged binary blob."""
        found: set[str] = set()
        for algorithm in layout.HEX_LENGTH:
            for directory in (
                layout.blobs_dir(self.path) / algorithm,
                self.trash_dir / algorithm,
            ):
                if self._in(directory / "entry") is None:  # a missing directory on the way
                    continue
                with contextlib.suppress(OSError):
                    found.update(
                        f"{algorithm}:{name}"
                        for name in os.listdir(directory)
                        if layout.is_blob_name(algorithm, name)
                    )
        return frozenset(found)

    def quarantine(self, digest: str) -> bool:
        """Move a blob out of blobs/ into the trash; False when it was not there."""
        source = self._blob(digest)
        if source is None or _regular_file(source) is None:
            return False
        target = self._trashed(digest, create=True)
        assert target is not None
        os.rename(source, target)
        return True

    def restore(self, digest: str) -> bool:
        """Move a quarantined blob back into blobs/; False when it is not in the trash."""
        source = self._trashed(digest)
        if source is None or _regular_file(source) is None:
            return False
        target = self._blob(digest, create=True)
        assert target is not None
        if _regular_file(target) is not None:  # someone wrote it again meanwhile
            source.unlink()
            return True
        os.rename(source, target)
        return True

    def unlink_blob(self, digest: str) -> bool:
        path = self._blob(digest)
        return path is not None and _unlink_regular(path)

    def purge(self, digest: str) -> bool:
        path = self._trashed(digest)
        return path is not None and _unlink_regular(path)

    def read_chunks(self, digest: str, size: int = 1 << 20) -> Iterator[bytes]:
        """A blob's bytes from blobs/ in chunks, however large (for salvaging digests)."""
        path = self._blob(digest)
        if path is None:
            return
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        with os.fdopen(fd, "rb") as handle:
            while chunk := handle.read(size):
                yield chunk

    def hash_blob(self, digest: str) -> str | None:
        """The hex digest of a blob's bytes under its own algorithm; None if unreadable."""
        return hash_files(str(self.path), [digest], None, True)[0]

    def hash_batch(
        self, digests: Sequence[str], deadline: float | None = None, *, first: bool = True
    ) -> list[str | None]:
        """The hex digests of `digests`' blob files (see `hash_files`), done in this
        process: the unit of work of `refcount.core.scan`'s pool of processes."""
        return hash_files(str(self.path), list(digests), deadline, first)

    # --- staging (push) -------------------------------------------------------
    def stage_blob(
        self, lease: str, digest: str, size: int | None, chunks: Iterable[bytes], what: str
    ) -> int:
        """Write a blob's bytes to push/<lease>/, checking them against `digest` and
        `size` while they stream; returns the bytes written.

        CorruptBlob (naming `what` and the digest) when they do not match; the
        temporary file is then removed, so nothing of the blob is left. Nothing
        is written to blobs/ here: `commit_staged` renames the file in.
        """
        parsed = Digest.parse(digest)
        self.ensure_state_dir()
        _make_directory(layout.push_dir(self.path))
        _make_directory(layout.staging_dir(self.path, lease))
        path = layout.staged_path(self.path, lease, parsed.algorithm, parsed.encoded)
        check = ContentCheck(digest, size, what)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o644)
        try:
            with os.fdopen(fd, "wb") as handle:
                for chunk in chunks:
                    check.update(chunk)
                    handle.write(chunk)
                check.finish()
                handle.flush()
                os.fsync(handle.fileno())
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()
            raise
        written = check.length
        return written

    def commit_staged(self, lease: str, digest: str) -> None:
        """Rename a staged blob into blobs/ (a copy already there is kept: same bytes)."""
        parsed = Digest.parse(digest)
        source = layout.staged_path(self.path, lease, parsed.algorithm, parsed.encoded)
        target = self._blob(digest, create=True)
        assert target is not None
        if _regular_file(target) is not None:
            source.unlink()
            return
        os.rename(source, target)
        _fsync_dir(target.parent)

    def staged_leases(self) -> list[str]:
        """The leases that have a staging directory under push/."""
        root = layout.push_dir(self.path)
        if not _real_directory(root):
            return []
        with os.scandir(root) as entries:
            return sorted(
                e.name
                for e in entries
                if layout.is_lease_name(e.name) and e.is_dir(follow_symlinks=False)
            )

    def drop_staging(self, lease: str) -> None:
        """Remove push/<lease>/ and the regular files in it (anything else is left)."""
        directory = layout.staging_dir(self.path, lease)
        if not _real_directory(directory):
            return
        with os.scandir(directory) as entries:
            for entry in entries:
                if entry.is_file(follow_symlinks=False):
                    os.unlink(entry.path)
        with contextlib.suppress(OSError):
            directory.rmdir()

    # --- the advisory lock --------------------------------------------------
    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Serialize refcount writers on this store (index.json read-modify-write)."""
        self.ensure_state_dir()
        fd = os.open(layout.lock_path(self.path), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            # Unlocked before the close: a process forked meanwhile (verify --deep's
            # hashing workers) shares the descriptor, and would keep the lock.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def hold_daemon_lock(self, run_dir: Path | None = None) -> int:
        """Take the daemon's lock for the life of the process, or raise StoreBusy.

        The lock is an flock on `.refcount/watch.pid` (or `run_dir/watch.pid`: a
        sidecar's own directory, when several hosts share the store), which then holds this
        process's pid; give it back with `release_daemon_lock`, which removes
        the file. A daemon that stops between our open() and our flock() has
        removed the file we opened, so locking it proves nothing: after the
        flock, the path must still name the file locked, else we try again on
        the file there now.
        """
        self.ensure_state_dir()
        path = layout.daemon_pid_path(self.path, run_dir)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreBusy(
                    f"{self.path}: a refcount watch daemon already runs on this store"
                ) from None
            if _names(path, fd):
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def release_daemon_lock(self, fd: int, run_dir: Path | None = None) -> None:
        """Remove `watch.pid` and give the daemon's lock back (a clean stop).

        The file is unlinked while the lock is still held, then closed: a daemon
        starting meanwhile either fails to lock the file, or locks it once it
        is already unlinked and sees that (see `hold_daemon_lock`). Only the
        file this lock is on is removed, never one another daemon made.
        """
        try:
            path = layout.daemon_pid_path(self.path, run_dir)
            if _names(path, fd):
                path.unlink()
        finally:
            os.close(fd)


def _names(path: Path, fd: int) -> bool:
    """`path` is the file open as `fd` (not a file made since under that name)."""
    try:
        there = path.lstat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (there.st_dev, there.st_ino) == (mine.st_dev, mine.st_ino)


class _TooLarge(Exception):
    pass


def _read_nofollow(path: Path, limit: int | None) -> bytes:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EISDIR, "not a regular file")
        data = handle.read() if limit is None else handle.read(limit + 1)
    if limit is not None and len(data) > limit:
        raise _TooLarge
    return data


SMALL_BLOB = 1 << 20
"""Blobs up to this size are hashed from one `os.read`; larger ones through
`hashlib.file_digest`."""


def hash_files(
    store: str, digests: list[str], deadline: float | None, first: bool
) -> list[str | None]:
    """The hex digest of each blob file, in order, under its own algorithm; None for
    one that is not a regular file in blobs/<algorithm>/ (gone, a link, unreadable).

    Each digest is validated before it names a file; blobs/ and blobs/<algorithm>/
    are opened once, without following a link, and each file relative to them with
    O_NOFOLLOW. With `deadline` (time.monotonic()) no blob is started after it,
    except the first one when `first`: the answer is then a prefix of `digests`.
    Module-level and standard library only: a worker process runs it.
    """
    hashes: list[str | None] = []
    dirs: dict[str, int | None] = {}
    try:
        for digest in digests:
            if deadline is not None and (hashes or not first) and time.monotonic() >= deadline:
                break
            parsed = Digest.parse(digest)
            if parsed.algorithm not in dirs:
                dirs[parsed.algorithm] = _open_blob_dir(store, parsed.algorithm)
            directory = dirs[parsed.algorithm]
            hashes.append(
                None if directory is None else _hash_at(directory, parsed.encoded, parsed.algorithm)
            )
    finally:
        for fd in dirs.values():
            if fd is not None:
                os.close(fd)
    return hashes


def _open_blob_dir(store: str, algorithm: str) -> int | None:
    """blobs/<algorithm>/ of `store`, opened as a directory without following a link."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW
    try:
        blobs = os.open(os.path.join(store, layout.BLOBS), flags)
    except OSError:
        return None
    try:
        return os.open(algorithm, flags, dir_fd=blobs)
    except OSError:
        return None
    finally:
        os.close(blobs)


def _open_regular(directory: int, name: str) -> tuple[int, os.stat_result] | None:
    """`name` in `directory` opened for reading without following a link, with its
    fstat, when it is a regular file; None otherwise (missing, unreadable, a link, a
    directory put in a blob's place). The caller closes the descriptor."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW, dir_fd=directory)
    except OSError:
        return None
    try:
        info = os.fstat(fd)
    except OSError:
        os.close(fd)
        return None
    if not stat.S_ISREG(info.st_mode):
        os.close(fd)
        return None
    return fd, info


def _read_whole(fd: int, size: int) -> bytes | None:
    """The file's `size` bytes in one read; None when it has grown since its fstat."""
    data = os.read(fd, size + 1)
    return data if len(data) <= size else None


def _read_small_blob(directory: int | None, name: str, limit: int) -> bytes | None:
    """The bytes of `name` in `directory` (blobs/<algorithm>/, see `_open_blob_dir`)
    when it is a readable regular file of at most `limit` bytes, opened without
    following a link; None otherwise (the caller then looks at why, path by path).
    Opens relative to the directory instead of the lstat of every directory on the
    way: the recount's cost per manifest."""
    opened = None if directory is None else _open_regular(directory, name)
    if opened is None:
        return None
    fd, info = opened
    try:
        return _read_whole(fd, info.st_size) if info.st_size <= limit else None
    except OSError:
        return None
    finally:
        os.close(fd)


def _hash_at(directory: int, name: str, algorithm: str) -> str | None:
    opened = _open_regular(directory, name)
    if opened is None:
        return None
    fd, info = opened
    try:
        if info.st_size <= SMALL_BLOB:
            data = _read_whole(fd, info.st_size)
            if data is not None:
                return hashlib.new(algorithm, data).hexdigest()
            # grown since the fstat: hash it whole below, from the start
            os.lseek(fd, 0, os.SEEK_SET)
        with os.fdopen(os.dup(fd), "rb") as handle:
            return hashlib.file_digest(handle, algorithm).hexdigest()
    except OSError:
        return None
    finally:
        os.close(fd)


class _Hashing:
    """The sha256 of `pieces`, computed on a thread while the caller writes them:
    hashlib lets go of the GIL over large buffers, so it overlaps the write and
    the fsync instead of adding to them."""

    def __init__(self, pieces: Sequence[bytes | memoryview]) -> None:
        self._hash = hashlib.sha256()
        self._pieces = pieces
        self._thread = threading.Thread(target=self._run, name="refcount-index-hash")

    def _run(self) -> None:
        for piece in self._pieces:
            self._hash.update(piece)

    def __enter__(self) -> _Hashing:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._thread.join()

    @property
    def hexdigest(self) -> str:
        return self._hash.hexdigest()


_IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16


def _write_pieces(fd: int, pieces: Sequence[bytes | memoryview]) -> None:
    """Write `pieces` to `fd` in order, without joining them (os.writev, in batches
    the kernel accepts; a short write carries on from where it stopped)."""
    views = [memoryview(p) for p in pieces if len(p)]
    while views:
        batch = views[:_IOV_MAX]
        done = os.writev(fd, batch)
        while views and done >= len(views[0]):
            done -= len(views.pop(0))
        if done:
            views[0] = views[0][done:]


def _write_small(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _real_directory(path: Path) -> bool:
    """Whether `path` is a directory, by lstat: False when nothing is there;
    InvalidStore, naming the path, when it is a symbolic link (never followed),
    anything else that is not a directory, or cannot be looked at."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return False
    except OSError as exc:
        # lstat needs to search the parent: a parent refcount may not enter is the culprit.
        culprit = path.parent if exc.errno == errno.EACCES else path
        raise InvalidStore(f"{culprit}: cannot read: {exc.strerror}") from None
    if stat.S_ISLNK(mode):
        raise InvalidStore(f"{path}: is a symbolic link; not followed")
    if not stat.S_ISDIR(mode):
        raise InvalidStore(f"{path}: exists and is not a directory")
    return True


def _make_directory(path: Path) -> None:
    """Make the directory `path` unless it is there; InvalidStore unless it then is a
    real directory. The caller has checked its parent: mkdir never follows a link
    at the last component, so nothing is made anywhere but at `path` itself."""
    try:
        os.mkdir(path, 0o700)
    except OSError as exc:
        # EEXIST, or an error some systems put first for a name that exists (EACCES, EROFS).
        if _real_directory(path):
            return
        raise InvalidStore(f"{path}: cannot create: {exc.strerror}") from None
    if not _real_directory(path):
        raise InvalidStore(f"{path}: removed as soon as it was made")


def _regular_file(path: Path) -> BlobFile | None:
    try:
        info = path.lstat()
    except (FileNotFoundError, NotADirectoryError):
        return None
    except OSError as exc:  # e.g. a directory refcount may not enter: never guess "absent"
        raise InvalidStore(f"{path}: cannot read: {exc.strerror}") from None
    return BlobFile(info.st_size, info.st_mtime) if stat.S_ISREG(info.st_mode) else None


def _unlink_regular(path: Path) -> bool:
    if _regular_file(path) is None:
        return False
    path.unlink()
    return True


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2); False where the kernel or libc lacks it."""
    renameat2 = getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    if renameat2 is None:
        return False
    done = renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    if done == 0:
        return True
    if ctypes.get_errno() in (errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
