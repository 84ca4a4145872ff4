"""refcount on real stores made by Debian's umoci and skopeo, driven through the CLI.

Every store here is written by the real tools (OCI-TOOLS.md), indexed with
`refcount init`, changed with refcount's destructive commands, and then checked
by outsiders: storekit's from-scratch oracle for counts and reachability,
`umoci unpack` and `skopeo copy` for "the remaining image is complete",
`umoci gc` for "nothing unreachable was left behind" and `oci-image-tool
validate` for "the layout is still valid".

umoci's own build steps leave unreachable intermediate blobs (the manifest and
config of every image state `insert`/`repack` replaced). refcount rightly keeps
those as orphans until their grace period ends (SPEC §3), so each fixture runs
`umoci gc` once before `refcount init`: from then on, a `umoci gc` that removes
anything would mean refcount left an unreachable blob in blobs/.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import storekit as sk

import refcount
from refcount.cli import main

pytestmark = pytest.mark.tools

ROOTLESS = [] if os.geteuid() == 0 else ["--rootless"]


@pytest.fixture(autouse=True)
def _tools() -> None:
    for tool in ("umoci", "skopeo", "oci-image-tool"):
        sk.need_tool(tool)


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


@dataclass(frozen=True)
class Ran:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Refcount = Callable[..., Ran]


@pytest.fixture
def refcount_cli(capsys: pytest.CaptureFixture[str]) -> Refcount:
    """`refcount --store STORE ARGS...` in-process, through main()'s error boundary."""

    def invoke(store: Path, *args: str) -> Ran:
        capsys.readouterr()
        code = main(["--store", str(store), *args])
        captured = capsys.readouterr()
        return Ran(code, captured.out, captured.err)

    return invoke


def succeed(refcount_cli: Refcount, store: Path, *args: str) -> Ran:
    """Run a command that must succeed quietly: exit 0, nothing on stderr."""
    ran = refcount_cli(store, *args)
    assert (ran.code, ran.err) == (0, ""), f"refcount {' '.join(args)}: {ran}"
    return ran


def run_module(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`python -m refcount --store STORE ARGS...` as a whole process."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFCOUNT_")}
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )


closure = sk.closure  # every digest reachable from one (itself included), by the oracle


def digest_of(store: Path, tag: str) -> str:
    """The digest index.json tags `tag` with, read from the file itself."""
    entries = [e for e in sk.read_index(store)["manifests"] if sk.tag_of(e) == tag]
    assert len(entries) == 1, entries
    return str(entries[0]["digest"])


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    if not trash.is_dir():
        return set()
    return {f"{alg.name}:{p.name}" for alg in trash.iterdir() for p in alg.iterdir()}


def umoci_gc_removes_nothing(store: Path) -> None:
    before = sk.listing(store, include_refcount=True)
    sk.run(["umoci", "gc", "--layout", str(store)])
    after = sk.listing(store, include_refcount=True)
    assert after == before, f"umoci gc removed {sorted(set(before) - set(after))}"


def assert_store_sound(refcount_cli: Refcount, store: Path) -> None:
    """What must hold after every destructive command."""
    sk.oci_validate(store)
    umoci_gc_removes_nothing(store)
    assert sk.blob_files(store) == sk.reachable(store)
    verify = refcount_cli(store, "verify")
    assert verify.code == 0, verify
    assert verify.out.splitlines()[-1].startswith("OK:")


def assert_counts_match_oracle(store: Path, digests: Iterable[str] = ()) -> None:
    """The library's counts equal storekit's from-scratch counts (0 for `digests` not live)."""
    expected = sk.expected_counts(store)
    with refcount.open(store) as rc:
        got = {d: rc.count(d) for d in {*expected, *digests}}
    assert got == {d: expected.get(d, 0) for d in got}


