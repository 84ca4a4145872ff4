"""OCI parsing: bytes in, values out.

This is the only module that reads the JSON of manifests and of `index.json`.
It knows the media types of SPEC §1 and the digest grammar; it knows nothing of
files, SQL or counts.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from refcount.errors import InvalidBlob, InvalidDigest, InvalidStore

TAG_ANNOTATION = "org.opencontainers.image.ref.name"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"

# Which fields of each manifest-like type hold child descriptors.
_CHILD_FIELDS: dict[str, tuple[str, ...]] = {
    OCI_MANIFEST: ("config", "layers"),
    DOCKER_MANIFEST: ("config", "layers"),
    OCI_INDEX: ("manifests",),
    DOCKER_LIST: ("manifests",),
    OCI_ARTIFACT: ("blobs",),
}
MANIFEST_TYPES = frozenset(_CHILD_FIELDS)

_HEX_LENGTH = {"sha256": 64, "sha512": 128}
_HEX = re.compile(r"[0-9a-f]+")
# image-spec: algorithm-component (separator algorithm-component)* ":" encoded
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated digest; the only value from which a blob path is ever built."""

    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: object) -> Digest:
        if not isinstance(text, str) or not _GRAMMAR.fullmatch(text):
            raise InvalidDigest(f"{text!r}: invalid digest: not algorithm:hex")
        algorithm, encoded = text.split(":", 1)
        length = _HEX_LENGTH.get(algorithm)
        if length is None:
            raise InvalidDigest(f"{text}: invalid digest: unsupported algorithm {algorithm!r}")
        if len(encoded) != length or not _HEX.fullmatch(encoded):
            raise InvalidDigest(
                f"{text}: invalid digest: {algorithm} needs {length} lowercase hex characters"
            )
        return cls(algorithm, encoded)

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


@dataclass(frozen=True)
class Descriptor:
    digest: str
    media_type: str | None
    size: int | None
    urls: bool = False  # a foreign layer: it may legitimately be absent from blobs/
    kind: str = "root"  # the field it came from: config, layer, manifest, blob


@dataclass(frozen=True)
class Root:
    """One entry of index.json `manifests[]`, at its position."""

    position: int
    digest: str
    media_type: str | None
    size: int | None
    tag: str | None


@dataclass(frozen=True)
class Problem:
    """A part of the input that was skipped, and why (reported, never fatal)."""

    where: str
    message: str
    tag: str | None = None  # for an index.json entry: its tag, when that much was readable

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


@dataclass(frozen=True)
class Index:
    roots: tuple[Root, ...]
    problems: tuple[Problem, ...]


@dataclass(frozen=True)
class Parsed:
    """What a manifest-like blob says: its effective type, children and subject."""

    media_type: str | None
    children: tuple[Descriptor, ...]
    subject: str | None
    problems: tuple[Problem, ...]


def is_manifest_type(media_type: str | None) -> bool:
    return media_type in MANIFEST_TYPES


_KIND = {"config": "config", "layers": "layer", "manifests": "manifest", "blobs": "blob"}


def _descriptor(raw: object, where: str, field: str = "root") -> Descriptor:
    if not isinstance(raw, dict):
        raise InvalidBlob(f"{where}: descriptor is not an object")
    digest = str(Digest.parse(raw.get("digest")))
    media_type = raw.get("mediaType")
    size = raw.get("size")
    return Descriptor(
        digest=digest,
        media_type=media_type if isinstance(media_type, str) else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        urls=bool(raw.get("urls")),
        kind=_KIND.get(field, field),
    )


def _load_object(
    data: bytes, what: str, error: type[InvalidBlob] | type[InvalidStore]
) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError) as exc:
        reason = "empty" if not data.strip() else f"invalid JSON ({exc})"
        raise error(f"{what}: {reason}") from None
    if not isinstance(value, dict):
        raise error(f"{what}: not a JSON object")
    return value


