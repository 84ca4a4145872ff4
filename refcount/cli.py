"""The command line: a thin Typer layer over `refcount.Refcounter`.

Each command parses its options, calls one library method and renders one
report. `_run()` is the only place that turns errors into messages and exit
codes (SPEC §4): 0 success, 1 a problem found or a name that does not exist,
2 usage or input error, 3 an internal error (a bug: the traceback is logged
with -v, never shown otherwise), 130 interrupted (SIGINT, SIGTERM, or a daemon's
client that went away; see `refcount.interrupts`).

The same boundary serves two callers. `main()` is a process of its own: it
configures logging and runs one command. `serve_request()` runs one command
inside a `refcount watch` daemon on behalf of `refcount.client` (SPEC §6) and
returns what the command printed instead of printing it; `watch` hands it to
the daemon, so the daemon never imports this module and both paths run the
very same commands, renderers and error mapping.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from refcount import interrupts, roots
from refcount.argv import GLOBAL_FLAGS, GLOBAL_VALUE_OPTIONS, asks_for_json, normalise
from refcount.core import DeleteRequest, Progress, Refcounter, sync_log
from refcount.core import open as open_store
from refcount.core import plugins as installed_plugins
from refcount.durations import parse_amount, parse_duration
from refcount.errors import ExitCode, InvalidDuration, InvalidPolicy, NotServed, RefcountError
from refcount.group import GroupCommit, Withdrawn
from refcount.layout import policy_path
from refcount.reports import (
    BlobInfo,
    DeleteBatch,
    DeleteReport,
    DuReport,
    GcReport,
    Lap,
    LeaseInfo,
    MassFree,
    PluginsReport,
    PruneReport,
    PushReport,
    RootReport,
    SyncReport,
    TagInfo,
    TouchReport,
    VerifyReport,
    VerifyStatus,
    to_json,
)
from refcount.units import human_size, plural

if TYPE_CHECKING:
    from refcount.core.retention import PrunePolicy  # prune only: loaded there

log = logging.getLogger("refcount")

INTERNAL_ERROR = ExitCode.INTERNAL

SERVED_COMMANDS = frozenset(
    {"init", "sync", "delete", "verify", "gc", "tags", "du", "show", "touch"}
)
"""The commands a daemon runs for a client: not `watch` (a daemon in a daemon), nor
`db` (migrations are run by hand, next to the process that owns the schema), nor
`push` (its SOURCE is a path of the client's, and a long copy would hold a daemon
worker: it runs in its own process, safe beside the daemon through the store's
lock and its leases)."""


app = typer.Typer(
    name="refcount",
    help="Reference counts for an OCI image layout: free exactly what nothing else needs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    # Plain Click help: options read `--store DIR` and `--json`, not rich's
    # `<path>` and `<bool>` columns, and nothing is cut at 80 columns.
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)
delete_app = typer.Typer(
    help="Remove index.json entries and free what nothing else needs.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
db_app = typer.Typer(
    help="Schema migrations (Alembic).", no_args_is_help=True, rich_markup_mode=None
)
app.add_typer(delete_app, name="delete")
app.add_typer(db_app, name="db")


ROOT_COMMANDS = frozenset(
    {"init", "sync", "tags", "du", "verify", "gc", "prune", "delete", "watch"}
)
"""The commands that run across every repository under --root (the others take --repo)."""


@dataclass(frozen=True)
class Settings:
    store: Path
    db: str | None
    json: bool
    trash_ttl: timedelta
    grace: timedelta
    keep_referrers: bool
    keep_untagged: bool
    max_manifest: int
    mass_free_threshold: float
    extractor_timeout: timedelta
    root: Path | None = None
    repositories: tuple[roots.Repository, ...] = ()
    """Under --root: what the command runs on (every repository, or the --repo one)."""
    repo: str | None = None
    one_database: bool = False
    """Under --root: every repository in one PostgreSQL database, a schema each."""
    db_schema: str | None = None
    """The schema of the repository this names, when `one_database`."""

    def of(self, repository: roots.Repository) -> Settings:
        """The settings of one repository of the root: its store, and its schema
        when the whole root shares one PostgreSQL database."""
        schema = repository.schema if self.one_database else None
        return replace(self, store=repository.path, db_schema=schema)

    def forget(self, repository: roots.Repository) -> None:
        """Drop the schema of a repository that is gone (`watch --root` on one
        database): its rows describe files that no longer exist, and a repository
        made again under that name would be refused by the old identity."""
        from refcount.db.engine import drop_schema, environment_url

        url = self.db or environment_url()
        assert url is not None and self.one_database
        if drop_schema(url, repository.schema):
            log.info("%s: schema %s dropped", repository.name, repository.schema)

    def open(self, progress: Progress | None = None) -> Refcounter:
        return open_store(
            self.store,
            self.db,
            trash_ttl=self.trash_ttl,
            grace=self.grace,
            keep_referrers=self.keep_referrers,
            keep_untagged=self.keep_untagged,
            max_manifest=self.max_manifest,
            mass_free_threshold=self.mass_free_threshold,
            extractor_timeout=self.extractor_timeout,
            progress=progress,
            schema=self.db_schema,
        )

    @contextmanager
    def counter(self) -> Iterator[Refcounter]:
        """The store's Refcounter, drawing a progress bar on a terminal (never in JSON mode)."""
        if self.json or not sys.stdout.isatty():
            with self.open() as rc:
                yield rc
            return
        from rich.progress import Progress as Bar

        with Bar(transient=True) as bar:
            tasks: dict[str, Any] = {}

            def show(phase: str, done: int, total: int) -> None:
                if phase not in tasks:
                    tasks[phase] = bar.add_task(phase, total=total)
                bar.update(tasks[phase], completed=done, total=total)

            with self.open(progress=show) as rc:
                yield rc


DryRun = Annotated[
    bool, typer.Option("--dry-run", "-n", help="Print what would be removed; change nothing.")
]


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"refcount {_package_version()}")
        raise typer.Exit(0)


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("refcount")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


