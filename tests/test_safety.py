"""What a new user's first hour found could cost a store its blobs (issue 8).

- The mass-deletion valve: one outside change of index.json that frees more than
  half of the live bytes, or removes every root, frees through the quarantine
  whatever --trash-ttl says; gc keeps those blobs for the hold; restoring
  index.json brings everything back. refcount's own deletes are not affected.
- One database, one store: a second store pointed at a database that counts
  another is refused (exit 2, one line), and nothing of either changes.
- verify catches up with index.json first (lag is never drift), and a store that
  was never indexed says so instead of listing drift and creating .refcount/.
- Reading commands work on a read-only store (a real read-only bind mount) and
  as another user; writing commands refuse in one line naming why.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import storekit as sk
from conftest import Cli, Result

import refcount


def one_error_line(result: Result, code: int, *needles: str) -> None:
    assert "Traceback" not in result.err, result.err
    assert result.code == code, result
    lines = result.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("refcount: error: "), result.err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def three_images(store: Path) -> dict[str, sk.Descriptor]:
    """a, b and c sharing one base layer; each with a layer and a config of its own."""
    return {
        tag: sk.add_image(store, [b"shared base", f"layer {tag}".encode() * 50], tag=tag)
        for tag in ("a", "b", "c")
    }


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    return {f"{alg.name}:{p.name}" for alg in trash.iterdir() for p in alg.iterdir()}


# --- the mass-deletion valve ------------------------------------------------------------


def test_an_outside_change_that_empties_index_json_frees_into_the_quarantine_even_with_ttl_0(
    cli: Cli, store: Path
) -> None:
    three_images(store)
    everything = sk.blob_files(store)
    assert cli("--store", store, "init").code == 0
    saved = sk.read_index(store)

    sk.write_index(store, {**saved, "manifests": []})  # a broken script
    synced = cli("--store", store, "--trash-ttl", "0", "--json", "sync")

    assert synced.code == 0, synced
    report = synced.json()
    assert report["mass_free"]["roots_removed"] == 3
    assert report["mass_free"]["blobs"] == len(everything)
    assert "MASS FREE" in synced.err
    assert sk.blob_files(store) == set()
    assert trash_files(store) == everything  # quarantined, not unlinked

    # gc does not purge them before the hold ends, whatever --trash-ttl says
    gc = cli("--store", store, "--trash-ttl", "0", "--json", "gc")
    assert gc.code == 0 and gc.json()["purged"] == []
    assert trash_files(store) == everything

    verify = cli("--store", store, "verify")
    assert verify.code == 0, verify
    assert "WARNING mass free" in verify.out and "removed 3 of 3 roots" in verify.out

    # the undo the warning names: put index.json back and sync
    sk.write_index(store, saved)
    restored = cli("--store", store, "--trash-ttl", "0", "--json", "sync")
    assert restored.code == 0 and set(restored.json()["restored"]) == everything
    assert sk.blob_files(store) == everything
    assert cli("--store", store, "verify").code == 0
    assert "WARNING" not in cli("--store", store, "verify").out


def test_an_outside_change_that_frees_more_than_half_the_live_bytes_is_held(
    cli: Cli, store: Path
) -> None:
    big = sk.add_image(store, [b"x" * 100_000], tag="big")
    sk.add_image(store, [b"small"], tag="small")
    assert cli("--store", store, "init").code == 0
    own = {big["digest"], *(d for d in sk.graph(store)[big["digest"]])}

    sk.remove_entries(store, lambda e: sk.tag_of(e) == "big")
    report = cli("--store", store, "--trash-ttl", "0", "--json", "sync").json()

    assert report["mass_free"] is not None and report["mass_free"]["roots_removed"] == 1
    assert trash_files(store) == own


def test_a_small_outside_change_with_ttl_0_unlinks_at_once(cli: Cli, store: Path) -> None:
    images = three_images(store)
    sk.add_image(store, [b"y" * 100_000], tag="big")
    assert cli("--store", store, "init").code == 0
    before = sk.blob_files(store)

    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")
    report = cli("--store", store, "--trash-ttl", "0", "--json", "sync").json()

    assert report["mass_free"] is None
    freed = {b["digest"] for b in report["freed"]}
    assert images["a"]["digest"] in freed
    assert sk.blob_files(store) == before - freed
    assert not (store / ".refcount" / "trash" / "sha256").exists() or trash_files(store) == set()


def test_the_threshold_option_moves_the_line(cli: Cli, store: Path) -> None:
    images = three_images(store)
    sk.add_image(store, [b"y" * 100_000], tag="big")
    assert cli("--store", store, "init").code == 0

    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")
    args = ["--store", store, "--trash-ttl", "0", "--mass-free-threshold", "0", "--json"]
    report = cli(*args, "sync").json()

    assert report["mass_free"] is not None
    assert images["a"]["digest"] in trash_files(store)
    bad = cli("--store", store, "--mass-free-threshold", "2", "sync")
    assert bad.code == 2 and "--mass-free-threshold" in bad.err


def test_refcounts_own_delete_of_every_tag_is_not_a_mass_free(cli: Cli, store: Path) -> None:
    three_images(store)
    assert cli("--store", store, "init").code == 0
    for tag in ("a", "b"):
        assert cli("--store", store, "--trash-ttl", "0", "delete", "tag", tag).code == 0
    deleted = cli("--store", store, "--trash-ttl", "0", "--json", "delete", "tag", "c")

    assert deleted.code == 0
    assert sk.blob_files(store) == set()
    assert trash_files(store) == set()  # unlinked at once, as asked
    assert "MASS FREE" not in deleted.err


# --- one database, one store ----------------------------------------------------------------


def _second_store_is_refused(cli: Cli, tmp_path: Path, db: list[str], env_db: str | None) -> None:
    first = sk.make_layout(tmp_path / "first")
    second = sk.make_layout(tmp_path / "second")
    three_images(first)
    sk.add_image(second, [b"other"], tag="other")
    assert cli("--store", first, *db, "init").code == 0
    first_state = sk.listing(first, include_refcount=True)
    second_before = sk.listing(second, include_refcount=True)

    for command in (["init"], ["sync"], ["delete", "tag", "other"], ["gc"], ["tags"], ["verify"]):
        result = cli("--store", second, *db, *command)
        one_error_line(result, 2, "already counts the store at", str(first), str(second))
        assert sk.listing(second, include_refcount=True) == second_before
    assert sk.listing(first, include_refcount=True) == first_state
    verify = cli("--store", first, *db, "--json", "verify")
    assert verify.code == 0 and verify.json()["roots"] == 3


def test_a_second_store_on_one_sqlite_database_is_refused(cli: Cli, tmp_path: Path) -> None:
    _second_store_is_refused(cli, tmp_path, ["--db", f"sqlite:///{tmp_path / 'shared.db'}"], None)


def test_a_second_store_with_the_same_refcount_db_in_its_environment_is_refused(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFCOUNT_DB", f"sqlite:///{tmp_path / 'env.db'}")
    _second_store_is_refused(cli, tmp_path, [], None)


def test_a_store_keeps_its_identity_when_it_moves(cli: Cli, tmp_path: Path) -> None:
    db = ["--db", f"sqlite:///{tmp_path / 'shared.db'}"]
    store = sk.make_layout(tmp_path / "before")
    three_images(store)
    assert cli("--store", store, *db, "init").code == 0
    moved = tmp_path / "after"
    store.rename(moved)
    assert cli("--store", moved, *db, "verify").code == 0


@pytest.mark.sqlite_only(
    "a store's own SQLite file in .refcount/ shows whose it is once store-id is lost; "
    "a database on a server cannot"
)
def test_a_database_from_before_store_identities_adopts_its_store(cli: Cli, store: Path) -> None:
    three_images(store)
    assert cli("--store", store, "init").code == 0
    (store / ".refcount" / "store-id").unlink()  # as a database made by an older release
    with refcount.open(store) as rc, rc.engine.begin() as connection:
        connection.exec_driver_sql("DELETE FROM meta WHERE key IN ('store_id', 'store_path')")
    assert cli("--store", store, "verify").code == 0
    assert (store / ".refcount" / "store-id").read_text().strip()


# --- verify: lag is not drift; a store never indexed says so --------------------------------


def test_verify_right_after_an_outside_removal_catches_up_instead_of_reporting_drift(
    cli: Cli, store: Path
) -> None:
    images = three_images(store)
    assert cli("--store", store, "--trash-ttl", "0", "init").code == 0
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")  # as `umoci rm` does

    verify = cli("--store", store, "--trash-ttl", "0", "verify")

    assert verify.code == 0, verify
    assert "drift" not in verify.out
    assert images["a"]["digest"] not in sk.blob_files(store)


def test_verify_on_a_store_never_indexed_says_so_and_creates_nothing(cli: Cli, store: Path) -> None:
    three_images(store)
    before = sk.listing(store, include_refcount=True)
    for command in (["verify"], ["tags"], ["show", "a"]):
        result = cli("--store", store, *command)
        one_error_line(result, 2, str(store), "not indexed yet", "refcount init")
    assert sk.listing(store, include_refcount=True) == before
    assert not (store / ".refcount").exists()


# --- read-only stores and other users -------------------------------------------------------


@pytest.fixture
def read_only_view(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(store, view): a store and a read-only bind mount of it."""
    store = sk.make_layout(tmp_path / "store")
    view = tmp_path / "view"
    view.mkdir()
    mount = shutil.which("mount")
    if mount is None or os.geteuid() != 0:
        pytest.skip("a read-only bind mount needs root and mount(8)")
    done = subprocess.run([mount, "--bind", str(store), str(view)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot bind-mount here: {done.stderr.decode().strip()}")
    try:
        subprocess.run([mount, "-o", "remount,bind,ro", str(view)], check=True, capture_output=True)
        yield store, view
    finally:
        subprocess.run(["umount", str(view)], check=False, capture_output=True)


def test_reading_commands_work_on_a_read_only_store_and_writing_ones_refuse(
    cli: Cli, read_only_view: tuple[Path, Path]
) -> None:
    store, view = read_only_view
    images = three_images(store)
    assert cli("--store", store, "init").code == 0
    before = sk.listing(store, include_refcount=True)

    tags = cli("--store", view, "--json", "tags")
    assert tags.code == 0, tags
    assert [t["tag"] for t in tags.json()] == ["a", "b", "c"]
    show = cli("--store", view, "--json", "show", "a")
    assert show.code == 0 and show.json()["digest"] == images["a"]["digest"]
    verify = cli("--store", view, "verify")
    assert verify.code == 0, verify

    for command in (["sync"], ["delete", "tag", "a"], ["gc"], ["init"], ["verify", "--repair"]):
        result = cli("--store", view, *command)
        one_error_line(result, 2, str(view), "read-only file system", "changes the store")
    assert sk.listing(store, include_refcount=True) == before


def test_verify_on_a_read_only_store_reports_lag_not_drift(
    cli: Cli, read_only_view: tuple[Path, Path]
) -> None:
    store, view = read_only_view
    three_images(store)
    assert cli("--store", store, "init").code == 0
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")  # written by whoever may write

    verify = cli("--store", view, "verify")

    assert verify.code == 1, verify
    assert "drift" not in verify.out
    assert "1 index.json entries behind" in verify.out or "behind" in verify.out
    assert "refcount sync" in verify.out


def _system_python() -> str:
    """An interpreter user nobody may run (this venv's links into root's home), given
    this checkout and this venv's packages; skips the test when there is none."""
    for candidate in (f"/usr/bin/python{sys.version_info.major}.{sys.version_info.minor}",):
        if os.access(candidate, os.X_OK):
            return candidate
    pytest.skip("no system Python of this version for another user to run")


def _as_nobody(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("REFCOUNT_")}
    env["REFCOUNT_NO_DAEMON"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(
        [str(Path(__file__).resolve().parents[1]), sysconfig.get_paths()["purelib"]]
    )
    return subprocess.run(
        [_system_python(), "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd="/",
        user=65534,
        group=65534,
        check=False,
    )


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory other users can reach (pytest's own tmp_path is private to root)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run a command as another user")
    path = Path(tempfile.mkdtemp(prefix="refcount-users-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path)


def test_another_user_is_told_the_store_is_not_theirs_in_one_line(
    cli: Cli, shared_tmp: Path
) -> None:
    store = sk.make_layout(shared_tmp / "store")
    three_images(store)
    for path in [store, *store.rglob("*")]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    assert cli("--store", store, "init").code == 0
    before = sk.listing(store, include_refcount=True)

    for command in (["sync"], ["delete", "tag", "a"], ["tags"], ["verify"]):
        ran = _as_nobody(store, *command)
        assert ran.returncode == 2, ran
        assert "Traceback" not in ran.stderr
        lines = ran.stderr.strip().splitlines()
        assert len(lines) == 1, ran.stderr
        assert "nobody" in lines[0] and "root" in lines[0], lines[0]
        assert "trash" not in lines[0], lines[0]
    assert sk.listing(store, include_refcount=True) == before
    json.dumps(before)  # the listing is plain data
