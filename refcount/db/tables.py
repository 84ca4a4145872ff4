"""The schema, once, as SQLAlchemy Core tables.

The query code (`repo.py`) and the migrations use these tables directly, so the
CLI's direct path imports SQLAlchemy Core only, never the ORM. `models.py` maps
typed ORM classes onto the same tables for library users who want them.

Every change here is an Alembic revision in `migrations/versions/`;
`SCHEMA_HEAD` names the newest one, and a test proves tables and migrations agree.
"""

from __future__ import annotations

from datetime import UTC, datetime

from sqlalchemy import (
    BigInteger,
    Boolean,
    Column,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect

SCHEMA_HEAD = "0008"

metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


class TZDateTime(TypeDecorator[datetime]):
    """Stores UTC; returns aware datetimes (SQLite keeps no time zone of its own)."""

    impl = DateTime
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.astimezone(UTC).replace(tzinfo=None)

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        return None if value is None else value.replace(tzinfo=UTC)


DIGEST = String(200)  # "sha512:" + 128 hex fits
PROBLEM_INDEX_WHERE = "problem IS NOT NULL"

blobs = Table(
    "blobs",
    metadata,
    # One content-addressed blob the store has, had, or needs. state: `live` (count > 0,
    # file in blobs/), `missing` (count > 0, file gone), `foreign` (count > 0, absent but
    # allowed: a descriptor with `urls`), `orphan` (count 0, file in blobs/, never
    # reachable), `trash` (count 0, quarantined in .refcount/trash/ until its TTL ends).
    Column("digest", DIGEST, primary_key=True),
    Column("size", BigInteger),
    Column("media_type", String(255)),
    Column("count", Integer, nullable=False),
    Column("state", String(16), nullable=False),
    # Whether the children are recorded as edges (false for a manifest still missing,
    # or one that could not be read at all).
    Column("expanded", Boolean, nullable=False),
    Column("subject", DIGEST, index=True),
    Column("problem", String(1000)),
    Column("first_seen", TZDateTime(), nullable=False),
    Column("freed_at", TZDateTime()),
    # Damaged manifests are rare; deletes and gc look for live ones every time.
    # Partial on PostgreSQL too, once `add_postgresql_options` has run.
    Index("ix_blobs_problem", "problem", sqlite_where=text(PROBLEM_INDEX_WHERE)),
)

edges = Table(
    "edges",
    metadata,
    # A live parent's reference to a child; one row per distinct (parent, child).
    Column("parent", DIGEST, primary_key=True),
    Column("child", DIGEST, primary_key=True),
    Column("kind", String(16), nullable=False),
    Index("ix_edges_child", "child"),
)

roots = Table(
    "roots",
    metadata,
    # An entry of index.json as last reconciled. `position` orders entries and may have
    # gaps after a delete; `start`/`end` are its byte span in the file, less the cuts
    # before it in `index_cuts`, so a delete can cut it out without parsing the rest.
    Column("position", Integer, primary_key=True, autoincrement=False),
    Column("digest", DIGEST, nullable=False, index=True),
    Column("tag", String(1000), index=True),
    Column("media_type", String(255)),
    Column("size", BigInteger),
    Column("start", BigInteger, index=True),
    Column("end", BigInteger),
)

index_cuts = Table(
    "index_cuts",
    metadata,
    # A byte range refcount cut out of index.json since the roots' spans were recorded
    # (`refcount.oci.CutLog` says how the two combine): a delete adds a row instead of
    # shifting the span of every later entry. Folded into the spans once there are many.
    Column("at", BigInteger, primary_key=True, autoincrement=False),
    Column("length", BigInteger, nullable=False),
)

pending_actions = Table(
    "pending_actions",
    metadata,
    # The journal: a file action decided by a committed transaction, not yet done.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("action", String(16), nullable=False),
    Column("digest", DIGEST, nullable=False),
    Column("created", TZDateTime(), nullable=False),
)

meta = Table(
    "meta",
    metadata,
    # Small facts about the store, e.g. the hash of the index.json last applied.
    Column("key", String(64), primary_key=True),
    Column("value", String(200), nullable=False),
)

mass_frees = Table(
    "mass_frees",
    metadata,
    # One outside change of index.json that freed more than the threshold of the live
    # bytes (or every root). Its blobs went to the quarantine whatever the trash TTL,
    # and gc keeps every blob freed at `at` until `held_until` (SPEC §7).
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", TZDateTime(), nullable=False),
    Column("held_until", TZDateTime(), nullable=False),
    Column("roots_before", Integer, nullable=False),
    Column("roots_removed", Integer, nullable=False),
    Column("blobs", Integer, nullable=False),
    Column("bytes", BigInteger, nullable=False),
    Column("live_bytes", BigInteger, nullable=False),
)

leases = Table(
    "leases",
    metadata,
    # A blob a first-party writer (a push, a library tool) relies on until its root is in
    # index.json (SPEC §7): no delete, prune, gc or daemon batch frees it while the lease
    # lasts. One row per (lease, blob); `expires` bounds what a crashed writer can pin.
    Column("lease", String(64), primary_key=True),
    Column("digest", DIGEST, primary_key=True),
    Column("holder", String(1000), nullable=False),
    Column("created", TZDateTime(), nullable=False),
    Column("expires", TZDateTime(), nullable=False, index=True),
    Index("ix_leases_digest", "digest"),
)

last_used = Table(
    "last_used",
    metadata,
    # When an image was last used (`refcount touch`, or pushed), by tag: what
    # `prune --unused-for` selects on. No row: never touched since refcount counted it.
    Column("tag", String(1000), primary_key=True),
    Column("used_at", TZDateTime(), nullable=False),
)

verify_runs = Table(
    "verify_runs",
    metadata,
    # One verify: when it started, shallow or deep, the blobs it hashed (a deep slice
    # hashed the digests after `after` up to and including `through`, in digest order),
    # and how many problems of each kind it found. Findings name the digests.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("at", TZDateTime(), nullable=False),
    Column("seconds", Float, nullable=False),
    Column("deep", Boolean, nullable=False),
    Column("sliced", Boolean, nullable=False),
    Column("checked", Integer, nullable=False),
    Column("after", DIGEST),
    Column("through", DIGEST),
    Column("lap_started", TZDateTime()),
    Column("lap_done", Integer),
    Column("lap_total", Integer),
    Column("ok", Boolean, nullable=False),
    Column("drift", Integer, nullable=False),
    Column("missing", Integer, nullable=False),
    Column("corrupt", Integer, nullable=False),
    Column("orphans", Integer, nullable=False),
    Column("problems", Integer, nullable=False),
    Index("ix_verify_runs_deep_id", "deep", "id"),
)

verify_findings = Table(
    "verify_findings",
    metadata,
    # What one verify found: kind is drift, missing, corrupt, orphan or problem; digest
    # is None for a problem that names no blob; tags are the tags that need the blob.
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column(
        "run", Integer, ForeignKey("verify_runs.id", ondelete="CASCADE"), nullable=False, index=True
    ),
    Column("kind", String(16), nullable=False),
    Column("digest", DIGEST),
    Column("detail", String(1000), nullable=False),
    Column("tags", String(1000), nullable=False),
)

image_created = Table(
    "image_created",
    metadata,
    # When a root manifest's image was made, as retention (`prune`) reads it once from
    # the manifest's org.opencontainers.image.created annotation (`source` annotation)
    # or else its config's `created` (`config`); `none` (created NULL) when neither
    # says, and prune uses blobs.first_seen. Keyed by digest: content never changes,
    # so a row never goes stale; prune forgets the rows of what it frees.
    Column("digest", DIGEST, primary_key=True),
    Column("created", TZDateTime()),
    Column("source", String(16), nullable=False),
)


def add_postgresql_options() -> None:
    """Give the tables their PostgreSQL-only options: the WHERE of `ix_blobs_problem`.

    SQLAlchemy validates a `postgresql_*` argument by importing its whole
    PostgreSQL dialect, every driver's module with it (about 30 ms), so naming one
    in the table above would charge that to every command on SQLite. The option is
    added instead when a PostgreSQL engine is made (`refcount.db.engine.make_engine`),
    which loads that dialect anyway; anything that builds PostgreSQL DDL from this
    metadata without such an engine calls it first. Calling it again changes nothing.
    Migration 0003 names the same WHERE in its own operations.
    """
    problem = next(index for index in blobs.indexes if index.name == "ix_blobs_problem")
    problem.dialect_kwargs["postgresql_where"] = text(PROBLEM_INDEX_WHERE)
