"""The library's typed errors.

Every error the library raises is a `RefcountError`. Each carries the exit code the
CLI uses (SPEC §4: 1 = the command ran and found a problem or an unknown name,
2 = usage or input error) and a one-line message that names the file or value at
fault, in the form "what: problem: why".
"""

from __future__ import annotations


class RefcountError(Exception):
    """Base of every error the library raises on purpose."""

    exit_code = 2


class NotFound(RefcountError):
    """A tag or digest the user named does not exist in the store."""

    exit_code = 1


class InvalidDigest(RefcountError):
    """A string that is not a digest refcount accepts (sha256/sha512, lowercase hex)."""


class InvalidStore(RefcountError):
    """The layout itself is unusable: missing or bad `oci-layout` or `index.json`."""


class UnparsableIndex(InvalidStore):
    """`index.json` is empty or not JSON at all: perhaps a tool's write in progress
    (skopeo and oras rewrite it in place). A document that parses but is not an
    image index is a plain InvalidStore: no write in progress looks like that."""


class InvalidBlob(RefcountError):
    """A manifest-like blob that cannot be parsed, is too large, or is unsafe to read."""


class BlobTooLarge(InvalidBlob):
    """A manifest-like blob over the parsing size cap."""


class StoreBusy(RefcountError):
    """Another refcount process holds the store (a second daemon, a lock timeout)."""


class ConcurrentChange(RefcountError):
    """`index.json` kept changing under a rewrite; nothing was written."""


class DatabaseError(RefcountError):
    """The database cannot be opened, upgraded or written."""


class NotIndexed(RefcountError):
    """A reading command on a store whose database was never built (`refcount init`)."""


class StoreNotWritable(RefcountError):
    """A writing command on a store this process may not change (read-only, permissions)."""


class ForeignDatabase(RefcountError):
    """The database already counts another store (SPEC §4: one database, one store)."""


class InvalidOption(RefcountError):
    """A daemon option out of range (exit 2)."""


class CannotWatch(RefcountError):
    """The store cannot be watched (inotify limits, permissions)."""
