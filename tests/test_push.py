"""`push` with leases, and last use (`touch`): SPEC §4 push/touch, §7 leases.

Sources are built by hand with storekit (an OCI layout, or a tar of one) or by
the real tools (umoci, skopeo) in the `tools` tests. The store is checked by the
independent oracle (`expected_counts`, `reachable`) and by listings before and
after every refused push.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import storekit as sk
from conftest import SEVERAL_STORES, Cli, direct_env

import refcount
from refcount.store import CRASH_ENV, at_point

REFCOUNT = (sys.executable, "-m", "refcount")
PUSH_POINTS = ("push-after-lease", "push-mid-copy", "push-before-index", "push-before-commit")
"""The crash points of a push (test_crash checks every point in the code is exercised)."""


image_blobs = sk.closure  # the digest and every blob below it, by the oracle


def assert_counted(store: Path) -> None:
    """verify is clean, counts are the oracle's, and blobs/ holds what index.json reaches."""
    with refcount.open(store) as rc:
        report = rc.verify()
        assert report.ok, report
        for digest, count in sk.expected_counts(store).items():
            assert rc.count(digest) == count, digest
    assert sk.reachable(store) <= sk.blob_files(store)


def source_with(tmp_path: Path, name: str = "src") -> tuple[Path, sk.Descriptor]:
    """A layout with image `app` (two layers) and image `other` sharing the first."""
    src = sk.make_layout(tmp_path / name)
    app = sk.add_image(src, [b"shared layer", b"app layer"], tag="app")
    sk.add_image(src, [b"shared layer", b"other layer"], tag="other")
    return src, app


def archive_of(layout: Path, path: Path, *, extra: list[tarfile.TarInfo] | None = None) -> Path:
    """A tar of `layout` as skopeo writes an oci-archive (plus crafted `extra` members)."""
    with tarfile.open(path, "w") as tar:
        for item in sorted(layout.rglob("*")):
            if ".refcount" not in item.parts:
                tar.add(item, arcname=item.relative_to(layout).as_posix(), recursive=False)
        for member in extra or []:
            tar.addfile(member, io.BytesIO(b"x" * member.size) if member.isreg() else None)
    return path


