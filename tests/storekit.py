"""Test toolkit and independent oracle for OCI image layouts.

Builds small stores by hand, snapshots them, and recounts references from
scratch following SPEC.md sections 1-2. It deliberately does not import
``refcount``: the tests compare refcount's answers against this module.

Stdlib only (plus pytest for ``need_tool``).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

Descriptor = dict[str, Any]

REF_NAME = "org.opencontainers.image.ref.name"

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_ARTIFACT = "application/vnd.oci.artifact.manifest.v1+json"
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER = "application/vnd.docker.image.rootfs.diff.tar.gzip"
SPDX = "application/spdx+json"
# docs/chunked-rootfs.md: a binary root filesystem naming its chunks by raw sha256 digests.
ROOTFS_CHUNKED = "application/vnd.refcount.rootfs.chunked.v1"
# The JSON artifact of the test plug-in package (tests/plugins/refcount_testext).
CHUNKLIST = "application/vnd.example.chunklist.v1+json"
OCTET_STREAM = "application/octet-stream"
SBOM_ARTIFACT_TYPE = "application/vnd.example.sbom.v1"

# SPEC section 1: the fields of each manifest-like type that hold child descriptors.
EDGE_FIELDS: dict[str, tuple[str, ...]] = {
    OCI_MANIFEST: ("config", "layers"),
    OCI_INDEX: ("manifests",),
    DOCKER_MANIFEST: ("config", "layers"),
    DOCKER_LIST: ("manifests",),
    OCI_ARTIFACT: ("blobs",),
}

_DIGEST_RE = re.compile(r"^(?:sha256:[0-9a-f]{64}|sha512:[0-9a-f]{128})$")
_PLATFORMS: list[dict[str, str]] = [
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "arm64", "os": "linux", "variant": "v8"},
    {"architecture": "arm", "os": "linux", "variant": "v7"},
    {"architecture": "ppc64le", "os": "linux"},
    {"architecture": "s390x", "os": "linux"},
]


# --------------------------------------------------------------------------
# Building stores
# --------------------------------------------------------------------------


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def sha256_digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def is_valid_digest(value: object) -> bool:
    """The digests SPEC section 1 accepts for building paths (sha256/sha512)."""
    return isinstance(value, str) and _DIGEST_RE.match(value) is not None


def blob_path(store: Path | str, digest: str) -> Path:
    if not is_valid_digest(digest):
        raise ValueError(f"invalid digest: {digest!r}")
    algorithm, encoded = digest.split(":", 1)
    return Path(store) / "blobs" / algorithm / encoded


def make_layout(path: Path | str) -> Path:
    """Create an empty OCI image layout at ``path`` and return it."""
    store = Path(path)
    (store / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (store / "oci-layout").write_bytes(_dumps({"imageLayoutVersion": "1.0.0"}))
    write_index(store, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []})
    return store


def write_blob(store: Path | str, data: bytes, media_type: str) -> Descriptor:
    """Write ``data`` as a sha256 blob and return its descriptor."""
    digest = sha256_digest(data)
    path = blob_path(store, digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"mediaType": media_type, "digest": digest, "size": len(data)}


def _diff_id(layer: bytes) -> str:
    raw = gzip.decompress(layer) if layer[:2] == b"\x1f\x8b" else layer
    return sha256_digest(raw)


def _default_config(layers: list[bytes | Descriptor]) -> bytes:
    diff_ids = [x["digest"] if isinstance(x, dict) else _diff_id(x) for x in layers]
    return _dumps(
        {"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": diff_ids}}
    )


def _layer_type(layer: bytes, docker: bool) -> str:
    if docker:
        return DOCKER_LAYER
    return OCI_LAYER_GZIP if layer[:2] == b"\x1f\x8b" else OCI_LAYER


def add_image(
    store: Path | str,
    layers: list[bytes | Descriptor],
    *,
    tag: str | None,
    config: bytes | None = None,
    docker: bool = False,
    subject: Descriptor | None = None,
    annotations: dict[str, str] | None = None,
    index_entry: bool = True,
    artifact_type: str | None = None,
    manifest_media_type_field: bool = True,
) -> Descriptor:
    """Write config, layers and an image manifest; return the manifest descriptor.

    ``config`` defaults to a minimal config derived from the layers only, so two
    images with the same layers and no explicit config are the same manifest.
    Layers starting with the gzip magic get the ``+gzip`` media type; a layer
    given as a descriptor (of a blob already written) is listed as it is.
    """
    config_type = DOCKER_CONFIG if docker else OCI_CONFIG
    manifest_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    body: dict[str, Any] = {"schemaVersion": 2}
    if manifest_media_type_field:
        body["mediaType"] = manifest_type
    if artifact_type is not None:
        body["artifactType"] = artifact_type
    cfg = config if config is not None else _default_config(layers)
    body["config"] = write_blob(store, cfg, config_type)
    body["layers"] = [
        x if isinstance(x, dict) else write_blob(store, x, _layer_type(x, docker)) for x in layers
    ]
    if subject is not None:
        body["subject"] = _plain(subject)
    if annotations:
        body["annotations"] = dict(annotations)
    desc = write_blob(store, _dumps(body), manifest_type)
    if index_entry:
        add_entry(store, desc, tag)
    return desc


def four_images(store: Path) -> dict[str, Descriptor]:
    """Images a, b, c, d tagged as named, sharing one base layer; b and c alone also
    share a second one; a's manifest has a second entry, tagged `a-again`."""
    made = {
        "a": add_image(store, [b"base", b"only a"], tag="a"),
        "b": add_image(store, [b"base", b"b and c", b"only b"], tag="b"),
        "c": add_image(store, [b"base", b"b and c", b"only c"], tag="c"),
        "d": add_image(store, [b"base", b"only d"], tag="d"),
    }
    add_entry(store, made["a"], "a-again")
    return made


