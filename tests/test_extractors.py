"""Extractor plug-ins (issue 11): edges of media types refcount does not parse itself.

The plug-ins come through real entry points: refcount's own chunked-rootfs, and
the test package `tests/plugins/refcount_testext` (installed by scripts/test.sh),
whose `chunklist` reads a JSON artifact and whose `crashing`, `hanging` and
`nonsense` fail the three ways a plug-in can. Counts are checked against the
oracle in storekit, which reads both formats with its own code.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable
from datetime import timedelta
from importlib import metadata
from pathlib import Path

import pytest
from conftest import Cli
from storekit import (
    CHUNKLIST,
    ROOTFS_CHUNKED,
    add_image,
    add_rootfs_image,
    blob_files,
    chunked_rootfs,
    listing,
    sha256_digest,
    write_blob,
)
from test_core import consistent, trash_files

import refcount
from refcount import extractors, oci, rootfs
from refcount.core import expansion
from refcount.extractors import Child, Registry
from refcount.store import Store

CRASHING = "application/vnd.example.crashing.v1"
HANGING = "application/vnd.example.hanging.v1"
NONSENSE = "application/vnd.example.nonsense.v1"

CHUNKS = [f"chunk {i}".encode() for i in range(5)]
C = [sha256_digest(c) for c in CHUNKS]


@pytest.fixture(autouse=True, scope="module")
def test_plugins_installed() -> None:
    names = {p.name for p in metadata.entry_points(group=extractors.GROUP)}
    if "chunklist" not in names:
        pytest.fail(
            "the test extractors are not installed: "
            "pip install -e tests/plugins/refcount_testext (scripts/test.sh does)"
        )


def write_chunks(store: Path, chunks: list[bytes] = CHUNKS) -> None:
    for chunk in chunks:
        write_blob(store, chunk, "application/octet-stream")


def chunklist_image(store: Path, chunks: list[bytes], tag: str) -> dict[str, object]:
    """An image whose one layer is a chunklist artifact naming `chunks` (written too)."""
    write_chunks(store, chunks)
    body = {"chunks": [{"digest": sha256_digest(c), "size": len(c)} for c in chunks]}
    layer = write_blob(store, json.dumps(body).encode(), CHUNKLIST)
    return add_image(store, [layer], tag=tag)


def damaged_image(store: Path, media_type: str, tag: str) -> dict[str, object]:
    """An image whose layer, of a failing extractor's type, mentions chunk 0 as text
    (and first, on a line of its own, for `nonsense`) and chunk 1 by its raw bytes."""
    write_chunks(store, CHUNKS[:2])
    data = f"{C[0]}\n".encode() + b"binary " + hashlib.sha256(CHUNKS[1]).digest() + b" end"
    return add_image(store, [write_blob(store, data, media_type)], tag=tag)


# --- the entry points and `refcount plugins` -------------------------------------------


def test_plugins_lists_every_installed_extractor_with_its_package_and_types(cli: Cli) -> None:
    result = cli("plugins", "--json")
    assert result.code == 0, result.err
    found = {e["name"]: e for e in result.json()["extractors"]}
    assert found["chunked-rootfs"]["distribution"] == "refcount"
    assert found["chunked-rootfs"]["media_types"] == [ROOTFS_CHUNKED]
    assert found["chunklist"]["distribution"] == "refcount-testext"
    assert found["chunklist"]["version"] == "1.0"
    assert found["hanging"]["media_types"] == [HANGING]
    text = cli("plugins")
    assert text.code == 0
    lines = text.out.splitlines()
    assert lines[0].split() == ["EXTRACTOR", "PACKAGE", "MEDIA", "TYPES"]
    assert any(
        line.split() == ["chunklist", "refcount-testext", "1.0", CHUNKLIST] for line in lines
    )


def test_an_entry_point_that_does_not_load_is_listed_with_why_and_is_a_problem() -> None:
    points = [
        metadata.EntryPoint("gone", "refcount_testext:no_such_thing", extractors.GROUP),
        metadata.EntryPoint("chunklist", "refcount_testext:ChunkList", extractors.GROUP),
    ]
    report = extractors.load(points).report()
    by_name = {e.name: e for e in report.extractors}
    assert by_name["chunklist"].media_types == (CHUNKLIST,) and by_name["chunklist"].error is None
    assert by_name["gone"].error is not None and "does not load" in by_name["gone"].error
    assert "no_such_thing" in by_name["gone"].error
    assert report.exit_code == 1


class Claims:
    def __init__(self, *types: str) -> None:
        self.media_types = types

    def extract(self, data: bytes, media_type: str) -> list[Child]:
        return []


def test_an_extractor_gets_no_manifest_type_and_no_type_an_earlier_one_claimed() -> None:
    bare = Claims()
    bare.media_types = "application/x-one"  # type: ignore[assignment]
    registry = Registry.of(
        [
            ("b-second", Claims(CHUNKLIST, "application/x-b"), None),
            ("a-first", Claims(CHUNKLIST, oci.OCI_MANIFEST), None),
            ("c-not-one", object(), None),
            ("d-bare-string", bare, None),
        ]
    )
    info = {e.name: e for e in registry.report().extractors}
    assert info["a-first"].media_types == (CHUNKLIST,)
    assert info["a-first"].refused == (f"{oci.OCI_MANIFEST} (read by refcount itself)",)
    assert info["b-second"].media_types == ("application/x-b",)
    assert info["b-second"].refused == (f"{CHUNKLIST} (claimed by a-first)",)
    assert info["c-not-one"].error is not None and "media_types" in info["c-not-one"].error
    assert (
        info["d-bare-string"].error
        == "cannot be used: TypeError: media_types is not a collection of strings"
    )
    assert not registry.handles(oci.OCI_MANIFEST)


# --- a sound plug-in: edges counted, released and verified like the parser's ------------


def test_chunks_a_plugin_names_are_counted_and_freed_exactly_with_their_image(
    store: Path,
) -> None:
    a = chunklist_image(store, CHUNKS[:3], "a")
    chunklist_image(store, CHUNKS[2:4], "b")  # chunk 2 is in both
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        assert rc.count(C[2]) == 2 and rc.count(C[0]) == 1
        before = blob_files(store)
        report = rc.delete_tag("a")
        freed = {b.digest for b in report.freed}
        assert freed == before - blob_files(store)
        assert {C[0], C[1]} <= freed and C[2] not in freed
        assert len(freed) == 5  # the manifest, its config, the chunklist and two chunks
        assert a["digest"] in trash_files(store)
        consistent(rc, store)
        assert {C[2], C[3]} <= blob_files(store)


def test_show_lists_the_chunks_of_an_extracted_blob_as_its_children(store: Path) -> None:
    manifest = chunklist_image(store, CHUNKS[:2], "a")
    layer = json.loads((store / "blobs/sha256" / str(manifest["digest"])[7:]).read_bytes())
    with refcount.open(store) as rc:
        rc.init()
        info = rc.show(layer["layers"][0]["digest"])
        chunk = rc.show(C[0])
    assert {(c.digest, c.kind) for c in info.children} == {(C[0], "extracted"), (C[1], "extracted")}
    assert info.problem is None
    assert chunk.size == len(CHUNKS[0])
    assert [p.digest for p in chunk.parents] == [layer["layers"][0]["digest"]]


def test_a_child_an_extractor_gives_a_type_is_read_in_turn(store: Path) -> None:
    """chunklist -> (a rootfs, a chunk) and rootfs -> chunks: the formats nest."""
    write_chunks(store, CHUNKS[:3])
    nested = write_blob(store, chunked_rootfs(CHUNKS[:2]), ROOTFS_CHUNKED)
    body = {"chunks": [{"digest": nested["digest"], "mediaType": ROOTFS_CHUNKED}, {"digest": C[2]}]}
    add_image(store, [write_blob(store, json.dumps(body).encode(), CHUNKLIST)], tag="a")
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        assert [rc.count(c) for c in C[:3]] == [1, 1, 1]
        rc.delete_tag("a")
        assert not {nested["digest"], *C[:3]} & blob_files(store)


def test_a_json_blob_naming_its_own_custom_type_is_read_by_that_types_extractor(
    store: Path,
) -> None:
    write_chunks(store, CHUNKS[:1])
    body = {"mediaType": CHUNKLIST, "chunks": [{"digest": C[0]}]}
    artifact = write_blob(store, json.dumps(body).encode(), CHUNKLIST)
    del artifact["mediaType"]  # the descriptor does not say; the blob does
    manifest = add_image(store, [artifact], tag="a")
    with refcount.open(store) as rc:
        rc.init()
        assert rc.count(C[0]) == 1
        assert rc.verify().ok
        rc.delete_tag("a")
        assert C[0] not in blob_files(store)
        assert manifest["digest"] in trash_files(store)


def test_a_blob_of_a_type_no_extractor_claims_stays_a_leaf(store: Path) -> None:
    write_chunks(store, CHUNKS[:1])
    body = {"chunks": [{"digest": C[0]}]}
    add_image(
        store, [write_blob(store, json.dumps(body).encode(), "application/x-unknown")], tag="a"
    )
    with refcount.open(store) as rc:
        rc.init()
        assert rc.count(C[0]) == 0
        assert rc.verify().ok  # the chunk is an orphan: consistent, and reported as one


# --- failing plug-ins never cost data ----------------------------------------------------


@pytest.mark.parametrize(
    ("media_type", "why"),
    [(CRASHING, "raised RuntimeError: cannot read this"), (NONSENSE, "item 1")],
)
def test_a_failing_extractor_frees_nothing_its_blob_mentions_and_verify_reports_it(
    store: Path, cli: Cli, media_type: str, why: str
) -> None:
    damaged_image(store, media_type, "a")
    chunklist_image(store, CHUNKS[:1], "b")
    assert cli("--store", store, "--trash-ttl", "0", "init").code == 0
    with refcount.open(store) as rc:
        assert rc.count(C[0]) == 2  # chunk 0 by text (and valid item), and by b's chunklist
        assert rc.count(C[1]) == 1  # by its raw bytes
    before = listing(store)
    assert cli("--store", store, "--trash-ttl", "0", "delete", "tag", "b").code == 0
    assert cli("--store", store, "gc", "--grace", "0").code == 0
    assert {C[0], C[1]} <= blob_files(store)
    verify = cli("--store", store, "verify")
    assert verify.code == 1
    assert f"extractor {media_type.split('.')[-2]}" in verify.out + verify.err
    assert why in verify.out + verify.err
    assert set(listing(store)) <= set(before)  # only b's own blobs left
    # Its image cannot be deleted while the blob is damaged, as for a damaged manifest.
    kept = listing(store, include_refcount=True)
    refused = cli("--store", store, "delete", "tag", "a")
    assert refused.code == 2
    assert "its image holds a damaged blob" in refused.err
    assert f"extractor {media_type.split('.')[-2]}" in refused.err
    assert refused.err.count("\n") == 1
    assert listing(store, include_refcount=True) == kept


def test_a_hanging_extractor_times_out_and_its_blob_holds_what_it_mentions(
    store: Path,
) -> None:
    damaged_image(store, HANGING, "a")

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "refcount", "--store", str(store)]
        return subprocess.run(
            [*command, "--extractor-timeout", "1s", *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    init = run("init")
    assert init.returncode == 0, init.stderr
    assert "timed out after 1s" in init.stderr
    assert run("gc", "--grace", "0").returncode == 0
    assert {C[0], C[1]} <= blob_files(store)
    verify = run("--json", "verify")
    assert verify.returncode == 1
    problems = json.loads(verify.stdout)["problems"]
    assert any("extractor hanging: timed out after 1s" in p for p in problems)


def test_a_timed_out_extractor_is_not_called_again_in_the_process() -> None:
    calls = []

    class Hangs:
        media_types = (HANGING,)

        def extract(self, data: bytes, media_type: str) -> list[str]:
            calls.append(data)
            threading.Event().wait()
            return []

    registry = Registry.of([("hangs", Hangs(), None)])
    first = registry.extract(HANGING, b"x", C[4], timeout=0.2)
    second = registry.extract(HANGING, b"y", C[4], timeout=0.2)
    assert first.problem is not None and "timed out after 0.2s" in first.problem
    assert second.problem is not None and "not called again" in second.problem
    assert calls == [b"x"]


def test_a_forked_child_calls_extractors_on_a_thread_of_its_own() -> None:
    registry = Registry.of([("rootfs", rootfs.ChunkedRootfs, None)])
    data = chunked_rootfs(CHUNKS[:1])
    assert registry.extract(ROOTFS_CHUNKED, data, C[4], timeout=5).problem is None
    pid = os.fork()
    if pid == 0:  # the parent's worker thread does not exist here
        found = registry.extract(ROOTFS_CHUNKED, data, C[4], timeout=5)
        os._exit(0 if found.problem is None and found.children[0].digest == C[0] else 1)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize("value", ["0", "-1s", "soon"])
def test_a_bad_extractor_timeout_is_refused_and_changes_nothing(
    store: Path, cli: Cli, value: str
) -> None:
    add_rootfs_image(store, CHUNKS[:2], tag="a")
    before = listing(store, include_refcount=True)
    result = cli("--store", store, "--extractor-timeout", value, "init")
    assert result.code == 2
    assert value in result.err and result.err.count("\n") == 1
    assert listing(store, include_refcount=True) == before


# --- the chunked rootfs refcount ships ---------------------------------------------------


def test_a_chunked_rootfs_holds_its_chunks_and_frees_exactly_those_no_other_root_needs(
    store: Path,
) -> None:
    add_rootfs_image(store, CHUNKS[:3], tag="a", tree=b"file tree of a")
    add_rootfs_image(store, CHUNKS[2:5], tag="b", tree=b"file tree of b")
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        assert [rc.count(c) for c in C] == [1, 1, 2, 1, 1]
        rc.delete_tag("a")
        consistent(rc, store)
        assert {C[0], C[1]} <= trash_files(store)
        assert set(C[2:]) <= blob_files(store)
        rc.delete_tag("b")
        consistent(rc, store)
        assert blob_files(store) == set()


def test_chunked_rootfs_images_pushed_one_by_one_count_as_init_does(store: Path) -> None:
    with refcount.open(store) as rc:
        rc.init()
        add_rootfs_image(store, CHUNKS[:2], tag="a")
        rc.sync()
        add_rootfs_image(store, CHUNKS[1:], tag="b")
        rc.sync()
        consistent(rc, store)


def test_chunks_are_opaque_bytes_never_read_however_large_or_manifest_like(
    store: Path,
) -> None:
    big = b"x" * 1000  # over the --max-manifest below: read, it would be a damaged manifest
    write_blob(store, b"a layer only a chunk mentions", "application/octet-stream")
    inner = add_image(store, [b"a layer only a chunk mentions"], tag=None, index_entry=False)
    manifest_like = (store / "blobs/sha256" / str(inner["digest"])[7:]).read_bytes()
    add_rootfs_image(store, [big, manifest_like], tag="a")
    with refcount.open(store, max_manifest=800) as rc:
        rc.init()
        report = rc.verify()
        assert report.ok and report.problems == ()
        assert rc.count(sha256_digest(big)) == 1
        assert rc.count(sha256_digest(b"a layer only a chunk mentions")) == 0  # never read


@pytest.mark.parametrize(
    ("damage", "why", "named"),
    [
        (lambda d: b"NOTROOTS" + d[8:], "magic", 3),
        (lambda d: d[:8] + b"\x00\x09" + d[10:], "version 9 is not 1", 3),
        (lambda d: d[: 16 + 40], "3 chunks do not fit in 56 bytes", 1),  # one entry is left
    ],
)
def test_a_damaged_chunked_rootfs_frees_none_of_the_chunks_its_bytes_name(
    store: Path, damage: Callable[[bytes], bytes], why: str, named: int
) -> None:
    """What the damaged bytes still name is counted; gc sweeps no orphan meanwhile."""
    write_chunks(store, CHUNKS[:3])
    data = damage(chunked_rootfs(CHUNKS[:3]))
    add_image(store, [write_blob(store, data, ROOTFS_CHUNKED)], tag="a")
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
        report = rc.verify()
        assert [rc.count(c) for c in C[:3]] == [1] * named + [0] * (3 - named)
        assert rc.gc(grace=timedelta(0)).swept == ()
    assert not report.ok
    assert any(f"extractor chunked-rootfs: raised ValueError: {why}" in p for p in report.problems)
    assert set(C[:3]) <= blob_files(store)


def test_the_shipped_builder_and_the_test_builder_write_the_same_bytes() -> None:
    table = [(hashlib.sha256(c).digest(), len(c)) for c in CHUNKS]
    data = rootfs.build(table, b"tree")
    assert data == chunked_rootfs(CHUNKS, b"tree")
    named = list(rootfs.ChunkedRootfs().extract(data, rootfs.MEDIA_TYPE))
    assert named == [Child(d, len(c)) for d, c in zip(C, CHUNKS, strict=True)]


# --- what a damaged blob mentions ---------------------------------------------------------


@pytest.mark.parametrize("budget", [1 << 26, 0])  # a search per digest; a sliding window
def test_salvage_finds_raw_digests_of_known_blobs_wherever_the_chunks_split_them(
    monkeypatch: pytest.MonkeyPatch, budget: int
) -> None:
    monkeypatch.setattr(oci, "_FIND_BUDGET", budget)
    raw = hashlib.sha256(CHUNKS[1]).digest()
    data = b"x" * 100 + raw + b"y" * 7 + C[0].encode() + b"z"
    for size in (1, 17, 64, len(data)):
        chunks = [data[i : i + size] for i in range(0, len(data), size)]
        found = {d.digest for d in oci.salvage(chunks, {C[1], C[2]})}
        assert found == {C[0], C[1]}, size


# --- the README's worked plug-in ------------------------------------------------------------


def readme_blocks(heading: str) -> dict[str, str]:
    """The first fenced code block of each language in one README section."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    found: dict[str, str] = {}
    for block in section.split("```")[1::2]:
        language, body = block.split("\n", 1)
        found.setdefault(language, body)  # the first of each language
    return found