def load_index(data: bytes, where: str = "index.json") -> dict[str, Any]:
    """The raw index.json object (every field kept), validated to have a manifests list."""
    index = _load_object(data, where, InvalidStore)
    manifests = index.get("manifests")
    if manifests is not None and not isinstance(manifests, list):
        raise InvalidStore(f"{where}: manifests is not a list")
    return index


def parse_index(data: bytes, where: str = "index.json") -> Index:
    """The roots of index.json. umoci writes `"manifests": null`: no roots.

    An entry with a bad digest or tag is skipped and reported as a problem: one
    broken entry must not stop the rest of the store from being counted.
    """
    roots: list[Root] = []
    problems: list[Problem] = []
    for position, raw in enumerate(load_index(data, where).get("manifests") or []):
        entry = f"{where}: manifests[{position}]"
        try:
            descriptor = _descriptor(raw, entry)
            tag = _tag_of(raw, entry)
        except (InvalidDigest, InvalidBlob) as exc:
            problems.append(Problem(entry, str(exc), _raw_tag(raw)))
            continue
        roots.append(Root(position, descriptor.digest, descriptor.media_type, descriptor.size, tag))
    return Index(tuple(roots), tuple(problems))


def _raw_tag(raw: object) -> str | None:
    annotations = raw.get("annotations") if isinstance(raw, dict) else None
    tag = annotations.get(TAG_ANNOTATION) if isinstance(annotations, dict) else None
    return tag if isinstance(tag, str) else None


def _tag_of(raw: dict[str, Any], where: str) -> str | None:
    annotations = raw.get("annotations")
    if not isinstance(annotations, dict):
        return None
    tag = annotations.get(TAG_ANNOTATION)
    if tag is None:
        return None
    if not isinstance(tag, str) or not tag or not tag.isprintable():
        raise InvalidBlob(f"{where}: tag {tag!r}: empty or has control characters")
    return tag


def parse_children(declared_type: str | None, data: bytes, where: str) -> Parsed:
    """Children and subject of a manifest-like blob.

    The blob's own `mediaType` field wins over the descriptor's: the bytes are the
    same whoever points at them, so the answer does not depend on which parent
    was counted first. A descriptor without mediaType falls back to it too
    (SPEC §1). A type outside the table is a leaf.
    """
    blob = _load_object(data, where, InvalidBlob)
    own_type = blob.get("mediaType")
    media_type = own_type if isinstance(own_type, str) else declared_type
    problems: list[Problem] = []
    children: list[Descriptor] = []
    for field in _CHILD_FIELDS.get(media_type or "", ()):
        raw_children = blob.get(field)
        listed = [raw_children] if field == "config" else raw_children
        if raw_children is None:
            continue
        if not isinstance(listed, list):
            problems.append(Problem(where, f"{field} is not a list"))
            continue
        for i, raw in enumerate(listed):
            label = f"{where}: {field}" if field == "config" else f"{where}: {field}[{i}]"
            try:
                children.append(_descriptor(raw, label, field))
            except (InvalidDigest, InvalidBlob) as exc:
                problems.append(Problem(label, str(exc)))
    subject = None
    if media_type in MANIFEST_TYPES and "subject" in blob:
        try:
            subject = _descriptor(blob["subject"], f"{where}: subject").digest
        except (InvalidDigest, InvalidBlob) as exc:
            problems.append(Problem(f"{where}: subject", str(exc)))
    return Parsed(media_type, tuple(children), subject, tuple(problems))


def without_entries(index: dict[str, Any], positions: set[int]) -> dict[str, Any]:
    """index.json with the entries at `positions` removed and everything else kept as is."""
    kept = [e for i, e in enumerate(index.get("manifests") or []) if i not in positions]
    return {**index, "manifests": kept}


def dump_index(index: dict[str, Any]) -> bytes:
    return json.dumps(index, ensure_ascii=False, separators=(",", ":")).encode()