def chunked_rootfs(chunks: list[bytes], tree: bytes = b"") -> bytes:
    """A chunked-rootfs blob (docs/chunked-rootfs.md) naming ``chunks``, then ``tree``."""
    table = b"".join(hashlib.sha256(c).digest() + len(c).to_bytes(8, "big") for c in chunks)
    header = b"RCROOTFS" + (1).to_bytes(2, "big") + bytes(2) + len(chunks).to_bytes(4, "big")
    return header + table + tree


def add_rootfs_image(
    store: Path | str, chunks: list[bytes], *, tag: str | None, tree: bytes = b""
) -> Descriptor:
    """Write ``chunks`` as blobs, a chunked rootfs naming them, and an image whose one
    layer is that rootfs; return the manifest descriptor."""
    for chunk in chunks:
        write_blob(store, chunk, "application/octet-stream")
    rootfs = write_blob(store, chunked_rootfs(chunks, tree), ROOTFS_CHUNKED)
    return add_image(store, [rootfs], tag=tag)


def _rootfs_chunks(data: bytes) -> list[Descriptor]:
    """The chunks of a chunked rootfs; none when its header is not sound."""
    count = int.from_bytes(data[12:16], "big")
    if data[:10] != b"RCROOTFS\x00\x01" or 16 + 40 * count > len(data):
        return []
    return [{"digest": "sha256:" + data[16 + 40 * i : 48 + 40 * i].hex()} for i in range(count)]


def _chunklist_chunks(data: bytes) -> list[Descriptor]:
    """The chunks of a chunklist artifact, each with its mediaType when it says one."""
    try:
        chunks = json.loads(data)["chunks"]
        return [{k: c[k] for k in ("digest", "mediaType") if k in c} for c in chunks]
    except (ValueError, KeyError, TypeError):
        return []


