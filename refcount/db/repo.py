"""Every SQL statement refcount runs, on a connection the caller owns.

`Repo` never commits: the caller frames the transaction (`engine.transaction`),
so one operation is one transaction whatever it touches. Counts change through
SQL arithmetic (`count = count + :delta RETURNING count`), never read-modify-write
in Python, so several writers on PostgreSQL cannot lose an update.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy import (
    CTE,
    Column,
    Connection,
    MetaData,
    RootTransaction,
    Table,
    delete,
    func,
    insert,
    literal,
    or_,
    select,
    update,
)

from refcount.db.tables import (
    blobs,
    edges,
    image_created,
    index_cuts,
    last_used,
    leases,
    mass_frees,
    meta,
    roots,
    verify_findings,
    verify_runs,
)
from refcount.db.tables import pending_actions as journal
from refcount.domain import BlobState, FileAction
from refcount.oci import CutLog
from refcount.reports import Finding, Lap, LeaseInfo, MassFree, VerifyRun

_CHUNK = 500  # rows per IN (...) list: well under SQLite's bound-parameter limit
PROBLEM_WIDTH = 1000  # blobs.problem
INDEX_HASH = "index_hash"  # a meta key
_STATES = {state.value: state for state in BlobState}
"""A state column's value -> BlobState, without an enum call a row."""
DEEP_CURSOR = "deep_cursor"  # a meta key: the last digest the deep lap hashed ("" at its start)
DEEP_LAP_STARTED = "deep_lap_started"  # a meta key: ISO time of the lap's first slice
FINDINGS_PER_RUN = 1000
"""Findings recorded per verify: a store with 100k orphans records the first ones
(by kind, in digest order); the run's counts are always complete."""
VERIFY_RUNS_KEPT = 1000
"""Verify records kept; older ones (and their findings) are dropped as new ones come."""


@dataclass(frozen=True)
class BlobRow:
    """One row of `blobs` (tables.py says what each column means)."""

    digest: str
    size: int | None
    media_type: str | None
    count: int
    state: BlobState
    expanded: bool
    subject: str | None
    problem: str | None
    first_seen: datetime
    freed_at: datetime | None = None

    def __post_init__(self) -> None:
        # Rows read back carry the state as text; problems are capped at the column's width.
        object.__setattr__(self, "state", BlobState(self.state))
        if self.problem is not None and len(self.problem) > PROBLEM_WIDTH:
            object.__setattr__(self, "problem", self.problem[:PROBLEM_WIDTH])


@dataclass(frozen=True)
class EdgeRow:
    parent: str
    child: str
    kind: str


@dataclass(frozen=True)
class RootRow:
    position: int
    digest: str
    tag: str | None
    media_type: str | None
    size: int | None
    start: int | None = None
    end: int | None = None


@dataclass(frozen=True)
class Action:
    id: int
    action: FileAction
    digest: str


def _chunks(items: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(items), _CHUNK):
        yield items[start : start + _CHUNK]


