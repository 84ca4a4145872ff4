"""Opening a store's database, for reading or for writing, and the store's identity.

Nothing is opened when a Refcounter is made. A writing operation asks for
`Opening.writer()`: it refuses a store this process may not change and a
database that counts another store, before anything is created, then makes
.refcount/ and brings the schema up to date. A reading operation asks for
`reader()`: on a store this process may write it is the writer (so the caller
can catch up first); on a read-only store the database is opened without
writing anything; and a store never indexed is NotIndexed, creating nothing.

A store's identity is a random id in `.refcount/store-id`, recorded in the
database by the first writer: a path would change when the store moves, and
differs between hosts that share one store over NFS (SPEC §4: a database counts
one store).
"""

from __future__ import annotations

import uuid
from enum import StrEnum

from refcount import interrupts
from refcount.db.engine import (
    Engine,
    current_revision,
    ensure_schema,
    make_engine,
    redact_url,
    sqlite_file,
    transaction,
    with_store_lock,
)
from refcount.db.tables import SCHEMA_HEAD
from refcount.errors import DatabaseError, ForeignDatabase, NotIndexed
from refcount.store import Store

STORE_ID = "store_id"  # meta keys
STORE_PATH = "store_path"


class Mode(StrEnum):
    READ = "read"
    WRITE = "write"


class Opening:
    def __init__(
        self, store: Store, db_url: str, *, own_db: bool, schema: str | None = None
    ) -> None:
        self.store = store
        self.db_url = db_url
        self.own_db = own_db  # the default database, inside this store's .refcount/
        self.schema = schema  # under --root on PostgreSQL: this repository's schema
        self.engine: Engine | None = None
        self.mode: Mode | None = None

    def close(self) -> None:
        if self.engine is not None:
            with interrupts.deferred():  # a driver cut while closing logs tracebacks
                self.engine.dispose()

    def _make_engine(self, *, read_only: bool) -> Engine:
        if self.engine is None:
            self.engine = make_engine(self.db_url, read_only=read_only, schema=self.schema)
        return self.engine

    def writer(self) -> Engine:
        if self.mode is Mode.WRITE:
            assert self.engine is not None
            return self.engine
        self.store.check_state_dir()
        self.store.check_writable()
        engine = self._make_engine(read_only=False)
        claim = self._check_identity(engine)
        self.store.ensure_state_dir()
        ensure_schema(engine)
        if claim:
            self._claim_identity(engine)
        identity = self.store.read_identity()
        if identity is not None:  # PostgreSQL: the lock that holds across hosts
            self.engine = engine = with_store_lock(engine, identity)
        self.mode = Mode.WRITE
        return engine

    def reader(self) -> Engine:
        if self.mode is not None:
            assert self.engine is not None
            return self.engine
        self.store.check_state_dir()
        if self.own_db:
            self.store.check_readable()
        database = sqlite_file(self.db_url)
        if database is not None and not database.exists():
            raise self._not_indexed()
        writable = self.store.writable()
        engine = self._make_engine(read_only=not writable)
        revision = current_revision(engine)
        if revision is None or self._never_indexed(engine):
            # Before `writer()`: a reading command on a store never indexed claims no
            # identity (no .refcount/store-id, no meta row). On SQLite the missing file
            # said so already; a PostgreSQL database or schema exists beforehand.
            raise self._not_indexed()
        if writable:
            self.writer()
        else:
            if revision != SCHEMA_HEAD:
                raise DatabaseError(
                    f"{redact_url(self.db_url)}: schema {revision} is not this refcount's "
                    f"{SCHEMA_HEAD}, and the store is read-only: run `refcount db upgrade` "
                    "where it is writable"
                )
            self._check_identity(engine)
            self.mode = Mode.READ
        return engine

    @staticmethod
    def _never_indexed(engine: Engine) -> bool:
        """No index hash and no rows. Reads only tables of the first revision, so it
        also holds on a schema older than this refcount's (before any upgrade)."""
        with transaction(engine, write=False) as repo:
            # A migration may forget the hash to force one re-read; rows remain.
            return repo.index_hash() is None and repo.is_empty()

    def _not_indexed(self) -> NotIndexed:
        return NotIndexed(f"{self.store.path}: not indexed yet: run `refcount init`")

    def _check_identity(self, engine: Engine) -> bool:
        """Refuse a database that counts another store. Returns whether this store's
        identity still has to be recorded (`_claim_identity`)."""
        if current_revision(engine) is None:
            return True
        with transaction(engine, write=False) as repo:
            recorded, where = repo.get_meta(STORE_ID), repo.get_meta(STORE_PATH)
        mine = self.store.read_identity()
        if recorded is None:
            return True
        if mine == recorded:
            return False
        if mine is None and self.own_db:
            return True  # its own database: the lost identity file is written again
        raise self._foreign(recorded, where)

    def _claim_identity(self, engine: Engine) -> None:
        """Record this store's identity in the database (once; racing claimants of one
        store agree, since the identity file is created exclusively, and racing
        stores on one database are told apart by the insert-if-absent)."""
        with transaction(engine) as repo:
            recorded = repo.get_meta(STORE_ID)
            mine = self.store.read_identity()
            if recorded is None:
                mine = mine or self.store.claim_identity(uuid.uuid4().hex)
                recorded = repo.claim_meta(STORE_ID, mine)
                if recorded == mine:
                    repo.claim_meta(STORE_PATH, str(self.store.path)[:200])
            if mine is None and self.own_db:
                self.store.claim_identity(recorded)
            elif mine != recorded:
                raise self._foreign(recorded, repo.get_meta(STORE_PATH))

    def _foreign(self, recorded: str, where: str | None) -> ForeignDatabase:
        if self.schema is not None:
            return ForeignDatabase(
                f"{redact_url(self.db_url)}: schema {self.schema} already counts the "
                f"repository at {where} (id {recorded}); refusing to count {self.store.path} "
                "with it: give each root its own database, or, if that repository is gone, "
                f"drop the schema (DROP SCHEMA {self.schema} CASCADE)"
            )
        return ForeignDatabase(
            f"{redact_url(self.db_url)}: already counts the store at {where} "
            f"(id {recorded}); refusing to count {self.store.path} with it: "
            "give each store its own --db"
        )