@app.callback()
def configure(
    ctx: typer.Context,
    store: Annotated[
        Path,
        typer.Option(envvar="REFCOUNT_STORE", metavar="DIR", help="The OCI layout directory."),
    ] = Path("."),
    db: Annotated[
        str | None,
        typer.Option(
            envvar="REFCOUNT_DB",
            metavar="URL",
            help="SQLAlchemy URL; default sqlite:///STORE/.refcount/refcount.db.",
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    verbose: Annotated[
        int,
        typer.Option(
            "--verbose", "-v", count=True, show_default=False, help="More logging (-vv for debug)."
        ),
    ] = 0,
    trash_ttl: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="How long freed blobs stay in .refcount/trash/ (0 = unlink at once).",
        ),
    ] = "10m",
    grace: Annotated[
        str,
        typer.Option(metavar="DURATION", help="Age before an orphan blob may be swept by gc."),
    ] = "1h",
    keep_referrers: Annotated[
        bool,
        typer.Option("--keep-referrers", help="Keep untagged referrers whose subject is freed."),
    ] = False,
    keep_untagged: Annotated[
        bool,
        typer.Option(
            "--keep-untagged", help="Keep untagged entries only the deleted image reached."
        ),
    ] = False,
    max_manifest: Annotated[
        int, typer.Option(metavar="BYTES", help="Largest manifest parsed, in bytes.")
    ] = 4 * 1024 * 1024,
    version: Annotated[
        bool,
        typer.Option(
            "--version",
            is_eager=True,
            expose_value=False,
            callback=_print_version,
            help="Print the version and exit.",
        ),
    ] = False,
    mass_free_threshold: Annotated[
        float,
        typer.Option(
            min=0.0,
            max=1.0,
            metavar="FRACTION",
            help="Fraction of the live bytes above which one outside change of index.json "
            "is a mass free, held in the quarantine whatever --trash-ttl says.",
        ),
    ] = 0.5,
    extractor_timeout: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="How long an extractor plug-in may read one blob before the blob is "
            "treated as damaged.",
        ),
    ] = "10s",
    root: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            help="A directory of OCI layouts, one per repository (nested names such as "
            "library/nginx): run the command on each (instead of --store). Each counts in "
            "its own .refcount/refcount.db, or with a PostgreSQL --db in a schema of its own.",
        ),
    ] = None,
    repo: Annotated[
        str | None,
        typer.Option(
            metavar="NAME", help="With --root: only the repository NAME (e.g. library/nginx)."
        ),
    ] = None,
) -> None:
    """Reference counts for an OCI image layout."""
    one_database = _check_root(ctx, root, repo, db)
    level = logging.WARNING - 10 * min(verbose, 2)
    request_log = _REQUEST_LOG.get()
    if request_log is None:
        logging.getLogger().setLevel(level)
    else:  # inside a daemon: this request's verbosity, never the daemon's own
        request_log.setLevel(level)
        if ctx.invoked_subcommand not in SERVED_COMMANDS:
            raise NotServed(f"{ctx.invoked_subcommand}: not run by the daemon; run it directly")
    chosen: tuple[roots.Repository, ...] = ()
    if root is not None and ctx.invoked_subcommand != "watch":
        chosen = tuple(roots.select(root, repo))
    settings = Settings(
        store,
        db,
        as_json,
        parse_duration(trash_ttl),
        parse_duration(grace),
        keep_referrers,
        keep_untagged,
        max_manifest,
        mass_free_threshold,
        _positive(extractor_timeout, "--extractor-timeout"),
        root,
        chosen,
        repo,
        one_database,
    )
    ctx.obj = settings.of(chosen[0]) if repo is not None and chosen else settings


def _given(ctx: typer.Context, option: str, *sources: str) -> bool:
    """Whether `option` came from one of `sources` (names of Click's ParameterSource)."""
    return getattr(ctx.get_parameter_source(option), "name", None) in sources


def _check_root(ctx: typer.Context, root: Path | None, repo: str | None, db: str | None) -> bool:
    """--root's companions: --repo only with it; no --store beside it; a --db only
    when it is PostgreSQL; a command that works on one store needs --repo;
    `watch --root` watches them all. Returns whether the root's repositories share
    one PostgreSQL database (a schema each; without --db each repository counts in
    its own STORE/.refcount/refcount.db, unless REFCOUNT_DEFAULT_DB names PostgreSQL)."""
    from refcount.db.engine import backend_name, environment_url

    if root is None:
        if repo is not None:
            raise typer.BadParameter("--repo NAME names a repository under --root DIR")
        return False
    if _given(ctx, "store", "COMMANDLINE"):
        raise typer.BadParameter("--root and --store: give one (--root DIR --repo NAME for one)")
    # A SQLite file counts one store: a shared one would refuse every repository
    # but the first. PostgreSQL gives each repository a schema of its own.
    if db is not None and backend_name(db) != "postgresql":
        raise typer.BadParameter(
            "--db with --root must be a PostgreSQL URL (one schema per repository); "
            "without --db each repository counts in its own .refcount/refcount.db"
        )
    command = ctx.invoked_subcommand
    if command == "watch" and repo is not None:
        raise typer.BadParameter("watch --root watches every repository: no --repo")
    if repo is None and command not in ROOT_COMMANDS | {"plugins"}:  # plugins: no store
        raise typer.BadParameter(f"--root: {command} works on one repository: give --repo NAME")
    return backend_name(db or environment_url() or "") == "postgresql"


def _positive(text: str, option: str) -> timedelta:
    duration = parse_duration(text)
    if duration <= timedelta(0):
        raise InvalidDuration(f"{option} {text!r}: must be more than 0")
    return duration


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


def _across(
    ctx: typer.Context,
    run: Callable[[Refcounter, str], object],
    text: Callable[[Any], list[str]] | None = None,
    *,
    only: Collection[str] | None = None,
) -> None:
    """Render `run(refcounter, repository name)` on the store, or under --root on
    each chosen repository (those named in `only`, when given) as one RootReport:
    a repository's error is its result (a line on stderr here) and the others
    still run; the exit code is the worst of them."""
    settings = _settings(ctx)
    if settings.root is None:
        with settings.counter() as rc:
            report = run(rc, "")
        render(ctx, report, text)
        return

    def one(repository: roots.Repository) -> object:
        with settings.of(repository).open() as rc:
            return run(rc, repository.name)

    chosen = [r for r in settings.repositories if only is None or r.name in only]
    report = roots.each(settings.root, chosen, one)
    for result in report.results:
        if result.error is not None:
            typer.echo(f"refcount: error: {result.repo}: {result.error}", err=True)
    render(ctx, report, None if text is None else functools.partial(_root_text, text=text))


def _held(ctx: typer.Context, refs: list[str]) -> dict[str, list[str]] | None:
    """Under --root, the tags of `refs` each repository holds (NotFound for one
    no repository holds, before anything runs); None for a single store."""
    settings = _settings(ctx)
    if settings.root is None:
        return None

    def holds(repository: roots.Repository) -> set[str]:
        with settings.of(repository).open() as rc:
            return set(rc.tag_names())

    return roots.require_each(list(settings.repositories), refs, holds)


def _one_store(ctx: typer.Context, command: str) -> None:
    """A command that works on one store: under --root it needs --repo."""
    settings = _settings(ctx)
    if settings.root is not None and settings.repo is None:
        raise typer.BadParameter(f"--root: {command} works on one repository: give --repo NAME")


@app.command()
def init(ctx: typer.Context) -> None:
    """Create or upgrade the database and index the store (idempotent).

    \b
    Example:
        refcount --store /srv/oci init
    """
    _across(ctx, lambda rc, _repo: rc.init())


@app.command(short_help="Reconcile the database with the disk once.")
def sync(ctx: typer.Context) -> None:
    """Reconcile the database with the disk once, applying only the differences; exit 1
    when it finds referenced blobs missing."""
    _across(ctx, lambda rc, _repo: rc.sync())


@delete_app.command("tag", short_help="Remove the entries tagged REF...; free what reaches zero.")
def delete_tag(
    ctx: typer.Context,
    refs: Annotated[list[str], typer.Argument(metavar="REF...", help="One or more tags.")],
    dry_run: DryRun = False,
) -> None:
    """Remove every index.json entry tagged REF; free what reaches zero.

    Several tags are deleted together: one transaction and one rewrite of
    index.json, and nothing is deleted unless every tag exists.

    \b
    Example:
        refcount delete tag app:1.0 --dry-run
        refcount delete tag app:1.0 app:1.1 app:1.2
    """
    if _joined(ctx, DeleteRequest(tags=tuple(refs)), dry_run):
        return
    held = _held(ctx, refs)
    _across(
        ctx,
        lambda rc, repo: rc.delete_tags(refs if held is None else held[repo], dry_run=dry_run),
        only=held,
    )


