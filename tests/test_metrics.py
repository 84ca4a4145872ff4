"""The watch daemon's Prometheus figures and health check (refcount.metrics, SPEC §6).

`Metrics` is fed the reports that real library calls on a real store return (init, an
outside untag and push followed by sync, delete, gc, a mass free, a blob deleted behind
refcount's back) and its text exposition is parsed back with prometheus_client's own
parser. `MetricsServer` is exercised over real HTTP on an ephemeral port.

The daemon serving these figures as a process is in test_watch.py
(test_metrics_are_served_over_http_and_match_the_store,
test_metrics_follow_the_commands_the_daemon_serves_without_a_sighup).
"""

from __future__ import annotations

import json
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import prometheus_client
import pytest
import storekit as sk
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

import refcount
from refcount import Refcounter
from refcount.metrics import (
    Health,
    InvalidAddress,
    Metrics,
    MetricsServer,
    parse_addr,
)
from refcount.reports import SyncReport

Figures = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def figures(metrics: Metrics | str) -> Figures:
    """{(sample name, sorted labels): value} of an exposition (or of a Metrics' own)."""
    text = metrics if isinstance(metrics, str) else metrics.exposition().decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def one(name: str, **labels: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return name, tuple(sorted(labels.items()))


def freed(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return one("refcount_freed_blobs_total", reason=reason)


def freed_bytes(reason: str) -> tuple[str, tuple[tuple[str, str], ...]]:
    return one("refcount_freed_bytes_total", reason=reason)


def sizes(store: Path, digests: set[str]) -> int:
    return sum(sk.blob_path(store, d).stat().st_size for d in digests)


def trash_files(store: Path) -> set[str]:
    trash = store / ".refcount" / "trash"
    return {f"{p.parent.name}:{p.name}" for p in trash.glob("*/*")}


def three_images(store: Path) -> dict[str, sk.Descriptor]:
    """a, b and c sharing a large base layer, so that freeing one is never a mass free."""
    return {
        tag: sk.add_image(store, [b"shared base" * 100, f"layer {tag}".encode()], tag=tag)
        for tag in ("a", "b", "c")
    }


@pytest.fixture
def rc(store: Path) -> Iterator[Refcounter]:
    three_images(store)
    with refcount.open(store, grace=timedelta(0)) as opened:
        yield opened


# --- the figures ------------------------------------------------------------------------------

ZERO_AT_START = [
    one("refcount_roots"),
    one("refcount_live_blobs"),
    one("refcount_live_bytes"),
    one("refcount_missing_blobs"),
    one("refcount_orphan_blobs"),
    one("refcount_quarantined_blobs"),
    one("refcount_quarantined_bytes"),
    one("refcount_problem_blobs"),
    one("refcount_mass_free_held_blobs"),
    *(freed(reason) for reason in ("released", "deleted", "orphan")),
    *(freed_bytes(reason) for reason in ("released", "deleted", "orphan")),
    one("refcount_purged_blobs_total"),
    one("refcount_purged_bytes_total"),
    one("refcount_restored_blobs_total"),
    one("refcount_missing_detected_total"),
    one("refcount_drift_found_total"),
    one("refcount_mass_frees_total"),
    *(one("refcount_batches_applied_total", kind=kind) for kind in ("batch", "full")),
    *(one("refcount_reconcile_failures_total", reason=r) for r in ("invalid_index", "error")),
    *(one("refcount_reconcile_duration_seconds_count", kind=k) for k in ("batch", "full", "gc")),
    one("refcount_last_successful_reconcile_timestamp_seconds"),
]


@pytest.mark.no_database
def test_a_fresh_daemon_exposes_every_figure_and_label_at_zero() -> None:
    """Every series exists from the start, so a dashboard or an alert on a rate never sees
    "no data" before the first free, failure or gc."""
    found = figures(Metrics())
    assert {key: found.get(key) for key in ZERO_AT_START} == dict.fromkeys(ZERO_AT_START, 0.0)


@pytest.mark.no_database
def test_two_daemons_in_one_process_never_see_each_others_figures() -> None:
    first, second = Metrics(), Metrics()
    first.record_failure("error")
    assert figures(first)[one("refcount_reconcile_failures_total", reason="error")] == 1
    assert figures(second)[one("refcount_reconcile_failures_total", reason="error")] == 0
    shared = prometheus_client.generate_latest(prometheus_client.REGISTRY).decode()
    assert "refcount_" not in shared  # prometheus_client's global registry is left alone


def test_the_gauges_describe_the_store_the_library_counted(store: Path, rc: Refcounter) -> None:
    metrics = Metrics()
    rc.init()
    metrics.record_stats(rc.stats())
    found = figures(metrics)
    live = sk.reachable(store)
    assert found[one("refcount_roots")] == 3
    assert found[one("refcount_live_blobs")] == len(live) == 10
    assert found[one("refcount_live_bytes")] == sizes(store, live)
    assert found[one("refcount_quarantined_blobs")] == 0
    rc.delete_tag("a")
    sk.write_blob(store, b"an upload in progress", "application/octet-stream")
    rc.sync()
    metrics.record_stats(rc.stats())
    found = figures(metrics)
    assert found[one("refcount_roots")] == 2
    assert found[one("refcount_live_blobs")] == len(sk.reachable(store)) == 7
    assert found[one("refcount_quarantined_blobs")] == len(trash_files(store)) == 3
    assert found[one("refcount_orphan_blobs")] == 1


def test_what_a_sync_frees_and_restores_is_counted_as_released(store: Path, rc: Refcounter) -> None:
    metrics = Metrics()
    metrics.record_sync(rc.init(), 0.5, full=True, drift=False)
    before = sk.reachable(store)
    [entry] = sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")  # an outside untag
    gone = before - sk.reachable(store)
    untag = rc.sync()
    metrics.record_sync(untag, 0.002, full=False, drift=False)
    found = figures(metrics)
    assert {b.digest for b in untag.freed} == gone and len(gone) == 3  # manifest, config, layer
    assert found[freed("released")] == 3
    assert found[freed_bytes("released")] == untag.freed_bytes > 0
    assert found[freed("deleted")] == found[freed("orphan")] == 0
    assert found[one("refcount_batches_applied_total", kind="full")] == 1
    assert found[one("refcount_batches_applied_total", kind="batch")] == 1
    assert found[one("refcount_reconcile_duration_seconds_sum", kind="full")] == 0.5
    assert found[one("refcount_reconcile_duration_seconds_count", kind="batch")] == 1
    assert found[one("refcount_last_successful_reconcile_timestamp_seconds")] > 0
    assert found[one("refcount_drift_found_total")] == 0  # nobody asked for a drift count

    sk.add_entry(store, entry)  # the tool puts it back before the quarantine is purged
    back = rc.sync()
    metrics.record_sync(back, 0.002, full=False, drift=False)
    assert set(back.restored) == gone
    assert figures(metrics)[one("refcount_restored_blobs_total")] == 3


def test_only_what_a_full_reconcile_finds_when_told_it_is_drift_counts_as_drift(
    store: Path, rc: Refcounter
) -> None:
    metrics = Metrics()
    rc.init()
    nothing = rc.sync()
    metrics.record_sync(nothing, 0.01, full=True, drift=True)
    assert figures(metrics)[one("refcount_drift_found_total")] == 0
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "b")  # an event the watcher missed
    found = rc.sync()
    metrics.record_sync(found, 0.01, full=True, drift=True)
    # one root removed and its three blobs freed: four changes
    assert (found.roots_removed, len(found.freed)) == (1, 3)
    assert figures(metrics)[one("refcount_drift_found_total")] == 4
    metrics.record_sync(SyncReport(roots_added=4), 0.01, full=False, drift=False)
    assert figures(metrics)[one("refcount_drift_found_total")] == 4


def test_commands_the_daemon_serves_count_by_reason_but_not_as_its_own_batches(
    store: Path, rc: Refcounter
) -> None:
    metrics = Metrics()
    rc.init()
    delete = rc.delete_tag("a")
    metrics.record_served(delete)
    orphan = sk.write_blob(store, b"an abandoned upload", "application/octet-stream")
    with refcount.open(store, grace=timedelta(0), trash_ttl=timedelta(0)) as now:
        gc = now.gc()
    metrics.record_served(gc)
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "b")
    sync = rc.sync()
    metrics.record_served(sync)
    found = figures(metrics)
    assert found[freed("deleted")] == len(delete.freed) == 3
    assert found[freed_bytes("deleted")] == delete.freed_bytes
    assert [a.digest for a in gc.swept] == [orphan["digest"]]
    assert found[freed("orphan")] == 1
    assert found[freed_bytes("orphan")] == orphan["size"]
    assert found[one("refcount_purged_blobs_total")] == len(gc.purged) == 3  # a's, from trash
    assert found[one("refcount_purged_bytes_total")] == sum(a.size for a in gc.purged)
    assert found[freed("released")] == len(sync.freed) == 3
    for kind in ("batch", "full", "gc"):
        assert found[one("refcount_reconcile_duration_seconds_count", kind=kind)] == 0
        if kind != "gc":
            assert found[one("refcount_batches_applied_total", kind=kind)] == 0


