#!/usr/bin/env python3
"""Group commit: twenty `refcount delete tag` clients at once, against one alone.

    bench_group.py [--sizes 10k,100k] [--out /tmp/refcount-bench] [--clients 20]
                   [--rounds 3] [--work DIR] [--json FILE]

For each size N it copies the pristine store OUT/stores/images-N-k5 (made by
scripts/mkstore.py --images N --layers 5, as scripts/bench.py makes them; never
written to) into a scratch directory (blobs/ hard-linked, the rest copied),
indexes the copy with `refcount init`, starts `refcount watch` on it and waits
for its start-up reconcile. Then, `--rounds` times, interleaved:

- one `refcount delete tag` process alone (wall time from its start to its exit);
- `--clients` `refcount delete tag` processes started at the same moment, each
  on a tag of its own (wall time from the first start to the last exit).

It prints both medians and their ratio (the issue's target: at most 3x at 100k),
and the daemon's own count of group commits and index.json rewrites from its
metrics. Nothing is asserted: a slow figure is a result. `measure_group` is the
function another script can import; `main()` prints the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

REF_NAME = "org.opencontainers.image.ref.name"

Row = dict[str, Any]


def say(text: str) -> None:
    print(text, flush=True)


def refcount(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "refcount", "--store", str(store), *args]


def copy_store(src: Path, dst: Path) -> None:
    """blobs/ hard-linked (`cp -al`: no writer here changes a blob in place), the
    rest (index.json, oci-layout, .refcount/) copied."""
    if dst.exists():
        shutil.rmtree(dst)
    dst.mkdir(parents=True)
    for entry in sorted(src.iterdir()):
        flags = "-al" if entry.name == "blobs" else "-a"
        subprocess.run(["cp", flags, str(entry), str(dst / entry.name)], check=True)


def _wait(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


def _get(address: str, path: str) -> str | None:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as response:
            return str(response.read().decode())
    except OSError:  # 503 while reconciling is an HTTPError, an OSError too
        return None


def _group_figures(address: str) -> dict[str, float]:
    text = _get(address, "/metrics") or ""
    figures = {}
    for line in text.splitlines():
        if line.startswith(("refcount_index_rewrites_total", "refcount_delete_group_size_")):
            name, value = line.rsplit(" ", 1)
            figures[name] = float(value)
    return figures


def _run_clients(store: Path, tags: list[str]) -> float:
    """Start one `refcount delete tag` process per tag at once; seconds until the last exits."""
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            refcount(store, "delete", "tag", tag),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for tag in tags
    ]
    failed = []
    for proc, tag in zip(procs, tags, strict=True):
        _out, err = proc.communicate()
        if proc.returncode != 0:
            failed.append(f"{tag}: exit {proc.returncode}: {err.strip()}")
    elapsed = time.perf_counter() - started
    if failed:
        raise RuntimeError("; ".join(failed))
    return elapsed


def measure_group(
    store: Path, tags: list[str], log_path: Path, *, clients: int = 20, rounds: int = 3
) -> Row:
    """On an indexed `store`, with `refcount watch` running: the median wall time of
    one `refcount delete tag` process alone and of `clients` of them started at
    once, `rounds` of each interleaved, each on tags of its own from `tags`
    (needs rounds * (clients + 1) of them); with the daemon's metrics after."""
    needed = rounds * (clients + 1)
    if len(tags) < needed:
        raise ValueError(f"{len(tags)} tags; {needed} needed")
    socket_path = store / ".refcount" / "refcount.sock"
    env = {k: v for k, v in os.environ.items() if k != "REFCOUNT_NO_DAEMON"}
    with open(log_path, "wb") as log_file:
        daemon = subprocess.Popen(
            refcount(store, "watch", "--metrics-addr", "127.0.0.1:0"),
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:

            def address() -> str | None:
                if daemon.poll() is not None:
                    raise RuntimeError(f"refcount watch exited: {log_path.read_text()[-2000:]}")
                found = re.search(r"serving metrics on http://(\S+)/metrics", log_path.read_text())
                return found.group(1) if found else None

            addr: str = _wait(address, "the daemon's metrics address", 120)

            def ready() -> bool:
                health = json.loads(_get(addr, "/healthz") or "null")
                return bool(health and health.get("ok") and not health.get("pending"))

            _wait(lambda: ready() and socket_path.exists(), "the daemon's start-up", 1800)
            time.sleep(1.0)  # idle: nothing pending
            singles, groups = [], []
            pool = iter(tags)
            for _round in range(rounds):
                singles.append(_run_clients(store, [next(pool)]))
                time.sleep(0.5)  # let the watcher's batch for it pass
                groups.append(_run_clients(store, [next(pool) for _ in range(clients)]))
                time.sleep(0.5)
            # The daemon counts a served report on its worker, just after answering.
            served = rounds * (clients + 1)
            try:
                figures = _wait(
                    lambda: (
                        (f := _group_figures(addr)).get("refcount_delete_group_size_sum") == served
                        and f
                    ),
                    "the deletes in the daemon's metrics",
                    30,
                )
            except TimeoutError:
                figures = _group_figures(addr)
        finally:
            daemon.send_signal(signal.SIGTERM)
            try:
                daemon.wait(60)
            except subprocess.TimeoutExpired:
                daemon.kill()
                daemon.wait()
    single, group = statistics.median(singles), statistics.median(groups)
    return {
        "clients": clients,
        "rounds": rounds,
        "single_s": singles,
        "group_s": groups,
        "single_median_s": single,
        "group_median_s": group,
        "group_over_single": group / single,
        "group_commits": figures.get("refcount_delete_group_size_count"),
        "deletes_served": figures.get("refcount_delete_group_size_sum"),
        "index_rewrites": figures.get("refcount_index_rewrites_total"),
    }


def _images(text: str) -> int:
    text = text.lower()
    return int(float(text[:-1]) * 1000) if text.endswith("k") else int(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10k,100k")
    parser.add_argument("--out", type=Path, default=Path("/tmp/refcount-bench"))
    parser.add_argument("--work", type=Path, default=None, help="scratch dir (default OUT/group)")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    work = args.work or args.out / "group"
    results: dict[str, Row] = {}
    for size in args.sizes.split(","):
        n = _images(size)
        pristine = args.out / "stores" / f"images-{n}-k5"
        if not (pristine / "index.json").exists():
            raise SystemExit(f"{pristine}: no store (make it with scripts/mkstore.py)")
        copy = work / f"images-{n}"
        try:
            copy_store(pristine, copy)
            started = time.perf_counter()
            subprocess.run(
                refcount(copy, "init"),
                check=True,
                stdout=subprocess.DEVNULL,
                env={**os.environ, "REFCOUNT_NO_DAEMON": "1"},
            )
            say(f"[{size}] indexed a copy in {time.perf_counter() - started:.1f} s")
            index = json.loads((copy / "index.json").read_bytes())
            tags = [
                e["annotations"][REF_NAME]
                for e in index["manifests"]
                if REF_NAME in e.get("annotations", {})
            ]
            random.Random(13).shuffle(tags)
            row = measure_group(
                copy, tags, work / f"watch-{n}.log", clients=args.clients, rounds=args.rounds
            )
        finally:
            shutil.rmtree(copy, ignore_errors=True)
        results[size] = row
        say(
            f"[{size}] one delete alone: median {row['single_median_s']:.3f} s; "
            f"{args.clients} at once: median {row['group_median_s']:.3f} s; "
            f"ratio {row['group_over_single']:.2f}x (target <= 3x); "
            f"{row['deletes_served']:.0f} deletes served in {row['group_commits']:.0f} group "
            f"commits, {row['index_rewrites']:.0f} rewrites of index.json"
        )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
