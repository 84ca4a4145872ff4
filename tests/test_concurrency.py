"""Several refcount processes on one store serialize their writes (SPEC §7).

Children are forked and open the store only after the fork (an SQLite
connection never crosses a fork); each announces it is ready on a pipe and
then waits for one "go" byte, so the operations really start together. One
trial of each kind also runs the real CLI (`python -m refcount ...`) as
separate interpreters, to prove that path serializes too.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from storekit import (
    add_image,
    blob_files,
    expected_counts,
    make_layout,
    reachable,
    read_index,
    remove_entries,
    sha256_digest,
    tag_of,
    write_blob,
)
from test_crash import assert_healed, child_log, fork, reap, trash_files

import refcount
from refcount import Refcounter

DEADLINE = 60.0
DELETE_TRIALS = 50
PARALLEL_ROUNDS = 6
BASE, SHARED = b"base layer: kept by keep", b"layer of a and b only"


# --------------------------------------------------------------------------
# Starting children together
# --------------------------------------------------------------------------
def start_together(bodies: list[Callable[[], object]], logs: list[Path]) -> list[int]:
    """Fork one child per body, let all of them get ready, then start them at once.

    Returns their exit codes (0 ok, 1 raised: the traceback is in its log).
    """
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pids = []
    for body, log in zip(bodies, logs, strict=True):

        def child(body: Callable[[], object] = body) -> None:
            os.close(ready_r)
            os.close(go_w)
            os.write(ready_w, b"r")
            if os.read(go_r, 1) != b"g":  # EOF: the parent is gone
                raise RuntimeError("no go signal")
            body()

        pids.append(fork(child, log))
    os.close(ready_w)
    os.close(go_r)
    try:
        waiting, deadline = len(pids), time.monotonic() + DEADLINE
        while waiting:
            ready, _, _ = select.select([ready_r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "children never became ready"
            waiting -= len(os.read(ready_r, waiting))
        os.write(go_w, b"g" * len(pids))
    finally:
        os.close(ready_r)
        os.close(go_w)
    return [reap(pid, DEADLINE) for pid in pids]


def opened(
    store: Path, action: Callable[[Refcounter], object], trash_ttl: timedelta | None = None
) -> Callable[[], object]:
    """A child body: open the store (after the fork, at the go signal) and act on it."""

    def body() -> object:
        with refcount.open(store, trash_ttl=trash_ttl) as rc:
            return action(rc)

    return body


def cli(store: Path, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


# --------------------------------------------------------------------------
# Two deletes of images that share layers
# --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def shared_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """keep=[base]  a=[base, shared, a]  b=[base, shared, b], initialised."""
    store = make_layout(tmp_path_factory.mktemp("template") / "store")
    add_image(store, [BASE], tag="keep", config=b'{"keep":1}')
    add_image(store, [BASE, SHARED, b"own layer of a"], tag="a", config=b'{"a":1}')
    add_image(store, [BASE, SHARED, b"own layer of b"], tag="b", config=b'{"b":1}')
    with refcount.open(store) as rc:
        rc.init()
    return store


def assert_a_and_b_deleted(store: Path, template: Path, why: str) -> None:
    """Both images are gone; the base survives for keep; a and b's blobs left blobs/ once."""
    assert [tag_of(e) for e in read_index(store)["manifests"]] == ["keep"], why
    images = blob_files(template) - reachable(store)
    assert sha256_digest(BASE) in blob_files(store), f"{why}: the base keep needs was freed"
    assert sha256_digest(SHARED) in images, why
    assert blob_files(store) == reachable(store), f"{why}: blobs left behind or lost"
    with refcount.open(store) as rc:
        report = rc.verify()
        assert report.ok, f"{why}: {report}"
        assert {d: rc.count(d) for d in expected_counts(store)} == expected_counts(store), why
    assert len(images) == 7  # 2 manifests, 2 configs, 2 own layers, the shared layer
    assert trash_files(store) in (images, set()), why


