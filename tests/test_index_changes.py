"""Outside changes of index.json between two deletes of one open store are noticed.

A delete trusts the version of index.json it last read or wrote while the file's
fingerprint (inode, size, mtime, ctime) is unchanged, and hashes the bytes when the
fingerprint cannot tell (written in the file clock's current tick). Here an outside
tool changes index.json between two deletes, the way skopeo does (in place, truncating
first, same size) and the way umoci does (a new file renamed in), also with the old
mtime put back; and the file clock is either the real one or stuck before every mtime
(every fingerprint racy, so only the hash can tell). In every case the second delete
sees the change: counts match a from-scratch count and no blob still needed is freed.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import storekit as sk

import refcount
from refcount import store as store_module
from refcount.store import Fingerprint, trusted


def images(store: Path) -> dict[str, sk.Descriptor]:
    """a, b, c on one base layer; b's and c's manifests have the same length."""
    return {
        "a": sk.add_image(store, [b"base", b"only a"], tag="a"),
        "b": sk.add_image(store, [b"base", b"only b"], tag="b"),
        "c": sk.add_image(store, [b"base", b"only c"], tag="c"),
    }


def in_place(store: Path, data: bytes) -> None:
    """skopeo: truncate index.json and write the new bytes into the same file."""
    with open(store / "index.json", "r+b") as handle:
        handle.truncate(0)
        handle.write(data)


def renamed_in(store: Path, data: bytes) -> None:
    """umoci: write a new file beside it and rename it over index.json."""
    temp = store / ".index.json.tmp"
    temp.write_bytes(data)
    os.replace(temp, store / "index.json")


def keeping_mtime(write: Callable[[Path, bytes], None]) -> Callable[[Path, bytes], None]:
    """The same write, with index.json's old mtime put back afterwards (`touch -r`)."""

    def write_keeping_mtime(store: Path, data: bytes) -> None:
        old = (store / "index.json").stat()
        write(store, data)
        os.utime(store / "index.json", ns=(old.st_atime_ns, old.st_mtime_ns))

    return write_keeping_mtime


WRITERS = {
    "skopeo in place": in_place,
    "skopeo in place, mtime kept": keeping_mtime(in_place),
    "umoci rename": renamed_in,
    "umoci rename, mtime kept": keeping_mtime(renamed_in),
}


@pytest.mark.parametrize("clock", ["real", "racy"])
@pytest.mark.parametrize("writer", list(WRITERS))
def test_an_outside_rewrite_between_two_deletes_is_noticed(
    store: Path, monkeypatch: pytest.MonkeyPatch, writer: str, clock: str
) -> None:
    made = images(store)
    if clock == "racy":  # the file clock never passes an mtime: only hashes can tell
        monkeypatch.setattr(store_module, "_clock_ns", lambda: 0)
    with refcount.open(store) as rc:
        rc.init()
        rc.delete_tag("a")
        # b's entry now names c's manifest: same length, so index.json keeps its size.
        before = (store / "index.json").read_bytes()
        after = before.replace(made["b"]["digest"].encode(), made["c"]["digest"].encode())
        assert len(after) == len(before) and after != before
        WRITERS[writer](store, after)
        report = rc.delete_tag("c")
        assert [e.tag for e in report.removed] == ["c"]
        assert rc.count(made["c"]["digest"]) == 1  # still named by the entry tagged b
        assert rc.count(made["b"]["digest"]) == 0
        assert rc.verify().ok
        counts = {digest: rc.count(digest) for digest in sk.expected_counts(store)}
    entries = sk.read_index(store)["manifests"]
    assert [(sk.tag_of(e), e["digest"]) for e in entries] == [("b", made["c"]["digest"])]
    assert counts == sk.expected_counts(store)
    lost = sk.reachable(store) - sk.blob_files(store)
    assert not lost, f"needed blobs freed: {sorted(lost)}"


def test_a_fingerprint_is_trusted_only_once_the_file_clock_has_passed_its_mtime() -> None:
    fine = Fingerprint(1, 2, 3, mtime_ns=1_700_000_000_123_456_789, ctime_ns=0)
    assert not trusted(fine, fine.mtime_ns)  # a write in this same tick keeps the mtime
    assert trusted(fine, fine.mtime_ns + 1)
    coarse = Fingerprint(1, 2, 3, mtime_ns=1_700_000_000_000_000_000, ctime_ns=0)
    assert not trusted(coarse, coarse.mtime_ns + 1_999_999_999)  # whole seconds: FAT's 2 s
    assert trusted(coarse, coarse.mtime_ns + 2_000_000_000)