@delete_app.command(
    "manifest", short_help="Remove the entries pointing at DIGEST; free what reaches zero."
)
def delete_manifest(
    ctx: typer.Context,
    digest: Annotated[str, typer.Argument(metavar="DIGEST", help="sha256:...")],
    dry_run: DryRun = False,
) -> None:
    """Remove every index.json entry pointing at DIGEST; free what reaches zero."""
    _one_store(ctx, "delete manifest")
    if _joined(ctx, DeleteRequest(digest=digest), dry_run):
        return
    with _settings(ctx).counter() as rc:
        render(ctx, rc.delete_manifest(digest, dry_run=dry_run))


def _joined(ctx: typer.Context, request: DeleteRequest, dry_run: bool) -> bool:
    """Inside a daemon, a delete on one store joins the next group commit of the
    deletes its clients send (`refcount.group`): its own report is rendered here
    once its entries are out of index.json and its blobs freed, or its own error
    raised. False (nothing done) where it runs alone: a CLI process, a dry run
    (it changes nothing, so it waits for no one), --root."""
    group = _GROUP.get()
    settings = _settings(ctx)
    if group is None or dry_run or settings.root is not None:
        return False
    cancel = interrupts.cancel_event()
    # Requests batch together only when every option that shapes a delete is the
    # same (--json shapes only the output).
    key = replace(settings, json=False)
    try:
        result = group.submit(
            key,
            (request, cancel),
            functools.partial(_delete_batch, settings),
            cancelled=cancel.is_set if cancel is not None else lambda: False,
        )
    except Withdrawn:  # its client went away while it was queued: it never ran
        interrupts.checkpoint()
        raise
    except interrupts.Interrupted:  # every client of its batch went away before it ran
        interrupts.checkpoint()  # raised as this thread's own interruption
        raise
    if isinstance(result, RefcountError):
        raise result
    interrupts.completed(request.describe())
    render(ctx, result)
    return True


def _delete_batch(
    settings: Settings, batch: Sequence[tuple[DeleteRequest, threading.Event | None]]
) -> list[DeleteReport | RefcountError]:
    """A group commit's batch, run by its leader on the leader's thread and
    Refcounter: stopped by an interruption only once every client in it has gone
    (`interrupts.on_behalf_of`); counted in the daemon's metrics as one rewrite."""
    started = time.monotonic()
    with interrupts.on_behalf_of([cancel for _, cancel in batch]), settings.open() as rc:
        results = rc.delete_groups([request for request, _ in batch])
    written = sum(1 for r in results if isinstance(r, DeleteReport))
    seconds = time.monotonic() - started
    if (on_report := _ON_REPORT.get()) is not None:
        on_report(DeleteBatch(requests=len(batch), written=written, seconds=seconds))
    log.log(
        logging.INFO if len(batch) > 1 else logging.DEBUG,
        "group commit: %d deletes, %d written in one rewrite of index.json; %.1f ms",
        len(batch),
        written,
        seconds * 1000,
    )
    return results


@app.command(short_help="Recount from scratch and compare with the database.")
def verify(
    ctx: typer.Context,
    deep: Annotated[
        bool, typer.Option("--deep", help="Also hash every blob and check sizes.")
    ] = False,
    repair: Annotated[
        bool,
        typer.Option(
            "--repair", help="Rewrite the database to match the disk (never deletes content)."
        ),
    ] = False,
    max_blobs: Annotated[
        int | None,
        typer.Option(
            "--slice",
            metavar="N",
            help="With --deep: hash at most N blobs, resuming the deep lap where it stopped.",
        ),
    ] = None,
    max_duration: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="With --deep: hash for at most DURATION (e.g. 2m), resuming the deep lap.",
        ),
    ] = None,
    last: Annotated[
        bool,
        typer.Option(
            "--last", help="Show the latest recorded shallow and deep verify; run nothing."
        ),
    ] = False,
) -> None:
    """Recount from scratch and compare with the database; exit 1 on any disagreement.

    Every verify is recorded in the database; --last prints the latest of each
    kind (exit 1 when it found a problem) and the deep lap's progress.

    \b
    Example:
        refcount verify --deep --max-duration 10m   # one slice of the deep lap
        refcount verify --last
    """
    if last and (deep or repair or max_blobs is not None or max_duration is not None):
        raise typer.BadParameter("--last runs nothing: it takes no other verify option")
    duration = None if max_duration is None else parse_duration(max_duration)

    def run(rc: Refcounter, _repo: str) -> object:
        if last:
            return rc.verify_status()
        return rc.verify(deep=deep, repair=repair, max_blobs=max_blobs, max_duration=duration)

    _across(ctx, run)


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: DryRun = False,
    grace: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Override the orphan grace period, e.g. 10m."),
    ] = None,
) -> None:
    """Sweep orphans older than the grace period; purge expired trash."""
    age = None if grace is None else parse_duration(grace)
    _across(ctx, lambda rc, _repo: rc.gc(dry_run=dry_run, grace=age))


@app.command()
def tags(
    ctx: typer.Context,
    everything: Annotated[
        bool,
        typer.Option(
            "--all",
            help="Also the untagged entries, with what refers to them or what they refer to.",
        ),
    ] = False,
) -> None:
    """The tags, their digests and the bytes of each image.

    \b
    Example:
        refcount tags --all
    """
    _across(
        ctx,
        lambda rc, _repo: rc.tags(include_untagged=everything),
        _roots_text if everything else _tags_text,
    )


@app.command()
def du(
    ctx: typer.Context,
    refs: Annotated[
        list[str] | None,
        typer.Argument(metavar="[REF]...", help="Tags to list (default: every tag)."),
    ] = None,
    html: Annotated[
        Path | None,
        typer.Option(
            "--html",
            metavar="FILE",
            help="Also write the report as one self-contained HTML page (a chart "
            "and the figures) to FILE, replacing it atomically.",
        ),
    ] = None,
) -> None:
    """Each tag's total, exclusive and shared bytes; the store's totals.

    Exclusive bytes are what `delete tag` would free (what its --dry-run prints).
    Computed from the database: no blob is read. Exit 1 when an image has a
    missing or damaged blob (listed as problems).

    \b
    Example:
        refcount du
        refcount --json du latest
        refcount du --html du.html
    """
    if html is not None:
        _one_store(ctx, "du --html")
    held = _held(ctx, refs) if refs else None

    def run(rc: Refcounter, repo: str) -> object:
        report = rc.du((refs if held is None else held[repo]) or None)
        if html is not None:
            typer.echo(f"refcount: wrote {rc.write_du_html(report, html)}", err=True)
        return report

    _across(ctx, run, only=held)