def index_shared(store: Path, refcount_cli: Refcount) -> tuple[str, str, set[str]]:
    """`refcount init` the shared store; the digests of a and b, and the blobs only a
    holds (what deleting it frees)."""
    a, b = digest_of(store, "a"), digest_of(store, "b")
    succeed(refcount_cli, store, "init")
    return a, b, closure(store, a) - closure(store, b)


def freed_digests(report: dict[str, Any]) -> set[str]:
    return {b["digest"] for b in report["freed"]}


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """umoci images a (f0+f1) and b (f0+f2) sharing base's layer f0; no base tag;
    umoci's build intermediates swept."""
    store = sk.umoci_shared_store(tmp_path / "shared", keep_base=False)
    sk.run(["umoci", "gc", "--layout", str(store)])
    assert sk.blob_files(store) == sk.reachable(store)
    return store


# --------------------------------------------------------------------------
# Two umoci images sharing a base layer
# --------------------------------------------------------------------------


def test_deleting_one_umoci_image_leaves_the_image_sharing_its_base_layer_complete(
    shared: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    a, b = digest_of(shared, "a"), digest_of(shared, "b")
    of_a, of_b = closure(shared, a), closure(shared, b)
    # Each image is a manifest, a config and two layers; only base's layer is common.
    assert len(of_a) == len(of_b) == 4
    (base_layer,) = of_a & of_b
    only_a = of_a - of_b

    index_mode = (shared / "index.json").stat().st_mode & 0o777
    succeed(refcount_cli, shared, "init")
    assert_counts_match_oracle(shared)
    report = succeed(refcount_cli, shared, "--json", "delete", "tag", "a").json()

    assert [(e["tag"], e["digest"]) for e in report["removed"]] == [("a", a)]
    assert freed_digests(report) == only_a
    assert sk.blob_files(shared) == of_b
    assert base_layer in sk.blob_files(shared)
    assert trash_files(shared) == only_a
    assert_counts_match_oracle(shared, only_a)
    assert_store_sound(refcount_cli, shared)
    # umoci still reads the index.json refcount rewrote, and its mode is kept (umoci: 0600).
    assert sk.run(["umoci", "ls", "--layout", str(shared)]).stdout.split() == ["b"]
    assert (shared / "index.json").stat().st_mode & 0o777 == index_mode

    bundle = tmp_path / "bundle"
    sk.run(["umoci", "unpack", *ROOTLESS, "--image", f"{shared}:b", str(bundle)])
    assert (bundle / "rootfs" / "f0").read_text() == "content of f0\n"
    assert (bundle / "rootfs" / "f2").read_text() == "content of f2\n"
    assert not (bundle / "rootfs" / "f1").exists()
    other = tmp_path / "other"
    sk.skopeo_copy(shared, "b", other, "b")
    assert sk.blob_files(other) == of_b
    sk.oci_validate(other)


def test_deleting_the_last_tag_frees_every_blob(shared: Path, refcount_cli: Refcount) -> None:
    everything = sk.blob_files(shared)
    succeed(refcount_cli, shared, "init")

    succeed(refcount_cli, shared, "delete", "tag", "a")
    assert_store_sound(refcount_cli, shared)
    report = succeed(refcount_cli, shared, "--json", "delete", "tag", "b").json()

    assert sk.read_index(shared)["manifests"] == []
    assert sk.reachable(shared) == set()
    assert sk.blob_files(shared) == set()
    assert trash_files(shared) == everything
    assert len(freed_digests(report)) == 4  # b's manifest, config and both layers
    assert succeed(refcount_cli, shared, "--json", "tags").json() == []
    assert_counts_match_oracle(shared, everything)
    assert_store_sound(refcount_cli, shared)


def test_gc_purges_the_quarantine_after_the_trash_ttl_and_ttl_zero_unlinks_at_once(
    shared: Path, refcount_cli: Refcount
) -> None:
    _a, _b, only_a = index_shared(shared, refcount_cli)
    succeed(refcount_cli, shared, "delete", "tag", "a")
    assert trash_files(shared) == only_a

    report = succeed(refcount_cli, shared, "--trash-ttl", "0", "--json", "gc").json()
    assert {p["digest"] for p in report["purged"]} == only_a
    assert report["swept"] == []
    assert trash_files(shared) == set()
    assert_store_sound(refcount_cli, shared)

    succeed(refcount_cli, shared, "--trash-ttl", "0", "delete", "tag", "b")
    assert sk.blob_files(shared) == set()
    assert trash_files(shared) == set()
    assert_store_sound(refcount_cli, shared)


# --------------------------------------------------------------------------
# Images built with umoci new/insert/repack/config/tag, copied with skopeo
# --------------------------------------------------------------------------


@pytest.fixture
def built(tmp_path: Path) -> Path:
    """base = app -> M1 (f0); app2 = repack of app (f0 removed, `edited` added) -> M2;
    app3 = app2 with a label -> M3, same layers as M2, another config."""
    store = tmp_path / "built"
    src = tmp_path / "src"
    src.mkdir()
    (src / "f0").write_text("f0\n")
    layout = str(store)
    sk.run(["umoci", "init", "--layout", layout])
    sk.run(["umoci", "new", "--image", f"{layout}:base"])
    sk.run(["umoci", "insert", *ROOTLESS, "--image", f"{layout}:base", str(src / "f0"), "/f0"])
    sk.run(["umoci", "tag", "--image", f"{layout}:base", "app"])
    bundle = tmp_path / "bundle"
    sk.run(["umoci", "unpack", *ROOTLESS, "--image", f"{layout}:app", str(bundle)])
    (bundle / "rootfs" / "edited").write_text("edited\n")
    (bundle / "rootfs" / "f0").unlink()
    sk.run(["umoci", "repack", *ROOTLESS, "--image", f"{layout}:app2", str(bundle)])
    sk.run(
        ["umoci", "config", "--image", f"{layout}:app2", "--tag", "app3", "--config.label", "k=v"]
    )
    return store


def test_counts_of_a_store_built_by_umoci_equal_a_recount_from_scratch(
    built: Path, refcount_cli: Refcount
) -> None:
    succeed(refcount_cli, built, "init")
    expected = sk.expected_counts(built)
    shown = {d: succeed(refcount_cli, built, "--json", "show", d).json()["count"] for d in expected}
    assert shown == expected
    # By construction: base and app are two entries for one manifest; f0's layer is
    # under all three manifests; the repack layer under app2's and app3's.
    base = digest_of(built, "base")
    (f0_layer,) = json.loads(sk.blob_path(built, base).read_bytes())["layers"]
    assert shown[base] == 2
    assert shown[f0_layer["digest"]] == 3
    assert succeed(refcount_cli, built, "--json", "show", "app3").json()["count"] == 1
    # umoci's replaced intermediates are on disk but were never reachable: orphans.
    orphans = sk.blob_files(built) - sk.reachable(built)
    assert orphans, "umoci insert/config leave replaced manifests and configs behind"
    for digest in orphans:
        info = succeed(refcount_cli, built, "--json", "show", digest).json()
        assert (info["count"], info["state"]) == (0, "orphan")
    assert [t["tag"] for t in succeed(refcount_cli, built, "--json", "tags").json()] == [
        "base",
        "app",
        "app2",
        "app3",
    ]


def test_deleting_a_skopeo_copy_keeps_the_layers_its_sibling_shares(
    built: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    copy = tmp_path / "copy"
    sk.skopeo_copy(built, "app2", copy, "app2")
    sk.skopeo_copy(built, "app3", copy, "app3")
    app2, app3 = digest_of(copy, "app2"), digest_of(copy, "app3")
    assert (app2, app3) == (digest_of(built, "app2"), digest_of(built, "app3"))
    only_app2 = closure(copy, app2) - closure(copy, app3)
    # app3 is app2 with a label: only its manifest and config differ.
    assert len(only_app2) == 2
    succeed(refcount_cli, copy, "init")
    assert_counts_match_oracle(copy)

    report = succeed(refcount_cli, copy, "--json", "delete", "tag", "app2").json()

    assert freed_digests(report) == only_app2
    assert sk.blob_files(copy) == closure(copy, app3)
    assert_counts_match_oracle(copy, freed_digests(report))
    assert_store_sound(refcount_cli, copy)
    sk.run(["umoci", "unpack", *ROOTLESS, "--image", f"{copy}:app3", str(tmp_path / "b3")])
    assert (tmp_path / "b3" / "rootfs" / "edited").read_text() == "edited\n"


def test_a_new_umoci_image_after_init_is_counted_by_sync(
    built: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    succeed(refcount_cli, built, "init")
    extra = tmp_path / "extra"
    extra.write_text("extra\n")
    sk.run(["umoci", "tag", "--image", f"{built}:app3", "app4"])
    sk.run(["umoci", "insert", *ROOTLESS, "--image", f"{built}:app4", str(extra), "/extra"])

    succeed(refcount_cli, built, "sync")

    assert_counts_match_oracle(built)
    verify = refcount_cli(built, "verify")
    assert verify.code == 0, verify


# --------------------------------------------------------------------------
# skopeo re-tagging leaves the previous manifest as an untagged root
# --------------------------------------------------------------------------


def test_a_manifest_left_untagged_by_a_skopeo_retag_stays_counted_until_deleted(
    shared: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    store = tmp_path / "retag"
    sk.skopeo_copy(shared, "a", store, "app")
    old = digest_of(store, "app")
    succeed(refcount_cli, store, "init")

    sk.skopeo_copy(shared, "b", store, "app")  # copy a different image onto the tag
    new = digest_of(store, "app")
    entries = sk.read_index(store)["manifests"]
    assert [(e["digest"], sk.tag_of(e)) for e in entries] == [(old, None), (new, "app")]
    succeed(refcount_cli, store, "sync")

    tags = succeed(refcount_cli, store, "--json", "tags").json()
    assert [(t["tag"], t["digest"]) for t in tags] == [("app", new)]
    info = succeed(refcount_cli, store, "--json", "show", old).json()
    assert (info["count"], info["state"]) == (1, "live")
    assert_counts_match_oracle(store)

    report = succeed(refcount_cli, store, "--json", "delete", "manifest", old).json()

    assert [(e["digest"], e["tag"]) for e in report["removed"]] == [(old, None)]
    only_old = closure(shared, old) - closure(shared, new)
    assert freed_digests(report) == only_old
    assert sk.blob_files(store) == closure(store, new)
    assert_counts_match_oracle(store, only_old)
    assert_store_sound(refcount_cli, store)


# --------------------------------------------------------------------------
# --dry-run prints exactly what the real run removes
# --------------------------------------------------------------------------


def test_dry_run_of_delete_tag_reports_exactly_what_the_real_run_removes(
    tmp_path: Path,
) -> None:
    pristine = sk.umoci_shared_store(tmp_path / "pristine", keep_base=True)
    sk.run(["umoci", "gc", "--layout", str(pristine)])
    dry, real = tmp_path / "dry", tmp_path / "real"
    shutil.copytree(pristine, dry, symlinks=True)
    shutil.copytree(pristine, real, symlinks=True)
    for store in (dry, real):
        assert run_module(store, "init").returncode == 0

    before = sk.listing(dry)
    planned = run_module(dry, "--json", "delete", "tag", "a", "--dry-run")
    assert (planned.returncode, planned.stderr) == (0, "")
    assert sk.listing(dry) == before
    assert run_module(dry, "verify").returncode == 0
    blobs_before = sk.blob_files(real)
    done = run_module(real, "--json", "delete", "tag", "a")
    assert (done.returncode, done.stderr) == (0, "")

    plan, result = json.loads(planned.stdout), json.loads(done.stdout)
    assert (plan["dry_run"], result["dry_run"]) == (True, False)
    assert plan["removed"] == result["removed"]
    assert sorted(plan["freed"], key=str) == sorted(result["freed"], key=str)
    assert plan["freed_bytes"] == result["freed_bytes"] > 0
    assert blobs_before - sk.blob_files(real) == freed_digests(result)
    # a shares f0 with b and base, so only a's manifest, config and f1 layer go.
    assert len(freed_digests(result)) == 3
    assert sk.blob_files(dry) == blobs_before
    assert trash_files(dry) == set()


# --------------------------------------------------------------------------
# What the tools write, and undoing a delete
# --------------------------------------------------------------------------


def test_init_accepts_the_null_manifests_of_a_fresh_umoci_layout(
    tmp_path: Path, refcount_cli: Refcount
) -> None:
    store = tmp_path / "fresh"
    sk.run(["umoci", "init", "--layout", str(store)])
    assert sk.read_index(store)["manifests"] is None
    before = sk.listing(store)

    succeed(refcount_cli, store, "init")

    assert succeed(refcount_cli, store, "--json", "tags").json() == []
    assert refcount_cli(store, "verify").code == 0
    assert sk.listing(store) == before


def test_an_oci_and_a_docker_copy_of_one_image_count_their_shared_blobs_once_each(
    shared: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    store = tmp_path / "mixed"
    sk.skopeo_copy(shared, "b", store, "app:1.0")
    sk.run(
        [
            "skopeo",
            "copy",
            "--quiet",
            "--format",
            "v2s2",
            f"oci:{shared}:b",
            f"oci:{store}:app:docker",
        ]
    )
    oci, docker = digest_of(store, "app:1.0"), digest_of(store, "app:docker")
    # The conversion rewrites only the manifest: config and layers keep their digests.
    assert closure(store, oci) - {oci} == closure(store, docker) - {docker}
    assert len(closure(store, oci)) == 4
    succeed(refcount_cli, store, "init")
    assert_counts_match_oracle(store)
    for digest in closure(store, oci) - {oci}:
        assert succeed(refcount_cli, store, "--json", "show", digest).json()["count"] == 2

    report = succeed(refcount_cli, store, "--json", "delete", "tag", "app:1.0").json()

    assert freed_digests(report) == {oci}
    assert sk.blob_files(store) == closure(store, docker)
    assert_counts_match_oracle(store, {oci})
    assert refcount_cli(store, "verify").code == 0
    # umoci gc cannot judge this store: it treats Docker manifests as leaves.

    report = succeed(refcount_cli, store, "--json", "delete", "tag", "app:docker").json()
    assert len(freed_digests(report)) == 4
    assert sk.blob_files(store) == set()
    assert refcount_cli(store, "verify").code == 0


def test_an_image_pushed_again_with_skopeo_after_its_delete_is_counted_and_kept(
    shared: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    backup = tmp_path / "backup"
    sk.skopeo_copy(shared, "a", backup, "a")
    a, b, only_a = index_shared(shared, refcount_cli)
    succeed(refcount_cli, shared, "delete", "tag", "a")
    assert trash_files(shared) == only_a

    sk.skopeo_copy(backup, "a", shared, "a")  # rewrites a's blobs into blobs/
    succeed(refcount_cli, shared, "sync")

    assert_counts_match_oracle(shared)
    assert sk.blob_files(shared) == closure(shared, a) | closure(shared, b)
    assert trash_files(shared) & sk.blob_files(shared) == set()
    assert_store_sound(refcount_cli, shared)
    succeed(refcount_cli, shared, "--trash-ttl", "0", "gc")
    assert sk.blob_files(shared) == closure(shared, a) | closure(shared, b)
    assert_store_sound(refcount_cli, shared)


def test_restoring_index_json_from_a_backup_brings_the_quarantined_image_back(
    shared: Path, tmp_path: Path, refcount_cli: Refcount
) -> None:
    a, b, only_a = index_shared(shared, refcount_cli)
    saved = (shared / "index.json").read_bytes()
    succeed(refcount_cli, shared, "delete", "tag", "a")
    assert not only_a & sk.blob_files(shared)

    (shared / "index.json").write_bytes(saved)  # the user undoes the delete
    report = succeed(refcount_cli, shared, "--json", "sync").json()

    assert set(report["restored"]) == only_a
    assert trash_files(shared) == set()
    assert sk.blob_files(shared) == closure(shared, a) | closure(shared, b)
    assert_counts_match_oracle(shared)
    assert_store_sound(refcount_cli, shared)
    bundle = tmp_path / "bundle"
    sk.run(["umoci", "unpack", *ROOTLESS, "--image", f"{shared}:a", str(bundle)])
    assert (bundle / "rootfs" / "f1").read_text() == "content of f1\n"


def test_a_tag_removed_with_umoci_rm_is_freed_by_the_next_sync(
    shared: Path, refcount_cli: Refcount
) -> None:
    _a, b, only_a = index_shared(shared, refcount_cli)

    sk.run(["umoci", "rm", "--image", f"{shared}:a"])
    report = succeed(refcount_cli, shared, "--json", "sync").json()

    assert freed_digests(report) == only_a
    assert sk.blob_files(shared) == closure(shared, b)
    assert_counts_match_oracle(shared, only_a)
    assert_store_sound(refcount_cli, shared)


def test_orphans_that_umoci_gc_removes_are_forgotten_by_the_next_sync(
    built: Path, refcount_cli: Refcount
) -> None:
    orphans = sk.blob_files(built) - sk.reachable(built)
    assert orphans
    succeed(refcount_cli, built, "init")
    live = sk.blob_files(built) - orphans

    sk.run(["umoci", "gc", "--layout", str(built)])
    succeed(refcount_cli, built, "sync")

    assert sk.blob_files(built) == live
    verify = succeed(refcount_cli, built, "--json", "verify").json()
    assert (verify["ok"], verify["orphans"], verify["missing"]) == (True, [], [])
    for digest in orphans:
        shown = refcount_cli(built, "show", digest)
        assert shown.code == 1
        assert digest in shown.err and len(shown.err.splitlines()) == 1
    assert_counts_match_oracle(built, orphans)


def test_verify_right_after_umoci_rm_catches_up_and_finds_nothing_wrong(
    shared: Path, refcount_cli: Refcount
) -> None:
    _a, _b, only_a = index_shared(shared, refcount_cli)

    sk.run(["umoci", "rm", "--image", f"{shared}:a"])
    verify = refcount_cli(shared, "verify")

    assert verify.code == 0, verify
    assert "drift" not in verify.out
    assert not only_a & sk.blob_files(shared)
    assert_store_sound(refcount_cli, shared)


def test_umoci_rm_of_the_last_image_writes_null_manifests_and_still_frees_it(
    shared: Path, refcount_cli: Refcount
) -> None:
    everything = sk.blob_files(shared)
    succeed(refcount_cli, shared, "init")
    sk.run(["umoci", "rm", "--image", f"{shared}:a"])
    sk.run(["umoci", "rm", "--image", f"{shared}:b"])
    assert sk.read_index(shared)["manifests"] is None  # umoci's empty layout

    synced = refcount_cli(shared, "--trash-ttl", "0", "--json", "sync")

    assert synced.code == 0, synced
    assert sk.blob_files(shared) == set()
    # every root went at once: the mass-deletion valve holds the frees in the quarantine
    assert synced.json()["mass_free"]["roots_removed"] == 2
    assert trash_files(shared) == everything
    assert refcount_cli(shared, "verify").code == 0
