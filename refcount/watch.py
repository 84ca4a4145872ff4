"""`refcount watch`: the process that keeps a store's reference counts right while
others change it.

How the pieces work together (each module's docstring says more):

- `refcount.events` hears the store change (watchdog), `refcount.scheduler`
  decides when to act on it, and `refcount.daemon.Daemon` acts: its worker
  thread reconciles through the `Refcounter`, runs gc and feeds the metrics.
- `run_daemon` here is the process around them: it opens the `Refcounter`,
  holds the store's daemon lock (a second daemon fails with StoreBusy), and
  reads from the store and its policy, once, what the others are given
  explicitly (the store's path, the socket's path, the start-up line's grace
  and TTL). Then the metrics server, the command socket (`refcount.serve`:
  CLI commands answered from this warm process, run by a callable the caller
  passes in, since the CLI sits above this module), signal handlers and
  shutdown. A served command runs on a Refcounter of its own, so the reports
  it renders are handed to the worker (`Daemon.report_served`), which counts
  them in the metrics and refreshes the gauges: the batch its file events
  cause finds the database already in step and changes nothing. Deletes are
  served beside the other requests (`refcount.argv.is_delete`): they meet in
  the CLI's group commit (`refcount.group`), one rewrite of index.json a batch.
- `run_root_daemon` is `watch --root`: the same daemon, one per repository
  under a root (`refcount.roots`), in one process, started and stopped as
  repositories appear and disappear.
"""

from __future__ import annotations

import logging
import signal
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType

from refcount import roots
from refcount.argv import is_delete
from refcount.core import Policy, Refcounter
from refcount.daemon import Collector, Daemon
from refcount.errors import CannotServe, CannotWatch, InvalidOption, InvalidPolicy, RefcountError
from refcount.layout import policy_path, socket_path
from refcount.metrics import Metrics, MetricsServer
from refcount.scheduler import Timing
from refcount.serve import CommandServer, Handler
from refcount.verifier import DeepSlice, PeriodicVerify, Verifier

log = logging.getLogger(__name__)

__all__ = [
    "CannotWatch",
    "DeepSlice",
    "InvalidOption",
    "ReportSink",
    "WatchOptions",
    "run_daemon",
    "run_root_daemon",
]

ROOT_RESCAN = 1.0
"""Seconds between walks of a --root for repositories created or removed."""

MMAP_THRESHOLD = 1 << 20
"""Bytes from which glibc's malloc gives every allocation pages of its own (see
`_map_large_allocations`)."""


def _map_large_allocations() -> None:
    """Make glibc give each allocation of MMAP_THRESHOLD bytes or more its own mapping,
    unmapped (returned to the system) when it is freed. Linux with glibc only; elsewhere
    nothing changes.

    Why: the daemon lives long and handles buffers as large as index.json (23 MB at
    100k images: its bytes, its text, the rewritten copy, lists of every entry) on
    several threads. glibc maps the first such buffer, and when it is freed it raises
    its threshold to that size, so every later one comes from a heap instead, where
    the small allocations made meanwhile pin it: freed, but never given back. Measured
    at 100k images (a library loop of a served delete on one thread and the batch
    after it on another, as the daemon runs them): RSS went from 134 MB idle to 243 MB
    within 5 deletes and stayed there; with this fixed threshold it is 108 MB idle and
    111 MB after 20 (tracemalloc: live Python memory stays at 26 MB throughout, so it
    is the allocator's, not a leak). The price: a large buffer's pages are faulted in
    anew each time, as in any process that reads index.json; the batch after a delete
    went from 18 to 29 ms of CPU at 100k, and the delete's own change was within the
    noise of a busy machine. `malloc_trim(0)` after each job gives as much back, but
    walks every arena to do it (18 ms at 100k).
    """
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    m_mmap_threshold = -3  # <malloc.h>
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(m_mmap_threshold, MMAP_THRESHOLD)
    except (OSError, AttributeError):  # another C library (musl): its own policy
        log.debug("mallopt(M_MMAP_THRESHOLD) unavailable", exc_info=True)


ReportSink = Callable[[object], None]
"""Takes each report a served command renders; called on the serving thread."""