# Media types whose children a plug-in names (refcount.extractors), and how to read them.
EXTRACTED: dict[str, Callable[[bytes], list[Descriptor]]] = {
    ROOTFS_CHUNKED: _rootfs_chunks,
    CHUNKLIST: _chunklist_chunks,
}


def _plain(desc: Descriptor) -> Descriptor:
    """mediaType/digest/size of a descriptor (drops annotations, platform...)."""
    return {k: desc[k] for k in ("mediaType", "digest", "size") if k in desc}


def add_index(
    store: Path | str,
    manifests: list[Descriptor],
    *,
    tag: str | None,
    list_children_untagged: bool = False,
) -> Descriptor:
    """Write an OCI image index over ``manifests`` and list it in index.json.

    Children without a ``platform`` get one from a fixed list (amd64, arm64...).
    With ``list_children_untagged`` each child is also an untagged root (oras).
    """
    children = []
    for i, child in enumerate(manifests):
        entry = _plain(child)
        entry["platform"] = child.get("platform", _PLATFORMS[i % len(_PLATFORMS)])
        children.append(entry)
    body = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
    desc = write_blob(store, _dumps(body), OCI_INDEX)
    add_entry(store, desc, tag)
    if list_children_untagged:
        for child in manifests:
            add_entry(store, _plain(child))
    return desc


def add_referrer(
    store: Path | str,
    subject: Descriptor,
    *,
    tag: str | None = None,
    payload: bytes = b"sbom",
) -> Descriptor:
    """An oras-style artifact: empty config, one SPDX layer, ``subject``."""
    layer = write_blob(store, payload, SPDX)
    layer["annotations"] = {"org.opencontainers.image.title": "sbom.spdx.json"}
    body = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": SBOM_ARTIFACT_TYPE,
        "config": write_blob(store, b"{}", OCI_EMPTY),
        "layers": [layer],
        "subject": _plain(subject),
    }
    desc = write_blob(store, _dumps(body), OCI_MANIFEST)
    desc["artifactType"] = SBOM_ARTIFACT_TYPE
    add_entry(store, desc, tag)
    return desc


# --------------------------------------------------------------------------
# index.json
# --------------------------------------------------------------------------


def read_index(store: Path | str) -> dict[str, Any]:
    """index.json as written; ``manifests`` may be null (umoci init)."""
    with open(Path(store) / "index.json", "rb") as f:
        obj: dict[str, Any] = json.load(f)
    return obj


def write_index(store: Path | str, obj: dict[str, Any]) -> None:
    """Replace index.json atomically (temp file in the layout + rename)."""
    store = Path(store)
    fd, tmp = tempfile.mkstemp(dir=store, prefix=".storekit-index-")
    with os.fdopen(fd, "wb") as f:
        f.write(_dumps(obj))
    os.replace(tmp, store / "index.json")


def _entries(index: dict[str, Any]) -> list[Descriptor]:
    manifests = index.get("manifests")
    return list(manifests) if isinstance(manifests, list) else []


def add_entry(store: Path | str, descriptor: Descriptor, tag: str | None = None) -> Descriptor:
    """Append a root to index.json (tagged when ``tag``); return the entry."""
    entry = dict(descriptor)
    if tag is not None:
        entry["annotations"] = {**entry.get("annotations", {}), REF_NAME: tag}
    index = read_index(store)
    index["manifests"] = [*_entries(index), entry]
    write_index(store, index)
    return entry


def remove_entries(store: Path | str, predicate: Callable[[Descriptor], bool]) -> list[Descriptor]:
    """Drop every index.json entry for which ``predicate`` is true; return them."""
    index = read_index(store)
    entries = _entries(index)
    index["manifests"] = [e for e in entries if not predicate(e)]
    write_index(store, index)
    return [e for e in entries if predicate(e)]


def tag_of(entry: Descriptor) -> str | None:
    annotations = entry.get("annotations")
    if isinstance(annotations, dict):
        value = annotations.get(REF_NAME)
        return value if isinstance(value, str) else None
    return None


