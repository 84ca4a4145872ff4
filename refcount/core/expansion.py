"""What a manifest-like blob holds: its children, read through a blob reader.

The one place that turns a blob's bytes into edges, so that the incremental
path (the ledger) and verify's from-scratch count (the scan) always agree. It
takes a reader (oras-go's `Successors(fetcher, node)` shape): any object with
`read_blob` and `read_chunks`, which `refcount.store.Store` is.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Protocol

from refcount.errors import BlobTooLarge, InvalidBlob
from refcount.oci import Descriptor, is_manifest_type, parse_children, salvage


class BlobReader(Protocol):
    def read_blob(self, digest: str) -> bytes | None:
        """The bytes of a manifest-like blob; None if absent. InvalidBlob when it
        cannot be read, BlobTooLarge over the parsing cap."""
        ...

    def read_chunks(self, digest: str) -> Iterator[bytes]:
        """The blob's bytes in chunks, however large."""
        ...


@dataclass(frozen=True)
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


def expand(reader: BlobReader, digest: str, media_type: str | None) -> Expansion | None:
    """A blob's children; LEAF for a blob never read, None when it is absent.

    A manifest that cannot be parsed, or parses with problems, also holds every
    digest its bytes mention (`salvage`): whatever it may need is never freed
    because of damage.
    """
    if media_type is not None and not is_manifest_type(media_type):
        return LEAF
    try:
        data = reader.read_blob(digest)
    except BlobTooLarge as exc:
        salvaged = salvage(reader.read_chunks(digest))
        return Expansion(distinct(salvaged, digest), media_type, problem=str(exc))
    except InvalidBlob as exc:
        return Expansion((), media_type, problem=str(exc), blind=True)
    if data is None:
        return None
    if media_type is None and data.lstrip()[:1] != b"{":
        return Expansion((), None)
    try:
        parsed = parse_children(media_type, data, digest)
    except InvalidBlob as exc:
        return Expansion(distinct(salvage([data]), digest), media_type, problem=str(exc))
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
