"""Hostile and broken stores (issue 4): refused or skipped, one line naming the culprit, no data lost.

The contract every test here checks (SPEC §1, §4):

- a store whose layout itself is unusable (index.json, oci-layout) is refused by every
  command with exit 2 and one stderr line naming the file and what is wrong with it;
- `init` and `sync` skip a bad part (an entry, a manifest, a child descriptor, a file)
  with a "skipped: ..." line naming it, and count the rest of the store right;
- `verify` reports every bad part that remains (exit 1), naming it;
- `delete tag` refuses (exit 2) when its own image is affected, and works for the others;
- nothing is ever created, changed or deleted because of bad input: the listing of the
  store (and of everything around it) is byte-identical before and after.

The store lives deep inside tmp_path (`tmp_path/x/y/store`), with a sentinel
`etc/passwd` at every level a `sha256:../../...` digest could reach, and an `outside/`
directory that planted symbolic links point at.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from conftest import AnotherDatabase, Cli, Result
from storekit import (
    OCI_CONFIG,
    OCI_INDEX,
    OCI_LAYER,
    OCI_MANIFEST,
    REF_NAME,
    add_entry,
    add_image,
    blob_files,
    blob_path,
    expected_counts,
    listing,
    make_layout,
    read_index,
    sha256_digest,
    write_blob,
)

import refcount
from refcount.cli import main

COMMANDS = [["init"], ["sync"], ["verify"], ["delete", "tag", "a"], ["gc"]]
TRAVERSALS = [f"sha256:{'../' * n}etc/passwd" for n in (2, 3, 4, 5)]
BAD_DIGESTS: list[Any] = [
    *TRAVERSALS,
    "sha256:" + "A" * 64,  # uppercase hex
    "sha256:" + "a" * 63,  # short
    "sha256:abc",
    "sha512:" + "a" * 64,  # right hex, wrong length for the algorithm
    "md5:" + "0" * 32,  # unknown algorithm
    "sha256:",
    "",
    None,
    42,
]
BAD_TAGS: list[Any] = [
    "bad\nname",
    "tab\there",
    "nul\x00",
    "del\x7f",
    "\udcff",  # a lone surrogate: what a JSON "\\udcff" escape decodes to
    "rtl\u202eoverride",
    "",
    42,
    ["list"],
]


def label(value: object) -> str:
    return repr(value)[:24]


# --- the site: a store deep in tmp_path, sentinels around it -------------------------------


@dataclass
class Site:
    root: Path  # tmp_path: everything under it is watched
    store: Path
    outside: Path  # a directory outside the store that links may point at
    flags: list[str] = field(default_factory=list)  # global options for every command
    healthy: dict[str, int] = field(default_factory=dict)  # oracle counts of images a and b
    a: dict[str, Any] = field(default_factory=dict)
    b: dict[str, Any] = field(default_factory=dict)

    def args(self, *args: str | Path) -> list[str]:
        return [*self.flags, "--store", str(self.store), *(str(a) for a in args)]

    def world(self) -> dict[str, tuple[int, str]]:
        """Every file under tmp_path except the store's own .refcount/ state."""
        state = f"{self.store.relative_to(self.root).as_posix()}/.refcount/"
        return {k: v for k, v in listing(self.root).items() if not k.startswith(state)}

    def sentinels(self) -> list[Path]:
        blobs = self.store / "blobs" / "sha256"
        return [Path(os.path.normpath(blobs / d.split(":", 1)[1])) for d in TRAVERSALS]


def build_site(root: Path) -> Site:
    """An empty layout at root/x/y/store, sentinels where traversals land."""
    store = make_layout(root / "x" / "y" / "store")
    outside = root / "outside"
    outside.mkdir()
    (outside / "secret").write_bytes(b"not yours\n")
    result = Site(root, store, outside)
    for sentinel in result.sentinels():
        sentinel.parent.mkdir(parents=True, exist_ok=True)
        sentinel.write_text("root:x:0:0::/root:/bin/sh\n")
    return result


def add_two_images(site: Site) -> Site:
    """Two healthy images a and b sharing a base layer."""
    site.a = add_image(site.store, [b"base", b"layer a"], tag="a", config=b'{"a":1}')
    site.b = add_image(site.store, [b"base", b"layer b"], tag="b", config=b'{"b":1}')
    site.healthy = expected_counts(site.store)
    return site


@pytest.fixture
def site(tmp_path: Path) -> Site:
    return build_site(tmp_path)


@pytest.fixture
def images(site: Site) -> Site:
    return add_two_images(site)


def own_blobs(store: Path, manifest: dict[str, Any]) -> set[str]:
    """The manifest and every blob it lists (what deleting its tag may free)."""
    body = json.loads(blob_path(store, manifest["digest"]).read_bytes())
    return {manifest["digest"], body["config"]["digest"], *(x["digest"] for x in body["layers"])}


def a_exclusive(site: Site) -> set[str]:
    return own_blobs(site.store, site.a) - own_blobs(site.store, site.b)


# --- assertions ----------------------------------------------------------------------------