class Repo:
    _staged_edges: Table | None = None

    def __init__(self, connection: Connection, tx: RootTransaction) -> None:
        self.connection = connection
        self._tx = tx
        self._store_lock: int | None = None

    def rollback(self) -> None:
        """Discard everything this transaction did (a dry run)."""
        self._tx.rollback()

    @property
    def dialect(self) -> str:
        return self.connection.dialect.name

    # --- meta ---------------------------------------------------------------
    def index_hash(self) -> str | None:
        """The hash of the index.json the roots were last brought in line with."""
        return self.get_meta(INDEX_HASH)

    def set_index_hash(self, value: str) -> None:
        """Record it; "" forgets it (the next catch-up re-reads index.json)."""
        self.set_meta(INDEX_HASH, value)

    def get_meta(self, key: str) -> str | None:
        return self.connection.execute(select(meta.c.value).where(meta.c.key == key)).scalar()

    def set_meta(self, key: str, value: str) -> None:
        done = self.connection.execute(update(meta).where(meta.c.key == key).values(value=value))
        if done.rowcount == 0:
            self.connection.execute(insert(meta).values(key=key, value=value))

    def claim_meta(self, key: str, value: str) -> str:
        """Set `key` to `value` unless some transaction set it first; the value it has.

        Safe against concurrent claimants (several sidecars starting at once on one
        PostgreSQL database): the insert skips a key that exists, in SQL."""
        if self.connection.dialect.name == "postgresql":
            from sqlalchemy.dialects import postgresql

            statement: Any = postgresql.insert(meta).on_conflict_do_nothing()
        else:
            from sqlalchemy.dialects import sqlite

            statement = sqlite.insert(meta).on_conflict_do_nothing()
        self.connection.execute(statement.values(key=key, value=value))
        claimed = self.get_meta(key)
        assert claimed is not None
        return claimed

    # --- blobs --------------------------------------------------------------
    def add_count(self, digest: str, delta: int) -> int | None:
        """Add `delta` to a blob's count; the new count, or None when there is no row."""
        row = self.connection.execute(
            update(blobs)
            .where(blobs.c.digest == digest)
            .values(
                count=func.max(blobs.c.count + delta, 0)
                if self.dialect == "sqlite"
                else func.greatest(blobs.c.count + delta, 0)
            )
            .returning(blobs.c.count)
        ).first()
        return None if row is None else int(row[0])

    def blob(self, digest: str) -> BlobRow | None:
        row = self.connection.execute(select(blobs).where(blobs.c.digest == digest)).first()
        return None if row is None else BlobRow(**row._mapping)

    def blobs_in(self, digests: Iterable[str], *, lock: bool = False) -> dict[str, BlobRow]:
        """The rows of `digests` that exist; `lock` holds them (`FOR UPDATE`) until the
        transaction ends, so no other writer changes their counts meanwhile."""
        found: dict[str, BlobRow] = {}
        for chunk in _chunks(sorted(set(digests))):
            query = select(blobs).where(blobs.c.digest.in_(chunk))
            if lock:
                query = query.with_for_update()
            for row in self.connection.execute(query):
                found[row.digest] = BlobRow(**row._mapping)
        return found

    def blob_states(self) -> dict[str, BlobState]:
        """digest -> state for every row: the full reconcile compares this with the disk."""
        return {digest: _STATES[state] for digest, state in self.blob_state_values().items()}

    def blob_state_values(self) -> dict[str, str]:
        """digest -> state's value for every row, read through the driver's cursor in
        one fetchall and made a dict in C: a no-op full reconcile at 100k images
        reads 331k rows, and SQLAlchemy's rows and the enum lookup cost more than
        the query (`BlobState` is a StrEnum: the values compare equal to it)."""
        return self._fetch_pairs(f"SELECT digest, state FROM {blobs.name}")

    def _fetch_pairs(self, sql: str) -> dict[Any, Any]:
        """A two-column query as a dict, through the driver's cursor in one fetchall
        and made a dict in C (for whole-table reads: 331k rows at 100k images)."""
        cursor = self.connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(sql)
            return dict(cursor.fetchall())
        finally:
            cursor.close()

    def blobs_with_state(self, state: BlobState) -> list[BlobRow]:
        """The rows in `state`, by digest. Sorted here: ORDER BY digest leads SQLite to
        walk the whole primary key (12x slower at 34k rows than a scan and a sort of
        the few rows found)."""
        query = select(blobs).where(blobs.c.state == state)
        rows = [BlobRow(**row._mapping) for row in self.connection.execute(query)]
        return sorted(rows, key=lambda r: r.digest)

    def insert_blob(self, row: BlobRow) -> None:
        self.connection.execute(insert(blobs).values(**row.__dict__))

    def set_state(self, digest: str, state: BlobState) -> None:
        self._update(digest, state=state)

    def mark_freed(self, digest: str, at: datetime) -> None:
        """Count 0, file moving to the quarantine."""
        self._update(digest, state=BlobState.TRASH, freed_at=at)

    def mark_orphan(self, digest: str, first_seen: datetime) -> None:
        """A quarantined blob an outside tool wrote again: an orphan as of `first_seen`."""
        self._update(digest, state=BlobState.ORPHAN, freed_at=None, first_seen=first_seen)

    def revive(self, digest: str, state: BlobState, media_type: str | None) -> None:
        """Count 0 -> 1 again; `media_type` fills in a type still unknown."""
        values: dict[str, object] = {"state": state, "freed_at": None}
        if media_type is not None:
            values["media_type"] = func.coalesce(blobs.c.media_type, media_type)
        self._update(digest, **values)

    def record_expansion(
        self,
        digest: str,
        *,
        expanded: bool,
        media_type: str | None,
        subject: str | None,
        problem: str | None,
    ) -> None:
        """What reading a manifest-like blob found (its edges go through add_edges)."""
        self._update(
            digest,
            expanded=expanded,
            media_type=media_type,
            subject=subject,
            problem=None if problem is None else problem[:PROBLEM_WIDTH],
        )

    def _update(self, digest: str, **values: object) -> None:
        self.connection.execute(update(blobs).where(blobs.c.digest == digest).values(**values))

    def delete_blob(self, digest: str) -> None:
        self.connection.execute(delete(blobs).where(blobs.c.digest == digest))

    def referrers_of(self, subjects: Iterable[str]) -> set[str]:
        """Digests of the blobs whose `subject` is one of `subjects`."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(subjects))):
            query = select(blobs.c.digest).where(blobs.c.subject.in_(chunk))
            found.update(row[0] for row in self.connection.execute(query))
        return found

    def subjects(self) -> dict[str, str]:
        """digest -> subject of every live referrer."""
        query = select(blobs.c.digest, blobs.c.subject).where(
            blobs.c.subject.is_not(None), blobs.c.count > 0
        )
        return {row[0]: row[1] for row in self.connection.execute(query)}

    def blind_manifests(self) -> list[str]:
        """Live manifests that could not be read at all: nothing is known of what they hold."""
        # No ORDER BY/LIMIT: they would lead SQLite to walk the primary key instead of
        # the (nearly empty) problem index.
        query = select(blobs.c.digest).where(
            blobs.c.problem.is_not(None), blobs.c.count > 0, blobs.c.expanded.is_(False)
        )
        return sorted(row[0] for row in self.connection.execute(query))[:3]

    def troubled(self) -> list[BlobRow]:
        """Referenced blobs that are missing from blobs/ or could not be read (`du`
        flags the images holding them). One pass over the table: neither the state
        nor the count is indexed, and both kinds are rare."""
        query = (
            select(blobs)
            .where(
                blobs.c.count > 0,
                or_(blobs.c.state == BlobState.MISSING, blobs.c.problem.is_not(None)),
            )
            .order_by(blobs.c.digest)
        )
        return [BlobRow(**row._mapping) for row in self.connection.execute(query)]

    def count_problems(self) -> int:
        query = (
            select(func.count())
            .select_from(blobs)
            .where(blobs.c.problem.is_not(None), blobs.c.count > 0)
        )
        return int(self.connection.execute(query).scalar_one())

    # --- edges --------------------------------------------------------------
    def add_edges(self, parent: str, children: Iterable[tuple[str, str]]) -> None:
        """Edges from `parent` to each (child, kind)."""
        rows = [{"parent": parent, "child": c, "kind": k} for c, k in children]
        if rows:
            self.connection.execute(insert(edges), rows)

    def take_edges(self, parent: str) -> list[str]:
        """The children recorded for `parent`, forgetting them (the parent was freed)."""
        gone = self.connection.execute(
            delete(edges).where(edges.c.parent == parent).returning(edges.c.child)
        )
        return [row[0] for row in gone]

    def children(self, parent: str) -> list[tuple[str, str]]:
        query = select(edges.c.child, edges.c.kind).where(edges.c.parent == parent)
        return [(row[0], row[1]) for row in self.connection.execute(query)]

    def parents(self, child: str) -> list[tuple[str, str]]:
        query = select(edges.c.parent, edges.c.kind).where(edges.c.child == child)
        return [(row[0], row[1]) for row in self.connection.execute(query)]

    def below(self, digests: Iterable[str]) -> set[str]:
        """Every blob under `digests` (not the digests themselves unless reached), by
        one recursive query per chunk: the cost is that subtree, not the graph."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(digests))):
            reach = _reach(chunk, up=False)
            found.update(row[0] for row in self.connection.execute(select(reach.c.digest)))
        return found

    def tags_reaching(self, digests: Iterable[str]) -> set[str]:
        """The tags whose entry is one of `digests` or an ancestor of one: the tags
        whose images hold them. Cost: those ancestors (bounded by the answer)."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(digests))):
            reach = _reach(chunk, up=True)
            query = (
                select(roots.c.tag)
                .distinct()
                .where(
                    roots.c.tag.is_not(None),
                    or_(roots.c.digest.in_(chunk), roots.c.digest.in_(select(reach.c.digest))),
                )
            )
            found.update(row[0] for row in self.connection.execute(query))
        return found

    @contextmanager
    def undone(self) -> Iterator[None]:
        """Run the block in a savepoint rolled back at its end: its writes are seen
        inside it only (`du REF` plans a delete per tag this way)."""
        savepoint = self.connection.begin_nested()
        try:
            yield
        finally:
            savepoint.rollback()

    @contextmanager
    def savepoint(self) -> Iterator[None]:
        """Run the block in a savepoint: kept when it ends normally, rolled back
        alone when it raises (the transaction around it goes on)."""
        savepoint = self.connection.begin_nested()
        try:
            yield
        except BaseException:
            savepoint.rollback()
            raise
        savepoint.commit()

    # --- roots --------------------------------------------------------------
    def roots(self) -> list[RootRow]:
        query = select(roots).order_by(roots.c.position)
        return [RootRow(**row._mapping) for row in self.connection.execute(query)]

    def roots_remain(self, removed: Sequence[int]) -> bool:
        """Whether any root is recorded besides those at the `removed` positions."""
        query = select(roots.c.position).where(roots.c.position.not_in(removed)).limit(1)
        return self.connection.execute(query).first() is not None

    def count_roots(self) -> int:
        return int(self.connection.execute(select(func.count()).select_from(roots)).scalar_one())

    def roots_where(
        self,
        *,
        tag: str | None = None,
        digest: str | None = None,
        digests: Iterable[str] | None = None,
        untagged: bool = False,
    ) -> list[RootRow]:
        """Roots matching every condition given, in index.json order."""
        conditions = []
        if tag is not None:
            conditions.append(roots.c.tag == tag)
        if digest is not None:
            conditions.append(roots.c.digest == digest)
        if digests is None:  # sorted here: ORDER BY position would bypass the tag index
            if untagged:
                conditions.append(roots.c.tag.is_(None))
            query = select(roots).where(*conditions)
            rows = [RootRow(**row._mapping) for row in self.connection.execute(query)]
            return sorted(rows, key=lambda r: r.position)
        # By digest, `untagged` applied here: given `tag IS NULL` too, SQLite's planner
        # takes the tag index, which holds every untagged entry of the store.
        found: list[RootRow] = []
        for chunk in _chunks(sorted(set(digests))):
            query = select(roots).where(*conditions, roots.c.digest.in_(chunk))
            found.extend(
                row
                for row in (RootRow(**r._mapping) for r in self.connection.execute(query))
                if not untagged or row.tag is None
            )
        return sorted(found, key=lambda r: r.position)

    def spans_complete(self) -> bool:
        query = select(func.count()).select_from(roots).where(roots.c.start.is_(None))
        return int(self.connection.execute(query).scalar_one()) == 0

    def index_of(self, start: int) -> int:
        """The current position in index.json of the entry recorded at byte `start`."""
        query = select(func.count()).select_from(roots).where(roots.c.start < start)
        return int(self.connection.execute(query).scalar_one())

    def kept_neighbours(self, start: int, removed: Sequence[int]) -> tuple[int | None, int | None]:
        """Recorded end of the closest kept entry before the one recorded at byte `start`,
        and recorded start of the closest after (see `cut_log` for the file's offsets)."""
        kept = roots.c.position.not_in(removed)
        before = self.connection.execute(
            select(roots.c.end)
            .where(roots.c.start < start, kept)
            .order_by(roots.c.start.desc())
            .limit(1)
        ).scalar()
        after = self.connection.execute(
            select(roots.c.start)
            .where(roots.c.start > start, kept)
            .order_by(roots.c.start)
            .limit(1)
        ).scalar()
        return before, after

    # --- the cuts since the spans were recorded (refcount.oci.CutLog) -------------
    def cut_log(self) -> CutLog:
        """The cuts applied to index.json since the recorded spans: a recorded offset
        is the file's once they are subtracted (`CutLog.current`)."""
        query = select(index_cuts.c.at, index_cuts.c.length).order_by(index_cuts.c.at)
        return CutLog(tuple((int(a), int(n)) for a, n in self.connection.execute(query)))

    def record_cuts(self, old: CutLog, new: CutLog) -> None:
        """Store the cuts `new` has beyond `old` (a delete's, as `CutLog.cut` made them)."""
        added = sorted(set(new.cuts) - set(old.cuts))
        if added:
            self.connection.execute(insert(index_cuts), [{"at": a, "length": n} for a, n in added])

    def compact_cuts(self) -> None:
        """Fold the cuts into the recorded spans and forget them, paid once per many
        deletes (planner.COMPACT_AT) and at a parse. The entries between two cuts all
        move by the same amount, so each such interval is one range UPDATE on the
        start index: every row after the first cut is written once, and no row runs
        a subquery (a correlated SUM per row cost ten times as much at 100k roots)."""
        log = self.cut_log()
        bounds = [at for at, _length in log.cuts]
        for i, at in enumerate(bounds):
            shift = log.current(at + 1) - (at + 1)  # minus the cuts up to and with this one
            interval = [roots.c.start > at]
            if i + 1 < len(bounds):
                interval.append(roots.c.start <= bounds[i + 1])
            self.connection.execute(
                update(roots)
                .where(*interval)
                .values(start=roots.c.start + shift, end=roots.c.end + shift)
            )
        if bounds:
            self.clear_cuts()

    def clear_cuts(self) -> None:
        """Forget the cuts (every recorded span was just written anew)."""
        self.connection.execute(delete(index_cuts))

    def root_tags(self, digests: Iterable[str]) -> dict[str, list[str]]:
        tags: dict[str, list[str]] = {}
        for chunk in _chunks(sorted(set(digests))):
            query = (
                select(roots.c.digest, roots.c.tag)
                .where(roots.c.digest.in_(chunk), roots.c.tag.is_not(None))
                .order_by(roots.c.position)
            )
            for row in self.connection.execute(query):
                tags.setdefault(row.digest, []).append(row.tag)
        return tags

    def replace_roots(self, rows: Sequence[RootRow]) -> None:
        """Record `rows` (spans as in the file now) as every root."""
        self.connection.execute(delete(roots))
        self.clear_cuts()
        self.insert_roots(rows)

    def insert_roots(self, rows: Sequence[RootRow]) -> None:
        self.bulk_roots(rows)

    def last_root(self) -> tuple[int, int | None] | None:
        """(position, end of its byte span) of the entry recorded last; None when none."""
        row = self.connection.execute(
            select(roots.c.position, roots.c.end).order_by(roots.c.position.desc()).limit(1)
        ).first()
        return None if row is None else (int(row[0]), row[1])

    def delete_roots(self, positions: Iterable[int]) -> None:
        for chunk in _chunks(sorted(set(positions))):
            self.connection.execute(delete(roots).where(roots.c.position.in_(chunk)))

    def is_empty(self) -> bool:
        """No blob and no root recorded: nothing was ever indexed. Names no column, so
        it reads a schema of any revision (a reader asks before upgrading)."""
        return all(
            self.connection.execute(select(literal(1)).select_from(table).limit(1)).first() is None
            for table in (blobs, roots)
        )

    # --- mass frees -----------------------------------------------------------
    def add_mass_free(self, event: MassFree) -> None:
        self.connection.execute(insert(mass_frees).values(**event.__dict__))

    def held_mass_frees(self, now: datetime) -> list[MassFree]:
        """The mass frees whose blobs gc must still keep, oldest first."""
        query = (
            select(*(mass_frees.c[name] for name in MassFree.__dataclass_fields__))
            .where(mass_frees.c.held_until > now)
            .order_by(mass_frees.c.id)
        )
        return [MassFree(**row._mapping) for row in self.connection.execute(query)]

    # --- leases (SPEC §7) -----------------------------------------------------
    def add_lease(
        self, lease: str, digests: Iterable[str], holder: str, created: datetime, expires: datetime
    ) -> None:
        """Lease each of `digests` under `lease` (a digest already in it is skipped)."""
        held = {
            row[0]
            for row in self.connection.execute(
                select(leases.c.digest).where(leases.c.lease == lease)
            )
        }
        rows = [
            {"lease": lease, "digest": d, "holder": holder, "created": created, "expires": expires}
            for d in dict.fromkeys(digests)
            if d not in held
        ]
        for chunk in _chunks(rows):
            self.connection.execute(insert(leases), list(chunk))

    def drop_lease(self, lease: str) -> None:
        self.connection.execute(delete(leases).where(leases.c.lease == lease))

    def lease_alive(self, lease: str, at: datetime) -> bool:
        query = select(leases.c.digest).where(leases.c.lease == lease, leases.c.expires > at)
        return self.connection.execute(query.limit(1)).first() is not None

    def leased(self, digests: Iterable[str], at: datetime) -> set[str]:
        """Which of `digests` an unexpired lease holds."""
        found: set[str] = set()
        for chunk in _chunks(sorted(set(digests))):
            query = select(leases.c.digest).where(leases.c.digest.in_(chunk), leases.c.expires > at)
            found.update(row[0] for row in self.connection.execute(query))
        return found

    def leases_of(self, digest: str) -> list[LeaseInfo]:
        query = select(leases).where(leases.c.digest == digest).order_by(leases.c.created)
        return [_lease_info(row) for row in self.connection.execute(query)]

    def expired_leases(self, at: datetime) -> list[LeaseInfo]:
        """One row per expired lease (its first blob), oldest first."""
        query = select(leases).where(leases.c.expires <= at).order_by(leases.c.created)
        found: dict[str, LeaseInfo] = {}
        blobs_of: dict[str, int] = {}
        for row in self.connection.execute(query):
            found.setdefault(row.lease, _lease_info(row))
            blobs_of[row.lease] = blobs_of.get(row.lease, 0) + 1
        return [replace(info, blobs=blobs_of[name]) for name, info in found.items()]

    def clear_expired_leases(self, at: datetime) -> None:
        self.connection.execute(delete(leases).where(leases.c.expires <= at))

    def live_lease_names(self, at: datetime) -> set[str]:
        query = select(leases.c.lease).where(leases.c.expires > at).distinct()
        return {row[0] for row in self.connection.execute(query)}

    # --- last use -------------------------------------------------------------
    def touch(self, tags: Iterable[str], at: datetime) -> None:
        """Record that the images of `tags` were used at `at`."""
        for tag in dict.fromkeys(tags):
            done = self.connection.execute(
                update(last_used).where(last_used.c.tag == tag).values(used_at=at)
            )
            if done.rowcount == 0:
                self.connection.execute(insert(last_used).values(tag=tag, used_at=at))

    def last_used(self, tags: Iterable[str]) -> dict[str, datetime]:
        """tag -> when it was last used; tags never touched (nor pushed) are absent."""
        found: dict[str, datetime] = {}
        for chunk in _chunks(sorted(set(tags))):
            query = select(last_used).where(last_used.c.tag.in_(chunk))
            found.update((row.tag, row.used_at) for row in self.connection.execute(query))
        return found

    def forget_use(self, tags: Iterable[str]) -> None:
        for chunk in _chunks(sorted(set(tags))):
            self.connection.execute(delete(last_used).where(last_used.c.tag.in_(chunk)))

    # --- verify records -------------------------------------------------------
    def add_verify_run(self, run: VerifyRun, lap: Lap | None) -> int:
        """Record a verify and its findings (at most FINDINGS_PER_RUN); its id.
        Keeps the newest VERIFY_RUNS_KEPT records."""
        values = {k: v for k, v in run.__dict__.items() if k not in ("id", "findings")}
        if lap is not None:
            values |= {"lap_started": lap.started, "lap_done": lap.done, "lap_total": lap.total}
        run_id = int(
            self.connection.execute(
                insert(verify_runs).values(**values).returning(verify_runs.c.id)
            ).scalar_one()
        )
        rows = [
            {
                "run": run_id,
                "kind": f.kind,
                "digest": f.digest,
                "detail": f.detail[:PROBLEM_WIDTH],
                "tags": json.dumps(list(f.tags))[:PROBLEM_WIDTH],
            }
            for f in run.findings[:FINDINGS_PER_RUN]
        ]
        for chunk in _chunks(rows):
            self.connection.execute(insert(verify_findings), list(chunk))
        oldest_kept = run_id - VERIFY_RUNS_KEPT
        if oldest_kept > 0:
            old = select(verify_runs.c.id).where(verify_runs.c.id <= oldest_kept)
            self.connection.execute(delete(verify_findings).where(verify_findings.c.run.in_(old)))
            self.connection.execute(delete(verify_runs).where(verify_runs.c.id <= oldest_kept))
        return run_id

    def verify_runs(self, *, deep: bool | None = None, last: int | None = None) -> list[VerifyRun]:
        """Recorded verifies, oldest first (the `last` newest when given), without findings."""
        query = select(*(verify_runs.c[n] for n in _RUN_COLUMNS)).order_by(verify_runs.c.id.desc())
        if deep is not None:
            query = query.where(verify_runs.c.deep.is_(deep))
        if last is not None:
            query = query.limit(last)
        rows = [VerifyRun(**row._mapping) for row in self.connection.execute(query)]
        return rows[::-1]

    def verify_findings(self, run: int) -> tuple[Finding, ...]:
        query = (
            select(
                verify_findings.c.kind,
                verify_findings.c.digest,
                verify_findings.c.detail,
                verify_findings.c.tags,
            )
            .where(verify_findings.c.run == run)
            .order_by(verify_findings.c.id)
        )
        return tuple(
            Finding(row.kind, row.digest, row.detail, tuple(json.loads(row.tags)))
            for row in self.connection.execute(query)
        )

    def recorded_lap(self) -> Lap | None:
        """The lap as the last sliced deep verify left it (None before any)."""
        query = (
            select(verify_runs.c.lap_started, verify_runs.c.lap_done, verify_runs.c.lap_total)
            .where(verify_runs.c.sliced.is_(True))
            .order_by(verify_runs.c.id.desc())
            .limit(1)
        )
        row = self.connection.execute(query).first()
        if row is None:
            return None
        return Lap(row.lap_started, self.get_meta(DEEP_CURSOR) or None, row.lap_done, row.lap_total)

    # --- when images were made (retention) ---------------------------------------
    def created_of(self, digests: Iterable[str]) -> dict[str, tuple[datetime | None, str]]:
        """The cached (created, source) of each digest that has a row."""
        found: dict[str, tuple[datetime | None, str]] = {}
        for chunk in _chunks(sorted(set(digests))):
            query = select(
                image_created.c.digest, image_created.c.created, image_created.c.source
            ).where(image_created.c.digest.in_(chunk))
            found.update((r[0], (r[1], r[2])) for r in self.connection.execute(query))
        return found

    def record_created(self, rows: dict[str, tuple[datetime | None, str]]) -> None:
        values = [{"digest": d, "created": c, "source": s} for d, (c, s) in rows.items()]
        for chunk in _chunks(values):
            self.connection.execute(insert(image_created), list(chunk))

    def forget_created(self, digests: Iterable[str]) -> None:
        for chunk in _chunks(sorted(set(digests))):
            self.connection.execute(delete(image_created).where(image_created.c.digest.in_(chunk)))

    def first_seen(self, digests: Iterable[str]) -> dict[str, datetime]:
        found: dict[str, datetime] = {}
        for chunk in _chunks(sorted(set(digests))):
            query = select(blobs.c.digest, blobs.c.first_seen).where(blobs.c.digest.in_(chunk))
            found.update((r[0], r[1]) for r in self.connection.execute(query))
        return found

    # --- journal ------------------------------------------------------------
    def add_actions(self, action: FileAction, digests: Iterable[str], now: datetime) -> None:
        rows = [{"action": action, "digest": d, "created": now} for d in digests]
        if rows:
            self.connection.execute(insert(journal), rows)

    def lock_store(self, key: int) -> None:
        """Wait for the store's advisory lock; held until this transaction ends
        (PostgreSQL only: `engine.with_store_lock`)."""
        self.connection.execute(select(func.pg_advisory_xact_lock(key)))
        self._store_lock = key

    def confirm_store_lock(self) -> None:
        """Just before a change to the store's files: prove the session holding the
        store's advisory lock is still alive (a lost connection gives the lock to
        another host, so the change must not happen). A no-op without the lock."""
        if self._store_lock is not None:
            self.connection.execute(select(func.pg_advisory_xact_lock(self._store_lock)))

    def pending_actions(self, *, claim: bool = False) -> list[Action]:
        """The journal, oldest first. `claim` locks the rows taken and skips rows
        another transaction holds (`FOR UPDATE SKIP LOCKED` on PostgreSQL, so two
        workers never carry out one action; SQLite has one writer and ignores it)."""
        query = select(journal.c.id, journal.c.action, journal.c.digest).order_by(journal.c.id)
        if claim:
            query = query.with_for_update(skip_locked=True)
        return [
            Action(row[0], FileAction(row[1]), row[2]) for row in self.connection.execute(query)
        ]

    def finish_actions(self, ids: Iterable[int]) -> None:
        for chunk in _chunks(sorted(set(ids))):
            self.connection.execute(delete(journal).where(journal.c.id.in_(chunk)))

    # --- bulk rebuild (init of an empty database, verify --repair) ---------------
    def clear_graph(self) -> None:
        """Forget every blob, edge and root (a rebuild writes them again)."""
        for table in (edges, blobs, roots):
            self.connection.execute(delete(table))

    @contextmanager
    def bulk_build(self) -> Iterator[None]:
        """Fill an empty graph fast (init's bulk load): within, `bulk_edges` stages
        edges in a temporary table without an index, and the secondary indexes of
        blobs, edges and roots are gone; on the way out the edges are copied in key
        order and the indexes built again, each with one sort.

        A row inserted into a B-tree far larger than SQLite's page cache costs a
        random page read and write per index: at 100k images that was most of
        init. Everything here is DDL and DML inside the caller's transaction, so
        a crash before its commit leaves the schema and the tables as they were.
        """
        indexes = [index for table in (blobs, edges, roots) for index in table.indexes]
        for index in indexes:
            index.drop(self.connection)
        staged = Table(
            "bulk_edges",
            MetaData(),
            *(Column(c.name, c.type) for c in edges.columns),
            prefixes=["TEMPORARY"],
        )
        staged.create(self.connection)
        self._staged_edges = staged
        try:
            yield
        finally:
            self._staged_edges = None
        columns = [c.name for c in edges.columns]
        self.connection.execute(
            insert(edges).from_select(
                columns, select(staged).order_by(staged.c.parent, staged.c.child)
            )
        )
        staged.drop(self.connection)
        for index in indexes:
            index.create(self.connection)

    def bulk_edges(self, rows: Iterable[tuple[str, str, str]]) -> None:
        """Edges as (parent, child, kind) tuples (see `_bulk_insert`; staged
        within `bulk_build`)."""
        table = edges if self._staged_edges is None else self._staged_edges
        self._bulk_insert(table, ("parent", "child", "kind"), rows)

    def bulk_blobs(self, rows: Iterable[BlobRow]) -> None:
        self._bulk_insert(blobs, _BLOB_COLUMNS, (_blob_values(r) for r in rows))

    def bulk_roots(self, rows: Iterable[RootRow]) -> None:
        self._bulk_insert(roots, _ROOT_COLUMNS, (_root_values(r) for r in rows))

    def _bulk_insert(
        self, table: Table, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        """Insert `rows` (values in `columns` order) through the driver's executemany,
        _BULK rows at a time, never holding more of them.

        init writes about a million rows at 100k images: `insert(table)` with a list
        of dicts spends more time in SQLAlchemy's per-row parameter processing than
        the driver spends inserting. Here each value only goes through its column
        type's bind processor (none for most), so a row is stored exactly as
        `insert()` would store it.
        """
        dialect = self.connection.dialect
        quote = dialect.identifier_preparer.quote
        mark = "?" if dialect.paramstyle == "qmark" else "%s"
        sql = (
            f"INSERT INTO {quote(table.name)} ({', '.join(quote(c) for c in columns)}) "
            f"VALUES ({', '.join(mark for _ in columns)})"
        )
        processors = [
            (i, _memoized(bind))
            for i, name in enumerate(columns)
            if (bind := table.c[name].type.dialect_impl(dialect).bind_processor(dialect))
        ]
        chunk: list[Sequence[Any]] = []
        for row in rows:
            if processors:
                values = list(row)
                for i, processor in processors:
                    values[i] = processor(values[i])
                row = tuple(values)
            chunk.append(row)
            if len(chunk) >= _BULK:
                self.connection.exec_driver_sql(sql, chunk)
                chunk = []
        if chunk:
            self.connection.exec_driver_sql(sql, chunk)

    def counts(self) -> dict[str, int]:
        """digest -> count of every counted blob (see `_fetch_pairs`)."""
        return self._fetch_pairs(f"SELECT digest, count FROM {blobs.name} WHERE count > 0")

    def sizes(self) -> dict[str, int | None]:
        query = select(blobs.c.digest, blobs.c.size).where(blobs.c.count > 0)
        return {row[0]: row[1] for row in self.connection.execute(query)}

    def all_edges(self) -> list[tuple[str, str]]:
        return [
            (r.parent, r.child)
            for r in self.connection.execute(select(edges.c.parent, edges.c.child))
        ]

    def sum_sizes(self, state: BlobState) -> tuple[int, int]:
        query = select(func.count(), func.coalesce(func.sum(blobs.c.size), 0)).where(
            blobs.c.state == state
        )
        number, size = self.connection.execute(query).one()
        return int(number), int(size)


def _reach(digests: Sequence[str], *, up: bool) -> CTE:
    """A recursive query of the blobs below `digests` (above them, with `up`), one
    column `digest`; UNION keeps each once, so a cycle ends."""
    start, step = (edges.c.child, edges.c.parent) if up else (edges.c.parent, edges.c.child)
    reach = select(step.label("digest")).where(start.in_(digests)).cte("reach", recursive=True)
    return reach.union(select(step).where(start == reach.c.digest))


_BULK = 5000
"""Rows per executemany of a bulk insert: large enough that the per-call cost vanishes."""

_BLOB_COLUMNS = (
    "digest",
    "size",
    "media_type",
    "count",
    "state",
    "expanded",
    "subject",
    "problem",
    "first_seen",
    "freed_at",
)
_ROOT_COLUMNS = ("position", "digest", "tag", "media_type", "size", "start", "end")


def _memoized(processor: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A bind processor that converts a value once for a run of rows holding that
    same object (init's rows share one `first_seen`; None stays None)."""
    last: list[Any] = [None, None]

    def process(value: Any) -> Any:
        if value is None:
            return None
        if value is not last[0]:
            last[0], last[1] = value, processor(value)
        return last[1]

    return process


def _blob_values(row: BlobRow) -> tuple[Any, ...]:
    return (
        row.digest,
        row.size,
        row.media_type,
        row.count,
        row.state.value,
        row.expanded,
        row.subject,
        row.problem,
        row.first_seen,
        row.freed_at,
    )


def _root_values(row: RootRow) -> tuple[Any, ...]:
    return (row.position, row.digest, row.tag, row.media_type, row.size, row.start, row.end)


def _lease_info(row: Any) -> LeaseInfo:
    return LeaseInfo(row.lease, row.holder, row.created, row.expires)


_RUN_COLUMNS = tuple(n for n in VerifyRun.__dataclass_fields__ if n != "findings")

__all__ = ["PROBLEM_WIDTH", "Action", "BlobRow", "EdgeRow", "Repo", "RootRow"]