# --------------------------------------------------------------------------
# Snapshots
# --------------------------------------------------------------------------


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames.sort()
        base = Path(dirpath)
        # os.walk lists symlinks to directories under dirnames: report them too.
        for name in sorted(filenames) + [d for d in dirnames if (base / d).is_symlink()]:
            yield base / name


def _fingerprint(path: Path) -> tuple[int, str]:
    st = path.lstat()
    if stat.S_ISLNK(st.st_mode):
        return 0, "symlink->" + os.readlink(path)
    return st.st_size, hashlib.sha256(path.read_bytes()).hexdigest()


def listing(store: Path | str, *, include_refcount: bool = False) -> dict[str, tuple[int, str]]:
    """Relative path -> (size, sha256 hex or "symlink->target") of every file.

    ``.refcount/`` is skipped unless ``include_refcount``. Compare two listings
    to prove that nothing was created, changed or deleted.
    """
    store = Path(store)
    result = {}
    for path in _walk(store):
        rel = path.relative_to(store).as_posix()
        if not include_refcount and (rel == ".refcount" or rel.startswith(".refcount/")):
            continue
        result[rel] = _fingerprint(path)
    return result


def blob_files(store: Path | str) -> set[str]:
    """Digests ("sha256:<hex>") of the entries under ``blobs/<alg>/``."""
    blobs = Path(store) / "blobs"
    found = set()
    for alg in sorted(blobs.iterdir()) if blobs.is_dir() else []:
        if alg.is_dir() and not alg.is_symlink():
            found |= {f"{alg.name}:{p.name}" for p in alg.iterdir() if not p.is_dir()}
    return found


# --------------------------------------------------------------------------
# The oracle: a from-scratch mark (SPEC sections 1-2)
# --------------------------------------------------------------------------


def _load_bytes(store: Path, digest: str) -> bytes | None:
    """A blob's bytes; None when absent or not a regular file."""
    path = blob_path(store, digest)
    try:
        return path.read_bytes() if stat.S_ISREG(path.lstat().st_mode) else None
    except OSError:
        return None


def _load_manifest(store: Path, digest: str) -> dict[str, Any] | None:
    """Parse a blob as a JSON object; None when absent, not a regular file or not JSON."""
    data = _load_bytes(store, digest)
    try:
        obj = json.loads(data) if data is not None else None
    except ValueError:
        return None
    return obj if isinstance(obj, dict) else None


def _children(obj: dict[str, Any], media_type: str) -> list[Descriptor]:
    """Child descriptors of a parsed blob read as ``media_type`` (valid digests only)."""
    found: list[Descriptor] = []
    for field in EDGE_FIELDS.get(media_type, ()):
        value = obj.get(field)
        items = [value] if isinstance(value, dict) else value if isinstance(value, list) else []
        found += [d for d in items if isinstance(d, dict) and is_valid_digest(d.get("digest"))]
    return found


def _effective_type(desc: Descriptor, obj: dict[str, Any] | None) -> str | None:
    """The descriptor's mediaType, else the blob's own mediaType field."""
    media_type = desc.get("mediaType")
    if not isinstance(media_type, str) and obj is not None:
        media_type = obj.get("mediaType")
    return media_type if isinstance(media_type, str) else None


def root_digests(store: Path | str) -> list[str]:
    """Digest of each index.json entry, in order, with repeats; invalid ones skipped."""
    entries = [e for e in _entries(read_index(store)) if isinstance(e, dict)]
    return [e["digest"] for e in entries if is_valid_digest(e.get("digest"))]


