#!/usr/bin/env python3
"""refcount against the store's size, and against `umoci rm` + `umoci gc` on the same store.

    bench.py [--sizes 1k,10k] [--out /tmp/refcount-bench] [--json FILE]
             [--deletes 200] [--process-deletes 20] [--rss-deletes N] [--group 20]
             [--skip-umoci] [--skip-daemon] [--skip-watch] [--watch-singles N]
             [--watch-burst N] [--postgres URL]

For each size N it builds (once; cached in OUT/stores/ and reused) a store of N
images with scripts/mkstore.py (5 layers each, mkstore's defaults otherwise),
then works on fresh copies of it, so every measurement starts from an
identical store:

- `refcount init` as a whole process: wall time and peak RSS (/usr/bin/time);
- no-op `sync`, `verify` and `verify --deep` through the library, and
  `find blobs -type f -print0 | xargs -0 sha256sum` over the same files as the
  physical limit of a deep verify (files per second for both);
- `du` of every tag, `du REF` of one tag (median of 20; 5 above 10k), through the library
  and beside the shallow verify of the same run (`du / shallow verify`), and the
  time to write the `du --html` page;
- `delete tag` through the library: median and p99 of --deletes deletes of
  random distinct tags (trash TTL at its default);
- many deletes, one rewrite: `delete tag` of 100 random tags in one call, and
  `prune --keep-last 0 --match img-1???` (1,000 tags from 2k images on), each
  with its count of index.json writes (must be 1), beside the same number of
  single deletes extrapolated from the single-delete median above (a ratio of
  two figures of the same run);
- the floor of one delete: scripts/delete_floor.py in a fresh `python -S` process
  (read index.json, cut out one entry, write a temporary file, fsync, rename over
  a scratch copy, fsync the directory, commit one row to a SQLite WAL database),
  run right before each whole-process delete below, on the same index.json;
- `refcount delete tag` as a whole process, median of --process-deletes, with
  REFCOUNT_NO_DAEMON=1 (the direct path), each followed by the import floor
  (`python -c "import sqlalchemy, typer"`), and again while `refcount watch` runs
  on the store, once it has reconciled; both beside the floor (their ratios to
  it). The fast path counts only when the daemon's socket
  STORE/.refcount/refcount.sock exists; otherwise those columns say n/a;
- the daemon's RSS idle, and again after it served --rss-deletes deletes
  (default images/100, at least 10, at most 1,000), sent over its socket by this
  process with the client's own code;
- the group-commit figure: --group (20) `refcount delete tag` clients, started
  and imported beforehand, released at once, until the last has exited, against
  one client released alone (3 rounds from 1k to 10k images, 1 otherwise);
- `umoci rm --image S:TAG && umoci gc --layout S`, and `umoci gc` alone, on
  copies of the same store (median of 3 up to 10k images, 1 above), and their
  ratio to `refcount delete tag` as a process;
- once, at the smallest size, scripts/bench_watch.py (the watcher's latency).

It prints every figure as it goes, then one table, the issues' targets with
the figure each one was judged on, and writes everything to --json. It asserts
nothing about times: a slow figure is a result, not a failure. refcount's
bytecode is written first (`compile_refcount`), so no process is timed
compiling its sources.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import random
import re
import resource
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REF_NAME = "org.opencontainers.image.ref.name"
LAYERS = 5
MB = 1024 * 1024

Row = dict[str, Any]


# --- small helpers -------------------------------------------------------------------
def say(text: str = "") -> None:
    print(text, flush=True)


def parse_size(text: str) -> int:
    """'1k' -> 1000, '100k' -> 100000, '1m' -> 1000000, '200' -> 200."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 200, 1k, 100k)")
    value = int(match.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[match.group(2).lower()]
    if value < 1:
        raise argparse.ArgumentTypeError(f"a size must be at least 1: {text!r}")
    return value


def parse_sizes(text: str) -> list[int]:
    return sorted({parse_size(part) for part in text.split(",") if part.strip()})


def label(n: int) -> str:
    if n % 1_000_000 == 0:
        return f"{n // 1_000_000}m"
    return f"{n // 1000}k" if n % 1000 == 0 else str(n)


def median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def p99(values: list[float]) -> float:
    """Nearest rank: the smallest value at or above 99% of the samples."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.99 * len(ordered)) - 1)]


def repeats(n: int) -> int:
    """How often the whole-store operations run: 3 up to 10k images, once above."""
    return 3 if n <= 10_000 else 1


def rss_deletes(n: int, args: argparse.Namespace) -> int:
    """Deletes the daemon serves before its RSS is read again: --rss-deletes, else n/100
    (1,000 at 100k images), at least 10, at most 1,000."""
    return args.rss_deletes if args.rss_deletes is not None else min(1000, max(10, n // 100))


def group_rounds(n: int) -> int:
    """Rounds of the group-commit figure: 3 from 1k up to 10k images, once otherwise."""
    return 3 if 1000 <= n <= 10_000 else 1


def refcount_cmd(store: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "refcount", "--store", str(store), *args]


def env_for(*, daemon: bool) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("REFCOUNT_NO_DAEMON", None)
    if not daemon:
        env["REFCOUNT_NO_DAEMON"] = "1"
    return env


def run(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure raise with its output (a failed step is no figure)."""
    done = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        raise RuntimeError(
            f"{' '.join(cmd)}: exit {done.returncode}\n{done.stdout[-2000:]}{done.stderr[-2000:]}"
        )
    return done


class Clock:
    """Wall time, and CPU time (user + system) of this process and of the children it
    waited for meanwhile. CPU time barely moves when other work shares the machine, so
    it is printed beside the wall time; it leaves out waiting for the disk."""

    def __enter__(self) -> Clock:
        self.wall = self.cpu = 0.0
        self._start = (time.perf_counter(), time.process_time(), _children_cpu())
        return self

    def __exit__(self, *_: object) -> None:
        wall, own, children = self._start
        self.wall = time.perf_counter() - wall
        self.cpu = time.process_time() - own + _children_cpu() - children


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def timed(cmd: list[str], **kwargs: Any) -> Clock:
    with Clock() as clock:
        run(cmd, **kwargs)
    return clock


# --- the machine ---------------------------------------------------------------------
def _first(path: str, key: str) -> str | None:
    with suppress(OSError):
        for line in Path(path).read_text().splitlines():
            name, _, value = line.partition(":")
            if name.strip() == key:
                return value.strip()
    return None


def _filesystem(path: Path) -> str:
    """fstype and device of the mount that holds `path` (longest matching mount point)."""
    best = ("", "?", "?")
    target = str(path.resolve())
    with suppress(OSError):
        for line in Path("/proc/mounts").read_text().splitlines():
            device, point, fstype, *_ = line.split()
            inside = target == point or target.startswith(point.rstrip("/") + "/")
            if inside and len(point) > len(best[0]):
                best = (point, fstype, device)
    return f"{best[1]} ({best[2]} on {best[0]})"


def _version(cmd: list[str]) -> str | None:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if done.returncode != 0:
        return None
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def describe_machine(out: Path) -> Row:
    import refcount

    mem_kb = _first("/proc/meminfo", "MemTotal")
    source = Path(refcount.__file__).resolve().parent.parent
    git = _version(["git", "-C", str(source), "rev-parse", "--short", "HEAD"])
    dirty = _version(["git", "-C", str(source), "status", "--porcelain", "--", "refcount"])
    return {
        "cpu": _first("/proc/cpuinfo", "model name") or platform.processor() or "?",
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gb": round(int(mem_kb.split()[0]) / MB, 1) if mem_kb else None,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "disk": _filesystem(out),
        "umoci": _version(["umoci", "--version"]),
        "loadavg_start": os.getloadavg(),
        "pythondontwritebytecode": os.environ.get("PYTHONDONTWRITEBYTECODE"),
        "refcount_source": str(source),
        "refcount_commit": f"{git}{'+dirty' if dirty else ''}" if git else None,
    }


def compile_refcount() -> str:
    """Write the bytecode of refcount's modules before anything is timed; returns the
    package directory.

    A wheel is installed compiled, and an editable checkout writes its bytecode on the
    first import, unless PYTHONDONTWRITEBYTECODE is set: then every process compiles
    refcount's sources anew, about 60 ms of CPU per direct `refcount` process on this
    machine, which no installed refcount pays. compileall writes it either way.
    """
    import compileall

    import refcount

    package = Path(refcount.__file__).resolve().parent
    compileall.compile_dir(str(package), quiet=1)
    return str(package)


# --- stores ----------------------------------------------------------------------------
def mkstore_stamp(n: int) -> Row:
    mkstore = HERE / "mkstore.py"
    return {
        "images": n,
        "layers": LAYERS,
        "mkstore_sha256": hashlib.sha256(mkstore.read_bytes()).hexdigest(),
    }


def ensure_store(stores: Path, n: int) -> Path:
    """The pristine store of n images, built once; rebuilt when mkstore.py changed."""
    stores.mkdir(parents=True, exist_ok=True)
    path = stores / f"images-{n}-k{LAYERS}"
    stamp_path = stores / f"images-{n}-k{LAYERS}.json"
    stamp = mkstore_stamp(n)
    with suppress(OSError, ValueError):
        if path.is_dir() and json.loads(stamp_path.read_text())["stamp"] == stamp:
            say(f"[{label(n)}] reusing {path}")
            return path
    for stale in (path, path.with_name(path.name + ".tmp")):
        if stale.exists():
            shutil.rmtree(stale)
    say(f"[{label(n)}] building {path} with mkstore (once) ...")
    temp = path.with_name(path.name + ".tmp")
    start = time.perf_counter()
    mkstore = [sys.executable, str(HERE / "mkstore.py"), str(temp)]
    done = run([*mkstore, "--images", str(n), "--layers", str(LAYERS)])
    temp.rename(path)
    stamp_path.write_text(json.dumps({"stamp": stamp, "mkstore": done.stdout.strip()}) + "\n")
    say(f"[{label(n)}]   {done.stdout.strip()} ({time.perf_counter() - start:.1f} s)")
    return path


def copy_store(src: Path, dst: Path) -> float:
    """An identical copy of a store; returns seconds.

    blobs/ is hard-linked (`cp -al`), everything else (index.json, oci-layout,
    .refcount/ with the database) is copied. Sharing blob inodes is safe because
    no writer here changes a blob in place: refcount renames blobs into and out of
    its trash and unlinks them, umoci gc unlinks. Copying the data instead costs
    minutes per copy at 100k images and leaves gigabytes of dirty pages that slow
    every measurement after it.
    """
    forget(dst)
    dst.mkdir(parents=True)
    start = time.perf_counter()
    for entry in sorted(src.iterdir()):
        target = dst / entry.name
        if entry.name == "blobs" and entry.is_dir() and not entry.is_symlink():
            linked = subprocess.run(["cp", "-al", str(entry), str(target)], capture_output=True)
            if linked.returncode == 0:
                continue
            remove(target)  # another file system, or no hard links: copy the bytes
        run(["cp", "-a", str(entry), str(target)])
    return time.perf_counter() - start


@contextmanager
def scratch(src: Path, dst: Path) -> Iterator[Path]:
    """A fresh copy of `src` at `dst`, set aside afterwards (see `forget`)."""
    copy_store(src, dst)
    try:
        yield dst
    finally:
        forget(dst)


def forget(path: Path) -> None:
    """Move a used copy into a `.gone` directory beside it, removed at the end of the run:
    removing a few hundred thousand files while measuring would slow the measurements."""
    if path.exists() or path.is_symlink():
        gone = path.parent / ".gone"
        gone.mkdir(exist_ok=True)
        path.rename(gone / f"{path.name}-{time.monotonic_ns()}")


def remove(path: Path) -> None:
    """rm -rf (much faster than shutil.rmtree on a few hundred thousand files)."""
    subprocess.run(["rm", "-rf", "--", str(path)], check=False)


def store_facts(store: Path) -> Row:
    index = json.loads((store / "index.json").read_bytes())
    entries = index.get("manifests") or []
    files = 0
    nbytes = 0
    with os.scandir(store / "blobs" / "sha256") as it:
        for entry in it:
            if entry.is_file(follow_symlinks=False):
                files += 1
                nbytes += entry.stat(follow_symlinks=False).st_size
    return {
        "roots": len(entries),
        "tags": len(tags_of(store)),
        "blobs": files,
        "blob_bytes": nbytes,
        "index_json_bytes": (store / "index.json").stat().st_size,
    }


def tags_of(store: Path) -> list[str]:
    index = json.loads((store / "index.json").read_bytes())
    return [
        e["annotations"][REF_NAME]
        for e in index.get("manifests") or []
        if isinstance(e.get("annotations"), dict) and REF_NAME in e["annotations"]
    ]


# --- measurements ---------------------------------------------------------------------
def measure_init(store: Path) -> Row:
    """`refcount init` as one process: wall time and peak RSS (MB)."""
    with tempfile.NamedTemporaryFile(prefix="rss-", suffix=".txt") as rss_file:
        if Path("/usr/bin/time").exists():
            cmd = ["/usr/bin/time", "-f", "%M", "-o", rss_file.name, *refcount_cmd(store, "init")]
            clock = timed(cmd, env=env_for(daemon=False))
            kb = int(Path(rss_file.name).read_text().split()[-1])
        else:  # a fresh parent, so RUSAGE_CHILDREN holds only this child
            probe = (
                "import resource,subprocess,sys;"
                "subprocess.run(sys.argv[1:],check=True,capture_output=True);"
                "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)"
            )
            cmd = [sys.executable, "-c", probe, *refcount_cmd(store, "init")]
            with Clock() as clock:
                kb = int(run(cmd, env=env_for(daemon=False)).stdout.split()[-1])
    db = store / ".refcount" / "refcount.db"
    return {
        "init_s": clock.wall,
        "init_cpu_s": clock.cpu,
        "init_peak_rss_mb": kb / 1024,
        "db_bytes": db.stat().st_size if db.exists() else None,
    }


def sync_floor(store: Path) -> float:
    """Seconds for the least a full reconcile must do, in plain Python: read the names
    in blobs/ (scandir, d_type only) and every row's digest and state (sqlite3)."""
    with Clock() as clock:
        names = set()
        for algorithm in os.scandir(store / "blobs"):
            with os.scandir(algorithm.path) as entries:
                names.update(e.name for e in entries if e.is_file(follow_symlinks=False))
        db = sqlite3.connect(store / ".refcount" / "refcount.db")
        try:
            rows = dict(db.execute("SELECT digest, state FROM blobs").fetchall())
        finally:
            db.close()
    if not names or not rows:
        raise RuntimeError(f"{store}: nothing to list for the no-op sync's floor")
    return clock.wall


def measure_read_ops(store: Path, n: int) -> Row:
    """No-op sync (median of 5), verify and verify --deep, and sha256sum over the blobs."""
    import refcount

    blobs = sum(1 for _ in (store / "blobs" / "sha256").iterdir())
    row: Row = {}
    with refcount.open(store) as rc:
        syncs = []
        for _ in range(5):
            with Clock() as clock:
                report = rc.sync()
            syncs.append(clock)
        row["sync_noop_median_s"] = median([c.wall for c in syncs])
        row["sync_noop_cpu_median_s"] = median([c.cpu for c in syncs])
        row["sync_noop_changed"] = bool(report.roots_added or report.roots_removed)
        row["sync_floor_median_s"] = median([sync_floor(store) for _ in range(5)])
        row["ratio_sync_noop_vs_floor"] = row["sync_noop_median_s"] / row["sync_floor_median_s"]
        say(
            f"[{label(n)}] no-op sync (library): median {row['sync_noop_median_s']:.3f} s of 5 "
            f"(cpu {row['sync_noop_cpu_median_s']:.3f} s), "
            f"{row['ratio_sync_noop_vs_floor']:.1f}x its floor"
        )

        clocks = []
        for _ in range(repeats(n)):
            with Clock() as clock:
                verdict = rc.verify()
            clocks.append(clock)
        row.update(verify_row("verify", clocks, blobs, verdict.ok, n))
        row.update(measure_du(rc, n, row["verify_s"], row["verify_cpu_s"]))

        # verify --deep and its floor, interleaved: the machine's load moves both alike
        deeps, sums = [], []
        shell = "find blobs -type f -print0 | xargs -0 sha256sum > /dev/null"
        for _ in range(repeats(n)):
            with Clock() as clock:
                verdict = rc.verify(deep=True)
            deeps.append(clock)
            sums.append(timed(["sh", "-c", shell], cwd=store))
        row.update(verify_row("verify_deep", deeps, blobs, verdict.ok, n))

    row["sha256sum_s"] = median([c.wall for c in sums])
    row["sha256sum_cpu_s"] = median([c.cpu for c in sums])
    row["sha256sum_files_per_s"] = blobs / row["sha256sum_s"]
    say(
        f"[{label(n)}] sha256sum over {blobs} blobs: {row['sha256sum_s']:.3f} s "
        f"(cpu {row['sha256sum_cpu_s']:.3f} s), {row['sha256sum_files_per_s']:,.0f} files/s"
    )
    return row


def verify_row(key: str, clocks: list[Clock], blobs: int, ok: bool, n: int) -> Row:
    """The median wall and CPU time of `clocks` (one verify each), and files/s."""
    row: Row = {
        f"{key}_s": median([c.wall for c in clocks]),
        f"{key}_cpu_s": median([c.cpu for c in clocks]),
        f"{key}_ok": ok,
    }
    row[f"{key}_files_per_s"] = blobs / row[f"{key}_s"]
    say(
        f"[{label(n)}] {key.replace('_', ' --')} (library): {row[f'{key}_s']:.3f} s "
        f"(cpu {row[f'{key}_cpu_s']:.3f} s), {row[f'{key}_files_per_s']:,.0f} files/s, ok={ok}"
    )
    return row


DU_REFS = 20
"""How many single-tag `du REF` runs the median is taken over (5 above 10k images)."""


def measure_du(rc: Any, n: int, verify_s: float, verify_cpu_s: float) -> Row:
    """`du` of every tag, `du REF` of one tag (median of DU_REFS random tags), and
    writing the `--html` page, through the library on a store already open; each
    beside the shallow verify of the same store in the same run (`du_vs_verify`).
    """
    clocks = []
    for _ in range(repeats(n)):
        with Clock() as clock:
            report = rc.du()
        clocks.append(clock)
    row: Row = {
        "du_s": median([c.wall for c in clocks]),
        "du_cpu_s": median([c.cpu for c in clocks]),
    }
    row["du_vs_verify"] = ratio(row["du_s"], verify_s)
    row["du_cpu_vs_verify"] = ratio(row["du_cpu_s"], verify_cpu_s)  # steadier on a busy machine
    names = [u.tag for u in report.tags]
    singles = []
    wanted = DU_REFS if n <= 10_000 else 5
    for tag in random.Random(f"du:{n}").sample(names, min(wanted, len(names))):
        with Clock() as clock:
            rc.du([tag])
        singles.append(clock.wall * 1000)
    row["du_ref_median_ms"] = median(singles)
    row["du_ref_vs_verify"] = ratio(row["du_ref_median_ms"] / 1000, verify_s)
    with tempfile.TemporaryDirectory() as scratch_dir, Clock() as clock:
        page = rc.write_du_html(report, Path(scratch_dir) / "du.html")
        row["du_html_bytes"] = page.stat().st_size
    row["du_html_s"] = clock.wall
    say(
        f"[{label(n)}] du (library): {row['du_s']:.3f} s (cpu {row['du_cpu_s']:.3f} s), "
        f"{row['du_vs_verify']:.2f}x shallow verify (CPU {row['du_cpu_vs_verify']:.2f}x); "
        "du REF median "
        f"{row['du_ref_median_ms']:.1f} ms of {len(singles)} "
        f"({row['du_ref_vs_verify']:.4f}x shallow verify); --html page "
        f"{row['du_html_bytes'] / 1024:.0f} KB in {row['du_html_s']:.3f} s"
    )
    return row


def measure_library_deletes(store: Path, tags: list[str], n: int) -> Row:
    import refcount

    clocks = []
    freed = 0
    with refcount.open(store) as rc:
        for tag in tags:
            with Clock() as clock:
                report = rc.delete_tag(tag)
            clocks.append(clock)
            freed += len(report.freed)
        ok = rc.verify().ok
    walls = [c.wall for c in clocks]
    row = {
        "delete_lib_n": len(clocks),
        "delete_lib_median_ms": 1000 * statistics.median(walls),
        "delete_lib_p99_ms": 1000 * p99(walls),
        "delete_lib_max_ms": 1000 * max(walls),
        "delete_lib_cpu_median_ms": 1000 * statistics.median(c.cpu for c in clocks),
        "delete_lib_freed_blobs": freed,
        "delete_lib_verify_ok": ok,
    }
    say(
        f"[{label(n)}] delete tag (library) x{len(clocks)}: median "
        f"{row['delete_lib_median_ms']:.2f} ms (cpu {row['delete_lib_cpu_median_ms']:.2f} ms), "
        f"p99 {row['delete_lib_p99_ms']:.2f} ms, max {row['delete_lib_max_ms']:.2f} ms; "
        f"{freed} blobs freed; verify ok={ok}"
    )
    return row


BATCH_DELETE = 100
"""Tags one `delete tag A B C ...` deletes in the batch row."""


@contextmanager
def index_writes() -> Iterator[list[int]]:
    """Count the rewrites of index.json this process makes (Store.replace_index)."""
    from refcount.store import Store

    writes: list[int] = []
    original = Store.replace_index

    def counted(self: Store, data: bytes, expected_hash: str) -> str:
        writes.append(len(data))
        return original(self, data, expected_hash)

    Store.replace_index = counted  # type: ignore[method-assign]
    try:
        yield writes
    finally:
        Store.replace_index = original  # type: ignore[method-assign]


def prune_glob(n: int) -> str:
    """A glob matching 1,000 of mkstore's tags (img-1000..img-1999) from 2k images on,
    and 90 (img-10..img-99) below."""
    return "img-1???" if n >= 2000 else "img-??"


def measure_batches(base: Path, work: Path, tags: list[str], n: int) -> Row:
    """`delete tag` of BATCH_DELETE tags in one call, and `prune` of the tags
    prune_glob(n) matches (--keep-last 0), each on a fresh copy through the
    library, with the rewrites of index.json each made (one is the goal)."""
    import refcount

    row: Row = {}
    with scratch(base, work / "batch") as copy, refcount.open(copy) as rc, index_writes() as w:
        with Clock() as clock:
            report = rc.delete_tags(tags[:BATCH_DELETE])
        row["delete_batch_tags"] = len(tags[:BATCH_DELETE])
        row["delete_batch_s"] = clock.wall
        row["delete_batch_index_writes"] = len(w)
        row["delete_batch_freed_blobs"] = len(report.freed)
    glob = prune_glob(n)
    with scratch(base, work / "prune") as copy, refcount.open(copy) as rc, index_writes() as w:
        with Clock() as clock:
            pruned = rc.prune(refcount.PrunePolicy(keep_last=0, match=(glob,)))
        row["prune_tags"] = len(pruned.chosen)
        row["prune_s"] = clock.wall
        row["prune_index_writes"] = len(w)
        row["prune_freed_blobs"] = len(pruned.freed)
    say(
        f"[{label(n)}] delete tag x{row['delete_batch_tags']} in one call (library): "
        f"{row['delete_batch_s']:.3f} s, {row['delete_batch_index_writes']} index.json "
        f"write(s), {row['delete_batch_freed_blobs']} blobs freed"
    )
    say(
        f"[{label(n)}] prune --keep-last 0 --match {glob!r} (library): {row['prune_tags']} tags "
        f"in {row['prune_s']:.3f} s, {row['prune_index_writes']} index.json write(s), "
        f"{row['prune_freed_blobs']} blobs freed"
    )
    return row


IMPORT_FLOOR = ("-c", "import sqlalchemy, typer")
"""The least a direct `refcount` process imports: the libraries its CLI is built on."""


def floor_delete(store: Path, floor_dir: Path, tag: str) -> Clock:
    """scripts/delete_floor.py in a fresh `python -S` process: TAG cut out of a scratch
    copy of the store's index.json as it is now (copied untimed, into `floor_dir`,
    which is on the store's file system), rewritten durably, one SQLite row committed."""
    floor_dir.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(store / "index.json", floor_dir / "index.json")
    return timed([sys.executable, "-S", str(HERE / "delete_floor.py"), str(floor_dir), tag])


def process_deletes(store: Path, tags: list[str], *, daemon: bool, floor_dir: Path) -> Row:
    """Whole `refcount delete tag` processes, each right after the floor of the same
    delete on the same index.json, and (without the daemon) the import floor after it:
    the machine's load moves all of them alike. Lists of Clocks, one per tag."""
    env = env_for(daemon=daemon)
    deletes, floors, imports = [], [], []
    for tag in tags:
        floors.append(floor_delete(store, floor_dir, tag))
        deletes.append(timed(refcount_cmd(store, "delete", "tag", tag), env=env))
        if not daemon:
            imports.append(timed([sys.executable, *IMPORT_FLOOR]))
    return {"deletes": deletes, "floors": floors, "imports": imports}


def walls(clocks: list[Clock]) -> float | None:
    return median([c.wall for c in clocks])


def cpus(clocks: list[Clock]) -> float | None:
    return median([c.cpu for c in clocks])


def read_rss_mb(pid: int) -> float | None:
    kb = _first(f"/proc/{pid}/status", "VmRSS")
    return int(kb.split()[0]) / 1024 if kb else None


def _healthz(address: str) -> Row | None:
    try:
        with urllib.request.urlopen(f"http://{address}/healthz", timeout=5) as response:
            return dict(json.loads(response.read()))
    except OSError:  # 503 while reconciling is an HTTPError, an OSError too
        return None


def _wait(condition: Callable[[], Any], what: str, timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return value


class RunningDaemon:
    """A `refcount watch` process started by `running_daemon`."""

    def __init__(self, proc: subprocess.Popen[bytes], log_path: Path) -> None:
        self.proc = proc
        self.log_path = log_path
        self.addr = ""

    def check(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(f"refcount watch exited: {self.log_path.read_text()[-2000:]}")

    def metrics_address(self) -> str | None:
        self.check()
        found = re.search(r"serving metrics on http://(\S+)/metrics", self.log_path.read_text())
        return found.group(1) if found else None

    def index_rewrites(self) -> float | None:
        """The daemon's `refcount_index_rewrites_total`: how many batches rewrote index.json."""
        try:
            with urllib.request.urlopen(f"http://{self.addr}/metrics", timeout=5) as response:
                text = response.read().decode()
        except OSError:
            return None
        found = re.search(r"^refcount_index_rewrites_total (\S+)$", text, re.MULTILINE)
        return float(found.group(1)) if found else None

    def wait_idle(self, timeout: float) -> None:
        """Until /healthz says ok with no batch pending."""

        def idle() -> bool:
            self.check()
            health = _healthz(self.addr)
            return bool(health and health.get("ok") and not health.get("pending"))

        _wait(idle, "the daemon to be idle", timeout)

    def rss_mb(self) -> float | None:
        return read_rss_mb(self.proc.pid)


@contextmanager
def running_daemon(store: Path, log_path: Path) -> Iterator[RunningDaemon]:
    """`refcount watch` on `store`, once its start-up reconcile is done (SIGTERM after)."""
    with open(log_path, "wb") as log_file:
        daemon = RunningDaemon(
            subprocess.Popen(
                refcount_cmd(store, "watch", "--metrics-addr", "127.0.0.1:0"),
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env_for(daemon=True),
            ),
            log_path,
        )
        try:
            daemon.addr = _wait(daemon.metrics_address, "the daemon's metrics address", 120)
            daemon.wait_idle(1800)
            yield daemon
        finally:
            daemon.proc.send_signal(signal.SIGTERM)
            try:
                daemon.proc.wait(60)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait()


GROUP_CLIENT = """
import sys
import refcount.client
sys.stdout.write("ready\\n")
sys.stdout.flush()
sys.stdin.readline()  # every client is started and imported before the clock starts
code = refcount.client.main(sys.argv[1:])
sys.stdout.write("\\n" + ("direct" if "refcount.cli" in sys.modules else "served") + "\\n")
sys.exit(code)
"""
"""One `refcount delete tag` client of the group-commit figure: the console script's
`refcount.client.main`, started ahead and released on a line of stdin."""


def clients_at_once(store: Path, tags: list[str]) -> tuple[float, int]:
    """Seconds from releasing one `refcount delete tag` client per tag, all at once, to
    the last one's exit; and how many the daemon served (the rest ran the command
    themselves, e.g. when the daemon's listen backlog was full past the connect timeout)."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", GROUP_CLIENT, "--store", str(store), "delete", "tag", tag],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env_for(daemon=True),
        )
        for tag in tags
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a delete client did not start: exit {proc.wait()}")
    start = time.perf_counter()
    for proc in procs:
        assert proc.stdin is not None
        proc.stdin.write("go\n")
        proc.stdin.close()
    answers = []
    for proc in procs:  # each prints a few lines: reading one pipe, then the other, is safe
        assert proc.stdout is not None and proc.stderr is not None
        answers.append((proc.stdout.read(), proc.stderr.read()))
        proc.wait()
    wall = time.perf_counter() - start
    failed = [
        (p.returncode, err) for p, (_, err) in zip(procs, answers, strict=True) if p.returncode
    ]
    if failed:
        raise RuntimeError(f"{len(failed)} delete client(s) failed: {failed[0]}")
    served = sum(out.rstrip().endswith("served") for out, _ in answers)
    return wall, served


def measure_group(
    daemon: RunningDaemon, store: Path, tags: Sequence[str], group: int, rounds: int, n: int
) -> Row:
    """The group-commit figure: `group` simultaneous daemon-served deletes, against one
    delete made the same way (a started client released alone), a round of each in turn;
    and how many rewrites of index.json the daemon made for each group."""
    ones, groups, served, rewrites = [], [], [], []
    tags = list(tags)
    for _ in range(rounds):
        wall, _served = clients_at_once(store, [tags.pop()])
        ones.append(wall)
        before = daemon.index_rewrites()
        wall, count = clients_at_once(store, [tags.pop() for _ in range(group)])
        after = daemon.index_rewrites()
        groups.append(wall)
        served.append(count)
        if before is not None and after is not None:
            rewrites.append(int(after - before))
    row: Row = {
        "group_clients": group,
        "group_rounds": rounds,
        "group_one_median_s": median(ones),
        "group_all_median_s": median(groups),
        "group_served_min": min(served),
        "group_index_rewrites_max": max(rewrites) if rewrites else None,
    }
    row["ratio_group_vs_one"] = ratio(row["group_all_median_s"], row["group_one_median_s"])
    say(
        f"[{label(n)}] {group} simultaneous refcount delete tag (daemon): median "
        f"{row['group_all_median_s']:.3f} s, one alone {row['group_one_median_s']:.3f} s: "
        f"{_fmt(row['ratio_group_vs_one'], 'x.xx')} (at least {min(served)} of {group} served "
        f"by the daemon; {rounds} round(s); at most "
        f"{_fmt(row['group_index_rewrites_max'], 'int')} index.json rewrite(s) a group)"
    )
    return row


def served_deletes(store: Path, tags: Sequence[str]) -> None:
    """`delete tag` of each tag through the daemon's socket from this process (the
    client's own code, without a process per delete): the daemon's memory figure."""
    from refcount import client

    env = env_for(daemon=True)
    socket_path = store / ".refcount" / "refcount.sock"
    for tag in tags:
        request = client.daemon_argv(["--store", str(store), "delete", "tag", tag], env)
        assert request is not None
        code, _out, err = client.ask_daemon(str(socket_path), request)
        if code != 0:
            raise RuntimeError(f"served delete tag {tag}: exit {code}: {err.strip()}")


def measure_daemon(
    store: Path,
    n: int,
    log_path: Path,
    *,
    tags: list[str],
    floor_dir: Path,
    rss_tags: Sequence[str] = (),
    group_tags: Sequence[str] = (),
    group: int = 0,
) -> Row:
    """Start `refcount watch` and wait for its start-up reconcile; read its idle RSS;
    serve len(rss_tags) deletes and read its RSS again once idle; then time whole
    `refcount delete tag` processes it serves (each beside the floor of the same delete),
    and the group-commit figure."""
    row: Row = {}
    socket_path = store / ".refcount" / "refcount.sock"
    start = time.perf_counter()
    with running_daemon(store, log_path) as daemon:
        row["daemon_ready_s"] = time.perf_counter() - start
        # The socket may be created just after the first reconcile.
        deadline = time.monotonic() + 2.0
        while not socket_path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(1.0)  # idle: no batch pending, nothing else touching the store
        row["daemon_idle_rss_mb"] = daemon.rss_mb()
        row["daemon_fast_path"] = socket_path.exists()
        say(
            f"[{label(n)}] daemon ready after {row['daemon_ready_s']:.2f} s; idle RSS "
            f"{row['daemon_idle_rss_mb']:.1f} MB; socket "
            f"{'present' if row['daemon_fast_path'] else 'absent (fast path n/a)'}"
        )
        if not row["daemon_fast_path"]:
            return row
        if rss_tags:
            with Clock() as clock:
                served_deletes(store, rss_tags)
            daemon.wait_idle(600)
            time.sleep(1.0)
            row["daemon_rss_deletes"] = len(rss_tags)
            row["daemon_rss_after_deletes_mb"] = daemon.rss_mb()
            row["ratio_daemon_rss_after_vs_idle"] = ratio(
                row["daemon_rss_after_deletes_mb"], row["daemon_idle_rss_mb"]
            )
            say(
                f"[{label(n)}] daemon RSS after {len(rss_tags)} served deletes "
                f"({clock.wall:.1f} s): {row['daemon_rss_after_deletes_mb']:.1f} MB, "
                f"{_fmt(row['ratio_daemon_rss_after_vs_idle'], 'x.xx')} idle"
            )
        if tags:
            ran = process_deletes(store, tags, daemon=True, floor_dir=floor_dir)
            row["delete_proc_daemon_median_s"] = walls(ran["deletes"])
            row["delete_proc_daemon_cpu_median_s"] = cpus(ran["deletes"])
            row["delete_floor_daemon_median_s"] = walls(ran["floors"])
            row["delete_floor_samples"] = ran["floors"]
            say(
                f"[{label(n)}] refcount delete tag (process, daemon) x{len(tags)}: median "
                f"{row['delete_proc_daemon_median_s']:.3f} s (client cpu "
                f"{row['delete_proc_daemon_cpu_median_s']:.3f} s); the floor beside it "
                f"{row['delete_floor_daemon_median_s']:.3f} s"
            )
        if group and len(group_tags) >= group + 1:
            rounds = len(group_tags) // (group + 1)
            row.update(measure_group(daemon, store, group_tags, group, rounds, n))
    return row


def measure_umoci(pristine: Path, work: Path, tags: list[str], n: int) -> Row:
    """`umoci rm` + `umoci gc` (each on a fresh copy) and `umoci gc` alone."""
    rm_gc, gc_after_rm, gc_alone = [], [], []
    for i in range(repeats(n)):
        tag = tags[i % len(tags)]
        with scratch(pristine, work / "umoci-rm") as copy:
            rm = timed(["umoci", "rm", "--image", f"{copy}:{tag}"])
            gc = timed(["umoci", "gc", "--layout", str(copy)])
        rm_gc.append((rm.wall + gc.wall, rm.cpu + gc.cpu))
        gc_after_rm.append(gc.wall)
        say(
            f"[{label(n)}] umoci rm + gc: {rm.wall + gc.wall:.3f} s (gc {gc.wall:.3f} s; "
            f"cpu {rm.cpu + gc.cpu:.3f} s)"
        )
    with scratch(pristine, work / "umoci-gc") as copy:
        for _ in range(repeats(n)):
            gc_alone.append(timed(["umoci", "gc", "--layout", str(copy)]).wall)
    say(f"[{label(n)}] umoci gc alone: median {median(gc_alone):.3f} s of {len(gc_alone)}")
    return {
        "umoci_rm_gc_median_s": median([wall for wall, _ in rm_gc]),
        "umoci_rm_gc_cpu_median_s": median([cpu for _, cpu in rm_gc]),
        "umoci_gc_after_rm_median_s": median(gc_after_rm),
        "umoci_gc_median_s": median(gc_alone),
        "umoci_runs": len(rm_gc),
    }


def ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num is not None and den else None


def bench_size(n: int, pristine: Path, work: Path, args: argparse.Namespace) -> Row:
    row: Row = {"images": n, **store_facts(pristine)}
    say(
        f"[{label(n)}] store: {row['roots']} roots, {row['tags']} tags, {row['blobs']} blobs, "
        f"{row['blob_bytes'] / MB:.1f} MB of blobs, index.json {row['index_json_bytes'] / MB:.2f} MB"
    )
    rng = random.Random(f"bench:{n}")
    tags = tags_of(pristine)
    wanted = max(args.deletes, args.process_deletes, 3)
    picked = rng.sample(tags, min(wanted, len(tags)))

    base = work / "base"
    row["copy_s"] = copy_store(pristine, base)
    row.update(measure_init(base))
    say(
        f"[{label(n)}] init (process): {row['init_s']:.2f} s, peak RSS "
        f"{row['init_peak_rss_mb']:.1f} MB (copy took {row['copy_s']:.1f} s)"
    )
    with scratch(base, work / "read") as copy:
        row.update(measure_read_ops(copy, n))
    with scratch(base, work / "lib") as copy:
        row.update(measure_library_deletes(copy, picked[: args.deletes], n))

    row.update(measure_batches(base, work, rng.sample(tags, min(BATCH_DELETE, len(tags))), n))
    single = row["delete_lib_median_ms"] / 1000
    row["delete_singles_extrapolated_s"] = single * row["delete_batch_tags"]
    row["prune_singles_extrapolated_s"] = single * row["prune_tags"]
    row["ratio_singles_vs_delete_batch"] = ratio(
        row["delete_singles_extrapolated_s"], row["delete_batch_s"]
    )
    row["ratio_singles_vs_prune"] = ratio(row["prune_singles_extrapolated_s"], row["prune_s"])
    say(
        f"[{label(n)}] the same as single deletes (median x count): delete batch "
        f"{row['delete_singles_extrapolated_s']:.2f} s "
        f"({_fmt(row['ratio_singles_vs_delete_batch'], 'x')} the batch), prune "
        f"{row['prune_singles_extrapolated_s']:.2f} s ({_fmt(row['ratio_singles_vs_prune'], 'x')})"
    )

    floor_dir = work / "floor"
    with scratch(base, work / "proc") as copy:
        ran = process_deletes(
            copy, picked[: args.process_deletes], daemon=False, floor_dir=floor_dir
        )
    row["delete_proc_direct_median_s"] = walls(ran["deletes"])
    row["delete_proc_direct_cpu_median_s"] = cpus(ran["deletes"])
    row["import_floor_median_s"] = walls(ran["imports"])
    row["import_floor_cpu_median_s"] = cpus(ran["imports"])
    row["ratio_direct_vs_import_floor"] = ratio(
        row["delete_proc_direct_median_s"], row["import_floor_median_s"]
    )
    floors = ran["floors"]
    say(
        f"[{label(n)}] refcount delete tag (process, REFCOUNT_NO_DAEMON=1) "
        f"x{len(ran['deletes'])}: median {row['delete_proc_direct_median_s']:.3f} s (cpu "
        f"{row['delete_proc_direct_cpu_median_s']:.3f} s); the import floor "
        f"(python {' '.join(IMPORT_FLOOR)!r}) beside it {row['import_floor_median_s']:.3f} s "
        f"(cpu {row['import_floor_cpu_median_s']:.3f} s); the delete floor "
        f"{walls(floors):.3f} s"
    )

    daemon_keys = (
        "daemon_ready_s",
        "daemon_idle_rss_mb",
        "daemon_fast_path",
        "delete_proc_daemon_median_s",
        "delete_proc_daemon_cpu_median_s",
        "delete_floor_daemon_median_s",
        "daemon_rss_deletes",
        "daemon_rss_after_deletes_mb",
        "ratio_daemon_rss_after_vs_idle",
        "group_clients",
        "group_rounds",
        "group_one_median_s",
        "group_all_median_s",
        "group_served_min",
        "group_index_rewrites_max",
        "ratio_group_vs_one",
    )
    row.update(dict.fromkeys(daemon_keys))
    if not args.skip_daemon:
        # Tags of their own for each phase, on the daemon's fresh copy of the store.
        spare = [t for t in tags if t not in set(picked[: args.process_deletes])]
        rng.shuffle(spare)
        rss_n = min(rss_deletes(n, args), len(spare) // 2)
        rounds = group_rounds(n)
        group_n = args.group if len(spare) - rss_n >= rounds * (args.group + 1) else 0
        rss_tags, group_tags = spare[:rss_n], spare[rss_n : rss_n + rounds * (group_n + 1)]
        with scratch(base, work / "daemon") as copy:
            daemon_row = measure_daemon(
                copy,
                n,
                work / f"watch-{n}.log",
                tags=picked[: args.process_deletes],
                floor_dir=floor_dir,
                rss_tags=rss_tags,
                group_tags=group_tags,
                group=group_n,
            )
        floors += daemon_row.pop("delete_floor_samples", [])
        row.update(daemon_row)
    row["delete_floor_median_s"] = walls(floors)
    row["delete_floor_cpu_median_s"] = cpus(floors)
    row["delete_floor_n"] = len(floors)
    row["ratio_daemon_vs_floor"] = ratio(
        row["delete_proc_daemon_median_s"], row["delete_floor_median_s"]
    )
    row["ratio_direct_vs_floor"] = ratio(
        row["delete_proc_direct_median_s"], row["delete_floor_median_s"]
    )
    say(
        f"[{label(n)}] the floor of one delete (scripts/delete_floor.py, python -S) "
        f"x{len(floors)}: median {row['delete_floor_median_s']:.3f} s (cpu "
        f"{row['delete_floor_cpu_median_s']:.3f} s); refcount daemon-served "
        f"{_fmt(row['ratio_daemon_vs_floor'], 'x.xx')} it, direct "
        f"{_fmt(row['ratio_direct_vs_floor'], 'x')}"
    )

    umoci_keys = (
        "umoci_rm_gc_median_s",
        "umoci_rm_gc_cpu_median_s",
        "umoci_gc_after_rm_median_s",
        "umoci_gc_median_s",
        "umoci_runs",
    )
    row.update(dict.fromkeys(umoci_keys))
    if args.skip_umoci:
        say(f"[{label(n)}] umoci skipped (--skip-umoci)")
    elif not shutil.which("umoci"):
        say(f"[{label(n)}] umoci skipped: not installed")
    else:
        row.update(measure_umoci(pristine, work, picked, n))
    row["verify_deep_vs_sha256sum"] = ratio(
        row["verify_deep_files_per_s"], row["sha256sum_files_per_s"]
    )
    row["ratio_umoci_vs_direct"] = ratio(
        row["umoci_rm_gc_median_s"], row["delete_proc_direct_median_s"]
    )
    row["ratio_umoci_vs_daemon"] = ratio(
        row["umoci_rm_gc_median_s"], row["delete_proc_daemon_median_s"]
    )
    if args.postgres:
        row.update(bench_postgres(n, pristine, work, args))
    forget(base)
    return row


WRITERS = 4
"""Processes deleting at once in the writers' throughput row."""
WRITER = """
import sys, time
from pathlib import Path
import refcount
store, db, go, *tags = sys.argv[1:]
with refcount.open(store, db or None) as rc:
    rc.tags()  # opened and caught up: only the deletes are timed
    print("ready", flush=True)
    while not Path(go).exists():
        time.sleep(0.005)
    for tag in tags:
        rc.delete_tag(tag)
"""


def measure_writers(store: Path, tags: list[str], db: str | None) -> float:
    """Deletes per second of WRITERS processes deleting disjoint tags of one store at
    once (each opened and ready before the clock starts)."""
    go = store.parent / f"{store.name}.go"
    shares = [tags[i::WRITERS] for i in range(WRITERS)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, str(store), db or "", str(go), *share],
            stdout=subprocess.PIPE,
            text=True,
            env=env_for(daemon=False),
        )
        for share in shares
    ]
    for proc in procs:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            raise RuntimeError(f"a writer did not start: exit {proc.wait()}")
    start = time.perf_counter()
    go.touch()
    codes = [proc.wait() for proc in procs]
    wall = time.perf_counter() - start
    go.unlink()
    if any(codes):
        raise RuntimeError(f"a writer failed: exit codes {codes}")
    return len(tags) / wall


@contextmanager
def postgres_database(admin: str) -> Iterator[str]:
    """A new database on the server `admin` (a psycopg URL to a maintenance database);
    yields its SQLAlchemy URL, dropped afterwards."""
    import psycopg

    name = f"refcount_bench_{os.getpid()}_{random.randrange(1 << 30)}"
    plain = admin.replace("postgresql+psycopg://", "postgresql://")
    with psycopg.connect(plain, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield plain.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://") + "/" + name
    finally:
        with psycopg.connect(plain, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def database_env(url: str) -> Iterator[None]:
    """Every refcount this process or its children open uses `url` (the CLI through
    REFCOUNT_DB, the library through REFCOUNT_DEFAULT_DB)."""
    saved = {k: os.environ.get(k) for k in ("REFCOUNT_DB", "REFCOUNT_DEFAULT_DB")}
    os.environ.update(REFCOUNT_DB=url, REFCOUNT_DEFAULT_DB=url)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def bench_postgres(n: int, pristine: Path, work: Path, args: argparse.Namespace) -> Row:
    """init, delete latency (library; process served by the daemon) with the counts in
    PostgreSQL, and the writers' throughput on both backends, same store, same tags."""
    rng = random.Random(f"bench-pg:{n}")
    tags = tags_of(pristine)
    picked = rng.sample(tags, min(args.deletes + args.process_deletes, len(tags)))
    lib, proc = picked[: args.deletes], picked[args.deletes :]
    row: Row = {}
    with (
        postgres_database(args.postgres) as url,
        database_env(url),
        scratch(pristine, work / "pg") as copy,
    ):
        row["pg_init_s"] = measure_init(copy)["init_s"]
        found = measure_library_deletes(copy, lib, n)
        row["pg_delete_lib_median_ms"] = found["delete_lib_median_ms"]
        row["pg_delete_lib_p99_ms"] = found["delete_lib_p99_ms"]
        if not args.skip_daemon and proc:
            served = measure_daemon(
                copy, n, work / f"watch-pg-{n}.log", tags=proc, floor_dir=work / "floor-pg"
            )
            row["pg_delete_proc_daemon_median_s"] = served.get("delete_proc_daemon_median_s")
    writes = rng.sample(tags, min(WRITERS * 25, len(tags)))
    with scratch(pristine, work / "w-sqlite") as copy:
        run(refcount_cmd(copy, "init"), env=env_for(daemon=False))
        row["writers_sqlite_per_s"] = measure_writers(copy, writes, None)
    with postgres_database(args.postgres) as url, scratch(pristine, work / "w-pg") as copy:
        run(refcount_cmd(copy, "--db", url, "init"), env=env_for(daemon=False))
        row["writers_pg_per_s"] = measure_writers(copy, writes, url)
    row["ratio_writers_pg_vs_sqlite"] = ratio(row["writers_pg_per_s"], row["writers_sqlite_per_s"])
    say(
        f"[{label(n)}] PostgreSQL: init {row['pg_init_s']:.2f} s; delete tag (library) median "
        f"{row['pg_delete_lib_median_ms']:.1f} ms, p99 {row['pg_delete_lib_p99_ms']:.1f} ms; "
        f"process with daemon {_fmt(row.get('pg_delete_proc_daemon_median_s'), 's')}; "
        f"{WRITERS} writers: {row['writers_pg_per_s']:.1f} deletes/s "
        f"(SQLite {row['writers_sqlite_per_s']:.1f}/s, "
        f"{_fmt(row['ratio_writers_pg_vs_sqlite'], 'x')})"
    )
    return row


WATCH_DEEP_SLICE = 1000
"""Blobs per deep verify slice while bench_watch.py measures the watcher a second time."""


def measure_watch(pristine: Path, work: Path, args: argparse.Namespace) -> Row:
    """scripts/bench_watch.py on a copy of the smallest store; its p50/p99 per scenario."""
    script = HERE / "bench_watch.py"
    row: Row = {"store_images": None, "single_p50_ms": None, "single_p99_ms": None}
    row |= {"burst_p50_ms": None, "burst_p99_ms": None, "output": None}
    row |= {"deep_p50_ms": None, "deep_p99_ms": None, "deep_p99_ratio": None}
    if not script.exists():
        say("watcher latency: scripts/bench_watch.py not present")
        return row
    extra = ["--deep-slice", str(WATCH_DEEP_SLICE)]
    if args.watch_singles is not None:
        extra += ["--singles", str(args.watch_singles)]
    if args.watch_burst is not None:
        extra += ["--burst", str(args.watch_burst)]
    with scratch(pristine, work / "watch") as copy:
        say(f"watcher latency: {script.name} --store <copy of {pristine.name}> {' '.join(extra)}")
        done = subprocess.run(
            [sys.executable, str(script), "--store", str(copy), *extra],
            capture_output=True,
            text=True,
            env=env_for(daemon=True),
        )
    row["output"] = done.stdout.strip()
    row["exit"] = done.returncode
    row["store_images"] = int(pristine.name.split("-")[1])
    for line in done.stdout.splitlines():
        found = re.match(
            r"(single|burst|deep)\s+n=\s*\d+\s+p50\s+([\d.]+) ms\s+p99\s+([\d.]+) ms", line
        )
        if found:
            row[f"{found.group(1)}_p50_ms"] = float(found.group(2))
            row[f"{found.group(1)}_p99_ms"] = float(found.group(3))
        ratio = re.search(r"watcher p99 ([\d.]+) x the p99 without them", line)
        if ratio:
            row["deep_p99_ratio"] = float(ratio.group(1))
    for line in done.stdout.splitlines():
        say(f"  {line}")
    if done.returncode != 0:
        say(f"  bench_watch.py exit {done.returncode}: {done.stderr.strip()[-1000:]}")
    return row


# --- the report ------------------------------------------------------------------------
def _fmt(value: Any, unit: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if unit == "int":
        return f"{value:,}"
    if unit == "s":
        return f"{value:.3f} s" if value < 10 else f"{value:.1f} s"
    if unit == "ms":
        return f"{value:.2f} ms"
    if unit == "MB":
        return f"{value:.0f} MB" if value >= 100 else f"{value:.1f} MB"
    if unit == "bytes":
        return f"{value / MB:.1f} MB" if value >= MB else f"{value / 1024:.0f} KB"
    if unit == "x":
        return f"{value:,.0f}x" if value >= 10 else f"{value:.2g}x"
    if unit == "x.xx":  # a ratio judged against a bound such as 1.2x or 1.5x
        return f"{value:.2f}x"
    if unit == "files/s":
        return f"{value:,.0f}/s"
    return str(value)


TABLE: tuple[tuple[str, str, str], ...] = (
    ("roots in index.json", "roots", "int"),
    ("blob files", "blobs", "int"),
    ("index.json", "index_json_bytes", "bytes"),
    ("init (process)", "init_s", "s"),
    ("init (process), CPU", "init_cpu_s", "s"),
    ("init peak RSS", "init_peak_rss_mb", "MB"),
    ("delete tag, library, median", "delete_lib_median_ms", "ms"),
    ("delete tag, library, p99", "delete_lib_p99_ms", "ms"),
    ("delete tag, library, median CPU", "delete_lib_cpu_median_ms", "ms"),
    ("delete tag A B C..., one call, tags", "delete_batch_tags", "int"),
    ("delete tag A B C..., one call", "delete_batch_s", "s"),
    ("delete tag A B C..., index.json writes", "delete_batch_index_writes", "int"),
    ("the same as single deletes (extrapolated)", "delete_singles_extrapolated_s", "s"),
    ("single deletes / one call", "ratio_singles_vs_delete_batch", "x"),
    ("prune, tags", "prune_tags", "int"),
    ("prune", "prune_s", "s"),
    ("prune, index.json writes", "prune_index_writes", "int"),
    ("prune as single deletes (extrapolated)", "prune_singles_extrapolated_s", "s"),
    ("single deletes / prune", "ratio_singles_vs_prune", "x"),
    ("the floor of one delete (python -S, rewrite, fsync, commit)", "delete_floor_median_s", "s"),
    ("the floor of one delete, CPU", "delete_floor_cpu_median_s", "s"),
    ("refcount delete tag, process, daemon", "delete_proc_daemon_median_s", "s"),
    ("refcount delete tag, process, daemon / floor", "ratio_daemon_vs_floor", "x.xx"),
    ("refcount delete tag, process, no daemon", "delete_proc_direct_median_s", "s"),
    ("refcount delete tag, process, no daemon, CPU", "delete_proc_direct_cpu_median_s", "s"),
    ("refcount delete tag, process, no daemon / floor", "ratio_direct_vs_floor", "x"),
    ("import floor (python -c 'import sqlalchemy, typer')", "import_floor_median_s", "s"),
    ("import floor, CPU", "import_floor_cpu_median_s", "s"),
    ("refcount delete tag, no daemon / import floor", "ratio_direct_vs_import_floor", "x.xx"),
    ("simultaneous daemon-served deletes (clients)", "group_clients", "int"),
    ("simultaneous deletes, all done", "group_all_median_s", "s"),
    ("one delete, the same way", "group_one_median_s", "s"),
    ("simultaneous deletes / one", "ratio_group_vs_one", "x.xx"),
    (
        "index.json rewrites for the simultaneous deletes (most of a round)",
        "group_index_rewrites_max",
        "int",
    ),
    ("PostgreSQL: init (process)", "pg_init_s", "s"),
    ("PostgreSQL: delete tag, library, median", "pg_delete_lib_median_ms", "ms"),
    ("PostgreSQL: delete tag, library, p99", "pg_delete_lib_p99_ms", "ms"),
    ("PostgreSQL: refcount delete tag, process, daemon", "pg_delete_proc_daemon_median_s", "s"),
    (f"{WRITERS} writers, deletes/s, SQLite", "writers_sqlite_per_s", "files/s"),
    (f"{WRITERS} writers, deletes/s, PostgreSQL", "writers_pg_per_s", "files/s"),
    (f"{WRITERS} writers, PostgreSQL / SQLite", "ratio_writers_pg_vs_sqlite", "x"),
    ("refcount delete tag, process, daemon, client CPU", "delete_proc_daemon_cpu_median_s", "s"),
    ("daemon idle RSS", "daemon_idle_rss_mb", "MB"),
    ("daemon RSS: served deletes before reading it again", "daemon_rss_deletes", "int"),
    ("daemon RSS after those deletes", "daemon_rss_after_deletes_mb", "MB"),
    ("daemon RSS after deletes / idle", "ratio_daemon_rss_after_vs_idle", "x.xx"),
    ("daemon start-up reconcile", "daemon_ready_s", "s"),
    ("no-op sync (library)", "sync_noop_median_s", "s"),
    ("no-op sync (library), CPU", "sync_noop_cpu_median_s", "s"),
    ("no-op sync floor (scandir + one SELECT)", "sync_floor_median_s", "s"),
    ("no-op sync / its floor", "ratio_sync_noop_vs_floor", "x"),
    ("verify (library)", "verify_s", "s"),
    ("du, every tag (library)", "du_s", "s"),
    ("du / shallow verify", "du_vs_verify", "x"),
    ("du / shallow verify, CPU", "du_cpu_vs_verify", "x"),
    ("du REF (library), median", "du_ref_median_ms", "ms"),
    ("du REF / shallow verify", "du_ref_vs_verify", "x"),
    ("du --html page written", "du_html_s", "s"),
    ("verify --deep (library)", "verify_deep_s", "s"),
    ("verify --deep (library), CPU", "verify_deep_cpu_s", "s"),
    ("verify --deep files/s", "verify_deep_files_per_s", "files/s"),
    ("sha256sum (find + xargs)", "sha256sum_s", "s"),
    ("sha256sum files/s", "sha256sum_files_per_s", "files/s"),
    ("umoci rm + umoci gc", "umoci_rm_gc_median_s", "s"),
    ("umoci rm + umoci gc, CPU", "umoci_rm_gc_cpu_median_s", "s"),
    ("umoci gc alone", "umoci_gc_median_s", "s"),
    ("umoci rm+gc / refcount (no daemon)", "ratio_umoci_vs_direct", "x"),
    ("umoci rm+gc / refcount (daemon)", "ratio_umoci_vs_daemon", "x"),
)


def table(results: Row) -> str:
    sizes = results["sizes"]
    header = ["images", *(label(int(n)) for n in sizes)]
    rows = [[name, *(_fmt(sizes[n].get(key), unit) for n in sizes)] for name, key, unit in TABLE]
    watch = results.get("watch") or {}
    for scenario, what in (
        ("single", "single"),
        ("burst", "burst"),
        ("deep", "single, deep verify slices running"),
    ):
        if watch.get(f"{scenario}_p50_ms") is None:
            continue
        ratio = watch.get("deep_p99_ratio") if scenario == "deep" else None
        rows.append(
            [
                f"watcher latency p50/p99 ({what}, {label(watch['store_images'])})",
                f"{watch[f'{scenario}_p50_ms']:.1f} / {watch[f'{scenario}_p99_ms']:.1f} ms"
                + ("" if ratio is None else f" ({ratio:.2f} x)"),
                *([""] * (len(sizes) - 1)),
            ]
        )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        first = cells[0].ljust(widths[0])
        rest = (c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True))
        return "| " + " | ".join([first, *rest]) + " |"

    rule = "|" + "|".join("-" * (w + 1) + (":" if i else "-") for i, w in enumerate(widths)) + "|"
    return "\n".join([line(header), rule, *(line(r) for r in rows)])


# The issues' numbers: (issue, what, the size it is judged at or None for every size,
# the figure's key, "<=" or ">=", the bound, how the figure is shown). Issue 13's targets
# replace issue 5's where both bound one figure (the daemon-served and direct deletes,
# verify, the daemon's RSS); issue 5's others still hold.
TARGETS: tuple[tuple[int, str, int | None, str, str, float, str], ...] = (
    (13, "daemon-served refcount delete tag / the floor of one delete <= 1.5x", None,
     "ratio_daemon_vs_floor", "<=", 1.5, "{:.2f}x"),
    (13, "umoci rm+gc / daemon-served refcount delete tag >= 30x", 10_000,
     "ratio_umoci_vs_daemon", ">=", 30, "{:.0f}x"),
    (13, "umoci rm+gc / daemon-served refcount delete tag >= 300x", 100_000,
     "ratio_umoci_vs_daemon", ">=", 300, "{:.0f}x"),
    (13, "20 simultaneous daemon-served deletes / one <= 3x", 100_000,
     "ratio_group_vs_one", "<=", 3, "{:.2f}x"),
    (13, "init <= 20 s", 100_000, "init_s", "<=", 20, "{:.1f} s"),
    (13, "init peak RSS <= 400 MB", 100_000, "init_peak_rss_mb", "<=", 400, "{:.0f} MB"),
    (13, "no-op sync <= 1 s", 100_000, "sync_noop_median_s", "<=", 1, "{:.2f} s"),
    (13, "daemon start-up reconcile <= 1.5 s", 100_000, "daemon_ready_s", "<=", 1.5, "{:.2f} s"),
    (13, "verify <= 10 s", 100_000, "verify_s", "<=", 10, "{:.1f} s"),
    (13, "verify --deep files/s >= sha256sum files/s", 100_000,
     "verify_deep_vs_sha256sum", ">=", 1, "{:.2f}x sha256sum"),
    (13, "refcount delete tag, process, no daemon, median <= 0.4 s", None,
     "delete_proc_direct_median_s", "<=", 0.4, "{:.3f} s"),
    (13, "daemon idle RSS <= 120 MB", 100_000, "daemon_idle_rss_mb", "<=", 120, "{:.0f} MB"),
    (13, "daemon RSS after 1,000 deletes <= 1.2x idle", 100_000,
     "ratio_daemon_rss_after_vs_idle", "<=", 1.2, "{:.2f}x idle"),
    (5, "delete tag, library, median <= 3 ms", 100_000, "delete_lib_median_ms", "<=", 3,
     "{:.2f} ms"),
    (5, "delete tag, library, p99 <= 25 ms", 100_000, "delete_lib_p99_ms", "<=", 25, "{:.2f} ms"),
    (5, "delete tag, library, median <= 1.5x the median at 1k", 100_000,
     "delete_lib_median_vs_1k", "<=", 1.5, "{:.2f}x"),
    (5, "umoci rm+gc / refcount delete tag without daemon >= 8x", 10_000,
     "ratio_umoci_vs_direct", ">=", 8, "{:.1f}x"),
    (5, "umoci rm+gc / refcount delete tag without daemon >= 80x", 100_000,
     "ratio_umoci_vs_direct", ">=", 80, "{:.1f}x"),
    (5, "delete tag of 100 tags rewrites index.json once", None,
     "delete_batch_index_writes", "<=", 1, "{:.0f} write(s)"),
    (5, "prune rewrites index.json once", None, "prune_index_writes", "<=", 1,
     "{:.0f} write(s)"),
    (5, "du of every tag <= shallow verify", None, "du_vs_verify", "<=", 1, "{:.2f}x verify"),
    (5, "du REF <= 100 ms", None, "du_ref_median_ms", "<=", 100, "{:.1f} ms"),
)  # fmt: skip


# Targets that name a count: a run with fewer (--group 5, --rss-deletes 20) shows its
# figure but does not judge it. key -> (the key of the count, the count named).
COUNTED: dict[str, tuple[str, int]] = {
    "ratio_group_vs_one": ("group_clients", 20),
    "ratio_daemon_rss_after_vs_idle": ("daemon_rss_deletes", 1000),
}


def targets(results: Row) -> list[Row]:
    """Each target judged on the figure of the size it names (not measured: met None)."""
    sizes = {int(n): row for n, row in results["sizes"].items()}
    out: list[Row] = []
    for issue, what, size, key, op, bound, shown in TARGETS:
        for n in sizes if size is None else [size]:
            figure = sizes[n].get(key) if n in sizes else None
            met = None if figure is None else (figure <= bound if op == "<=" else figure >= bound)
            measured = None if figure is None else shown.format(figure)
            count_key, wanted = COUNTED.get(key, ("", 0))
            count = sizes[n].get(count_key) if count_key and n in sizes else None
            if figure is not None and count_key and (count or 0) < wanted:
                met = None
                measured = f"{measured} (of {count}, not {wanted}: not judged)"
            out.append(
                {
                    "issue": issue,
                    "target": f"{what} at {label(n)}",
                    "size": n,
                    "key": key,
                    "measured": measured,
                    "met": met,
                }
            )
    return out


def machine_text(machine: Row) -> str:
    return (
        f"{machine['cpu']}, {machine['cores']} cores ({machine['cores_usable']} usable), "
        f"{machine['ram_gb']} GB RAM, Linux {machine['kernel']}, Python {machine['python']}, "
        f"SQLite {machine['sqlite']}, disk {machine['disk']}, umoci {machine['umoci'] or 'absent'}, "
        f"refcount {machine['refcount_commit'] or machine['refcount_source']}"
    )


def write_json(path: Path | None, results: Row) -> None:
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2, default=str) + "\n")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--sizes",
        type=parse_sizes,
        default=parse_sizes("1k,10k"),
        help="comma-separated image counts: 200, 1k, 10k, 100k (default 1k,10k)",
    )
    p.add_argument(
        "--out",
        type=Path,
        default=Path("/tmp/refcount-bench"),
        help="work directory; stores are cached in OUT/stores",
    )
    p.add_argument("--json", type=Path, help="write the results here (default OUT/results.json)")
    p.add_argument("--deletes", type=int, default=200, help="library deletes per size")
    p.add_argument(
        "--process-deletes", type=int, default=20, help="whole-process deletes per size, per path"
    )
    p.add_argument(
        "--postgres",
        metavar="URL",
        help="also measure with the counts in PostgreSQL: a psycopg URL of a maintenance "
        "database (e.g. postgresql://root@127.0.0.1:5432/test) where benchmark databases "
        "are created and dropped",
    )
    p.add_argument(
        "--rss-deletes",
        type=int,
        metavar="N",
        help="deletes the daemon serves between its idle RSS and the RSS after them "
        "(default: images/100, at least 10, at most 1,000: 1,000 at 100k)",
    )
    p.add_argument(
        "--group",
        type=int,
        default=20,
        metavar="N",
        help="simultaneous daemon-served delete clients in the group-commit figure "
        "(default 20; 0 skips it)",
    )
    p.add_argument("--skip-umoci", action="store_true", help="do not run umoci")
    p.add_argument("--skip-daemon", action="store_true", help="do not start refcount watch")
    p.add_argument("--skip-watch", action="store_true", help="do not run bench_watch.py")
    p.add_argument("--watch-singles", type=int, help="bench_watch.py --singles (its default)")
    p.add_argument("--watch-burst", type=int, help="bench_watch.py --burst (its default)")
    args = p.parse_args(argv)
    if not args.sizes:
        p.error("--sizes names no size")
    if args.deletes < 1 or args.process_deletes < 1:
        p.error("--deletes and --process-deletes must be at least 1")
    if (args.rss_deletes is not None and args.rss_deletes < 0) or args.group < 0:
        p.error("--rss-deletes and --group must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or out / "results.json"
    machine = describe_machine(out)
    machine["bytecode_compiled"] = compile_refcount()
    results: Row = {
        "command": " ".join(["python", "scripts/bench.py", *(argv or sys.argv[1:])]),
        "started_unix": time.time(),
        "machine": machine,
        "settings": {
            "sizes": args.sizes,
            "layers": LAYERS,
            "deletes": args.deletes,
            "process_deletes": args.process_deletes,
            "rss_deletes": {label(n): rss_deletes(n, args) for n in args.sizes},
            "group": args.group,
            "repeats": {label(n): repeats(n) for n in args.sizes},
        },
        "sizes": {},
        "watch": None,
        "targets": [],
    }
    say(f"machine: {machine_text(machine)}")
    pristine: dict[int, Path] = {}
    for n in args.sizes:
        pristine[n] = ensure_store(out / "stores", n)
        work = out / "work" / label(n)
        remove(work)
        results["sizes"][str(n)] = bench_size(n, pristine[n], work, args)
        write_json(json_path, results)  # a long run leaves what it measured so far
    for row in results["sizes"].values():
        first = results["sizes"].get("1000")
        row["delete_lib_median_vs_1k"] = ratio(
            row["delete_lib_median_ms"], first["delete_lib_median_ms"] if first else None
        )
    if args.skip_watch:
        results["watch"] = None
    else:
        smallest = min(args.sizes)
        results["watch"] = measure_watch(pristine[smallest], out / "work" / "watch", args)
    results["targets"] = targets(results)
    results["finished_unix"] = time.time()
    results["loadavg_end"] = os.getloadavg()
    write_json(json_path, results)

    say()
    say(f"machine: {machine_text(machine)}")
    say(f"command: {results['command']}")
    start_load = ", ".join(f"{x:.1f}" for x in machine["loadavg_start"])
    end_load = ", ".join(f"{x:.1f}" for x in results["loadavg_end"])
    say(f"load average at start {start_load}; at end {end_load} (other work on the machine)")
    say()
    say(table(results))
    say()
    for target in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[target["met"]]
        say(
            f"  {verdict:<12} issue {target['issue']:>2}: {target['target']}: "
            f"{target['measured'] or '-'}"
        )
    say(f"\nresults: {json_path}")
    remove(out / "work")  # the used copies, set aside while measuring
    return 0


if __name__ == "__main__":
    sys.exit(main())