# --------------------------------------------------------------------------
# pushing: what arrives and how it is counted
# --------------------------------------------------------------------------
def test_a_push_from_a_layout_copies_the_image_tags_it_and_counts_every_blob(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src, app = source_with(tmp_path)

    result = cli("--store", store, "--json", "push", f"{src}:app")

    assert result.code == 0, result.err
    report = result.json()
    assert report["tag"] == "app" and report["digest"] == app["digest"]
    assert {b["digest"] for b in report["copied"]} == image_blobs(src, app["digest"])
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["app"]
    assert sk.blob_files(store) == image_blobs(src, app["digest"])
    assert_counted(store)


def test_a_second_push_reuses_the_shared_layer_and_copies_only_what_is_new(
    store: Path, tmp_path: Path
) -> None:
    src, _ = source_with(tmp_path)
    with refcount.open(store) as rc:
        rc.push(f"{src}:app")
        report = rc.push(f"{src}:other", tag="other:1")

    shared = sk.sha256_digest(b"shared layer")
    assert shared not in {b.digest for b in report.copied}
    assert report.reused == 1 and len(report.copied) == 3
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["app", "other:1"]
    assert_counted(store)


def test_a_push_brings_the_chunks_an_extractor_names_and_counts_them(
    store: Path, tmp_path: Path
) -> None:
    src = sk.make_layout(tmp_path / "src")
    chunks = [b"kernel chunk", b"app chunk"]
    image = sk.add_rootfs_image(src, chunks, tag="app")
    chunk_digests = {sk.sha256_digest(c) for c in chunks}

    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        report = rc.push(f"{src}:app")
        assert chunk_digests <= {b.digest for b in report.copied}
        assert sk.blob_files(store) == image_blobs(src, image["digest"])
        assert_counted(store)
        rc.delete_tag("app")

    assert not sk.blob_files(store) & chunk_digests


def test_deleting_an_image_that_shares_layers_with_a_pushed_one_keeps_them(
    store: Path, tmp_path: Path
) -> None:
    src, app = source_with(tmp_path)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.push(f"{src}:app")
        rc.push(f"{src}:other")
        rc.delete_tag("other")

    assert sk.blob_files(store) == image_blobs(src, app["digest"])
    assert_counted(store)


def test_a_push_without_ref_takes_the_only_image_and_refuses_a_source_with_several(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    one = sk.make_layout(tmp_path / "one")
    sk.add_image(one, [b"solo"], tag="solo")
    several, _ = source_with(tmp_path)
    before = sk.listing(store)

    refused = cli("--store", store, "push", several)
    assert refused.code == 2
    assert "holds 2 images (app, other): name one as SOURCE:REF" in refused.err
    assert sk.listing(store) == before

    assert cli("--store", store, "push", one).code == 0
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["solo"]


def test_pushing_to_an_existing_tag_moves_it_and_frees_the_old_image(
    store: Path, tmp_path: Path
) -> None:
    src, app = source_with(tmp_path)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.push(f"{src}:other", tag="app")
        report = rc.push(f"{src}:app")

    other = next(e for e in sk.read_index(src)["manifests"] if sk.tag_of(e) == "other")
    entries = sk.read_index(store)["manifests"]
    assert [(sk.tag_of(e), e["digest"]) for e in entries] == [("app", app["digest"])]
    assert [e.digest for e in report.replaced] == [other["digest"]]
    assert {b.digest for b in report.freed} == image_blobs(src, other["digest"]) - image_blobs(
        src, app["digest"]
    )
    assert sk.blob_files(store) == image_blobs(src, app["digest"])
    assert_counted(store)


@pytest.mark.parametrize("after", ["", ', "annotations": {"k": "v"}'])
def test_a_push_appends_its_entry_keeping_every_other_byte_of_index_json(
    store: Path, tmp_path: Path, after: str
) -> None:
    kept = sk.add_image(store, [b"kept"], tag=None)
    entry = json.dumps({**kept, "annotations": {sk.REF_NAME: "kept"}}, indent=1)
    head = f'{{ "schemaVersion": 2, "manifests": [ {entry}'
    (store / "index.json").write_text(f"{head} ]{after} }}\n")
    src, _ = source_with(tmp_path)
    with refcount.open(store) as rc:
        rc.init()
        rc.push(f"{src}:app")
        rc.push(f"{src}:other")

    data = (store / "index.json").read_text()
    assert data.startswith(head) and data.endswith(f" ]{after} }}\n")
    index = json.loads(data)
    assert [sk.tag_of(e) for e in index["manifests"]] == ["kept", "app", "other"]
    assert index.get("annotations") == ({"k": "v"} if after else None)
    assert_counted(store)
    with refcount.open(store) as rc:  # the spans recorded without a parse are right
        rc.delete_tag("app")
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["kept", "other"]
    assert_counted(store)


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_an_index_brings_every_platform_manifest_and_its_referrer_unless_told_not_to(
    tmp_path: Path,
) -> None:
    src = sk.make_layout(tmp_path / "src")
    amd = sk.add_image(src, [b"amd64 layer"], tag=None, index_entry=False)
    arm = sk.add_image(src, [b"arm64 layer"], tag=None, index_entry=False)
    multi = sk.add_index(src, [amd, arm], tag="multi")
    sbom = sk.add_referrer(src, amd, payload=b"sbom of amd64")
    signature = sk.add_referrer(src, sbom, payload=b"signature of the sbom")
    sk.add_image(src, [b"unrelated"], tag="unrelated")
    broken = sk.add_image(src, [b"broken"], tag="broken")
    flip_byte(sk.blob_path(src, broken["digest"]))  # an unrelated damaged entry: skipped
    sk.add_entry(src, {"mediaType": sk.OCI_MANIFEST, "digest": "sha256:nothex", "size": 1})

    with_referrer = sk.make_layout(tmp_path / "with")
    with refcount.open(with_referrer) as rc:
        report = rc.push(f"{src}:multi")
    entries = sk.read_index(with_referrer)["manifests"]
    assert [(sk.tag_of(e), e["digest"]) for e in entries] == [
        ("multi", multi["digest"]),
        (None, sbom["digest"]),
        (None, signature["digest"]),  # a referrer of a referrer comes too
    ]
    assert [e.tag for e in report.added] == ["multi", None, None]
    assert sk.blob_files(with_referrer) == image_blobs(src, multi["digest"]) | image_blobs(
        src, sbom["digest"]
    ) | image_blobs(src, signature["digest"])
    assert_counted(with_referrer)

    without = sk.make_layout(tmp_path / "without")
    with refcount.open(without) as rc:
        rc.push(f"{src}:multi", referrers=False)
    assert [e["digest"] for e in sk.read_index(without)["manifests"]] == [multi["digest"]]
    assert sk.blob_files(without) == image_blobs(src, multi["digest"])
    assert {amd["digest"], arm["digest"]} <= sk.blob_files(without)
    assert_counted(without)


def test_no_all_pushes_only_the_hosts_platform_manifest_as_the_root(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    from refcount.core.push import HOST_ARCHITECTURE

    src = sk.make_layout(tmp_path / "src")
    host = sk.add_image(src, [b"host layer"], tag=None, index_entry=False)
    host["platform"] = {"os": "linux", "architecture": HOST_ARCHITECTURE}
    elsewhere = sk.add_image(src, [b"other layer"], tag=None, index_entry=False)
    elsewhere["platform"] = {"os": "linux", "architecture": "no-such-arch"}
    sk.add_index(src, [elsewhere, host], tag="multi")
    sk.add_index(src, [elsewhere], tag="foreign")
    before = sk.listing(store)

    refused = cli("--store", store, "push", f"{src}:foreign", "--no-all")
    assert refused.code == 2 and f"no manifest for linux/{HOST_ARCHITECTURE}" in refused.err
    assert sk.listing(store) == before

    assert cli("--store", store, "push", f"{src}:multi", "--no-all").code == 0
    entries = sk.read_index(store)["manifests"]
    assert [(sk.tag_of(e), e["digest"]) for e in entries] == [("multi", host["digest"])]
    assert sk.blob_files(store) == image_blobs(src, host["digest"])
    assert_counted(store)


def test_a_push_from_an_oci_archive_reads_the_tar_member_by_member(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src, app = source_with(tmp_path)
    tar = archive_of(src, tmp_path / "app.tar")

    result = cli("--store", store, "push", f"oci-archive:{tar}:app", "--tag", "app:2")

    assert result.code == 0, result.err
    assert "copied 4 blobs" in result.out
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["app:2"]
    assert sk.blob_files(store) == image_blobs(src, app["digest"])
    assert_counted(store)


# --------------------------------------------------------------------------
# bad sources never cost data
# --------------------------------------------------------------------------
def flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-3])


@pytest.mark.parametrize(
    ("damage", "blob", "reason"),
    [
        (flip_byte, b"app layer", "content does not match its digest"),
        (truncate, b"app layer", "truncated: 6 of the 9 bytes its descriptor says"),
        (flip_byte, None, "content does not match its digest"),
    ],
    ids=["flipped-layer", "truncated-layer", "flipped-manifest"],
)
@pytest.mark.parametrize("kind", ["layout", "archive"])
def test_a_corrupt_or_truncated_source_blob_is_refused_naming_it_and_leaves_the_store_as_it_was(
    store: Path,
    tmp_path: Path,
    cli: Cli,
    damage: object,
    blob: bytes | None,
    reason: str,
    kind: str,
) -> None:
    existing = sk.add_image(store, [b"shared layer", b"kept"], tag="kept")
    assert cli("--store", store, "init").code == 0
    src, app = source_with(tmp_path)
    digest = sk.sha256_digest(blob) if blob is not None else app["digest"]
    assert callable(damage)
    damage(sk.blob_path(src, digest))
    spelled = (
        f"{src}:app"
        if kind == "layout"
        else f"oci-archive:{archive_of(src, tmp_path / 'a.tar')}:app"
    )
    before = sk.listing(store)

    result = cli("--store", store, "push", spelled)

    assert result.code == 2
    assert result.err.count("\n") == 1 and digest in result.err and reason in result.err
    assert "Traceback" not in result.err
    assert sk.listing(store) == before
    assert list((store / ".refcount" / "push").glob("*/*")) == []
    with refcount.open(store) as rc:
        assert rc.show(existing["digest"]).leases == ()
    assert_counted(store)


@pytest.mark.parametrize(
    ("member", "message"),
    [
        (tarfile.TarInfo("blobs/sha256/link"), "is a link; refused"),
        (tarfile.TarInfo("../escape"), "escapes the archive; refused"),
        (tarfile.TarInfo("/etc/passwd"), "escapes the archive; refused"),
        (tarfile.TarInfo("dev"), "is a device or special file; refused"),
    ],
    ids=["symlink", "dotdot", "absolute", "device"],
)
def test_an_archive_holding_a_link_a_device_or_an_escaping_name_is_refused_whole(
    store: Path, tmp_path: Path, cli: Cli, member: tarfile.TarInfo, message: str
) -> None:
    src, _ = source_with(tmp_path)
    if member.name.endswith("link"):
        member.type, member.linkname = tarfile.SYMTYPE, "/etc/passwd"
    elif member.name == "dev":
        member.type = tarfile.CHRTYPE
    else:
        member.size = 1
    tar = archive_of(src, tmp_path / "bad.tar", extra=[member])
    before = sk.listing(store)

    result = cli("--store", store, "push", f"oci-archive:{tar}:app")

    assert result.code == 2
    assert message in result.err and repr(member.name) in result.err
    assert sk.listing(store) == before
    assert not (tmp_path / "escape").exists()


@pytest.mark.parametrize(
    ("spelling", "code", "message"),
    [
        ("{tmp}/nowhere:app", 2, "is not a directory"),
        ("{src}:missing", 1, "no image 'missing' in its index.json"),
        ("oci-archive:{tmp}/nothing.tar:app", 2, "cannot read"),
        ("oci-archive:{src}/oci-layout:app", 2, "cannot read"),
        (":app", 2, "no path"),
    ],
    ids=["no-dir", "no-ref", "no-archive", "not-a-tar", "no-path"],
)
def test_a_source_that_cannot_be_read_is_refused_with_one_line(
    store: Path, tmp_path: Path, cli: Cli, spelling: str, code: int, message: str
) -> None:
    src, _ = source_with(tmp_path)
    before = sk.listing(store)

    result = cli("--store", store, "push", spelling.format(tmp=tmp_path, src=src))

    assert result.code == code
    assert message in result.err and result.err.count("\n") == 1
    assert sk.listing(store) == before


def test_a_source_blob_that_is_a_symbolic_link_is_never_followed(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src, _ = source_with(tmp_path)
    layer = sk.blob_path(src, sk.sha256_digest(b"app layer"))
    outside = tmp_path / "outside"
    outside.write_bytes(b"app layer")
    layer.unlink()
    layer.symlink_to(outside)
    before = sk.listing(store)

    result = cli("--store", store, "push", f"{src}:app")

    assert result.code == 2 and "is a symbolic link; not followed" in result.err
    assert sk.listing(store) == before


def test_a_push_into_a_store_whose_index_is_invalid_copies_nothing(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src, _ = source_with(tmp_path)
    (store / "index.json").write_text('{"schemaVersion": 2}')
    before = sk.listing(store)

    result = cli("--store", store, "push", f"{src}:app")

    assert result.code == 2 and "manifests is missing" in result.err
    assert sk.listing(store) == before


def test_an_unusable_tag_is_refused_before_anything_is_read(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src, _ = source_with(tmp_path)
    before = sk.listing(store)

    result = cli("--store", store, "push", f"{src}:app", "--tag", "bad\ttag")

    assert result.code == 2 and "not a usable tag" in result.err
    assert sk.listing(store) == before


# --------------------------------------------------------------------------
# leases (SPEC §7)
# --------------------------------------------------------------------------
def test_a_delete_landing_between_the_reuse_decision_and_the_index_write_frees_nothing_pushed(
    store: Path, tmp_path: Path
) -> None:
    """The store's only holder of the shared layer is deleted mid-push; the
    pushed image is complete afterwards, and the delete freed only b's own blobs."""
    b = sk.add_image(store, [b"shared layer", b"b layer"], tag="b")
    src, app = source_with(tmp_path)
    shared = sk.sha256_digest(b"shared layer")
    b_blobs = image_blobs(store, b["digest"])
    seen: dict[str, object] = {}

    def delete_b() -> None:
        with refcount.open(store, trash_ttl=timedelta(0)) as other:
            seen["leases"] = other.show(shared).leases
            seen["freed"] = {f.digest for f in other.delete_tag("b").freed}
        seen["present"] = sk.blob_files(store)

    with refcount.open(store) as rc:
        rc.init()
        with at_point("push-before-index", delete_b):
            report = rc.push(f"{src}:app")

    assert shared not in {c.digest for c in report.copied}  # the push decided to reuse it
    assert [lease.holder.startswith(f"push {src}:app") for lease in seen["leases"]] == [True]  # type: ignore[attr-defined]
    assert shared in seen["present"]  # type: ignore[operator]
    assert seen["freed"] == b_blobs - {shared}
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["app"]
    assert image_blobs(src, app["digest"]) == sk.blob_files(store)
    assert_counted(store)
    with refcount.open(store) as rc:
        assert rc.show(shared).leases == ()  # the lease ends with the push


def test_a_quarantined_blob_a_push_needs_is_restored_not_copied(
    store: Path, tmp_path: Path
) -> None:
    sk.add_image(store, [b"shared layer"], tag="gone")
    src, app = source_with(tmp_path)
    shared = sk.sha256_digest(b"shared layer")
    with refcount.open(store) as rc:
        rc.init()
        rc.delete_tag("gone")
        assert shared not in sk.blob_files(store)
        report = rc.push(f"{src}:app")

    assert report.restored == (shared,)
    assert shared not in {c.digest for c in report.copied}
    assert sk.blob_files(store) == image_blobs(src, app["digest"])
    assert not (store / ".refcount" / "trash" / "sha256" / shared.split(":")[1]).exists()
    assert_counted(store)


def test_a_library_lease_keeps_a_blob_from_delete_and_gc_until_the_block_ends(
    store: Path, cli: Cli
) -> None:
    image = sk.add_image(store, [b"leased layer"], tag="t")
    layer = sk.sha256_digest(b"leased layer")
    with refcount.open(store, trash_ttl=timedelta(0), grace=timedelta(0)) as rc:
        rc.init()
        with rc.lease([layer], holder="my tool") as lease:
            freed = {f.digest for f in rc.delete_tag("t").freed}
            assert layer not in freed and image["digest"] in freed
            assert rc.gc().swept == ()
            assert [x.lease for x in rc.show(layer).leases] == [lease.lease]
            shown = cli("--store", store, "show", layer)
            assert shown.code == 0 and f"lease:      {lease.lease} by my tool, since " in shown.out
            assert layer in sk.blob_files(store)
            assert rc.verify().ok
        assert [a.digest for a in rc.gc().swept] == [layer]
    assert sk.blob_files(store) == set()


def test_an_outside_removal_synced_as_a_daemon_batch_keeps_a_leased_blob(store: Path) -> None:
    image = sk.add_image(store, [b"leased layer"], tag="t")
    layer = sk.sha256_digest(b"leased layer")
    with refcount.open(store, trash_ttl=timedelta(0), grace=timedelta(0)) as rc:
        rc.init()
        blobs = image_blobs(store, image["digest"])
        with rc.lease([layer]):
            sk.remove_entries(store, lambda e: sk.tag_of(e) == "t")  # as umoci rm does
            report = rc.sync(refcount.Changes(index=True))  # what a daemon batch runs
            assert {f.digest for f in report.freed} == blobs - {layer}
            assert rc.gc().swept == ()
        assert layer in sk.blob_files(store)
        assert rc.verify().ok


def test_a_lease_keeps_a_quarantined_blob_from_being_purged(store: Path) -> None:
    sk.add_image(store, [b"layer"], tag="t")
    layer = sk.sha256_digest(b"layer")
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
    with refcount.open(store) as rc:  # default TTL: freed into the quarantine
        rc.delete_tag("t")
    with refcount.open(store, trash_ttl=timedelta(0)) as rc, rc.lease([layer]):
        purged = {a.digest for a in rc.gc().purged}
        assert layer not in purged and len(purged) == 2  # the manifest and its config
        assert rc.stats().quarantined_blobs == 1


def test_a_push_killed_mid_copy_leaves_nothing_gc_cannot_clean_once_its_lease_expires(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    kept = sk.add_image(store, [b"shared layer", b"kept"], tag="kept")
    assert cli("--store", store, "init").code == 0
    src = sk.make_layout(tmp_path / "src")
    sk.add_image(src, [b"shared layer", b"\x01" * (96 << 20)], tag="big")
    before = sk.listing(store)
    push = subprocess.Popen(
        [*REFCOUNT, "--store", str(store), "push", f"{src}:big", "--lease-ttl", "2s"],
        env=direct_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    staged = store / ".refcount" / "push"
    big_layer = sk.sha256_digest(b"\x01" * (96 << 20)).replace(":", "-")
    while push.poll() is None and not any(
        p.name == big_layer and p.stat().st_size > 0 for p in staged.glob("*/*")
    ):
        time.sleep(0.001)
    push.send_signal(signal.SIGKILL)
    assert push.wait() == -signal.SIGKILL, "the push ended before it was killed"

    assert sk.listing(store) == before  # index.json and blobs/ untouched
    verify = cli("--store", store, "--json", "verify")
    assert verify.code == 0
    assert cli("--store", store, "--grace", "0s", "gc").code == 0
    assert list(staged.glob("*/*")), "gc removed the staging of a lease still alive"

    deadline = time.monotonic() + 30
    while not cli("--store", store, "--json", "verify").json()["expired_leases"]:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    gc = cli("--store", store, "--json", "--grace", "0s", "gc")
    assert gc.code == 0
    assert [lease["holder"].split(" (pid")[0] for lease in gc.json()["leases_cleared"]] == [
        f"push {src}:big"
    ]
    assert list(staged.glob("*")) == []
    assert sk.blob_files(store) == image_blobs(store, kept["digest"]) == sk.reachable(store)
    assert cli("--store", store, "--json", "verify").json()["expired_leases"] == []
    assert_counted(store)


@pytest.mark.parametrize("point", PUSH_POINTS)
def test_a_push_crashed_at_any_point_heals_and_loses_no_needed_blob(
    store: Path, tmp_path: Path, cli: Cli, point: str
) -> None:
    sk.add_image(store, [b"shared layer", b"kept"], tag="kept")
    assert cli("--store", store, "init").code == 0
    src, _ = source_with(tmp_path)
    ttl = "0s" if point == "push-mid-copy" else "1h"
    crashed = subprocess.run(
        [*REFCOUNT, "--store", str(store), "push", f"{src}:app", "--lease-ttl", ttl],
        env={**direct_env(), CRASH_ENV: point},
        capture_output=True,
        text=True,
        check=False,
    )
    assert crashed.returncode == 137, crashed.stderr

    assert cli("--store", store, "sync").code == 0
    assert_counted(store)
    tags = [sk.tag_of(e) for e in sk.read_index(store)["manifests"]]
    assert tags == (["kept", "app"] if point == "push-before-commit" else ["kept"])
    if point == "push-mid-copy":  # its lease has expired: gc cleans up everything
        assert cli("--store", store, "--grace", "0s", "gc").code == 0
        assert sk.blob_files(store) == sk.reachable(store)
        assert list((store / ".refcount" / "push").glob("*")) == []


def test_a_push_that_outlives_its_lease_adds_nothing(store: Path, tmp_path: Path, cli: Cli) -> None:
    src, _ = source_with(tmp_path)
    assert cli("--store", store, "init").code == 0

    result = cli("--store", store, "push", f"{src}:app", "--lease-ttl", "0s")

    assert result.code == 2 and "outlived its lease" in result.err
    assert sk.read_index(store)["manifests"] == []


# --------------------------------------------------------------------------
# last use
# --------------------------------------------------------------------------
def test_touch_records_last_use_that_tags_and_du_show_and_a_push_counts_as_use(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    a = sk.add_image(store, [b"a"], tag="a")
    sk.add_image(store, [b"b"], tag="b")
    sk.add_entry(store, a, "a-again")
    assert cli("--store", store, "init").code == 0
    src, _ = source_with(tmp_path)

    def last_use(command: str) -> dict[str, object]:
        result = cli("--store", store, "--json", command)
        rows = result.json() if command == "tags" else result.json()["tags"]
        return {row["tag"]: row["last_used"] for row in rows}

    assert set(last_use("tags").values()) == {None}

    touched = cli("--store", store, "touch", a["digest"])
    assert touched.code == 0 and touched.out.startswith("used a, a-again at ")
    assert cli("--store", store, "push", f"{src}:app").code == 0

    tags, du = last_use("tags"), last_use("du")
    assert tags == du
    assert tags["b"] is None
    assert tags["a"] is not None and tags["a"] == tags["a-again"] and tags["app"] is not None
    assert str(tags["app"]) > str(tags["a"])
    with refcount.open(store) as rc:
        assert set(rc.last_used(["a", "b", "app"])) == {"a", "app"}
        rc.delete_tag("app")  # a deleted tag's last use is forgotten with it
        assert set(rc.last_used(["a", "b", "app"])) == {"a"}


@pytest.mark.parametrize(
    ("untagged", "message"),
    [(False, "nope: no such tag"), (True, "no tag in")],
    ids=["unknown-tag", "untagged-digest"],
)
def test_touch_of_a_tag_that_does_not_exist_is_refused_and_records_nothing(
    store: Path, cli: Cli, untagged: bool, message: str
) -> None:
    sk.add_image(store, [b"a"], tag="a")
    ref = sk.add_image(store, [b"u"], tag=None)["digest"] if untagged else "nope"
    assert cli("--store", store, "init").code == 0

    result = cli("--store", store, "touch", ref)

    assert result.code == 1 and message in result.err
    with refcount.open(store) as rc:
        assert rc.last_used(["a", "nope"]) == {}


# --------------------------------------------------------------------------
# with a daemon running
# --------------------------------------------------------------------------
def test_a_push_beside_a_running_daemon_runs_directly_and_touch_is_served(
    store: Path, tmp_path: Path
) -> None:
    sk.add_image(store, [b"shared layer", b"kept"], tag="kept")
    src, app = source_with(tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "REFCOUNT_NO_DAEMON"}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*REFCOUNT, "--store", str(store), *args],
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )

    daemon = subprocess.Popen(
        [*REFCOUNT, "--store", str(store), "watch"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while not (store / ".refcount" / "refcount.sock").exists():
            assert time.monotonic() < deadline and daemon.poll() is None
            time.sleep(0.05)
        pushed = run("push", f"{src}:app")
        assert pushed.returncode == 0, pushed.stderr
        touched = run("-v", "touch", "app")
        assert touched.returncode == 0, touched.stderr
        deleted = run("delete", "tag", "kept")
        assert deleted.returncode == 0, deleted.stderr
    finally:
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(timeout=60) == 0
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["app"]
    assert image_blobs(src, app["digest"]) <= sk.blob_files(store)
    assert_counted(store)


# --------------------------------------------------------------------------
# the real tools
# --------------------------------------------------------------------------
def tool_checks(store: Path, tag: str, tmp_path: Path) -> None:
    """The pushed image unpacks with umoci and copies out with skopeo; umoci gc
    frees nothing; verify is clean."""
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    sk.run(["umoci", "unpack", *rootless, "--image", f"{store}:{tag}", str(tmp_path / "bundle")])
    assert (tmp_path / "bundle" / "rootfs").is_dir()
    sk.skopeo_copy(store, tag, tmp_path / "out", tag)
    before = sk.blob_files(store)
    sk.run(["umoci", "gc", "--layout", str(store)])
    assert sk.blob_files(store) == before
    assert_counted(store)


@pytest.mark.tools
def test_a_umoci_image_pushed_unpacks_copies_out_survives_umoci_gc_and_keeps_shared_layers(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src = sk.umoci_shared_store(tmp_path / "src")
    shutil.rmtree(store)
    sk.run(["umoci", "init", "--layout", str(store)])
    assert cli("--store", store, "push", f"{src}:a").code == 0
    assert cli("--store", store, "push", f"{src}:b").code == 0

    tool_checks(store, "a", tmp_path)
    assert cli("--store", store, "--trash-ttl", "0", "delete", "tag", "b").code == 0
    tool_checks(store, "a", tmp_path / "again")
    assert sk.blob_files(store) == sk.reachable(store)


@pytest.mark.tools
def test_an_oci_archive_made_by_skopeo_pushes_and_copies_out(
    store: Path, tmp_path: Path, cli: Cli
) -> None:
    src = sk.umoci_shared_store(tmp_path / "src")
    tar = tmp_path / "a.tar"
    sk.run(["skopeo", "copy", "--quiet", f"oci:{src}:a", f"oci-archive:{tar}:a"])

    result = cli("--store", store, "push", f"oci-archive:{tar}")

    assert result.code == 0, result.err
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["a"]
    tool_checks(store, "a", tmp_path)


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_the_push_benchmark_runs_end_to_end_and_writes_every_figure(tmp_path: Path) -> None:
    script = Path(__file__).resolve().parent.parent / "scripts" / "bench_push.py"
    out = tmp_path / "bench.json"
    options = ("--mib", "1", "--images", "2,4", "--pushes", "1", "--out", str(tmp_path))
    subprocess.run(
        [sys.executable, str(script), *options, "--json", str(out)],
        env=direct_env(),
        check=True,
        capture_output=True,
    )
    figures = json.loads(out.read_text())
    assert {"floor_s", "push_s", "push_vs_floor"} <= set(figures["throughput"])
    assert set(figures["store_size"]["push_vs_smallest_store"]) == {"2", "4"}
