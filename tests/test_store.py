"""All I/O on the OCI layout (refcount.store.Store, SPEC §1, §3, §7), on real directories.

- Construction validates the layout: a directory, with a regular `oci-layout` of version
  1.x and a regular `index.json`; anything else is InvalidStore naming the file.
- `read_index` snapshots the bytes and their hash; `replace_index` writes atomically,
  keeps the file's mode, and never overwrites a write it did not read (the compare before
  the swap, and the swap back when an outside write lands between the two).
- Blobs move between `blobs/` and the quarantine (`quarantine`, `restore`, `purge`,
  `unlink_blob`) only as regular files: links and directories are never moved, read or
  deleted through. `list_blobs` reports what is not a blob instead of guessing.
- The advisory lock serializes writers; the daemon's lock admits one daemon per store.

The same guarantees seen from the command line over hostile stores are in
test_hostile.py; crash points inside these methods are in test_crash.py.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest
import storekit as sk

from refcount import layout
from refcount.errors import (
    BlobTooLarge,
    ConcurrentChange,
    InvalidBlob,
    InvalidStore,
    StoreBusy,
)
from refcount.store import Store

pytestmark = pytest.mark.no_database


def opened(store: Path, **options: int) -> Store:
    """A Store whose .refcount/ exists, as every writing command makes it first."""
    result = Store(store, **options)
    result.ensure_state_dir()
    return result


def blob(store: Path, data: bytes) -> str:
    return str(sk.write_blob(store, data, "application/octet-stream")["digest"])


def temp_files(store: Path) -> list[str]:
    tmp = store / ".refcount" / "tmp"
    return sorted(p.name for p in tmp.iterdir()) if tmp.is_dir() else []


# --- the layout ------------------------------------------------------------------------------


def test_a_valid_layout_opens_and_creates_nothing(store: Path) -> None:
    before = sk.listing(store, include_refcount=True)
    Store(store)
    assert sk.listing(store, include_refcount=True) == before
    assert not (store / ".refcount").exists()


def _no_oci_layout(store: Path) -> None:
    (store / "oci-layout").unlink()


def _oci_layout_not_json(store: Path) -> None:
    (store / "oci-layout").write_text("{imageLayoutVersion")


def _oci_layout_version_2(store: Path) -> None:
    (store / "oci-layout").write_text('{"imageLayoutVersion": "2.0.0"}')


def _oci_layout_version_not_a_string(store: Path) -> None:
    (store / "oci-layout").write_text('{"imageLayoutVersion": 1}')


def _oci_layout_a_link(store: Path) -> None:
    (store / "oci-layout").rename(store.parent / "layout-elsewhere")
    (store / "oci-layout").symlink_to(store.parent / "layout-elsewhere")


def _no_index(store: Path) -> None:
    (store / "index.json").unlink()


def _index_a_directory(store: Path) -> None:
    (store / "index.json").unlink()
    (store / "index.json").mkdir()


def _index_a_link(store: Path) -> None:
    (store / "index.json").rename(store / "index.json.real")
    (store / "index.json").symlink_to("index.json.real")


@pytest.mark.parametrize(
    ("damage", "file", "why"),
    [
        pytest.param(_no_oci_layout, "oci-layout", "missing", id="no oci-layout"),
        pytest.param(
            _oci_layout_not_json, "oci-layout", "not valid JSON", id="oci-layout not JSON"
        ),
        pytest.param(_oci_layout_version_2, "oci-layout", "'2.0.0'", id="oci-layout version 2"),
        pytest.param(
            _oci_layout_version_not_a_string, "oci-layout", "unsupported", id="version a number"
        ),
        pytest.param(_oci_layout_a_link, "oci-layout", "symbolic link", id="oci-layout a link"),
        pytest.param(_no_index, "index.json", "missing", id="no index.json"),
        pytest.param(_index_a_directory, "index.json", "not a regular file", id="index.json a dir"),
        pytest.param(_index_a_link, "index.json", "symbolic link", id="index.json a link"),
    ],
)
def test_a_broken_layout_is_refused_naming_the_file(
    store: Path, damage: object, file: str, why: str
) -> None:
    damage(store)  # type: ignore[operator]
    before = sk.listing(store.parent)
    with pytest.raises(InvalidStore) as caught:
        Store(store)
    message = str(caught.value)
    assert message.startswith(f"{store / file}: ") and why in message, message
    assert sk.listing(store.parent) == before


def test_a_path_that_is_not_a_directory_is_refused(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    for path in (tmp_path / "file", tmp_path / "nowhere"):
        with pytest.raises(InvalidStore, match="not a directory"):
            Store(path)


@pytest.mark.parametrize("kind", ["link", "file"])
def test_a_state_path_that_is_not_a_real_directory_is_refused(
    store: Path, tmp_path: Path, kind: str
) -> None:
    state = store / ".refcount"
    if kind == "link":
        (tmp_path / "elsewhere").mkdir()
        state.symlink_to(tmp_path / "elsewhere")
    else:
        state.write_text("not a directory")
    s = Store(store)
    for check in (s.check_state_dir, s.ensure_state_dir):
        with pytest.raises(InvalidStore, match=r"\.refcount"):
            check()
    assert kind == "file" or list((tmp_path / "elsewhere").iterdir()) == []


def test_the_store_identity_is_claimed_once_and_a_damaged_one_refused(store: Path) -> None:
    s = opened(store)
    assert s.read_identity() is None
    first = s.claim_identity("a" * 32)
    assert first == "a" * 32 == s.read_identity()
    assert s.claim_identity("b" * 32) == first  # the first claim wins, later ones adopt it
    (store / ".refcount" / "store-id").write_text("not hex\n")
    with pytest.raises(InvalidStore, match="not a store identity"):
        s.read_identity()


# --- index.json ------------------------------------------------------------------------------


def test_read_index_snapshots_the_bytes_and_their_hash(store: Path) -> None:
    sk.add_image(store, [b"L"], tag="a")
    data = (store / "index.json").read_bytes()
    snapshot = Store(store).read_index()
    assert snapshot.data == data
    assert snapshot.hash == hashlib.sha256(data).hexdigest()


def test_replace_index_writes_the_new_bytes_keeping_the_mode_and_leaving_no_temp(
    store: Path,
) -> None:
    (store / "index.json").chmod(0o640)
    s = opened(store)
    new = b'{"schemaVersion":2,"manifests":[]}\n'
    inode = (store / "index.json").stat().st_ino
    assert s.replace_index(new, s.read_index().hash) == hashlib.sha256(new).hexdigest()
    assert (store / "index.json").read_bytes() == new
    assert (store / "index.json").stat().st_ino != inode  # a new file renamed over the old
    assert stat.S_IMODE((store / "index.json").stat().st_mode) == 0o640
    assert s.last_rewrite() == hashlib.sha256(new).hexdigest()
    assert temp_files(store) == []
    assert {p.name for p in store.iterdir()} == {"oci-layout", "index.json", "blobs", ".refcount"}


def test_replace_index_refuses_when_index_json_changed_since_it_was_read(store: Path) -> None:
    s = opened(store)
    read = s.read_index()
    sk.add_image(store, [b"pushed"], tag="pushed")  # an outside tool, after refcount's read
    theirs = (store / "index.json").read_bytes()
    with pytest.raises(ConcurrentChange, match="changed while refcount was rewriting it"):
        s.replace_index(b'{"schemaVersion":2,"manifests":[]}', read.hash)
    assert (store / "index.json").read_bytes() == theirs
    assert temp_files(store) == []


def test_an_outside_write_between_the_check_and_the_swap_is_swapped_back(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Outside tools take no lock, so the compare and the rename are two steps; a write
    landing between them is found in the file swapped out, and swapped back in."""
    s = opened(store)
    read = s.read_index()
    pushed = {"schemaVersion": 2, "manifests": [{"digest": "sha256:" + "0" * 64, "size": 1}]}
    checked = Store.read_index

    def check_then_an_outside_rename(self: Store) -> object:
        snapshot = checked(self)
        sk.write_index(store, pushed)  # lands right after replace_index's own check
        return snapshot

    monkeypatch.setattr(Store, "read_index", check_then_an_outside_rename)
    with pytest.raises(ConcurrentChange, match="written by another tool just now"):
        s.replace_index(b'{"schemaVersion":2,"manifests":[]}', read.hash)
    monkeypatch.undo()
    assert sk.read_index(store) == pushed
    assert temp_files(store) == []


