"""Hypothesis fuzz of the parser and of `sync` over random, partly hostile stores (issue 4).

- The parser (`parse_index`, `parse_children`) fed well-formed image indexes and manifests
  returns exactly the sound entries and descriptors the generated plan holds, in order, with
  one problem per unsound one.
- Fed random JSON, random bytes and those well-formed documents mixed, it lets only the
  library's typed errors (`RefcountError`) escape, and what it returns is safe to use; each
  of these tests counts how many examples parsed into roots or children and fails when too
  few did (a strategy of documents that are all refused would test nothing).
- `sync` and `verify`, run through the CLI's error boundary over random store trees (mostly
  valid images mixed with broken entries, misnamed, crafted and non-regular files, links out
  of the store), exit 0, 1 or 2, never 3 and never with a traceback; they change no file
  outside `blobs/` and `.refcount/` (nor anything beside the store), never touch an entry of
  `blobs/` that is not a regular file with a blob name, and never remove a blob that
  index.json still reaches (per the independent oracle, `storekit.reachable`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st
from storekit import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    EDGE_FIELDS,
    OCI_ARTIFACT,
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME,
    blob_files,
    is_valid_digest,
    listing,
    make_layout,
    reachable,
)

from refcount.cli import main
from refcount.errors import RefcountError
from refcount.oci import UNUSABLE_TAG, Digest, parse_children, parse_index

# On a failure hypothesis suggests a patch through libcst, whose import warns (mypy_extensions'
# TypedDict); with filterwarnings=error that would turn the report into an INTERNALERROR.
with warnings.catch_warnings(), contextlib.suppress(ImportError):
    warnings.simplefilter("ignore", DeprecationWarning)
    import libcst.metadata  # noqa: F401

MANIFEST_TYPES = [OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, OCI_ARTIFACT]
MEDIA_TYPES: list[Any] = [*MANIFEST_TYPES, OCI_LAYER, OCI_CONFIG, "text/plain", None, 7]
KEYS = [
    "schemaVersion",
    "mediaType",
    "manifests",
    "config",
    "layers",
    "blobs",
    "subject",
    "digest",
    "size",
    "urls",
    "annotations",
    REF_NAME,
]
VALID_MISSING = ["sha256:" + "0" * 64, "sha512:" + "1" * 128]
BAD_DIGESTS: list[Any] = [
    "sha256:../../etc/passwd",
    "sha256:../../../../etc/passwd",
    "sha256:" + "A" * 64,
    "sha256:" + "a" * 63,
    "md5:" + "0" * 32,
    "sha256:",
    "",
    None,
    42,
]
BAD_TAGS: list[Any] = ["bad\nname", "nul\x00", "\udcff", "", 42, ["x"]]

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


# =============================================================================================
# The parser
# =============================================================================================


def mostly(common: st.SearchStrategy[Any], rare: st.SearchStrategy[Any], one_in: int) -> Any:
    """`rare` about once in `one_in` draws, `common` otherwise."""
    return st.integers(1, one_in).flatmap(lambda n: rare if n == one_in else common)


scalars = (
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=12)
    | st.sampled_from([*VALID_MISSING, *BAD_DIGESTS[:6], *MANIFEST_TYPES, "\udcff", "a\x00"])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=6), inner, max_size=6)
    ),
    max_leaves=40,
)

# Well-formed image indexes and manifests, built from a plan whose expected parse is known by
# construction: without them random JSON almost never holds a sound descriptor (the parser's
# own checks would then never run), and the tests below assert that they do.

valid_digests = st.text("0123456789abcdef", min_size=64, max_size=64).map(
    "sha256:".__add__
) | st.text("0123456789abcdef", min_size=128, max_size=128).map("sha512:".__add__)
GOOD_TAGS = ["latest", "v1.2", "docker.io/library/app:1.2", "caf\u00e9", "a b"]
UNUSABLE_TAGS: list[Any] = ["", "bad\nname", "nul\x00", "del\x7f", "\udcff", 42, ["x"], {}]


@dataclass(frozen=True)
class Entry:
    """One descriptor of a generated document, and whether refcount must accept it."""

    digest: Any  # a valid digest, or one of BAD_DIGESTS
    media_type: Any  # a string, absent (None), or not a string
    size: Any
    tag: Any = "absent"  # "absent": no annotations; "no-dict": annotations not an object
    raw: Any = None  # not None: the entry is this non-object value instead

    @property
    def sound(self) -> bool:
        return self.raw is None and isinstance(self.digest, str) and is_valid_digest(self.digest)

    @property
    def tag_usable(self) -> bool:
        return self.tag in ("absent", "no-dict", None, *GOOD_TAGS)

    def json(self) -> Any:
        if self.raw is not None:
            return self.raw
        value: dict[str, Any] = {"digest": self.digest, "x-unknown": [1, {"k": "v"}]}
        if self.media_type is not None:
            value["mediaType"] = self.media_type
        if self.size != "absent":
            value["size"] = self.size
        if self.tag == "no-dict":
            value["annotations"] = ["not", "an", "object"]
        elif self.tag != "absent":
            value["annotations"] = {"org.example": "x", REF_NAME: self.tag}
        return value


def entries_of(*, tags: bool) -> st.SearchStrategy[list[Entry]]:
    entry = st.builds(
        Entry,
        digest=valid_digests | valid_digests | valid_digests | st.sampled_from(BAD_DIGESTS),
        media_type=st.sampled_from([*MANIFEST_TYPES, OCI_LAYER, None, 7]),
        size=st.sampled_from([0, 1, 512, 2**40, -1, None, True, "12", 1.5, "absent"]),
        tag=(
            st.sampled_from(["absent", "absent", "no-dict", None, *GOOD_TAGS, *UNUSABLE_TAGS])
            if tags
            else st.just("absent")
        ),
        raw=st.sampled_from([None] * 8 + [7, "sha256:" + "0" * 64, [], True]),
    )
    return st.lists(entry, min_size=1, max_size=8)


def expected_size(size: Any) -> int | None:
    return size if type(size) is int and size >= 0 else None


def encode(doc: Any, indent: Any) -> bytes:
    """UTF-8 JSON, non-ASCII kept as is (byte offsets differ from character offsets); a lone
    surrogate cannot be UTF-8, so a document holding one is written with JSON escapes."""
    try:
        return json.dumps(doc, indent=indent, ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(doc, indent=indent).encode()


indents = st.sampled_from([None, 0, 2, "\t"])


@dataclass(frozen=True)
class IndexPlan:
    entries: list[Entry] | None  # None: "manifests": null (umoci's empty layout)
    indent: Any
    manifests_first: bool

    def data(self) -> bytes:
        manifests = None if self.entries is None else [e.json() for e in self.entries]
        doc: dict[str, Any] = {"schemaVersion": 2, "mediaType": OCI_INDEX}
        if self.manifests_first:
            doc = {"manifests": manifests, **doc, "annotations": {"a": "b"}}
        else:
            doc = {**doc, "manifests": manifests}
        return encode(doc, self.indent)


index_plans = st.builds(
    IndexPlan,
    entries=mostly(entries_of(tags=True), st.none(), 10),
    indent=indents,
    manifests_first=st.booleans(),
)


@dataclass(frozen=True)
class ManifestPlan:
    media_type: str
    own_type: bool  # the blob carries its mediaType; otherwise only the descriptor does
    fields: dict[str, list[Entry]]  # every child field, of its own type and of others
    subject: Entry | None
    indent: Any

    @property
    def declared(self) -> str | None:
        return None if self.own_type else self.media_type

    def data(self) -> bytes:
        doc: dict[str, Any] = {"schemaVersion": 2}
        if self.own_type:
            doc["mediaType"] = self.media_type
        for name, entries in self.fields.items():
            listed = [e.json() for e in entries]
            doc[name] = listed[0] if name == "config" else listed
        if self.subject is not None:
            doc["subject"] = self.subject.json()
        return encode(doc, self.indent)

    def children(self) -> list[Entry]:
        """The sound descriptors of the fields SPEC section 1 gives this type, in order."""
        return [e for name in EDGE_FIELDS[self.media_type] for e in self.fields[name] if e.sound]


manifest_plans = st.builds(
    ManifestPlan,
    media_type=st.sampled_from(MANIFEST_TYPES),
    own_type=st.booleans(),
    fields=st.fixed_dictionaries(
        {
            "config": entries_of(tags=False).map(lambda e: e[:1]),
            "layers": entries_of(tags=False),
            "manifests": entries_of(tags=False),
            "blobs": entries_of(tags=False),
        }
    ),
    subject=st.none() | entries_of(tags=False).map(lambda e: e[0]),
    indent=indents,
)

documents = (
    json_values.map(lambda v: json.dumps(v).encode())
    | st.binary(max_size=200)
    | st.integers(1, 100_000).map(
        lambda n: b'{"schemaVersion":2,"manifests":' + b"[" * n + b"]" * n + b"}"
    )
    | index_plans.map(IndexPlan.data)
    | manifest_plans.map(ManifestPlan.data)
)


@pytest.mark.no_database
@FUZZ
@given(index_plans)
def test_a_well_formed_index_yields_exactly_its_sound_entries_as_roots(plan: IndexPlan) -> None:
    index = parse_index(plan.data(), "index.json")
    entries = plan.entries or []
    sound = [(i, e) for i, e in enumerate(entries) if e.sound]
    assert [r.position for r in index.roots] == [i for i, _ in sound]
    assert [r.digest for r in index.roots] == [e.digest for _, e in sound]
    for root, (_, entry) in zip(index.roots, sound, strict=True):
        assert root.media_type == (entry.media_type if isinstance(entry.media_type, str) else None)
        assert root.size == expected_size(entry.size)
        if entry.tag_usable:
            assert root.tag == (entry.tag if entry.tag in GOOD_TAGS else None)
        else:  # still a root that holds its image, under a tag no user can type
            assert root.tag is not None and not root.tag.isprintable()
    unsound = sum(not e.sound or not e.tag_usable for e in entries)
    assert len(index.problems) == unsound, index.problems
    assert all(str(p).startswith("index.json: manifests[") for p in index.problems)


@pytest.mark.no_database
@FUZZ
@given(manifest_plans)
def test_a_well_formed_manifest_yields_exactly_the_sound_descriptors_of_its_type(
    plan: ManifestPlan,
) -> None:
    parsed = parse_children(plan.declared, plan.data(), "sha256:" + "f" * 64)
    assert parsed.media_type == plan.media_type
    assert [c.digest for c in parsed.children] == [e.digest for e in plan.children()]
    assert [c.size for c in parsed.children] == [expected_size(e.size) for e in plan.children()]
    subject = plan.subject
    assert parsed.subject == (subject.digest if subject is not None and subject.sound else None)


# Hostile input: only typed errors escape, and what comes back is safe. Each test counts the
# examples that got past the parse with something to check and fails when too few did: a
# strategy that drifts into yielding only refused documents would make it pass on nothing.
REACHED = 0.2  # share of examples that must parse into at least one root (or child)


@pytest.mark.no_database
def test_parse_index_lets_only_typed_errors_escape_and_returns_safe_roots() -> None:
    tally = {"examples": 0, "with roots": 0}

    @FUZZ
    @given(documents)
    def parse(data: bytes) -> None:
        tally["examples"] += 1
        try:
            index = parse_index(data, "index.json")
        except RefcountError:
            return
        for root in index.roots:
            assert str(Digest.parse(root.digest)) == root.digest
            assert root.tag is None or isinstance(root.tag, str)
            assert root.tag is None or root.tag.isprintable() or root.tag.startswith(UNUSABLE_TAG)
        for problem in index.problems:
            assert "\n" not in str(problem)
        tally["with roots"] += bool(index.roots)

    parse()
    assert tally["with roots"] >= REACHED * tally["examples"], tally


@pytest.mark.no_database
def test_parse_children_lets_only_typed_errors_escape_and_returns_valid_digests() -> None:
    tally = {"examples": 0, "with children": 0}

    @FUZZ
    @given(st.sampled_from([*MEDIA_TYPES[:-1]]), documents)
    def parse(declared: str | None, data: bytes) -> None:
        tally["examples"] += 1
        try:
            parsed = parse_children(declared, data, "sha256:" + "f" * 64)
        except RefcountError:
            return
        for child in parsed.children:
            assert str(Digest.parse(child.digest)) == child.digest
        if parsed.subject is not None:
            Digest.parse(parsed.subject)
        for problem in parsed.problems:
            assert "\n" not in str(problem)
        tally["with children"] += bool(parsed.children)

    parse()
    assert tally["with children"] >= REACHED * tally["examples"], tally


# =============================================================================================
# Random store trees
# =============================================================================================


@dataclass(frozen=True)
class Ref:
    """A descriptor: of an earlier blob (by number), or a literal digest value."""

    target: int | tuple[str, Any]
    media_type: Any
    size: Any  # "real" for the target's true size
    urls: bool = False
    tag: Any = "absent"  # for index.json entries


@dataclass(frozen=True)
class Blob:
    kind: str  # layer, manifest, index, json, bytes
    payload: Any  # bytes, a JSON value, or (media type, [Ref], subject)
    name: str  # right, wrong, invalid, sha512, unknown-alg
    node: str  # file, dir, link-out, link-in, dangling, link-dir-out


blob_numbers = st.integers(0, 30)
targets = st.one_of(
    blob_numbers,
    blob_numbers,
    blob_numbers,
    st.sampled_from([*VALID_MISSING, *BAD_DIGESTS]).map(lambda value: ("literal", value)),
)


def refs(max_size: int) -> st.SearchStrategy[list[Ref]]:
    ref = st.builds(
        Ref,
        target=targets,
        media_type=st.sampled_from(MEDIA_TYPES),
        size=st.sampled_from(["real", "real", "real", None, 999, -1, "12"]),
        urls=st.booleans(),
    )
    return st.lists(ref, max_size=max_size)


entries = st.builds(
    Ref,
    target=targets,
    media_type=st.sampled_from([OCI_MANIFEST, OCI_MANIFEST, OCI_INDEX, *MEDIA_TYPES]),
    size=st.sampled_from(["real", "real", None, 999]),
    tag=st.sampled_from(["a", "b", "c", "a", None, "absent", *BAD_TAGS]),
)

blobs = st.builds(
    Blob,
    kind=st.sampled_from(["layer", "layer", "manifest", "manifest", "index", "json", "bytes"]),
    payload=st.tuples(
        st.binary(max_size=16),
        json_values,
        st.sampled_from(MEDIA_TYPES),
        refs(4),
        st.none() | refs(1),
    ),
    name=st.sampled_from(["right"] * 6 + ["wrong", "invalid", "sha512", "unknown-alg"]),
    node=st.sampled_from(
        ["file"] * 10 + ["dir", "link-out", "link-in", "dangling", "link-dir-out"]
    ),
)

entry_lists = st.lists(entries, min_size=1, max_size=6).map(lambda e: ("entries", e))
garbage = st.binary(max_size=40).map(lambda b: ("bytes", b)) | json_values.map(
    lambda v: ("json", v)
)


index_docs = mostly(entry_lists, garbage, 8)
# Phase 2 mostly drops some of the first entries (what frees blobs), else writes anew.
second_docs = mostly(
    st.lists(st.booleans(), min_size=6, max_size=6).map(lambda k: ("keep", k)), index_docs, 3
)


@dataclass(frozen=True)
class Plan:
    blobs: list[Blob]
    index: tuple[str, Any]
    second_index: tuple[str, Any] | None  # phase 2: an outside tool rewrites index.json
    removed: list[int]  # phase 2: an outside tool deletes these blob files


plans = st.builds(
    Plan,
    blobs=st.lists(blobs, min_size=1, max_size=12),
    index=index_docs,
    second_index=mostly(second_docs, st.none(), 5),
    removed=st.lists(st.integers(0, 30), max_size=3),
)


class Tree:
    """A materialized plan: the store, and a sibling directory nothing may touch."""

    def __init__(self, root: Path, plan: Plan) -> None:
        self.store = make_layout(root / "store")
        self.beside = root / "beside"
        self.beside.mkdir()
        (self.beside / "secret").write_text("not yours\n")
        (self.beside / "dir").mkdir()
        (self.beside / "dir" / "file").write_text("not yours either\n")
        self.entries: list[Ref] = []  # the last index.json entries written
        self.names: list[str] = []  # digest each blob was written under
        self.sizes: list[int] = []
        for number, blob in enumerate(plan.blobs):
            self._write(number, blob)

    def _resolve(self, ref: Ref) -> dict[str, Any]:
        if isinstance(ref.target, tuple) or not self.names:
            digest: Any = ref.target[1] if isinstance(ref.target, tuple) else VALID_MISSING[0]
            size: Any = 10 if ref.size == "real" else ref.size
        else:
            number = ref.target % len(self.names)
            digest = self.names[number]
            size = self.sizes[number] if ref.size == "real" else ref.size
        desc: dict[str, Any] = {"digest": digest}
        if ref.media_type is not None:
            desc["mediaType"] = ref.media_type
        if size is not None:
            desc["size"] = size
        if ref.urls:
            desc["urls"] = ["https://example.invalid/foreign"]
        if ref.tag != "absent":
            desc["annotations"] = {REF_NAME: ref.tag}
        return desc

    def _content(self, blob: Blob) -> bytes:
        raw, value, media_type, children, subject = blob.payload
        if blob.kind == "layer":
            return b"layer:" + raw
        if blob.kind == "bytes":
            return raw
        if blob.kind == "json":
            return json.dumps(value).encode()
        body: dict[str, Any] = {"schemaVersion": 2, "mediaType": media_type}
        descs = [self._resolve(r) for r in children]
        if blob.kind == "index":
            body["mediaType"] = OCI_INDEX if media_type in (7, None) else media_type
            body["manifests"] = descs
        else:
            body["mediaType"] = OCI_MANIFEST if media_type in (7, None) else media_type
            body["config"] = descs[0] if descs else {"digest": VALID_MISSING[0], "size": 2}
            body["layers"] = descs[1:]
            body["blobs"] = descs[1:]
        if subject:
            body["subject"] = self._resolve(subject[0])
        return json.dumps(body).encode()

    def _write(self, number: int, blob: Blob) -> None:
        data = self._content(blob)
        hexdigest = hashlib.sha256(data).hexdigest()
        name, directory = {
            "right": (hexdigest, "sha256"),
            "wrong": (hashlib.sha256(data + b"!").hexdigest(), "sha256"),
            "invalid": (f"{hexdigest[:20].upper()}.partial{number}", "sha256"),
            "sha512": (hashlib.sha512(data).hexdigest(), "sha512"),
            "unknown-alg": (hexdigest[:32], "md5"),
        }[blob.name]
        path = self.store / "blobs" / directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if os.path.lexists(path):
            return  # the same content twice: keep the first
        self.names.append(f"{directory}:{name}")
        self.sizes.append(len(data))
        if blob.node == "file":
            path.write_bytes(data)
        elif blob.node == "dir":
            path.mkdir()
            (path / "inside").write_bytes(data)
        elif blob.node == "link-out":
            path.symlink_to(self.beside / "secret")
        elif blob.node == "link-in":
            others = sorted(p for p in path.parent.iterdir() if p != path)
            path.symlink_to(others[0].name if others else "nowhere")
        elif blob.node == "dangling":
            path.symlink_to(self.beside / "no-such-file")
        else:
            path.symlink_to(self.beside / "dir")

    def write_index(self, doc: tuple[str, Any]) -> None:
        form, value = doc
        if form == "keep":
            form, value = "entries", [e for e, k in zip(self.entries, value, strict=False) if k]
        if form == "entries":
            self.entries = value
            data = json.dumps(
                {
                    "schemaVersion": 2,
                    "mediaType": OCI_INDEX,
                    "manifests": [self._resolve(e) for e in value],
                }
            ).encode()
        elif form == "json":
            data = json.dumps(value).encode()
        else:
            data = value
        temp = self.store / ".index.json.tmp"
        temp.write_bytes(data)
        temp.replace(self.store / "index.json")

    def remove(self, numbers: list[int]) -> None:
        for number in numbers:
            if self.names:
                algorithm, name = self.names[number % len(self.names)].split(":", 1)
                path = self.store / "blobs" / algorithm / name
                if path.is_file() and not path.is_symlink():
                    path.unlink()


# --- what must hold around every command ----------------------------------------------------

_BLOB_PATH = re.compile(r"blobs/(sha256/[0-9a-f]{64}|sha512/[0-9a-f]{128})")


def protected(store: Path) -> dict[str, tuple[int, str]]:
    """Every file of the store refcount must leave alone: all but .refcount/ and the regular
    files of blobs/ that carry a blob name."""
    return {
        path: value
        for path, value in listing(store).items()
        if not (_BLOB_PATH.fullmatch(path) and not value[1].startswith("symlink->"))
    }


def oracle_reachable(store: Path) -> set[str] | None:
    """What index.json reaches per the oracle; None when index.json is not a usable index."""
    try:
        return reachable(store)
    except (ValueError, AttributeError, TypeError, OSError):
        return None


def run(*args: str | Path) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main([str(a) for a in args])
    return code, out.getvalue(), err.getvalue()


def run_and_check(tree: Tree, *command: str) -> None:
    before_protected = protected(tree.store)
    before_beside = listing(tree.beside)
    before_blobs = blob_files(tree.store)
    code, out, err = run("--store", tree.store, *command)
    note(f"refcount {' '.join(command)} -> {code}\n{out}{err}")
    assert code in (0, 1, 2), (command, code, err)
    assert "Traceback" not in err and "internal error" not in err, err
    assert protected(tree.store) == before_protected
    assert listing(tree.beside) == before_beside
    roots = oracle_reachable(tree.store)
    gone = before_blobs - blob_files(tree.store)
    if roots is None:
        assert not gone, gone
    else:
        assert not gone & roots, gone & roots


@FUZZ
@given(plans)
def test_sync_and_verify_over_random_stores_fail_cleanly_and_lose_nothing(plan: Plan) -> None:
    root = Path(tempfile.mkdtemp(prefix="refcount-fuzz-"))
    try:
        tree = Tree(root, plan)
        tree.write_index(plan.index)
        run_and_check(tree, "sync")
        run_and_check(tree, "verify")
        if plan.second_index is not None:
            tree.write_index(plan.second_index)
        tree.remove(plan.removed)
        run_and_check(tree, "sync")
        run_and_check(tree, "verify")
    finally:
        shutil.rmtree(root, ignore_errors=True)