@pytest.mark.parametrize("trial", range(DELETE_TRIALS))
def test_two_deletes_of_images_sharing_layers_started_together_both_succeed(
    shared_template: Path, tmp_path: Path, trial: int
) -> None:
    store = shutil.copytree(shared_template, tmp_path / "store")
    ttl = timedelta(0) if trial % 2 else None
    why = f"trial {trial}, trash TTL {ttl}"
    freed = {tag: tmp_path / f"freed-{tag}" for tag in "ab"}

    def delete(tag: str) -> Callable[[Refcounter], object]:
        def action(rc: Refcounter) -> None:
            report = rc.delete_tag(tag)
            freed[tag].write_text(json.dumps([b.digest for b in report.freed]))

        return action

    logs = [tmp_path / "a.log", tmp_path / "b.log"]
    bodies = [opened(store, delete("a"), ttl), opened(store, delete("b"), ttl)]
    codes = start_together(bodies, logs)
    assert codes == [0, 0], f"{why}: " + "\n".join(child_log(log) for log in logs)
    by_a, by_b = (set(json.loads(freed[tag].read_text())) for tag in "ab")
    assert not by_a & by_b, f"{why}: freed twice: {by_a & by_b}"
    assert sha256_digest(SHARED) in by_a | by_b, (
        f"{why}: the last user did not free the shared layer"
    )
    assert len(by_a) in (3, 4) and len(by_b) in (3, 4), why  # own 3, and maybe the shared one
    assert_a_and_b_deleted(store, shared_template, why)


def test_two_cli_deletes_started_together_both_succeed(
    shared_template: Path, tmp_path: Path
) -> None:
    store = shutil.copytree(shared_template, tmp_path / "store")
    processes = [cli(store, "delete", "tag", "a"), cli(store, "delete", "tag", "b")]
    results = [p.communicate(timeout=DEADLINE) for p in processes]
    for process, (out, err) in zip(processes, results, strict=True):
        assert process.returncode == 0, err
        assert err == "", err
        assert "removed 1 index.json entry" in out
    assert_a_and_b_deleted(store, shared_template, "CLI")


# --------------------------------------------------------------------------
# sync, delete and gc at once on one SQLite database
# --------------------------------------------------------------------------
def busy_store(path: Path) -> Path:
    """Twelve images over two shared layers, initialised."""
    store = make_layout(path)
    for i in range(12):
        add_image(store, [BASE, SHARED if i % 2 else b"odd", f"layer {i}".encode()], tag=f"t{i}")
    with refcount.open(store) as rc:
        rc.init()
    return store


def outside_edits(store: Path, round_: int) -> None:
    """What other tools did since: a push, an rm of an entry, an abandoned upload."""
    add_image(store, [BASE, f"pushed {round_}".encode()], tag=f"pushed-{round_}")
    remove_entries(store, lambda e: tag_of(e) == f"t{2 * round_ + 1}")
    write_blob(store, f"upload {round_}".encode(), "application/octet-stream")


def test_parallel_sync_delete_and_gc_never_fail_with_database_is_locked(tmp_path: Path) -> None:
    store = busy_store(tmp_path / "store")
    for round_ in range(PARALLEL_ROUNDS - 1):
        outside_edits(store, round_)
        kinds = {
            "sync-1": lambda rc: rc.sync(),
            "sync-2": lambda rc: rc.sync(),
            "delete": lambda rc, t=f"t{2 * round_}": rc.delete_tag(t),
            "gc-1": lambda rc: rc.gc(),
            "gc-2": lambda rc: rc.gc(grace=timedelta(0)),
            "verify": lambda rc: rc.verify(),
        }
        logs = [tmp_path / f"{round_}-{name}.log" for name in kinds]
        codes = start_together([opened(store, action) for action in kinds.values()], logs)
        failures = {
            name: child_log(log)
            for name, code, log in zip(kinds, codes, logs, strict=True)
            if code != 0
        }
        assert not failures, f"round {round_}: {failures}"
        assert_healed(store, f"round {round_}")

    # The last round through the real CLI: separate interpreters, exit codes and stderr.
    outside_edits(store, PARALLEL_ROUNDS - 1)
    commands = [
        ["sync"],
        ["sync"],
        ["delete", "tag", f"t{2 * (PARALLEL_ROUNDS - 1)}"],
        ["gc"],
        ["gc", "--grace", "0s"],
    ]
    processes = [cli(store, *args) for args in commands]
    for args, process in zip(commands, processes, strict=True):
        _out, err = process.communicate(timeout=DEADLINE)
        assert "locked" not in err, f"{args}: {err}"
        assert process.returncode == 0, f"{args}: {err}"
    assert_healed(store, "CLI round")
