"""The chunked root filesystem: the extractor refcount ships, and the example of one.

A chunked root filesystem (`docs/chunked-rootfs.md`) is one binary blob that
describes a file tree whose file contents live in separate *chunk* blobs, named
by their raw 32-byte sha256 digests, as puzzlefs does. An OCI manifest lists the
rootfs blob as a layer of MEDIA_TYPE; the chunks appear in no JSON at all, so
without this extractor they would look unreferenced.

    offset   size  field
    0        8     magic b"RCROOTFS"
    8        2     version, big-endian: 1
    10       2     reserved: 0
    12       4     N, the number of chunks, big-endian
    16       40*N  N entries: the chunk's raw sha256 digest (32 bytes), its size
                   in bytes (8 bytes, big-endian)
    16+40*N  ...   the file tree, which refcount does not read

Registered through refcount's own `refcount.extractors` entry point
(pyproject.toml), exactly as a plug-in of another package is, and using only
the plug-in interface (`refcount.extractors.Child`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

from refcount.extractors import Child

MEDIA_TYPE = "application/vnd.refcount.rootfs.chunked.v1"
MAGIC = b"RCROOTFS"
VERSION = 1
HEADER = struct.Struct(">8sHHI")
ENTRY = struct.Struct(">32sQ")


class ChunkedRootfs:
    """The extractor of MEDIA_TYPE: every chunk entry of the table is a child."""

    media_types = (MEDIA_TYPE,)

    def extract(self, data: bytes, media_type: str) -> Iterator[Child]:
        if len(data) < HEADER.size:
            raise ValueError(f"{len(data)} bytes: shorter than the {HEADER.size}-byte header")
        magic, version, _reserved, count = HEADER.unpack_from(data)
        if magic != MAGIC:
            raise ValueError(f"magic {magic!r} is not {MAGIC!r}")
        if version != VERSION:
            raise ValueError(f"version {version} is not {VERSION}")
        if HEADER.size + count * ENTRY.size > len(data):
            raise ValueError(f"{count} chunks do not fit in {len(data)} bytes")
        for raw, size in ENTRY.iter_unpack(data[HEADER.size : HEADER.size + count * ENTRY.size]):
            yield Child(f"sha256:{raw.hex()}", size)


def build(chunks: list[tuple[bytes, int]], tree: bytes = b"") -> bytes:
    """A rootfs blob naming `chunks` (raw sha256 digest, size), followed by `tree`."""
    table = b"".join(ENTRY.pack(raw, size) for raw, size in chunks)
    return HEADER.pack(MAGIC, VERSION, 0, len(chunks)) + table + tree
