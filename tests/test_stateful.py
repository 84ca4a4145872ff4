"""Random histories of pushes (images, indexes, referrers, chunked-rootfs images), tags
and deletes; after every step the incremental counts equal a from-scratch recount, and
blobs/ holds exactly what index.json reaches."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from conftest import SEVERAL_STORES
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule
from storekit import (
    REF_NAME,
    add_entry,
    add_image,
    add_index,
    add_referrer,
    add_rootfs_image,
    blob_files,
    expected_counts,
    make_layout,
    reachable,
    read_index,
    remove_entries,
    tag_of,
    write_index,
)

import refcount

LAYERS = [f"layer {i}".encode() for i in range(8)]
TAGS = ["a", "b", "c", "d", "e"]
CHUNKS = [f"chunk {i}".encode() for i in range(4)]


class History(RuleBasedStateMachine):
    manifests = Bundle("manifests")

    @initialize()
    def open_store(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="refcount-stateful-"))
        self.store = make_layout(self.dir / "store")
        self.rc = refcount.open(self.store)
        self.rc.init()
        self.serial = 0

    def teardown(self) -> None:
        self.rc.close()
        shutil.rmtree(self.dir, ignore_errors=True)

    def _retag(self, tag: str | None) -> None:
        """What skopeo does when copying onto an existing tag: the old entry stays, untagged."""
        if tag is None:
            return
        index = read_index(self.store)
        for entry in index.get("manifests") or []:
            if tag_of(entry) == tag:
                del entry["annotations"][REF_NAME]
        write_index(self.store, index)

    @rule(
        target=manifests,
        layers=st.lists(st.sampled_from(LAYERS), min_size=1, max_size=4),
        tag=st.none() | st.sampled_from(TAGS),
        same_config=st.booleans(),
    )
    def push_image(self, layers: list[bytes], tag: str | None, same_config: bool) -> dict[str, Any]:
        self.serial += 1
        self._retag(tag)
        config = b'{"shared":1}' if same_config else f'{{"n":{self.serial}}}'.encode()
        manifest = add_image(self.store, layers, tag=tag, config=config)
        self.rc.sync()
        return manifest

    @rule(
        target=manifests,
        # chunks shared with plain images' layers too: one blob held by both kinds of edge
        chunks=st.lists(st.sampled_from(LAYERS[:3] + CHUNKS), min_size=1, max_size=4, unique=True),
        tag=st.none() | st.sampled_from(TAGS),
    )
    def push_rootfs_image(self, chunks: list[bytes], tag: str | None) -> dict[str, Any]:
        """An image whose layer is a chunked rootfs (refcount's own extractor plug-in)."""
        self._retag(tag)
        manifest = add_rootfs_image(self.store, chunks, tag=tag)
        self.rc.sync()
        return manifest

    @rule(
        children=st.lists(manifests, min_size=1, max_size=3, unique_by=lambda m: m["digest"]),
        tag=st.sampled_from(TAGS),
        untagged_children=st.booleans(),
    )
    def push_index(self, children: list[dict[str, Any]], tag: str, untagged_children: bool) -> None:
        self._retag(tag)
        add_index(self.store, children, tag=tag, list_children_untagged=untagged_children)
        self.rc.sync()

    @rule(subject=manifests, tag=st.none() | st.sampled_from(TAGS))
    def push_referrer(self, subject: dict[str, Any], tag: str | None) -> None:
        self._retag(tag)
        self.serial += 1
        add_referrer(self.store, subject, tag=tag, payload=f"sbom {self.serial}".encode())
        self.rc.sync()

    @rule(manifest=manifests, tag=st.sampled_from(TAGS))
    def tag_again(self, manifest: dict[str, Any], tag: str) -> None:
        self._retag(tag)
        add_entry(self.store, manifest, tag)
        self.rc.sync()

    @rule(tag=st.sampled_from(TAGS))
    def untag_outside(self, tag: str) -> None:
        remove_entries(self.store, lambda e: tag_of(e) == tag)
        self.rc.sync()

    @rule(tag=st.sampled_from(TAGS))
    def delete_tag(self, tag: str) -> None:
        try:
            self.rc.delete_tag(tag)
        except refcount.NotFound:
            assert tag not in {tag_of(e) for e in read_index(self.store).get("manifests") or []}

    @rule(manifest=manifests)
    def delete_manifest(self, manifest: dict[str, Any]) -> None:
        try:
            self.rc.delete_manifest(manifest["digest"])
        except refcount.NotFound:
            assert manifest["digest"] not in {
                e["digest"] for e in read_index(self.store)["manifests"]
            }

    @invariant()
    def counts_equal_a_recount(self) -> None:
        if not hasattr(self, "rc"):
            return
        expected = expected_counts(self.store)
        recorded = self.rc.verify()
        assert recorded.ok, recorded
        for digest, count in expected.items():
            assert self.rc.count(digest) == count, digest
        assert blob_files(self.store) == reachable(self.store)


History.TestCase.settings = settings(
    max_examples=25,
    stateful_step_count=15,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
# Every example is a new store: on PostgreSQL the test's one database would refuse the second.
test_random_histories_keep_counts_exact = pytest.mark.sqlite_only(SEVERAL_STORES)(History.TestCase)
