"""push: copy an image into the store from another layout or an oci-archive.

The order of effects (`Refcounter.push` runs them; SPEC §7):

1. `plan`, without the lock: resolve the ref in the source, read and verify
   every manifest-like blob of the image (and of its referrers), and list
   every blob it needs. Nothing is written.
2. Lease every blob of the plan (under the store's lock, one transaction). From
   here no delete, prune, gc or daemon batch frees any of them; then decide,
   blob by blob: reuse what blobs/ or the quarantine holds, copy the rest.
3. `stage`, without the lock: stream each blob to copy into
   `.refcount/push/<lease>/`, checked against its digest and size as it
   streams; only when every one is complete are they renamed into blobs/. A
   corrupt or truncated blob stops the push with nothing of it left in blobs/.
4. `land`, under the lock, in one transaction: check that every blob is still
   there, move the tag (the entries that carried it are deleted as by
   `delete tag`), append the new entries to index.json with the same
   compare-and-swap rewrite as every delete (`planner.rewrite_index` records
   the new entries' spans without parsing the file again), count the new roots
   incrementally (the ledger restores quarantined blobs), drop the lease and
   record the tag's last use. Commit, then the journal is carried out.

A push killed anywhere leaves at most a staging directory and orphans in
blobs/, all leased until the lease expires; the next `gc` after that removes
them (orphans once past the grace period too). index.json is written last, so
it never names a blob that is not complete.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from platform import machine
from typing import Any

from refcount.core import planner
from refcount.core.ledger import Ledger
from refcount.db.repo import RootRow
from refcount.errors import (
    CorruptBlob,
    InvalidBlob,
    InvalidDigest,
    InvalidSource,
    InvalidStore,
    NotFound,
)
from refcount.extractors import DEFAULT_TIMEOUT, Registry, installed
from refcount.oci import (
    DOCKER_LIST,
    OCI_INDEX,
    TAG_ANNOTATION,
    ContentCheck,
    Descriptor,
    check_digest,
    entry_tag,
    is_manifest_type,
    load_index,
    parse_children,
)
from refcount.reports import BlobRef, Entry
from refcount.sources import Source
from refcount.store import IndexSnapshot, Store, crash_point


@dataclass
class Plan:
    """What a push brings: the entries to append and every blob they need."""

    source: str
    digest: str  # the root's
    tag: str | None  # the new root's tag: --tag, else the source's name for it
    entries: list[dict[str, Any]]  # root first, then referrers (untagged)
    blobs: dict[str, Descriptor] = field(default_factory=dict)
    manifests: dict[str, bytes] = field(default_factory=dict)  # verified bytes

    @property
    def digests(self) -> list[str]:
        return list(self.blobs)


def plan(
    source: Source,
    ref: str | None,
    tag: str | None,
    max_manifest: int,
    *,
    referrers: bool,
    every_platform: bool = True,
    extractor_timeout: float = DEFAULT_TIMEOUT,
) -> Plan:
    """Resolve `ref` in the source and walk its image there (see module docstring).
    The new root is tagged `tag`, else with the ref, else (no ref given) with the
    source entry's own tag; a digest ref without `tag` adds it untagged. Without
    `every_platform`, an image index is replaced by its manifest for this host's
    platform (skopeo copy without --all).

    NotFound when the ref names nothing in the source; InvalidSource for a
    manifest missing from the source or one that cannot be parsed (refcount
    does not copy an image it cannot count); CorruptBlob for bytes that do not
    match their digest. A blob of a type an extractor plug-in reads is read
    there too, so its children come along; its extractor failing is InvalidSource.
    """
    walk = _Walk(source, max_manifest, installed(), extractor_timeout)
    raw_entries = _source_entries(source)
    root = _resolve(source, raw_entries, ref)
    if tag is None:  # the ref's name; untagged for a digest
        tag = entry_tag(root) if ref is None or not _is_digest(ref) else None
    if not every_platform and root.get("mediaType") in (OCI_INDEX, DOCKER_LIST):
        root = _host_manifest(source, root, max_manifest)
    result = Plan(source.name, root["digest"], tag, [tagged(root, tag)])
    pending = [_descriptor(root)]
    walk(result, pending)
    candidates = _referrers(source, raw_entries, result, max_manifest) if referrers else []
    while found := [
        raw
        for raw, subject in candidates
        if subject in result.manifests and raw["digest"] not in result.blobs
    ]:
        for raw in found:
            result.entries.append(tagged(raw, None))
        walk(result, [_descriptor(raw) for raw in found])
    return result


def _referrers(
    source: Source, entries: list[dict[str, Any]], result: Plan, max_manifest: int
) -> list[tuple[dict[str, Any], str]]:
    """The source's entries outside the image that name a subject, with it (each
    manifest read once). An entry that cannot be read is no referrer of ours: it
    is skipped, never a reason to refuse the push."""
    found = []
    for raw in entries:
        if raw.get("digest") in result.blobs or not is_manifest_type(raw.get("mediaType")):
            continue
        try:
            data = _manifest(source, _descriptor(raw), max_manifest)
        except (InvalidDigest, InvalidSource):
            continue
        subject = None if data is None else _subject(data, raw)
        if subject is not None:
            found.append((raw, subject))
    return found


def _source_entries(source: Source) -> list[dict[str, Any]]:
    try:
        index, _ = load_index(source.index_data(), f"{source.name}: index.json")
    except InvalidStore as exc:  # the source's index.json, not the store's
        raise InvalidSource(str(exc)) from None
    return [e for e in index.get("manifests") or [] if isinstance(e, dict)]


def _resolve(source: Source, entries: list[dict[str, Any]], ref: str | None) -> dict[str, Any]:
    """The source's index.json entry `ref` names: a tag, or a digest; without a ref,
    the one entry of a source that has exactly one."""
    if ref is None:
        if len(entries) == 1:
            return _checked_entry(source, entries[0])
        tags = sorted(entry_tag(e) or "(untagged)" for e in entries)
        raise InvalidSource(
            f"{source.name}: holds {len(entries)} images ({', '.join(tags) or 'none'}): "
            "name one as SOURCE:REF"
        )
    by_digest = _is_digest(ref)
    for entry in entries:
        if (entry.get("digest") == ref) if by_digest else (entry_tag(entry) == ref):
            return _checked_entry(source, entry)
    raise NotFound(f"{source.name}: no image {ref!r} in its index.json")


def _is_digest(ref: str) -> bool:
    return ref.split(":", 1)[0] in ("sha256", "sha512")


HOST_ARCHITECTURE = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "i686": "386",
}.get(machine(), machine())
"""This machine's architecture as OCI platforms spell it (Go's GOARCH names)."""


def _host_manifest(source: Source, index: dict[str, Any], max_manifest: int) -> dict[str, Any]:
    """The child of an image index for linux on this host's architecture."""
    data = _manifest(source, _descriptor(index), max_manifest)
    if data is None:
        raise InvalidSource(f"{source.name}: {index['digest']}: not in the source")
    try:
        children = json.loads(data).get("manifests") or []
    except (ValueError, AttributeError):
        raise InvalidSource(f"{source.name}: {index['digest']}: not an image index") from None
    for child in children:
        platform = child.get("platform") if isinstance(child, dict) else None
        if isinstance(platform, dict) and (platform.get("os"), platform.get("architecture")) == (
            "linux",
            HOST_ARCHITECTURE,
        ):
            return _checked_entry(source, child)
    raise InvalidSource(
        f"{source.name}: {index['digest']}: the index has no manifest for "
        f"linux/{HOST_ARCHITECTURE} (push it with --all)"
    )