@app.command()
def show(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="DIGEST|REF", help="A digest or a tag.")],
) -> None:
    """Count, state, parents (why it is alive) and children of a blob."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.show(ref))


@app.command()
def plugins(ctx: typer.Context) -> None:
    """The installed extractor plug-ins: their packages and the media types they read.

    Exit 1 when one is installed but could not be loaded.
    """
    render(ctx, installed_plugins())


@app.command(short_help="Copy an image in from DIR:REF or oci-archive:FILE[:REF].")
def push(
    ctx: typer.Context,
    source: Annotated[
        str,
        typer.Argument(metavar="SOURCE", help="DIR:REF, oci:DIR:REF or oci-archive:FILE[:REF]."),
    ],
    tag: Annotated[
        str | None,
        typer.Option("--tag", metavar="T", help="Tag the new root T (default: REF)."),
    ] = None,
    every_platform: Annotated[
        bool,
        typer.Option(
            "--all/--no-all",
            help="An image index brings every platform manifest (as skopeo --all); "
            "--no-all pushes only this host's platform manifest, as the root.",
        ),
    ] = True,
    no_referrers: Annotated[
        bool,
        typer.Option("--no-referrers", help="Leave the source's referrers of the image behind."),
    ] = False,
    lease_ttl: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="How long the push's lease on its blobs lasts if it dies mid-copy.",
        ),
    ] = "1h",
) -> None:
    """Copy an image into the store, verifying every blob as it streams.

    Blobs the store has are reused; the rest are written to .refcount/push/ and
    renamed into blobs/ once all are complete; the tag is added to index.json last.
    Until then every blob is leased: no delete, gc or daemon frees it. A tag that
    exists moves to the pushed image.

    \b
    Example:
        refcount push /srv/build:app:1.0
        refcount push oci-archive:app.tar:1.0 --tag app:1.0
    """
    with _settings(ctx).counter() as rc:
        render(
            ctx,
            rc.push(
                source,
                tag=tag,
                referrers=not no_referrers,
                every_platform=every_platform,
                lease_ttl=parse_duration(lease_ttl),
            ),
        )


@app.command(short_help="Record that an image was used (drives prune --unused-for).")
def touch(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(metavar="REF", help="A tag, or a digest (its tags).")],
) -> None:
    """Record that the image REF was used now: what a runtime or a cache calls when
    it pulls from the store. `du` and `tags --json` show the last use."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.touch(ref))


@app.command(short_help="Delete the tags a retention policy selects.")
def prune(
    ctx: typer.Context,
    keep_last: Annotated[
        int | None,
        typer.Option(
            metavar="N",
            help="Keep the N newest tags of each repository (the tag before its last ':'); "
            "alone, delete the rest.",
        ),
    ] = None,
    older_than: Annotated[
        str | None,
        typer.Option(metavar="DURATION", help="Delete tags whose image was made before now - D."),
    ] = None,
    unused_for: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Delete tags not used (refcount touch, a push) for D; a tag never "
            "touched was last used when refcount first saw it.",
        ),
    ] = None,
    match: Annotated[
        list[str] | None,
        typer.Option(metavar="GLOB", help="Only tags matching a GLOB may be deleted (repeatable)."),
    ] = None,
    exclude: Annotated[
        list[str] | None,
        typer.Option(metavar="GLOB", help="Never delete tags matching GLOB (repeatable)."),
    ] = None,
    untagged: Annotated[
        bool,
        typer.Option(
            "--untagged",
            help="Delete untagged entries past --grace that no tagged image needs.",
        ),
    ] = False,
    max_size: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE", help="Delete the oldest tags until live bytes are at most SIZE."
        ),
    ] = None,
    min_free: Annotated[
        str | None,
        typer.Option(
            metavar="SIZE|PCT%",
            help="Delete the oldest tags until the store's filesystem has this much free.",
        ),
    ] = None,
    dry_run: DryRun = False,
    yes: Annotated[
        bool, typer.Option("--yes", "-y", help="Do not ask for confirmation on a terminal.")
    ] = False,
) -> None:
    """Delete the tags a retention policy selects: one transaction, one rewrite of
    index.json. With no policy flags, the rules in STORE/.refcount/policy.toml.

    On a terminal a real prune shows its plan and asks first (unless --yes);
    otherwise it proceeds.

    \b
    Example:
        refcount prune --keep-last 3 --match 'web:*' --dry-run
        refcount prune --older-than 30d --exclude '*:stable' --yes
        refcount prune --unused-for 90d --keep-last 1
        refcount prune --max-size 50G
    """
    values = {
        "keep_last": keep_last,
        "older_than": older_than,
        "unused_for": unused_for,
        "match": match or None,
        "exclude": exclude or None,
        "untagged": untagged or None,
        "max_size": max_size,
        "min_free": min_free,
    }
    settings = _settings(ctx)
    if settings.root is not None:
        _prune_root(ctx, values, dry_run=dry_run, yes=yes)
        return
    with settings.counter() as rc:
        rules, where = _prune_rules(rc, values)
        if dry_run or yes or not sys.stdin.isatty():
            render(ctx, rc.prune(rules, dry_run=dry_run, policy_file=where))
            return
        plan = rc.prune(rules, dry_run=True, policy_file=where)
        if not plan.chosen:
            render(ctx, plan)
            return
        for line in _prune_text(plan):  # under --json too: stdout keeps one document
            typer.echo(line, err=_settings(ctx).json)
        if not typer.confirm("Prune these?", default=False, err=True):
            typer.echo("refcount: prune cancelled; nothing deleted", err=True)
            raise typer.Exit(ExitCode.PROBLEM)
        keys = [c.tag if c.tag is not None else c.digest for c in plan.chosen]
        render(ctx, rc.prune(rules, expect=keys, policy_file=where))


def _prune_root(
    ctx: typer.Context, values: Mapping[str, object], *, dry_run: bool, yes: bool
) -> None:
    """`prune` across a root: the flags' rules in every repository, or without flags
    each repository's own policy file (repositories without one are left alone)."""
    if not (dry_run or yes or not sys.stdin.isatty()):
        raise typer.BadParameter("prune across --root on a terminal: give --yes or --dry-run")
    only = None
    if all(v is None for v in values.values()):
        only = {r.name for r in _settings(ctx).repositories if policy_path(r.path).is_file()}
        if not only:
            raise InvalidPolicy(
                "no policy: give --keep-last, --older-than, --untagged, --max-size or "
                "--min-free, or write REPO/.refcount/policy.toml in a repository"
            )

    def run(rc: Refcounter, _repo: str) -> object:
        rules, where = _prune_rules(rc, values)
        return rc.prune(rules, dry_run=dry_run, policy_file=where)

    _across(ctx, run, only=only)


def _prune_rules(rc: Refcounter, values: Mapping[str, object]) -> tuple[PrunePolicy, str | None]:
    """The flags' rules, or with no flags the store's policy file's (and its name)."""
    from refcount.core.policyfile import build as build_policy  # tomllib: prune only

    if any(v is not None for v in values.values()):
        rules = build_policy(values, lambda key: "--" + key.replace("_", "-"))
        where = None
    else:
        found = rc.policy_rules()
        if found is None:
            raise InvalidPolicy(
                "no policy: give --keep-last, --older-than, --unused-for, --untagged, "
                f"--max-size or --min-free, or write {policy_path(rc.store.path)}"
            )
        rules, where = found
    if not rules.selects:
        raise InvalidPolicy(
            f"{where or '--match/--exclude'}: nothing selects tags: --match and --exclude only "
            "limit --keep-last, --older-than, --unused-for, --max-size and --min-free"
        )
    return rules, where


LOG_FORMATS = ("text", "json")


def _log_format(value: str) -> str:
    if value not in LOG_FORMATS:
        raise typer.BadParameter(f"{value!r}: not a log format; use text or json")
    return value


