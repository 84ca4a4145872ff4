"""A blobs/ or blobs/<alg>/ that is a symbolic link, or not a directory (issue 9).

Every blob path is built below these directories, so SPEC §1 ("symbolic links
are never followed out of the store") rests on them. A store where one of them
is a link, or something other than a directory, is refused by every command,
the daemon included: exit 2, one stderr line naming the path, and nothing
created, renamed or deleted anywhere. Each test proves the last part with a
listing of everything under the store's parent directory (directories, links
and the store's own .refcount/ included) before and after.

Until this was fixed, a restore from the quarantine made `blobs/sha256/` in the
link's target outside the store (`mkdir(parents=True)` before any check), and a
linked blobs/sha256 made `sync` report every blob missing and exit 0.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from conftest import ON_POSTGRESQL, Cli, Result, sql_on_the_test_database
from storekit import (
    REF_NAME,
    add_entry,
    add_image,
    blob_files,
    blob_path,
    make_layout,
    read_index,
)

import refcount
from refcount.errors import InvalidStore
from refcount.store import Store

LINK = "is a symbolic link; not followed"
NOT_A_DIRECTORY = "exists and is not a directory"


@dataclass
class Site:
    root: Path  # the store's parent: everything listed lives under it
    store: Path
    outside: Path  # a directory outside the store that planted links point at
    a: dict[str, Any]
    b: dict[str, Any]

    def args(self, *args: str) -> list[str]:
        return ["--store", str(self.store), *args]


@pytest.fixture
def site(tmp_path: Path) -> Site:
    """Two images a and b sharing a layer, in a store at tmp_path/store, indexed."""
    store = make_layout(tmp_path / "store")
    outside = tmp_path / "outside"
    outside.mkdir()
    a = add_image(store, [b"base", b"layer a"], tag="a", config=b'{"a":1}')
    b = add_image(store, [b"base", b"layer b"], tag="b", config=b'{"b":1}')
    with refcount.open(store) as rc:
        rc.init()
    return Site(tmp_path, store, outside, a, b)


def everything(root: Path) -> dict[str, str]:
    """Every entry under `root`, directories included: its kind, and a file's bytes
    (hashed) or a link's target. Equal listings: nothing created, renamed or deleted."""
    found: dict[str, str] = {}
    for directory, dirs, files in os.walk(root, followlinks=False):
        for name in dirs + files:
            path = Path(directory, name)
            mode = path.lstat().st_mode
            if stat.S_ISLNK(mode):
                found[str(path.relative_to(root))] = "link -> " + os.readlink(path)
            elif stat.S_ISDIR(mode):
                found[str(path.relative_to(root))] = "directory"
            else:
                found[str(path.relative_to(root))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return found


def one_error_line(result: Result, *needles: str) -> None:
    """Exit 2, nothing on stdout, one stderr line `refcount: error: ...` with every needle."""
    assert "Traceback" not in result.err, result.err
    assert result.code == 2, (result.code, result.out, result.err)
    assert result.out == "", result.out
    lines = result.err.strip().splitlines()
    assert len(lines) == 1, result.err
    assert lines[0].startswith("refcount: error: "), lines[0]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


# --- the damages ----------------------------------------------------------------------
# Each returns the path refcount must name, and what it must say of it. The real
# blobs move outside the store, where a link finds them: following it would
# count, move or delete them.


def blobs_links_outside(site: Site) -> tuple[Path, str]:
    path = site.store / "blobs"
    path.rename(site.outside / "blobs")
    path.symlink_to(site.outside / "blobs")
    return path, LINK


def sha256_links_outside(site: Site) -> tuple[Path, str]:
    path = site.store / "blobs" / "sha256"
    path.rename(site.outside / "sha256")
    path.symlink_to(site.outside / "sha256")
    return path, LINK


def sha256_links_inside(site: Site) -> tuple[Path, str]:
    """A relative link to a copy inside the store: not followed either."""
    path = site.store / "blobs" / "sha256"
    path.rename(site.store / "sha256-copy")
    path.symlink_to("../sha256-copy")
    return path, LINK


def sha512_links_outside(site: Site) -> tuple[Path, str]:
    """No blob of the store is sha512; a link there is refused all the same."""
    path = site.store / "blobs" / "sha512"
    path.symlink_to(site.outside)
    return path, LINK


def blobs_is_a_dangling_link(site: Site) -> tuple[Path, str]:
    path = site.store / "blobs"
    path.rename(site.outside / "blobs")
    path.symlink_to(site.outside / "nowhere")
    return path, LINK


def blobs_is_a_file(site: Site) -> tuple[Path, str]:
    path = site.store / "blobs"
    path.rename(site.outside / "blobs")
    path.write_text("not a directory\n")
    return path, NOT_A_DIRECTORY


def sha256_is_a_file(site: Site) -> tuple[Path, str]:
    path = site.store / "blobs" / "sha256"
    path.rename(site.outside / "sha256")
    path.write_text("not a directory\n")
    return path, NOT_A_DIRECTORY


DAMAGES = [
    pytest.param(blobs_links_outside, id="blobs link out"),
    pytest.param(sha256_links_outside, id="blobs/sha256 link out"),
    pytest.param(sha256_links_inside, id="blobs/sha256 link in"),
    pytest.param(sha512_links_outside, id="blobs/sha512 link out"),
    pytest.param(blobs_is_a_dangling_link, id="blobs dangling link"),
    pytest.param(blobs_is_a_file, id="blobs a file"),
    pytest.param(sha256_is_a_file, id="blobs/sha256 a file"),
]
Damage = Callable[[Site], tuple[Path, str]]


A_DIGEST = "<a's digest>"
COMMANDS = [
    pytest.param(["init"], id="init"),
    pytest.param(["sync"], id="sync"),
    pytest.param(["--trash-ttl", "0", "delete", "tag", "a"], id="delete tag"),
    pytest.param(["--trash-ttl", "0", "delete", "manifest", A_DIGEST], id="delete manifest"),
    pytest.param(["--trash-ttl", "0", "gc", "--grace", "0"], id="gc"),
    pytest.param(["verify"], id="verify"),
    pytest.param(["verify", "--deep"], id="verify --deep"),
    pytest.param(["verify", "--repair"], id="verify --repair"),
    pytest.param(["tags"], id="tags"),
    pytest.param(["show", "a"], id="show"),
]
"""Every command, the reading ones too, with the options most ready to free."""


def command_line(site: Site, command: list[str]) -> list[str]:
    return site.args(*(str(site.a["digest"]) if x == A_DIGEST else x for x in command))


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_refuses_the_store_and_touches_nothing(
    cli: Cli, site: Site, damage: Damage, command: list[str]
) -> None:
    path, why = damage(site)
    before = everything(site.root)
    result = cli(*command_line(site, command))
    assert everything(site.root) == before
    one_error_line(result, f"{path}: {why}")


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_first_init_refuses_the_store_and_makes_no_state_directory(
    cli: Cli, tmp_path: Path, damage: Damage
) -> None:
    store = make_layout(tmp_path / "store")
    (tmp_path / "outside").mkdir()
    site = Site(tmp_path, store, tmp_path / "outside", add_image(store, [b"x"], tag="a"), {})
    path, why = damage(site)
    before = everything(tmp_path)
    result = cli(*site.args("init"))
    assert everything(tmp_path) == before
    assert not (store / ".refcount").exists()
    one_error_line(result, f"{path}: {why}")


def watch_refuses(site: Site, path: Path, why: str) -> None:
    """`refcount watch`, a real process, exits 2 at start with one line, touching nothing."""
    before = everything(site.root)
    ran = subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(site.store), "watch"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert everything(site.root) == before
    assert ran.returncode == 2, (ran.stdout, ran.stderr)
    assert ran.stdout == ""
    assert ran.stderr.strip().splitlines() == [f"refcount: error: {path}: {why}"], ran.stderr


@pytest.mark.parametrize("damage", DAMAGES)
def test_the_daemon_refuses_the_store_at_start_with_exit_2_and_one_line(
    site: Site, damage: Damage
) -> None:
    watch_refuses(site, *damage(site))


# --- a restore from the quarantine pending ----------------------------------------------


def quarantine_a_then_list_it_again(cli: Cli, site: Site) -> list[str]:
    """delete a (its own blobs go to the trash), then an outside tool lists a again:
    the next start would restore them into blobs/. Returns their digests."""
    entry = next(
        e for e in read_index(site.store)["manifests"] if e["annotations"][REF_NAME] == "a"
    )
    before = blob_files(site.store)
    assert cli(*site.args("delete", "tag", "a")).code == 0
    trashed = sorted(before - blob_files(site.store))
    assert trashed and all(
        (site.store / ".refcount" / "trash" / d.replace(":", "/")).is_file() for d in trashed
    )
    add_entry(site.store, {k: v for k, v in entry.items() if k != "annotations"}, "a")
    return trashed


def blobs_links_to_an_empty_directory(site: Site) -> tuple[Path, Path]:
    """The link's target has no sha256/: a restore through it would make one."""
    path = site.store / "blobs"
    path.rename(site.root / "real-blobs")
    target = site.outside / "empty"
    target.mkdir()
    path.symlink_to(target)
    return path, target


def sha256_links_to_an_empty_directory(site: Site) -> tuple[Path, Path]:
    """A restore through it would move the quarantined blobs out of the store."""
    path = site.store / "blobs" / "sha256"
    path.rename(site.root / "real-sha256")
    target = site.outside / "empty"
    target.mkdir()
    path.symlink_to(target)
    return path, target


@pytest.mark.parametrize(
    "link",
    [blobs_links_to_an_empty_directory, sha256_links_to_an_empty_directory],
    ids=["blobs", "blobs/sha256"],
)
@pytest.mark.parametrize("command", COMMANDS)
def test_a_pending_restore_creates_nothing_in_the_target_of_a_link(
    cli: Cli, site: Site, link: Callable[[Site], tuple[Path, Path]], command: list[str]
) -> None:
    trashed = quarantine_a_then_list_it_again(cli, site)
    path, target = link(site)
    before = everything(site.root)
    result = cli(*command_line(site, command))
    assert list(target.iterdir()) == []
    assert everything(site.root) == before
    one_error_line(result, f"{path}: {LINK}")
    # Put back, the store is whole again: the quarantined blobs are restored.
    path.unlink()
    (site.root / ("real-blobs" if path.name == "blobs" else "real-sha256")).rename(path)
    synced = cli(*site.args("sync"))
    assert synced.code == 0, synced.err
    assert set(trashed) <= blob_files(site.store)


@pytest.mark.parametrize(
    "link",
    [blobs_links_to_an_empty_directory, sha256_links_to_an_empty_directory],
    ids=["blobs", "blobs/sha256"],
)
def test_the_daemon_refuses_a_store_with_a_pending_restore_through_a_link(
    cli: Cli, site: Site, link: Callable[[Site], tuple[Path, Path]]
) -> None:
    quarantine_a_then_list_it_again(cli, site)
    path, target = link(site)
    watch_refuses(site, path, LINK)
    assert list(target.iterdir()) == []


# --- the store changed after it was opened: a daemon, a library user ---------------------


def test_a_link_planted_after_opening_is_refused_by_the_next_operation(site: Site) -> None:
    with refcount.open(site.store) as rc:
        rc.sync()
        path, _ = sha256_links_outside(site)
        before = everything(site.root)
        with pytest.raises(InvalidStore, match=re.escape(f"{path}: {LINK}")):
            rc.sync()
        with pytest.raises(InvalidStore, match=re.escape(f"{path}: {LINK}")):
            rc.verify()
        assert everything(site.root) == before


def test_a_restore_makes_each_directory_only_inside_the_store(site: Site) -> None:
    """Store.restore with blobs/ replaced by a link after the store was opened."""
    store = Store(site.store)
    layer = str(
        json.loads(blob_path(site.store, site.a["digest"]).read_bytes())["layers"][1]["digest"]
    )
    assert store.quarantine(layer)
    path, target = blobs_links_to_an_empty_directory(site)
    before = everything(site.root)
    with pytest.raises(InvalidStore, match=re.escape(f"{path}: {LINK}")):
        store.restore(layer)
    assert list(target.iterdir()) == []
    assert everything(site.root) == before


def test_a_store_without_blobs_directory_is_counted_and_restored_into_a_new_one(
    cli: Cli, tmp_path: Path
) -> None:
    """A hand-made empty layout may have no blobs/: that is no damage."""
    store = make_layout(tmp_path / "store")
    shutil.rmtree(store / "blobs")
    assert cli("--store", str(store), "init").code == 0
    assert cli("--store", str(store), "verify").code == 0
    image = add_image(store, [b"layer"], tag="a")
    assert cli("--store", str(store), "sync").code == 0
    assert cli("--store", str(store), "delete", "tag", "a").code == 0
    shutil.rmtree(store / "blobs")  # the quarantine holds the image's blobs now
    add_entry(store, image, "a")
    result = cli("--store", str(store), "sync")
    assert result.code == 0, result.err
    for directory in (store / "blobs", store / "blobs" / "sha256"):
        assert stat.S_ISDIR(directory.lstat().st_mode)
    assert image["digest"] in blob_files(store)
    assert cli("--store", str(store), "verify").code == 0


def test_other_entries_under_blobs_are_still_reported_and_ignored(cli: Cli, site: Site) -> None:
    """Only sha256/ and sha512/ hold paths refcount builds: a link or a file under
    another name is skipped with a line, as before, and the store counted."""
    (site.store / "blobs" / "md5").symlink_to(site.outside)
    (site.store / "blobs" / "README").write_text("not a blob directory\n")
    outside = everything(site.outside)
    result = cli(*site.args("sync"))
    assert result.code == 0, result.err
    assert everything(site.outside) == outside
    skipped = [x for x in result.out.splitlines() if x.startswith("skipped: ")]
    assert any("blobs/md5" in x for x in skipped), result.out
    assert any("blobs/README" in x for x in skipped), result.out


def states(store: Path) -> dict[str, str]:
    """Every blob's recorded state, read from the database without refcount."""
    if ON_POSTGRESQL:
        return dict(sql_on_the_test_database("SELECT digest, state FROM blobs"))
    db = store / ".refcount" / "refcount.db"
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return dict(connection.execute("SELECT digest, state FROM blobs").fetchall())
    finally:
        connection.close()


@pytest.mark.parametrize(
    "damage",
    [blobs_links_outside, sha256_links_outside, sha256_is_a_file],
    ids=["blobs link out", "blobs/sha256 link out", "blobs/sha256 a file"],
)
def test_a_running_daemon_applies_nothing_while_the_blobs_directory_is_a_link(
    site: Site, damage: Damage
) -> None:
    """It warns, naming the path, and waits: no blob reads as missing, none is freed,
    nothing is created outside; put back, the store is counted as before."""
    recorded = states(site.store)
    log_path = site.root / "watch.log"
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "refcount", "--store", str(site.store), "watch"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            wait_for_log(log_path, "full reconcile (start)", daemon)
            path, why = damage(site)
            outside = everything(site.outside)
            daemon.send_signal(signal.SIGHUP)
            wait_for_log(log_path, f"{path}: {why}; nothing is applied", daemon)
            assert states(site.store) == recorded
            assert everything(site.outside) == outside
            undo(site, path)
            daemon.send_signal(signal.SIGHUP)
            wait_for_log(log_path, "the store is valid again", daemon)
            assert states(site.store) == recorded
        finally:
            daemon.send_signal(signal.SIGTERM)
            assert daemon.wait(30) == 0, log_path.read_text()


def undo(site: Site, path: Path) -> None:
    """Put back what a damage moved to outside/."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    (site.outside / path.name).rename(path)


def wait_for_log(log_path: Path, text: str, daemon: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 20
    while text not in log_path.read_text(errors="replace"):
        assert daemon.poll() is None, log_path.read_text()
        assert time.monotonic() < deadline, (text, log_path.read_text())
        time.sleep(0.05)