def test_the_readme_plugin_counts_the_parts_of_a_bundle_and_fails_safe_on_damage(
    store: Path,
) -> None:
    blocks = readme_blocks("Teaching refcount a new format")
    assert 'bundle = "mytool_refcount:Bundle"' in blocks["toml"]
    assert len(blocks["python"].splitlines()) <= 20
    namespace: dict[str, object] = {}
    exec(compile(blocks["python"], "README.md", "exec"), namespace)
    registry = Registry.of([("bundle", namespace["Bundle"], None)])
    (media_type,) = registry.report().extractors[0].media_types
    write_chunks(store, CHUNKS[:2])
    sound = json.dumps({"parts": [{"digest": C[0], "size": len(CHUNKS[0])}]}).encode()
    assert registry.extract(media_type, sound, C[4], timeout=5).children[0].digest == C[0]
    damaged = json.dumps({"parts": "sha256:" + "0" * 64, "other": C[1]}).encode()
    found = expansion.expand(ReaderOf(store, damaged), C[4], media_type, extractors=registry)
    assert found is not None and found.problem is not None and "TypeError" in found.problem
    assert {c.digest for c in found.children} == {"sha256:" + "0" * 64, C[1]}


class ReaderOf(Store):
    """The store, with one more blob whose bytes are given (for expand)."""

    def __init__(self, store: Path, data: bytes) -> None:
        super().__init__(store)
        self.data = data

    def read_blob(self, digest: str) -> bytes | None:
        return self.data if digest == C[4] else super().read_blob(digest)
