"""OCI parsing: bytes in, values out.

This is the only module that reads the JSON of manifests and of `index.json`.
It knows the media types of SPEC §1 and checks digests against the grammar
that `refcount.layout` spells (the one place it is written down); it knows
nothing of files, SQL or counts.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import json
import re
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NoReturn

from refcount.errors import CorruptBlob, InvalidBlob, InvalidDigest, InvalidStore, UnparsableIndex
from refcount.layout import DIGEST_PATTERN, HEX_LENGTH

TAG_ANNOTATION = "org.opencontainers.image.ref.name"
CREATED_ANNOTATION = "org.opencontainers.image.created"
# Marks a recorded tag that index.json spells unusably (control characters, not a
# string): the entry stays a tagged root, but no tag typed by a user can match it.
UNUSABLE_TAG = "\x01"

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

_ACCEPTED = re.compile(DIGEST_PATTERN)
# image-spec: algorithm-component (separator algorithm-component)* ":" encoded
_GRAMMAR = re.compile(r"[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+")


@dataclass(frozen=True, order=True)
class Digest:
    """A validated digest; the only value from which a blob path is ever built."""

    algorithm: str
    encoded: str

    @classmethod
    def parse(cls, text: object) -> Digest:
        return cls(*check_digest(text).split(":", 1))

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.encoded}"


def check_digest(text: object) -> str:
    """`text` itself when it is a digest refcount accepts; InvalidDigest saying why otherwise."""
    if isinstance(text, str) and _ACCEPTED.fullmatch(text):
        return text
    _reject(text)


def _reject(text: object) -> NoReturn:
    if not isinstance(text, str) or not _GRAMMAR.fullmatch(text):
        raise InvalidDigest(f"{text!r}: invalid digest: not algorithm:hex")
    algorithm = text.split(":", 1)[0]
    length = HEX_LENGTH.get(algorithm)
    if length is None:
        raise InvalidDigest(f"{text}: invalid digest: unsupported algorithm {algorithm!r}")
    raise InvalidDigest(
        f"{text}: invalid digest: {algorithm} needs {length} lowercase hex characters"
    )


@dataclass(frozen=True, slots=True)  # slots: a scan of 100k images holds 331k of them
class Descriptor:
    digest: str
    media_type: str | None
    size: int | None
    urls: bool = False  # a foreign layer: it may legitimately be absent from blobs/
    kind: str = "root"  # the field it came from: config, layer, manifest, blob


@dataclass(frozen=True, slots=True)
class Root:
    """One entry of index.json `manifests[]`: its position, and the byte span
    `[start, end)` of its JSON object in the file, so it can be cut out of the
    file without re-serializing the rest."""

    position: int
    digest: str
    media_type: str | None
    size: int | None
    tag: str | None
    start: int = 0
    end: int = 0


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
    digest = check_digest(raw.get("digest"))
    media_type = raw.get("mediaType")
    size = raw.get("size")
    return Descriptor(
        digest=digest,
        media_type=shared_type(media_type) if isinstance(media_type, str) else None,
        size=size if isinstance(size, int) and not isinstance(size, bool) and size >= 0 else None,
        urls=bool(raw.get("urls")),
        kind=_KIND.get(field, field),
    )


_TYPES: dict[str, str] = {}
_TYPES_KEPT = 4096


def shared_type(media_type: str) -> str:
    """One string object per media type: a store has a handful of them, and a scan
    keeps a descriptor (with its type) for each of its blobs (331k at 100k images).
    Bounded, so that crafted types cannot grow it without end."""
    kept = _TYPES.get(media_type)
    if kept is not None:
        return kept
    if len(_TYPES) < _TYPES_KEPT:
        _TYPES[media_type] = media_type
    return media_type


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


_SPACE = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()


def _walk_index(text: str) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """Decode index.json, noting where each element of `manifests` starts and ends.

    The C decoder parses every value; only the top-level object and the
    manifests array are walked here, so the cost stays close to json.loads.
    """

    def space(i: int) -> int:
        match = _SPACE.match(text, i)
        return match.end() if match else i

    def expect(i: int, char: str) -> int:
        if text[i : i + 1] != char:
            raise ValueError(f"expected {char!r} at character {i}")
        return space(i + 1)

    obj: dict[str, Any] = {}
    spans: list[tuple[int, int]] = []
    i = expect(space(0), "{")
    while text[i : i + 1] != "}":
        if obj or spans:
            i = expect(i, ",")
        key, i = _DECODER.raw_decode(text, i)
        if not isinstance(key, str):
            raise ValueError(f"object key is not a string at character {i}")
        i = expect(space(i), ":")
        if key == "manifests" and text[i : i + 1] == "[":
            items: list[Any] = []
            spans = []
            i = space(i + 1)
            while text[i : i + 1] != "]":
                if items:
                    i = expect(i, ",")
                item, end = _DECODER.raw_decode(text, i)
                items.append(item)
                spans.append((i, end))
                i = space(end)
            obj[key], i = items, space(i + 1)
        else:
            obj[key], i = _DECODER.raw_decode(text, i)
            i = space(i)
    if space(i + 1) != len(text):
        raise ValueError(f"extra data at character {i + 1}")
    return obj, spans


def _byte_spans(text: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Character offsets as byte offsets of the UTF-8 file (the same for ASCII)."""
    if text.isascii():
        return spans
    result, chars, byte = [], 0, 0
    for start, end in spans:
        byte += len(text[chars:start].encode())
        length = len(text[start:end].encode())
        result.append((byte, byte + length))
        byte, chars = byte + length, end
    return result