# --- blobs -----------------------------------------------------------------------------------


def test_a_blob_goes_to_the_quarantine_comes_back_and_is_purged_there(store: Path) -> None:
    s = opened(store)
    digest = blob(store, b"layer")
    path = sk.blob_path(store, digest)
    assert s.blob_file(digest) is not None and not s.in_trash(digest)
    assert s.quarantine(digest)
    assert not path.exists() and s.in_trash(digest) and s.blob_file(digest) is None
    assert s.read_blob(digest) == b"layer"  # a manifest is still readable from the trash
    assert s.list_trash().keys() == {digest}
    assert s.restore(digest)
    assert path.read_bytes() == b"layer" and not s.in_trash(digest)
    assert s.quarantine(digest) and s.purge(digest)
    assert not s.in_trash(digest) and not path.exists() and s.list_trash() == {}
    assert not s.quarantine(digest) and not s.restore(digest) and not s.purge(digest)


def test_restoring_a_blob_an_outside_tool_wrote_again_keeps_its_file(store: Path) -> None:
    s = opened(store)
    digest = blob(store, b"layer")
    assert s.quarantine(digest)
    again = blob(store, b"layer")  # a push brought the same content back meanwhile
    inode = sk.blob_path(store, again).stat().st_ino
    assert s.restore(digest)
    assert sk.blob_path(store, digest).stat().st_ino == inode and not s.in_trash(digest)


