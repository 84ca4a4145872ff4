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
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Any

import typer

from refcount import interrupts
from refcount.core import Refcounter
from refcount.core import open as open_store
from refcount.durations import parse_duration
from refcount.errors import RefcountError
from refcount.reports import (
    BlobInfo,
    DeleteReport,
    GcReport,
    SyncReport,
    TagInfo,
    VerifyReport,
    to_json,
)

log = logging.getLogger("refcount")

INTERNAL_ERROR = 3

SERVED_COMMANDS = frozenset({"init", "sync", "delete", "verify", "gc", "tags", "show"})
"""The commands a daemon runs for a client: not `watch` (a daemon in a daemon)
nor `db` (migrations are run by hand, next to the process that owns the schema)."""


class NotServed(RefcountError):
    """A request for a command the daemon does not run for clients (exit 2)."""


app = typer.Typer(
    name="refcount",
    help="Reference counts for an OCI image layout: free exactly what nothing else needs.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    pretty_exceptions_show_locals=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
delete_app = typer.Typer(
    help="Remove index.json entries and free what nothing else needs.", no_args_is_help=True
)
db_app = typer.Typer(help="Schema migrations (Alembic).", no_args_is_help=True)
app.add_typer(delete_app, name="delete")
app.add_typer(db_app, name="db")


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

    def open(self) -> Refcounter:
        return open_store(
            self.store,
            self.db,
            trash_ttl=self.trash_ttl,
            grace=self.grace,
            keep_referrers=self.keep_referrers,
            keep_untagged=self.keep_untagged,
            max_manifest=self.max_manifest,
        )

    @contextmanager
    def counter(self) -> Iterator[Refcounter]:
        """The store's Refcounter, drawing a progress bar on a terminal (never in JSON mode)."""
        with self.open() as rc:
            if self.json or not sys.stdout.isatty():
                yield rc
                return
            from rich.progress import Progress

            with Progress(transient=True) as bar:
                tasks: dict[str, Any] = {}

                def show(phase: str, done: int, total: int) -> None:
                    if phase not in tasks:
                        tasks[phase] = bar.add_task(phase, total=total)
                    bar.update(tasks[phase], completed=done, total=total)

                rc.progress = show
                yield rc


DryRun = Annotated[
    bool, typer.Option("--dry-run", "-n", help="Print what would be removed; change nothing.")
]


@app.callback()
def configure(
    ctx: typer.Context,
    store: Annotated[
        Path, typer.Option(envvar="REFCOUNT_STORE", help="The OCI layout directory.")
    ] = Path("."),
    db: Annotated[
        str | None,
        typer.Option(
            envvar="REFCOUNT_DB", help="SQLAlchemy URL; default STORE/.refcount/refcount.db."
        ),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print one JSON document on stdout.")
    ] = False,
    verbose: Annotated[
        int, typer.Option("--verbose", "-v", count=True, help="More logging (-vv for debug).")
    ] = 0,
    trash_ttl: Annotated[
        str,
        typer.Option(help="How long freed blobs stay in .refcount/trash/ (0 = unlink at once)."),
    ] = "10m",
    grace: Annotated[
        str, typer.Option(help="Age before an orphan blob may be swept by gc.")
    ] = "1h",
    keep_referrers: Annotated[
        bool, typer.Option(help="Keep untagged referrers whose subject is freed.")
    ] = False,
    keep_untagged: Annotated[
        bool, typer.Option(help="Keep untagged entries only the deleted image reached.")
    ] = False,
    max_manifest: Annotated[int, typer.Option(help="Largest manifest parsed, in bytes.")] = 4
    * 1024
    * 1024,
) -> None:
    """Reference counts for an OCI image layout."""
    level = logging.WARNING - 10 * min(verbose, 2)
    request_log = _REQUEST_LOG.get()
    if request_log is None:
        logging.getLogger().setLevel(level)
    else:  # inside a daemon: this request's verbosity, never the daemon's own
        request_log.setLevel(level)
        if ctx.invoked_subcommand not in SERVED_COMMANDS:
            raise NotServed(f"{ctx.invoked_subcommand}: not run by the daemon; run it directly")
    ctx.obj = Settings(
        store,
        db,
        as_json,
        parse_duration(trash_ttl),
        parse_duration(grace),
        keep_referrers,
        keep_untagged,
        max_manifest,
    )


def _settings(ctx: typer.Context) -> Settings:
    settings = ctx.obj
    assert isinstance(settings, Settings)
    return settings


@app.command()
def init(ctx: typer.Context) -> None:
    """Create or upgrade the database and index the store (idempotent).

    \b
    Example:
        refcount --store /srv/oci init
    """
    with _settings(ctx).counter() as rc:
        render(ctx, rc.init())


@app.command()
def sync(ctx: typer.Context) -> None:
    """Reconcile the database with the disk once, applying only the differences."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.sync())


@delete_app.command("tag")
def delete_tag(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="The tag.")],
    dry_run: DryRun = False,
) -> None:
    """Remove every index.json entry tagged REF; free what reaches zero.

    \b
    Example:
        refcount delete tag app:1.0 --dry-run
    """
    with _settings(ctx).counter() as rc:
        render(ctx, rc.delete_tag(ref, dry_run=dry_run))


@delete_app.command("manifest")
def delete_manifest(
    ctx: typer.Context,
    digest: Annotated[str, typer.Argument(help="sha256:...")],
    dry_run: DryRun = False,
) -> None:
    """Remove every index.json entry pointing at DIGEST; free what reaches zero."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.delete_manifest(digest, dry_run=dry_run))


@app.command()
def verify(
    ctx: typer.Context,
    deep: Annotated[bool, typer.Option(help="Also hash every blob and check sizes.")] = False,
    repair: Annotated[
        bool, typer.Option(help="Rewrite the database to match the disk (never deletes content).")
    ] = False,
) -> None:
    """Recount from scratch and compare with the database; exit 1 on any disagreement."""
    with _settings(ctx).counter() as rc:
        report = rc.verify(deep=deep, repair=repair)
    render(ctx, report)
    if not report.ok:
        raise typer.Exit(1)


@app.command()
def gc(
    ctx: typer.Context,
    dry_run: DryRun = False,
    grace: Annotated[
        str | None, typer.Option(help="Override the orphan grace period, e.g. 10m.")
    ] = None,
) -> None:
    """Sweep orphans older than the grace period; purge expired trash."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.gc(dry_run=dry_run, grace=None if grace is None else parse_duration(grace)))


@app.command()
def tags(ctx: typer.Context) -> None:
    """The tags, their digests and the bytes of each image."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.tags())


@app.command()
def show(
    ctx: typer.Context, ref: Annotated[str, typer.Argument(help="A digest or a tag.")]
) -> None:
    """Count, state, parents (why it is alive) and children of a blob."""
    with _settings(ctx).counter() as rc:
        render(ctx, rc.show(ref))


@app.command()
def watch(
    ctx: typer.Context,
    debounce: Annotated[
        float,
        typer.Option(help="Quiet period after the last event before a batch is applied, seconds."),
    ] = 0.1,
    resync: Annotated[
        str, typer.Option(help="Interval between full reconciles that catch missed events.")
    ] = "5m",
    gc_interval: Annotated[
        str,
        typer.Option(help="Interval between sweeps of orphans past --grace and expired trash."),
    ] = "5m",
    metrics_addr: Annotated[
        str | None, typer.Option(help="HOST:PORT for /metrics and /healthz (default off).")
    ] = None,
    log_format: Annotated[str, typer.Option(help="text or json.")] = "text",
) -> None:
    """Run as a daemon beside the store: watch, reconcile, free (SIGTERM to stop, SIGHUP to
    reconcile fully)."""
    from refcount.watch import WatchOptions, run_daemon

    settings = _settings(ctx)
    _configure_logging(log_format)
    if log.getEffectiveLevel() > logging.INFO:  # refcount's own lines; not alembic's
        log.setLevel(logging.INFO)
    options = WatchOptions(
        debounce, parse_duration(resync), metrics_addr, parse_duration(gc_interval)
    )
    # The daemon parses its clients' command lines in this process: only what a
    # client sent (it sends --store, and --db from its own environment) may
    # count, never the daemon's REFCOUNT_STORE or REFCOUNT_DB.
    for name in ("REFCOUNT_STORE", "REFCOUNT_DB"):
        os.environ.pop(name, None)
    run_daemon(settings.open, options, serve_request)


@db_app.command("upgrade")
def db_upgrade(ctx: typer.Context) -> None:
    """Bring the database schema to the newest revision."""
    with _settings(ctx).counter() as rc:
        typer.echo(f"schema at {rc.schema_revision()}")


@db_app.command("current")
def db_current(ctx: typer.Context) -> None:
    """Print the database's schema revision."""
    from refcount.db.engine import current_revision, default_url, make_engine

    settings = _settings(ctx)
    engine = make_engine(settings.db or default_url(settings.store.absolute()))
    try:
        revision = current_revision(engine)
    finally:
        engine.dispose()
    typer.echo(revision or "none (run `refcount init`)")


# --- rendering ----------------------------------------------------------------
def render(ctx: typer.Context, report: Any) -> None:
    if _settings(ctx).json:
        typer.echo(json.dumps(to_json(report), indent=2, default=str))
        return
    for line in _text(report):
        typer.echo(line)


def _size(n: int | None) -> str:
    return "?" if n is None else f"{n} B"


def _text(report: Any) -> list[str]:
    if isinstance(report, DeleteReport):
        verb = ("would remove", "would free") if report.dry_run else ("removed", "freed")
        lines = [f"{verb[0]} {len(report.removed)} index.json entries:"]
        lines += [f"  {e.tag or '(untagged)'}  {e.digest}" for e in report.removed]
        lines.append(f"{verb[1]} {len(report.freed)} blobs, {report.freed_bytes} bytes:")
        lines += [
            f"  {b.digest}  {_size(b.size)}  {b.media_type or ''}".rstrip() for b in report.freed
        ]
        return lines
    if isinstance(report, SyncReport):
        lines = [
            f"roots +{report.roots_added} -{report.roots_removed}; "
            f"{report.became_live} blobs became live; "
            f"{len(report.freed)} freed ({report.freed_bytes} bytes); "
            f"{len(report.restored)} restored; {len(report.missing)} missing; "
            f"{len(report.orphans)} new orphans"
        ]
        lines += [f"missing: {d}" for d in report.missing]
        lines += [f"skipped: {p}" for p in report.problems]
        return lines
    if isinstance(report, VerifyReport):
        return _verify_text(report)
    if isinstance(report, GcReport):
        sweep, purge = ("would sweep", "would purge") if report.dry_run else ("swept", "purged")
        lines = [
            f"{sweep} {len(report.swept)} orphans, {purge} {len(report.purged)} trashed blobs, "
            f"{report.freed_bytes} bytes"
        ]
        lines += [
            f"  orphan {a.digest}  {a.size} B  {a.age_seconds:.0f}s old" for a in report.swept
        ]
        lines += [f"  trash  {a.digest}  {a.size} B" for a in report.purged]
        return lines
    if isinstance(report, list):
        return _tags_text(report)
    if isinstance(report, BlobInfo):
        lines = [
            f"digest:     {report.digest}",
            f"count:      {report.count}",
            f"state:      {report.state}",
            f"size:       {_size(report.size)}",
            f"media type: {report.media_type or '?'}",
        ]
        if report.tags:
            lines.append("roots:      " + ", ".join(t or "(untagged)" for t in report.tags))
        if report.subject:
            lines.append(f"subject:    {report.subject}")
        if report.problem:
            lines.append(f"problem:    {report.problem}")
        lines += [f"parent:     {p.digest} ({p.kind})" for p in report.parents]
        lines += [f"child:      {c.digest} ({c.kind})" for c in report.children]
        return lines
    raise TypeError(f"no renderer for {type(report).__name__}")


def _verify_text(report: VerifyReport) -> list[str]:
    repaired = " (repaired)" if report.repaired else ""
    lines = [
        f"drift {d.digest}: expected {d.expected}, recorded {d.recorded}{repaired}"
        if d.expected_state is None
        else f"drift {d.digest}: state is {d.expected_state}, recorded {d.recorded_state}{repaired}"
        for d in report.drift
    ]
    lines += [f"missing {d}: referenced but not in blobs/" for d in report.missing]
    lines += [f"corrupt {c.digest}: {c.reason}" for c in report.corrupt]
    lines += [f"problem {p}" for p in report.problems]
    lines += [f"orphan {a.digest}: {a.size} B, {a.age_seconds:.0f}s old" for a in report.orphans]
    lines += [f"quarantined {a.digest}: {a.size} B" for a in report.quarantined]
    status = "OK" if report.ok else "FAILED"
    lines.append(
        f"{status}: {report.roots} roots, {report.live} live blobs"
        + (", content hashed" if report.deep else "")
    )
    return lines


def _tags_text(tags: list[TagInfo]) -> list[str]:
    width = max((len(t.tag) for t in tags), default=3)
    return [f"{'TAG':<{width}}  {'DIGEST':<71}  SIZE"] + [
        f"{t.tag:<{width}}  {t.digest:<71}  {_size(t.size)}" for t in tags
    ]


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
    code = _outcome(argv)
    if interrupts.requested():
        typer.echo(interrupts.describe(), err=True)
        return interrupts.EXIT_CODE
    return code


def _outcome(argv: list[str] | None) -> int:
    try:
        result = _command().main(args=argv, standalone_mode=False, prog_name="refcount")
        return result if isinstance(result, int) else 0
    except interrupts.Interrupted:
        log.debug("interrupted", exc_info=True)
        typer.echo(interrupts.describe(), err=True)
        return interrupts.EXIT_CODE
    except RefcountError as exc:
        log.debug("error details", exc_info=True)
        typer.echo(f"refcount: error: {exc}", err=True)
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        typer.echo("refcount: interrupted", err=True)
        return 130
    except typer.TyperException as exc:  # usage errors: bad flag, missing argument
        typer.echo(f"refcount: error: {exc.format_message()}", err=True)
        code: int = getattr(exc, "exit_code", 2)
        return code
    except Exception as exc:
        log.debug("internal error", exc_info=True)
        typer.echo(
            f"refcount: internal error: {type(exc).__name__}: {exc} (run with -vv for details)",
            err=True,
        )
        return INTERNAL_ERROR


# --- commands run inside the daemon ----------------------------------------------
_REQUEST_LOG: ContextVar[logging.Handler | None] = ContextVar("_REQUEST_LOG", default=None)
"""Set while `serve_request` runs: the handler that takes this request's log lines."""
_SERVING = threading.Lock()


class _ThreadOnly(logging.Filter):
    """Passes the records of one thread: a request's own, not the watcher's."""

    def __init__(self) -> None:
        super().__init__()
        self.thread = threading.get_ident()

    def filter(self, record: logging.LogRecord) -> bool:
        return record.thread == self.thread


def serve_request(argv: list[str], cancel: threading.Event) -> tuple[int, str, str]:
    """Run one command for a client of the daemon; returns (exit code, stdout, stderr).

    `cancel` is set when the client goes away or is interrupted (`refcount.serve`
    watches its connection): the command stops as an interrupted CLI process
    does (`refcount.interrupts`), and answers exit 130.

    What the client gets is exactly what `main(argv)` would have printed: the
    same Typer app, renderers and error mapping, a stdout that is not a
    terminal (so no progress bar), and the request's log lines at WARNING and
    above, formatted as `main` formats them. (With -v a request would get only
    the lines the daemon's own logger levels let through, so the client runs
    -v commands itself.) The
    daemon's own logging is not touched: the callback sets the request's level
    on the request's handler instead of the root logger, and nothing here
    reconfigures or shuts down logging.

    Why `redirect_stdout`/`redirect_stderr`, which swap `sys.stdout` for the
    whole process: Typer's echo writes to whatever `sys.stdout` is when it is
    called, so a command's output can only be caught there. That is safe here
    because (1) requests run one at a time (`_SERVING`), (2) the daemon's other
    threads never print: they log, and the daemon's handlers were made by
    `_configure_logging` with `StreamHandler(sys.stderr)`, which keeps the
    stream object it was given, so their lines still reach the daemon's real
    stderr while a request runs, and (3) a request's log lines are picked by
    thread (`_ThreadOnly`), so a batch the watcher logs meanwhile never reaches
    the client. Log records of the request also reach the daemon's own log at
    the daemon's level, which is a record of what clients did.

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
    with _SERVING:
        token = _REQUEST_LOG.set(handler)
        root.addHandler(handler)
        started = time.monotonic()
        try:
            with redirect_stdout(out), redirect_stderr(err), interrupts.cancelled_by(cancel):
                code = _run(argv)
        finally:
            root.removeHandler(handler)
            _REQUEST_LOG.reset(token)
    log.debug(
        "served %s: exit %d, %.1f ms", " ".join(argv), code, (time.monotonic() - started) * 1000
    )
    return code, out.getvalue(), err.getvalue()


def run() -> None:
    """Run the CLI in this process (`refcount.client.run` is the console script)."""
    sys.exit(main())