def one_error_line(result: Result, code: int, *needles: str) -> None:
    """Exit `code`, and exactly one stderr line `refcount: error: ...` holding every needle."""
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert result.code == code, (result.code, result.out, result.err)
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("refcount: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def skipped(result: Result, *needles: str) -> None:
    """init/sync carried on and printed one `skipped:` line holding every needle; exit 0,
    or 1 when the report also lists referenced blobs missing (a skipped file is absent)."""
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    missing = any(x.startswith("missing: ") for x in result.out.splitlines())
    assert result.code == (1 if missing else 0), (result.code, result.out, result.err)
    lines = [x for x in result.out.splitlines() if x.startswith("skipped: ")]
    assert any(all(n in x for n in needles) for x in lines), (needles, result.out)


def reported(result: Result, *needles: str) -> None:
    """verify failed (exit 1) with one line of its report holding every needle."""
    assert "Traceback" not in result.err and "internal error" not in result.err, result.err
    assert result.code == 1, (result.code, result.out, result.err)
    assert any(all(n in x for n in needles) for x in result.out.splitlines()), (
        needles,
        result.out,
    )
    assert "FAILED" in result.out


def counted_right(site: Site, expected: dict[str, int]) -> None:
    with refcount.open(site.store) as rc:
        assert {d: rc.count(d) for d in expected} == expected


@contextmanager
def nothing_changes(site: Site, *, state: bool = False) -> Iterator[None]:
    """The store (with .refcount/ when `state`) and everything around it stay byte-identical."""
    store_before = listing(site.store, include_refcount=state)
    world_before = site.world()
    yield
    assert listing(site.store, include_refcount=state) == store_before
    assert site.world() == world_before
    assert all(s.read_text().startswith("root:") for s in site.sentinels())


def changed(before: dict[str, Any], after: dict[str, Any]) -> set[str]:
    return {k for k in before.keys() | after.keys() if before.get(k) != after.get(k)}


def hex_of(digest: str) -> str:
    """How a message may name a blob: its digest, or its path, both hold the hex."""
    return digest.split(":", 1)[1]


def blob_rel(digest: str) -> str:
    return "blobs/" + digest.replace(":", "/", 1)


def write_raw_blob(store: Path, name: str, data: bytes) -> Path:
    """A file under blobs/ whose name need not match its content (a crafted store)."""
    path = blob_path(store, name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


# =============================================================================================
# 1. The layout itself: every command refuses with exit 2, naming the file
# =============================================================================================


def truncate_index(site: Site) -> None:
    data = (site.store / "index.json").read_bytes()
    (site.store / "index.json").write_bytes(data[: len(data) // 2])


def index_not_an_object(site: Site) -> None:
    (site.store / "index.json").write_text("[]")


def index_manifests_not_a_list(site: Site) -> None:
    (site.store / "index.json").write_text('{"schemaVersion":2,"manifests":{"digest":"x"}}')


def index_document(text: str) -> Callable[[Site], None]:
    """A damage that replaces index.json with a document that parses but is no image index."""

    def damage(site: Site) -> None:
        (site.store / "index.json").write_text(text)

    damage.__name__ = f"index_is_{text}"
    return damage


def index_with_raw_invalid_utf8(site: Site) -> None:
    data = (site.store / "index.json").read_bytes()
    (site.store / "index.json").write_bytes(data.replace(b'"a"', b'"a\xff\xfe"'))


def index_is_a_directory(site: Site) -> None:
    (site.store / "index.json").unlink()
    (site.store / "index.json").mkdir()
    (site.store / "index.json" / "manifests").write_text("[]")


def index_links_outside(site: Site) -> None:
    target = site.outside / "index.json"
    (site.store / "index.json").rename(target)
    (site.store / "index.json").symlink_to(target)


def index_links_inside(site: Site) -> None:
    (site.store / "index.json").rename(site.store / "index.orig.json")
    (site.store / "index.json").symlink_to("index.orig.json")


def layout_missing(site: Site) -> None:
    (site.store / "oci-layout").unlink()


def layout_unsupported(site: Site) -> None:
    (site.store / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')


def layout_not_json(site: Site) -> None:
    (site.store / "oci-layout").write_text('{"imageLayoutVersion": ')


def layout_is_a_directory(site: Site) -> None:
    (site.store / "oci-layout").unlink()
    (site.store / "oci-layout").mkdir()


def layout_links_outside(site: Site) -> None:
    target = site.outside / "oci-layout"
    (site.store / "oci-layout").rename(target)
    (site.store / "oci-layout").symlink_to(target)


LAYOUT_DAMAGE = [
    pytest.param(truncate_index, "index.json", "invalid JSON", id="truncated index.json"),
    pytest.param(index_not_an_object, "index.json", "JSON", id="index.json []"),
    pytest.param(
        index_manifests_not_a_list, "index.json", "manifests is not a list", id="manifests {}"
    ),
    pytest.param(
        index_with_raw_invalid_utf8, "index.json", "invalid JSON", id="index.json bad UTF-8"
    ),
    # Documents that parse but are not an image index: read as "no roots", each one
    # used to free every blob of the store (issue 8).
    pytest.param(index_document("{}"), "index.json", "schemaVersion is missing", id="index {}"),
    pytest.param(
        index_document('{"schemaVersion":2}'),
        "index.json",
        "manifests is missing",
        id="index without manifests",
    ),
    pytest.param(
        index_document('{"schemaVersion":3,"manifests":[]}'),
        "index.json",
        "schemaVersion is 3, not 2",
        id="index schema 3",
    ),
    pytest.param(
        index_document('{"schemaVersion":2,"manifests":"none"}'),
        "index.json",
        "manifests is not a list",
        id="manifests a string",
    ),
    pytest.param(index_is_a_directory, "index.json", "not a regular file", id="index.json dir"),
    pytest.param(index_links_outside, "index.json", "symbolic link", id="index.json link out"),
    pytest.param(index_links_inside, "index.json", "symbolic link", id="index.json link in"),
    pytest.param(layout_missing, "oci-layout", "missing", id="no oci-layout"),
    pytest.param(layout_unsupported, "oci-layout", "'2.0.0'", id="oci-layout 2.0.0"),
    pytest.param(layout_not_json, "oci-layout", "not valid JSON", id="oci-layout not JSON"),
    pytest.param(layout_is_a_directory, "oci-layout", "not a regular file", id="oci-layout dir"),
    pytest.param(layout_links_outside, "oci-layout", "symbolic link", id="oci-layout link out"),
]


@pytest.mark.parametrize(("damage", "file", "why"), LAYOUT_DAMAGE)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_broken_layout_is_refused_by_every_command_and_nothing_is_touched(
    cli: Cli,
    images: Site,
    damage: Callable[[Site], None],
    file: str,
    why: str,
    command: list[str],
) -> None:
    assert cli(*images.args("init")).code == 0
    damage(images)
    with nothing_changes(images, state=True):
        result = cli(*images.args("--trash-ttl", "0", *command))
    one_error_line(result, 2, str(images.store / file), why)


@pytest.mark.parametrize(("damage", "file", "why"), LAYOUT_DAMAGE)
def test_a_broken_layout_is_refused_by_its_very_first_init(
    cli: Cli, images: Site, damage: Callable[[Site], None], file: str, why: str
) -> None:
    damage(images)
    with nothing_changes(images):
        result = cli(*images.args("init"))
    one_error_line(result, 2, str(images.store / file), why)


# =============================================================================================
# 2. Broken manifest blobs: skipped by init/sync, reported by verify, refused by delete
# =============================================================================================

CAP = 1024  # --max-manifest for the size-cap case: the healthy manifests are ~540 bytes


@dataclass
class Broken:
    site: Site
    digest: str  # the broken manifest
    needle: str  # what the message must say about it
    entry: dict[str, Any]  # the index.json entry (tag "bad") that brings it in
    keep: set[str]  # blobs on disk that the broken image holds or may hold

    def arrive(self) -> None:
        add_entry(self.site.store, self.entry, "bad")


def manifest_body(site: Site, name: str, **override: Any) -> dict[str, Any]:
    return {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": write_blob(site.store, dumps({"broken": name}), OCI_CONFIG),
        "layers": [write_blob(site.store, f"layer of {name}".encode(), OCI_LAYER)],
        **override,
    }


def invalid_json(site: Site) -> bytes:
    data = dumps(manifest_body(site, "invalid"))
    return data[: len(data) // 2]


def not_an_object(site: Site) -> bytes:
    manifest_body(site, "list")  # its would-be blobs are on disk all the same
    return b'["not", "a", "manifest"]'


def wrong_media_type(site: Site) -> bytes:
    return dumps(manifest_body(site, "typed", mediaType=OCI_LAYER))


def over_the_cap(site: Site) -> bytes:
    return dumps(manifest_body(site, "big", annotations={"pad": "x" * 2 * CAP}))


def layers_not_a_list(site: Site) -> bytes:
    body = manifest_body(site, "dict")
    return dumps({**body, "layers": body["layers"][0]})


BROKEN_KINDS = {
    "invalid JSON": (invalid_json, "invalid JSON"),
    "not an object": (not_an_object, "not a JSON object"),
    "wrong mediaType": (wrong_media_type, "media"),
    "over the size cap": (over_the_cap, str(CAP)),
    "layers not a list": (layers_not_a_list, "layers is not a list"),
}


@pytest.fixture(
    params=[(k, p) for k in BROKEN_KINDS for p in ("root", "in an index")],
    ids=lambda kp: f"{kp[0]}, {kp[1]}",
)
def broken(request: pytest.FixtureRequest, images: Site) -> Broken:
    """Images a and b, plus a broken manifest (tag "bad", added by `arrive()`).

    As a root, or as one platform of an index whose other platform is sound.
    """
    kind, placement = request.param
    build, needle = BROKEN_KINDS[kind]
    site = images
    site.flags = ["--max-manifest", str(CAP)]
    before = blob_files(site.store)
    bad = write_blob(site.store, build(site), OCI_MANIFEST)
    entry = bad
    if placement == "in an index":
        sound = add_image(site.store, [b"sound platform"], tag=None, index_entry=False)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [bad, sound]}
        entry = write_blob(site.store, dumps(index), OCI_INDEX)
    return Broken(site, bad["digest"], needle, entry, blob_files(site.store) - before)


@pytest.mark.parametrize("command", ["init", "sync"])
def test_a_broken_manifest_is_skipped_and_the_other_images_are_counted(
    cli: Cli, broken: Broken, command: str
) -> None:
    site = broken.site
    if command == "sync":
        assert cli(*site.args("init")).code == 0
    broken.arrive()
    with nothing_changes(site):
        result = cli(*site.args(command))
    skipped(result, hex_of(broken.digest), broken.needle)
    counted_right(site, site.healthy)


def test_verify_reports_a_broken_manifest_by_digest(cli: Cli, broken: Broken) -> None:
    broken.arrive()
    site = broken.site
    assert cli(*site.args("init")).code == 0
    with nothing_changes(site):
        result = cli(*site.args("verify"))
    reported(result, hex_of(broken.digest), broken.needle)


def test_delete_refuses_the_tag_whose_image_holds_a_broken_manifest(
    cli: Cli, broken: Broken
) -> None:
    broken.arrive()
    site = broken.site
    assert cli(*site.args("init")).code == 0
    with nothing_changes(site):
        result = cli(*site.args("delete", "tag", "bad"))
    one_error_line(result, 2, hex_of(broken.digest), broken.needle)


def test_delete_of_a_healthy_tag_beside_a_broken_manifest_frees_only_its_own_blobs(
    cli: Cli, broken: Broken
) -> None:
    broken.arrive()
    site = broken.site
    assert cli(*site.args("init")).code == 0
    before = listing(site.store)
    freed = {blob_rel(d) for d in a_exclusive(site)}
    result = cli(*site.args("delete", "tag", "a"))
    assert result.code == 0, result.err
    assert changed(before, listing(site.store)) == {"index.json"} | freed
    assert broken.keep <= blob_files(site.store)


def test_gc_sweeps_nothing_a_broken_manifest_may_hold(cli: Cli, broken: Broken) -> None:
    broken.arrive()
    site = broken.site
    assert cli(*site.args("init")).code == 0
    with nothing_changes(site):
        result = cli(*site.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert result.code == 0, result.err
    assert broken.keep <= blob_files(site.store)


# =============================================================================================
# 3. Digests and tags that are not digests or tags: index.json entries, inside manifests, and
#    on the command line. One table of bad entries runs through every command.
# =============================================================================================


def value_needle(value: object) -> str:
    """How a message names a bad value: the string itself, or its repr."""
    return value if isinstance(value, str) and value else repr(value)


def add_evil_entry(site: Site, value: object) -> dict[str, Any]:
    entry = {"mediaType": OCI_MANIFEST, "digest": value, "size": 100}
    return add_entry(site.store, entry, "evil")


def add_badly_tagged(site: Site, tag: object) -> dict[str, Any]:
    """An image c of its own whose index.json entry carries `tag` (written with JSON escapes)."""
    c = add_image(site.store, [b"layer c"], tag=None, config=b'{"c":1}', index_entry=False)
    entry = {**c, "annotations": {REF_NAME: tag}}
    index = read_index(site.store)
    index["manifests"].append(entry)
    (site.store / "index.json").write_bytes(json.dumps(index).encode())  # ASCII, escaped
    return entry


@dataclass(frozen=True)
class BadEntry:
    """A third index.json entry (manifests[2]) beside the healthy a and b."""

    add: Callable[[Site], dict[str, Any]]  # writes it; returns the entry as written
    needle: str  # how every message names the bad value
    delete_args: tuple[str, ...]  # `delete tag` of the entry's own tag, as a user types it
    delete_code: int  # 2: refused naming the entry; 1: no tag a user can type is its
    delete_needles: tuple[str, ...]


def bad_digest(value: object) -> Any:
    return pytest.param(
        BadEntry(
            add=lambda site: add_evil_entry(site, value),
            needle=value_needle(value),
            delete_args=("evil",),
            delete_code=2,
            delete_needles=("manifests[2]", value_needle(value)),
        ),
        id=f"digest {label(value)}",
    )


def bad_tag(tag: object) -> Any:
    typed = tag if isinstance(tag, str) else repr(tag)
    return pytest.param(
        BadEntry(
            add=lambda site: add_badly_tagged(site, tag),
            needle=repr(tag),
            delete_args=(typed,),
            delete_code=2 if isinstance(tag, str) else 1,
            delete_needles=("manifests[2]", repr(tag))
            if isinstance(tag, str)
            else ("no such tag",),
        ),
        id=f"tag {label(tag)}",
    )


BAD_ENTRIES = [*map(bad_digest, BAD_DIGESTS), *map(bad_tag, BAD_TAGS)]


@pytest.mark.parametrize("bad", BAD_ENTRIES)
@pytest.mark.parametrize("command", ["init", "sync"])
def test_a_bad_index_entry_is_skipped_and_the_rest_counted(
    cli: Cli, images: Site, bad: BadEntry, command: str
) -> None:
    if command == "sync":
        assert cli(*images.args("init")).code == 0
    bad.add(images)
    with nothing_changes(images):
        result = cli(*images.args(command))
    skipped(result, "index.json", "manifests[2]", bad.needle)
    counted_right(images, images.healthy)


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_a_bad_index_entry_is_reported_and_the_delete_of_its_tag_refused(
    cli: Cli, images: Site, bad: BadEntry
) -> None:
    bad.add(images)
    assert cli(*images.args("init")).code == 0
    with nothing_changes(images):
        verify = cli(*images.args("verify"))
        delete = cli(*images.args("delete", "tag", *bad.delete_args))
    reported(verify, "manifests[2]", bad.needle)
    one_error_line(delete, bad.delete_code, *bad.delete_needles)


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_gc_sweeps_nothing_beside_a_bad_index_entry(cli: Cli, images: Site, bad: BadEntry) -> None:
    bad.add(images)
    assert cli(*images.args("init")).code == 0
    with nothing_changes(images):
        result = cli(*images.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert result.code == 0, result.err


@pytest.mark.parametrize("bad", BAD_ENTRIES)
def test_deleting_a_healthy_tag_keeps_a_bad_index_entry_as_it_was(
    cli: Cli, images: Site, bad: BadEntry
) -> None:
    entry = bad.add(images)
    assert cli(*images.args("init")).code == 0
    before = listing(images.store)
    freed = {blob_rel(d) for d in a_exclusive(images)}
    result = cli(*images.args("delete", "tag", "a"))
    assert result.code == 0 and "Traceback" not in result.err, result.err
    assert changed(before, listing(images.store)) == {"index.json"} | freed
    assert read_index(images.store)["manifests"][1:] == [entry]


@pytest.mark.parametrize("value", BAD_DIGESTS, ids=label)
@pytest.mark.parametrize("field_name", ["config", "layers"])
def test_a_bad_digest_inside_a_manifest_is_skipped_reported_and_blocks_its_delete(
    cli: Cli, images: Site, value: object, field_name: str
) -> None:
    bad = {"mediaType": OCI_LAYER, "digest": value, "size": 3}
    body = manifest_body(images, "evil")
    if field_name == "config":
        blob_path(images.store, body["config"]["digest"]).unlink()  # not an orphan left behind
        body["config"] = bad
    else:
        body["layers"].append(bad)
    evil = write_blob(images.store, dumps(body), OCI_MANIFEST)
    add_entry(images.store, evil, "evil")
    sound = [body["layers"][0]["digest"]] + (
        [body["config"]["digest"]] if field_name == "layers" else []
    )
    with nothing_changes(images):
        init = cli(*images.args("init"))
        verify = cli(*images.args("verify"))
        delete = cli(*images.args("delete", "tag", "evil"))
        gc = cli(*images.args("--trash-ttl", "0", "gc", "--grace", "0"))
    where = "layers[1]" if field_name == "layers" else "config"
    skipped(init, hex_of(evil["digest"]), where, value_needle(value))
    counted_right(images, {**images.healthy, evil["digest"]: 1, **dict.fromkeys(sound, 1)})
    reported(verify, hex_of(evil["digest"]), where, value_needle(value))
    one_error_line(delete, 2, hex_of(evil["digest"]), value_needle(value))
    assert gc.code == 0, gc.err


CLI_BAD_DIGESTS = [v for v in BAD_DIGESTS if isinstance(v, str)]


def refusal(args: list[str], code: int, *needles: str, id: str) -> Any:
    return pytest.param(args, code, needles, id=id)


# A name typed on the command line that is no digest, or no tag of the store: refused in one
# line before anything is read or written (exit 2 for a malformed digest, 1 for no such tag).
CLI_REFUSALS = [
    *(
        refusal(
            ["delete", "manifest", value, *dry_run],
            2,
            value_needle(value),
            "invalid digest",
            id=f"delete manifest {label(value)}{' --dry-run' if dry_run else ''}",
        )
        for dry_run in ([], ["--dry-run"])
        for value in CLI_BAD_DIGESTS
    ),
    *(
        refusal(["show", v], 2, value_needle(v), "invalid digest", id=f"show {label(v)}")
        for v in CLI_BAD_DIGESTS
        if v.startswith("sha")
    ),
    *(
        refusal(["delete", "tag", path], 1, path, "no such tag", id=f"delete tag {label(path)}")
        for path in (ref.split(":", 1)[1] for ref in TRAVERSALS)  # a tag that looks like a path
    ),
    # A shell passes raw bytes; Python decodes b"\xff" in argv as "\udcff".
    refusal(
        ["delete", "tag", os.fsdecode(b"app:\xff")],
        1,
        "no such tag",
        id="delete tag with invalid UTF-8",
    ),
]


@pytest.mark.parametrize(("args", "code", "needles"), CLI_REFUSALS)
def test_a_bad_name_on_the_command_line_is_refused_in_one_line_and_nothing_changes(
    cli: Cli, images: Site, args: list[str], code: int, needles: tuple[str, ...]
) -> None:
    assert cli(*images.args("init")).code == 0
    with nothing_changes(images, state=True):
        result = cli(*images.args(*args))
    one_error_line(result, code, *needles)


# =============================================================================================
# 4. A descriptor size that disagrees with the file
# =============================================================================================


def test_a_descriptor_size_that_lies_is_reported_by_deep_verify_and_nothing_is_deleted(
    cli: Cli, images: Site
) -> None:
    body = manifest_body(images, "liar")
    layer = body["layers"][0]
    body["layers"][0] = {**layer, "size": 999}
    liar = write_blob(images.store, dumps(body), OCI_MANIFEST)
    add_entry(images.store, {**liar, "size": 5}, "liar")
    with nothing_changes(images):
        init = cli(*images.args("init"))
        sync = cli(*images.args("sync"))
        plain = cli(*images.args("verify"))
        deep = cli(*images.args("verify", "--deep"))
        gc = cli(*images.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert (init.code, sync.code, gc.code) == (0, 0, 0), (init.err, sync.err, gc.err)
    assert plain.code in (0, 1) and "Traceback" not in plain.err
    reported(deep, layer["digest"], str(layer["size"]), "999")
    reported(deep, liar["digest"], str(liar["size"]), "5")


# =============================================================================================
# 5. Symbolic links and directories where blob files should be: never followed, never read,
#    never deleted through (one table of plants for layers and manifests alike)
# =============================================================================================


def a_layer(site: Site) -> str:
    body = json.loads(blob_path(site.store, site.a["digest"]).read_bytes())
    return str(body["layers"][1]["digest"])  # "layer a": not shared with b


def b_layer(site: Site) -> str:
    body = json.loads(blob_path(site.store, site.b["digest"]).read_bytes())
    return str(body["layers"][1]["digest"])


def link_blob_outside(site: Site, digest: str) -> tuple[Path, str]:
    """Replace a blob by a link to a copy of it outside the store."""
    path = blob_path(site.store, digest)
    target = site.outside / f"copy-of-{hex_of(digest)[:12]}"
    path.rename(target)
    path.symlink_to(target)
    return path, str(target)


def link_blob_inside(site: Site, digest: str) -> tuple[Path, str]:
    """Replace a blob by a relative link to another blob of the store (b's own layer)."""
    path = blob_path(site.store, digest)
    path.unlink()
    path.symlink_to(hex_of(b_layer(site)))
    return path, hex_of(b_layer(site))


@dataclass(frozen=True)
class NotAFile:
    """A blob's path replaced by something that is not a regular file."""

    path: Path
    intact: Callable[[], bool]  # it is still there exactly as planted


def plant_link_outside(site: Site, digest: str) -> NotAFile:
    path, target = link_blob_outside(site, digest)
    return NotAFile(path, lambda: path.is_symlink() and os.readlink(path) == target)


def plant_link_inside(site: Site, digest: str) -> NotAFile:
    path, target = link_blob_inside(site, digest)
    return NotAFile(path, lambda: path.is_symlink() and os.readlink(path) == target)


def plant_directory(site: Site, digest: str) -> NotAFile:
    """Replace a blob by a directory holding a user's file."""
    path = blob_path(site.store, digest)
    path.unlink()
    path.mkdir()
    (path / "keep").write_text("a user's file")
    return NotAFile(path, lambda: (path / "keep").read_text() == "a user's file")


Plant = Callable[[Site, str], NotAFile]
NOT_A_FILE = [
    pytest.param(plant_link_outside, id="link out of the store"),
    pytest.param(plant_link_inside, id="link to another blob"),
    pytest.param(plant_directory, id="directory"),
]


@pytest.mark.parametrize("plant", NOT_A_FILE)
def test_a_layer_that_is_not_a_regular_file_is_skipped_and_survives_the_delete_of_its_image(
    cli: Cli, images: Site, plant: Plant
) -> None:
    """init/verify skip and report a's layer; deleting a frees the rest of a's own blobs and
    leaves the layer's path alone, and gc afterwards touches nothing."""
    layer = a_layer(images)
    exclusive = a_exclusive(images)
    planted = plant(images, layer)
    with nothing_changes(images):
        init = cli(*images.args("init"))
        verify = cli(*images.args("verify"))
    skipped(init, hex_of(layer))
    reported(verify, hex_of(layer))
    before = listing(images.store)
    delete = cli(*images.args("delete", "tag", "a"))
    assert delete.code == 0, delete.err
    assert changed(before, listing(images.store)) == {"index.json"} | {
        blob_rel(d) for d in exclusive - {layer}
    }
    with nothing_changes(images):
        gc = cli(*images.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert gc.code == 0, gc.err
    assert planted.intact()
    assert b_layer(images) in blob_files(images.store)


def refused_or_done_leaving(result: Result, path: Path) -> None:
    """delete may refuse (exit 2, one line naming the blob) or go ahead; either way `path`,
    and whatever it links to, stay where they are."""
    assert "Traceback" not in result.err and result.code in (0, 2), result.err
    if result.code == 2:
        one_error_line(result, 2, path.name)
    assert os.path.lexists(path)


@pytest.mark.parametrize("plant", NOT_A_FILE)
def test_a_manifest_that_is_not_a_regular_file_is_never_read_nor_deleted_through(
    cli: Cli, images: Site, plant: Plant
) -> None:
    planted = plant(images, images.a["digest"])
    with nothing_changes(images):
        init = cli(*images.args("init"))
        verify = cli(*images.args("verify"))
    skipped(init, hex_of(images.a["digest"]))
    reported(verify, hex_of(images.a["digest"]))
    outside = listing(images.outside)
    delete = cli(*images.args("--trash-ttl", "0", "delete", "tag", "a"))
    refused_or_done_leaving(delete, planted.path)
    assert planted.intact() and listing(images.outside) == outside


@pytest.mark.parametrize("plant", NOT_A_FILE)
def test_gc_sweeps_nothing_a_manifest_that_is_not_a_regular_file_holds(
    cli: Cli, images: Site, plant: Plant
) -> None:
    planted = plant(images, images.a["digest"])
    assert cli(*images.args("init")).code == 1  # a's manifest is missing: it is no file
    with nothing_changes(images):
        gc = cli(*images.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert gc.code == 0, gc.err
    assert planted.intact()


def algorithm_dir_links_outside(site: Site) -> Path:
    target = site.outside / "sha256"
    (site.store / "blobs" / "sha256").rename(target)
    (site.store / "blobs" / "sha256").symlink_to(target)
    return site.store / "blobs" / "sha256"


def blobs_dir_links_outside(site: Site) -> Path:
    target = site.outside / "blobs"
    (site.store / "blobs").rename(target)
    (site.store / "blobs").symlink_to(target)
    return site.store / "blobs"


@pytest.mark.parametrize(
    "link", [algorithm_dir_links_outside, blobs_dir_links_outside], ids=["blobs/sha256", "blobs"]
)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_blob_directory_that_links_out_of_the_store_is_refused_by_every_command(
    cli: Cli, images: Site, link: Callable[[Site], Path], command: list[str]
) -> None:
    """Blob paths are built below blobs/<alg>/: a link there is never entered, nor read
    as "every blob missing" (tests/test_linked_blobs.py has the rest of the contract)."""
    assert cli(*images.args("init")).code == 0
    path = link(images)
    outside = listing(images.outside)
    with nothing_changes(images, state=True):
        result = cli(*images.args("--trash-ttl", "0", *command))
    one_error_line(result, 2, f"{path}: is a symbolic link; not followed")
    assert listing(images.outside) == outside
    assert path.is_symlink()


# =============================================================================================
# 6. Files where directories should be
# =============================================================================================


def algorithm_dir_is_a_file(site: Site) -> Path:
    path = site.store / "blobs" / "sha256"
    path.rename(site.root / "moved-blobs")
    path.write_text("not a directory")
    return path


def blobs_dir_is_a_file(site: Site) -> Path:
    path = site.store / "blobs"
    path.rename(site.root / "moved-blobs")
    path.write_text("not a directory")
    return path


@pytest.mark.parametrize(
    "damage", [algorithm_dir_is_a_file, blobs_dir_is_a_file], ids=["blobs/sha256", "blobs"]
)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_blob_directory_that_is_a_file_is_refused_by_every_command_and_kept(
    cli: Cli, images: Site, damage: Callable[[Site], Path], command: list[str]
) -> None:
    assert cli(*images.args("init")).code == 0
    path = damage(images)
    with nothing_changes(images, state=True):
        result = cli(*images.args("--trash-ttl", "0", *command))
    one_error_line(result, 2, f"{path}: exists and is not a directory")
    assert path.read_text() == "not a directory"


def state_dir_links_outside(site: Site) -> tuple[str, ...]:
    (site.store / ".refcount").symlink_to(site.outside)
    return (".refcount", "symbolic link")


def state_dir_is_a_file(site: Site) -> tuple[str, ...]:
    (site.store / ".refcount").write_text("not a directory")
    return (".refcount",)


@pytest.mark.parametrize(
    "damage",
    [
        pytest.param(state_dir_links_outside, id="a link out of the store"),
        pytest.param(state_dir_is_a_file, id="a file"),
    ],
)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_a_state_path_that_is_not_a_real_directory_is_refused_by_every_command(
    cli: Cli, images: Site, damage: Callable[[Site], tuple[str, ...]], command: list[str]
) -> None:
    needles = damage(images)
    with nothing_changes(images):
        result = cli(*images.args(*command))
    one_error_line(result, 2, *needles)


# =============================================================================================
# 7. Crafted cycles and self references (file names that do not match their content)
# =============================================================================================


def crafted(name: str) -> str:
    return sha256_digest(f"crafted {name}".encode())


def crafted_index(site: Site, name: str, children: list[str]) -> str:
    digest = crafted(name)
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [{"mediaType": OCI_INDEX, "digest": c, "size": 100} for c in children],
    }
    write_raw_blob(site.store, digest, dumps(body))
    return digest


def two_cycle(site: Site) -> list[str]:
    """loop -> A -> B -> A"""
    a, b = crafted("A"), crafted("B")
    crafted_index(site, "A", [b])
    crafted_index(site, "B", [a])
    return [a, b]


def self_reference(site: Site) -> list[str]:
    """loop -> S -> S"""
    return [crafted_index(site, "S", [crafted("S")])]


def cycle_through_a_manifest(site: Site) -> list[str]:
    """loop -> I (index) -> M (manifest whose config is I)"""
    i, m = crafted("I"), crafted("M")
    crafted_index(site, "I", [m])
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_INDEX, "digest": i, "size": 100},
        "layers": [],
    }
    write_raw_blob(site.store, m, dumps(body))
    return [i, m]


CYCLES = [
    pytest.param(two_cycle, id="A<->B"),
    pytest.param(self_reference, id="S->S"),
    pytest.param(cycle_through_a_manifest, id="index<->manifest"),
]


def add_loop(site: Site, first: str) -> None:
    add_entry(site.store, {"mediaType": OCI_INDEX, "digest": first, "size": 100}, "loop")


@pytest.mark.parametrize("craft", CYCLES)
@pytest.mark.parametrize("command", ["init", "sync"])
def test_a_crafted_cycle_terminates_and_the_other_images_are_counted(
    cli: Cli, images: Site, craft: Callable[[Site], list[str]], command: str
) -> None:
    if command == "sync":
        assert cli(*images.args("init")).code == 0
    add_loop(images, craft(images)[0])
    with nothing_changes(images):
        result = cli(*images.args(command))
    assert result.code == 0 and "Traceback" not in result.err, result.err
    counted_right(images, images.healthy)


@pytest.mark.parametrize("craft", CYCLES)
def test_deep_verify_reports_every_blob_of_a_crafted_cycle(
    cli: Cli, images: Site, craft: Callable[[Site], list[str]]
) -> None:
    digests = craft(images)
    add_loop(images, digests[0])
    assert cli(*images.args("init")).code == 0
    with nothing_changes(images):
        result = cli(*images.args("verify", "--deep"))
    for digest in digests:
        reported(result, digest, "hashes to")


def test_verify_reports_a_self_reference_that_sync_skipped(cli: Cli, images: Site) -> None:
    [digest] = self_reference(images)
    add_loop(images, digest)
    assert cli(*images.args("init")).code == 0
    with nothing_changes(images):
        sync = cli(*images.args("sync"))
        verify = cli(*images.args("verify"))
    assert sync.code == 0, sync.err
    reported(verify, digest, "itself")


@pytest.mark.parametrize("craft", CYCLES)
def test_deleting_a_crafted_cycle_terminates_and_spares_the_other_images(
    cli: Cli, images: Site, craft: Callable[[Site], list[str]]
) -> None:
    add_loop(images, craft(images)[0])
    assert cli(*images.args("init")).code == 0
    healthy = {blob_rel(d) for d in images.healthy}
    before = listing(images.store)
    result = cli(*images.args("delete", "tag", "loop"))
    assert "Traceback" not in result.err and result.code in (0, 2), result.err
    if result.code == 2:
        one_error_line(result, 2, "loop")
    assert not changed(before, listing(images.store)) & healthy
    counted_right(images, images.healthy)


# =============================================================================================
# 8. Duplicate index.json entries
# =============================================================================================


def test_the_same_tag_and_digest_twice_counts_twice_and_one_delete_removes_both(
    cli: Cli, images: Site
) -> None:
    add_entry(images.store, images.a, "a")
    expected = expected_counts(images.store)
    assert expected[images.a["digest"]] == 2
    with nothing_changes(images):
        assert cli(*images.args("init")).code == 0
    counted_right(images, expected)
    exclusive = a_exclusive(images)
    before = listing(images.store)
    result = cli(*images.args("delete", "tag", "a"))
    assert result.code == 0, result.err
    assert result.out.startswith("removed 2 index.json entries:")
    assert changed(before, listing(images.store)) == {"index.json"} | {
        blob_rel(d) for d in exclusive
    }
    assert [e["annotations"][REF_NAME] for e in read_index(images.store)["manifests"]] == ["b"]
    assert cli(*images.args("verify")).code == 0


def test_a_duplicate_entry_that_arrives_later_is_counted_by_sync(cli: Cli, images: Site) -> None:
    assert cli(*images.args("init")).code == 0
    add_entry(images.store, images.a, "a")
    add_entry(images.store, images.a, "a-again")
    with nothing_changes(images):
        assert cli(*images.args("sync")).code == 0
    counted_right(images, expected_counts(images.store))
    before = listing(images.store)
    result = cli(*images.args("delete", "tag", "a"))
    assert result.code == 0 and "freed 0 blobs" in result.out, result.out
    assert changed(before, listing(images.store)) == {"index.json"}
    counted_right(images, expected_counts(images.store))
    assert cli(*images.args("verify")).code == 0


# =============================================================================================
# 9. Tags with control characters or invalid UTF-8 (the rest of their cases are in section 3's
#    tables of bad entries and of command-line names)
# =============================================================================================


@pytest.mark.parametrize("tag", BAD_TAGS, ids=label)
def test_sync_keeps_the_image_of_an_entry_whose_tag_an_outside_tool_made_bad(
    cli: Cli, images: Site, tag: object
) -> None:
    assert cli(*images.args("init")).code == 0
    index = read_index(images.store)
    index["manifests"][1]["annotations"][REF_NAME] = tag  # b's entry
    (images.store / "index.json").write_bytes(json.dumps(index).encode())
    with nothing_changes(images):
        result = cli(*images.args("sync"))
    skipped(result, "manifests[1]", repr(tag))


# =============================================================================================
# 10. Unreadable files. Root reads through permission bits, so as root each command runs in a
#     forked child that has dropped to `nobody`; as another user it runs in-process.
# =============================================================================================

Run = Callable[..., Result]


def _nobody() -> tuple[int, int] | None:
    try:
        import pwd

        entry = pwd.getpwnam("nobody")
    except (ImportError, KeyError):
        return None
    return entry.pw_uid, entry.pw_gid


def _forked_as(uid: int, gid: int, argv: list[str]) -> Result:
    """`refcount ARGV` in a forked child running as uid:gid (no exec: the interpreter and the
    package may live where that user cannot read)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        pid = os.fork()
        if pid == 0:  # the child: never returns into pytest
            code = 99
            try:
                os.dup2(out.fileno(), 1)
                os.dup2(err.fileno(), 2)
                sys.stdout = open(1, "w", closefd=False)  # noqa: SIM115
                sys.stderr = open(2, "w", closefd=False)  # noqa: SIM115
                os.setgroups([])
                os.setgid(gid)
                os.setuid(uid)
                code = main(argv)
            except BaseException:
                traceback.print_exc()
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        out.seek(0)
        err.seek(0)
        return Result(os.waitstatus_to_exitcode(status), out.read().decode(), err.read().decode())


def _cannot_drop_to(uid: int, gid: int) -> str:
    """Why a forked child cannot become uid:gid ("" when it can)."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as exc:
            os.write(write, str(exc).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        why = pipe.read().decode()
    os.waitpid(pid, 0)
    return why


def _warm_up(cli: Cli, root: Path, another_database: AnotherDatabase) -> None:
    """Run every command once in this process, so the modules they import lazily are loaded
    before the fork: `nobody` may not be able to read the interpreter's site-packages.
    (A store of its own, so a database of its own: the test's counts the test's store.)"""
    site = add_two_images(build_site(root))
    with another_database():
        for command in [*COMMANDS, ["verify", "--deep"], ["tags"], ["show", "b"]]:
            cli(*site.args("--trash-ttl", "0", *command))


@pytest.fixture
def unreadable(
    cli: Cli, tmp_path: Path, another_database: AnotherDatabase
) -> Iterator[tuple[Site, Run]]:
    """Images a and b, and a runner for which permission bits hold."""
    if os.geteuid() != 0:
        yield add_two_images(build_site(tmp_path)), cli
        return
    ids = _nobody()
    if ids is None:
        pytest.skip("running as root and there is no user `nobody` to drop to")
    why = _cannot_drop_to(*ids)
    if why:
        pytest.skip(f"running as root and cannot drop to nobody: {why}")
    _warm_up(cli, tmp_path / "warm-up", another_database)
    base = Path(tempfile.mkdtemp(prefix="refcount-hostile-"))  # tmp_path is root-only
    try:
        base.chmod(0o755)
        site = add_two_images(build_site(base))
        for path in [base, *base.rglob("*")]:
            os.chown(path, *ids, follow_symlinks=False)
        yield site, lambda *args: _forked_as(*ids, [str(a) for a in args])
    finally:
        shutil.rmtree(base)


def test_an_unreadable_manifest_is_skipped_reported_and_its_delete_refused(
    unreadable: tuple[Site, Run],
) -> None:
    site, run = unreadable
    blob_path(site.store, site.a["digest"]).chmod(0)
    with nothing_changes(site):
        init = run(*site.args("init"))
        verify = run(*site.args("verify"))
        delete = run(*site.args("delete", "tag", "a"))
    skipped(init, hex_of(site.a["digest"]), "Permission denied")
    reported(verify, hex_of(site.a["digest"]), "Permission denied")
    one_error_line(delete, 2, hex_of(site.a["digest"]), "Permission denied")
    # Nothing is known of what a needs, so no delete that would free a blob goes ahead
    # (a chosen contract, see README): b's delete is refused naming a's manifest.
    before = listing(site.store)
    refused = run(*site.args("delete", "tag", "b"))
    one_error_line(refused, 2, hex_of(site.a["digest"]), "could not be read")
    assert listing(site.store) == before


def test_deleting_a_tag_keeps_a_layer_an_unreadable_manifest_shares(
    unreadable: tuple[Site, Run],
) -> None:
    """a's manifest cannot be read, so refcount cannot know that a needs the base layer too;
    deleting b must not free it all the same."""
    site, run = unreadable
    blob_path(site.store, site.a["digest"]).chmod(0)
    assert run(*site.args("init")).code == 0
    shared = own_blobs(site.store, site.a) & own_blobs(site.store, site.b)
    result = run(*site.args("delete", "tag", "b"))
    assert result.code in (0, 2) and "Traceback" not in result.err, result.err
    assert shared <= blob_files(site.store)


def test_gc_sweeps_nothing_an_unreadable_manifest_holds(unreadable: tuple[Site, Run]) -> None:
    site, run = unreadable
    blob_path(site.store, site.a["digest"]).chmod(0)
    assert run(*site.args("init")).code == 0
    with nothing_changes(site):
        gc = run(*site.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert gc.code == 0, gc.err


@pytest.mark.parametrize(
    ("name", "state", "flags"),
    [
        # refused before anything is read, so .refcount/ stays byte-identical too
        pytest.param("index.json", True, [], id="index.json"),
        pytest.param("blobs/sha256", False, ["--trash-ttl", "0"], id="blobs/sha256"),
    ],
)
@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_an_unreadable_part_of_the_layout_is_refused_by_every_command(
    unreadable: tuple[Site, Run], name: str, state: bool, flags: list[str], command: list[str]
) -> None:
    site, run = unreadable
    assert run(*site.args("init")).code == 0
    path = site.store / name
    mode = path.stat().st_mode
    path.chmod(0)
    try:
        with nothing_changes(site, state=state):
            result = run(*site.args(*flags, *command))
    finally:
        path.chmod(mode)
    one_error_line(result, 2, str(path), "Permission denied")


def test_an_unreadable_layer_is_named_by_deep_verify_and_nothing_is_deleted(
    unreadable: tuple[Site, Run],
) -> None:
    site, run = unreadable
    layer = a_layer(site)
    blob_path(site.store, layer).chmod(0)
    with nothing_changes(site):
        init = run(*site.args("init"))
        sync = run(*site.args("sync"))
        deep = run(*site.args("verify", "--deep"))
        gc = run(*site.args("--trash-ttl", "0", "gc", "--grace", "0"))
    assert (init.code, sync.code, gc.code) == (0, 0, 0), (init.err, sync.err, gc.err)
    reported(deep, layer, "unreadable")