def load_index(
    data: bytes, where: str = "index.json"
) -> tuple[dict[str, Any], list[tuple[int, int]]]:
    """The raw index.json object, and the byte span of each manifests[] element.

    Raises UnparsableIndex for an empty file or one that is not a JSON object
    (a write may be in progress), InvalidStore for a JSON object that is not
    an image index.
    """
    if not data.strip():
        raise UnparsableIndex(f"{where}: empty")
    try:
        text = data.decode("utf-8")
        index, spans = _walk_index(text)
    except UnicodeDecodeError:
        raise UnparsableIndex(f"{where}: invalid JSON (not UTF-8)") from None
    except (ValueError, RecursionError, IndexError) as exc:
        raise UnparsableIndex(f"{where}: invalid JSON ({exc})") from None
    _check_image_index(index, where)
    return index, _byte_spans(text, spans)


def _check_image_index(index: dict[str, Any], where: str) -> None:
    """Refuse a document that parses but is not an image index (SPEC §1).

    `{}`, `{"schemaVersion":2}` or another schema version must never be read as
    "no roots": that would free every blob. The one empty index that is valid is
    `"manifests": null`, which umoci writes for an empty layout.
    """
    version = index.get("schemaVersion")
    if "schemaVersion" not in index:
        raise InvalidStore(f"{where}: not an image index: schemaVersion is missing")
    if type(version) is not int or version != 2:
        raise InvalidStore(f"{where}: not an image index: schemaVersion is {version!r}, not 2")
    if "manifests" not in index:
        raise InvalidStore(f"{where}: not an image index: manifests is missing")
    manifests = index["manifests"]
    if manifests is not None and not isinstance(manifests, list):
        raise InvalidStore(f"{where}: manifests is not a list")


def parse_index(data: bytes, where: str = "index.json") -> Index:
    """The roots of index.json. umoci writes `"manifests": null`: no roots.

    An entry with a bad digest or tag is skipped and reported as a problem: one
    broken entry must not stop the rest of the store from being counted.
    """
    index, spans = load_index(data, where)
    roots: list[Root] = []
    problems: list[Problem] = []
    for position, (raw, (start, end)) in enumerate(
        zip(index.get("manifests") or [], spans, strict=True)
    ):
        entry = f"{where}: manifests[{position}]"
        try:
            descriptor = _descriptor(raw, entry)
        except (InvalidDigest, InvalidBlob) as exc:
            problems.append(_problem(entry, exc, entry_tag(raw)))
            continue
        try:
            tag = _tag_of(raw, entry)
        except InvalidBlob as exc:
            # The digest is sound, so the entry still holds its image; only its tag is
            # unusable (it cannot be named on the command line or stored as text).
            problems.append(_problem(entry, exc, entry_tag(raw)))
            tag = UNUSABLE_TAG + ascii(raw["annotations"][TAG_ANNOTATION])
        roots.append(
            Root(
                position, descriptor.digest, descriptor.media_type, descriptor.size, tag, start, end
            )
        )
    return Index(tuple(roots), tuple(problems))