@app.command(short_help="Run as a daemon beside the store: watch, reconcile, free.")
def watch(
    ctx: typer.Context,
    debounce: Annotated[
        float,
        typer.Option(
            metavar="SECONDS",
            help="Quiet period after the last event before a batch is applied, seconds.",
        ),
    ] = 0.1,
    resync: Annotated[
        str,
        typer.Option(
            metavar="DURATION", help="Interval between full reconciles that catch missed events."
        ),
    ] = "5m",
    gc_interval: Annotated[
        str,
        typer.Option(
            metavar="DURATION",
            help="Interval between sweeps of orphans past --grace and expired trash.",
        ),
    ] = "5m",
    prune_every: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Apply STORE/.refcount/policy.toml (as `refcount prune`) this often "
            "(default never); the daemon refuses to start without a valid one.",
        ),
    ] = None,
    metrics_addr: Annotated[
        str | None,
        typer.Option(
            metavar="HOST:PORT", help="HOST:PORT for /metrics and /healthz (default off)."
        ),
    ] = None,
    log_format: Annotated[
        str,
        typer.Option(
            metavar="text|json",
            callback=_log_format,
            help="text, or json: one JSON object per line.",
        ),
    ] = "text",
    verify_every: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Interval between shallow verifies, e.g. 6h (default off).",
        ),
    ] = None,
    deep_every: Annotated[
        str | None,
        typer.Option(
            metavar="DURATION",
            help="Interval between deep verifies, each one slice of the lap (default off).",
        ),
    ] = None,
    run_dir: Annotated[
        Path | None,
        typer.Option(
            metavar="DIR",
            envvar="REFCOUNT_RUN_DIR",
            help="This sidecar's directory for watch.pid and the command socket "
            "(default STORE/.refcount): one per host when hosts share the store.",
        ),
    ] = None,
    deep_slice: Annotated[
        str | None,
        typer.Option(
            metavar="N|DURATION",
            help="What one deep verify hashes: N blobs (50000) or for DURATION (2m); "
            "default every blob.",
        ),
    ] = None,
) -> None:
    """Run as a daemon beside the store: watch, reconcile, free (SIGTERM to stop, SIGHUP to
    reconcile fully). With --root, one daemon per repository in this process, picking up
    repositories created or removed while it runs."""
    from refcount.watch import DeepSlice, WatchOptions, run_daemon, run_root_daemon

    settings = _settings(ctx)
    _configure_logging(log_format)
    if log.getEffectiveLevel() > logging.INFO:  # refcount's own lines; not alembic's
        log.setLevel(logging.INFO)
        # One line per batch is the daemon's own; what each sync did only with -v.
        for handler in logging.getLogger().handlers:
            handler.addFilter(_without_sync_details)
    amount = None if deep_slice is None else parse_amount(deep_slice)
    options = WatchOptions(
        debounce,
        parse_duration(resync),
        metrics_addr,
        parse_duration(gc_interval),
        verify_every=None if verify_every is None else parse_duration(verify_every),
        deep_every=None if deep_every is None else parse_duration(deep_every),
        deep_slice=DeepSlice(
            max_blobs=amount if isinstance(amount, int) else None,
            max_duration=amount if isinstance(amount, timedelta) else None,
        ),
        prune_every=None if prune_every is None else parse_duration(prune_every),
        run_dir=run_dir,
    )
    # The daemon parses its clients' command lines in this process: only what a
    # client sent (it sends --store, and --db from its own environment) may
    # count, never the daemon's REFCOUNT_STORE or REFCOUNT_DB.
    for name in ("REFCOUNT_STORE", "REFCOUNT_DB"):
        os.environ.pop(name, None)

    def serve(on_report: Callable[[object], None]) -> Callable[..., tuple[int, str, str]]:
        # One queue of deletes per served store (per repository under --root).
        return functools.partial(serve_request, on_report=on_report, group=GroupCommit())

    if settings.root is None:
        run_daemon(settings.open, options, serve)
        return
    run_root_daemon(
        settings.root,
        lambda repository: settings.of(repository).open,
        options,
        serve,
        forget=settings.forget if settings.one_database else None,
    )


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Bring the database schema to the newest revision."""
    with _settings(ctx).counter() as rc:
        typer.echo(f"schema at {rc.schema_revision()}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the database's schema revision."""
    from refcount.db.engine import current_revision, default_url, environment_url, make_engine

    settings = _settings(ctx)
    url = settings.db or environment_url() or default_url(settings.store.absolute())
    engine = make_engine(url, schema=settings.db_schema)
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    typer.echo(revision or "none (run `refcount init`)")


# --- rendering ----------------------------------------------------------------
def render(ctx: typer.Context, report: Any, text: Callable[[Any], list[str]] | None = None) -> None:
    """One JSON document, or `text(report)` (by default the report type's own lines);
    then the report's own exit code (1 when it found a problem), read here only."""
    if (on_report := _ON_REPORT.get()) is not None:
        on_report(report)
    if _settings(ctx).json:
        typer.echo(json.dumps(to_json(report), indent=2, default=str))
    else:
        for line in (text or _RENDERERS[type(report)])(report):
            typer.echo(line)
    code = getattr(report, "exit_code", ExitCode.OK)
    if code != ExitCode.OK:
        raise typer.Exit(code)


def _size(n: int | None) -> str:
    """Sizes in text: binary units (`492 KiB`); `--json` keeps exact bytes."""
    return human_size(n)


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells, each column as wide as its widest cell (the last one unpadded)."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def _delete_text(report: DeleteReport) -> list[str]:
    verb = ("would remove", "would free") if report.dry_run else ("removed", "freed")
    entries = plural(len(report.removed), "index.json entry", "index.json entries")
    lines = [f"{verb[0]} {entries}:"]
    lines += _columns([["", e.tag or "(untagged)", e.digest] for e in report.removed])
    freed = f"{verb[1]} {plural(len(report.freed), 'blob')}, {_size(report.freed_bytes)}"
    lines.append(freed + (":" if report.freed else ""))
    lines += _columns([["", b.digest, _size(b.size), b.media_type or ""] for b in report.freed])
    return lines


def _push_text(report: PushReport) -> list[str]:
    lines = [
        f"pushed {report.source} as {report.tag or '(untagged)'}: {report.digest}",
        f"copied {plural(len(report.copied), 'blob')}, {_size(report.copied_bytes)}; "
        f"reused {plural(report.reused, 'blob')}"
        + (f" ({len(report.restored)} restored from the quarantine)" if report.restored else ""),
    ]
    referrers = len(report.added) - 1
    if referrers:
        lines.append(f"added {plural(referrers, 'referrer')} (untagged)")
    if report.replaced:
        lines.append(
            f"moved the tag from {', '.join(e.digest for e in report.replaced)}; "
            f"freed {plural(len(report.freed), 'blob')}, "
            f"{_size(sum(b.size or 0 for b in report.freed))}"
        )
    return lines


def _touch_text(report: TouchReport) -> list[str]:
    return [f"used {', '.join(report.tags)} at {report.used_at:%Y-%m-%d %H:%M:%S} UTC"]


def _lease_text(lease: LeaseInfo) -> str:
    return (
        f"{lease.lease} by {lease.holder}, "
        f"since {lease.created:%Y-%m-%d %H:%M:%S}, expires {lease.expires:%H:%M:%S} UTC"
    )


def _prune_text(report: PruneReport) -> list[str]:
    if not report.chosen:
        return [
            "nothing to prune" + (f" (policy {report.policy_file})" if report.policy_file else "")
        ]
    verb = "would prune" if report.dry_run else "pruned"
    source = f" by {report.policy_file}" if report.policy_file else ""
    lines = [f"{verb} {plural(len(report.chosen), 'entry', 'entries')}{source}:"]
    lines += _columns(
        [["", "TAG", "DIGEST", "CREATED", "REASON"]]
        + [
            [
                "",
                c.tag or "(untagged)",
                c.digest,
                f"{c.created:%Y-%m-%d %H:%M:%S} ({c.created_from})",
                c.reason,
            ]
            for c in report.chosen
        ]
    )
    lines += _delete_text(DeleteReport("prune", report.dry_run, report.removed, report.freed))
    after = report.live_before - report.freed_bytes
    budget = {None: "", True: "; within budget", False: "; still over budget"}[report.budget_met]
    lines.append(f"live: {_size(report.live_before)} -> {_size(after)}{budget}")
    return lines


