"""Deletes cut index.json by recorded byte spans that are never shifted in place.

`CutLog` maps a recorded span to the file's current offsets after any sequence of
cuts and appends (checked against real bytes), and a store deleted from one tag at
a time, with the log folded into the spans (compaction) every few cuts and outside
pushes in between, keeps exactly the entries it should and counts that match a
from-scratch count.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import storekit as sk
from hypothesis import given, settings
from hypothesis import strategies as st

import refcount
from refcount.core import planner
from refcount.oci import CutLog, Removal, apply_cuts, cuts


def entry(i: int, pad: int) -> bytes:
    return b'{"digest":"%d"}' % i + b" " * pad


@settings(max_examples=200, deadline=None)
@given(
    pads=st.lists(st.integers(0, 3), min_size=1, max_size=12),
    seed=st.integers(0, 2**32 - 1),
)
def test_recorded_spans_find_their_entries_after_any_cuts_and_appends(
    pads: list[int], seed: int
) -> None:
    rng = random.Random(seed)
    entries = [entry(i, pad) for i, pad in enumerate(pads)]
    data = b'{"manifests":[' + b",".join(entries) + b"]}"
    recorded, offset = {}, len(b'{"manifests":[')
    for i, e in enumerate(entries):
        recorded[i] = (offset, offset + len(e))
        offset += len(e) + 1
    log, alive = CutLog(), list(recorded)

    def now(i: int) -> tuple[int, int]:
        start = log.current(recorded[i][0])
        return start, start + recorded[i][1] - recorded[i][0]

    for _step in range(rng.randint(1, 6)):
        if not alive:
            break
        gone = rng.sample(alive, rng.randint(1, min(4, len(alive))))
        kept = [i for i in alive if i not in gone]
        removals = []
        for g in gone:
            before = [now(k)[1] for k in kept if recorded[k][0] < recorded[g][0]]
            after = [now(k)[0] for k in kept if recorded[k][0] > recorded[g][0]]
            removals.append(Removal(*now(g), max(before, default=None), min(after, default=None)))
        ranges = cuts(removals)
        data, log, alive = apply_cuts(data, ranges), log.cut(ranges), kept
        assert [e["digest"] for e in json.loads(data)["manifests"]] == [str(k) for k in kept]
        for k in alive:
            start, end = now(k)
            assert json.loads(data[start:end])["digest"] == str(k)
            assert log.recorded(start) == recorded[k][0]
        if alive and rng.random() < 0.5:  # a push appends after the last entry
            new = max(recorded) + 1
            last = now(alive[-1])[1]
            data = data[:last] + b"," + entry(new, 0) + data[last:]
            at = log.recorded(last + 1)
            recorded[new] = (at, at + len(entry(new, 0)))
            alive.append(new)


def test_single_deletes_with_compactions_and_outside_pushes_keep_the_index_exact(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(planner, "COMPACT_AT", 3)
    for i in range(12):
        sk.add_image(store, [b"base", b"layer %d" % i], tag=f"t{i}")
    order = [f"t{i}" for i in range(12)]
    random.Random(5).shuffle(order)
    kept = set(order)
    with refcount.open(store) as rc:
        rc.init()
        for n, tag in enumerate(order):
            if n % 4 == 3:  # an outside push: the next delete parses the file again
                sk.add_image(store, [b"base", b"pushed %d" % n], tag=f"p{n}")
                kept.add(f"p{n}")
            tags = [sk.tag_of(e) for e in sk.read_index(store)["manifests"]]
            report = rc.delete_tag(tag)
            assert [(e.position, e.tag) for e in report.removed] == [(tags.index(tag), tag)]
            kept.discard(tag)
            assert {sk.tag_of(e) for e in sk.read_index(store)["manifests"]} == kept
        assert rc.verify().ok
        counts = {digest: rc.count(digest) for digest in sk.expected_counts(store)}
    assert counts == sk.expected_counts(store)
    assert not sk.reachable(store) - sk.blob_files(store)