@dataclass(frozen=True)
class Removal:
    """An entry to cut out of index.json, with the nearest entries that stay."""

    start: int
    end: int
    kept_before_end: int | None  # end of the closest kept entry before it
    kept_after_start: int | None  # start of the closest kept entry after it


def cuts(removals: list[Removal]) -> list[tuple[int, int]]:
    """Byte ranges to delete so the removed entries and their commas vanish.

    Removed entries with no kept entry between them form a run. A run after a
    kept entry is cut from that entry's end to the run's end (taking the comma
    before the run); a run at the front is cut up to the next kept entry; a run
    that is everything is cut alone. Returned highest first, so applying them in
    order leaves the lower offsets valid.
    """
    runs: dict[tuple[int | None, int | None], tuple[int, int]] = {}
    for r in removals:
        key = (r.kept_before_end, r.kept_after_start)
        low, high = runs.get(key, (r.start, r.end))
        runs[key] = (min(low, r.start), max(high, r.end))
    result = []
    for (before, after), (low, high) in runs.items():
        if before is not None:
            result.append((before, high))
        elif after is not None:
            result.append((low, after))
        else:
            result.append((low, high))
    return sorted(result, reverse=True)


def kept_pieces(data: bytes, ranges: list[tuple[int, int]]) -> list[memoryview]:
    """The parts of `data` left once the byte ranges (given highest first, as `cuts`
    returns them) go, in file order, as views: nothing is copied."""
    view = memoryview(data)
    pieces = []
    tail = len(data)
    for start, end in ranges:
        pieces.append(view[end:tail])
        tail = start
    pieces.append(view[:tail])
    return [p for p in reversed(pieces) if len(p)]


def apply_cuts(data: bytes, ranges: list[tuple[int, int]]) -> bytes:
    """`data` without the byte ranges (given highest first, as `cuts` returns them)."""
    return b"".join(kept_pieces(data, ranges))


@dataclass(frozen=True)
class CutLog:
    """The byte ranges cut out of index.json since its entries' spans were recorded,
    so that a delete shifts no recorded span.

    Recorded offsets live in one coordinate space: the file as last parsed, with
    every byte refcount cut from it since still counted. A cut is kept as
    (`at`, `length`): where it starts in that space, and how many bytes went. The
    file's offset of a recorded one is that offset less the lengths of the cuts
    before it (`current`); the other way (`recorded`, for spans found in the file
    as it is now: an append, a parse) adds back the cuts whose gap lies at or
    before it. Both are binary searches, so the cost of a delete does not grow
    with the number of entries; the log is folded into the spans (compacted)
    once it holds many cuts.
    """

    cuts: tuple[tuple[int, int], ...] = ()
    """(at, length), ascending."""
    _ats: list[int] = dataclasses.field(init=False, repr=False, compare=False)
    _gaps: list[int] = dataclasses.field(init=False, repr=False, compare=False)
    _before: list[int] = dataclasses.field(init=False, repr=False, compare=False)
    """The lengths cut before each cut, and in all (last)."""

    def __post_init__(self) -> None:
        ats, gaps, before, total = [], [], [], 0
        for at, length in self.cuts:
            ats.append(at)
            gaps.append(at - total)  # where this cut's hole is in the file now
            before.append(total)
            total += length
        object.__setattr__(self, "_ats", ats)
        object.__setattr__(self, "_gaps", gaps)
        object.__setattr__(self, "_before", [*before, total])

    def __len__(self) -> int:
        return len(self.cuts)

    def current(self, offset: int) -> int:
        """The file's offset of the recorded `offset` (never inside a cut)."""
        return offset - self._before[bisect.bisect_left(self._ats, offset)]

    def recorded(self, offset: int) -> int:
        """The recorded offset of the file's `offset` (the inverse of `current`)."""
        return offset + self._before[bisect.bisect_right(self._gaps, offset)]

    def cut(self, ranges: Iterable[tuple[int, int]]) -> CutLog:
        """This log after the file's byte `ranges` (in its offsets now, disjoint) go.

        A range that spans the hole of an earlier cut is two separate runs of
        recorded bytes (the earlier cut lies between them), so it is split there:
        the cuts stay disjoint and in the same order in both coordinates.
        """
        added: list[tuple[int, int]] = []
        for start, end in ranges:
            holes = self._gaps[
                bisect.bisect_right(self._gaps, start) : bisect.bisect_left(self._gaps, end)
            ]
            bounds = [start, *holes, end]
            added.extend(
                (self.recorded(low), high - low)
                for low, high in itertools.pairwise(bounds)
                if high > low
            )
        return CutLog(tuple(sorted(self.cuts + tuple(added))))


