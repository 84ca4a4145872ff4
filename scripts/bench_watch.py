#!/usr/bin/env python3
"""How long after an outside tool renames index.json is refcount's database right?

    bench_watch.py [--images 500] [--singles 100] [--burst 500] [--debounce 0.1]
                   [--deep-slice N] [--store DIR]

Builds a store with scripts/mkstore.py (or uses --store, which must be a layout
refcount may change), indexes it, and starts `refcount watch` as a subprocess,
exactly as a sidecar runs. Then it plays an outside tool: every change writes a
new index.json to a temporary file in the store and renames it over the old one
(as umoci does), removing one tag or putting a removed one back, so each change
frees or restores the blobs of one image. Every index.json written is unique
(a top-level annotation carries a sequence number).

Latency of a change = from just before its rename to the first moment the
database records that index.json or a later one (the `index_hash` row, which is
committed in the same transaction as the counts). The database is polled
read-only, every 0.5 ms, from this process.

- singles: one change, wait until it is applied, repeat;
- burst: all changes back to back, as fast as the disk allows.

Prints p50/p99/max per scenario, the batches the daemon applied (from its
/metrics), and the result of `refcount verify` at the end.

With --deep-slice N, a second daemon then runs with `--deep-every 0.1s
--deep-slice N` (deep verify slices back to back, each recounting the store
and hashing N blobs) and the singles are measured again: the `deep` row, and
its p99 as a ratio to the first run's (the floor measured in the same run).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REF_NAME = "org.opencontainers.image.ref.name"
HERE = Path(__file__).resolve().parent


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--images", type=int, default=500, help="images in the generated store")
    p.add_argument("--singles", type=int, default=100, help="changes applied one at a time")
    p.add_argument("--burst", type=int, default=500, help="changes written back to back")
    p.add_argument("--debounce", type=float, default=0.1, help="the daemon's --debounce")
    p.add_argument("--store", type=Path, help="use this layout instead of generating one")
    p.add_argument(
        "--deep-slice",
        type=int,
        default=0,
        help="also measure the singles while the daemon runs deep slices of N blobs (0: no)",
    )
    return p.parse_args(argv)


# --- the store ------------------------------------------------------------------
class Index:
    """index.json as an outside tool rewrites it: temp file in the store + rename."""

    def __init__(self, store: Path) -> None:
        self.store = store
        self.data = json.loads((store / "index.json").read_bytes())
        self.entries: list[dict[str, Any]] = list(self.data.get("manifests") or [])
        self.removed: list[dict[str, Any]] = []
        self.seq = 0
        self.rng = random.Random(1)

    def change(self) -> tuple[float, str]:
        """Remove a tag or put one back; rename into place. Returns (time, hash)."""
        tagged = [e for e in self.entries if (e.get("annotations") or {}).get(REF_NAME)]
        if self.removed and (self.rng.random() < 0.5 or len(tagged) < 2):
            self.entries.append(self.removed.pop(self.rng.randrange(len(self.removed))))
        else:
            victim = self.rng.choice(tagged)
            self.entries.remove(victim)
            self.removed.append(victim)
        self.seq += 1
        body = {
            **self.data,
            "manifests": self.entries,
            "annotations": {"bench.refcount.seq": str(self.seq)},
        }
        data = json.dumps(body, separators=(",", ":")).encode()
        fd, temp = tempfile.mkstemp(dir=self.store, prefix=".bench-index-")
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        started = time.perf_counter()
        os.rename(temp, self.store / "index.json")
        return started, hashlib.sha256(data).hexdigest()


def make_store(images: int, where: Path) -> Path:
    store = where / "store"
    mkstore = [sys.executable, str(HERE / "mkstore.py"), str(store)]
    run([*mkstore, "--images", str(images), "--layers", "4"])
    return store


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def refcount(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "refcount", "--store", str(store), *args]


# --- watching the database ----------------------------------------------------------
class Poller(threading.Thread):
    """Records (time, index_hash) each time the database's recorded index.json changes."""

    def __init__(self, store: Path) -> None:
        super().__init__(daemon=True)
        db = store / ".refcount" / "refcount.db"
        self.connection = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        self.seen: list[tuple[float, str]] = []
        self.stop = threading.Event()
        self.changed = threading.Condition()

    def current(self) -> str | None:
        row = self.connection.execute("SELECT value FROM meta WHERE key = 'index_hash'").fetchone()
        return None if row is None else str(row[0])

    def run(self) -> None:
        last = None
        while not self.stop.is_set():
            value = self.current()
            if value != last:
                with self.changed:
                    self.seen.append((time.perf_counter(), value or ""))
                    self.changed.notify_all()
                last = value
            time.sleep(0.0005)

    def wait_for(self, wanted: str, timeout: float = 60.0) -> float:
        """The time the database first held `wanted`."""
        with self.changed:
            found = self.changed.wait_for(lambda: any(h == wanted for _, h in self.seen), timeout)
            if not found:
                raise TimeoutError(f"the daemon never recorded index {wanted[:12]}")
            return next(t for t, h in self.seen if h == wanted)


def latencies(changes: list[tuple[float, str]], seen: list[tuple[float, str]]) -> list[float]:
    """Per change: first time the database held it or any later change, minus its rename."""
    order = {h: i for i, (_, h) in enumerate(changes)}
    result = []
    for i, (started, _) in enumerate(changes):
        applied = next(t for t, h in seen if t >= started and order.get(h, -1) >= i)
        result.append(applied - started)
    return result