@dataclass(frozen=True)
class WatchOptions:
    """How the daemon schedules its work (checked when made: InvalidOption)."""

    debounce: float = 0.1
    """Quiet period, in seconds, after the last event before a batch is applied."""
    resync: timedelta = timedelta(minutes=5)
    """Interval between full reconciles that catch whatever the events missed."""
    metrics_addr: str | None = None
    """HOST:PORT for /metrics and /healthz; None serves nothing."""
    gc_interval: timedelta = timedelta(minutes=5)
    """Interval between gc runs: orphans past the grace period, trash past its TTL."""
    verify_every: timedelta | None = None
    """Interval between shallow verifies; None (the default) runs none."""
    deep_every: timedelta | None = None
    """Interval between deep verify slices; None (the default) runs none."""
    deep_slice: DeepSlice = field(default_factory=DeepSlice)
    """How much one deep run hashes (every blob when unlimited)."""
    prune_every: timedelta | None = None
    """Interval between prunes by STORE/.refcount/policy.toml; None never prunes."""
    run_dir: Path | None = None
    """This sidecar's own directory for its lock (`watch.pid`) and command socket;
    None: STORE/.refcount. Sidecars on several hosts sharing one store each need one."""

    def __post_init__(self) -> None:
        # A zero interval would make the worker spin on full reconciles.
        if not self.debounce >= 0:
            raise InvalidOption(f"--debounce {self.debounce}: must be 0 or more seconds")
        for name, value in (
            ("--resync", self.resync),
            ("--gc-interval", self.gc_interval),
            ("--verify-every", self.verify_every),
            ("--deep-every", self.deep_every),
            ("--deep-slice", self.deep_slice.max_duration),
            ("--prune-every", self.prune_every),
        ):
            if value is not None and value <= timedelta(0):
                raise InvalidOption(f"{name} {_duration(value)}: must be longer than 0")
        if self.run_dir is not None and not self.run_dir.is_dir():
            raise InvalidOption(f"--run-dir {self.run_dir}: not a directory")
        if self.deep_slice.max_blobs is not None and self.deep_slice.max_blobs < 1:
            raise InvalidOption(f"--deep-slice {self.deep_slice.max_blobs}: must be 1 or more")

    @property
    def verifies(self) -> bool:
        """Periodic verifies are asked for (they need a Refcounter of their own)."""
        return self.verify_every is not None or self.deep_every is not None

    def timing(self) -> Timing:
        """The scheduler's figures for these options (the rest at their defaults)."""
        return Timing(
            debounce=self.debounce,
            resync=self.resync.total_seconds(),
            gc_interval=self.gc_interval.total_seconds(),
            verify_every=None if self.verify_every is None else self.verify_every.total_seconds(),
            deep_every=None if self.deep_every is None else self.deep_every.total_seconds(),
            prune_interval=None if self.prune_every is None else self.prune_every.total_seconds(),
        )


class _Daemons:
    """The daemons the signals reach: a stop asked for before one is added
    reaches it when it is added (a signal can come while a daemon starts)."""

    def __init__(self) -> None:
        self.stopping: str | None = None
        self.running: dict[Path, Daemon] = {}

    def add(self, key: Path, daemon: Daemon) -> None:
        self.running[key] = daemon
        if self.stopping is not None:
            daemon.request_stop(self.stopping)

    def stop(self, reason: str) -> None:
        self.stopping = reason
        for daemon in list(self.running.values()):
            daemon.request_stop(reason)

    def resync(self, reason: str) -> None:
        for daemon in list(self.running.values()):
            daemon.request_full(reason)