def _checked_entry(source: Source, entry: dict[str, Any]) -> dict[str, Any]:
    try:
        check_digest(entry.get("digest"))
    except InvalidDigest as exc:
        raise InvalidSource(f"{source.name}: index.json: {exc}") from None
    if not isinstance(entry.get("size"), int) or not isinstance(entry.get("mediaType"), str):
        raise InvalidSource(
            f"{source.name}: index.json: {entry['digest']}: the entry has no mediaType or size"
        )
    return entry


def tagged(raw: dict[str, Any], tag: str | None) -> dict[str, Any]:
    """The index.json entry to append: the source's, tagged `tag` (None: untagged)."""
    entry = dict(raw)
    annotations = dict(raw.get("annotations") or {})
    annotations.pop(TAG_ANNOTATION, None)
    if tag is not None:
        annotations[TAG_ANNOTATION] = tag
    if annotations:
        entry["annotations"] = annotations
    else:
        entry.pop("annotations", None)
    return entry


def _descriptor(raw: dict[str, Any]) -> Descriptor:
    media_type = raw.get("mediaType")
    size = raw.get("size")
    return Descriptor(
        check_digest(raw.get("digest")),
        media_type if isinstance(media_type, str) else None,
        size if isinstance(size, int) else None,
    )


@dataclass(frozen=True)
class _Walk:
    """How a push reads the source's blobs that name others."""

    source: Source
    max_manifest: int
    extractors: Registry
    timeout: float

    def __call__(self, result: Plan, pending: list[Descriptor]) -> None:
        """Add every blob below `pending` to the plan, reading each parent once."""
        source = self.source
        while pending:
            descriptor = pending.pop()
            if descriptor.digest in result.blobs:
                continue
            result.blobs[descriptor.digest] = descriptor
            extracted = self.extractors.handles(descriptor.media_type)
            if not extracted and not is_manifest_type(descriptor.media_type):
                continue
            data = _manifest(source, descriptor, self.max_manifest)
            if data is None:
                raise InvalidSource(f"{source.name}: {descriptor.digest}: not in the source")
            result.manifests[descriptor.digest] = data
            pending.extend(self._children(descriptor, data))

    def _children(self, descriptor: Descriptor, data: bytes) -> tuple[Descriptor, ...]:
        if self.extractors.handles(descriptor.media_type):
            assert descriptor.media_type is not None
            found = self.extractors.extract(
                descriptor.media_type, data, descriptor.digest, self.timeout
            )
            if found.problem:
                raise InvalidSource(f"{self.source.name}: {found.problem}")
            return found.children
        try:
            parsed = parse_children(descriptor.media_type, data, descriptor.digest)
        except InvalidBlob as exc:
            raise InvalidSource(f"{self.source.name}: {exc}") from None
        if parsed.problems:
            raise InvalidSource(f"{self.source.name}: {parsed.problems[0]}")
        return parsed.children


