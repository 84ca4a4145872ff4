"""The parser: digest grammar, index.json roots, children of every manifest type."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from refcount.errors import InvalidBlob, InvalidDigest, InvalidStore, UnparsableIndex
from refcount.oci import (
    DOCKER_LIST,
    DOCKER_MANIFEST,
    OCI_ARTIFACT,
    OCI_INDEX,
    OCI_MANIFEST,
    Digest,
    Removal,
    apply_cuts,
    cuts,
    parse_children,
    parse_index,
)

pytestmark = pytest.mark.no_database

A = "sha256:" + "a" * 64
B = "sha256:" + "b" * 64
C = "sha512:" + "c" * 128


def desc(
    digest: str, media_type: str | None = "application/octet-stream", **extra: object
) -> dict[str, object]:
    value: dict[str, object] = {"digest": digest, "size": 1, **extra}
    if media_type is not None:
        value["mediaType"] = media_type
    return value


@pytest.mark.parametrize("text", [A, C])
def test_sha256_and_sha512_digests_are_accepted(text: str) -> None:
    assert str(Digest.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        "sha256:../../etc/passwd",
        "sha256:" + "A" * 64,
        "sha256:" + "a" * 63,
        "sha256:" + "a" * 65,
        "sha512:" + "a" * 64,
        "md5:" + "a" * 32,
        "sha384:" + "a" * 96,
        "",
        "sha256:",
        ":" + "a" * 64,
        "sha256:" + "a" * 63 + "/",
        None,
        42,
    ],
)
def test_anything_else_is_rejected_before_a_path_is_built(text: object) -> None:
    with pytest.raises(InvalidDigest):
        Digest.parse(text)


def test_umoci_null_manifests_means_no_roots() -> None:
    index = parse_index(b'{"schemaVersion":2,"manifests":null}')
    assert index.roots == () and index.problems == ()


def test_roots_keep_position_tag_and_untagged_entries() -> None:
    data = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                desc(A, OCI_MANIFEST, annotations={"org.opencontainers.image.ref.name": "app:1.0"}),
                desc(B, OCI_MANIFEST),
                desc(A, None),
            ],
        }
    ).encode()
    roots = parse_index(data).roots
    assert [(r.position, r.digest, r.tag) for r in roots] == [
        (0, A, "app:1.0"),
        (1, B, None),
        (2, A, None),
    ]
    assert roots[2].media_type is None


def test_a_bad_entry_is_skipped_and_reported_while_the_rest_count() -> None:
    data = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                desc("sha256:../../etc/passwd", OCI_MANIFEST),
                desc(
                    B, OCI_MANIFEST, annotations={"org.opencontainers.image.ref.name": "bad\x07tag"}
                ),
                desc(A, OCI_MANIFEST),
            ],
        }
    ).encode()
    index = parse_index(data)
    # the entry with a sound digest still holds its image; only its tag is unusable
    assert [r.digest for r in index.roots] == [B, A]
    assert index.roots[0].tag is not None and "bad" in index.roots[0].tag
    assert len(index.problems) == 2
    assert "manifests[0]" in str(index.problems[0]) and "invalid digest" in str(index.problems[0])
    assert "control characters" in str(index.problems[1])


@pytest.mark.parametrize("data", [b"", b"{", b"[]", b'{"manifests": {}}', b"\xff\xfe"])
def test_an_index_that_is_not_a_complete_object_is_an_error_not_an_empty_store(data: bytes) -> None:
    with pytest.raises(InvalidStore, match=r"index\.json"):
        parse_index(data)


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (b"{}", "schemaVersion is missing"),
        (b'{"schemaVersion":2}', "manifests is missing"),
        (b'{"schemaVersion":3,"manifests":[]}', "schemaVersion is 3, not 2"),
        (b'{"schemaVersion":"2","manifests":[]}', "schemaVersion is '2', not 2"),
        (b'{"schemaVersion":true,"manifests":[]}', "schemaVersion is True, not 2"),
        (b'{"manifests":[]}', "schemaVersion is missing"),
        (b'{"schemaVersion":2,"manifests":"x"}', "manifests is not a list"),
        (b'{"schemaVersion":2,"manifests":{}}', "manifests is not a list"),
    ],
)
def test_a_document_that_parses_but_is_not_an_image_index_is_refused(data: bytes, why: str) -> None:
    with pytest.raises(InvalidStore, match=r"^index\.json: .*" + why) as caught:
        parse_index(data)
    # No write in progress looks like this: the daemon warns about it at once.
    assert not isinstance(caught.value, UnparsableIndex)


@pytest.mark.parametrize(
    "data", [b"", b" \n", b"{", b'{"schemaVersion":2,"manifests":[', b"\xff\xfe", b"[]"]
)
def test_an_index_that_does_not_parse_as_an_object_may_be_a_write_in_progress(data: bytes) -> None:
    with pytest.raises(UnparsableIndex, match=r"^index\.json: (empty|invalid JSON)"):
        parse_index(data)


def test_an_empty_manifests_array_is_a_valid_index_without_roots() -> None:
    assert parse_index(b'{"schemaVersion":2,"manifests":[]}').roots == ()


@pytest.mark.parametrize("media_type", [OCI_MANIFEST, DOCKER_MANIFEST])
def test_image_manifests_have_config_and_layers_as_children(media_type: str) -> None:
    blob = {"config": desc(A), "layers": [desc(B), desc(C)]}
    parsed = parse_children(media_type, json.dumps(blob).encode(), "m")
    assert [(c.digest, c.kind) for c in parsed.children] == [
        (A, "config"),
        (B, "layer"),
        (C, "layer"),
    ]


@pytest.mark.parametrize("media_type", [OCI_INDEX, DOCKER_LIST])
def test_indexes_have_their_manifests_as_children(media_type: str) -> None:
    parsed = parse_children(media_type, json.dumps({"manifests": [desc(A), desc(B)]}).encode(), "i")
    assert [(c.digest, c.kind) for c in parsed.children] == [(A, "manifest"), (B, "manifest")]


def test_the_deprecated_artifact_manifest_has_its_blobs_as_children() -> None:
    parsed = parse_children(OCI_ARTIFACT, json.dumps({"blobs": [desc(A)]}).encode(), "x")
    assert [c.digest for c in parsed.children] == [A]


def test_other_types_are_leaves() -> None:
    blob = {"config": desc(A), "layers": [desc(B)]}
    parsed = parse_children(
        "application/vnd.oci.image.config.v1+json", json.dumps(blob).encode(), "c"
    )
    assert parsed.children == ()


def test_the_blobs_own_media_type_is_used_when_the_descriptor_has_none() -> None:
    blob = {"mediaType": OCI_INDEX, "manifests": [desc(A)]}
    assert [c.digest for c in parse_children(None, json.dumps(blob).encode(), "i").children] == [A]


def test_subject_is_recorded_but_is_not_a_child() -> None:
    blob = {
        "mediaType": OCI_MANIFEST,
        "config": desc(A),
        "layers": [],
        "subject": desc(B, OCI_MANIFEST),
    }
    parsed = parse_children(None, json.dumps(blob).encode(), "r")
    assert parsed.subject == B
    assert [c.digest for c in parsed.children] == [A]


def test_foreign_layers_are_marked() -> None:
    blob = {"config": desc(A), "layers": [desc(B, urls=["https://example.invalid/layer"])]}
    children = parse_children(OCI_MANIFEST, json.dumps(blob).encode(), "m").children
    assert [c.urls for c in children] == [False, True]


def test_a_bad_child_descriptor_is_reported_and_the_others_kept() -> None:
    blob = {"config": desc(A), "layers": [desc("sha256:nothex"), desc(B)]}
    parsed = parse_children(OCI_MANIFEST, json.dumps(blob).encode(), "m")
    assert [c.digest for c in parsed.children] == [A, B]
    assert "layers[0]" in str(parsed.problems[0])


def test_a_manifest_that_is_not_json_is_an_invalid_blob() -> None:
    with pytest.raises(InvalidBlob, match="m: invalid JSON"):
        parse_children(OCI_MANIFEST, b"\x1f\x8b not json", "m")


def remove(data: bytes, positions: set[int]) -> bytes:
    """Cut entries out of index.json the way a delete does, from their byte spans."""
    roots = parse_index(data).roots
    kept = [r for r in roots if r.position not in positions]
    removals = []
    for r in roots:
        if r.position in positions:
            before = [k.end for k in kept if k.start < r.start]
            after = [k.start for k in kept if k.start > r.start]
            removals.append(
                Removal(r.start, r.end, max(before, default=None), min(after, default=None))
            )
    return apply_cuts(data, cuts(removals))


def test_removing_entries_keeps_every_other_byte_field_and_the_order() -> None:
    raw = {
        "schemaVersion": 2,
        "x-unknown": {"keep": True},
        "annotations": {"a": "b"},
        "manifests": [
            desc(A, OCI_MANIFEST, platform={"os": "linux"}, annotations={"k": "v"}),
            desc(B, OCI_MANIFEST),
            desc(C, OCI_MANIFEST, extra_field=1),
        ],
    }
    data = json.dumps(raw, indent=3).encode()
    out = remove(data, {1})
    after = json.loads(out)
    assert list(after) == list(raw)
    assert after["x-unknown"] == raw["x-unknown"] and after["annotations"] == raw["annotations"]
    assert after["manifests"] == [raw["manifests"][0], raw["manifests"][2]]
    last = parse_index(data).roots[2]
    assert data[last.start : last.end] in out  # untouched entries keep their exact bytes


entries = st.lists(
    st.fixed_dictionaries(
        {"digest": st.sampled_from([A, B, C]), "mediaType": st.just(OCI_MANIFEST)},
        optional={
            "annotations": st.dictionaries(st.text(max_size=5), st.text(max_size=8), max_size=2)
        },
    ),
    max_size=8,
)


@given(
    manifests=entries,
    chosen=st.sets(st.integers(0, 7)),
    indent=st.sampled_from([None, 0, 2, "\t"]),
    prefix=st.sampled_from([True, False]),
)
def test_cutting_any_entries_leaves_valid_json_without_exactly_them(
    manifests: list[dict[str, object]], chosen: set[int], indent: object, prefix: bool
) -> None:
    doc = (
        {"schemaVersion": 2, "manifests": manifests}
        if prefix
        else {"manifests": manifests, "z": 1, "schemaVersion": 2}
    )
    data = json.dumps(doc, indent=indent, ensure_ascii=False).encode()  # type: ignore[arg-type]
    out = json.loads(remove(data, chosen))
    assert out["manifests"] == [m for i, m in enumerate(manifests) if i not in chosen]
    assert {k: v for k, v in out.items() if k != "manifests"} == {
        k: v for k, v in doc.items() if k != "manifests"
    }


def test_spans_are_byte_offsets_even_with_non_ascii_tags() -> None:
    data = json.dumps(
        {
            "schemaVersion": 2,
            "manifests": [
                desc(A, annotations={"org.opencontainers.image.ref.name": "caf\u00e9"}),
                desc(B),
            ],
        },
        ensure_ascii=False,
    ).encode()
    roots = parse_index(data).roots
    assert roots[0].tag == "caf\u00e9"
    assert json.loads(data[roots[1].start : roots[1].end])["digest"] == B
