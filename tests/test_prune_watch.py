"""`refcount watch --prune-every D`: the daemon applies STORE/.refcount/policy.toml
periodically, logs what it pruned and counts it in /metrics; it refuses to start
without a policy file it can apply, and keeps running (without pruning) when the
file goes bad later."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import storekit as sk
from conftest import Cli
from test_prune import AGES, blob_bytes, build
from test_watch import Watcher, samples, scrape, wait_until, watch  # noqa: F401 (fixture)

POLICY = 'keep_last = 1\nmatch = "web:*"\n'  # web:1.0, web:1.1 and web:2.0 go
PRUNED = {"web:1.0", "web:1.1", "web:2.0"}


def tags_left(store: Path) -> set[str | None]:
    return {sk.tag_of(e) for e in sk.read_index(store)["manifests"]}


def counters(address: str) -> tuple[float, float, float]:
    """Tags pruned, bytes pruned, and how many prunes ran."""
    found = samples(scrape(address)[1])
    return (
        found[("refcount_pruned_tags_total", ())],
        found[("refcount_pruned_bytes_total", ())],
        found[("refcount_reconcile_duration_seconds_count", (("kind", "prune"),))],
    )


def test_the_daemon_prunes_by_the_policy_file_and_counts_it(
    cli: Cli,
    store: Path,
    watch: Callable[..., Watcher],  # noqa: F811 (the fixture)
) -> None:
    build(store)
    assert cli("--store", store, "init").code == 0
    (store / ".refcount" / "policy.toml").write_text(POLICY)
    expected = cli("--store", store, "--json", "prune", "--dry-run").json()["freed_bytes"]
    on_disk = blob_bytes(store)
    watcher = watch(
        store,
        "--prune-every",
        "1s",
        "--metrics-addr",
        "127.0.0.1:0",
        options=("--trash-ttl", "0"),
    )
    line = watcher.wait_log(r"prune: 3 entries pruned \(([^)]*)\), (\d+) blobs freed")
    assert set(line.group(1).split(", ")) == PRUNED
    assert tags_left(store) == set(AGES) - PRUNED
    address = watcher.wait_log(r"serving metrics on http://([^/]+)/metrics").group(1)
    tags, freed, _ = wait_until(lambda: counters(address)[0] and counters(address), "counters")
    assert (tags, freed) == (3, expected)
    assert on_disk - blob_bytes(store) == expected
    assert sk.blob_files(store) == sk.reachable(store)
    # the next rounds find nothing more to prune, and the counters stay
    runs = counters(address)[2]
    wait_until(lambda: counters(address)[2] >= runs + 2, "two more prunes")
    assert counters(address)[:2] == (3, expected)


def test_a_bad_policy_file_later_is_logged_and_the_daemon_keeps_watching(
    store: Path,
    watch: Callable[..., Watcher],  # noqa: F811 (the fixture)
) -> None:
    build(store)
    (store / ".refcount").mkdir()
    policy = store / ".refcount" / "policy.toml"
    policy.write_text('match = "nothing:*"\nkeep_last = 0\n')
    watcher = watch(store, "--prune-every", "1s")
    watcher.wait_log(r"full reconcile \(start\)")
    before = sk.listing(store)
    policy.write_text("keep_last = 0\nbogus = 1\n")
    watcher.wait_log(r"prune skipped: .*policy\.toml:2: bogus: unknown key")
    assert watcher.proc.poll() is None
    assert sk.listing(store) == before


def run_watch(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), "watch", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_daemon_refuses_to_start_with_a_malformed_policy_file(store: Path) -> None:
    build(store)
    (store / ".refcount").mkdir()
    (store / ".refcount" / "policy.toml").write_text("keep_last = [1\n")
    before = sk.listing(store)
    ran = run_watch(store, "--prune-every", "1s")
    assert ran.returncode == 2, ran
    assert "policy.toml:" in ran.stderr and "not TOML" in ran.stderr
    assert "Traceback" not in ran.stderr
    assert sk.listing(store) == before


def test_the_daemon_refuses_to_prune_every_without_a_policy_file(store: Path) -> None:
    build(store)
    before = sk.listing(store)
    ran = run_watch(store, "--prune-every", "1s")
    assert ran.returncode == 2, ran
    assert "--prune-every:" in ran.stderr and "policy.toml: no such file" in ran.stderr
    assert sk.listing(store) == before
    bad = run_watch(store, "--prune-every", "0")
    assert bad.returncode == 2 and "--prune-every" in bad.stderr
