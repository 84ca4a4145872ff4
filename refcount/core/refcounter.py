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
import os
import time
import uuid
from collections import Counter
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import replace
from datetime import datetime, timedelta
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

from refcount import interrupts
from refcount.core import grouping, journal, planner, reading, reconcile
from refcount.core.grouping import DeleteRequest
from refcount.core.ledger import Ledger
from refcount.core.opening import Mode, Opening
from refcount.core.policy import (
    LEASE_TTL,
    REWRITE_ATTEMPTS,
    Changes,
    Policy,
    Progress,
    no_progress,
    now,
)
from refcount.core.sweep import collect
from refcount.db.engine import (
    Engine,
    current_revision,
    default_url,
    environment_url,
    retry_contention,
    transaction,
)
from refcount.db.repo import Repo
from refcount.domain import BlobState
from refcount.errors import (
    ConcurrentChange,
    InvalidOption,
    LeaseExpired,
    NotFound,
    PlanChanged,
    RefcountError,
)
from refcount.extractors import installed
from refcount.layout import policy_path
from refcount.oci import Descriptor, Digest, parse_index, usable_tag
from refcount.reports import (
    BlobInfo,
    BlobRef,
    DeleteReport,
    DuReport,
    Entry,
    GcReport,
    LeaseInfo,
    PluginsReport,
    Pruned,
    PruneReport,
    PushReport,
    Stats,
    SyncReport,
    TagInfo,
    TouchReport,
    VerifyReport,
    VerifyStatus,
)
from refcount.store import DEFAULT_MAX_MANIFEST, Store, crash_point

# The use cases a delete never reaches (push and its sources' tarfile, prune and its
# policy file's tomllib, verify, scan's pool, the HTML page) are imported by the
# methods that run them: every command pays the start-up of what it imports.
if TYPE_CHECKING:
    from refcount.core import pruning, verifying
    from refcount.core import push as pushing
    from refcount.core import scan as scanning
    from refcount.core.retention import PrunePolicy

log = logging.getLogger("refcount.core")
T = TypeVar("T")
P = ParamSpec("P")


