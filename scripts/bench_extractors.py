#!/usr/bin/env python3
"""What an extractor plug-in costs: chunked-rootfs images against plain ones.

    bench_extractors.py [--images 300] [--chunks 20] [--out DIR]

Builds two stores of the same shape: N images whose one layer is a chunked
rootfs naming K chunk blobs (the chunks reached through the shipped extractor),
and N images listing the same K blobs as layers (reached through the OCI parser:
the floor). Chunks are shared between neighbouring images in both. Then `init`,
a no-op `sync`, `verify` and the deletion of every tag, in-process through the
library, on each; and one extractor call through the registry (its worker thread
and time limit) against calling the extractor directly. Every figure is printed
as a ratio to its floor measured in the same run; nothing is asserted.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import refcount
from refcount import rootfs
from refcount.extractors import Registry

INDEX = "application/vnd.oci.image.index.v1+json"
MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
LAYER = "application/vnd.oci.image.layer.v1.tar"


def blob(store: Path, data: bytes, media_type: str) -> dict[str, object]:
    digest = hashlib.sha256(data).hexdigest()
    (store / "blobs" / "sha256" / digest).write_bytes(data)
    return {"mediaType": media_type, "digest": f"sha256:{digest}", "size": len(data)}


def build(store: Path, images: int, chunks: int, *, extracted: bool) -> None:
    (store / "blobs" / "sha256").mkdir(parents=True)
    (store / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    entries = []
    for i in range(images):
        datas = [f"chunk {i * chunks // 2 + j}".encode() for j in range(chunks)]  # half shared
        layers = [blob(store, d, LAYER) for d in datas]
        if extracted:
            table = [(hashlib.sha256(d).digest(), len(d)) for d in datas]
            layers = [blob(store, rootfs.build(table, b"tree %d" % i), rootfs.MEDIA_TYPE)]
        config = blob(store, json.dumps({"n": i}).encode(), CONFIG)
        body = {"schemaVersion": 2, "mediaType": MANIFEST, "config": config, "layers": layers}
        entry = blob(store, json.dumps(body).encode(), MANIFEST)
        entry["annotations"] = {"org.opencontainers.image.ref.name": f"t{i}"}
        entries.append(entry)
    index = {"schemaVersion": 2, "mediaType": INDEX, "manifests": entries}
    (store / "index.json").write_text(json.dumps(index))


def seconds(work: Callable[[], object]) -> float:
    started = time.perf_counter()
    work()
    return time.perf_counter() - started


def measure(store: Path, images: int) -> dict[str, float]:
    with refcount.open(store) as rc:
        figures = {"init": seconds(rc.init), "sync": seconds(rc.sync)}
        figures["verify"] = seconds(lambda: rc.verify().ok or exit(f"{store}: verify failed"))
        figures["delete"] = seconds(lambda: rc.delete_tags([f"t{i}" for i in range(images)]))
    return figures


def per_call(data: bytes, calls: int) -> tuple[float, float]:
    """Seconds per extractor call through the registry, and directly (the floor)."""
    extractor = rootfs.ChunkedRootfs()
    registry = Registry.of([("chunked-rootfs", extractor, None)])
    through = seconds(
        lambda: [
            registry.extract(rootfs.MEDIA_TYPE, data, "sha256:" + "0" * 64, 10)
            for _ in range(calls)
        ]
    )
    direct = seconds(
        lambda: [list(extractor.extract(data, rootfs.MEDIA_TYPE)) for _ in range(calls)]
    )
    return through / calls, direct / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--chunks", type=int, default=20)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="refcount-bench-extractors-"))
    results = {}
    for name, extracted in (("plain", False), ("chunked-rootfs", True)):
        store = out / name
        shutil.rmtree(store, ignore_errors=True)
        build(store, args.images, args.chunks, extracted=extracted)
        results[name] = measure(store, args.images)
    print(f"{args.images} images x {args.chunks} chunks; ratio = chunked-rootfs / plain layers")
    for step, floor in results["plain"].items():
        value = results["chunked-rootfs"][step]
        print(
            f"  {step:7} {value * 1000:9.1f} ms  plain {floor * 1000:9.1f} ms  x{value / floor:.2f}"
        )
    table = [(hashlib.sha256(b"%d" % j).digest(), j) for j in range(args.chunks)]
    through, direct = per_call(rootfs.build(table), 2000)
    print(
        f"  one call through the registry {through * 1e6:.0f} us, "
        f"directly {direct * 1e6:.0f} us  x{through / direct:.1f}"
    )
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