def summary(name: str, values: list[float]) -> str:
    return (
        f"{name:<8} n={len(values):<4} p50 {1000 * statistics.median(values):7.1f} ms   "
        f"p99 {1000 * p99(values):7.1f} ms   max {1000 * max(values):7.1f} ms"
    )


# --- the daemon -------------------------------------------------------------------
def scrape(address: str) -> dict[str, float]:
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as response:
        text = response.read().decode()
    figures = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return figures


def settled(address: str, debounce: float) -> dict[str, float]:
    """The metrics once the daemon is idle: its counters move just after the commit
    the poller saw, and the events of its own frees make one more (empty) batch."""
    time.sleep(max(0.5, 5 * debounce))
    return scrape(address)


def wait(condition: Callable[[], Any], what: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        time.sleep(0.01)
    return value


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-watch-") as tmp:
        store = args.store or make_store(args.images, Path(tmp))
        run(refcount(store, "init"))
        with daemon_on(store, args, Path(tmp) / "watch.log") as log_path:
            code, floor = bench(args, store, log_path)
        if not args.deep_slice or code != 0:
            return code
        deep = ["--deep-every", "0.1s", "--deep-slice", str(args.deep_slice)]
        with daemon_on(store, args, Path(tmp) / "watch-deep.log", deep) as log_path:
            return bench_during_deep(args, store, log_path, floor)


@contextlib.contextmanager
def daemon_on(
    store: Path, args: argparse.Namespace, log_path: Path, extra: Sequence[str] = ()
) -> Iterator[Path]:
    """`refcount watch` on the store, its log in `log_path`, stopped on leaving."""
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            refcount(
                store,
                "watch",
                *("--debounce", str(args.debounce), "--metrics-addr", "127.0.0.1:0"),
                *extra,
            ),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            yield log_path
        finally:
            daemon.terminate()
            daemon.wait(10)


def started(log_path: Path) -> str:
    """The daemon's metrics address, once its start-up reconcile is applied."""
    address = wait(
        lambda: re.search(r"serving metrics on http://(\S+)/metrics", log_path.read_text()),
        "the daemon to start",
    ).group(1)
    wait(lambda: "full reconcile (start)" in log_path.read_text(), "the start-up reconcile")
    return str(address)


def measure_singles(index: Index, poller: Poller, number: int) -> list[float]:
    singles = []
    for _ in range(number):
        begun, wanted = index.change()
        singles.append(poller.wait_for(wanted) - begun)
    return singles


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def bench_during_deep(
    args: argparse.Namespace, store: Path, log_path: Path, floor: list[float]
) -> int:
    """The singles again while deep slices run back to back; p99 as a ratio to `floor`."""
    started(log_path)
    wait(lambda: "verify (deep slice)" in log_path.read_text(), "the first deep slice")
    poller = Poller(store)
    poller.start()
    deep = measure_singles(Index(store), poller, args.singles)
    poller.stop.set()
    poller.join()
    slices = log_path.read_text().count("verify (deep slice)")
    print(summary("deep", deep))
    print(
        f"deep     {slices} deep slices of {args.deep_slice} blobs ran meanwhile; watcher p99 "
        f"{p99(deep) / p99(floor):.2f} x the p99 without them"
    )
    verify = subprocess.run(refcount(store, "verify"), capture_output=True, text=True)
    return verify.returncode


def bench(args: argparse.Namespace, store: Path, log_path: Path) -> tuple[int, list[float]]:
    """The singles and the burst; verify's exit code and the singles' latencies."""
    address = started(log_path)
    index = Index(store)
    blobs = sum(1 for _ in (store / "blobs" / "sha256").iterdir())
    print(
        f"store: {len(index.entries)} roots, {blobs} blobs; daemon --debounce {args.debounce}; "
        f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs"
    )
    poller = Poller(store)
    poller.start()
    before = settled(address, args.debounce)

    singles = measure_singles(index, poller, args.singles)
    print(summary("single", singles))

    middle = settled(address, args.debounce)
    changes = [index.change() for _ in range(args.burst)]
    written = changes[-1][0] - changes[0][0]
    last = poller.wait_for(changes[-1][1])
    with poller.changed:
        seen = list(poller.seen)
    print(summary("burst", latencies(changes, seen)))
    after = settled(address, args.debounce)
    poller.stop.set()
    poller.join()

    batch = 'refcount_batches_applied_total{kind="batch"}'
    seconds = 'refcount_reconcile_duration_seconds_sum{kind="batch"}'
    for name, start, end, number in (
        ("single", before, middle, args.singles),
        ("burst", middle, after, args.burst),
    ):
        batches = end[batch] - start[batch]
        mean = (end.get(seconds, 0) - start.get(seconds, 0)) / batches if batches else 0.0
        print(
            f"{name:<8} {number} changes -> {batches:.0f} batches (with those of its own frees), "
            f"mean apply {1000 * mean:.1f} ms per batch"
        )
    print(
        f"burst    written in {1000 * written:.0f} ms; consistent "
        f"{1000 * (last - changes[-1][0]):.0f} ms after the last rename"
    )
    verify = subprocess.run(refcount(store, "verify"), capture_output=True, text=True)
    print(f"verify: exit {verify.returncode}: {verify.stdout.strip().splitlines()[-1]}")
    return verify.returncode, singles


if __name__ == "__main__":
    sys.exit(main())