def _retried(
    operation: Callable[Concatenate[Refcounter, P], T],
) -> Callable[Concatenate[Refcounter, P], T]:
    """Run a writing operation again when PostgreSQL aborted it for a deadlock or a
    serialization failure (bounded and logged: `engine.retry_contention`). Each
    attempt is a whole operation: nothing of a failed one was committed."""

    @wraps(operation)
    def retrying(self: Refcounter, /, *args: P.args, **kwargs: P.kwargs) -> T:
        return retry_contention(
            lambda: operation(self, *args, **kwargs), f"{self.store.path}: {operation.__name__}"
        )

    return retrying


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
        schema: str | None = None,
    ):
        self.store = store
        self.policy = policy or Policy()
        self.progress: Progress = progress or no_progress
        db_url = db_url or environment_url()
        self.opening = Opening(
            store, db_url or default_url(store.path), own_db=db_url is None, schema=schema
        )

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
    @_retried
    def init(self) -> SyncReport:
        """Index the store: a bulk build on an empty database, else a full sync."""
        from refcount.core import scan as scanning

        with self._writing() as engine:
            with transaction(engine) as repo:
                empty = repo.index_hash() is None
            if not empty:
                with interrupts.deferred("init"):
                    return self._sync_locked(None)
            snapshot = self.store.read_index()
            # Done or not done: the load stops at an interruption (`section.check`
            # between batches of blobs) and the whole of it rolls back.
            with interrupts.deferred("init") as section, transaction(engine) as repo:
                found = scanning.load(
                    repo,
                    self.store,
                    snapshot,
                    self.progress,
                    self.policy.timeout_seconds,
                    check=section.check,
                )
            report = SyncReport(
                roots_added=len(found.roots),
                became_live=sum(1 for c in found.counts.values() if c > 0),
                missing=found.missing(),
                orphans=tuple(found.orphans()),
                problems=tuple(found.problems),
            )
            reconcile.log_sync("init", report)
            return report

    @_retried
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

    @_retried
    def _delete(self, selects: list[planner.Select], dry_run: bool) -> DeleteReport:
        what = ", ".join(s.what for s in selects)
        with self._writing():
            report, _ = self._delete_locked(
                lambda _repo: (selects, None), dry_run, f"delete {what}"
            )
            return report

    def _delete_locked(
        self,
        choose: Callable[[Repo], tuple[list[planner.Select], T]],
        dry_run: bool,
        label: str,
    ) -> tuple[DeleteReport, T]:
        """Delete what `choose` selects, once the database has caught up with
        index.json; `choose` also answers a value of its own (prune's plan),
        returned with the report. `label` names the operation to an interruption.
        The caller holds the lock."""
        what = "the selection"
        for _attempt in range(REWRITE_ATTEMPTS):
            # index.json rewritten, committed and the journal carried out, or
            # none of it: an interruption waits for the end of the attempt.
            try:
                with interrupts.deferred(None if dry_run else label):
                    report, chosen, what = self._delete_once(choose, dry_run)
                    if not dry_run:
                        crash_point("delete-after-commit")
                        self._settle()
            except PlanChanged:
                raise
            except ConcurrentChange:
                continue
            return report, chosen
        raise ConcurrentChange(f"{self.store.index_path}: kept changing; {what} not deleted")

    def _delete_once(
        self, choose: Callable[[Repo], tuple[list[planner.Select], T]], dry_run: bool
    ) -> tuple[DeleteReport, T, str]:
        """One attempt: catch up, choose, plan, and (unless a dry run) rewrite and commit."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            reconcile.catch_up(self._ledger(repo), snapshot)
            selects, chosen = choose(repo)
            what = ", ".join(s.what for s in selects)
            ledger = self._ledger(repo)
            removed = planner.plan(ledger, selects, snapshot) if selects else []
            report = DeleteReport(
                target=", ".join(s.tag if s.tag is not None else s.digest or "" for s in selects),
                dry_run=dry_run,
                removed=tuple(Entry(repo.index_of(r.start or 0), r.digest, r.tag) for r in removed),
                freed=tuple(ledger.freed),
            )
            if dry_run or not removed:
                repo.rollback()
                return report, chosen, what
            repo.forget_created(b.digest for b in ledger.freed)
            planner.rewrite_index(repo, self.store, snapshot, removed)
            gone = {r.tag for r in removed if r.tag is not None}
            repo.forget_use(t for t in gone if not repo.roots_where(tag=t))
            crash_point("delete-before-commit")
        log.info(
            "deleted %s: %d entries, %d blobs freed (%d bytes)",
            what,
            len(report.removed),
            len(report.freed),
            report.freed_bytes,
        )
        return report, chosen, what

    # --- group commit -------------------------------------------------------------------
    @_retried
    def delete_groups(
        self, requests: Sequence[DeleteRequest]
    ) -> list[DeleteReport | RefcountError]:
        """Carry out several deletes in one transaction and one rewrite of index.json
        (a daemon's group commit, `refcount.group`); returns, per request, its
        report or the error it failed with alone (`grouping.ALONE`: a missing tag,
        a refused image; the others still run). The result is what the requests
        would give run one after another in this order (see `core.grouping`).
        Errors that concern them all (an invalid store, a database error, a store
        that kept changing) are raised. Never a dry run: those run alone."""
        if not requests:
            return []
        what = "; ".join(", ".join(s.what for s in r.selects()) for r in _valid(requests))
        with self._writing():
            for _attempt in range(REWRITE_ATTEMPTS):
                try:
                    with interrupts.deferred(f"delete {what}"):
                        results = self._delete_group_once(requests)
                        crash_point("delete-after-commit")
                        self._settle()
                except ConcurrentChange:
                    continue
                return results
        raise ConcurrentChange(f"{self.store.index_path}: kept changing; {what} not deleted")

    def _delete_group_once(
        self, requests: Sequence[DeleteRequest]
    ) -> list[DeleteReport | RefcountError]:
        """One attempt of `delete_groups`: catch up once, plan each request in its
        savepoint, rewrite index.json once for all, commit."""
        snapshot = self.store.read_index()
        with transaction(self.engine) as repo:
            reconcile.catch_up(self._ledger(repo), snapshot)
            results = grouping.plan_each(repo, requests, snapshot, lambda: self._ledger(repo))
            planned = [r for r in results if isinstance(r, grouping.Planned)]
            if not planned:
                repo.rollback()
                return [r for r in results if isinstance(r, RefcountError)]
            removed = grouping.restore(repo, planned)
            planner.rewrite_index(repo, self.store, snapshot, removed)
            gone = {r.tag for r in removed if r.tag is not None}
            repo.forget_use(t for t in gone if not repo.roots_where(tag=t))
            crash_point("delete-before-commit")
        for done in planned:
            report = done.report
            log.info(
                "deleted %s: %d entries, %d blobs freed (%d bytes)",
                done.what,
                len(report.removed),
                len(report.freed),
                report.freed_bytes,
            )
        log.debug("group commit: %d of %d deletes in one rewrite", len(planned), len(results))
        return [r.report if isinstance(r, grouping.Planned) else r for r in results]

    # --- prune --------------------------------------------------------------------------
    @_retried
    def prune(
        self,
        rules: PrunePolicy,
        *,
        dry_run: bool = False,
        expect: Collection[str] | None = None,
        policy_file: str | None = None,
    ) -> PruneReport:
        """Delete what the retention `rules` choose (`retention` says how they
        combine), in one transaction and one rewrite of index.json, through the
        same path as `delete tag`.

        The creation times of the eligible tags are read from their manifests
        (and configs) only once: the first prune records them (its own committed
        transaction, so a dry run records them too). With `expect` (the plan a
        dry run showed: tags, and digests of untagged entries), nothing is
        deleted unless the plan is still exactly that (ConcurrentChange).
        """
        from refcount.core import pruning

        with self._writing():
            with interrupts.deferred(), transaction(self.engine) as repo:
                reconcile.catch_up(self._ledger(repo), self.store.read_index())
                pruning.cache_created(repo, self.store, rules)

            def choose(repo: Repo) -> tuple[list[planner.Select], pruning.Plan]:
                plan = pruning.choose(repo, rules, self.policy, now(), self.store.free_space)
                keys = {c.candidate.key for c in plan.choices}
                if expect is not None and keys != set(expect):
                    raise PlanChanged(
                        f"{self.store.index_path}: the store changed since the plan was "
                        "shown; nothing pruned (run prune again)"
                    )
                return plan.selects, plan

            report, plan = self._delete_locked(choose, dry_run, "prune")
        return PruneReport(
            dry_run=dry_run,
            chosen=tuple(
                Pruned(
                    c.candidate.tag,
                    c.candidate.digest,
                    c.candidate.created,
                    c.candidate.created_from,
                    str(c.reason),
                )
                for c in plan.choices
            ),
            removed=report.removed,
            freed=report.freed,
            live_before=plan.live,
            budget_met=plan.budget_met,
            policy_file=policy_file,
        )

    def policy_rules(self) -> tuple[PrunePolicy, str] | None:
        """The rules in STORE/.refcount/policy.toml and the file's name, or None when
        there is no such file; InvalidPolicy when it cannot be applied."""
        from refcount.core import policyfile

        data = self.store.read_policy()
        if data is None:
            return None
        where = str(policy_path(self.store.path))
        return policyfile.parse(data, where), where

    def prune_by_file(self, *, dry_run: bool = False) -> PruneReport | None:
        """`prune` with the store's policy file, or None when it has none."""
        found = self.policy_rules()
        if found is None:
            return None
        rules, where = found
        return self.prune(rules, dry_run=dry_run, policy_file=where)

    # --- gc -----------------------------------------------------------------------------
    @_retried
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
            self._drop_dead_staging()
            return report

    def _drop_dead_staging(self) -> None:
        """Remove the staging directories of pushes whose lease is gone or expired
        (killed pushes); called with the lock held, after expired leases are cleared."""
        staged = self.store.staged_leases()
        if not staged:
            return
        with transaction(self.engine, write=False) as repo:
            alive = repo.live_lease_names(now())
        for lease in staged:
            if lease not in alive:
                self.store.drop_staging(lease)

    # --- push and leases (SPEC §7) ---------------------------------------------------
    @contextmanager
    def lease(
        self, digests: Iterable[str], *, ttl: timedelta = LEASE_TTL, holder: str | None = None
    ) -> Iterator[LeaseInfo]:
        """Hold `digests` for the block: no delete, prune, gc or daemon frees them, and a
        quarantined one is kept for the root that will need it (it is restored when
        that root is counted). For a tool that writes blobs and then its index.json
        entry itself: take the lease before deciding to reuse a blob, `sync` once
        the entry is written, then leave the block. The lease ends with the block,
        or at `ttl` if the process dies first.
        """
        wanted = [str(Digest.parse(d)) for d in digests]
        created = now()
        info = LeaseInfo(
            uuid.uuid4().hex,
            holder or f"pid {os.getpid()}",
            created,
            created + ttl,
            len(set(wanted)),
        )
        with self._writing() as engine, transaction(engine) as repo:
            repo.add_lease(info.lease, wanted, info.holder, info.created, info.expires)
        try:
            yield info
        finally:
            with transaction(self.engine) as repo:
                repo.drop_lease(info.lease)

    def push(
        self,
        source: str,
        *,
        tag: str | None = None,
        referrers: bool = True,
        every_platform: bool = True,
        lease_ttl: timedelta = LEASE_TTL,
    ) -> PushReport:
        """Copy an image into the store from `DIR:REF` or `oci-archive:FILE[:REF]`
        (`refcount.core.push` gives the order of effects). The new root is tagged
        `tag`, else with the source's ref name (untagged for a digest); a tag that
        exists moves, freeing what only its old image held. An image index brings
        every platform manifest (without `every_platform`: only this host's, which
        becomes the root); `referrers` brings the source's referrers of every
        manifest pushed, as untagged entries.
        """
        from refcount.core import push as pushing
        from refcount.sources import open_source

        if tag is not None and not usable_tag(tag):
            raise InvalidOption(f"{tag!a}: not a usable tag: empty or has control characters")
        self.opening.writer()
        self.sync_roots()  # an invalid index.json is refused before anything is copied
        reader, ref = open_source(source)
        try:
            plan = pushing.plan(
                reader,
                ref,
                tag,
                self.policy.max_manifest,
                referrers=referrers,
                every_platform=every_platform,
                extractor_timeout=self.policy.timeout_seconds,
            )
            holder = f"push {source} (pid {os.getpid()})"
            with self.lease(plan.digests, ttl=lease_ttl, holder=holder) as lease:
                crash_point("push-after-lease")
                to_copy = [
                    d
                    for d in plan.digests
                    if self.store.blob_file(d) is None and not self.store.in_trash(d)
                ]
                copied = pushing.stage(self.store, reader, plan, lease.lease, to_copy)
                crash_point("push-before-index")
                return self._land(plan, lease, copied)
        finally:
            reader.close()

    def _land(self, plan: pushing.Plan, lease: LeaseInfo, copied: list[BlobRef]) -> PushReport:
        from refcount.core import push as pushing

        tag = plan.tag
        with self._writing():
            for _attempt in range(REWRITE_ATTEMPTS):
                try:
                    with interrupts.deferred(f"push {plan.source}"):
                        snapshot = self.store.read_index()
                        with transaction(self.engine) as repo:
                            ledger = self._ledger(repo)
                            if not repo.lease_alive(lease.lease, ledger.now):
                                raise LeaseExpired(
                                    f"{plan.source}: the push outlived its lease "
                                    f"(expired {lease.expires:%H:%M:%S} UTC); nothing added: "
                                    "push again (with a longer --lease-ttl)"
                                )
                            reconcile.catch_up(ledger, snapshot)
                            landed = pushing.land(ledger, snapshot, plan, tag)
                            repo.drop_lease(lease.lease)
                            if tag is not None:
                                repo.touch([tag], ledger.now)
                            crash_point("push-before-commit")
                        self._settle()
                except ConcurrentChange:
                    continue
                report = PushReport(
                    source=plan.source,
                    tag=tag,
                    digest=plan.digest,
                    added=landed.added,
                    copied=tuple(copied),
                    reused=len(plan.blobs) - len(copied),
                    restored=tuple(sorted(ledger.restored)),
                    replaced=landed.replaced,
                    freed=tuple(ledger.freed),
                )
                log.info(
                    "pushed %s as %s: %d blobs copied (%d bytes), %d reused",
                    plan.source,
                    tag or plan.digest,
                    len(report.copied),
                    report.copied_bytes,
                    report.reused,
                )
                return report
        raise ConcurrentChange(f"{self.store.index_path}: kept changing; {plan.source} not added")

    # --- last use -----------------------------------------------------------------------
    @_retried
    def touch(self, ref: str) -> TouchReport:
        """Record that the image `ref` (a tag, or a digest: every tag pointing at it)
        was used now: what a runtime or a cache calls when it pulls from the store.
        `prune --unused-for` selects on it; `du` and `tags` show it."""
        self.opening.writer()
        self.sync_roots()
        with transaction(self.engine) as repo:
            digest = reading.resolve(repo, self.store, ref)
            named = [r.tag for r in repo.roots_where(tag=ref)] or [
                r.tag for r in repo.roots_where(digest=digest) if r.tag is not None
            ]
            tags = tuple(dict.fromkeys(t for t in named if t is not None))
            if not tags:
                raise NotFound(
                    f"{ref}: no tag in {self.store.index_path} points at it; "
                    "last use is recorded per tag"
                )
            at = now()
            repo.touch(tags, at)
        return TouchReport(ref, tags, at)

    def last_used(self, tags: Iterable[str]) -> dict[str, datetime]:
        """tag -> when it was last used (touched or pushed); tags never used are absent."""
        with transaction(self.opening.reader(), write=False) as repo:
            return repo.last_used(tags)

    # --- verify -------------------------------------------------------------------------
    @_retried
    def verify(
        self,
        *,
        deep: bool = False,
        repair: bool = False,
        max_blobs: int | None = None,
        max_duration: timedelta | None = None,
        recount: bool = True,
    ) -> VerifyReport:
        """Recount from scratch and compare with the database (SPEC §5); record it.

        The database first catches up with index.json, as for every command, so an
        outside change since the last sync is never reported as drift. On a store
        this process cannot write it cannot catch up: the report then says how
        many entries it is behind (`behind`) instead of comparing counts, and
        nothing is recorded. `repair` rewrites the database to match the disk; it
        never deletes content.

        `deep` also hashes blobs, outside the store's lock (writers go on; a blob
        freed meanwhile is skipped): all of them, or with `max_blobs` and/or
        `max_duration` one slice of the deep lap (`refcount.core.verifying`).
        `recount=False` (deep only) skips the recount and never takes the lock:
        the files are listed, sizes compared with the database's, and only
        corrupt blobs are reported (the daemon's deep slices: its shallow
        verifies recount).
        """
        from refcount.core import scan as scanning
        from refcount.core import verifying

        verifying.check_options(
            deep=deep,
            repair=repair,
            max_blobs=max_blobs,
            max_duration=max_duration,
            recount=recount,
        )
        at, started = now(), time.monotonic()
        if repair:
            self.opening.writer()
        else:
            self.opening.reader()
        sliced = max_blobs is not None or max_duration is not None
        deadline = None if max_duration is None else started + max_duration.total_seconds()
        with ExitStack() as stack:
            planned: list[tuple[verifying.Slice, scanning.Hashing]] = []

            def hash_meanwhile(files: Collection[str]) -> None:
                """Start hashing as soon as the files are listed: the pool of
                processes works while this one recounts."""
                with transaction(self.engine, write=False) as repo:
                    plan = verifying.plan_slice(repo if sliced else None, files, max_blobs, at)
                hashing = scanning.hashing(self.store, plan.todo, deadline)
                planned.append((plan, stack.enter_context(hashing)))

            listed = hash_meanwhile if deep else None
            if not recount:
                found, report = self._listing(listed)
            elif self.opening.mode is Mode.READ:
                found, report = self._verify(repair=False, listed=listed)
            else:
                with self._writing():
                    if not repair:
                        with interrupts.deferred():
                            self._sync_locked(Changes(index=True))
                    found, report = self._verify(repair, listed)
            if planned:
                report = self._hash(found, report, *planned[0], sliced)
        if self.opening.mode is Mode.READ:
            return report
        with interrupts.deferred(), transaction(self.engine) as repo:
            if report.lap is not None:
                verifying.save_lap(repo, report.lap)
            run = verifying.record(repo, report, at, time.monotonic() - started)
        return replace(report, run=run)

    def _verify(
        self, repair: bool, listed: scanning.Listed | None = None
    ) -> tuple[scanning.Scan, VerifyReport]:
        """The shallow verify: recount and compare (callers hold the lock when writable).
        `listed`: see `scanning.scan`."""
        from refcount.core import scan as scanning
        from refcount.core import verifying

        snapshot = self.store.read_index()
        found = scanning.scan(
            self.store, snapshot, self.progress, self.policy.timeout_seconds, listed
        )
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
            report = scanning.report(
                found,
                deep=False,
                repaired=repair and bool(drift),
                drift=drift,
                trash=trash,
                corrupt=(),
                behind=behind,
                mass_frees=held,
                quarantined=self.store.list_trash(),
                expired_leases=tuple(repo.expired_leases(now())),
            )
            needed = verifying.needed_by(repo, report.missing)
        return found, replace(report, needed_by=needed)

    def _listing(self, listed: scanning.Listed | None) -> tuple[scanning.Scan, VerifyReport]:
        """What a deep run without its recount hashes: every file in blobs/, with the
        sizes the database holds for the live ones (no lock taken)."""
        from refcount.core import scan as scanning

        files, _problems = self.store.list_blobs()  # reported by the recounting verifies
        if listed is not None:
            listed(files)
        with transaction(self.engine, write=False) as repo:
            sizes = repo.sizes()
            roots = repo.count_roots()
        hints = {d: Descriptor(d, None, size) for d, size in sizes.items() if size is not None}
        found = scanning.Scan((), Counter(), files, hints)
        return found, VerifyReport(
            deep=False, repaired=False, roots=roots, live=len(sizes), recounted=False
        )

    def _hash(
        self,
        found: scanning.Scan,
        report: VerifyReport,
        plan: verifying.Slice,
        hashing: scanning.Hashing,
        sliced: bool,
    ) -> VerifyReport:
        """The deep part: the hashes of every blob, or of the lap's next slice,
        started when the files were listed (no lock held)."""
        from refcount.core import scan as scanning
        from refcount.core import verifying

        hashed = scanning.check_content(self.store, found, self.progress, hashing)
        if hashed.skipped:
            log.debug("verify --deep: %d blobs freed meanwhile, skipped", len(hashed.skipped))
        with transaction(self.engine, write=False) as repo:
            needed = verifying.needed_by(
                repo, [*report.missing, *(c.digest for c in hashed.corrupt)]
            )
        last = hashed.checked[-1] if hashed.checked else None
        lap = verifying.lap_after(plan.present, plan.cursor, last, plan.started)
        return replace(
            report,
            deep=True,
            corrupt=hashed.corrupt,
            checked=len(hashed.checked) - len(hashed.skipped),
            sliced=sliced,
            after=plan.cursor,
            lap=lap if sliced else None,
            needed_by=needed,
        )

    def verify_status(self) -> VerifyStatus:
        """The latest shallow and deep verify and the deep lap, as recorded; runs nothing."""
        from refcount.core import verifying

        with transaction(self.opening.reader(), write=False) as repo:
            return verifying.status(repo)

    # --- reading ------------------------------------------------------------------------
    def _current(self) -> Engine:
        """The engine of a reading operation, caught up with index.json when it can be."""
        engine = self.opening.reader()
        if self.opening.mode is Mode.WRITE:
            self.sync_roots()
        return engine

    def tag_names(self) -> frozenset[str]:
        """The tags index.json holds now, read from the file (the database is not
        asked: a store never indexed has them too)."""
        index = parse_index(self.store.read_index().data, str(self.store.index_path))
        return frozenset(root.tag for root in index.roots if root.tag is not None)

    def tags(self, *, include_untagged: bool = False) -> list[TagInfo]:
        """Every tag in index.json order, with the bytes of its whole image (see
        `reading.tags`)."""
        with transaction(self._current(), write=False) as repo:
            return reading.tags(repo, include_untagged=include_untagged)

    def du(self, refs: list[str] | None = None) -> DuReport:
        """Each tag's total, exclusive and shared bytes, and the store's totals (see
        `reading.du`); `refs` names the tags to list (all when None or empty).

        Named tags cost their images only (`reading.du_selected`: each one's
        `delete tag --dry-run` plan, rolled back), and the report's `shared` and
        `untagged` totals are None. On a store this process may not write, a plan
        cannot be made: named tags are then measured on the whole graph, as all."""
        engine = self._current()
        if refs and self.opening.mode is Mode.WRITE:
            with transaction(engine) as repo:
                report = reading.du_selected(repo, self.store, refs, now(), self.policy)
                repo.rollback()
                return report
        with transaction(engine, write=False) as repo:
            return reading.du(repo, self.store, refs or None, now(), self.policy)

    def write_du_html(self, report: DuReport, path: str | Path) -> Path:
        """Write `report` as one self-contained HTML page at `path` (see
        `refcount.htmlreport`), atomically; returns the file's absolute path.
        CannotWriteOutput when it cannot be written there (`Store.write_output`)."""
        from refcount import htmlreport

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


def _valid(requests: Sequence[DeleteRequest]) -> list[DeleteRequest]:
    """The requests whose selection can be spelled (a malformed digest fails alone)."""
    valid = []
    for request in requests:
        try:
            request.selects()
        except grouping.ALONE:
            continue
        valid.append(request)
    return valid


def plugins() -> PluginsReport:
    """The extractor plug-ins this process loaded: names, packages, media types, errors."""
    return installed().report()


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
    extractor_timeout: timedelta | None = None,
    progress: Progress | None = None,
    schema: str | None = None,
) -> Refcounter:
    """Open a store's reference counts; the database is created or upgraded by the
    first operation that writes.

    `schema` keeps the counts in that schema of a PostgreSQL `db` (one database
    for many repositories: `refcount.roots.Repository.schema`)."""
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
        extractor_timeout=extractor_timeout or defaults.extractor_timeout,
    )
    return Refcounter(
        Store(store, max_manifest=max_manifest), db, policy, progress=progress, schema=schema
    )