def graph(store: Path | str) -> dict[str, set[str]]:
    """Every reachable digest -> the set of its child digests.

    Iterative mark from the index.json entries. A blob's children are the union
    over every manifest-like type it is referenced as (normally one type). Missing
    or unparsable blobs are reachable leaves; invalid digests are skipped;
    ``subject`` is not an edge. Cycles terminate (each (digest, type) once).
    """
    store = Path(store)
    entries = [e for e in _entries(read_index(store)) if isinstance(e, dict)]
    todo = [e for e in entries if is_valid_digest(e.get("digest"))]
    edges: dict[str, set[str]] = {}
    seen: set[tuple[str, str | None]] = set()
    while todo:
        desc = todo.pop()
        digest = desc["digest"]
        kids = edges.setdefault(digest, set())
        declared = desc.get("mediaType")
        if declared in EXTRACTED:
            data = _load_bytes(store, digest)
            found = [d for d in EXTRACTED[declared](data or b"") if is_valid_digest(d["digest"])]
            kids.update(d["digest"] for d in found)
            # a child without a type is opaque bytes (refcount.extractors.OPAQUE): a leaf
            todo += [{"mediaType": OCTET_STREAM, **d} for d in found if d["digest"] not in edges]
            continue
        if isinstance(declared, str) and declared not in EDGE_FIELDS:
            continue  # a leaf by its descriptor: its bytes need not be read
        key = (digest, declared if isinstance(declared, str) else None)
        if key in seen:
            continue
        seen.add(key)
        obj = _load_manifest(store, digest)
        media_type = _effective_type(desc, obj)
        if obj is not None and media_type is not None:
            children = _children(obj, media_type)
            kids.update(c["digest"] for c in children)
            todo += children
    return edges


def closure(store: Path | str, digest: str) -> set[str]:
    """Every digest reachable from `digest` (itself included)."""
    edges = graph(store)
    seen, todo = set(), [digest]
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo += edges.get(node, ())
    return seen


def reachable(store: Path | str) -> set[str]:
    """Every digest reachable from index.json (present or missing)."""
    return set(graph(store))


def expected_counts(store: Path | str) -> dict[str, int]:
    """SPEC section 2: entries pointing at a digest + distinct reachable parents."""
    edges = graph(store)
    counts = dict.fromkeys(edges, 0)
    for digest in root_digests(store):
        counts[digest] += 1
    for kids in edges.values():
        for kid in kids:
            counts[kid] += 1
    return counts


# --------------------------------------------------------------------------
# Real tools
# --------------------------------------------------------------------------


class ToolError(subprocess.CalledProcessError):
    """A failed tool run whose message shows the command, stdout and stderr."""

    def __str__(self) -> str:
        return (
            f"{' '.join(map(str, self.cmd))} exited {self.returncode}\n"
            f"--- stdout ---\n{self.stdout}\n--- stderr ---\n{self.stderr}"
        )


def need_tool(name: str) -> str:
    """Path of the binary ``name``; skip the calling test when it is missing."""
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (apt-get install {name})")
    return path