def _sync_text(report: SyncReport) -> list[str]:
    lines = [
        f"roots +{report.roots_added} -{report.roots_removed}; "
        f"{plural(report.became_live, 'blob')} became live; "
        f"{len(report.freed)} freed ({_size(report.freed_bytes)}); "
        f"{len(report.restored)} restored; {len(report.missing)} missing; "
        f"{plural(len(report.orphans), 'new orphan')}"
    ]
    lines += [f"missing: {d}" for d in report.missing]
    lines += [f"skipped: {p}" for p in report.problems]
    if report.mass_free is not None:
        lines.append(_mass_free_text(report.mass_free))
    return lines


def _gc_text(report: GcReport) -> list[str]:
    sweep, purge = ("would sweep", "would purge") if report.dry_run else ("swept", "purged")
    lines = [
        f"{sweep} {plural(len(report.swept), 'orphan')}, "
        f"{purge} {plural(len(report.purged), 'trashed blob')}, {_size(report.freed_bytes)}"
    ]
    lines += _columns(
        [["", "orphan", a.digest, _size(a.size), f"{a.age_seconds:.0f}s old"] for a in report.swept]
        + [["", "trash", a.digest, _size(a.size), ""] for a in report.purged]
    )
    verb = "would clear" if report.dry_run else "cleared"
    lines += [
        f"{verb} expired lease {lease.lease} of {lease.holder} ({plural(lease.blobs, 'blob')})"
        for lease in report.leases_cleared
    ]
    return lines


def _show_text(report: BlobInfo) -> list[str]:
    lines = [
        f"digest:     {report.digest}",
        f"count:      {report.count}",
        f"state:      {report.state}",
        f"size:       {_exact_size(report.size)}",
        f"media type: {report.media_type or '?'}",
    ]
    if report.tags:
        lines.append("roots:      " + ", ".join(t or "(untagged)" for t in report.tags))
    if report.subject:
        lines.append(f"subject:    {report.subject}")
    if report.problem:
        lines.append(f"problem:    {report.problem}")
    lines += [f"lease:      {_lease_text(lease)}" for lease in report.leases]
    lines += [f"parent:     {p.digest} ({p.kind})" for p in report.parents]
    lines += [f"child:      {c.digest} ({c.kind})" for c in report.children]
    return lines


def _exact_size(n: int | None) -> str:
    """One blob's size: human, and the exact bytes when they differ (`1.2 KiB (1234 B)`)."""
    text = _size(n)
    return text if n is None or n < 1024 else f"{text} ({n} B)"


def _verify_text(report: VerifyReport) -> list[str]:
    repaired = " (repaired)" if report.repaired else ""
    tags = {n.digest: n.tags for n in report.needed_by}
    lines = [
        f"drift {d.digest}: expected {d.expected}, recorded {d.recorded}{repaired}"
        if d.expected_state is None
        else f"drift {d.digest}: state is {d.expected_state}, recorded {d.recorded_state}{repaired}"
        for d in report.drift
    ]
    lines += [
        f"missing {d}: referenced but not in blobs/{_needed(tags.get(d))}" for d in report.missing
    ]
    lines += [
        f"corrupt {c.digest}: {c.reason}{_needed(tags.get(c.digest))}" for c in report.corrupt
    ]
    lines += [f"problem {p}" for p in report.problems]
    lines += [
        f"orphan {a.digest}: {_size(a.size)}, {a.age_seconds:.0f}s old" for a in report.orphans
    ]
    lines += [f"quarantined {a.digest}: {_size(a.size)}" for a in report.quarantined]
    lines += [_mass_free_text(m) for m in report.mass_frees]
    lines += [
        f"expired lease {lease.lease} of {lease.holder} ({plural(lease.blobs, 'blob')}): "
        "run refcount gc to clear it"
        for lease in report.expired_leases
    ]
    if report.behind:
        entries = plural(report.behind, "index.json entry", "index.json entries")
        lines.append(
            f"behind: the database is {entries} "
            "behind (the store is read-only, so it could not catch up); counts not compared: "
            "run `refcount sync` where the store is writable"
        )
    if report.lap is not None:
        lines.append(f"deep: {_lap_text(report.lap)}")
    status = "OK" if report.ok else "FAILED"
    lines.append(
        f"{status}: {plural(report.roots, 'root')}, {plural(report.live, 'live blob')}"
        + (f", {plural(report.checked, 'blob')} hashed" if report.deep else "")
    )
    return lines


def _needed(tags: tuple[str, ...] | None) -> str:
    """` (needed by a, b)` for a missing or corrupt blob a tag's image holds."""
    if tags is None:
        return ""
    return f" (needed by {', '.join(tags)})" if tags else " (needed by untagged roots only)"


def _lap_text(lap: Lap) -> str:
    started = "" if lap.started is None else f", lap started {lap.started:%Y-%m-%d %H:%M:%S} UTC"
    done = "; lap complete, the next slice starts a new one" if lap.done >= lap.total else ""
    return f"{lap.percent:.0f}% of blobs checked this lap{started}{done}"


def _status_text(status: VerifyStatus) -> list[str]:
    """`verify --last`: the latest run of each kind, its findings, and the lap."""
    lines: list[str] = []
    for name, run in (("shallow", status.shallow), ("deep", status.deep)):
        if run is None:
            lines.append(f"{name}: never run")
            continue
        counts = ", ".join(
            f"{n} {kind}"
            for kind, n in (
                ("drift", run.drift),
                ("missing", run.missing),
                ("corrupt", run.corrupt),
                ("orphans", run.orphans),
                ("problems", run.problems),
            )
            if n
        )
        what = ""
        if run.deep:
            what = f"{'a slice, ' if run.sliced else ''}{plural(run.checked, 'blob')} hashed, "
        lines.append(
            f"{name}: {'OK' if run.ok else 'FAILED'} at {run.at:%Y-%m-%d %H:%M:%S} UTC "
            f"({what}{run.seconds:.1f} s){': ' + counts if counts else ''}"
        )
        lines += [
            f"  {f.kind} {f.digest or ''}{': ' if f.digest else ''}{f.detail}"
            + (_needed(f.tags) if f.tags else "")
            for f in run.findings
        ]
    if status.lap is not None:
        lines.append(f"deep lap: {_lap_text(status.lap)}")
    return lines


def _mass_free_text(event: MassFree) -> str:
    return (
        f"WARNING mass free at {event.at:%Y-%m-%d %H:%M:%S} UTC: an outside change of "
        f"index.json removed {event.roots_removed} of {event.roots_before} roots and freed "
        f"{plural(event.blobs, 'blob')} ({human_size(event.bytes)} of "
        f"{human_size(event.live_bytes)} live); held in "
        f".refcount/trash/ until {event.held_until:%H:%M:%S} UTC: to undo, put the old "
        "index.json back and run `refcount sync`"
    )


def _tags_text(tags: list[TagInfo]) -> list[str]:
    return _columns(_tags_rows(tags))


def _tags_rows(tags: list[TagInfo]) -> list[list[str]]:
    return [["TAG", "DIGEST", "SIZE"]] + [
        [t.tag or "(untagged)", t.digest, _size(t.size)] for t in tags
    ]


