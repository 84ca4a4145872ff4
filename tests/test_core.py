"""The library's use cases on hand-built stores, checked against the independent oracle."""

from __future__ import annotations

import json
import os
import shutil
import time
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SEVERAL_STORES
from sqlalchemy import text
from storekit import (
    add_entry,
    add_image,
    add_index,
    add_referrer,
    blob_files,
    blob_path,
    expected_counts,
    listing,
    make_layout,
    reachable,
    read_index,
    remove_entries,
    tag_of,
    write_blob,
)

import refcount
from refcount import Refcounter
from refcount.store import Store


def consistent(rc: Refcounter, store: Path) -> None:
    """The database equals a from-scratch count, and blobs/ holds exactly what is reachable."""
    report = rc.verify()
    assert report.ok, report
    for digest, count in expected_counts(store).items():
        assert rc.count(digest) == count, digest
    assert blob_files(store) == reachable(store)


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    return {f"{p.parent.name}:{p.name}" for p in trash.glob("*/*")}


def two_images(store: Path) -> tuple[dict[str, object], dict[str, object], bytes]:
    base = b"base layer"
    a = add_image(store, [base, b"layer of a"], tag="a", config=b'{"a":1}')
    b = add_image(store, [base, b"layer of b"], tag="b", config=b'{"b":1}')
    return a, b, base


