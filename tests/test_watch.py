"""`refcount watch`: the daemon as a real process beside a real store.

The daemon runs as `python -m refcount --store S watch ...`; the store is
changed by umoci, skopeo, a plain `rm` or a script writing index.json, and
nothing here calls `sync`. What the daemon did is read straight from its SQLite
database (read-only), never through a refcount command that could reconcile
by itself and make a test pass by accident: `refcount show` is used only after
the database already holds the current index.json, and `refcount verify`
compares without reconciling.

The last tests run the `Daemon` in-process, where `wait_applied()` replaces
waiting on the disk, to prove what a subprocess cannot reach: the observer
being rebuilt after its threads die, the reaction to a lost-events warning,
the gc timer, and the event classification.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import math
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import pytest
import storekit as sk
from conftest import ON_POSTGRESQL, direct_env, sql_on_the_test_database
from prometheus_client.parser import text_string_to_metric_families
from watchdog.events import (
    DirDeletedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
)

import refcount
from refcount.daemon import Daemon
from refcount.events import StoreEventHandler
from refcount.layout import BlobFile, classify
from refcount.scheduler import PathSet, warning_delay
from refcount.watch import WatchOptions

DEADLINE = 10.0
H = "0123456789abcdef" * 4  # a well-formed sha256 hex


# --------------------------------------------------------------------------
# Waiting, reading the database, running the CLI
# --------------------------------------------------------------------------
def wait_until(condition: Callable[[], Any], what: str, timeout: float = DEADLINE) -> Any:
    """Poll `condition` until it returns something truthy; fail after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.02)


def query(store: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the daemon's database without going through refcount."""
    if ON_POSTGRESQL:
        return sql_on_the_test_database(sql, *args)
    db = store / ".refcount" / "refcount.db"
    if not db.exists():
        return []
    connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10)
    try:
        return connection.execute(sql, args).fetchall()
    except sqlite3.OperationalError:  # the schema is being created
        return []
    finally:
        connection.close()


def write_db(store: Path, sql: str, *args: Any) -> None:
    """Tamper with the database behind the daemon's back (no file event follows)."""
    if ON_POSTGRESQL:
        sql_on_the_test_database(sql, *args)
        return
    connection = sqlite3.connect(store / ".refcount" / "refcount.db", timeout=10)
    try:
        with connection:
            connection.execute(sql, args)
    finally:
        connection.close()


def index_hash(store: Path) -> str:
    return hashlib.sha256((store / "index.json").read_bytes()).hexdigest()


def caught_up(store: Path) -> bool:
    """The database holds the index.json on disk now, and no file action is pending."""
    recorded = query(store, "SELECT value FROM meta WHERE key = 'index_hash'")
    pending = query(store, "SELECT count(*) FROM pending_actions")
    return bool(recorded) and recorded[0][0] == index_hash(store) and pending == [(0,)]


def db_counts(store: Path) -> dict[str, int]:
    return dict(query(store, "SELECT digest, count FROM blobs WHERE count > 0"))


def db_state(store: Path, digest: str) -> str | None:
    rows = query(store, "SELECT state FROM blobs WHERE digest = ?", digest)
    return rows[0][0] if rows else None


def oracle_counts(store: Path) -> dict[str, int]:
    return {d: c for d, c in sk.expected_counts(store).items() if c > 0}


def trash(store: Path) -> set[str]:
    root = store / ".refcount" / "trash"
    return (
        {f"{a.name}:{f.name}" for a in root.iterdir() for f in a.iterdir()}
        if root.exists()
        else set()
    )