def _root_text(report: RootReport, text: Callable[[Any], list[str]] | None = None) -> list[str]:
    """A command across --root: tags as one table with a REPO column; any other
    report as its own lines, each led by the repository's name (a column too).
    A repository that failed has its line on stderr (see `_across`)."""
    done = [r for r in report.results if r.error is None]
    table = _TABLES.get(text) if text is not None else None
    if table is not None:
        rows = [table(r.report) for r in done]
        head = rows[0][0] if rows else table([])[0]
        return _columns(
            [["REPO", *head]]
            + [[r.repo, *row] for r, own in zip(done, rows, strict=True) for row in own[1:]]
        )
    width = max((len(r.repo) for r in done), default=0)
    return [
        f"{r.repo.ljust(width)}  {line}".rstrip()
        for r in done
        for line in (text or _RENDERERS[type(r.report)])(r.report)
    ]


def _du_text(report: DuReport) -> list[str]:
    lines = _columns(
        [["TAG", "DIGEST", "TOTAL", "EXCLUSIVE", "SHARED", "SHARES WITH", "LAST USED"]]
        + [
            [
                u.tag,
                u.digest,
                _size(u.total),
                _size(u.exclusive),
                _size(u.shared),
                plural(u.shares_with, "tag"),
                "-" if u.last_used is None else f"{u.last_used:%Y-%m-%d %H:%M}",
            ]
            for u in report.tags
        ]
    )
    totals = [
        ("live", report.live),
        ("shared by 2+ tags", report.shared),
        ("held by untagged entries only", report.untagged),
        ("quarantined (trash)", report.quarantined),
        ("orphaned", report.orphaned),
        ("reclaimable now (gc)", report.reclaimable),
    ]
    problems = [
        f"problem {u.tag}: {d.kind} {d.digest}: {d.reason}" for u in report.tags for d in u.problems
    ]
    # `du REF...` leaves out the totals that need every image (None).
    totals_text = _columns([[f"{name}:", _size(n)] for name, n in totals if n is not None])
    return [*lines, *problems, "", *totals_text]


def _plugins_text(report: PluginsReport) -> list[str]:
    """One row per media type an extractor reads; a refused or failed one says why."""
    rows = [["EXTRACTOR", "PACKAGE", "MEDIA TYPES"]]
    for e in report.extractors:
        package = " ".join(p for p in (e.distribution, e.version) if p) or "-"
        notes = [*e.media_types, *(f"refused: {r}" for r in e.refused)]
        if e.error:
            notes.append(f"not used: {e.error}")
        for i, note in enumerate(notes or ["-"]):
            rows.append([e.name, package, note] if i == 0 else ["", "", note])
    return _columns(rows)


def _roots_text(entries: list[TagInfo]) -> list[str]:
    """`tags --all`: every entry, and what relates it to the tagged images."""
    return _columns(_entries_rows(entries))


def _entries_rows(entries: list[TagInfo]) -> list[list[str]]:
    return [["TAG", "DIGEST", "SIZE", "RELATION"]] + [
        [t.tag or "(untagged)", t.digest, _size(t.size), _relation(t)] for t in entries
    ]


_TABLES: dict[Callable[[Any], list[str]], Callable[[Any], list[list[str]]]] = {
    _tags_text: _tags_rows,
    _roots_text: _entries_rows,
}
"""The renderers whose reports are one table: merged across --root with a REPO column."""


def _relation(t: TagInfo) -> str:
    """`referrer of sha256:… (a)`, `in a, b`, both, or `-`."""
    parts = []
    if t.subject is not None:
        tags = f" ({', '.join(t.subject_tags)})" if t.subject_tags else ""
        parts.append(f"referrer of {t.subject}{tags}")
    if t.included_in:
        parts.append(f"in {', '.join(t.included_in)}")
    return "; ".join(parts) or "-"


_RENDERERS: dict[type, Callable[[Any], list[str]]] = {
    DeleteReport: _delete_text,
    SyncReport: _sync_text,
    VerifyReport: _verify_text,
    VerifyStatus: _status_text,
    GcReport: _gc_text,
    BlobInfo: _show_text,
    DuReport: _du_text,
    PluginsReport: _plugins_text,
    PushReport: _push_text,
    TouchReport: _touch_text,
    PruneReport: _prune_text,
    RootReport: _root_text,
    list: _tags_text,
}
"""The text of each report type (`tags` answers a list of TagInfo)."""


# --- the error boundary ---------------------------------------------------------
class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return json.dumps(
            {
                "time": self.formatTime(record),
                "level": record.levelname.lower(),
                "logger": record.name,
                "message": record.getMessage(),
            }
        )


def _without_sync_details(record: logging.LogRecord) -> bool:
    return record.name != sync_log.name or record.levelno >= logging.WARNING