def test_deleting_one_of_two_images_frees_exactly_its_own_blobs(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        before = blob_files(store)
        consistent(rc, store)
        report = rc.delete_tag("a")
        freed = {b.digest for b in report.freed}
        assert freed == before - reachable(store)
        assert len(freed) == 3  # manifest, config, own layer; the base layer is shared
        assert trash_files(store) == freed
        consistent(rc, store)
        assert [e.tag for e in report.removed] == ["a"]
        rc.delete_tag("b")
        assert blob_files(store) == set()
        assert trash_files(store) == before
        consistent(rc, store)


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_init_twice_is_idempotent_and_agrees_with_sync_built_counts(
    store: Path, tmp_path: Path
) -> None:
    two_images(store)
    other = shutil.copytree(store, tmp_path / "other")
    with refcount.open(store) as rc:
        rc.init()
        assert not rc.init().changed
        consistent(rc, store)
    # the same store counted incrementally (sync on an indexed but empty store)
    index = read_index(other)
    (other / "index.json").write_text(json.dumps({**index, "manifests": []}))
    with refcount.open(other) as rc:
        rc.init()
        (other / "index.json").write_text(json.dumps(index))
        rc.sync()
        consistent(rc, other)


def test_a_manifest_listing_a_layer_twice_counts_it_once(store: Path) -> None:
    twice = add_image(store, [b"same", b"same"], tag="t")
    with refcount.open(store) as rc:
        rc.init()
        layer = rc.show("t").children[1].digest
        assert rc.count(layer) == 1
        assert rc.show(str(twice["digest"])).count == 1
        rc.delete_tag("t")
        assert rc.count(layer) == 0
        consistent(rc, store)


def test_multi_arch_tag_frees_index_platform_manifests_and_untagged_entries(store: Path) -> None:
    amd = add_image(store, [b"amd64 layer"], tag=None, index_entry=False)
    arm = add_image(store, [b"arm64 layer"], tag=None, index_entry=False)
    add_index(store, [amd, arm], tag="multi", list_children_untagged=True)
    add_image(store, [b"other"], tag="other")
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        report = rc.delete_tag("multi")
        assert {e.digest for e in report.removed if e.tag is None} == {amd["digest"], arm["digest"]}
        assert [tag_of(e) for e in read_index(store)["manifests"]] == ["other"]
        assert len(report.freed) == 1 + 2 * 3  # index, and manifest+config+layer per platform
        consistent(rc, store)


def test_keep_untagged_leaves_the_platform_entries_and_their_blobs(store: Path) -> None:
    amd = add_image(store, [b"amd64 layer"], tag=None, index_entry=False)
    arm = add_image(store, [b"arm64 layer"], tag=None, index_entry=False)
    add_index(store, [amd, arm], tag="multi", list_children_untagged=True)
    with refcount.open(store, keep_untagged=True) as rc:
        rc.init()
        report = rc.delete_tag("multi")
        assert [e.tag for e in report.removed] == ["multi"]
        assert len(report.freed) == 1  # only the index itself
        assert {e["digest"] for e in read_index(store)["manifests"]} == {
            amd["digest"],
            arm["digest"],
        }
        consistent(rc, store)


def test_an_untagged_child_still_reached_by_another_tag_is_kept(store: Path) -> None:
    amd = add_image(store, [b"amd64 layer"], tag=None, index_entry=False)
    arm = add_image(store, [b"arm64 layer"], tag=None, index_entry=False)
    add_index(store, [amd, arm], tag="multi", list_children_untagged=True)
    add_index(store, [amd], tag="amd-only")
    with refcount.open(store) as rc:
        rc.init()
        report = rc.delete_tag("multi")
        assert {e.digest for e in report.removed} - {e.digest for e in report.removed if e.tag} == {
            arm["digest"]
        }
        assert amd["digest"] in {e["digest"] for e in read_index(store)["manifests"]}
        consistent(rc, store)


def test_an_untagged_referrer_is_freed_with_its_subject_and_a_tagged_one_survives(
    store: Path,
) -> None:
    app = add_image(store, [b"app layer"], tag="app")
    sbom = add_referrer(store, app, payload=b"sbom of app")
    sig = add_referrer(store, app, tag="app-signature", payload=b"signature of app")
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        report = rc.delete_tag("app")
        removed = {e.digest for e in report.removed}
        assert sbom["digest"] in removed and sig["digest"] not in removed
        assert {e.get("digest") for e in read_index(store)["manifests"]} == {sig["digest"]}
        assert sbom["digest"] in {b.digest for b in report.freed}
        consistent(rc, store)


def test_keep_referrers_leaves_untagged_referrers(store: Path) -> None:
    app = add_image(store, [b"app layer"], tag="app")
    sbom = add_referrer(store, app)
    with refcount.open(store, keep_referrers=True) as rc:
        rc.init()
        rc.delete_tag("app")
        assert [e["digest"] for e in read_index(store)["manifests"]] == [sbom["digest"]]
        consistent(rc, store)


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_dry_run_reports_exactly_what_the_real_run_removes(store: Path, tmp_path: Path) -> None:
    two_images(store)
    amd = add_image(store, [b"amd64"], tag=None, index_entry=False)
    add_index(store, [amd], tag="a", list_children_untagged=True)
    twin = shutil.copytree(store, tmp_path / "twin")
    with refcount.open(store) as rc:
        rc.init()
        before = listing(store)
        dry = rc.delete_tag("a", dry_run=True)
        assert listing(store) == before
        assert rc.verify().ok
    with refcount.open(twin) as rc:
        rc.init()
        real = rc.delete_tag("a")
    assert dry.dry_run and not real.dry_run
    assert (dry.removed, sorted(dry.freed, key=str)) == (real.removed, sorted(real.freed, key=str))
    assert {b.digest for b in real.freed} == blob_files(store) - blob_files(twin)


def test_delete_manifest_removes_every_entry_of_that_digest(store: Path) -> None:
    a, _b, _ = two_images(store)
    add_entry(store, a, "a-again")
    add_entry(store, a)
    with refcount.open(store) as rc:
        rc.init()
        assert rc.count(str(a["digest"])) == 3
        report = rc.delete_manifest(str(a["digest"]))
        assert sorted((e.tag or "") for e in report.removed) == ["", "a", "a-again"]
        assert [tag_of(e) for e in read_index(store)["manifests"]] == ["b"]
        consistent(rc, store)


def test_unknown_names_are_not_found(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        with pytest.raises(refcount.NotFound, match="nope"):
            rc.delete_tag("nope")
        with pytest.raises(refcount.NotFound):
            rc.delete_manifest("sha256:" + "0" * 64)
        with pytest.raises(refcount.InvalidDigest):
            rc.delete_manifest("sha256:../../etc/passwd")


def test_index_rewrite_keeps_unknown_fields_annotations_and_order(store: Path) -> None:
    _a, b, _ = two_images(store)
    index = read_index(store)
    index["annotations"] = {"org.example": "kept"}
    index["x-custom"] = [1, 2]
    index["manifests"][1]["platform"] = {"os": "linux", "architecture": "arm64"}
    c = add_image(store, [b"c"], tag=None, index_entry=False)
    index["manifests"].append(
        {**c, "annotations": {"org.opencontainers.image.ref.name": "c", "k": "v"}}
    )
    (store / "index.json").write_text(json.dumps(index))
    with refcount.open(store) as rc:
        rc.init()
        rc.delete_tag("a")
    after = read_index(store)
    assert after["annotations"] == {"org.example": "kept"} and after["x-custom"] == [1, 2]
    assert after["manifests"] == index["manifests"][1:]
    assert [m["digest"] for m in after["manifests"]] == [b["digest"], c["digest"]]


def test_outside_removal_of_an_entry_is_counted_by_sync(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        remove_entries(store, lambda e: tag_of(e) == "b")
        report = rc.sync()
        assert report.roots_removed == 1 and len(report.freed) == 3
        consistent(rc, store)


def test_a_quarantined_blob_that_a_new_root_needs_is_restored(store: Path) -> None:
    a, _b, _ = two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        rc.delete_tag("a")
        assert not (store / "blobs" / "sha256" / str(a["digest"]).split(":")[1]).exists()
        add_entry(store, a, "a")  # an outside tool lists the image again
        report = rc.sync()
        assert str(a["digest"]) in report.restored
        assert len(report.restored) == 3
        consistent(rc, store)


def test_trash_ttl_zero_unlinks_at_once(store: Path) -> None:
    two_images(store)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
        rc.delete_tag("a")
        assert trash_files(store) == set()
        consistent(rc, store)


def test_gc_purges_trash_after_its_ttl_and_sweeps_old_orphans_only(store: Path) -> None:
    two_images(store)
    old = write_blob(store, b"an old crashed upload", "application/octet-stream")
    young = write_blob(store, b"an upload in progress", "application/octet-stream")
    old_path = store / "blobs" / "sha256" / str(old["digest"]).split(":")[1]
    import os

    os.utime(old_path, (1_000_000, 1_000_000))
    with refcount.open(store, trash_ttl=timedelta(hours=1)) as rc:
        rc.init()
        rc.delete_tag("a")
        kept = rc.gc()
        assert kept.purged == () and [s.digest for s in kept.swept] == [old["digest"]]
        assert young["digest"] in blob_files(store) and old["digest"] not in blob_files(store)
        assert len(trash_files(store)) == 4
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        report = rc.gc()
        assert len(report.purged) == 4
        assert trash_files(store) == set()
        assert rc.verify().ok


def test_gc_dry_run_changes_nothing_on_disk_nor_in_the_database(store: Path) -> None:
    """What a dry run decided must not reach the database either: recorded there, the next
    start would complete the frees from the journal and do what was only shown."""
    two_images(store)
    orphan = write_blob(store, b"orphan", "application/octet-stream")["digest"]
    with refcount.open(store, grace=timedelta(0), trash_ttl=timedelta(hours=1)) as rc:
        rc.init()
        rc.delete_tag("a")
    trashed = trash_files(store)
    assert len(trashed) == 3
    with refcount.open(store, grace=timedelta(0), trash_ttl=timedelta(0)) as rc:
        before = listing(store), trash_files(store)
        dry = rc.gc(dry_run=True)
        assert dry.dry_run and [a.digest for a in dry.swept] == [orphan]
        assert {a.digest for a in dry.purged} == trashed
        assert (listing(store), trash_files(store)) == before
    with refcount.open(store, grace=timedelta(0), trash_ttl=timedelta(0)) as rc:
        rc.sync()  # a later start: it would settle a journal the dry run had left behind
        assert (listing(store), trash_files(store)) == before
        assert [a.digest for a in rc.verify().orphans] == [orphan]
        assert {a.digest for a in rc.verify().quarantined} == trashed
        real = rc.gc()
        assert [(a.digest, a.size) for a in (*real.swept, *real.purged)] == [
            (a.digest, a.size) for a in (*dry.swept, *dry.purged)
        ]
        assert orphan not in blob_files(store) and trash_files(store) == set()
        consistent(rc, store)


def test_verify_names_a_referenced_blob_deleted_behind_its_back(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        layer = rc.show("a").children[1].digest
        (store / "blobs" / "sha256" / layer.split(":")[1]).unlink()
        report = rc.verify()
        assert not report.ok and report.missing == (layer,)
        sync = rc.sync()
        assert sync.missing == (layer,)
        assert rc.count(layer) == 2  # the images still need it: counts untouched
        assert rc.show(layer).state == "missing"


def test_verify_finds_a_tampered_count_and_repair_fixes_it(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        layer = rc.show("a").children[1].digest
        with rc.engine.begin() as connection:
            connection.execute(text("UPDATE blobs SET count = 7 WHERE digest = :d"), {"d": layer})
        report = rc.verify()
        assert not report.ok
        assert [(d.digest, d.expected, d.recorded) for d in report.drift] == [(layer, 2, 7)]
        before = listing(store)
        repaired = rc.verify(repair=True)
        assert repaired.ok and repaired.repaired
        assert listing(store) == before
        consistent(rc, store)


def test_deep_verify_finds_changed_bytes(store: Path) -> None:
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        layer = rc.show("b").children[2].digest
        (store / "blobs" / "sha256" / layer.split(":")[1]).write_bytes(b"layer of B")
        assert rc.verify().ok  # same size, same name: only hashing can tell
        deep = rc.verify(deep=True)
        assert not deep.ok and [c.digest for c in deep.corrupt] == [layer]


def test_show_explains_why_a_blob_is_alive(store: Path) -> None:
    a, b, _ = two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        base = rc.show("a").children[1].digest
        info = rc.show(base)
        assert info.count == 2 and info.state == "live"
        assert {p.digest for p in info.parents} == {a["digest"], b["digest"]}
        assert {p.kind for p in info.parents} == {"layer"}
        assert rc.show("a").tags == ("a",)
        with pytest.raises(refcount.NotFound):
            rc.show("no-such-tag")


def test_tags_lists_each_tag_with_the_bytes_of_its_image(store: Path) -> None:
    a, _b, _ = two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        tags = rc.tags()
        assert (tags[0].tag, tags[0].digest) == ("a", a["digest"])
        manifest = json.loads(
            (store / "blobs" / "sha256" / str(a["digest"]).split(":")[1]).read_bytes()
        )
        expected = (
            a["size"] + manifest["config"]["size"] + sum(x["size"] for x in manifest["layers"])
        )
        assert tags[0].size == expected


def test_docker_manifest_lists_are_counted_like_oci_indexes(store: Path) -> None:
    m = add_image(store, [b"docker layer"], tag=None, docker=True, index_entry=False)
    body = {
        "schemaVersion": 2,
        "mediaType": "application/vnd.docker.distribution.manifest.list.v2+json",
        "manifests": [{**m, "platform": {"os": "linux", "architecture": "amd64"}}],
    }
    lst = write_blob(store, json.dumps(body).encode(), body["mediaType"])
    add_entry(store, lst, "dock")
    with refcount.open(store) as rc:
        rc.init()
        consistent(rc, store)
        assert len(rc.delete_tag("dock").freed) == 4
        consistent(rc, store)


def test_umoci_style_manifest_without_media_type_field_is_typed_by_its_descriptor(
    store: Path,
) -> None:
    add_image(store, [b"layer"], tag="u", manifest_media_type_field=False)
    with refcount.open(store) as rc:
        rc.init()
        assert len(rc.show("u").children) == 2
        consistent(rc, store)


def test_a_missing_manifest_is_expanded_when_its_file_arrives(store: Path, tmp_path: Path) -> None:
    m = add_image(store, [b"late layer"], tag="late")
    path = store / "blobs" / "sha256" / str(m["digest"]).split(":")[1]
    saved = tmp_path / "saved"
    shutil.move(path, saved)
    with refcount.open(store) as rc:
        rc.init()
        assert rc.show("late").state == "missing" and rc.show("late").children == ()
        shutil.move(saved, path)
        report = rc.sync()
        assert report.found == (m["digest"],)
        consistent(rc, store)


def test_a_fresh_store_with_null_manifests_indexes_to_nothing(tmp_path: Path) -> None:
    store = make_layout(tmp_path / "s")
    (store / "index.json").write_text('{"schemaVersion":2,"manifests":null}')
    with refcount.open(store) as rc:
        report = rc.init()
        assert report.roots_added == 0 and rc.verify().ok


def test_a_full_sync_catches_every_kind_of_difference_between_blobs_and_rows_at_once(
    store: Path,
) -> None:
    """The no-op path compares digest sets; each difference still gets its own work:
    a live file gone or replaced by a directory is missing, a quarantined blob written
    back and a file without a row are new orphans, junk is reported; the files stay."""
    _a, b, _base = two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        freed = sorted(blob.digest for blob in rc.delete_tag("a").freed)
        quarantined = store / ".refcount" / "trash" / "sha256" / freed[0].split(":")[1]
        shutil.copyfile(quarantined, blob_path(store, freed[0]))
        gone, replaced = sorted(expected_counts(store).keys() - {str(b["digest"])})[:2]
        blob_path(store, gone).unlink()
        blob_path(store, replaced).unlink()
        blob_path(store, replaced).mkdir()
        stray = write_blob(store, b"a file nothing references", "application/octet-stream")
        junk = store / "blobs" / "sha256" / "oci-put-blob123"
        junk.write_bytes(b"half a blob")
        before = listing(store)
        report = rc.sync()
        assert listing(store) == before
        assert report.missing == tuple(sorted([gone, replaced]))
        assert report.orphans == tuple(sorted([freed[0], stray["digest"]]))
        assert sorted(p.split(": ")[0] for p in report.problems) == sorted(
            [str(blob_path(store, replaced)), str(junk)]
        )
        assert rc.show(freed[0]).state == "orphan"
        again = rc.sync()
        assert not again.changed and again.missing == () and again.orphans == ()


def age_blob_dirs(store: Path, seconds: float = 3600) -> None:
    """Make blobs/ and its directories look last changed `seconds` ago."""
    then = time.time() - seconds
    for directory in (store / "blobs", *(store / "blobs").iterdir()):
        os.utime(directory, (then, then))


def count_listings(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """A list that grows by one at each full listing of blobs/ against the rows."""
    calls: list[int] = []
    real = Store.compare_blobs

    def counted(self: Store, known: Any) -> Any:
        calls.append(1)
        return real(self, known)

    monkeypatch.setattr(Store, "compare_blobs", counted)
    return calls


def test_a_full_sync_does_not_list_blobs_again_while_their_directories_are_unchanged(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A no-op full reconcile costs one lstat per directory once blobs/ was listed
    with its directories last changed well before (more than any timestamp tick)."""
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        age_blob_dirs(store)
        listings = count_listings(monkeypatch)
        assert not rc.sync().changed
        assert len(listings) == 1
        assert not rc.sync().changed
        assert not rc.sync().changed
        assert len(listings) == 1
        consistent(rc, store)


def test_a_full_sync_lists_blobs_again_once_a_file_came_or_went(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _a, b, _base = two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        age_blob_dirs(store)
        rc.sync()
        listings = count_listings(monkeypatch)
        gone = str(b["digest"])
        blob_path(store, gone).unlink()  # changes blobs/sha256/'s time
        report = rc.sync()
        assert len(listings) == 1
        assert report.missing == (gone,)
        stray = write_blob(store, b"a file nothing references", "application/octet-stream")
        assert rc.sync().orphans == (stray["digest"],)


def test_a_full_sync_does_not_trust_directories_changed_just_before_its_listing(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A change in the same timestamp tick as the listing could leave the time as
    it was: directories changed within the margin are listed again next time."""
    two_images(store)
    with refcount.open(store) as rc:
        rc.init()
        listings = count_listings(monkeypatch)
        rc.sync()  # blobs/ was written moments ago
        rc.sync()
        assert len(listings) == 2
