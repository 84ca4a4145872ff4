"""The schema, as typed ORM models. Queries live in `repo.py`, never here.

Every change to these models is an Alembic revision in `migrations/versions/`;
`SCHEMA_HEAD` names the newest one, and a test proves models and migrations agree.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated

from sqlalchemy import BigInteger, DateTime, Index, Integer, MetaData, String, TypeDecorator
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

SCHEMA_HEAD = "0002"


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


class Base(DeclarativeBase):
    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "ck": "ck_%(table_name)s_%(constraint_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


digest_key = Annotated[str, mapped_column(String(200), primary_key=True)]
digest_ref = Annotated[str, mapped_column(String(200))]
timestamp = Annotated[datetime, mapped_column(TZDateTime())]


class Blob(Base):
    """One content-addressed blob the store has, had, or needs.

    state: `live` (count > 0, file in blobs/), `missing` (count > 0, file gone),
    `foreign` (count > 0, absent but allowed: a descriptor with `urls`),
    `orphan` (count 0, file in blobs/, never reachable), `trash` (count 0,
    quarantined in .refcount/trash/ until its TTL ends).
    """

    __tablename__ = "blobs"

    digest: Mapped[digest_key]
    size: Mapped[int | None] = mapped_column(BigInteger)
    media_type: Mapped[str | None] = mapped_column(String(255))
    count: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16))
    # Whether the children of this blob are recorded as edges (manifests only).
    expanded: Mapped[bool] = mapped_column(default=False)
    subject: Mapped[str | None] = mapped_column(String(200), index=True)
    problem: Mapped[str | None] = mapped_column(String(1000))
    first_seen: Mapped[timestamp]
    freed_at: Mapped[datetime | None] = mapped_column(TZDateTime())


class Edge(Base):
    """A live parent's reference to a child; one row per distinct (parent, child)."""

    __tablename__ = "edges"
    __table_args__ = (Index("ix_edges_child", "child"),)

    parent: Mapped[digest_key]
    child: Mapped[str] = mapped_column(String(200), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))


class Root(Base):
    """An entry of index.json as last reconciled. `position` orders entries; it may
    have gaps after a delete (only order matters). `start`/`end` are the byte span
    of the entry in the file, so a delete can cut it out without parsing the rest."""

    __tablename__ = "roots"

    position: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    digest: Mapped[digest_ref] = mapped_column(index=True)
    tag: Mapped[str | None] = mapped_column(String(1000), index=True)
    media_type: Mapped[str | None] = mapped_column(String(255))
    size: Mapped[int | None] = mapped_column(BigInteger)
    start: Mapped[int | None] = mapped_column(BigInteger, index=True)
    end: Mapped[int | None] = mapped_column(BigInteger)


class PendingAction(Base):
    """The journal: a file action decided by a committed transaction, not yet done."""

    __tablename__ = "pending_actions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    action: Mapped[str] = mapped_column(String(16))
    digest: Mapped[digest_ref]
    created: Mapped[timestamp]


class Meta(Base):
    """Small facts about the store, e.g. the hash of the index.json last applied."""

    __tablename__ = "meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(String(200))