def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a command, capture its output, raise ToolError when it fails."""
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise ToolError(proc.returncode, cmd, proc.stdout, proc.stderr)
    return proc


def _no_colon(path: Path | str) -> str:
    text = str(path)
    if ":" in text:
        raise ValueError(f"umoci/skopeo split image refs at the first colon: {text!r}")
    return text


def umoci_shared_store(path: Path | str, *, keep_base: bool = True) -> Path:
    """Build, with real umoci, images ``a`` and ``b`` sharing base's layer.

    Tags: base (layer f0), a (f0 + f1), b (f0 + f2), as in OCI-TOOLS.md.
    ``keep_base=False`` removes the ``base`` entry afterwards (umoci rm).
    Layer digests vary between runs (umoci records file times).
    """
    need_tool("umoci")
    store = Path(path)
    layout = _no_colon(store)
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    with tempfile.TemporaryDirectory(prefix="storekit-src-") as src:
        for name in ("f0", "f1", "f2"):
            Path(src, name).write_text(f"content of {name}\n")
        run(["umoci", "init", "--layout", layout])
        run(["umoci", "new", "--image", f"{layout}:base"])
        insert = ["umoci", "insert", *rootless, "--image"]
        run([*insert, f"{layout}:base", f"{src}/f0", "/f0"])
        run(["umoci", "tag", "--image", f"{layout}:base", "a"])
        run(["umoci", "tag", "--image", f"{layout}:base", "b"])
        run([*insert, f"{layout}:a", f"{src}/f1", "/f1"])
        run([*insert, f"{layout}:b", f"{src}/f2", "/f2"])
    if not keep_base:
        run(["umoci", "rm", "--image", f"{layout}:base"])
    return store


def skopeo_copy(
    src_store: Path | str,
    src_tag: str,
    dst_store: Path | str,
    dst_tag: str,
    all_: bool = False,
) -> subprocess.CompletedProcess[str]:
    """``skopeo copy [--all] oci:SRC:tag oci:DST:tag``."""
    need_tool("skopeo")
    cmd = ["skopeo", "copy", "--quiet"] + (["--all"] if all_ else [])
    src = f"oci:{_no_colon(src_store)}:{src_tag}"
    dst = f"oci:{_no_colon(dst_store)}:{dst_tag}"
    return run([*cmd, src, dst])


# --------------------------------------------------------------------------
# oci-image-tool on a view of the store
# --------------------------------------------------------------------------


def _is_referrer(obj: dict[str, Any]) -> bool:
    return "subject" in obj or "artifactType" in obj


def _view_manifests(store: Path) -> list[Descriptor]:
    """OCI image manifests (not referrers) that are roots or under root indexes."""
    todo = [e for e in _entries(read_index(store)) if isinstance(e, dict)]
    todo = [e for e in todo if is_valid_digest(e.get("digest"))]
    picked: dict[str, Descriptor] = {}
    seen: set[str] = set()
    while todo:
        desc = todo.pop(0)
        if desc["digest"] in seen:
            continue
        seen.add(desc["digest"])
        obj = _load_manifest(store, desc["digest"])
        media_type = _effective_type(desc, obj)
        if media_type == OCI_INDEX and obj is not None:
            todo += _children(obj, OCI_INDEX)
        elif media_type == OCI_MANIFEST and not (obj and _is_referrer(obj)):
            # A missing manifest stays in the view so that the tool reports it.
            picked[desc["digest"]] = {**_plain(desc), "mediaType": OCI_MANIFEST}
    return list(picked.values())


def oci_validate(store: Path | str) -> None:
    """``oci-image-tool validate --type image`` on a view of the OCI image manifests.

    The view is a temporary layout whose index.json lists the OCI image manifests
    that are roots or children of root indexes (Docker types and referrers are
    skipped: the tool rejects them), with ``blobs/<alg>`` symlinked to the store's.
    Raises AssertionError with the tool output on failure; no-op when the view
    would be empty.
    """
    store = Path(store).resolve()
    manifests = _view_manifests(store)
    if not manifests:
        return
    need_tool("oci-image-tool")
    with tempfile.TemporaryDirectory(prefix="storekit-view-") as tmp:
        view = Path(tmp)
        (view / "oci-layout").write_bytes(_dumps({"imageLayoutVersion": "1.0.0"}))
        write_index(view, {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": manifests})
        # The tool refuses a symlinked blobs/ ("not a directory"), so link per algorithm.
        (view / "blobs").mkdir()
        for alg in (store / "blobs").iterdir():
            (view / "blobs" / alg.name).symlink_to(alg)
        try:
            run(["oci-image-tool", "validate", "--type", "image", str(view)])
        except ToolError as err:
            raise AssertionError(f"oci-image-tool rejected {store}:\n{err}") from err


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 60.0) -> None:
    """Poll `condition` until it holds; fail naming `what` after `timeout` seconds
    (a bound on waiting for other processes, never an expected duration)."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)
