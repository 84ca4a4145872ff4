"""Where `refcount push` reads an image from: another OCI layout, or an oci-archive.

Both readers are one small interface (`Source`): the bytes of the source's
index.json, and a blob's bytes in chunks by digest. Nothing here writes; the
bytes are checked against their digests by the store as they are staged
(`Store.stage_blob`), never trusted because of a file's name.

Spellings (as skopeo's transports, split at the first colon like umoci):

    DIR[:REF]  or  oci:DIR[:REF]     an OCI layout directory
    oci-archive:FILE[:REF]           a tar of one (what `skopeo copy ... oci-archive:` writes)

An archive is read with the standard library's `tarfile`, one member at a
time: nothing is ever extracted to a path the archive names. An archive that
holds a link, a device or a member whose name escapes it (absolute, `..`) is
refused whole: it was not written by a tool that makes OCI archives.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, Protocol

from refcount import layout
from refcount.errors import InvalidSource
from refcount.oci import Digest

CHUNK = 1 << 20
INDEX_LIMIT = 64 * 1024 * 1024
"""The largest source index.json read (a sanity bound, far above real ones)."""


class Source(Protocol):
    name: str
    """How messages name the source (its spelling on the command line)."""

    def index_data(self) -> bytes:
        """The bytes of the source's index.json; InvalidSource when unreadable."""
        ...

    def chunks(self, digest: str) -> Iterator[bytes] | None:
        """The blob's bytes in chunks; None when the source does not hold it."""
        ...

    def close(self) -> None: ...


def parse_spelling(spelling: str) -> tuple[str, str, str | None]:
    """(transport, path, ref) of a source spelling; ref None when not given."""
    transport = "oci"
    rest = spelling
    for prefix in ("oci-archive:", "oci:"):
        if spelling.startswith(prefix):
            transport, rest = prefix[:-1], spelling[len(prefix) :]
            break
    path, colon, ref = rest.partition(":")
    if not path:
        raise InvalidSource(f"{spelling!r}: no path: spell it DIR:REF or oci-archive:FILE[:REF]")
    return transport, path, ref if colon else None


def open_source(spelling: str) -> tuple[Source, str | None]:
    """The reader a spelling names, and the ref it names (None: not given)."""
    transport, path, ref = parse_spelling(spelling)
    if transport == "oci-archive":
        return ArchiveSource(Path(path), spelling), ref
    return LayoutSource(Path(path), spelling), ref


class LayoutSource:
    """An OCI layout directory, read with O_NOFOLLOW on every file it opens."""

    def __init__(self, path: Path, name: str) -> None:
        self.path, self.name = path, name
        if not path.is_dir():
            raise InvalidSource(f"{name}: {path} is not a directory")
        if not layout.oci_layout_path(path).is_file():
            raise InvalidSource(f"{name}: {path} is not an OCI layout (no oci-layout file)")

    def index_data(self) -> bytes:
        return _index(self._open(layout.index_path(self.path)), self.name)

    def chunks(self, digest: str) -> Iterator[bytes] | None:
        parsed = Digest.parse(digest)
        path = layout.blob_path(self.path, parsed.algorithm, parsed.encoded)
        handle = self._open(path)
        return None if handle is None else _read(handle)

    def _open(self, path: Path) -> IO[bytes] | None:
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
        except FileNotFoundError:
            return None
        except OSError as exc:
            why = "is a symbolic link; not followed" if exc.errno == errno.ELOOP else exc.strerror
            raise InvalidSource(f"{self.name}: {path}: {why}") from None
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise InvalidSource(f"{self.name}: {path}: not a regular file")
        return os.fdopen(fd, "rb")

    def close(self) -> None:
        return None


class ArchiveSource:
    """An oci-archive: a tar holding an OCI layout, plain or compressed."""

    def __init__(self, path: Path, name: str) -> None:
        self.name = name
        try:
            self._tar = tarfile.open(path, "r:*")  # noqa: SIM115 (closed by close())
        except tarfile.TarError:
            raise InvalidSource(f"{name}: cannot read {path}: not a tar archive") from None
        except OSError as exc:
            raise InvalidSource(f"{name}: cannot read {path}: {exc.strerror}") from None
        try:
            self._members = _members(self._tar, name)
        except BaseException:
            self._tar.close()
            raise

    def index_data(self) -> bytes:
        return _index(self._extract(layout.INDEX), self.name)

    def chunks(self, digest: str) -> Iterator[bytes] | None:
        parsed = Digest.parse(digest)
        handle = self._extract(f"{layout.BLOBS}/{parsed.algorithm}/{parsed.encoded}")
        return None if handle is None else _read(handle)

    def _extract(self, name: str) -> IO[bytes] | None:
        member = self._members.get(name)
        if member is None:
            return None
        try:
            return self._tar.extractfile(member)
        except (OSError, tarfile.TarError) as exc:
            raise InvalidSource(f"{self.name}: {name}: cannot read: {exc}") from None

    def close(self) -> None:
        self._tar.close()


def _members(tar: tarfile.TarFile, name: str) -> dict[str, tarfile.TarInfo]:
    """The archive's regular files by normalised name; InvalidSource for an archive
    holding a link, a device or a name that escapes it."""
    found: dict[str, tarfile.TarInfo] = {}
    try:
        for member in tar:
            parts = PurePosixPath(member.name).parts
            if member.name.startswith("/") or ".." in parts:
                raise InvalidSource(f"{name}: member {member.name!r} escapes the archive; refused")
            if member.issym() or member.islnk():
                raise InvalidSource(f"{name}: member {member.name!r} is a link; refused")
            if not (member.isreg() or member.isdir()):
                raise InvalidSource(
                    f"{name}: member {member.name!r} is a device or special file; refused"
                )
            if member.isreg():
                found["/".join(p for p in parts if p != ".")] = member
    except tarfile.TarError as exc:
        raise InvalidSource(f"{name}: damaged archive: {exc}") from None
    return found


def _read(handle: IO[bytes]) -> Iterator[bytes]:
    with handle:
        while chunk := handle.read(CHUNK):
            yield chunk


def _index(handle: IO[bytes] | None, name: str) -> bytes:
    """index.json's bytes from an open file (None: the source has none)."""
    if handle is None:
        raise InvalidSource(f"{name}: holds no {layout.INDEX}")
    with handle:
        data = handle.read(INDEX_LIMIT + 1)
    if len(data) > INDEX_LIMIT:
        raise InvalidSource(f"{name}: {layout.INDEX} larger than {INDEX_LIMIT} bytes")
    return data
