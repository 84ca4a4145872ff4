#!/usr/bin/env python3
"""Generate a large, valid, deterministic OCI image layout for benchmarks.

    mkstore.py OUT --images N --layers K [--pool P] [--multiarch 0.05]
               [--referrers 0.05] [--docker 0.0] [--seed 1] [--layer-bytes 64]

Every image ``img-<i>`` gets its own config and K layers: K-1 drawn (distinct)
from a shared pool with Zipf-like popularity, so a few base layers are used by
most images, plus one layer unique to the image. Layers are tiny valid
tar+gzip files (fixed mtime/owner, so the output depends only on the
arguments). A fraction of images are multi-arch OCI image indexes (tag on the
index; two platform manifests, also listed untagged as oras does), a fraction
get a referrer (an oras-style SBOM artifact with ``subject``, listed untagged),
and a fraction use Docker schema2 media types (a Docker manifest list when
multi-arch). Only blobs that are referenced are written: ``umoci gc`` on the
output removes nothing (as long as --docker is 0: umoci gc does not walk
Docker manifests). Stdlib only; does not import refcount.
"""

from __future__ import annotations

import argparse
import bisect
import hashlib
import itertools
import json
import os
import random
import sys
import tarfile
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

Descriptor = dict[str, Any]

REF_NAME = "org.opencontainers.image.ref.name"
EMPTY_JSON = b"{}"
SBOM_ARTIFACT_TYPE = "application/vnd.example.sbom.v1"


@dataclass(frozen=True)
class Types:
    """The media types of one manifest flavour."""

    manifest: str
    index: str
    config: str
    layer: str


OCI = Types(
    manifest="application/vnd.oci.image.manifest.v1+json",
    index="application/vnd.oci.image.index.v1+json",
    config="application/vnd.oci.image.config.v1+json",
    layer="application/vnd.oci.image.layer.v1.tar+gzip",
)
DOCKER = Types(
    manifest="application/vnd.docker.distribution.manifest.v2+json",
    index="application/vnd.docker.distribution.manifest.list.v2+json",
    config="application/vnd.docker.container.image.v1+json",
    layer="application/vnd.docker.image.rootfs.diff.tar.gzip",
)
EMPTY_TYPE = "application/vnd.oci.empty.v1+json"
SPDX_TYPE = "application/spdx+json"
PLATFORMS: tuple[dict[str, str], ...] = (
    {"architecture": "amd64", "os": "linux"},
    {"architecture": "arm64", "os": "linux", "variant": "v8"},
)


@dataclass(frozen=True)
class Options:
    out: Path
    images: int
    layers: int
    pool: int
    multiarch: float
    referrers: float
    docker: float
    seed: int
    layer_bytes: int
    zipf: float


def dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def tar_gz(name: str, payload: bytes) -> tuple[bytes, str]:
    """A one-file tar+gzip (deterministic) and its diff_id (sha256 of the tar)."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(payload), 0, 0o644
    pad = b"\0" * (-len(payload) % 512)
    tar = info.tobuf(format=tarfile.USTAR_FORMAT) + payload + pad + b"\0" * 1024
    packer = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0
    return packer.compress(tar) + packer.flush(), "sha256:" + hashlib.sha256(tar).hexdigest()


@dataclass
class BlobWriter:
    """Writes each blob once into ``blobs/sha256`` (no fsync: a benchmark fixture)."""

    root: Path
    written: set[str] = field(default_factory=set)
    nbytes: int = 0

    def put(self, data: bytes, media_type: str) -> Descriptor:
        hexdigest = hashlib.sha256(data).hexdigest()
        if hexdigest not in self.written:
            self.written.add(hexdigest)
            self.nbytes += len(data)
            fd = os.open(self.root / hexdigest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                os.write(fd, data)
            finally:
                os.close(fd)
        return {"mediaType": media_type, "digest": "sha256:" + hexdigest, "size": len(data)}


class Generator:
    """Builds the store image by image, from one seeded random stream."""

    def __init__(self, opts: Options) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.blobs = BlobWriter(opts.out / "blobs" / "sha256")
        self.entries: list[Descriptor] = []
        self.pool: dict[int, tuple[bytes, str]] = {}
        weights = (1.0 / (rank + 1) ** opts.zipf for rank in range(opts.pool))
        self.cumulative = list(itertools.accumulate(weights))

    def pool_layer(self, rank: int) -> tuple[bytes, str]:
        """Pool layer ``rank``, derived from (seed, rank) only; built on first use."""
        if rank not in self.pool:
            payload = random.Random(f"{self.opts.seed}:pool:{rank}").randbytes(
                self.opts.layer_bytes
            )
            self.pool[rank] = tar_gz(f"pool/{rank:08d}", payload)
        return self.pool[rank]

    def draw_ranks(self) -> list[int]:
        """K-1 distinct pool ranks, popular (low) ranks first."""
        wanted = min(self.opts.layers - 1, self.opts.pool)
        total = self.cumulative[-1] if self.cumulative else 0.0
        if wanted >= self.opts.pool:
            return list(range(self.opts.pool))
        picked: set[int] = set()
        while len(picked) < wanted:
            picked.add(bisect.bisect_left(self.cumulative, self.rng.random() * total))
        return sorted(picked)

    def manifest(self, name: str, platform: dict[str, str], types: Types) -> Descriptor:
        """Config + layers + manifest of one platform image."""
        layers = [self.pool_layer(rank) for rank in self.draw_ranks()]
        payload = self.rng.randbytes(self.opts.layer_bytes)
        layers.append(tar_gz(f"app/{name}-{platform['architecture']}", payload))
        config = {
            **platform,
            "config": {"Labels": {"mkstore.image": name}},
            "rootfs": {"type": "layers", "diff_ids": [diff for _, diff in layers]},
        }
        body = {
            "schemaVersion": 2,
            "mediaType": types.manifest,
            "config": self.blobs.put(dumps(config), types.config),
            "layers": [self.blobs.put(gz, types.layer) for gz, _ in layers],
        }
        return self.blobs.put(dumps(body), types.manifest)

    def multiarch(self, name: str, types: Types) -> tuple[Descriptor, list[Descriptor]]:
        """An image index over two platform manifests; returns (index, children)."""
        children = [self.manifest(name, p, types) for p in PLATFORMS]
        listed = [{**child, "platform": p} for child, p in zip(children, PLATFORMS, strict=True)]
        body = {"schemaVersion": 2, "mediaType": types.index, "manifests": listed}
        return self.blobs.put(dumps(body), types.index), children

    def referrer(self, name: str, subject: Descriptor) -> Descriptor:
        """An oras-style SBOM artifact whose subject is ``subject``."""
        sbom = dumps({"spdxVersion": "SPDX-2.3", "name": name, "subject": subject["digest"]})
        layer = self.blobs.put(sbom, SPDX_TYPE)
        layer["annotations"] = {"org.opencontainers.image.title": "sbom.spdx.json"}
        body = {
            "schemaVersion": 2,
            "mediaType": OCI.manifest,
            "artifactType": SBOM_ARTIFACT_TYPE,
            "config": self.blobs.put(EMPTY_JSON, EMPTY_TYPE),
            "layers": [layer],
            "subject": subject,
        }
        desc = self.blobs.put(dumps(body), OCI.manifest)
        return {**desc, "artifactType": SBOM_ARTIFACT_TYPE}

    def image(self, i: int) -> None:
        """Image ``img-<i>`` and its index.json entries."""
        name = f"img-{i}"
        is_multi = self.rng.random() < self.opts.multiarch
        types = DOCKER if self.rng.random() < self.opts.docker else OCI
        has_referrer = self.rng.random() < self.opts.referrers
        children: list[Descriptor] = []
        if is_multi:
            root, children = self.multiarch(name, types)
        else:
            root = self.manifest(name, PLATFORMS[0], types)
        self.entries.append({**root, "annotations": {REF_NAME: name}})
        self.entries += children
        if has_referrer:
            self.entries.append(self.referrer(name, root))

    def run(self) -> None:
        out = self.opts.out
        self.blobs.root.mkdir(parents=True, exist_ok=True)
        (out / "oci-layout").write_bytes(dumps({"imageLayoutVersion": "1.0.0"}))
        for i in range(self.opts.images):
            self.image(i)
        index = {"schemaVersion": 2, "mediaType": OCI.index, "manifests": self.entries}
        (out / "index.json").write_bytes(dumps(index))


def fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text}")
    return value


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def parse_args(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out", type=Path, help="output layout directory (absent or empty)")
    p.add_argument("--images", type=int, required=True, help="number of tagged images")
    p.add_argument(
        "--layers",
        type=positive,
        required=True,
        help="layers per image: K-1 from the shared pool + 1 unique",
    )
    p.add_argument("--pool", type=positive, default=1000, help="shared layer pool size")
    p.add_argument("--multiarch", type=fraction, default=0.05, help="fraction of indexes")
    p.add_argument("--referrers", type=fraction, default=0.05, help="fraction with an SBOM")
    p.add_argument("--docker", type=fraction, default=0.0, help="fraction of Docker schema2")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--layer-bytes", type=int, default=64, help="payload bytes per layer")
    p.add_argument("--zipf", type=float, default=1.2, help="pool popularity exponent")
    ns = p.parse_args(argv)
    if ns.out.exists() and (not ns.out.is_dir() or any(ns.out.iterdir())):
        p.error(f"{ns.out} exists and is not an empty directory")
    if ns.images < 0 or ns.layer_bytes < 0:
        p.error("--images and --layer-bytes must not be negative")
    return Options(
        ns.out,
        ns.images,
        ns.layers,
        ns.pool,
        ns.multiarch,
        ns.referrers,
        ns.docker,
        ns.seed,
        ns.layer_bytes,
        ns.zipf,
    )


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    start = time.perf_counter()
    gen = Generator(opts)
    gen.run()
    seconds = time.perf_counter() - start
    print(
        f"mkstore: {opts.out}: images={opts.images} roots={len(gen.entries)} "
        f"blobs={len(gen.blobs.written)} bytes={gen.blobs.nbytes} seconds={seconds:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
