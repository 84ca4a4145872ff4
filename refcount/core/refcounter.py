"""`Refcounter`: the library's facade, one short method per use case.

Order of effects in every writing operation (containerd's GarbageCollect order):

1. open for writing, take the store's advisory lock, and finish the journal a
   dead process left (`_writing`, `journal.recover`);
2. read index.json (the truth about roots) and catch the database up with it
   (`reconcile.catch_up`);
3. in one database transaction: change counts, record edges, and journal every
   file action decided (the `Ledger`);
4. for a delete: replace index.json atomically, refusing if it changed since
   step 2 (`planner.rewrite_index`);
5. commit, then carry out the journal (`journal.settle`).

A crash before 5 leaves index.json as the truth and the database as it was, so
the next start's catch-up heals it; a crash during 5 leaves journal rows whose
actions are idempotent and re-checked against the committed state, so the next
start finishes them. No file is removed before the commit that decided it.

SIGINT and SIGTERM do not wait for the next start: steps 3 to 5 run in a
`refcount.interrupts.deferred` section, so an interrupted operation is rolled
back whole or finished before the interruption is raised (SPEC §7).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

from refcount import htmlreport, interrupts
from refcount.core import journal, planner, reading, reconcile
from refcount.core import scan as scanning
from refcount.core.ledger import Ledger
from refcount.core.opening import Mode, Opening
from refcount.core.policy import REWRITE_ATTEMPTS, Changes, Policy, Progress, no_progress, now
from refcount.core.sweep import collect
from refcount.db.engine import Engine, current_revision, default_url, transaction
from refcount.db.repo import Repo
from refcount.domain import BlobState
from refcount.errors import ConcurrentChange
from refcount.oci import Digest
from refcount.reports import (
    BlobInfo,
    DeleteReport,
    DuReport,
    Entry,
    GcReport,
    Stats,
    SyncReport,
    TagInfo,
    VerifyReport,
)
from refcount.store import DEFAULT_MAX_MANIFEST, Store, crash_point

log = logging.getLogger("refcount.core")


class Refcounter:
    """Reference counts for one OCI layout, kept in one database.

    Every method is one operation: it takes the store's lock when it writes,
    runs one transaction, and returns a frozen report. Nothing is opened or
    created until the first operation.
    """

    def __init__(
        self,
        store: Store,
        db_url: str | None = None,
        policy: Policy | None = None,
        *,
        progress: Progress | None = None,
    ):
        self.store = store
        self.policy = policy or Policy()
        self.progress: Progress = progress or no_progress
        self.opening = Opening(store, db_url or default_url(store.path), own_db=db_url is None)

    @property
    def engine(self) -> Engine:
        """The database engine, opened for writing unless an operation opened it already."""
        if self.opening.mode is not None and self.opening.engine is not None:
            return self.opening.engine
        return self.opening.writer()

    def close(self) -> None:
        self.opening.close()

    def __enter__(self) -> Refcounter:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def schema_revision(self) -> str | None:
        return current_revision(self.opening.writer())

    # --- the writing sequence ---------------------------------------------------------
    @contextmanager
    def _writing(self) -> Iterator[Engine]:
        """Open for writing, take the store's lock, finish what a dead process left."""
        engine = self.opening.writer()
        with self.store.locked():
            journal.recover(engine, self.store, self._catch_up_in)
            yield engine

    def _ledger(self, repo: Repo) -> Ledger:
        return Ledger(repo, self.store, self.policy)

    def _catch_up_in(self, repo: Repo) -> tuple[int, int]:
        return reconcile.catch_up(self._ledger(repo), self.store.read_index())

    def _settle(self) -> None:
        journal.settle(self.engine, self.store)

    # --- reconcile ----------------------------------------------------------------------
    def init(self) -> SyncReport:
        """Index the store: a bulk build on an empty database, else a full sync."""
        with self._writing() as engine:
            with transaction(engine) as repo:
                empty = repo.index_hash() is None
            if not empty:
                with interrupts.deferred("init"):
                    return self._sync_locked(None)
            snapshot = self.store.read_index()
            found = scanning.scan(self.store, snapshot, self.progress)
            with interrupts.deferred("init"), transaction(engine) as repo:
                scanning.rebuild(repo, found, snapshot.hash)
            report = SyncReport(
                roots_added=len(found.roots),
                became_live=sum(1 for c in found.counts.values() if c > 0),
                missing=found.missing(),
                orphans=tuple(found.orphans()),
                problems=tuple(found.problems),
            )
            reconcile.log_sync("init", report)
            return report

    def sync(self, changes: Changes | None = None) -> SyncReport:
        """Apply what changed on disk since the database last looked.

        With `changes` (from the watcher) only those parts are looked at; without,
        every blob file is compared too. index.json that does not parse raises
        InvalidStore and changes nothing: it is never read as "no roots".
        """
        with self._writing(), interrupts.deferred("sync"):
            return self._sync_locked(changes)

    def _sync_locked(self, changes: Changes | None) -> SyncReport:
        """Callers hold the lock and keep interruptions out (refcount.interrupts): this
        runs from the transaction through the journal, done or not done."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            ledger = self._ledger(repo)
            added, removed = reconcile.catch_up(ledger, snapshot)
            reconcile.files_changed(ledger, changes)
            report = ledger.report(added, removed)
            crash_point("sync-before-commit")
        crash_point("sync-after-commit")
        if report.missing:
            with transaction(self.engine, write=False) as repo:
                reconcile.log_missing(repo, report.missing)
        reconcile.log_sync("sync", report)
        self._settle()
        return report

    def sync_roots(self) -> None:
        """Catch the database up with index.json when it changed (cheap when not)."""
        snapshot = self.store.read_index()
        with transaction(self.engine, write=False) as repo:
            if repo.index_hash() == snapshot.hash:
                return
        # Not `sync()`: this catch-up is not the operation the user asked for.
        with self._writing(), interrupts.deferred():
            self._sync_locked(Changes(index=True))

    # --- delete -------------------------------------------------------------------------
    def delete_tag(self, tag: str, *, dry_run: bool = False) -> DeleteReport:
        """Remove every index.json entry tagged `tag` and free what nothing else needs."""
        return self.delete_tags([tag], dry_run=dry_run)

    def delete_tags(self, tags: list[str], *, dry_run: bool = False) -> DeleteReport:
        """Remove the entries of every tag in `tags`, in one transaction and one
        rewrite of index.json; nothing is deleted unless every tag exists."""
        return self._delete([planner.Select(f"tag {t!r}", tag=t) for t in tags], dry_run)

    def delete_manifest(self, digest: str, *, dry_run: bool = False) -> DeleteReport:
        """Remove every index.json entry pointing at `digest` (tagged or not)."""
        wanted = str(Digest.parse(digest))
        return self._delete([planner.Select(f"manifest {wanted}", digest=wanted)], dry_run)

    def _delete(self, selects: list[planner.Select], dry_run: bool) -> DeleteReport:
        what = ", ".join(s.what for s in selects)
        with self._writing():
            for _attempt in range(REWRITE_ATTEMPTS):
                # index.json rewritten, committed and the journal carried out, or
                # none of it: an interruption waits for the end of the attempt.
                try:
                    with interrupts.deferred(None if dry_run else f"delete {what}"):
                        report = self._delete_once(selects, dry_run)
                        if not dry_run:
                            crash_point("delete-after-commit")
                            self._settle()
                except ConcurrentChange:
                    continue
                return report
        raise ConcurrentChange(f"{self.store.index_path}: kept changing; {what} not deleted")

    def _delete_once(self, selects: list[planner.Select], dry_run: bool) -> DeleteReport:
        """One attempt: catch up, plan, and (unless a dry run) rewrite and commit."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            reconcile.catch_up(self._ledger(repo), snapshot)
            ledger = self._ledger(repo)
            removed = planner.plan(ledger, selects, snapshot)
            report = DeleteReport(
                target=", ".join(s.tag if s.tag is not None else s.digest or "" for s in selects),
                dry_run=dry_run,
                removed=tuple(Entry(repo.index_of(r.start or 0), r.digest, r.tag) for r in removed),
                freed=tuple(ledger.freed),
            )
            if dry_run:
                repo.rollback()
                return report
            planner.rewrite_index(repo, self.store, snapshot, removed)
            crash_point("delete-before-commit")
        log.info(
            "deleted %s: %d entries, %d blobs freed (%d bytes)",
            ", ".join(s.what for s in selects),
            len(report.removed),
            len(report.freed),
            report.freed_bytes,
        )
        return report

    # --- gc -----------------------------------------------------------------------------
    def gc(self, *, dry_run: bool = False, grace: timedelta | None = None) -> GcReport:
        """Sweep orphans older than the grace period; purge trash older than its TTL."""
        with self._writing() as engine, interrupts.deferred(None if dry_run else "gc"):
            if not dry_run:
                self._sync_locked(None)
            with transaction(engine) as repo:
                grace = self.policy.grace if grace is None else grace
                report = collect(self._ledger(repo), grace, dry_run=dry_run)
                if dry_run:
                    repo.rollback()
                    return report
            crash_point("gc-after-commit")
            self._settle()
            return report

    # --- verify -------------------------------------------------------------------------
    def verify(self, *, deep: bool = False, repair: bool = False) -> VerifyReport:
        """Recount from scratch and compare with the database (SPEC §5).

        The database first catches up with index.json, as for every command, so an
        outside change since the last sync is never reported as drift. On a store
        this process cannot write it cannot catch up: the report then says how
        many entries it is behind (`behind`) instead of comparing counts.
        `repair` rewrites the database to match the disk; it never deletes content.
        """
        if repair:
            self.opening.writer()
        else:
            self.opening.reader()
        if self.opening.mode is Mode.READ:
            return self._verify(deep, repair=False)
        with self._writing():
            if not repair:
                with interrupts.deferred():
                    self._sync_locked(Changes(index=True))
            return self._verify(deep, repair)

    def _verify(self, deep: bool, repair: bool) -> VerifyReport:
        snapshot = self.store.read_index()
        found = scanning.scan(self.store, snapshot, self.progress)
        with (
            interrupts.deferred("verify --repair") if repair else nullcontext(),
            transaction(self.engine, write=repair) as repo,
        ):
            behind = 0
            if self.opening.mode is Mode.READ and repo.index_hash() != snapshot.hash:
                behind = reconcile.entries_changed(repo.roots(), found.roots)
            drift = () if behind else scanning.drift(repo, found)
            if repair and drift:
                scanning.rebuild(repo, found, snapshot.hash)
                log.warning("verify --repair: %d counts rewritten from the disk", len(drift))
            trash = repo.blobs_with_state(BlobState.TRASH)
            freed_at = {r.freed_at for r in trash}
            held = tuple(m for m in repo.held_mass_frees(now()) if m.at in freed_at)
        return scanning.report(
            found,
            deep=deep,
            repaired=repair and bool(drift),
            drift=drift,
            trash=trash,
            corrupt=scanning.check_content(self.store, found, self.progress) if deep else (),
            behind=behind,
            mass_frees=held,
            quarantined=self.store.list_trash(),
        )

    # --- reading ------------------------------------------------------------------------
    def _current(self) -> Engine:
        """The engine of a reading operation, caught up with index.json when it can be."""
        engine = self.opening.reader()
        if self.opening.mode is Mode.WRITE:
            self.sync_roots()
        return engine

    def tags(self, *, include_untagged: bool = False) -> list[TagInfo]:
        """Every tag in index.json order, with the bytes of its whole image (see
        `reading.tags`)."""
        with transaction(self._current(), write=False) as repo:
            return reading.tags(repo, include_untagged=include_untagged)

    def du(self, refs: list[str] | None = None) -> DuReport:
        """Each tag's total, exclusive and shared bytes, and the store's totals (see
        `reading.du`); `refs` names the tags to list (all when None or empty)."""
        with transaction(self._current(), write=False) as repo:
            return reading.du(repo, self.store, refs or None, now(), self.policy)

    def write_du_html(self, report: DuReport, path: str | Path) -> Path:
        """Write `report` as one self-contained HTML page at `path` (see
        `refcount.htmlreport`), atomically; returns the file's absolute path.
        CannotWriteOutput when it cannot be written there (`Store.write_output`)."""
        page = htmlreport.render(report, store=str(self.store.path), made_at=now())
        return self.store.write_output(path, page.encode("utf-8"))

    def show(self, ref: str) -> BlobInfo:
        """Why a blob (a digest, or the manifest a tag points at) is alive."""
        with transaction(self._current(), write=False) as repo:
            return reading.show(repo, self.store, ref)

    def count(self, digest: str) -> int:
        """The recorded reference count of a blob (0 when unknown)."""
        with transaction(self.opening.reader(), write=False) as repo:
            row = repo.blob(str(Digest.parse(digest)))
            return 0 if row is None else row.count

    def stats(self) -> Stats:
        with transaction(self.opening.reader(), write=False) as repo:
            return reading.stats(repo)


def open(
    store: str | Path,
    db: str | None = None,
    *,
    trash_ttl: timedelta | None = None,
    grace: timedelta | None = None,
    keep_referrers: bool = False,
    keep_untagged: bool = False,
    max_manifest: int = DEFAULT_MAX_MANIFEST,
    mass_free_threshold: float | None = None,
    progress: Progress | None = None,
) -> Refcounter:
    """Open a store's reference counts; the database is created or upgraded by the
    first operation that writes."""
    defaults = Policy()
    policy = replace(
        defaults,
        trash_ttl=defaults.trash_ttl if trash_ttl is None else trash_ttl,
        grace=defaults.grace if grace is None else grace,
        keep_referrers=keep_referrers,
        keep_untagged=keep_untagged,
        max_manifest=max_manifest,
        mass_free_threshold=defaults.mass_free_threshold
        if mass_free_threshold is None
        else mass_free_threshold,
    )
    return Refcounter(Store(store, max_manifest=max_manifest), db, policy, progress=progress)
