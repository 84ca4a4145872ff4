"""What a manifest-like blob holds: its children, read through a blob reader.

The one place that turns a blob's bytes into edges (the built-in OCI parser, or
the extractor plug-in of a type it claims: `refcount.extractors`), so that the
incremental path (the ledger) and verify's from-scratch count (the scan) always
agree. It takes a reader (oras-go's `Successors(fetcher, node)` shape): any
object with `read_blob`, `read_chunks` and `blob_digests`, which
`refcount.store.Store` is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from refcount.errors import BlobTooLarge, InvalidBlob
from refcount.extractors import DEFAULT_TIMEOUT, Registry, installed
from refcount.oci import Descriptor, is_manifest_type, parse_children, salvage


class BlobReader(Protocol):
    def read_blob(self, digest: str) -> bytes | None:
        """The bytes of a manifest-like blob; None if absent. InvalidBlob when it
        cannot be read, BlobTooLarge over the parsing cap."""
        ...

    def read_chunks(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks, however large."""
        ...

    def blob_digests(self) -> frozenset[str]:
        """The digests of every blob in the store (blobs/ and the quarantine), by
        name only: what a damaged binary blob's raw bytes are searched for."""
        ...


@dataclass(frozen=True, slots=True)
class Expansion:
    """What a manifest-like blob holds: distinct children (never itself), and why
    it is not fully trusted when it is not."""

    children: tuple[Descriptor, ...]
    media_type: str | None
    subject: str | None = None
    problem: str | None = None
    blind: bool = False  # could not be read at all: what it holds is unknown


LEAF = Expansion((), None)
"""A blob that is never read: a layer, a config, anything not manifest-like."""


def expand(
    reader: BlobReader,
    digest: str,
    media_type: str | None,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    extractors: Registry | None = None,
) -> Expansion | None:
    """A blob's children; LEAF for a blob never read, None when it is absent.

    A manifest-like type is parsed here; a type an extractor plug-in claims
    (`extractors`, the installed ones by default) is handed to it, with
    `timeout` seconds to answer. A blob that cannot be parsed, parses with
    problems, or makes its extractor fail also holds every digest its bytes
    mention (`salvage`; for an extractor's type, raw digests of blobs the store
    holds too): whatever it may need is never freed because of damage.
    """
    registry = extractors if extractors is not None else installed()
    extracted = registry.handles(media_type)
    if media_type is not None and not extracted and not is_manifest_type(media_type):
        return LEAF
    try:
        data = reader.read_blob(digest)
    except BlobTooLarge as exc:
        raw = reader.blob_digests() if extracted else ()
        salvaged = salvage(reader.read_chunks(digest), raw)
        return Expansion(distinct(salvaged, digest), media_type, problem=str(exc))
    except InvalidBlob as exc:
        return Expansion((), media_type, problem=str(exc), blind=True)
    if data is None:
        return None
    if extracted:
        assert media_type is not None
        return _extract(reader, registry, digest, media_type, data, timeout)
    if media_type is None and data.lstrip()[:1] != b"{":
        return Expansion((), None)
    try:
        parsed = parse_children(media_type, data, digest)
    except InvalidBlob as exc:
        return Expansion(distinct(salvage([data]), digest), media_type, problem=str(exc))
    if not is_manifest_type(parsed.media_type) and registry.handles(parsed.media_type):
        assert parsed.media_type is not None  # a JSON blob naming its own custom type
        return _extract(reader, registry, digest, parsed.media_type, data, timeout)
    problems = [str(p) for p in parsed.problems]
    if any(child.digest == digest for child in parsed.children):
        problems.append(f"{digest}: refers to itself; edge ignored")
    children = parsed.children + (salvage([data]) if problems else ())
    return Expansion(
        distinct(children, digest),
        parsed.media_type or media_type,
        parsed.subject,
        "; ".join(problems) or None,
    )


def _extract(
    reader: BlobReader,
    registry: Registry,
    digest: str,
    media_type: str,
    data: bytes,
    timeout: float,
) -> Expansion:
    """What an extractor names; on its failure, that and every digest the bytes mention."""
    found = registry.extract(media_type, data, digest, timeout)
    children = found.children
    if found.problem:
        children += salvage([data], reader.blob_digests())
    return Expansion(distinct(children, digest), media_type, problem=found.problem)


def distinct(children: Iterable[Descriptor], parent: str) -> tuple[Descriptor, ...]:
    """One edge per distinct child (a layer listed twice counts once), none to itself."""
    unique: dict[str, Descriptor] = {}
    for child in children:
        if child.digest != parent:
            unique.setdefault(child.digest, child)
    return tuple(unique.values())


def known_size(hint: Descriptor | None, file_size: int | None) -> int | None:
    """A blob's size: what a descriptor says, else what its file measures (the one rule)."""
    if hint is not None and hint.size is not None:
        return hint.size
    return file_size
