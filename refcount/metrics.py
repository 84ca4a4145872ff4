"""Prometheus metrics and a health check for the watch daemon.

How the pieces fit together: `Metrics` owns its own `CollectorRegistry` (never
prometheus_client's global one, so two daemons in one process, or a test, never
see each other's figures). The daemon feeds it the reports it already has: a
`SyncReport` after every batch or full reconcile, a `GcReport` after every gc,
the reports of the commands it served for clients, and `Refcounter.stats()`
for the gauges. `MetricsServer` serves the registry on
`/metrics` and the daemon's health on `/healthz` from a stdlib HTTP server in a
thread, so the only dependency is prometheus_client's text exposition.

This is the only module that imports prometheus_client; it knows nothing of
files, SQL or watchdog.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

from refcount.errors import InvalidAddress
from refcount.reports import DeleteBatch, DeleteReport, GcReport, PruneReport, Stats, SyncReport

log = logging.getLogger(__name__)

# Reconcile latency spans a no-op batch on a small store (about a millisecond)
# to a full reconcile of a large one (tens of seconds).
DURATION_BUCKETS = (
    *(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5),
    *(1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
)


GROUP_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
"""Deletes per group commit: one when clients come one by one, up to the number
of connections the daemon serves at once (refcount.serve.MAX_SERVING)."""

VERIFY_PROBLEMS = ("drift", "missing", "corrupt", "problem", "orphan")


@dataclass(frozen=True)
class Health:
    """What /healthz answers: 200 when `ok`, else 503; `detail` is the JSON body."""

    ok: bool
    detail: dict[str, Any] = field(default_factory=dict)


class Metrics:
    """The daemon's figures, in a registry of its own.

    Gauges describe the store now (from `Stats`); counters accumulate what the
    daemon did since it started (from reports). Every method is thread-safe.

    A job's counters and the gauges it changes are one update: the daemon makes
    them inside `together()`, and a scrape (`exposition`) waits for the block to
    end, so it never shows the blobs a batch freed counted while the gauges
    still describe the store before it.
    """

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.roots = Gauge("refcount_roots", "Entries of index.json (roots).", registry=r)
        self.live_blobs = Gauge(
            "refcount_live_blobs", "Blobs with a reference count above zero.", registry=r
        )
        self.live_bytes = Gauge("refcount_live_bytes", "Bytes of the live blobs.", registry=r)
        self.missing_blobs = Gauge(
            "refcount_missing_blobs",
            "Referenced blobs whose file is not in blobs/ (deleted by someone else).",
            registry=r,
        )
        self.orphan_blobs = Gauge(
            "refcount_orphan_blobs",
            "Blobs in blobs/ that no root has reached yet (uploads, crashed pushes).",
            registry=r,
        )
        self.quarantined_blobs = Gauge(
            "refcount_quarantined_blobs", "Freed blobs waiting in .refcount/trash/.", registry=r
        )
        self.quarantined_bytes = Gauge(
            "refcount_quarantined_bytes", "Bytes waiting in .refcount/trash/.", registry=r
        )
        self.problem_blobs = Gauge(
            "refcount_problem_blobs", "Blobs recorded with a parse problem.", registry=r
        )
        self.freed_blobs = Counter(
            "refcount_freed_blobs",
            "Blobs that left blobs/: reason=released (count reached zero after a change to "
            "the store), deleted (by a refcount delete command) or orphan (swept).",
            ["reason"],
            registry=r,
        )
        self.freed_bytes = Counter(
            "refcount_freed_bytes",
            "Bytes that left blobs/, by the same reasons as refcount_freed_blobs.",
            ["reason"],
            registry=r,
        )
        self.pruned_tags = Counter(
            "refcount_pruned_tags",
            "Tags deleted by the daemon's periodic prune (--prune-every, policy.toml).",
            registry=r,
        )
        self.pruned_bytes = Counter(
            "refcount_pruned_bytes",
            "Bytes freed by the daemon's periodic prune (also in refcount_freed_bytes, "
            "reason=deleted).",
            registry=r,
        )
        self.purged_blobs = Counter(
            "refcount_purged_blobs", "Quarantined blobs whose bytes were purged.", registry=r
        )
        self.purged_bytes = Counter(
            "refcount_purged_bytes", "Bytes purged from .refcount/trash/.", registry=r
        )
        self.restored_blobs = Counter(
            "refcount_restored_blobs",
            "Quarantined blobs moved back because a new root needed them.",
            registry=r,
        )
        self.missing_detected = Counter(
            "refcount_missing_detected",
            "Transitions of a referenced blob to missing (each is logged with its tags).",
            registry=r,
        )
        self.batches = Counter(
            "refcount_batches_applied",
            "Reconciles applied: kind=batch (from events) or full (whole store).",
            ["kind"],
            registry=r,
        )
        self.drift = Counter(
            "refcount_drift_found",
            "Changes that a periodic or recovery full reconcile found and the events missed.",
            registry=r,
        )
        self.mass_frees = Counter(
            "refcount_mass_frees",
            "Outside changes of index.json that freed more than the threshold of the live "
            "bytes (or every root) at once: their blobs are held in the quarantine.",
            registry=r,
        )
        self.mass_free_held = Gauge(
            "refcount_mass_free_held_blobs",
            "Blobs of mass frees still held in .refcount/trash/ (restorable until the hold ends).",
            registry=r,
        )
        self.failures = Counter(
            "refcount_reconcile_failures",
            "Reconciles that failed and will be retried; reason=invalid_index or error.",
            ["reason"],
            registry=r,
        )
        self.index_rewrites = Counter(
            "refcount_index_rewrites",
            "Rewrites of index.json by the deletes the daemon served for its clients: one "
            "per group commit that removed entries, however many deletes it held.",
            registry=r,
        )
        self.delete_group_size = Histogram(
            "refcount_delete_group_size",
            "Deletes served together in one group commit (one transaction and at most one "
            "rewrite of index.json); _count is the group commits, _sum the deletes.",
            buckets=GROUP_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            "refcount_reconcile_duration_seconds",
            "Time to apply one reconcile, by kind (batch, full, gc, prune).",
            ["kind"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.last_success = Gauge(
            "refcount_last_successful_reconcile_timestamp_seconds",
            "Unix time of the last reconcile that succeeded.",
            registry=r,
        )
        self.verify_last = Gauge(
            "refcount_verify_last_timestamp_seconds",
            "Unix time of the last verify, by kind (shallow: recount; deep: a slice hashed).",
            ["kind"],
            registry=r,
        )
        self.verify_last_ok = Gauge(
            "refcount_verify_last_success_timestamp_seconds",
            "Unix time of the last verify, by kind, that found no problem.",
            ["kind"],
            registry=r,
        )
        self.verify_ok = Gauge(
            "refcount_verify_ok",
            "1 when the last verify of the kind found no problem, 0 when it found some.",
            ["kind"],
            registry=r,
        )
        self.verify_problems = Gauge(
            "refcount_verify_problems",
            "Problems the verifies found and no later verify cleared, by problem: drift, "
            "missing, corrupt, problem (a manifest that cannot be read); orphan: the orphans "
            "the last verify listed (not a failure).",
            ["problem"],
            registry=r,
        )
        self.verify_lap = Gauge(
            "refcount_verify_deep_lap_progress_ratio",
            "How much of the blobs present the current deep lap has hashed (0 to 1).",
            registry=r,
        )
        self.verify_hashed = Counter(
            "refcount_verify_blobs_hashed",
            "Blobs whose content the daemon's deep verifies hashed.",
            registry=r,
        )
        # No verify_ok sample before the first verify of a kind: a 0 would read as
        # "problems found" to an alert.
        for problem in VERIFY_PROBLEMS:
            self.verify_problems.labels(problem)
        for kind in ("batch", "full"):
            self.batches.labels(kind)
        for kind in ("batch", "full", "gc"):
            self.duration.labels(kind)
        for reason in ("released", "deleted", "orphan"):
            self.freed_blobs.labels(reason)
            self.freed_bytes.labels(reason)
        for reason in ("invalid_index", "error"):
            self.failures.labels(reason)

    def record_sync(self, report: SyncReport, seconds: float, *, full: bool, drift: bool) -> None:
        """One applied reconcile. `drift`: a full reconcile that should have found nothing."""
        kind = "full" if full else "batch"
        self.batches.labels(kind).inc()
        self.duration.labels(kind).observe(seconds)
        self._count_sync(report)
        if drift and report.changed:
            self.drift.inc(_change_count(report))
        self.last_success.set_to_current_time()

    def record_gc(self, report: GcReport, seconds: float) -> None:
        self.duration.labels("gc").observe(seconds)
        self._count_gc(report)

    def record_prune(self, report: PruneReport, seconds: float) -> None:
        """One periodic prune that ran (not a dry run): its tags, and its frees as
        reason=deleted, as a delete's."""
        self.duration.labels("prune").observe(seconds)
        self.pruned_tags.inc(sum(1 for c in report.chosen if c.tag is not None))
        self.pruned_bytes.inc(report.freed_bytes)
        self.freed_blobs.labels("deleted").inc(len(report.freed))
        self.freed_bytes.labels("deleted").inc(report.freed_bytes)

    def record_delete_batch(self, batch: DeleteBatch) -> None:
        """One group commit of served deletes (their frees come with their reports)."""
        self.delete_group_size.observe(batch.requests)
        if batch.written:
            self.index_rewrites.inc()

    def record_served(self, report: DeleteReport | GcReport | SyncReport) -> None:
        """What a command the daemon ran for a client did (not a dry run).

        The same counters as the daemon's own work, by the same reasons; a
        delete's frees count as reason=deleted. Batches, durations and drift
        stay the daemon's own: it did not schedule this work.
        """
        if isinstance(report, DeleteReport):
            self.freed_blobs.labels("deleted").inc(len(report.freed))
            self.freed_bytes.labels("deleted").inc(report.freed_bytes)
        elif isinstance(report, GcReport):
            self._count_gc(report)
        else:
            self._count_sync(report)

    def _count_sync(self, report: SyncReport) -> None:
        self.freed_blobs.labels("released").inc(len(report.freed))
        self.freed_bytes.labels("released").inc(report.freed_bytes)
        self.restored_blobs.inc(len(report.restored))
        self.missing_detected.inc(len(report.missing))
        if report.mass_free is not None:
            self.mass_frees.inc()

    def _count_gc(self, report: GcReport) -> None:
        self.freed_blobs.labels("orphan").inc(len(report.swept))
        self.freed_bytes.labels("orphan").inc(sum(a.size for a in report.swept))
        self.purged_blobs.inc(len(report.purged))
        self.purged_bytes.inc(sum(a.size for a in report.purged))

    def record_failure(self, reason: str) -> None:
        self.failures.labels(reason).inc()

    def record_stats(self, stats: Stats) -> None:
        self.roots.set(stats.roots)
        self.live_blobs.set(stats.live_blobs)
        self.live_bytes.set(stats.live_bytes)
        self.missing_blobs.set(stats.missing_blobs)
        self.orphan_blobs.set(stats.orphan_blobs)
        self.quarantined_blobs.set(stats.quarantined_blobs)
        self.quarantined_bytes.set(stats.quarantined_bytes)
        self.problem_blobs.set(stats.problems)
        self.mass_free_held.set(stats.mass_free_held_blobs)

    def record_verify(
        self,
        kind: str,
        *,
        at: float,
        ok: bool,
        problems: dict[str, int],
        lap: float | None = None,
        hashed: int = 0,
    ) -> None:
        """A verify of `kind` (shallow or deep) done at unix time `at`; `problems` by
        kind (VERIFY_PROBLEMS); `lap`, the deep lap's progress from 0 to 1."""
        self.verify_last.labels(kind).set(at)
        if ok:
            self.verify_last_ok.labels(kind).set(at)
        self.verify_ok.labels(kind).set(1 if ok else 0)
        for problem in VERIFY_PROBLEMS:
            self.verify_problems.labels(problem).set(problems.get(problem, 0))
        if lap is not None:
            self.verify_lap.set(lap)
        self.verify_hashed.inc(hashed)

    @contextmanager
    def together(self) -> Iterator[None]:
        """Make the updates inside the block visible to a scrape all at once."""
        with self._lock:
            yield

    def exposition(self) -> bytes:
        """The registry in Prometheus text format, between two `together()` blocks."""
        with self._lock:
            return generate_latest(self.registry)


