"""refcount: a persistent reference-count database beside an OCI image layout.

import refcount
with refcount.open("/srv/store") as rc:
    rc.init()
    report = rc.delete_tag("app:1.0")
    assert rc.verify().ok
"""

from refcount.core import Changes, Policy, Refcounter, open
from refcount.errors import (
    ConcurrentChange,
    DatabaseError,
    InvalidBlob,
    InvalidDigest,
    InvalidStore,
    NotFound,
    RefcountError,
    StoreBusy,
)
from refcount.oci import Digest
from refcount.reports import (
    BlobInfo,
    BlobRef,
    DeleteReport,
    Entry,
    GcReport,
    Stats,
    SyncReport,
    TagInfo,
    VerifyReport,
)

__all__ = [
    "BlobInfo",
    "BlobRef",
    "Changes",
    "ConcurrentChange",
    "DatabaseError",
    "DeleteReport",
    "Digest",
    "Entry",
    "GcReport",
    "InvalidBlob",
    "InvalidDigest",
    "InvalidStore",
    "NotFound",
    "Policy",
    "RefcountError",
    "Refcounter",
    "Stats",
    "StoreBusy",
    "SyncReport",
    "TagInfo",
    "VerifyReport",
    "open",
]