def test_unlink_blob_removes_a_regular_file_only(store: Path) -> None:
    s = opened(store)
    digest = blob(store, b"layer")
    assert s.unlink_blob(digest) and not sk.blob_path(store, digest).exists()
    assert not s.unlink_blob(digest)


def _a_link_out(store: Path, digest: str, outside: Path) -> None:
    target = outside / "secret"
    target.write_bytes(b"not yours")
    sk.blob_path(store, digest).symlink_to(target)


def _a_link_in(store: Path, digest: str, outside: Path) -> None:
    sk.blob_path(store, digest).symlink_to(blob(store, b"another blob").split(":")[1])


def _a_directory(store: Path, digest: str, outside: Path) -> None:
    sk.blob_path(store, digest).mkdir()
    (sk.blob_path(store, digest) / "keep").write_text("a user's file")


@pytest.mark.parametrize(
    "plant",
    [
        pytest.param(_a_link_out, id="link out of the store"),
        pytest.param(_a_link_in, id="link to another blob"),
        pytest.param(_a_directory, id="directory"),
    ],
)
def test_a_blob_path_that_is_not_a_regular_file_is_never_read_hashed_moved_or_deleted(
    store: Path, tmp_path: Path, plant: object
) -> None:
    s = opened(store)
    digest = sk.sha256_digest(b"a manifest")
    outside = tmp_path / "outside"
    outside.mkdir()
    plant(store, digest, outside)  # type: ignore[operator]
    before = sk.listing(tmp_path, include_refcount=True)
    assert s.blob_file(digest) is None
    with pytest.raises(InvalidBlob):
        s.read_blob(digest)
    assert not s.quarantine(digest) and not s.unlink_blob(digest)
    assert not s.in_trash(digest)
    assert s.hash_blob(digest) is None  # what verify --deep reports as unreadable
    assert sk.listing(tmp_path, include_refcount=True) == before


def test_read_blob_refuses_a_manifest_over_the_size_cap(store: Path) -> None:
    s = opened(store, max_manifest=16)
    small, large = blob(store, b"x" * 16), blob(store, b"x" * 17)
    assert s.read_blob(small) == b"x" * 16
    with pytest.raises(BlobTooLarge, match="16-byte limit"):
        s.read_blob(large)
    assert s.read_blob(sk.sha256_digest(b"absent")) is None


def test_hash_blob_hashes_under_the_blobs_own_algorithm(store: Path) -> None:
    s = opened(store)
    data = b"sha512 content"
    digest = "sha512:" + hashlib.sha512(data).hexdigest()
    sk.blob_path(store, digest).parent.mkdir(parents=True, exist_ok=True)
    sk.blob_path(store, digest).write_bytes(data)
    assert s.hash_blob(digest) == hashlib.sha512(data).hexdigest()
    sk.blob_path(store, digest).write_bytes(b"changed")
    assert s.hash_blob(digest) == hashlib.sha512(b"changed").hexdigest()
    assert s.hash_blob(sk.sha256_digest(b"absent")) is None


def test_list_blobs_lists_the_blobs_and_reports_everything_else_by_path(
    store: Path, tmp_path: Path
) -> None:
    s = Store(store)
    layer = blob(store, b"layer")
    big = "sha512:" + hashlib.sha512(b"big").hexdigest()
    (store / "blobs" / "sha512").mkdir()
    sk.blob_path(store, big).write_bytes(b"big")
    sha256 = store / "blobs" / "sha256"
    junk = {
        sha256 / "oci-put-blob123": "not a blob name",  # a tool's temp file
        sha256 / ("A" * 64): "not a blob name",  # uppercase hex
        sha256 / ("a" * 63): "not a blob name",
        sha256 / ("b" * 64): "not a regular file",  # a directory
        sha256 / ("c" * 64): "not a regular file",  # a link
        store / "blobs" / "README": "not a directory",
    }
    for path, why in junk.items():
        if path.name == "b" * 64:
            path.mkdir()
        elif path.name == "c" * 64:
            path.symlink_to(tmp_path)
        else:
            path.write_text(why)
    found, problems = s.list_blobs()
    assert found.keys() == {layer, big}
    assert (found[layer].size, found[big].size) == (5, 3)
    assert {p.where: p.message.split(";")[0] for p in problems} == {
        str(path): why for path, why in junk.items()
    }
    assert all(p.message.endswith("ignored") for p in problems)