def test_the_daemons_own_gc_is_timed_and_counted(store: Path, rc: Refcounter) -> None:
    metrics = Metrics()
    rc.init()
    sk.write_blob(store, b"an abandoned upload", "application/octet-stream")
    rc.sync()
    metrics.record_gc(rc.gc(), 0.25)
    found = figures(metrics)
    assert found[freed("orphan")] == 1
    assert found[one("refcount_reconcile_duration_seconds_sum", kind="gc")] == 0.25


def test_a_blob_deleted_behind_refcounts_back_is_counted_missing_once(
    store: Path, rc: Refcounter
) -> None:
    metrics = Metrics()
    rc.init()
    layer = rc.show("a").children[1].digest
    sk.blob_path(store, layer).unlink()
    for _ in range(2):  # recorded once: the second sync finds nothing new
        metrics.record_sync(rc.sync(), 0.01, full=True, drift=False)
    metrics.record_stats(rc.stats())
    found = figures(metrics)
    assert found[one("refcount_missing_detected_total")] == 1
    assert found[one("refcount_missing_blobs")] == 1
    assert found[freed("released")] == 0  # never "repaired" by freeing what needs it


def test_a_mass_free_is_counted_by_the_daemons_metrics(store: Path) -> None:
    three_images(store)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
        sk.write_index(store, {"schemaVersion": 2, "manifests": []})
        report = rc.sync()
        metrics = Metrics()
        metrics.record_sync(report, 0.01, full=False, drift=False)
        metrics.record_stats(rc.stats())
    found = figures(metrics)
    assert report.mass_free is not None
    assert found[one("refcount_mass_frees_total")] == 1
    assert found[one("refcount_mass_free_held_blobs")] == len(trash_files(store)) == 10


