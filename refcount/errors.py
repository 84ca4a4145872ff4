"""Every error refcount raises on purpose, and the exit code of each: one table.

Every error is a `RefcountError` carrying the exit code the CLI uses and a
one-line message that names the file or value at fault, in the form
"what: problem: why". The CLI turns them into that line and that code in one
place (`refcount.cli._outcome`); reports that find a problem carry their own
exit code (`exit_code` on the report types).

    class                 code  meaning
    NotFound                 1  a tag or digest the user named does not exist
    InvalidDigest            2  not a digest refcount accepts
    InvalidStore             2  the layout is unusable (oci-layout, index.json, blobs/)
      UnparsableIndex        2    index.json empty or not JSON (a write in progress?)
    InvalidBlob              2  a manifest that cannot be read safely
      BlobTooLarge           2    over --max-manifest
    DeleteRefused            2  the delete would free blobs refcount cannot vouch for
    UnusableTag              2  the named tag is spelled unusably in index.json
    ConcurrentChange         2  index.json kept changing under a rewrite
      PlanChanged            2    a prune's plan is no longer what was shown
    DatabaseError            2  the database cannot be opened, upgraded or written
      DatabaseContention     2    a deadlock or serialization failure, still after retries
    ForeignDatabase          2  the database counts another store
    NotIndexed               2  a reading command on a store never indexed
    StoreNotWritable         2  a writing command on a store this process may not change
    InvalidDuration          2  a duration option that does not parse
    InvalidSize              2  a size or percentage option that does not parse
    InvalidPolicy            2  a retention policy (flags or policy.toml) that is wrong
    CannotWriteOutput        2  an output file asked for (du --html) cannot be written there
    InvalidOption            2  a daemon option out of range
    InvalidAddress           2  --metrics-addr is not HOST:PORT or cannot be listened on
    NotServed                2  a daemon asked to run a command it does not serve
    InvalidSource            2  a push source that cannot be read safely (spelling, archive)
      CorruptBlob            2    a blob whose bytes do not match its digest or size
    LeaseExpired             2  a push outlived its lease (nothing was tagged)
    StoreBusy                4  another refcount process holds the store (a second daemon)
    CannotWatch              4  inotify cannot watch the store (limits, permissions)
    CannotServe              4  the daemon's command socket cannot be made

Code 3 is an internal error (a bug) and 130 an interruption; neither is an
error class here (see `ExitCode`).
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    PROBLEM = 1  # the command ran and found a problem, or a named thing does not exist
    USAGE = 2  # usage or input error: bad option, malformed digest, unusable store
    INTERNAL = 3  # a bug: the traceback is logged with -vv
    ENVIRONMENT = 4  # the machine or another process prevents the command
    INTERRUPTED = 130  # SIGINT or SIGTERM (128 + SIGINT, as shells report Ctrl-C)


class RefcountError(Exception):
    """Base of every error refcount raises on purpose."""

    exit_code: ExitCode = ExitCode.USAGE


class NotFound(RefcountError):
    """A tag or digest the user named does not exist in the store."""

    exit_code = ExitCode.PROBLEM


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


class DeleteRefused(RefcountError):
    """A delete that would free blobs refcount cannot vouch for: its image holds a
    damaged manifest, or a live manifest could not be read at all."""


class UnusableTag(RefcountError):
    """A tag named on the command line that index.json spells unusably (control
    characters, not a string): its entry holds its image but cannot be named."""


class BlobTooLarge(InvalidBlob):
    """A manifest-like blob over the parsing size cap."""


class StoreBusy(RefcountError):
    """Another refcount process holds the store (a second daemon, a lock timeout)."""

    exit_code = ExitCode.ENVIRONMENT


class ConcurrentChange(RefcountError):
    """`index.json` kept changing under a rewrite; nothing was written."""


class PlanChanged(ConcurrentChange):
    """A confirmed prune whose plan is no longer the one shown; nothing was deleted.
    (Not retried: a new plan needs a new confirmation.)"""


class DatabaseError(RefcountError):
    """The database cannot be opened, upgraded or written."""


class DatabaseContention(DatabaseError):
    """The database aborted a transaction for a deadlock or a serialization failure
    (PostgreSQL, several writers); the operation is retried a bounded number of times."""


class NotIndexed(RefcountError):
    """A reading command on a store whose database was never built (`refcount init`)."""


class StoreNotWritable(RefcountError):
    """A writing command on a store this process may not change (read-only, permissions)."""


class ForeignDatabase(RefcountError):
    """The database already counts another store (SPEC §4: one database, one store)."""


class InvalidDuration(RefcountError):
    """A duration option that does not parse."""


class InvalidSize(RefcountError):
    """A size (`10G`) or percentage (`15%`) option that does not parse, or is negative."""


class InvalidPolicy(RefcountError):
    """A retention policy that cannot be applied: a bad value, or a policy file that
    is malformed, has an unknown key, or is not a regular file inside the store."""


class CannotWriteOutput(RefcountError):
    """A file the user asked for (`du --html FILE`) cannot be written there: the
    directory is missing or not writable, FILE is a directory or a symbolic link
    (never written through), or FILE is one of the store's own files."""


class InvalidOption(RefcountError):
    """A daemon option out of range."""


class InvalidAddress(RefcountError):
    """A `--metrics-addr` that is not HOST:PORT, or that cannot be listened on."""


class NotServed(RefcountError):
    """A request for a command the daemon does not run for clients."""


class InvalidSource(RefcountError):
    """A push source that is spelled wrong, unreadable, or unsafe to read (an
    archive member that is a link, a device or escapes the archive)."""


class CorruptBlob(InvalidSource):
    """A blob whose bytes do not hash to its digest, or whose size is not its
    descriptor's: nothing of it is kept."""


class LeaseExpired(RefcountError):
    """A push took longer than its lease: the blobs it relied on may have been
    freed, so its root was not added."""


class CannotWatch(RefcountError):
    """The store cannot be watched (inotify limits, permissions)."""

    exit_code = ExitCode.ENVIRONMENT


class CannotServe(RefcountError):
    """The command socket cannot be made (a path too long, a read-only .refcount/)."""

    exit_code = ExitCode.ENVIRONMENT