def _problem(where: str, exc: Exception, tag: str | None = None) -> Problem:
    return Problem(where, str(exc).removeprefix(f"{where}: "), tag)


def entry_tag(raw: object) -> str | None:
    """The tag annotation of a raw index.json entry, when it is a string (unchecked)."""
    annotations = raw.get("annotations") if isinstance(raw, dict) else None
    tag = annotations.get(TAG_ANNOTATION) if isinstance(annotations, dict) else None
    return tag if isinstance(tag, str) else None


def usable_tag(tag: str) -> bool:
    """A tag a user can name: printable, non-empty, and storable as text."""
    return bool(tag) and tag.isprintable() and _encodable(tag)


def _encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _tag_of(raw: dict[str, Any], where: str) -> str | None:
    annotations = raw.get("annotations")
    if not isinstance(annotations, dict):
        return None
    tag = annotations.get(TAG_ANNOTATION)
    if tag is None:
        return None
    if not isinstance(tag, str) or not usable_tag(tag):
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
    own_type = shared_type(blob["mediaType"]) if isinstance(blob.get("mediaType"), str) else None
    media_type = own_type or declared_type
    problems: list[Problem] = []
    if own_type and declared_type and own_type != declared_type:
        problems.append(
            Problem(where, f"mediaType {own_type} differs from its descriptor's {declared_type}")
        )
        if not is_manifest_type(own_type):
            media_type = declared_type  # count what it lists rather than drop it
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
                problems.append(_problem(label, exc))
    subject = None
    if media_type in MANIFEST_TYPES and "subject" in blob:
        try:
            subject = _descriptor(blob["subject"], f"{where}: subject").digest
        except (InvalidDigest, InvalidBlob) as exc:
            problems.append(_problem(f"{where}: subject", exc))
    return Parsed(media_type, tuple(children), subject, tuple(problems))


# A digest anywhere in a manifest's bytes, not cut out of a longer run of hex.
_ANY_DIGEST = re.compile(f"(?:{DIGEST_PATTERN})(?![0-9a-f])".encode())


def salvage(chunks: Iterable[bytes], raw: Collection[str] = ()) -> tuple[Descriptor, ...]:
    """Every digest a blob's bytes mention, for a blob that could not be parsed.

    Such a blob may still be needed by the tools that wrote it; holding what it
    mentions means a damaged blob never lets a blob it names be freed. A digest
    is mentioned when its text appears (`sha256:` and the hex, as JSON spells
    it) or, for each digest in `raw`, when its bytes appear undecoded (32 bytes
    for sha256, 64 for sha512: how binary formats name blobs). Raw bytes can
    only be recognised for digests one names, so `raw` is the blobs the store
    holds. Takes the bytes in chunks (overlapping by a digest's length) so size
    is no limit.
    """
    wanted = {bytes.fromhex(d.split(":", 1)[1]): d for d in raw}
    seen: dict[str, None] = {}
    tail = b""
    for chunk in chunks:
        window = tail + chunk
        seen.update(dict.fromkeys(m.decode() for m in _ANY_DIGEST.findall(window)))
        seen.update(dict.fromkeys(_raw_mentions(window, wanted)))
        tail = window[-_LONGEST_DIGEST:]
    return tuple(Descriptor(d, None, None, kind="unparsed") for d in seen)


_FIND_BUDGET = 1 << 26
"""Bytes searched at C speed, one search per wanted digest, before sliding a window instead."""


def _raw_mentions(window: bytes, wanted: dict[bytes, str]) -> Iterable[str]:
    """The wanted digests whose raw bytes occur in `window`.

    A search per digest costs len(wanted) x len(window) at C speed; a window
    slid over the bytes costs len(window) set lookups at Python speed. The
    cheaper of the two is taken.
    """
    if len(wanted) * len(window) <= _FIND_BUDGET:
        return [digest for raw, digest in wanted.items() if raw in window]
    lengths = {len(raw) for raw in wanted}
    return [
        wanted[window[i : i + n]]
        for n in lengths
        for i in range(len(window) - n + 1)
        if window[i : i + n] in wanted
    ]