@contextmanager
def _signals(on_stop: Callable[[str], None], on_resync: Callable[[str], None]) -> Iterator[None]:
    """SIGTERM/SIGINT stop after the batch in hand; SIGHUP asks for a full reconcile.

    Handlers run in the main thread between bytecodes; they only set flags
    (under a daemon's condition, which the main thread never holds).
    """

    def stop(signum: int, _frame: FrameType | None) -> None:
        on_stop(signal.Signals(signum).name)

    def resync(_signum: int, _frame: FrameType | None) -> None:
        on_resync("SIGHUP")

    previous = {
        signal.SIGTERM: signal.signal(signal.SIGTERM, stop),
        signal.SIGINT: signal.signal(signal.SIGINT, stop),
        signal.SIGHUP: signal.signal(signal.SIGHUP, resync),
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def run_daemon(
    open_refcounter: Callable[[], Refcounter],
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None = None,
) -> None:
    """Run the watch daemon in this process until SIGTERM or SIGINT.

    With `serve`, CLI commands sent to `STORE/.refcount/refcount.sock` are run
    with the handler `serve(sink)` makes (see `refcount.serve`), which must pass
    every report a command renders to `sink`, so that the metrics count what
    the daemon's clients did. The socket exists only while the daemon
    holds the store's daemon lock, and is removed on a clean stop, as is the
    lock's file, `.refcount/watch.pid`.

    Raises StoreBusy when another daemon holds the store, InvalidAddress for a
    bad `metrics_addr`, CannotWatch when the store cannot be watched, and, with
    `prune_every`, InvalidPolicy when the store has no policy file or one that
    cannot be applied (the daemon does not start: a retention policy that was
    asked for and is not applied is worse than no daemon). A socket
    that cannot be made is logged, and the daemon watches without it. Returns
    normally after a clean stop.
    """
    _map_large_allocations()
    daemons = _Daemons()
    with (
        _signals(daemons.stop, daemons.resync),
        _running(open_refcounter, options, serve, metrics=True) as daemon,
    ):
        daemons.add(Path(), daemon)
        # Wake up now and then: a signal handler runs only between bytecodes.
        while not daemon.join(0.5):
            pass
    log.info("stopped")


def run_root_daemon(
    root: Path,
    open_store: Callable[[roots.Repository], Callable[[], Refcounter]],
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None = None,
    *,
    rescan: float = ROOT_RESCAN,
    forget: Callable[[roots.Repository], None] | None = None,
) -> None:
    """`watch --root`: one daemon per repository under `root`, all in this process,
    until SIGTERM or SIGINT (SIGHUP reaches every one).

    Each repository's daemon is `run_daemon`'s, on the Refcounter
    `open_store(repository)` opens: its own daemon lock, socket
    (`REPO/.refcount/refcount.sock`, so `refcount --store REPO` and
    `--root DIR --repo NAME` commands are served) and events. Every `rescan`
    seconds the root is walked again (`refcount.roots.find`): a repository that
    appeared gets a daemon (its first full reconcile indexes it), one that is
    gone has its daemon stopped and is forgotten: `forget(repository)` is called
    once its daemon has stopped, only if it is still gone (under a PostgreSQL
    database shared by the root, the CLI drops its schema then), and never when
    one walk finds most of the repositories gone (`refcount.roots.may_forget`).
    A repository that cannot be watched yet (a layout still being copied in,
    another daemon on it) is logged once and tried again at every walk; a daemon
    that fails is stopped and started again at the next walk. `--metrics-addr`
    and `--run-dir` are refused (one server or one socket per repository would
    need one address or one directory each).
    """
    if options.metrics_addr:
        raise InvalidOption("--metrics-addr with --root: metrics are served per store only")
    if options.run_dir is not None:
        raise InvalidOption("--run-dir with --root: each repository's socket is in its .refcount/")
    _map_large_allocations()
    daemons = _Daemons()
    stacks: dict[str, tuple[roots.Repository, ExitStack]] = {}
    refused: dict[str, str] = {}

    def start(repository: roots.Repository) -> None:
        stack = ExitStack()
        try:
            daemon = stack.enter_context(
                _running(open_store(repository), options, serve, metrics=False)
            )
        except RefcountError as exc:
            stack.close()
            if refused.get(repository.name) != str(exc):
                log.warning(
                    "%s: not watched (tried again in %g s): %s", repository.name, rescan, exc
                )
            refused[repository.name] = str(exc)
            return
        refused.pop(repository.name, None)
        stacks[repository.name] = (repository, stack)
        daemons.add(repository.path, daemon)

    def stop(name: str, reason: str) -> roots.Repository:
        repository, stack = stacks.pop(name)
        daemons.running.pop(repository.path).request_stop(reason)
        try:
            stack.close()
        except (RefcountError, OSError) as exc:
            log.warning("%s: stopped: %s", name, exc)
        log.info("%s: %s", name, reason)
        return repository

    def forgotten(repository: roots.Repository) -> None:
        # Checked again now that its daemon is gone: a repository made again under
        # the same name in the meantime keeps what it has.
        if forget is None or repository.still_there():
            return
        try:
            forget(repository)
        except RefcountError as exc:
            log.warning("%s: not forgotten: %s", repository.name, exc)

    log.info("watching the repositories under %s (walked every %g s)", root, rescan)
    with _signals(daemons.stop, daemons.resync):
        try:
            while daemons.stopping is None:
                wanted = {r.name: r for r in roots.find(root)}
                gone = sorted(stacks.keys() - wanted.keys())
                forget_them = roots.may_forget(len(gone), len(stacks))
                if gone and forget is not None and not forget_them:
                    log.warning(
                        "%d of %d repositories gone at once: their daemons stop, their "
                        "databases are kept (an unmounted root comes back as it was)",
                        len(gone),
                        len(stacks),
                    )
                for name in gone:
                    repository = stop(name, "forgotten: the repository is gone")
                    if forget_them:
                        forgotten(repository)
                for name in sorted(stacks.keys() & wanted.keys()):
                    if daemons.running[stacks[name][0].path].join(0):
                        stop(name, "its daemon stopped; starting it again")
                for name in sorted(wanted.keys() - stacks.keys()):
                    start(wanted[name])
                for name in refused.keys() - wanted.keys():
                    del refused[name]
                deadline = time.monotonic() + rescan
                while daemons.stopping is None and time.monotonic() < deadline:
                    time.sleep(0.05)
        finally:
            daemons.stop(daemons.stopping or "stopping")
            for name in sorted(stacks):
                stop(name, "stopped")
    log.info("stopped")


@contextmanager
def _running(
    open_refcounter: Callable[[], Refcounter],
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None,
    *,
    metrics: bool,
) -> Iterator[Daemon]:
    """One store's daemon, started, holding the store's daemon lock, with its
    command socket (and, with `metrics`, its metrics server); stopped and its
    lock given back on leaving, re-raising what made the daemon fail."""
    with open_refcounter() as rc:
        # The one place that looks inside the Refcounter: what the rest is given.
        store = rc.store
        if options.prune_every is not None and rc.policy_rules() is None:
            raise InvalidPolicy(
                f"--prune-every: {policy_path(store.path)}: no such file; write the policy first"
            )
        lock = store.hold_daemon_lock(options.run_dir)
        try:
            # The periodic verifies run on a thread and a Refcounter of their own.
            with (
                open_refcounter() if options.verifies else nullcontext() as verifier,
                _serve(rc, store.path, rc.policy, options, serve, verifier, metrics) as d,
            ):
                yield d
        finally:
            store.release_daemon_lock(lock, options.run_dir)


def _duration(value: timedelta) -> str:
    """A duration as the options spell it: 5m, 1h, 90s, 0."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds else "0"


@contextmanager
def _serve(
    collector: Collector,
    store: Path,
    policy: Policy,
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None,
    verifier: Verifier | None = None,
    metrics_server: bool = True,
) -> Iterator[Daemon]:
    """The daemon on `collector` with its servers, running until the caller
    leaves; the caller holds the store's daemon lock. `policy` is only reported."""
    metrics = Metrics()
    periodic = None if verifier is None else PeriodicVerify(verifier, metrics, options.deep_slice)
    daemon = Daemon(collector, store, options.timing(), metrics, verify=periodic)
    server = (
        MetricsServer(options.metrics_addr, metrics, daemon.health)
        if options.metrics_addr and metrics_server
        else None
    )
    commands = (
        None
        if serve is None
        else CommandServer(
            socket_path(store, options.run_dir), serve(daemon.report_served), is_delete
        )
    )
    log.info(
        "watching %s (debounce %.3g s, resync every %s, gc every %s, grace %s, trash TTL %s%s)",
        store,
        options.debounce,
        *map(_duration, (options.resync, options.gc_interval)),
        *map(_duration, (policy.grace, policy.trash_ttl)),
        ""
        if options.prune_every is None
        else f", prune by {policy_path(store)} every {_duration(options.prune_every)}",
    )
    if options.verifies:
        log.info(
            "verifying: shallow every %s, deep every %s (%s a run)",
            "-" if options.verify_every is None else _duration(options.verify_every),
            "-" if options.deep_every is None else _duration(options.deep_every),
            options.deep_slice.describe(),
        )
    try:
        daemon.start()
        if commands is not None:
            try:
                commands.start()
            except CannotServe as exc:  # watching matters more than the shortcut
                log.warning("%s; refcount commands will run on their own", exc)
                commands = None
        yield daemon
    finally:
        if commands is not None:  # first: a request in hand finishes, none starts
            commands.close()
        daemon.stop()
        if server is not None:
            server.close()
    if daemon.failed is not None:
        raise daemon.failed