def refcount_cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def served_cli(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`refcount --store S ARGS...`, which must be answered by the store's daemon.

    With `-X importtime` the process lists what it imported: a client the
    daemon answered never loads `refcount.cli` (tests/test_fastpath.py).
    """
    ran = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in ran.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "refcount.cli" not in imported, f"{args}: not answered by the daemon"
    return ran


def verify(store: Path) -> subprocess.CompletedProcess[str]:
    return refcount_cli(store, "verify")


def show(store: Path, ref: str) -> dict[str, Any]:
    ran = refcount_cli(store, "--json", "show", ref)
    assert ran.returncode == 0, ran.stderr
    result: dict[str, Any] = json.loads(ran.stdout)
    return result


def umoci(*args: str) -> None:
    sk.run(["umoci", *args])


def manifest_of(store: Path, tag: str) -> str:
    entries = sk.read_index(store)["manifests"]
    digest: str = next(e["digest"] for e in entries if sk.tag_of(e) == tag)
    return digest


# --------------------------------------------------------------------------
# The daemon as a subprocess
# --------------------------------------------------------------------------
class Watcher:
    """`refcount --store S [OPTIONS] watch ARGS...` with its log written to a file."""

    def __init__(
        self, store: Path, log_path: Path, *args: str, options: Sequence[str] = ()
    ) -> None:
        self.store = store
        self.log_path = log_path
        self._log_file: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 (closed in wait)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "refcount", "--store", str(store), *options, "watch", *args],
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_started(self) -> None:
        """The start-up full reconcile is applied."""
        wait_until(
            lambda: "full reconcile (start)" in self.log() or self.proc.poll() is not None,
            "the start-up reconcile",
        )
        assert self.proc.poll() is None, self.log()

    def wait_log(self, pattern: str) -> re.Match[str]:
        match: re.Match[str] = wait_until(
            lambda: re.search(pattern, self.log()) or self.proc.poll() is not None,
            f"{pattern!r} in the daemon's log",
        )
        assert self.proc.poll() is None, self.log()
        return match

    def signal(self, signum: int) -> None:
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is not None:
                self._log_file.close()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)


@pytest.fixture
def watch(tmp_path: Path) -> Iterator[Callable[..., Watcher]]:
    """Start daemons; each is killed at the end of the test if still running."""
    started: list[Watcher] = []

    def start(store: Path, *args: str, wait: bool = True, options: Sequence[str] = ()) -> Watcher:
        watcher = Watcher(
            store,
            tmp_path / f"watch-{len(started)}.log",
            "--debounce",
            "0.05",
            *args,
            options=options,
        )
        started.append(watcher)
        if wait:
            watcher.wait_started()
        return watcher

    yield start
    for watcher in started:
        watcher.kill()


@pytest.fixture
def shared(tmp_path: Path) -> Path:
    """umoci images base, a (base + f1) and b (base + f2), as OCI-TOOLS.md builds them."""
    store = sk.umoci_shared_store(tmp_path / "store")
    sk.run(["umoci", "gc", "--layout", str(store)])  # drop umoci's intermediate blobs
    return store


def scrape(address: str, path: str = "/metrics") -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text -> {(sample name, sorted labels): value}."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


# --------------------------------------------------------------------------
# Real tools change the store; the daemon follows
# --------------------------------------------------------------------------
@pytest.mark.tools
def test_umoci_rm_frees_the_exclusive_blobs_and_keeps_the_shared_ones(
    shared: Path, watch: Callable[..., Watcher]
) -> None:
    watch(shared)
    before = sk.reachable(shared)
    umoci("rm", "--image", f"{shared}:a")
    after = sk.reachable(shared)
    exclusive = before - after
    assert len(exclusive) == 3  # a's manifest, config and own layer

    wait_until(lambda: not exclusive & sk.blob_files(shared), "a's blobs to leave blobs/")
    wait_until(lambda: caught_up(shared), "the database to hold index.json")
    assert trash(shared) == exclusive
    assert after <= sk.blob_files(shared)
    assert db_counts(shared) == oracle_counts(shared)
    assert verify(shared).returncode == 0


@pytest.mark.tools
def test_skopeo_copy_into_the_store_raises_counts_and_frees_nothing(
    shared: Path, tmp_path: Path, watch: Callable[..., Watcher]
) -> None:
    other = sk.umoci_shared_store(tmp_path / "other")
    watcher = watch(shared)
    files_before = sk.blob_files(shared)
    counts_before = db_counts(shared)

    sk.skopeo_copy(other, "a", shared, "t2")
    wait_until(lambda: caught_up(shared), "the database to hold skopeo's index.json")

    manifest = show(shared, "t2")
    assert manifest["tags"] == ["t2"] and manifest["count"] == 1
    assert len(manifest["children"]) == 3  # config and two layers, now counted
    assert db_counts(shared) == oracle_counts(shared)
    assert sum(db_counts(shared).values()) > sum(counts_before.values())
    assert files_before <= sk.blob_files(shared)
    assert trash(shared) == set()
    assert not re.search(r"[1-9]\d* freed", watcher.log())
    assert verify(shared).returncode == 0


@pytest.mark.tools
def test_umoci_tag_adds_a_counted_root(shared: Path, watch: Callable[..., Watcher]) -> None:
    watch(shared)
    manifest_a = manifest_of(shared, "a")
    assert db_counts(shared)[manifest_a] == 1

    umoci("tag", "--image", f"{shared}:a", "a-again")
    wait_until(lambda: caught_up(shared), "the database to hold the new tag")

    assert ("a-again", manifest_a) in query(shared, "SELECT tag, digest FROM roots")
    assert db_counts(shared)[manifest_a] == 2
    assert db_counts(shared) == oracle_counts(shared)


@pytest.mark.tools
def test_rm_of_a_referenced_layer_is_reported_missing_and_counts_stay(
    shared: Path, watch: Callable[..., Watcher]
) -> None:
    watcher = watch(shared, "--metrics-addr", "127.0.0.1:0")
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    manifest = json.loads(sk.blob_path(shared, manifest_of(shared, "a")).read_bytes())
    layer = manifest["layers"][-1]["digest"]  # a's own layer (f1)
    counts = db_counts(shared)

    sk.blob_path(shared, layer).unlink()
    watcher.wait_log(rf"{layer}: referenced blob is missing from blobs/; needed by a\b")

    assert db_state(shared, layer) == "missing"
    assert db_counts(shared) == counts  # the images that need it keep their counts
    ran = verify(shared)
    assert ran.returncode == 1 and f"missing {layer}" in ran.stdout
    key = ("refcount_missing_blobs", ())
    figures = wait_until(
        lambda: (found := samples(scrape(address)[1])).get(key) == 1 and found,
        "the missing blob in the metrics",
    )
    assert figures[("refcount_missing_detected_total", ())] == 1


def healthz(address: str) -> dict[str, Any]:
    status, body = scrape(address, "/healthz")
    assert status == 200, body  # degraded is not down: a restart would not help
    document: dict[str, Any] = json.loads(body)
    return document


def test_periodic_verifies_find_a_deleted_and_a_changed_blob_until_they_are_put_right(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 6)
    assert refcount_cli(store, "init").returncode == 0
    total = len(sk.blob_files(store))
    watcher = watch(
        store,
        *("--metrics-addr", "127.0.0.1:0", "--verify-every", "1s"),
        *("--deep-every", "1s", "--deep-slice", "4"),
    )
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    watcher.wait_log(r"verify \(deep slice\): OK, 4 blobs hashed")
    assert healthz(address)["status"] == "ok"

    # A blob deleted behind the daemon's back: the next shallow verify names it.
    gone = sk.sha256_digest(b"layer 4")  # img2's own layer
    kept = sk.blob_path(store, gone).read_bytes()
    sk.blob_path(store, gone).unlink()
    watcher.wait_log(rf"verify: missing {gone}: referenced but not in blobs/; needed by img2\n")
    health = wait_until(
        lambda: (h := healthz(address))["status"] == "degraded" and h, "/healthz degraded"
    )
    assert gone in health["reason"] and "missing" in health["reason"]
    figures = samples(scrape(address)[1])
    assert figures[("refcount_verify_problems", (("problem", "missing"),))] == 1
    assert figures[("refcount_verify_ok", (("kind", "shallow"),))] == 0
    last = refcount_cli(store, "verify", "--last")
    assert last.returncode == 1 and f"missing {gone}: referenced but not in blobs/" in last.stdout

    # Bytes changed in place (same size): found by the deep slices within one lap.
    changed = sk.sha256_digest(b"layer 7")  # img5's own layer
    slices_before = watcher.log().count("verify (deep slice)")
    sk.blob_path(store, changed).write_bytes(b"layer 9")
    watcher.wait_log(rf"verify: corrupt {changed}: content hashes to \w+; needed by img5\n")
    slices = watcher.log().count("verify (deep slice)") - slices_before
    assert slices <= math.ceil(total / 4) + 1  # a lap, and the slice in hand at the change
    assert samples(scrape(address)[1])[("refcount_verify_problems", (("problem", "corrupt"),))] == 1
    assert "corrupt" in healthz(address)["reason"]

    # Put right by hand, then verify --repair: the next runs read ok again.
    sk.blob_path(store, gone).write_bytes(kept)
    sk.blob_path(store, changed).write_bytes(b"layer 7")
    assert refcount_cli(store, "verify", "--repair").returncode == 0
    wait_until(lambda: healthz(address)["status"] == "ok", "/healthz ok again", timeout=30)
    figures = samples(scrape(address)[1])
    assert all(
        figures[("refcount_verify_problems", (("problem", kind),))] == 0
        for kind in ("drift", "missing", "corrupt", "problem")
    )
    wait_until(
        lambda: refcount_cli(store, "verify", "--last").returncode == 0, "verify --last clean"
    )
    assert "Traceback" not in watcher.log()


def test_a_missing_blob_put_back_is_logged_once_as_back_and_verify_is_clean(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    image = small_images(store, 2)[0]
    watcher = watch(store)
    layer = sorted(sk.graph(store)[image["digest"]] - {image["digest"]})[0]
    path = sk.blob_path(store, layer)
    data = path.read_bytes()

    path.unlink()
    watcher.wait_log(rf"{layer}: referenced blob is missing from blobs/")
    wait_until(lambda: db_state(store, layer) == "missing", "the blob to be recorded missing")
    path.write_bytes(data)
    watcher.wait_log(rf"{layer}: missing blob is back in blobs/")
    wait_until(lambda: db_state(store, layer) == "live", "the blob to be live again")

    assert verify(store).returncode == 0
    watcher.signal(signal.SIGTERM)  # every event of the rewrite is applied before it exits
    assert watcher.wait(5) == 0
    assert watcher.log().count(f"{layer}: missing blob is back") == 1


# --------------------------------------------------------------------------
# Bursts, partial writes, crashes
# --------------------------------------------------------------------------
def small_images(store: Path, number: int) -> list[sk.Descriptor]:
    """`number` images over a few shared layers, each tagged img<i>."""
    layers = [f"layer {i}".encode() for i in range(number + 2)]
    return [
        sk.add_image(store, [layers[0], layers[i % 3 + 1], layers[i + 2]], tag=f"img{i}")
        for i in range(number)
    ]


def retag(store: Path, rng: random.Random, manifests: list[sk.Descriptor], step: int) -> None:
    """Add or remove one tag at random, atomically (temp file + rename, as umoci does)."""
    index = sk.read_index(store)
    entries = index["manifests"]
    if entries and rng.random() < 0.5:
        entries.pop(rng.randrange(len(entries)))
    else:
        entries.append({**rng.choice(manifests), "annotations": {sk.REF_NAME: f"t{step}"}})
    sk.write_index(store, index)


def assert_equals_the_oracle(store: Path) -> None:
    assert verify(store).returncode == 0, verify(store).stdout
    assert db_counts(store) == oracle_counts(store)
    assert sk.blob_files(store) == sk.reachable(store)  # no orphans in these stores
    assert trash(store).isdisjoint(sk.reachable(store))


def test_a_burst_of_200_tag_changes_ends_equal_to_the_oracle(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    manifests = small_images(store, 8)
    watcher = watch(store)
    rng = random.Random(200)
    for step in range(200):
        retag(store, rng, manifests, step)
    wait_until(lambda: caught_up(store), "the database to hold the last index.json")
    assert_equals_the_oracle(store)
    assert "freed" in watcher.log()


def test_the_daemon_counts_and_frees_the_chunks_of_chunked_rootfs_images(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    """Extractor plug-ins in the daemon's batches: the outside writer pushes two images
    sharing a chunk, then removes one; exactly its own chunks leave blobs/."""
    chunks = [f"chunk {i}".encode() for i in range(3)]
    watch(store)
    sk.add_rootfs_image(store, chunks[:2], tag="a")
    sk.add_rootfs_image(store, chunks[1:], tag="b")
    wait_until(lambda: caught_up(store), "the database to hold both images")
    assert_equals_the_oracle(store)
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "a")
    wait_until(lambda: caught_up(store), "the database to hold the removal")
    assert_equals_the_oracle(store)
    held = {sk.sha256_digest(c) for c in chunks} & sk.blob_files(store)
    assert held == {sk.sha256_digest(c) for c in chunks[1:]}
    assert sk.sha256_digest(chunks[0]) in trash(store)


@pytest.mark.tools
def test_a_burst_of_200_umoci_tag_and_rm_commands_ends_equal_to_the_oracle(
    shared: Path, tmp_path: Path, watch: Callable[..., Watcher]
) -> None:
    watcher = watch(shared)
    rng = random.Random(3)
    lines, tags = ["set -e"], {"base", "a", "b"}
    for step in range(196):
        if rng.random() < 0.4 and len(tags) > 1:
            gone = rng.choice(sorted(tags))
            tags.discard(gone)
            lines.append(f"umoci rm --image {shared}:{gone}")
        else:
            lines.append(f"umoci tag --image {shared}:{rng.choice(sorted(tags))} t{step}")
            tags.add(f"t{step}")
    lines += [f"umoci rm --image {shared}:{tag}" for tag in sorted(tags)[:4]]
    script = tmp_path / "burst.sh"
    script.write_text("\n".join(lines) + "\n")
    subprocess.run(["bash", str(script)], check=True, capture_output=True, timeout=120)

    wait_until(lambda: caught_up(shared), "the database to hold the last index.json")
    assert_equals_the_oracle(shared)
    assert len(sk.root_digests(shared)) == len(tags) - 4
    assert trash(shared)  # the script did leave some image with no tag: it was freed
    assert watcher.proc.poll() is None


def test_index_json_written_slowly_in_pieces_frees_nothing(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 4)
    watcher = watch(store, "--metrics-addr", "127.0.0.1:0")
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    files = sk.blob_files(store)
    # The same roots, spelt differently, so the file's hash changes.
    data = json.dumps(sk.read_index(store), indent=2).encode()

    with open(store / "index.json", "r+b") as handle:  # in place, as skopeo writes
        handle.truncate(0)
        handle.flush()
        time.sleep(0.3)  # several quiet periods on an empty file
        handle.write(data[: len(data) // 2])
        handle.flush()
        time.sleep(0.3)  # and on half a file
        handle.write(data[len(data) // 2 :])

    wait_until(lambda: caught_up(store), "the complete index.json to be applied")
    assert sk.blob_files(store) == files and trash(store) == set()
    assert not re.search(r"[1-9]\d* freed|roots \+\d+ -[1-9]", watcher.log())
    failures = samples(scrape(address)[1])
    # The test really showed the daemon an unparsable file (more than once).
    assert failures[("refcount_reconcile_failures_total", (("reason", "invalid_index"),))] >= 2
    assert_equals_the_oracle(store)


def rename_into_place(store: Path, data: bytes) -> None:
    """Replace index.json as umoci does: a new file in the store, renamed over it."""
    new = store / "index.json.new"
    new.write_bytes(data)
    os.rename(new, store / "index.json")


def blobs_listing(store: Path) -> dict[str, tuple[int, str]]:
    return {k: v for k, v in sk.listing(store).items() if k.startswith("blobs/")}


def invalid_index_failures(address: str) -> float:
    key = ("refcount_reconcile_failures_total", (("reason", "invalid_index"),))
    return samples(scrape(address)[1])[key]


NOT_AN_INDEX = [
    (b"{}", "not an image index: schemaVersion is missing"),
    (b'{"schemaVersion":2}', "not an image index: manifests is missing"),
    (b'{"schemaVersion":3,"manifests":[]}', "not an image index: schemaVersion is 3, not 2"),
    (b'{"schemaVersion":2,"manifests":"x"}', "manifests is not a list"),
]


def test_an_index_json_that_parses_but_is_not_an_image_index_frees_nothing_and_is_warned_about(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    """Each of these used to be read as "no roots": within 1.5 s blobs/ was empty."""
    manifests = small_images(store, 4)
    watcher = watch(
        store, "--metrics-addr", "127.0.0.1:0", "--resync", "1h", options=("--trash-ttl", "0")
    )
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    good = (store / "index.json").read_bytes()
    blobs = blobs_listing(store)

    for data, why in NOT_AN_INDEX:
        rename_into_place(store, data)
        watcher.wait_log(rf"index\.json: {re.escape(why)}; nothing is applied")
        tried = invalid_index_failures(address)
        watcher.signal(signal.SIGHUP)  # a full reconcile, as --resync would run
        wait_until(
            lambda tried=tried: invalid_index_failures(address) >= tried + 2,
            "a full reconcile to refuse the document",
        )
        assert blobs_listing(store) == blobs, data
        assert trash(store) == set()
        assert query(store, "SELECT count(*) FROM roots") == [(4,)]
    assert not re.search(r"[1-9]\d* freed|roots \+\d+ -[1-9]", watcher.log())

    rename_into_place(store, good)
    watcher.wait_log(r"the store is valid again after \d+ s \(was: .*index\.json: ")
    # The daemon is back at work: an outside edit is applied.
    before = sk.reachable(store)
    sk.remove_entries(store, lambda e: e["digest"] == manifests[0]["digest"])
    gone = before - sk.reachable(store)
    assert gone
    wait_until(
        lambda: not gone & sk.blob_files(store) and caught_up(store), "img0's blobs to be freed"
    )
    # Unlinked (--trash-ttl 0), or quarantined by the mass-deletion valve.
    assert trash(store) <= gone
    assert sk.blob_files(store) == sk.reachable(store)
    assert verify(store).returncode == 0


def test_an_invalid_index_is_warned_about_once_not_at_every_re_read(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 2)
    watcher = watch(store, "--metrics-addr", "127.0.0.1:0")
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    good = (store / "index.json").read_bytes()
    warning = "index.json: not an image index: schemaVersion is missing; nothing is applied"

    rename_into_place(store, b"{}")
    watcher.wait_log(re.escape(warning))  # at once: no write in progress looks like {}
    tried = invalid_index_failures(address)
    wait_until(
        lambda: invalid_index_failures(address) >= tried + 6,
        "six more re-reads (about 5 s of backoff)",
        timeout=30,
    )
    assert watcher.log().count(warning) == 1  # the next one is due 10 s after the first

    rename_into_place(store, good)
    watcher.wait_log(r"the store is valid again after \d+ s")
    assert watcher.proc.poll() is None
    watcher.signal(signal.SIGTERM)
    assert watcher.wait(5) == 0
    assert watcher.log().count(warning) == 1
    assert watcher.log().count("valid again") == 1


@pytest.mark.tools
def test_umoci_rm_of_the_last_image_writes_null_manifests_and_the_daemon_frees_it(
    shared: Path, watch: Callable[..., Watcher]
) -> None:
    watch(shared, options=("--trash-ttl", "0"))
    for tag in ("a", "b"):
        umoci("rm", "--image", f"{shared}:{tag}")
        wait_until(lambda: caught_up(shared), f"the rm of {tag} to be applied")
    last = sk.reachable(shared)
    quarantined = trash(shared)

    umoci("rm", "--image", f"{shared}:base")
    assert sk.read_index(shared)["manifests"] is None  # a valid, empty image index
    wait_until(lambda: not last & sk.blob_files(shared), "base's blobs to leave blobs/")
    wait_until(lambda: caught_up(shared), "the database to hold the empty index")
    # Unlinked (--trash-ttl 0), or quarantined: every root went in one change.
    assert trash(shared) - quarantined <= last
    assert query(shared, "SELECT count(*) FROM roots") == [(0,)]
    assert db_counts(shared) == {}
    assert verify(shared).returncode == 0


def test_sigkill_mid_burst_then_changes_while_down_are_caught_up_on_restart(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    manifests = small_images(store, 8)
    rng = random.Random(7)
    watcher = watch(store)
    for step in range(60):
        retag(store, rng, manifests, step)
        if step == 40:
            watcher.signal(signal.SIGKILL)
    assert watcher.wait(5) == -signal.SIGKILL
    for step in range(60, 80):  # the store keeps changing while nobody watches
        retag(store, rng, manifests, step)
    sk.remove_entries(store, lambda e: e["digest"] == manifests[0]["digest"])

    watch(store)
    wait_until(lambda: caught_up(store), "the start-up reconcile")
    assert_equals_the_oracle(store)


# --------------------------------------------------------------------------
# Signals and the lock
# --------------------------------------------------------------------------
def test_sigterm_exits_0_within_a_second(store: Path, watch: Callable[..., Watcher]) -> None:
    manifests = small_images(store, 3)
    watcher = watch(store)
    retag(store, random.Random(1), manifests, 0)  # a batch may be in hand
    started = time.monotonic()
    watcher.signal(signal.SIGTERM)
    assert watcher.wait(1.0) == 0
    assert time.monotonic() - started < 1.0
    assert "stopping (SIGTERM)" in watcher.log() and "stopped" in watcher.log()


def test_sigint_also_stops_cleanly_and_json_logs_are_one_object_a_line(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 2)
    watcher = watch(store, "--log-format", "json")
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "img1")
    watcher.wait_log(r"batch: index.json changed; roots \+0 -1")
    watcher.signal(signal.SIGINT)
    assert watcher.wait(5) == 0
    records = [json.loads(line) for line in watcher.log().splitlines()]
    messages = [r["message"] for r in records if r["logger"] == "refcount.watch"]
    assert messages[0] == (
        f"watching {store} (debounce 0.05 s, resync every 5m, gc every 5m, grace 1h, trash TTL 10m)"
    )
    assert messages[1].startswith("full reconcile (start)")
    assert re.fullmatch(
        r"batch: index.json changed; roots \+0 -1, 0 became live, 3 freed \([\d.]+ (?:B|KiB)\), "
        r"0 restored, 0 missing, 0 new orphans; [\d.]+ ms",
        messages[2],
    )
    assert messages[-2:] == ["stopping (SIGINT)", "stopped"]
    assert {r["level"] for r in records} == {"info"}


def test_a_second_watch_on_the_same_store_exits_4_with_a_message(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    first = watch(store)
    second = refcount_cli(store, "watch")
    assert second.returncode == 4  # another process holds the store: not a usage error
    assert second.stderr.strip().splitlines()[-1] == (
        f"refcount: error: {store}: a refcount watch daemon already runs on this store"
    )
    assert first.proc.poll() is None


def test_a_clean_stop_removes_watch_pid_and_a_kill_leaves_a_free_lock(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    pid_file = store / ".refcount" / "watch.pid"
    watcher = watch(store)
    assert pid_file.read_text() == f"{watcher.proc.pid}\n"
    watcher.signal(signal.SIGTERM)
    assert watcher.wait(5) == 0
    assert not pid_file.exists()

    killed = watch(store)
    killed.kill()
    assert pid_file.exists()  # nobody could remove it, and nobody holds its lock
    again = watch(store)
    assert pid_file.read_text() == f"{again.proc.pid}\n"


@pytest.mark.tools
def test_sighup_runs_a_full_reconcile(shared: Path, watch: Callable[..., Watcher]) -> None:
    watcher = watch(shared, "--resync", "1h")
    layer = next(
        d
        for d, state in query(shared, "SELECT digest, state FROM blobs")
        if state == "live" and d not in sk.root_digests(shared)
    )
    # Make the database wrong where no file event can reach: only a full
    # reconcile, which compares every blob file with its row, sets it right.
    write_db(shared, "UPDATE blobs SET state = 'missing' WHERE digest = ?", layer)
    assert db_state(shared, layer) == "missing"

    watcher.signal(signal.SIGHUP)
    wait_until(lambda: db_state(shared, layer) == "live", "the full reconcile to repair the row")
    watcher.wait_log(r"full reconcile \(SIGHUP\)")  # written just after the commit
    assert watcher.proc.poll() is None
    assert verify(shared).returncode == 0


# --------------------------------------------------------------------------
# Metrics over HTTP
# --------------------------------------------------------------------------
@pytest.mark.tools
def test_metrics_are_served_over_http_and_match_the_store(
    shared: Path, watch: Callable[..., Watcher]
) -> None:
    watcher = watch(shared, "--metrics-addr", "127.0.0.1:0")
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    _, body = wait_until(lambda: (got := scrape(address, "/healthz"))[0] == 200 and got, "ok")
    assert json.loads(body)["ok"] is True

    figures = samples(scrape(address)[1])
    reachable = sk.reachable(shared)
    assert figures[("refcount_roots", ())] == len(sk.root_digests(shared)) == 3
    assert figures[("refcount_live_blobs", ())] == len(reachable)
    assert figures[("refcount_live_bytes", ())] == sum(
        sk.blob_path(shared, d).stat().st_size for d in reachable
    )
    assert figures[("refcount_orphan_blobs", ())] == 0
    assert figures[("refcount_batches_applied_total", (("kind", "full"),))] >= 1

    before = sk.reachable(shared)
    umoci("rm", "--image", f"{shared}:b")
    freed = before - sk.reachable(shared)
    freed_bytes = sum(sk.blob_path(shared, d).stat().st_size for d in freed)
    key = ("refcount_freed_blobs_total", (("reason", "released"),))
    figures = wait_until(
        lambda: (found := samples(scrape(address)[1])).get(key) == len(freed) and found,
        "the freed blobs in the metrics",
    )
    assert figures[("refcount_freed_bytes_total", (("reason", "released"),))] == freed_bytes
    assert figures[("refcount_roots", ())] == 2
    assert figures[("refcount_live_blobs", ())] == len(sk.reachable(shared))
    assert figures[("refcount_quarantined_blobs", ())] == len(freed)
    assert figures[("refcount_quarantined_bytes", ())] == freed_bytes
    assert figures[("refcount_batches_applied_total", (("kind", "batch"),))] >= 1
    assert figures[("refcount_reconcile_duration_seconds_count", (("kind", "batch"),))] >= 1
    assert figures[("refcount_last_successful_reconcile_timestamp_seconds", ())] > 0
    assert scrape(address, "/nothing")[0] == 404


def test_metrics_follow_the_commands_the_daemon_serves_without_a_sighup(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 4)
    watcher = watch(store, "--metrics-addr", "127.0.0.1:0", "--resync", "1h")
    address = watcher.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
    wait_until(lambda: (store / ".refcount" / "refcount.sock").exists(), "the command socket")
    before = samples(scrape(address)[1])
    assert before[("refcount_roots", ())] == 4
    deleted = ("refcount_freed_blobs_total", (("reason", "deleted"),))
    swept = ("refcount_freed_blobs_total", (("reason", "orphan"),))

    served_cli(store, "delete", "tag", "img0", "--dry-run")  # counts nothing
    report = json.loads(served_cli(store, "--json", "delete", "tag", "img1").stdout)
    freed = len(report["freed"])
    assert freed == 2  # img1's manifest and config; its layers are shared
    figures = wait_until(
        lambda: (found := samples(scrape(address)[1]))[("refcount_roots", ())] == 3 and found,
        "the delete in the metrics",
    )
    assert figures[deleted] == before.get(deleted, 0) + freed
    assert (
        figures[("refcount_freed_bytes_total", (("reason", "deleted"),))] == (report["freed_bytes"])
    )
    assert figures[("refcount_quarantined_blobs", ())] == freed
    assert figures[("refcount_quarantined_bytes", ())] == report["freed_bytes"]
    assert figures[("refcount_live_blobs", ())] == len(sk.reachable(store))

    orphan = sk.write_blob(store, b"an abandoned upload", "application/octet-stream")
    wait_until(
        lambda: samples(scrape(address)[1])[("refcount_orphan_blobs", ())] == 1,
        "the daemon to record the orphan",
    )
    served_cli(store, "gc", "--grace", "0s")
    figures = wait_until(
        lambda: (
            (found := samples(scrape(address)[1]))[("refcount_orphan_blobs", ())] == 0 and found
        ),
        "the gc in the metrics",
    )
    assert orphan["digest"] not in sk.blob_files(store)
    assert figures[swept] == before.get(swept, 0) + 1
    assert figures[deleted] == before.get(deleted, 0) + freed

    # A delete the daemon did not serve: no report reaches it, but the batch of
    # its index.json rewrite refreshes the gauges (its frees are not counted).
    ran = subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), "delete", "tag", "img2"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env=direct_env(),
    )
    assert ran.returncode == 0, ran.stderr
    figures = wait_until(
        lambda: (found := samples(scrape(address)[1]))[("refcount_roots", ())] == 2 and found,
        "the gauges after a delete the daemon did not serve",
    )
    assert figures[("refcount_quarantined_blobs", ())] == len(trash(store)) > freed
    assert figures[deleted] == before.get(deleted, 0) + freed
    assert "full reconcile (SIGHUP)" not in watcher.log()


def test_a_bad_metrics_address_is_refused_with_exit_2(store: Path) -> None:
    ran = refcount_cli(store, "watch", "--metrics-addr", "nowhere")
    assert ran.returncode == 2
    assert ran.stderr.strip().splitlines()[-1].startswith("refcount: error: 'nowhere': invalid")


# --------------------------------------------------------------------------
# In-process: the parts a subprocess cannot reach
# --------------------------------------------------------------------------
@pytest.fixture
def daemon(store: Path) -> Iterator[Callable[..., Daemon]]:
    made: list[tuple[Daemon, refcount.Refcounter]] = []

    def start(
        options: WatchOptions | None = None,
        *,
        tuning: dict[str, float] | None = None,
        **policy: Any,
    ) -> Daemon:
        rc = refcount.open(store, **policy)
        timing = (options or WatchOptions(debounce=0.02, resync=timedelta(hours=1))).timing()
        running = Daemon(rc, store, replace(timing, **(tuning or {})))
        made.append((running, rc))
        running.start()
        assert running.wait_applied(timeout=DEADLINE), "start-up reconcile"
        return running

    yield start
    for running, rc in made:
        running.stop()
        rc.close()


def test_events_are_applied_and_wait_applied_needs_no_sleep(
    store: Path, daemon: Callable[..., Daemon]
) -> None:
    running = daemon()
    seen = running.seen_epoch
    image = sk.add_image(store, [b"one layer"], tag="x")
    assert running.wait_seen(seen) and running.wait_applied()
    wait_until(lambda: caught_up(store), "the new tag")  # later events of the same change
    assert db_counts(store) == oracle_counts(store)
    assert db_counts(store)[image["digest"]] == 1


def test_the_observer_is_rebuilt_when_its_threads_die(
    store: Path, daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    image = sk.add_image(store, [b"a layer"], tag="x")
    running = daemon()
    layer = sk.graph(store)[image["digest"]] - {image["digest"]}
    config_or_layer = sorted(layer)[0]
    write_db(store, "UPDATE blobs SET state = 'missing' WHERE digest = ?", config_or_layer)
    observer = running.events.observer
    assert observer is not None
    with caplog.at_level(logging.WARNING, "refcount.watch"):
        for emitter in list(observer.emitters):
            emitter.stop()  # as if watchdog's thread had died
        wait_until(lambda: db_state(store, config_or_layer) == "live", "a full reconcile")
    assert "an emitter thread stopped; rebuilding the observer" in caplog.text
    assert running.events.observer is not observer
    # And the new observer reports events.
    seen = running.seen_epoch
    sk.add_image(store, [b"another layer"], tag="y")
    assert running.wait_seen(seen)
    wait_until(lambda: caught_up(store), "the event through the new observer")


def test_a_lost_events_warning_from_watchdog_triggers_a_full_reconcile(
    store: Path, daemon: Callable[..., Daemon]
) -> None:
    image = sk.add_image(store, [b"a layer"], tag="x")
    running = daemon()
    write_db(store, "UPDATE blobs SET state = 'missing' WHERE digest = ?", image["digest"])
    # What watchdog's inotify reader logs on IN_Q_OVERFLOW, and nothing else.
    logging.getLogger("watchdog.observers.inotify_c").warning(
        "Inotify queue overflowed; filesystem events were lost"
    )
    wait_until(lambda: db_state(store, image["digest"]) == "live", "a full reconcile")
    assert running.health().ok


def test_the_gc_timer_sweeps_old_orphans_and_purges_expired_trash(
    store: Path, daemon: Callable[..., Daemon]
) -> None:
    kept = sk.add_image(store, [b"kept"], tag="kept")
    gone = sk.add_image(store, [b"gone"], tag="gone")
    orphan = sk.write_blob(store, b"an old upload", "application/octet-stream")
    old = time.time() - 3600
    os.utime(sk.blob_path(store, orphan["digest"]), (old, old))
    options = WatchOptions(
        debounce=0.02, resync=timedelta(hours=1), gc_interval=timedelta(seconds=0.2)
    )
    running = daemon(options, grace=timedelta(minutes=30), trash_ttl=timedelta(seconds=0.5))
    freed = sk.reachable(store)
    sk.remove_entries(store, lambda e: e["digest"] == gone["digest"])
    freed -= sk.reachable(store)

    wait_until(lambda: orphan["digest"] not in sk.blob_files(store), "the orphan to be swept")
    wait_until(lambda: trash(store) == set() and not freed & sk.blob_files(store), "the purge")
    assert sk.blob_files(store) == sk.reachable(store)
    assert kept["digest"] in sk.blob_files(store)

    def purged() -> bool:
        # The files go before gc's report reaches the metrics: wait for the count too.
        value = running.metrics.registry.get_sample_value("refcount_purged_blobs_total")
        return value is not None and value >= len(freed)

    wait_until(purged, "refcount_purged_blobs_total to count the purge")


def test_an_unparsable_index_is_retried_never_read_as_no_roots(
    store: Path, daemon: Callable[..., Daemon]
) -> None:
    small_images(store, 2)
    running = daemon()
    files = sk.blob_files(store)
    good = (store / "index.json").read_bytes()
    seen = running.seen_epoch
    (store / "index.json").write_bytes(b"")
    assert running.wait_seen(seen)
    assert not running.wait_applied(timeout=0.5)  # nothing applied while it is empty
    assert sk.blob_files(store) == files
    (store / "index.json").write_bytes(good + b"\n")
    assert running.wait_applied()
    assert sk.blob_files(store) == files and trash(store) == set()
    failures = running.metrics.registry.get_sample_value(
        "refcount_reconcile_failures_total", {"reason": "invalid_index"}
    )
    assert failures is not None and failures >= 1


def test_the_warnings_about_an_invalid_store_come_with_doubling_gaps_up_to_a_cap() -> None:
    assert warning_delay(0, first=10.0, gap=10.0, cap=600.0) == 10.0  # unparsable: wait
    assert warning_delay(0, first=0.0, gap=10.0, cap=600.0) == 0.0  # not an index: at once
    gaps = [warning_delay(n, first=0.0, gap=10.0, cap=600.0) for n in range(1, 9)]
    assert gaps == [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 600.0, 600.0]
    assert warning_delay(10**6, first=0.0, gap=10.0, cap=600.0) == 600.0


def test_an_unparsable_index_is_warned_about_after_a_delay_then_less_and_less_often(
    store: Path, daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    # The schedule, scaled down: first warning after 0.4 s, then gaps of 0.4 s and
    # 0.8 s (the cap), with a re-read every 50 ms meanwhile.
    small_images(store, 2)
    running = daemon(tuning={"warning_after": 0.4, "warning_max": 0.8, "retry_max": 0.05})
    files = sk.blob_files(store)
    good = (store / "index.json").read_bytes()

    def lines(text: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if text in r.getMessage()]

    with caplog.at_level(logging.DEBUG, "refcount.watch"):
        seen = running.seen_epoch
        written = time.time()
        (store / "index.json").write_bytes(good[: len(good) // 2])  # caught mid-write
        assert running.wait_seen(seen)
        wait_until(lambda: len(lines("nothing is applied")) >= 4, "four warnings")
        warnings = lines("nothing is applied")[:4]
        assert {r.levelno for r in warnings} == {logging.WARNING}
        assert "index.json: invalid JSON" in warnings[0].getMessage()
        times = [written] + [r.created for r in warnings]
        gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
        slack = 0.02  # record times are wall-clock, the schedule monotonic
        assert all(
            gap >= least - slack for gap, least in zip(gaps, [0.4, 0.4, 0.8, 0.8], strict=True)
        )
        assert len(lines("re-reading shortly")) >= 10  # while re-reads went on
        assert sk.blob_files(store) == files

        rename_into_place(store, good)  # not in place: that could be caught empty
        assert running.wait_applied()
        back = lines("the store is valid again after")
    assert len(back) == 1 and back[0].levelno == logging.INFO
    assert "(was: " in back[0].getMessage() and "index.json: invalid JSON" in back[0].getMessage()
    assert sk.blob_files(store) == files and trash(store) == set()


def test_a_write_caught_in_progress_is_no_warning_and_its_end_no_info_line(
    store: Path, daemon: Callable[..., Daemon], caplog: pytest.LogCaptureFixture
) -> None:
    small_images(store, 2)
    running = daemon()
    good = (store / "index.json").read_bytes()
    with caplog.at_level(logging.INFO, "refcount.watch"):
        seen = running.seen_epoch
        (store / "index.json").write_bytes(b"")
        assert running.wait_seen(seen)
        assert not running.wait_applied(timeout=0.5)
        (store / "index.json").write_bytes(good + b"\n")
        assert running.wait_applied()
    assert "nothing is applied" not in caplog.text
    assert "valid again" not in caplog.text


def test_a_batch_that_hits_a_half_written_index_is_retried_without_a_new_event(
    store: Path, daemon: Callable[..., Daemon], monkeypatch: pytest.MonkeyPatch
) -> None:
    running = daemon()
    calls: list[refcount.Changes | None] = []
    real_sync = running.collector.sync

    def flaky_sync(changes: refcount.Changes | None = None) -> refcount.SyncReport:
        calls.append(changes)
        if len(calls) <= 3:  # what core raises for an empty or partial index.json
            raise refcount.InvalidStore(f"{store}/index.json: not valid JSON")
        return real_sync(changes)

    monkeypatch.setattr(running.collector, "sync", flaky_sync)
    running.notice(PathSet(index=True, blobs={f"sha256:{H}"}))
    assert running.wait_applied()
    # The same batch, re-read after the backoff: never dropped, never applied half.
    assert calls == [refcount.Changes(index=True, blobs=frozenset({f"sha256:{H}"}))] * 4


def test_events_become_index_or_blob_paths_and_temp_names_are_ignored(tmp_path: Path) -> None:
    root = tmp_path / "s"
    seen: list[PathSet] = []
    lost: list[str] = []
    handler = StoreEventHandler(root, seen.append, lost.append)
    blob = str(root / "blobs" / "sha256" / H)
    for event in (
        FileMovedEvent(str(root / ".umoci-1" / "index-2"), str(root / "index.json")),
        FileModifiedEvent(str(root / "index.json")),
        FileMovedEvent(str(root / "oci-put-blob123"), blob),
        FileCreatedEvent(blob),
        FileDeletedEvent(blob),
        FileMovedEvent(blob, str(root / ".refcount" / "trash" / "sha256" / H)),
    ):
        handler.dispatch(event)
    assert [(p.index, p.blobs) for p in seen] == [
        (True, set()),
        (True, set()),
        (False, {f"sha256:{H}"}),
        (False, {f"sha256:{H}"}),
        (False, {f"sha256:{H}"}),
        (False, {f"sha256:{H}"}),
    ]
    for ignored in (
        root / "oci-put-blob123",
        root / ".umoci-1" / "index-2",
        root / "oci-layout",
        root / "index.json.tmp",
        root / "blobs" / "sha256" / f"{H}.partial",
        root / "blobs" / "sha256" / H.upper(),
        root / "blobs" / "sha256" / H[:-1],
        root / "blobs" / "md5" / H[:32],
        root / ".refcount" / "trash" / "sha256" / H,
        root / ".refcount" / "refcount.db-wal",
    ):
        handler.dispatch(FileCreatedEvent(str(ignored)))
        handler.dispatch(FileModifiedEvent(str(ignored)))
    assert len(seen) == 6 and not lost
    handler.dispatch(DirDeletedEvent(str(root / "blobs" / "sha256")))
    assert lost and len(seen) == 6
    assert classify(root, str(root / "blobs" / "sha512" / ("ab" * 64))) == BlobFile(
        "sha512:" + "ab" * 64
    )


def test_what_each_sync_did_reaches_the_daemons_log_only_with_v(
    store: Path, watch: Callable[..., Watcher]
) -> None:
    small_images(store, 2)
    quiet = watch(store)
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "img1")
    quiet.wait_log(r"batch: index.json changed; roots \+0 -1")
    quiet.signal(signal.SIGTERM)
    assert quiet.wait(5) == 0
    assert "refcount: sync: " not in quiet.log()  # one line per batch
    loud = watch(store, "-v")
    sk.remove_entries(store, lambda e: sk.tag_of(e) == "img0")
    loud.wait_log(r"batch: index.json changed; roots \+0 -1")
    loud.wait_log(r"refcount: sync: index.json: 0 roots added, 1 removed\n")
    loud.wait_log(r"refcount: sync: \d+ blobs freed \(\d+ B\)\n")