@pytest.mark.no_database
def test_failed_reconciles_are_counted_by_reason() -> None:
    metrics = Metrics()
    metrics.record_failure("invalid_index")
    metrics.record_failure("invalid_index")
    metrics.record_failure("error")
    found = figures(metrics)
    assert found[one("refcount_reconcile_failures_total", reason="invalid_index")] == 2
    assert found[one("refcount_reconcile_failures_total", reason="error")] == 1


# --- the HTTP server --------------------------------------------------------------------------


def get(address: str, path: str) -> tuple[int, str, str]:
    """(status, Content-Type, body) of GET http://ADDRESS/PATH."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.headers["Content-Type"], exc.read().decode()


class Healthz:
    """What the daemon would answer on /healthz, changed by the test between requests."""

    def __init__(self) -> None:
        self.now = Health(True, {"store": "/srv/store"})

    def __call__(self) -> Health:
        return self.now


@pytest.fixture
def served() -> Iterator[tuple[MetricsServer, Metrics, Healthz]]:
    metrics, health = Metrics(), Healthz()
    server = MetricsServer("127.0.0.1:0", metrics, health)
    try:
        yield server, metrics, health
    finally:
        server.close()


@pytest.mark.no_database
def test_metrics_are_served_live_in_the_prometheus_text_format(
    served: tuple[MetricsServer, Metrics, Healthz],
) -> None:
    server, metrics, _ = served
    host, port = server.address.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0  # the port the kernel picked for 0
    status, content_type, body = get(server.address, "/metrics")
    assert (status, content_type) == (200, CONTENT_TYPE_LATEST)
    assert figures(body) == figures(metrics)
    metrics.record_failure("error")
    status, _, body = get(server.address, "/metrics?since=now")  # a query string is ignored
    assert status == 200
    assert figures(body)[one("refcount_reconcile_failures_total", reason="error")] == 1


@pytest.mark.no_database
def test_healthz_answers_200_when_healthy_and_503_with_the_reason_when_not(
    served: tuple[MetricsServer, Metrics, Healthz],
) -> None:
    server, _, health = served
    status, content_type, body = get(server.address, "/healthz")
    assert (status, content_type) == (200, "application/json")
    assert json.loads(body) == {"ok": True, "store": "/srv/store"}
    since = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    health.now = Health(False, {"why": "index.json: invalid JSON", "since": since})
    status, _, body = get(server.address, "/healthz")
    assert status == 503
    assert json.loads(body) == {"ok": False, "why": "index.json: invalid JSON", "since": str(since)}


@pytest.mark.no_database
def test_any_other_path_is_404_and_requests_are_logged_not_printed(
    served: tuple[MetricsServer, Metrics, Healthz], capfd: pytest.CaptureFixture[str]
) -> None:
    server, _, _ = served
    capfd.readouterr()
    status, _, body = get(server.address, "/")
    assert status == 404 and "/metrics" in body and "/healthz" in body
    assert get(server.address, "/metricsx")[0] == 404
    assert capfd.readouterr().err == ""  # the stdlib handler would write every request there


@pytest.mark.no_database
def test_a_closed_server_stops_listening() -> None:
    server = MetricsServer("127.0.0.1:0", Metrics(), Healthz())
    address = server.address
    assert get(address, "/healthz")[0] == 200
    server.close()
    host, port = address.rsplit(":", 1)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection((host, int(port)), 2).close()


@pytest.mark.no_database
def test_an_ipv6_address_is_served_and_named_in_brackets() -> None:
    try:
        probe = socket.socket(socket.AF_INET6)
        probe.bind(("::1", 0))
        probe.close()
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    server = MetricsServer("[::1]:0", Metrics(), Healthz())
    try:
        assert server.address.startswith("[::1]:") and not server.address.endswith(":0")
        assert get(server.address, "/healthz")[0] == 200
    finally:
        server.close()


@pytest.mark.no_database
def test_an_address_that_cannot_be_listened_on_is_the_typed_error(
    served: tuple[MetricsServer, Metrics, Healthz],
) -> None:
    server, _, _ = served
    with pytest.raises(InvalidAddress, match="cannot listen") as caught:
        MetricsServer(server.address, Metrics(), Healthz())  # taken by the first
    assert caught.value.exit_code == 2 and server.address in str(caught.value)
    with pytest.raises(InvalidAddress, match="cannot listen"):
        MetricsServer("192.0.2.1:0", Metrics(), Healthz())  # not an address of this host


@pytest.mark.no_database
@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:0", ("::1", 0)),
        ("[::]:9464", ("::", 9464)),
    ],
)
def test_metrics_addresses_are_host_and_port(text: str, expected: tuple[str, int]) -> None:
    assert parse_addr(text) == expected


@pytest.mark.no_database
@pytest.mark.parametrize(
    "text", ["9464", "host:", ":9464", "host:port", "host:70000", "host:-1", "host: 80", ""]
)
def test_anything_else_is_an_invalid_metrics_address(text: str) -> None:
    with pytest.raises(InvalidAddress, match="invalid metrics address") as caught:
        parse_addr(text)
    assert caught.value.exit_code == 2 and repr(text) in str(caught.value)


@pytest.mark.no_database
def test_a_scrape_waits_for_an_update_made_together_and_then_shows_all_of_it() -> None:
    metrics = Metrics()
    scraped: list[Figures] = []
    scraper = threading.Thread(target=lambda: scraped.append(figures(metrics)))
    with metrics.together():
        metrics.freed_blobs.labels("released").inc(2)
        scraper.start()
        scraper.join(0.2)
        assert scraper.is_alive()  # blocked: it would see the counter without the gauge
        metrics.roots.set(3)
    scraper.join()
    assert scraped[0][freed("released")] == 2
    assert scraped[0][one("refcount_roots")] == 3
