"""Typed ORM classes over the Core tables of `tables.py` (one schema, two views).

refcount's own queries use the tables directly (SQLAlchemy Core keeps the CLI's
start-up cheap); these classes are for library users and tools that prefer the
ORM, e.g. `session.scalars(select(Blob).where(Blob.state == "missing"))`.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy.orm import DeclarativeBase, Mapped

from refcount.db import tables
from refcount.db.tables import SCHEMA_HEAD


class Base(DeclarativeBase):
    metadata = tables.metadata


class Blob(Base):
    __table__ = tables.blobs

    digest: Mapped[str]
    size: Mapped[int | None]
    media_type: Mapped[str | None]
    count: Mapped[int]
    state: Mapped[str]
    expanded: Mapped[bool]
    subject: Mapped[str | None]
    problem: Mapped[str | None]
    first_seen: Mapped[datetime]
    freed_at: Mapped[datetime | None]


class Edge(Base):
    __table__ = tables.edges

    parent: Mapped[str]
    child: Mapped[str]
    kind: Mapped[str]


class Root(Base):
    __table__ = tables.roots

    position: Mapped[int]
    digest: Mapped[str]
    tag: Mapped[str | None]
    media_type: Mapped[str | None]
    size: Mapped[int | None]
    start: Mapped[int | None]
    end: Mapped[int | None]


class PendingAction(Base):
    __table__ = tables.pending_actions

    id: Mapped[int]
    action: Mapped[str]
    digest: Mapped[str]
    created: Mapped[datetime]


class IndexCut(Base):
    __table__ = tables.index_cuts

    at: Mapped[int]
    length: Mapped[int]


class Meta(Base):
    __table__ = tables.meta

    key: Mapped[str]
    value: Mapped[str]


class MassFree(Base):
    __table__ = tables.mass_frees

    id: Mapped[int]
    at: Mapped[datetime]
    held_until: Mapped[datetime]
    roots_before: Mapped[int]
    roots_removed: Mapped[int]
    blobs: Mapped[int]
    bytes: Mapped[int]
    live_bytes: Mapped[int]


class Lease(Base):
    __table__ = tables.leases

    lease: Mapped[str]
    digest: Mapped[str]
    holder: Mapped[str]
    created: Mapped[datetime]
    expires: Mapped[datetime]


class LastUse(Base):
    __table__ = tables.last_used

    tag: Mapped[str]
    used_at: Mapped[datetime]


class VerifyRun(Base):
    __table__ = tables.verify_runs

    id: Mapped[int]
    at: Mapped[datetime]
    seconds: Mapped[float]
    deep: Mapped[bool]
    sliced: Mapped[bool]
    checked: Mapped[int]
    after: Mapped[str | None]
    through: Mapped[str | None]
    lap_started: Mapped[datetime | None]
    lap_done: Mapped[int | None]
    lap_total: Mapped[int | None]
    ok: Mapped[bool]
    drift: Mapped[int]
    missing: Mapped[int]
    corrupt: Mapped[int]
    orphans: Mapped[int]
    problems: Mapped[int]


class VerifyFinding(Base):
    __table__ = tables.verify_findings

    id: Mapped[int]
    run: Mapped[int]
    kind: Mapped[str]
    digest: Mapped[str | None]
    detail: Mapped[str]
    tags: Mapped[str]


class ImageCreated(Base):
    __table__ = tables.image_created

    digest: Mapped[str]
    created: Mapped[datetime | None]
    source: Mapped[str]


__all__ = [
    "SCHEMA_HEAD",
    "Base",
    "Blob",
    "Edge",
    "ImageCreated",
    "IndexCut",
    "LastUse",
    "Lease",
    "MassFree",
    "Meta",
    "PendingAction",
    "Root",
    "VerifyFinding",
    "VerifyRun",
]