_LONGEST_DIGEST = max(len(algorithm) + 1 + n for algorithm, n in HEX_LENGTH.items())


def append_entries(
    data: bytes, entries: list[dict[str, Any]], where: str = "index.json", after: int | None = None
) -> tuple[bytes, list[tuple[int, int]]]:
    """index.json's bytes with `entries` added at the end of manifests[], and the
    byte span of each added entry in them.

    The bytes of the entries already there are kept as they are (their recorded
    spans stay valid); an index without entries (`[]`, umoci's `null`) is
    written anew. `after`, the end of the last entry's span when the caller
    knows it, spares the parse when only whitespace and `]` follow it. Raises
    like `load_index` for a document that is not an index.
    """
    encoded = [json.dumps(e, separators=(",", ":")).encode() for e in entries]
    if after is None or data[after:].lstrip(b" \t\r\n")[:1] != b"]":
        index, spans = load_index(data, where)
        if not spans:
            index["manifests"] = entries
            written = json.dumps(index, separators=(",", ":")).encode()
            return written, load_index(written, where)[1]
        after = spans[-1][1]
    added, offset = [], after
    for entry in encoded:
        added.append((offset + 1, offset + 1 + len(entry)))
        offset += 1 + len(entry)
    return data[:after] + b"".join(b"," + e for e in encoded) + data[after:], added


class ContentCheck:
    """A blob's bytes checked against its digest and its descriptor's size while they
    stream: `update` with each chunk, then `finish`. CorruptBlob, naming `what` and
    the digest, as soon as they cannot match (too long), or at the end."""

    def __init__(self, digest: str, size: int | None, what: str) -> None:
        parsed = Digest.parse(digest)
        self.digest, self.size, self.what = digest, size, what
        self._hasher = hashlib.new(parsed.algorithm)
        self._algorithm, self._encoded = parsed.algorithm, parsed.encoded
        self.length = 0

    def update(self, chunk: bytes) -> None:
        self.length += len(chunk)
        if self.size is not None and self.length > self.size:
            raise CorruptBlob(
                f"{self.what}: {self.digest}: longer than the {self.size} bytes its descriptor says"
            )
        self._hasher.update(chunk)

    def finish(self) -> None:
        if self.size is not None and self.length != self.size:
            raise CorruptBlob(
                f"{self.what}: {self.digest}: truncated: {self.length} of the {self.size} "
                "bytes its descriptor says"
            )
        if self._hasher.hexdigest() != self._encoded:
            raise CorruptBlob(
                f"{self.what}: {self.digest}: content does not match its digest "
                f"(it hashes to {self._algorithm}:{self._hasher.hexdigest()})"
            )


# --- when an image was made -----------------------------------------------------
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_timestamp(value: object) -> datetime | None:
    """An RFC 3339 time (`2024-05-01T12:00:00Z`, nanoseconds allowed) as aware UTC;
    None when it is not one (a time without a zone is read as UTC)."""
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(_FRACTION.sub(r"\1", value.strip()))
    except ValueError:
        return None
    return parsed.replace(tzinfo=UTC) if parsed.tzinfo is None else parsed.astimezone(UTC)


@dataclass(frozen=True)
class Created:
    """What a root manifest says about when its image was made."""

    annotation: datetime | None  # its org.opencontainers.image.created
    config: str | None  # the digest of its config, whose `created` is next in line


def manifest_created(data: bytes) -> Created:
    """The created annotation of a manifest or index, and its config's digest.

    Lenient: a creation time is a hint for retention, so bytes that do not
    parse say nothing (the caller falls back to when refcount first saw them).
    """
    try:
        blob = _load_object(data, "manifest", InvalidBlob)
    except InvalidBlob:
        return Created(None, None)
    annotations = blob.get("annotations")
    annotation = (
        parse_timestamp(annotations.get(CREATED_ANNOTATION))
        if isinstance(annotations, dict)
        else None
    )
    config = blob.get("config")
    digest = config.get("digest") if isinstance(config, dict) else None
    try:
        return Created(annotation, check_digest(digest) if isinstance(digest, str) else None)
    except InvalidDigest:
        return Created(annotation, None)


def config_created(data: bytes) -> datetime | None:
    """An image config's `created`, or None (lenient, as `manifest_created`)."""
    try:
        return parse_timestamp(_load_object(data, "config", InvalidBlob).get("created"))
    except InvalidBlob:
        return None