def test_compare_blobs_splits_known_digests_from_new_files_and_still_reports_junk(
    store: Path,
) -> None:
    """A known digest is only looked up (no stat: no BlobFile); one that is not a regular
    file is reported, not counted present; a known digest without a file is absent."""
    s = Store(store)
    known_file, new_file = blob(store, b"known"), blob(store, b"new")
    known_dir = "sha256:" + "d" * 64
    sk.blob_path(store, known_dir).mkdir()
    known_gone = "sha256:" + "e" * 64
    junk = store / "blobs" / "sha256" / "oci-put-blob9"
    junk.write_text("partial")
    listing = s.compare_blobs({known_file, known_dir, known_gone})
    assert listing.known == {known_file}
    assert listing.new.keys() == {new_file} and listing.new[new_file].size == 3
    assert {p.where: p.message.split(";")[0] for p in listing.problems} == {
        str(sk.blob_path(store, known_dir)): "not a regular file",
        str(junk): "not a blob name",
    }


def test_an_unknown_algorithm_directory_is_reported_blob_by_blob(store: Path) -> None:
    (store / "blobs" / "md5").mkdir()
    (store / "blobs" / "md5" / ("0" * 32)).write_text("x")
    found, problems = Store(store).list_blobs()
    assert found == {}
    assert [(p.where, p.message) for p in problems] == [
        (str(store / "blobs" / "md5" / ("0" * 32)), "not a blob name; ignored")
    ]


# --- locks -----------------------------------------------------------------------------------


def test_the_store_lock_serializes_writers_across_store_objects(store: Path) -> None:
    first, second = Store(store), Store(store)
    order: list[str] = []
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with first.locked():
            order.append("first in")
            holding.set()
            release.wait(5)
            order.append("first out")

    def wait_for_it() -> None:
        holding.wait(5)
        with second.locked():
            order.append("second in")

    threads = [threading.Thread(target=hold), threading.Thread(target=wait_for_it)]
    for thread in threads:
        thread.start()
    holding.wait(5)
    waiter_blocked = not threading.Event().wait(0.2) and order == ["first in"]
    release.set()
    for thread in threads:
        thread.join(5)
    assert waiter_blocked, order
    assert order == ["first in", "first out", "second in"]
    assert stat.S_IMODE((store / ".refcount" / "lock").stat().st_mode) == 0o600


def test_one_daemon_lock_per_store_and_a_clean_release_removes_watch_pid(store: Path) -> None:
    first, second = Store(store), Store(store)
    pid_file = store / ".refcount" / "watch.pid"
    held = first.hold_daemon_lock()
    try:
        assert pid_file.read_text() == f"{os.getpid()}\n"
        with pytest.raises(StoreBusy, match="already runs on this store"):
            second.hold_daemon_lock()
    finally:
        first.release_daemon_lock(held)
    assert not pid_file.exists()
    again = second.hold_daemon_lock()  # free again once released
    second.release_daemon_lock(again)


def test_a_daemon_that_locks_a_removed_watch_pid_retries_on_the_file_now_there(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """First stops (unlink, then close) between the second opening the old file and
    locking it: the second must end up holding the file at the path, so that a
    third daemon is refused instead of running beside it."""
    import refcount.store as refcount_store

    first, second, third = Store(store), Store(store), Store(store)
    pid_file = store / ".refcount" / "watch.pid"
    held = first.hold_daemon_lock()
    real_flock = refcount_store.fcntl.flock
    calls: list[int] = []

    def flock_after_the_first_stopped(fd: int, operation: int) -> None:
        calls.append(fd)
        if len(calls) == 1:  # the second has the old file open: now the first stops
            first.release_daemon_lock(held)
            assert not pid_file.exists()
        real_flock(fd, operation)

    monkeypatch.setattr(refcount_store.fcntl, "flock", flock_after_the_first_stopped)
    lock = second.hold_daemon_lock()
    monkeypatch.setattr(refcount_store.fcntl, "flock", real_flock)
    assert len(calls) == 2  # locked the removed file, saw it, and tried again
    assert os.fstat(lock).st_ino == pid_file.stat().st_ino
    assert pid_file.read_text() == f"{os.getpid()}\n"
    with pytest.raises(StoreBusy):
        third.hold_daemon_lock()
    second.release_daemon_lock(lock)
    assert not pid_file.exists()


def test_the_store_lock_is_free_once_released_though_a_forked_child_shares_it(
    store: Path,
) -> None:
    s = opened(store)
    with s.locked():
        child = os.fork()  # as verify --deep's hashing workers are, during the recount
        if child == 0:
            time.sleep(30)
            os._exit(0)
    try:
        fd = os.open(layout.lock_path(store), os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # BlockingIOError if still held
        finally:
            os.close(fd)
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)
