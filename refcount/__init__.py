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
    from refcount.core import (
        Changes,
        DeleteRequest,
        MinFree,
        Policy,
        PrunePolicy,
        Refcounter,
        open,
        plugins,
    )
    from refcount.errors import (
        CannotWriteOutput,
        ConcurrentChange,
        CorruptBlob,
        DatabaseError,
        DeleteRefused,
        ForeignDatabase,
        InvalidBlob,
        InvalidDigest,
        InvalidPolicy,
        InvalidSize,
        InvalidSource,
        InvalidStore,
        LeaseExpired,
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
        ExtractorInfo,
        Finding,
        GcReport,
        Lap,
        LeaseInfo,
        MassFree,
        NeededBy,
        PluginsReport,
        Pruned,
        PruneReport,
        PushReport,
        Stats,
        SyncReport,
        TagInfo,
        TagUsage,
        TouchReport,
        VerifyReport,
        VerifyRun,
        VerifyStatus,
    )

_HOME = {
    **dict.fromkeys(
        [
            *("Changes", "DeleteRequest", "MinFree", "Policy", "PrunePolicy", "Refcounter"),
            *("open", "plugins"),
        ],
        "refcount.core",
    ),
    **dict.fromkeys(
        [
            "CannotWriteOutput",
            "ConcurrentChange",
            "CorruptBlob",
            "DatabaseError",
            "DeleteRefused",
            "ForeignDatabase",
            "InvalidBlob",
            "InvalidDigest",
            "InvalidSource",
            "InvalidPolicy",
            "InvalidSize",
            "InvalidStore",
            "LeaseExpired",
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
            "ExtractorInfo",
            "GcReport",
            "LeaseInfo",
            "MassFree",
            "PluginsReport",
            "PushReport",
            "Finding",
            "Lap",
            "NeededBy",
            "PruneReport",
            "Pruned",
            "Stats",
            "SyncReport",
            "TagInfo",
            "TagUsage",
            "TouchReport",
            "VerifyReport",
            "VerifyRun",
            "VerifyStatus",
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
    "CorruptBlob",
    "Damage",
    "DatabaseError",
    "DeleteRefused",
    "DeleteReport",
    "DeleteRequest",
    "Digest",
    "DuReport",
    "Entry",
    "ExtractorInfo",
    "Finding",
    "ForeignDatabase",
    "GcReport",
    "InvalidBlob",
    "InvalidDigest",
    "InvalidPolicy",
    "InvalidSize",
    "InvalidSource",
    "InvalidStore",
    "Lap",
    "LeaseExpired",
    "LeaseInfo",
    "MassFree",
    "MinFree",
    "NeededBy",
    "NotFound",
    "NotIndexed",
    "PluginsReport",
    "Policy",
    "PrunePolicy",
    "PruneReport",
    "Pruned",
    "PushReport",
    "RefcountError",
    "Refcounter",
    "Stats",
    "StoreBusy",
    "StoreNotWritable",
    "SyncReport",
    "TagInfo",
    "TagUsage",
    "TouchReport",
    "UnparsableIndex",
    "UnusableTag",
    "VerifyReport",
    "VerifyRun",
    "VerifyStatus",
    "open",
    "plugins",
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
