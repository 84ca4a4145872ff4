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
  cause finds the database already in step and changes nothing.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from types import FrameType

from refcount.core import Policy, Refcounter
from refcount.daemon import Collector, Daemon
from refcount.errors import CannotServe, CannotWatch, InvalidOption, InvalidPolicy
from refcount.layout import policy_path, socket_path
from refcount.metrics import Metrics, MetricsServer
from refcount.scheduler import Timing
from refcount.serve import CommandServer, Handler
from refcount.verifier import DeepSlice, PeriodicVerify, Verifier

log = logging.getLogger(__name__)

__all__ = ["CannotWatch", "DeepSlice", "InvalidOption", "ReportSink", "WatchOptions", "run_daemon"]

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


@contextmanager
def _signals(daemon: Daemon) -> Iterator[None]:
    """SIGTERM/SIGINT stop after the batch in hand; SIGHUP asks for a full reconcile.

    Handlers run in the main thread between bytecodes; they only set flags
    under the daemon's condition, which the main thread never holds.
    """

    def stop(signum: int, _frame: FrameType | None) -> None:
        daemon.request_stop(signal.Signals(signum).name)

    def resync(_signum: int, _frame: FrameType | None) -> None:
        daemon.request_full("SIGHUP")

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
            with open_refcounter() if options.verifies else nullcontext() as verifier:
                _serve(rc, store.path, rc.policy, options, serve, verifier)
        finally:
            store.release_daemon_lock(lock, options.run_dir)


def _duration(value: timedelta) -> str:
    """A duration as the options spell it: 5m, 1h, 90s, 0."""
    seconds = value.total_seconds()
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds / size:g}{unit}"
    return f"{seconds:g}s" if seconds else "0"


def _serve(
    collector: Collector,
    store: Path,
    policy: Policy,
    options: WatchOptions,
    serve: Callable[[ReportSink], Handler] | None,
    verifier: Verifier | None = None,
) -> None:
    """Run the daemon on `collector` with its servers until it stops; the caller
    holds the store's daemon lock. `policy` is only reported."""
    metrics = Metrics()
    periodic = None if verifier is None else PeriodicVerify(verifier, metrics, options.deep_slice)
    daemon = Daemon(collector, store, options.timing(), metrics, verify=periodic)
    server = (
        MetricsServer(options.metrics_addr, metrics, daemon.health)
        if options.metrics_addr
        else None
    )
    commands = (
        None
        if serve is None
        else CommandServer(socket_path(store, options.run_dir), serve(daemon.report_served))
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
        with _signals(daemon):
            daemon.start()
            if commands is not None:
                try:
                    commands.start()
                except CannotServe as exc:  # watching matters more than the shortcut
                    log.warning("%s; refcount commands will run on their own", exc)
                    commands = None
            # Wake up now and then: a signal handler runs only between bytecodes.
            while not daemon.join(0.5):
                pass
    finally:
        if commands is not None:  # first: a request in hand finishes, none starts
            commands.close()
        daemon.stop()
        if server is not None:
            server.close()
    if daemon.failed is not None:
        raise daemon.failed
    log.info("stopped")
