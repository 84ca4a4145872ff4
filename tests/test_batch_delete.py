"""Many deletes, one rewrite: `delete tag A B C` is one transaction and one index.json rewrite.

What deleting several tags at once frees is what deleting them one after another frees
(checked against storekit's from-scratch oracle), the report lists every entry removed and
every blob freed, and a batch naming a tag that does not exist deletes nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import storekit as sk
from conftest import SEVERAL_STORES, Cli


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_deleting_three_tags_rewrites_index_json_once_and_frees_what_they_alone_held(
    cli: Cli, store: Path, tmp_path: Path, rewrites: list[int]
) -> None:
    made = sk.four_images(store)
    one_by_one = tmp_path / "one-by-one"
    shutil.copytree(store, one_by_one)
    assert cli("--store", store, "--trash-ttl", "0", "init").code == 0
    before = sk.blob_files(store)

    ran = cli("--store", store, "--trash-ttl", "0", "--json", "delete", "tag", "b", "c", "a")

    assert ran.code == 0, ran
    assert len(rewrites) == 1
    report = ran.json()
    assert [e["tag"] for e in report["removed"]] == ["a", "b", "c"]  # index.json order
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["d", "a-again"]
    freed = {b["digest"] for b in report["freed"]}
    assert freed == before - sk.reachable(store)  # the oracle, on what index.json now holds
    assert sk.blob_files(store) == sk.reachable(store)
    assert made["a"]["digest"] not in freed  # a-again still holds a's manifest
    assert cli("--store", store, "verify").code == 0

    # the same as three deletes one after another
    assert cli("--store", one_by_one, "--trash-ttl", "0", "init").code == 0
    for tag in ("b", "c", "a"):
        assert cli("--store", one_by_one, "--trash-ttl", "0", "delete", "tag", tag).code == 0
    assert sk.blob_files(one_by_one) == sk.blob_files(store)
    assert sk.read_index(one_by_one) == sk.read_index(store)


def test_the_text_report_lists_every_entry_removed_and_every_blob_freed(
    cli: Cli, store: Path
) -> None:
    sk.four_images(store)
    assert cli("--store", store, "init").code == 0
    dry = cli("--store", store, "--json", "delete", "tag", "b", "c", "--dry-run").json()

    ran = cli("--store", store, "delete", "tag", "b", "c")

    assert ran.code == 0, ran
    lines = ran.out.splitlines()
    assert lines[0] == "removed 2 index.json entries:"
    for entry in dry["removed"]:
        assert any(entry["digest"] in line and entry["tag"] in line for line in lines)
    assert f"freed {len(dry['freed'])} blobs" in ran.out
    for blob in dry["freed"]:
        assert blob["digest"] in ran.out


def test_a_batch_naming_a_tag_that_does_not_exist_deletes_nothing(cli: Cli, store: Path) -> None:
    sk.four_images(store)
    assert cli("--store", store, "init").code == 0
    before = sk.listing(store, include_refcount=True)

    ran = cli("--store", store, "delete", "tag", "a", "nope", "b")

    assert ran.code == 1, ran
    assert ran.err.strip().splitlines() == [
        f"refcount: error: nope: no such tag in {store / 'index.json'}"
    ]
    assert sk.listing(store, include_refcount=True) == before


def test_every_unknown_tag_of_a_batch_is_named_and_nothing_is_deleted(
    cli: Cli, store: Path
) -> None:
    sk.four_images(store)
    assert cli("--store", store, "init").code == 0
    before = sk.listing(store, include_refcount=True)

    ran = cli("--store", store, "delete", "tag", "a", "nope", "b", "gone")

    assert ran.code == 1, ran
    lines = ran.err.strip().splitlines()
    assert len(lines) == 1 and "'nope', 'gone': no such tags" in lines[0], ran.err
    assert "nothing deleted" in lines[0]
    assert sk.listing(store, include_refcount=True) == before
