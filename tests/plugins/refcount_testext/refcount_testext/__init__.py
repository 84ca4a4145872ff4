"""Extractors for refcount's tests, registered through real entry points.

`ChunkList` reads a JSON artifact of its own shape,
{"chunks": [{"digest", "size", "mediaType"}]} (size and mediaType optional).
The others fail as a plug-in may: `crashing` raises, `hanging` never returns,
`nonsense` names a path where a digest belongs.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from dataclasses import dataclass

from refcount.extractors import Child

CHUNKLIST = "application/vnd.example.chunklist.v1+json"
CRASHING = "application/vnd.example.crashing.v1"
HANGING = "application/vnd.example.hanging.v1"
NONSENSE = "application/vnd.example.nonsense.v1"


class ChunkList:
    media_types = (CHUNKLIST,)

    def extract(self, data: bytes, media_type: str) -> Iterator[Child]:
        for chunk in json.loads(data)["chunks"]:
            yield Child(chunk["digest"], chunk.get("size"), chunk.get("mediaType"))


@dataclass(frozen=True)
class _Failing:
    media_types: tuple[str, ...]
    how: str

    def extract(self, data: bytes, media_type: str) -> list[str]:
        if self.how == "raise":
            raise RuntimeError("cannot read this")
        if self.how == "hang":
            threading.Event().wait()
        first = data.split(b"\n", 1)[0].decode()  # a sound digest, then a path
        return [first, "sha256:../../etc/passwd"]


crashing = _Failing((CRASHING,), "raise")
hanging = _Failing((HANGING,), "hang")
nonsense = _Failing((NONSENSE,), "nonsense")