class _LineFormatter(logging.Formatter):
    """`refcount: message`, one line: a traceback only when debug logging is on (-vv).

    A library's own error log (SQLAlchemy's pool logs "Exception closing
    connection" with exc_info) must not put a traceback in front of a user.
    """

    def __init__(self) -> None:
        super().__init__("refcount: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            return super().format(record)
        record.message = record.getMessage()
        return self.formatMessage(record)  # without exc_info, exc_text or stack_info


def _configure_logging(
    log_format: str, level: int | None = None, *, tracebacks: bool = True
) -> None:
    handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("refcount: %(message)s") if tracebacks else _LineFormatter()
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    if level is not None and root.level > level:
        root.setLevel(level)


def main(argv: list[str] | None = None) -> int:
    """Run the CLI in this process; returns the exit code."""
    _configure_logging("text", tracebacks=False)
    logging.getLogger().setLevel(logging.WARNING)
    log.setLevel(logging.NOTSET)  # a `watch` run in this process raised it to INFO
    try:
        return _run(argv)
    finally:
        logging.shutdown()


@functools.cache
def _command() -> Any:
    """The Click command Typer builds from `app`, built once: a daemon serving
    many requests pays for it once (10-20 ms), not on every request."""
    return typer.main.get_command(app)


def _run(argv: list[str] | None) -> int:
    """Run one command: the one place errors become messages and exit codes.

    An interruption (SIGINT, SIGTERM, a daemon's client gone) ends the command
    with `refcount: interrupted`, exit 130. When it came while an operation was
    completing, the operation finishes, its report is printed, and the line
    names it: `refcount: interrupted (delete tag 'a' had completed)`.
    """
    interrupts.begin()
    args = normalise(sys.argv[1:] if argv is None else argv)
    as_json = asks_for_json(args)  # known even when parsing is what fails
    code = _outcome(args, as_json)
    if interrupts.requested():
        return _interrupted(as_json)
    return code


def _interrupted(as_json: bool) -> int:
    """The line for an interrupted command (and its JSON document under --json)."""
    line = interrupts.describe()
    typer.echo(line, err=True)
    if as_json:
        error = line.removeprefix("refcount: ")
        typer.echo(json.dumps({"error": error, "exit_code": interrupts.EXIT_CODE}, indent=2))
    return interrupts.EXIT_CODE


def _outcome(args: list[str], as_json: bool) -> int:
    try:
        result = _command().main(args=args, standalone_mode=False, prog_name="refcount")
        return result if isinstance(result, int) else 0
    except interrupts.Interrupted:
        log.debug("interrupted", exc_info=True)
        return _interrupted(as_json)
    except RefcountError as exc:
        log.debug("error details", exc_info=True)
        return _fail(f"error: {exc}", exc.exit_code, as_json)
    except (typer.Abort, KeyboardInterrupt):
        return _interrupted(as_json)
    except typer.TyperException as exc:  # usage errors: bad flag, missing argument
        if type(exc).__name__ == "NoArgsIsHelpError":  # `refcount`, `refcount delete`
            # Click's message is the help itself (empty when rich printed it):
            # the help is the answer, not an error line (under --json, an error).
            if as_json:
                return _fail("error: Missing command.", 2, as_json)
            if exc.format_message():
                typer.echo(exc.format_message())
            return 2
        code: int = getattr(exc, "exit_code", 2)
        return _fail(f"error: {_usage_message(exc)}", code, as_json)
    except Exception as exc:
        log.debug("internal error", exc_info=True)
        message = f"internal error: {type(exc).__name__}: {exc} (run with -vv for details)"
        return _fail(message, INTERNAL_ERROR, as_json)


def _fail(message: str, code: int, as_json: bool) -> int:
    """The one line on stderr; with --json also one JSON document on stdout, so a
    script reading stdout learns what went wrong: {"error": ..., "exit_code": ...}."""
    typer.echo(f"refcount: {message}", err=True)
    if as_json:
        error = message.removeprefix("error: ")
        typer.echo(json.dumps({"error": error, "exit_code": code}, indent=2))
    return code


def _usage_message(exc: typer.TyperException) -> str:
    """Click's message, and where a global option goes when one is misplaced
    (`sync --grace 1h`: gc's own --grace is the only one after a command)."""
    message = exc.format_message()
    option = getattr(exc, "option_name", None)
    if option in GLOBAL_VALUE_OPTIONS or option in GLOBAL_FLAGS:
        message += f" ({option} is a global option: write it before the command)"
    return message


# --- commands run inside the daemon ----------------------------------------------
_REQUEST_LOG: ContextVar[logging.Handler | None] = ContextVar("_REQUEST_LOG", default=None)
"""Set while `serve_request` runs: the handler that takes this request's log lines."""
_ON_REPORT: ContextVar[Callable[[object], None] | None] = ContextVar("_ON_REPORT", default=None)
"""Set while `serve_request` runs: where the reports the command renders also go."""
_GROUP: ContextVar[GroupCommit[Any, Any] | None] = ContextVar("_GROUP", default=None)
"""Set while `serve_request` runs: the daemon's queue of deletes (`_joined`)."""
_OUTPUT: ContextVar[tuple[io.StringIO, io.StringIO] | None] = ContextVar("_OUTPUT", default=None)
"""Set while `serve_request` runs: where this request's stdout and stderr go."""
_STREAMS = threading.Lock()


class _RequestStream(io.TextIOBase):
    """sys.stdout (or sys.stderr) of a daemon serving requests: what a request's
    thread writes goes to that request's buffer (`_OUTPUT`), what any other
    thread writes to the stream this one replaced. Requests run on several
    threads at once, so `contextlib.redirect_stdout`, which swaps the stream of
    the whole process, cannot be used."""

    def __init__(self, default: Any, which: int) -> None:
        super().__init__()
        # A daemon started without a stdout (None) drops what other threads print.
        self.default = default if default is not None else open(os.devnull, "w")  # noqa: SIM115
        self.which = which

    def _target(self) -> Any:
        output = _OUTPUT.get()
        return self.default if output is None else output[self.which]

    def write(self, text: str) -> int:
        return int(self._target().write(text))

    def flush(self) -> None:
        self._target().flush()

    def isatty(self) -> bool:
        return bool(self._target().isatty())

    def fileno(self) -> int:
        return int(self._target().fileno())

    def writable(self) -> bool:
        return True

    @property
    def encoding(self) -> str:  # type: ignore[override]
        return getattr(self._target(), "encoding", None) or "utf-8"


def _route_output() -> None:
    """Put `_RequestStream`s in place of sys.stdout and sys.stderr (once)."""
    with _STREAMS:
        if not isinstance(sys.stdout, _RequestStream):
            sys.stdout = _RequestStream(sys.stdout, 0)
        if not isinstance(sys.stderr, _RequestStream):
            sys.stderr = _RequestStream(sys.stderr, 1)


class _ThreadOnly(logging.Filter):
    """Passes the records of one thread: a request's own, not the watcher's."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


def serve_request(
    argv: list[str],
    cancel: threading.Event,
    *,
    on_report: Callable[[object], None] | None = None,
    group: GroupCommit[Any, Any] | None = None,
) -> tuple[int, str, str]:
    """Run one command for a client of the daemon; returns (exit code, stdout, stderr).

    `cancel` is set when the client goes away or is interrupted (`refcount.serve`
    watches its connection): the command stops as an interrupted CLI process
    does (`refcount.interrupts`), and answers exit 130. `on_report` is given
    every report the command renders (the daemon's metrics count what its
    clients' commands did: frees, sweeps, roots).

    What the client gets is exactly what `main(argv)` would have printed: the
    same Typer app, renderers and error mapping, a stdout that is not a
    terminal (so no progress bar), and the request's log lines at WARNING and
    above, formatted as `main` formats them. (With -v a request would get only
    the lines the daemon's own logger levels let through, so the client runs
    -v commands itself.) The
    daemon's own logging is not touched: the callback sets the request's level
    on the request's handler instead of the root logger, and nothing here
    reconfigures or shuts down logging.

    How output is caught: Typer's echo writes to whatever `sys.stdout` is when
    it is called, so a command's output can only be caught there. Requests run
    on several threads at once (the server's, `refcount.serve`), so sys.stdout
    and sys.stderr are replaced, once, by streams that send what a request's
    thread writes to that request's buffers (`_RequestStream`), and what any
    other thread writes where it went before. The daemon's other threads never
    print anyway: they log, and the daemon's handlers were made by
    `_configure_logging` with `StreamHandler(sys.stderr)`, which keeps the
    stream object it was given, so their lines still reach the daemon's real
    stderr. A request's log lines are picked by thread (`_ThreadOnly`), so a
    batch the watcher logs meanwhile never reaches the client. Log records of
    the request also reach the daemon's own log at the daemon's level, which is
    a record of what clients did.

    Deletes (`delete tag`, `delete manifest`, not dry runs) join the daemon's
    group commit, `group` (`_joined`): the leader of a batch runs it on its
    own thread, so what the batch logs reaches the leader's client.

    Cost: the warm interpreter's import time is saved; each request still opens
    its own `Refcounter` (engine, schema check) and takes the store's lock like
    any CLI process, so it waits for a batch in progress and vice versa.
    """
    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(_LineFormatter())
    handler.setLevel(logging.WARNING)
    handler.addFilter(_ThreadOnly())
    root = logging.getLogger()
    _route_output()
    tokens = (
        _REQUEST_LOG.set(handler),
        _ON_REPORT.set(on_report),
        _GROUP.set(group),
        _OUTPUT.set((out, err)),
    )
    root.addHandler(handler)
    started = time.monotonic()
    try:
        with interrupts.cancelled_by(cancel):
            code = _run(argv)
    finally:
        root.removeHandler(handler)
        _OUTPUT.reset(tokens[3])
        _GROUP.reset(tokens[2])
        _ON_REPORT.reset(tokens[1])
        _REQUEST_LOG.reset(tokens[0])
    log.debug(
        "served %s: exit %d, %.1f ms", " ".join(argv), code, (time.monotonic() - started) * 1000
    )
    return code, out.getvalue(), err.getvalue()


def run() -> None:
    """Run the CLI in this process (`refcount.client.run` is the console script)."""
    sys.exit(main())