def _change_count(report: SyncReport) -> int:
    return (
        report.roots_added
        + report.roots_removed
        + report.became_live
        + len(report.freed)
        + len(report.restored)
        + len(report.missing)
        + len(report.found)
        + len(report.orphans)
    )


def parse_addr(text: str) -> tuple[str, int]:
    """HOST:PORT (IPv6 as [::1]:PORT) to a (host, port) pair; port 0 picks a free one."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise InvalidAddress(
            f"{text!r}: invalid metrics address: use HOST:PORT, e.g. 127.0.0.1:9464"
        )
    return host.removeprefix("[").removesuffix("]"), int(port)


class _Server(ThreadingHTTPServer):
    """The HTTP server, carrying what its request handlers answer from."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], metrics: Metrics, health: Callable[[], Health]
    ) -> None:
        # address_family is read when the socket is made, inside __init__.
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.metrics = metrics
        self.health = health
        super().__init__(address, _Handler)


class MetricsServer:
    """`/metrics` and `/healthz` over HTTP, served from a background thread."""

    def __init__(self, addr: str, metrics: Metrics, health: Callable[[], Health]) -> None:
        try:
            self._server = _Server(parse_addr(addr), metrics, health)
        except OSError as exc:
            raise InvalidAddress(f"{addr}: cannot listen: {exc.strerror or exc}") from None
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.25},
            name="refcount-metrics",
            daemon=True,
        )
        self._thread.start()
        log.info("serving metrics on http://%s/metrics and /healthz", self.address)

    @property
    def address(self) -> str:
        """HOST:PORT actually listened on (the real port when 0 was asked for)."""
        host, port = self._server.server_address[:2]
        host = host.decode() if isinstance(host, bytes) else host
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        server = self.server
        assert isinstance(server, _Server)
        path = self.path.split("?", 1)[0]
        if path == "/metrics":
            self._reply(200, CONTENT_TYPE_LATEST, server.metrics.exposition())
        elif path == "/healthz":
            health = server.health()
            body = json.dumps({"ok": health.ok, **health.detail}, default=str).encode()
            self._reply(200 if health.ok else 503, "application/json", body)
        else:
            self._reply(404, "text/plain; charset=utf-8", b"not found: try /metrics or /healthz\n")

    def _reply(self, status: int, content_type: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        # The stdlib handler writes every request to stderr; a library only logs.
        log.debug("metrics: %s " + format, self.address_string(), *args)
