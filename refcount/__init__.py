"""refcount: a persistent reference-count database beside an OCI image layout.

import refcount
with refcount.open("/srv/store") as rc:
    rc.init()
    report = rc.delete_tag("app:1.0")
    assert rc.verify().ok

The names below are loaded on first use (PEP 562), not when the package is
imported: `python -m refcount` and the console script import this package
before anything else, and the client that hands a command to a running daemon
(`refcount.client`) must not pay for SQLAlchemy (SPEC §6). `import refcount`
itself is therefore free; `refcount.open` imports the library.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from refcount.core import Changes, Policy, Refcounter, open
    from refcount.errors import (
        CannotWriteOutput,
        ConcurrentChange,
        DatabaseError,
        DeleteRefused,
        ForeignDatabase,
        InvalidBlob,
        InvalidDigest,
        InvalidStore,
        NotFound,
        NotIndexed,
        RefcountError,
        StoreBusy,
        StoreNotWritable,
        UnparsableIndex,
        UnusableTag,
    )
    from refcount.oci import Digest
    from refcount.reports import (
        BlobInfo,
        BlobRef,
        Damage,
        DeleteReport,
        DuReport,
        Entry,
        GcReport,
        MassFree,
        Stats,
        SyncReport,
        TagInfo,
        TagUsage,
        VerifyReport,
    )

_HOME = {
    **dict.fromkeys(["Changes", "Policy", "Refcounter", "open"], "refcount.core"),
    **dict.fromkeys(
        [
            "CannotWriteOutput",
            "ConcurrentChange",
            "DatabaseError",
            "DeleteRefused",
            "ForeignDatabase",
            "InvalidBlob",
            "InvalidDigest",
            "InvalidStore",
            "NotFound",
            "NotIndexed",
            "RefcountError",
            "StoreBusy",
            "StoreNotWritable",
            "UnparsableIndex",
            "UnusableTag",
        ],
        "refcount.errors",
    ),
    "Digest": "refcount.oci",
    **dict.fromkeys(
        [
            "BlobInfo",
            "BlobRef",
            "Damage",
            "DeleteReport",
            "DuReport",
            "Entry",
            "GcReport",
            "MassFree",
            "Stats",
            "SyncReport",
            "TagInfo",
            "TagUsage",
            "VerifyReport",
        ],
        "refcount.reports",
    ),
}

__all__ = [
    "BlobInfo",
    "BlobRef",
    "CannotWriteOutput",
    "Changes",
    "ConcurrentChange",
    "Damage",
    "DatabaseError",
    "DeleteRefused",
    "DeleteReport",
    "Digest",
    "DuReport",
    "Entry",
    "ForeignDatabase",
    "GcReport",
    "InvalidBlob",
    "InvalidDigest",
    "InvalidStore",
    "MassFree",
    "NotFound",
    "NotIndexed",
    "Policy",
    "RefcountError",
    "Refcounter",
    "Stats",
    "StoreBusy",
    "StoreNotWritable",
    "SyncReport",
    "TagInfo",
    "TagUsage",
    "UnparsableIndex",
    "UnusableTag",
    "VerifyReport",
    "open",
]


def __getattr__(name: str) -> object:
    home = _HOME.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