def _manifest(source: Source, descriptor: Descriptor, max_manifest: int) -> bytes | None:
    """A manifest's verified bytes from the source; None when it does not hold it."""
    chunks = source.chunks(descriptor.digest)
    if chunks is None:
        return None
    check = ContentCheck(descriptor.digest, descriptor.size, source.name)
    data = bytearray()
    for chunk in chunks:
        check.update(chunk)
        data += chunk
        if len(data) > max_manifest:
            raise InvalidSource(
                f"{source.name}: {descriptor.digest}: manifest larger than the "
                f"{max_manifest}-byte limit"
            )
    check.finish()
    return bytes(data)


def _subject(data: bytes, raw: dict[str, Any]) -> str | None:
    try:
        return parse_children(raw.get("mediaType"), data, str(raw.get("digest"))).subject
    except InvalidBlob:
        return None


# --- staging -------------------------------------------------------------------------
def stage(
    store: Store, source: Source, result: Plan, lease: str, to_copy: list[str]
) -> list[BlobRef]:
    """Copy the blobs `to_copy` from the source into the store (module docstring, 3).

    Blobs with `urls` that the source lacks are foreign layers: not copied. On any
    error the staging directory is removed, so blobs/ is as it was.
    """
    copied = []
    try:
        for digest in to_copy:
            descriptor = result.blobs[digest]
            chunks = _chunks_of(source, result, descriptor)
            if chunks is None:
                continue
            store.stage_blob(lease, digest, descriptor.size, chunks, source.name)
            copied.append(BlobRef(digest, descriptor.size, descriptor.media_type))
            crash_point("push-mid-copy")
        for blob in copied:
            store.commit_staged(lease, blob.digest)
    finally:
        store.drop_staging(lease)
    return copied


def _chunks_of(source: Source, result: Plan, descriptor: Descriptor) -> Iterator[bytes] | None:
    if descriptor.digest in result.manifests:
        return iter([result.manifests[descriptor.digest]])
    chunks = source.chunks(descriptor.digest)
    if chunks is None and not descriptor.urls:
        raise InvalidSource(f"{source.name}: {descriptor.digest}: not in the source")
    return chunks


# --- landing -------------------------------------------------------------------------
@dataclass(frozen=True)
class Landed:
    added: tuple[Entry, ...]
    replaced: tuple[Entry, ...]


def land(ledger: Ledger, snapshot: IndexSnapshot, result: Plan, tag: str | None) -> Landed:
    """Move the tag and append the plan's entries to index.json, counting them (module
    docstring, 4). The caller holds the lock and owns the transaction; `ledger` has
    caught up with `snapshot`. ConcurrentChange when index.json changed meanwhile."""
    repo, store = ledger.repo, ledger.store
    absent = [
        d
        for d, descriptor in result.blobs.items()
        if not descriptor.urls and store.blob_file(d) is None and not store.in_trash(d)
    ]
    if absent:
        raise CorruptBlob(
            f"{result.source}: {absent[0]}: removed from the store during the push "
            "(by another tool); nothing added"
        )
    replaced: list[RootRow] = []
    if tag is not None and repo.roots_where(tag=tag):
        replaced = planner.plan(ledger, [planner.Select(f"tag {tag!r}", tag=tag)], snapshot)
    replaced_entries = tuple(Entry(repo.index_of(r.start or 0), r.digest, r.tag) for r in replaced)
    rows = planner.rewrite_index(repo, store, snapshot, replaced, result.entries)
    ledger.hint(Descriptor(r.digest, r.media_type, r.size) for r in rows)
    ledger.acquire(r.digest for r in rows)
    ledger.dispose()
    count = repo.count_roots()
    added = tuple(Entry(count - len(rows) + i, r.digest, r.tag) for i, r in enumerate(rows))
    return Landed(added, replaced_entries)
