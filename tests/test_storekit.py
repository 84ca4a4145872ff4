"""Proves the storekit oracle (reachable / expected_counts) on hand-built stores.

Expected values are written from the diagrams, with digests computed from the
known bytes (sha256 of the literal layer/config bytes), never read back from
what storekit produced.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import storekit as sk
from storekit import sha256_digest as h

pytestmark = pytest.mark.no_database


def cfg(name: str) -> bytes:
    """An explicit config, so its digest is known in advance."""
    return json.dumps({"architecture": "amd64", "os": "linux", "name": name}).encode()


def write_at(store: Path, digest: str, obj: dict[str, object]) -> None:
    """Write a blob under a chosen name (content need not match: crafted stores)."""
    sk.blob_path(store, digest).write_bytes(json.dumps(obj).encode())


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return sk.make_layout(tmp_path / "store")


def test_make_layout(store: Path) -> None:
    assert json.loads((store / "oci-layout").read_text()) == {"imageLayoutVersion": "1.0.0"}
    assert sk.read_index(store) == {"schemaVersion": 2, "mediaType": sk.OCI_INDEX, "manifests": []}
    assert (store / "blobs" / "sha256").is_dir()
    assert sk.reachable(store) == set() and sk.expected_counts(store) == {}


def test_shared_layers(store: Path) -> None:
    # index.json: a -> Ma, b -> Mb
    #   Ma -> Ca, L0, L1
    #   Mb -> Cb, L0, L2          L0 is shared: two distinct parents
    ma = sk.add_image(store, [b"L0", b"L1"], tag="a", config=cfg("a"))
    mb = sk.add_image(store, [b"L0", b"L2"], tag="b", config=cfg("b"))
    assert sk.expected_counts(store) == {
        ma["digest"]: 1,
        mb["digest"]: 1,
        h(cfg("a")): 1,
        h(cfg("b")): 1,
        h(b"L0"): 2,
        h(b"L1"): 1,
        h(b"L2"): 1,
    }
    assert sk.reachable(store) == sk.blob_files(store)
    # Deleting tag a leaves Ma, Ca, L1 unreachable and L0 with one parent.
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")
    assert sk.expected_counts(store) == {
        mb["digest"]: 1,
        h(cfg("b")): 1,
        h(b"L0"): 1,
        h(b"L2"): 1,
    }
    assert sk.blob_files(store) - sk.reachable(store) == {ma["digest"], h(cfg("a")), h(b"L1")}


def test_index_with_untagged_children(store: Path) -> None:
    # index.json: multi -> I, (untagged) -> M1, (untagged) -> M2   (as oras writes)
    #   I  -> M1, M2
    #   M1 -> C1, L0, La
    #   M2 -> C2, L0, Lb
    m1 = sk.add_image(store, [b"L0", b"La"], tag=None, config=cfg("amd64"), index_entry=False)
    m2 = sk.add_image(store, [b"L0", b"Lb"], tag=None, config=cfg("arm64"), index_entry=False)
    idx = sk.add_index(store, [m1, m2], tag="multi", list_children_untagged=True)
    entries = sk.read_index(store)["manifests"]
    assert [sk.tag_of(e) for e in entries] == ["multi", None, None]
    assert sk.expected_counts(store) == {
        idx["digest"]: 1,
        m1["digest"]: 2,  # untagged root + parent I
        m2["digest"]: 2,
        h(cfg("amd64")): 1,
        h(cfg("arm64")): 1,
        h(b"L0"): 2,  # parents M1 and M2
        h(b"La"): 1,
        h(b"Lb"): 1,
    }
    body = json.loads(sk.blob_path(store, idx["digest"]).read_bytes())
    assert [c["platform"]["architecture"] for c in body["manifests"]] == ["amd64", "arm64"]


def test_referrers_subject_is_not_an_edge(store: Path) -> None:
    # index.json: app -> M, (untagged) -> R1, (untagged) -> R2, (untagged) -> R3
    #   M  -> C, L0
    #   R1 -> E, S1   (subject M: not an edge)
    #   R2 -> E, S2   (subject M)         E = the empty config "{}", two parents
    #   R3 -> E, S3   (subject X; X is not in index.json: X stays unreachable)
    m = sk.add_image(store, [b"L0"], tag="app", config=cfg("app"))
    r1 = sk.add_referrer(store, m, payload=b"sbom-1")
    r2 = sk.add_referrer(store, m, payload=b"sbom-2")
    x = sk.add_image(store, [b"LX"], tag=None, config=cfg("x"), index_entry=False)
    r3 = sk.add_referrer(store, x, payload=b"sbom-3")
    assert sk.expected_counts(store) == {
        m["digest"]: 1,  # its own root only: referrers do not count
        h(cfg("app")): 1,
        h(b"L0"): 1,
        r1["digest"]: 1,
        r2["digest"]: 1,
        r3["digest"]: 1,
        h(b"{}"): 3,
        h(b"sbom-1"): 1,
        h(b"sbom-2"): 1,
        h(b"sbom-3"): 1,
    }
    assert x["digest"] not in sk.reachable(store)
    body = json.loads(sk.blob_path(store, r1["digest"]).read_bytes())
    assert body["artifactType"] and body["subject"]["digest"] == m["digest"]
    assert body["config"] == {"mediaType": sk.OCI_EMPTY, "digest": h(b"{}"), "size": 2}


def test_docker_manifest_and_list(store: Path) -> None:
    # index.json: d -> DL (docker manifest list), o -> MO (OCI)
    #   DL -> MD
    #   MD -> CD, L0      (docker schema2)
    #   MO -> CO, L0
    md = sk.add_image(store, [b"L0"], tag=None, config=cfg("d"), docker=True, index_entry=False)
    body = {"schemaVersion": 2, "mediaType": sk.DOCKER_LIST, "manifests": [md]}
    dl = sk.write_blob(store, json.dumps(body).encode(), sk.DOCKER_LIST)
    sk.add_entry(store, dl, "d")
    mo = sk.add_image(store, [b"L0"], tag="o", config=cfg("o"))
    assert sk.expected_counts(store) == {
        dl["digest"]: 1,
        md["digest"]: 1,
        h(cfg("d")): 1,
        mo["digest"]: 1,
        h(cfg("o")): 1,
        h(b"L0"): 2,
    }
    manifest = json.loads(sk.blob_path(store, md["digest"]).read_bytes())
    assert manifest["layers"][0]["mediaType"] == sk.DOCKER_LAYER


def test_layer_listed_twice_counts_once(store: Path) -> None:
    # index.json: t1 -> M, t2 -> M   (two entries, same digest: two references)
    #   M -> C, L0, L0               (one parent holding L0 twice: one reference)
    m = sk.add_image(store, [b"L0", b"L0"], tag="t1", config=cfg("twice"))
    sk.add_entry(store, m, "t2")
    assert sk.expected_counts(store) == {m["digest"]: 2, h(cfg("twice")): 1, h(b"L0"): 1}


def test_artifact_manifest_blobs(store: Path) -> None:
    # index.json: art -> A (deprecated OCI artifact manifest)
    #   A -> B1, B2     (the "blobs" field)
    b1 = sk.write_blob(store, b"B1", "text/plain")
    b2 = sk.write_blob(store, b"B2", "text/plain")
    body = {"mediaType": sk.OCI_ARTIFACT, "artifactType": "x/y", "blobs": [b1, b2]}
    art = sk.write_blob(store, json.dumps(body).encode(), sk.OCI_ARTIFACT)
    sk.add_entry(store, art, "art")
    assert sk.expected_counts(store) == {art["digest"]: 1, h(b"B1"): 1, h(b"B2"): 1}


def test_media_type_from_descriptor_or_blob(store: Path) -> None:
    # u  -> MU: umoci style, no mediaType inside the manifest; the entry has one
    # n  -> MN: the entry has no mediaType; the manifest's own field is used
    # z  -> MZ: neither has one: a leaf, its config and layer stay unreachable
    # l  -> ML, whose layer descriptor points at MU's blob as a *layer*: that edge
    #       is a leaf edge (the descriptor's type wins), MU's children come via u
    mu = sk.add_image(store, [b"Lu"], tag="u", config=cfg("u"), manifest_media_type_field=False)
    mn = sk.add_image(store, [b"Ln"], tag=None, config=cfg("n"), index_entry=False)
    sk.add_entry(store, {"digest": mn["digest"], "size": mn["size"]}, "n")
    mz = sk.add_image(
        store,
        [b"Lz"],
        tag=None,
        config=cfg("z"),
        index_entry=False,
        manifest_media_type_field=False,
    )
    sk.add_entry(store, {"digest": mz["digest"], "size": mz["size"]}, "z")
    ml = {
        "schemaVersion": 2,
        "mediaType": sk.OCI_MANIFEST,
        "config": sk.write_blob(store, cfg("l"), sk.OCI_CONFIG),
        "layers": [{**mu, "mediaType": sk.OCI_LAYER}],
    }
    ml_desc = sk.write_blob(store, json.dumps(ml).encode(), sk.OCI_MANIFEST)
    sk.add_entry(store, ml_desc, "l")
    assert sk.expected_counts(store) == {
        mu["digest"]: 2,  # root u + parent ML
        h(cfg("u")): 1,
        h(b"Lu"): 1,
        mn["digest"]: 1,
        h(cfg("n")): 1,
        h(b"Ln"): 1,
        mz["digest"]: 1,
        ml_desc["digest"]: 1,
        h(cfg("l")): 1,
    }
    # Without root u, MU is reached only as ML's layer: a leaf, its children go.
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "u")
    counts = sk.expected_counts(store)
    assert counts[mu["digest"]] == 1 and h(b"Lu") not in counts and h(cfg("u")) not in counts


def test_crafted_cycle_and_self_reference(store: Path) -> None:
    # Blob names that do not match their content (only a crafted store can do it):
    #   index.json: c -> A (index), s -> S (index)
    #   A -> B, B -> A           cycle
    #   S -> S                   self reference
    a, b, s = h(b"name A"), h(b"name B"), h(b"name S")

    def index_of(child: str) -> dict[str, object]:
        ref = {"mediaType": sk.OCI_INDEX, "digest": child, "size": 1}
        return {"schemaVersion": 2, "mediaType": sk.OCI_INDEX, "manifests": [ref]}

    write_at(store, a, index_of(b))
    write_at(store, b, index_of(a))
    write_at(store, s, index_of(s))
    sk.add_entry(store, {"mediaType": sk.OCI_INDEX, "digest": a, "size": 1}, "c")
    sk.add_entry(store, {"mediaType": sk.OCI_INDEX, "digest": s, "size": 1}, "s")
    assert sk.expected_counts(store) == {a: 2, b: 1, s: 2}  # root + parent each (B: parent A)


def test_missing_blobs_are_reachable(store: Path) -> None:
    # index.json: a -> M, gone -> G (no blob at all)
    #   M -> C, L0, L1(missing), F (foreign layer with urls, never downloaded)
    foreign = {
        "mediaType": "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        "digest": h(b"foreign"),
        "size": 7,
        "urls": ["https://example.com/f"],
    }
    layers = [sk.write_blob(store, x, sk.OCI_LAYER) for x in (b"L0", b"L1")] + [foreign]
    c = sk.write_blob(store, cfg("m"), sk.OCI_CONFIG)
    body = {"schemaVersion": 2, "mediaType": sk.OCI_MANIFEST, "config": c, "layers": layers}
    m = sk.write_blob(store, json.dumps(body).encode(), sk.OCI_MANIFEST)
    sk.add_entry(store, m, "a")
    gone = h(b"gone")
    sk.add_entry(store, {"mediaType": sk.OCI_MANIFEST, "digest": gone, "size": 9}, "gone")
    sk.blob_path(store, h(b"L1")).unlink()
    expected = {m["digest"]: 1, c["digest"]: 1, h(b"L0"): 1, h(b"L1"): 1, h(b"foreign"): 1, gone: 1}
    assert sk.expected_counts(store) == expected
    assert sk.reachable(store) - sk.blob_files(store) == {h(b"L1"), h(b"foreign"), gone}


def test_invalid_digests_are_skipped(store: Path) -> None:
    # Entries and descriptors with digests outside the sha256/sha512 grammar are
    # never turned into paths and never counted.
    bad = ["sha256:../../../etc/passwd", "md5:" + "0" * 32, "sha256:" + "A" * 64, 42]
    for digest in bad:
        sk.add_entry(store, {"mediaType": sk.OCI_MANIFEST, "digest": digest, "size": 1})
    body = {
        "schemaVersion": 2,
        "mediaType": sk.OCI_MANIFEST,
        "config": {"digest": "sha256:x", "size": 1},
        "layers": ["junk", {"size": 3}],
    }
    m = sk.write_blob(store, json.dumps(body).encode(), sk.OCI_MANIFEST)
    sk.add_entry(store, m, "m")
    (store / "blobs" / "sha256" / "not-a-digest").write_bytes(b"x")
    assert sk.expected_counts(store) == {m["digest"]: 1}
    assert "sha256:not-a-digest" in sk.blob_files(store)
    with pytest.raises(ValueError):
        sk.blob_path(store, "sha256:../x")
    assert sk.is_valid_digest("sha512:" + "a" * 128)


def test_unparsable_manifest_is_a_leaf(store: Path) -> None:
    # index.json: t -> P, whose bytes are not JSON: reachable, no children
    p = sk.write_blob(store, b"{not json", sk.OCI_MANIFEST)
    sk.add_entry(store, p, "t")
    assert sk.expected_counts(store) == {p["digest"]: 1}


def test_index_json_helpers(store: Path) -> None:
    m = sk.add_image(store, [b"L0"], tag="a", config=cfg("a"))
    entry = sk.add_entry(store, m, "b")
    assert entry["annotations"] == {sk.REF_NAME: "b"} and "annotations" not in m
    sk.add_entry(store, m)
    removed = sk.remove_entries(store, lambda e: sk.tag_of(e) is None)
    assert removed == [m]
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["a", "b"]
    assert sk.root_digests(store) == [m["digest"], m["digest"]]
    assert sorted(os.listdir(store)) == ["blobs", "index.json", "oci-layout"]  # no temp left
    sk.write_index(store, {"schemaVersion": 2, "manifests": None})  # as umoci init writes
    sk.add_entry(store, m, "c")
    assert sk.root_digests(store) == [m["digest"]]


def test_listing_detects_every_change(store: Path) -> None:
    sk.add_image(store, [b"L0"], tag="a", config=cfg("a"))
    before = sk.listing(store)
    assert before == sk.listing(store)
    assert before[f"blobs/sha256/{h(b'L0')[7:]}"] == (2, h(b"L0")[7:])
    (store / ".refcount").mkdir()
    (store / ".refcount" / "refcount.db").write_bytes(b"db")
    assert sk.listing(store) == before
    assert ".refcount/refcount.db" in sk.listing(store, include_refcount=True)
    (store / "link").symlink_to("index.json")
    assert sk.listing(store)["link"] == (0, "symlink->index.json")
    (store / "link").unlink()
    sk.blob_path(store, h(b"L0")).write_bytes(b"L9")
    assert sk.listing(store) != before


# --------------------------------------------------------------------------
# Real tools
# --------------------------------------------------------------------------


@pytest.mark.tools
def test_umoci_shared_store(tmp_path: Path) -> None:
    sk.need_tool("umoci")
    sk.need_tool("oci-image-tool")
    store = sk.umoci_shared_store(tmp_path / "L")
    tags = sk.run(["umoci", "ls", "--layout", str(store)]).stdout.split()
    assert tags == ["base", "a", "b"]
    sk.oci_validate(store)
    manifests = {
        sk.tag_of(e): json.loads(sk.blob_path(store, e["digest"]).read_bytes())
        for e in sk.read_index(store)["manifests"]
    }
    assert "mediaType" not in manifests["a"]  # umoci omits it: the entry's type is used
    base_layer = manifests["base"]["layers"][0]["digest"]
    assert [x["digest"] for x in manifests["a"]["layers"]][:1] == [base_layer]
    assert [x["digest"] for x in manifests["b"]["layers"]][:1] == [base_layer]
    counts = sk.expected_counts(store)
    # base -> Mbase -> Cbase, L_f0
    # a    -> Ma    -> Ca, L_f0, L_f1
    # b    -> Mb    -> Cb, L_f0, L_f2      (the configs differ: different diff_ids)
    assert counts[base_layer] == 3
    assert sorted(counts.values()) == [1] * 8 + [3]


@pytest.mark.tools
def test_oracle_agrees_with_umoci_gc(tmp_path: Path) -> None:
    # umoci gc is a valid oracle for stores of plain OCI manifests and indexes.
    sk.need_tool("umoci")
    store = sk.umoci_shared_store(tmp_path / "L", keep_base=False)
    m1 = sk.add_image(store, [b"L0", b"La"], tag=None, config=cfg("1"), index_entry=False)
    m2 = sk.add_image(store, [b"L0", b"Lb"], tag=None, config=cfg("2"), index_entry=False)
    sk.add_index(store, [m1, m2], tag="multi", list_children_untagged=True)
    sk.add_image(store, [b"orphan"], tag=None, config=cfg("orphan"), index_entry=False)
    expected = sk.reachable(store)
    assert expected < sk.blob_files(store)  # umoci new/insert and the orphan left garbage
    sk.run(["umoci", "gc", "--layout", str(store)])
    assert sk.blob_files(store) == expected


@pytest.mark.tools
def test_oci_validate_catches_damage(store: Path) -> None:
    sk.need_tool("oci-image-tool")
    m = sk.add_image(store, [b"L0"], tag="a", config=cfg("a"))
    sk.add_referrer(store, m)  # skipped by the view (the tool rejects referrers)
    sk.add_image(store, [b"L1"], tag="d", config=cfg("d"), docker=True)  # skipped too
    sk.oci_validate(store)
    sk.blob_path(store, h(b"L0")).write_bytes(b"XX")  # same size, wrong content
    with pytest.raises(AssertionError, match="digest mismatch"):
        sk.oci_validate(store)


def test_oci_validate_runs_no_tool_when_no_root_is_an_oci_image_manifest(
    store: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sk.add_image(store, [b"L1"], tag="d", config=cfg("d"), docker=True)  # the tool rejects Docker
    m = sk.add_image(store, [b"L0"], tag=None, config=cfg("m"), index_entry=False)
    sk.add_referrer(store, m, tag="sbom")  # and referrers
    ran: list[list[str]] = []
    monkeypatch.setattr(sk, "need_tool", lambda name: name)
    monkeypatch.setattr(sk, "run", ran.append)
    before = sk.listing(store)
    assert sk.oci_validate(store) is None
    assert ran == [] and sk.listing(store) == before
    sk.add_entry(store, m, "m")  # one OCI image manifest root: now the tool has work
    sk.oci_validate(store)
    assert [cmd[:4] for cmd in ran] == [["oci-image-tool", "validate", "--type", "image"]]


@pytest.mark.tools
def test_skopeo_copy_keeps_layers_shared(tmp_path: Path) -> None:
    sk.need_tool("skopeo")
    src = sk.umoci_shared_store(tmp_path / "src")
    dst = tmp_path / "dst"
    sk.skopeo_copy(src, "a", dst, "app:1")
    sk.skopeo_copy(src, "b", dst, "b")
    counts = sk.expected_counts(dst)
    assert sk.reachable(dst) == sk.blob_files(dst)
    assert sorted(counts.values()) == [1] * 6 + [2]  # 2 manifests, 2 configs, 3 layers
    assert [sk.tag_of(e) for e in sk.read_index(dst)["manifests"]] == ["app:1", "b"]
