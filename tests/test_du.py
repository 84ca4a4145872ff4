"""`du`: each tag's total, exclusive and shared bytes, and the store's totals.

The oracles: figures computed by hand on a store built by hand, `delete tag
--dry-run` (exclusive is exactly what it would free), the bytes that leave
blobs/ when the tag is really deleted, and the identity sum(exclusive) + shared
+ untagged-only == live on random stores.
"""

from __future__ import annotations

import shutil
import tempfile
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SEVERAL_STORES, Cli
from hypothesis import given, settings
from hypothesis import strategies as st
from storekit import (
    OCI_LAYER,
    add_entry,
    add_image,
    add_index,
    add_referrer,
    listing,
    make_layout,
    write_blob,
)

import refcount
from refcount.core import refcounter
from refcount.core.replay import Graph

BASE = b"B" * 1000  # in a, b and c
AB = b"S" * 2000  # in a and b
ONLY_A = b"a" * 300
ONLY_B = b"b" * 400
ONLY_C = b"c" * 5000
ORPHAN = b"o" * 777
CONFIGS = {t: f'{{"image":"{t}"}}'.encode() for t in "abc"}


@pytest.fixture
def three(store: Path) -> tuple[Path, dict[str, Any]]:
    """Three images sharing layers as above, and one orphan blob."""
    manifests = {
        "a": add_image(store, [BASE, AB, ONLY_A], tag="a", config=CONFIGS["a"]),
        "b": add_image(store, [BASE, AB, ONLY_B], tag="b", config=CONFIGS["b"]),
        "c": add_image(store, [BASE, ONLY_C], tag="c", config=CONFIGS["c"]),
    }
    write_blob(store, ORPHAN, OCI_LAYER)
    return store, manifests


def blobs_bytes(store: Path) -> int:
    return sum(size for path, (size, _) in listing(store).items() if path.startswith("blobs/"))


def test_every_figure_equals_the_hand_count(cli: Cli, three: tuple[Path, dict[str, Any]]) -> None:
    store, manifests = three
    assert cli("--store", store, "init").code == 0
    own = {t: manifests[t]["size"] + len(CONFIGS[t]) for t in "abc"}
    only = {"a": ONLY_A, "b": ONLY_B, "c": ONLY_C}
    report = cli("--store", store, "--json", "du").json()
    expected = {
        t: {
            "tag": t,
            "digest": manifests[t]["digest"],
            "total": own[t] + len(only[t]) + len(BASE) + (len(AB) if t != "c" else 0),
            "exclusive": own[t] + len(only[t]),
            "shared": len(BASE) + (len(AB) if t != "c" else 0),
            "shares_with": 2,
            "last_used": None,  # never touched: a store nobody touches is as before
            "problems": [],
        }
        for t in "abc"
    }
    assert report["tags"] == [expected["c"], expected["b"], expected["a"]]
    live = sum(own.values()) + len(BASE) + len(AB) + len(ONLY_A) + len(ONLY_B) + len(ONLY_C)
    assert report["live"] == live
    assert report["shared"] == len(BASE) + len(AB)
    assert report["untagged"] == 0
    assert report["quarantined"] == 0
    assert report["orphaned"] == len(ORPHAN)
    assert report["reclaimable"] == 0  # the orphan is younger than the grace period
    assert sum(t["exclusive"] for t in report["tags"]) + report["shared"] == report["live"]
    swept = cli("--store", store, "--grace", "0s", "--json", "du").json()
    assert swept["reclaimable"] == len(ORPHAN)


def test_exclusive_is_what_delete_frees_on_disk(
    cli: Cli, three: tuple[Path, dict[str, Any]]
) -> None:
    store, _ = three
    cli("--store", store, "init")
    report = cli("--store", store, "--json", "du").json()
    for usage in report["tags"]:
        dry = cli("--store", store, "--json", "delete", "tag", usage["tag"], "--dry-run").json()
        assert usage["exclusive"] == dry["freed_bytes"], usage
    exclusive_b = next(t["exclusive"] for t in report["tags"] if t["tag"] == "b")
    before = blobs_bytes(store)
    assert cli("--store", store, "delete", "tag", "b").code == 0
    assert before - blobs_bytes(store) == exclusive_b
    after = cli("--store", store, "--json", "du").json()
    assert after["quarantined"] == exclusive_b
    assert after["reclaimable"] == 0  # younger than the trash TTL
    assert [t["tag"] for t in after["tags"]] == ["c", "a"]
    a = after["tags"][1]
    assert a["exclusive"] == a["total"] - len(BASE)  # AB is a's alone now
    assert a["shares_with"] == 1


