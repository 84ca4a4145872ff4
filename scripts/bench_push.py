#!/usr/bin/env python3
"""`refcount push` against the floor of a verifying copy, and against the store's size.

    bench_push.py [--mib 256] [--images 10,1000] [--pushes 5] [--out DIR] [--json FILE]

Two figures, each a ratio to something measured in the same run on the same
machine (never an absolute time):

- **throughput**: one image of --mib MiB (four equal layers of random bytes) pushed
  from a layout into an empty store, as a whole `refcount push` process, against
  the floor of any verifying copy: reading the same files, hashing them with
  sha256 and writing them to the same filesystem with fsync (in this process,
  no interpreter start-up). `skopeo copy oci:... oci:...` of the same image is
  measured too when skopeo is installed;
- **store size**: the median of --pushes pushes of small distinct images (two
  layers, one shared) through the library into stores made by scripts/mkstore.py
  with each of --images images, as a ratio to the smallest store. The work a
  push does is the new image's blobs plus one read and rewrite of index.json.

It prints every figure and writes them to --json; it asserts nothing about times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import refcount

HERE = Path(__file__).resolve().parent

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar"
REF_NAME = "org.opencontainers.image.ref.name"


def write_blob(layout: Path, data: bytes) -> dict[str, Any]:
    digest = hashlib.sha256(data).hexdigest()
    path = layout / "blobs" / "sha256" / digest
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return {"digest": f"sha256:{digest}", "size": len(data)}


def make_layout(path: Path) -> Path:
    (path / "blobs" / "sha256").mkdir(parents=True, exist_ok=True)
    (path / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (path / "index.json").write_text('{"schemaVersion":2,"manifests":[]}')
    return path


def add_image(layout: Path, layers: list[bytes], tag: str) -> None:
    descriptors = [{"mediaType": OCI_LAYER, **write_blob(layout, x)} for x in layers]
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": []}, "tag": tag}).encode()
    manifest = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, **write_blob(layout, config)},
        "layers": descriptors,
    }
    entry = {"mediaType": OCI_MANIFEST, **write_blob(layout, json.dumps(manifest).encode())}
    entry["annotations"] = {REF_NAME: tag}
    index = json.loads((layout / "index.json").read_text())
    index["manifests"] = [*(index["manifests"] or []), entry]
    (layout / "index.json").write_text(json.dumps(index))


def floor_copy(source: Path, target: Path) -> float:
    """Read, sha256 and write (with fsync) every blob of `source` into `target`."""
    target.mkdir(parents=True)
    start = time.perf_counter()
    for path in sorted((source / "blobs" / "sha256").iterdir()):
        hasher = hashlib.sha256()
        with path.open("rb") as read, (target / path.name).open("wb") as write:
            while chunk := read.read(1 << 20):
                hasher.update(chunk)
                write.write(chunk)
            write.flush()
            os.fsync(write.fileno())
        assert hasher.hexdigest() == path.name
    return time.perf_counter() - start


def timed(cmd: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run(
        cmd, check=True, capture_output=True, env={**os.environ, "REFCOUNT_NO_DAEMON": "1"}
    )
    return time.perf_counter() - start


def throughput(out: Path, mib: int) -> dict[str, Any]:
    source = make_layout(out / "big-src")
    quarter = (mib << 20) // 4
    add_image(source, [os.urandom(quarter) for _ in range(4)], "big")
    floor = floor_copy(source, out / "floor")
    store = make_layout(out / "big-dst")
    push = timed([sys.executable, "-m", "refcount", "--store", str(store), "push", f"{source}:big"])
    result: dict[str, Any] = {
        "mib": mib,
        "floor_s": floor,
        "push_s": push,
        "push_vs_floor": push / floor,
    }
    if shutil.which("skopeo"):
        skopeo = timed(
            ["skopeo", "copy", "--quiet", f"oci:{source}:big", f"oci:{out / 'skopeo-dst'}:big"]
        )
        result |= {"skopeo_s": skopeo, "skopeo_vs_floor": skopeo / floor}
    return result


def by_store_size(out: Path, sizes: list[int], pushes: int) -> dict[str, Any]:
    sources = make_layout(out / "small-src")
    for i in range(pushes):
        add_image(sources, [b"shared small layer", os.urandom(4096)], f"small-{i}")
    medians: dict[int, float] = {}
    for n in sizes:
        store = out / f"store-{n}"
        subprocess.run(
            [
                sys.executable,
                str(HERE / "mkstore.py"),
                str(store),
                "--images",
                str(n),
                "--layers",
                "3",
            ],
            check=True,
            capture_output=True,
        )
        times = []
        with refcount.open(store) as rc:
            rc.init()
            for i in range(pushes):
                start = time.perf_counter()
                rc.push(f"{sources}:small-{i}")
                times.append(time.perf_counter() - start)
            assert rc.verify().ok
        medians[n] = statistics.median(times)
    smallest = medians[min(sizes)]
    return {
        "push_median_s": {str(n): t for n, t in medians.items()},
        "push_vs_smallest_store": {str(n): t / smallest for n, t in medians.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mib", type=int, default=256)
    parser.add_argument("--images", default="10,1000")
    parser.add_argument("--pushes", type=int, default=5)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    sizes = [int(n) for n in args.images.split(",")]
    with tempfile.TemporaryDirectory(prefix="bench-push-", dir=args.out) as work:
        out = Path(work)
        results = {
            "throughput": throughput(out, args.mib),
            "store_size": by_store_size(out, sizes, args.pushes),
        }
    t = results["throughput"]
    print(
        f"push of {t['mib']} MiB: {t['push_vs_floor']:.2f}x the floor (read + sha256 + write + fsync)"
    )
    if "skopeo_vs_floor" in t:
        print(f"skopeo copy of the same image: {t['skopeo_vs_floor']:.2f}x the floor")
    for n, ratio in results["store_size"]["push_vs_smallest_store"].items():
        print(f"push of a small image into a store of {n} images: {ratio:.2f}x the smallest store")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