def test_trash_past_its_ttl_is_reclaimable(
    three: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = three
    with refcount.open(store) as rc:
        rc.init()
        freed = rc.delete_tag("a").freed_bytes
        assert rc.du().quarantined == freed
        later = refcounter.now() + timedelta(hours=2)
        monkeypatch.setattr(refcounter, "now", lambda: later)
        assert rc.du().reclaimable == freed + len(ORPHAN)


def test_named_tags_only_and_an_unknown_one(cli: Cli, three: tuple[Path, dict[str, Any]]) -> None:
    store, _ = three
    cli("--store", store, "init")
    report = cli("--store", store, "--json", "du", "a", "c").json()
    assert [t["tag"] for t in report["tags"]] == ["c", "a"]
    missing = cli("--store", store, "du", "a", "nope")
    assert missing.code == 1
    assert missing.out == ""
    assert missing.err.strip().count("\n") == 0
    assert "nope: no such tag in" in missing.err


def same_alone(cli: Cli, store: Path) -> dict[str, Any]:
    """`du` of all tags, once each tag's `du TAG` is known to give it the same figures,
    the same store totals but `shared` and `untagged` (not computed: null), and to
    change nothing."""
    every = cli("--store", store, "--json", "du").json()
    before = listing(store)
    for usage in every["tags"]:
        alone = cli("--store", store, "--json", "du", usage["tag"]).json()
        assert alone["tags"] == [usage]
        assert (alone["shared"], alone["untagged"]) == (None, None)
        for total in ("live", "quarantined", "orphaned", "reclaimable"):
            assert alone[total] == every[total], total
    assert listing(store) == before
    return every


def test_du_ref_gives_each_tag_the_figures_du_of_all_gives_it(
    cli: Cli, three: tuple[Path, dict[str, Any]]
) -> None:
    store, _ = three
    cli("--store", store, "init")
    every = same_alone(cli, store)
    pair = cli("--store", store, "--json", "du", "a", "b").json()
    assert pair["tags"] == [t for t in every["tags"] if t["tag"] in ("a", "b")]
    assert cli("--store", store, "delete", "tag", "b").code == 0  # quarantined bytes now
    same_alone(cli, store)


def test_du_ref_never_reads_the_whole_graph(
    three: tuple[Path, dict[str, Any]], monkeypatch: pytest.MonkeyPatch
) -> None:
    store, _ = three
    with refcount.open(store) as rc:
        rc.init()
        expected = {u.tag: u for u in rc.du().tags}

        def whole_graph(repo: object) -> None:
            raise AssertionError("du REF loaded the whole graph")

        monkeypatch.setattr(Graph, "load", whole_graph)
        assert rc.du(["a"]).tags == (expected["a"],)
        with pytest.raises(AssertionError):
            rc.du()


def test_du_ref_in_text_leaves_out_the_totals_it_does_not_compute(
    cli: Cli, three: tuple[Path, dict[str, Any]]
) -> None:
    store, _ = three
    cli("--store", store, "init")
    names = [line.split(":")[0] for line in cli("--store", store, "du", "a").out.splitlines()]
    assert "live" in names and "orphaned" in names
    assert "shared by 2+ tags" not in names and "held by untagged entries only" not in names
    every = [line.split(":")[0] for line in cli("--store", store, "du").out.splitlines()]
    assert "shared by 2+ tags" in every and "held by untagged entries only" in every


def test_text_has_human_sizes(cli: Cli, three: tuple[Path, dict[str, Any]]) -> None:
    store, _ = three
    cli("--store", store, "init")
    result = cli("--store", store, "du")
    assert result.code == 0
    lines = result.out.splitlines()
    assert lines[0].split() == [
        *("TAG", "DIGEST", "TOTAL", "EXCLUSIVE", "SHARED", "SHARES", "WITH", "LAST", "USED")
    ]
    assert lines[1].startswith("c ")
    assert "KiB" in lines[1] and lines[1].split()[-3:] == ["2", "tags", "-"]  # never touched
    assert any(line.startswith("orphaned:") and "777 B" in line for line in lines)


def test_shares_with_counts_tags_across_large_and_small_holder_sets(cli: Cli, store: Path) -> None:
    """More tags hold a layer than `du` keeps as a plain set (reading.BITSET_FROM):

        L1: t0..t69     L2: t50..t119     L3: t0 and t200

    t0 shares with t1..t69 and t200; t60 with t0..t119; t100 with t50..t119;
    t200 with t0 only; `lonely` with nobody.
    """
    from refcount.core.reading import BITSET_FROM

    l1, l2, l3 = b"1" * 10, b"2" * 10, b"3" * 10
    holders = {l1: range(70), l2: range(50, 120), l3: (0, 200)}
    assert len(holders[l1]) > BITSET_FROM
    for i in [*range(120), 200]:
        layers = [layer for layer, held in holders.items() if i in held]
        add_image(store, [*layers, f"own {i}".encode()], tag=f"t{i}")
    add_image(store, [b"alone"], tag="lonely")
    cli("--store", store, "init")
    report = cli("--store", store, "--json", "du").json()
    shares = {t["tag"]: t["shares_with"] for t in report["tags"]}
    expected = {f"t{i}": len({t for held in holders.values() if i in held for t in held}) - 1
                for i in [*range(120), 200]}  # fmt: skip
    assert {t: shares[t] for t in expected} == expected
    assert (shares["t0"], shares["t60"], shares["t100"], shares["t200"]) == (70, 119, 69, 1)
    assert shares["lonely"] == 0
    for name in ("t0", "t60", "t100", "t200", "lonely"):
        alone = cli("--store", store, "--json", "du", name).json()["tags"]
        assert [t["shares_with"] for t in alone] == [shares[name]]


def test_untagged_children_and_referrers_follow_delete(cli: Cli, store: Path) -> None:
    """An index whose children are also untagged entries, and a referrer: what
    deleting the tag cascades to is exclusive too, exactly as the dry run says."""
    arm = add_image(store, [BASE, ONLY_A], tag=None, config=CONFIGS["a"], index_entry=False)
    amd = add_image(store, [BASE, ONLY_B], tag=None, config=CONFIGS["b"], index_entry=False)
    add_index(store, [arm, amd], tag="multi", list_children_untagged=True)
    c = add_image(store, [BASE, ONLY_C], tag="c", config=CONFIGS["c"])
    add_referrer(store, c, payload=b"sbom of c" * 50)
    add_entry(store, amd, "amd")  # amd is held by another tag: not multi's alone
    cli("--store", store, "init")
    report = cli("--store", store, "--json", "du").json()
    for usage in report["tags"]:
        dry = cli("--store", store, "--json", "delete", "tag", usage["tag"], "--dry-run").json()
        assert usage["exclusive"] == dry["freed_bytes"], usage
    tags = {t["tag"]: t for t in report["tags"]}
    assert tags["c"]["exclusive"] > tags["c"]["total"] - len(BASE)  # the referrer goes too
    assert tags["amd"]["exclusive"] == 0  # multi still lists it
    total = sum(t["exclusive"] for t in report["tags"]) + report["shared"] + report["untagged"]
    assert total == report["live"]
    assert same_alone(cli, store) == report


LAYERS = [bytes([65 + i]) * (10 * (i + 1) ** 2) for i in range(6)]
TAGS = ["a", "b", "c", "d"]

image = st.tuples(
    st.lists(st.sampled_from(LAYERS), min_size=1, max_size=3, unique=True),
    st.none() | st.sampled_from(TAGS),
    st.booleans(),  # a referrer
)


Image = tuple[list[bytes], str | None, bool]
"""What `image` draws: layers, a tag (or untagged), whether a referrer points at it."""


def random_store(
    path: Path, images: list[Image], index: tuple[str, bool] | None, orphans: int = 0
) -> Path:
    """A store of the drawn images, an index over the first two (tagged index[0],
    its children also listed untagged when index[1]) and `orphans` orphan blobs."""
    store = make_layout(path)
    manifests = []
    for n, (layers, tag, referrer) in enumerate(images):
        m = add_image(store, layers, tag=tag, config=f'{{"n":{n}}}'.encode())
        manifests.append(m)
        if referrer:
            add_referrer(store, m, payload=f"sbom {n}".encode())
    if index is not None:
        add_index(store, manifests[:2], tag=index[0], list_children_untagged=index[1])
    for n in range(orphans):
        write_blob(store, f"orphan {n}".encode() * 10, OCI_LAYER)
    return store


@pytest.mark.sqlite_only(SEVERAL_STORES)
@settings(max_examples=30)
@given(
    images=st.lists(image, min_size=1, max_size=5),
    index=st.none() | st.tuples(st.sampled_from(TAGS), st.booleans()),
    orphans=st.integers(0, 2),
    keep=st.booleans(),  # --keep-untagged --keep-referrers: delete cascades less
)
def test_totals_add_up_and_exclusive_is_what_delete_frees(
    images: list[Image],
    index: tuple[str, bool] | None,
    orphans: int,
    keep: bool,
) -> None:
    path = Path(tempfile.mkdtemp(prefix="refcount-du-"))
    try:
        store = random_store(path / "store", images, index, orphans)
        with refcount.open(store, keep_untagged=keep, keep_referrers=keep) as rc:
            rc.init()
            report = rc.du()
            total = sum(t.exclusive for t in report.tags) + report.shared + report.untagged
            assert total == report.live
            sizes: dict[str | None, list[int | None]] = {}
            for entry in rc.tags():
                sizes.setdefault(entry.tag, []).append(entry.size)
            for usage in report.tags:
                if len(sizes[usage.tag]) == 1:  # a tag on several entries: their union
                    assert usage.total == sizes[usage.tag][0]
                assert usage.total >= max(s or 0 for s in sizes[usage.tag])
                assert usage.exclusive + usage.shared >= usage.total
                assert usage.exclusive == rc.delete_tag(usage.tag, dry_run=True).freed_bytes
                alone = rc.du([usage.tag])  # its own images only: the same figures
                assert alone.tags == (usage,)
                assert (alone.shared, alone.untagged) == (None, None)
            assert [t.exclusive for t in report.tags] == sorted(
                (t.exclusive for t in report.tags), reverse=True
            )
            if all(e.tag is not None for e in rc.tags(include_untagged=True)):
                assert report.untagged == 0
    finally:
        shutil.rmtree(path, ignore_errors=True)
