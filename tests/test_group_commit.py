"""Group commit: deletes that arrive together are written to index.json together.

Three levels, each through its contract:

- `Refcounter.delete_groups` (no daemon): several requests in one transaction
  and one rewrite of index.json, each request failing alone with the error it
  would give alone, the result equal to running them one after another;
- `refcount.group.GroupCommit` (threads, no store): who leads a batch, who
  waits for the next, what a request cancelled while queued becomes;
- the daemon (a real `refcount watch` process, its socket, real CLI processes):
  twenty clients at once all answered with their own output, fewer rewrites
  than requests in the metrics, a missing tag failing alone, a client killed
  while queued deleting nothing.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import storekit as sk
from conftest import SEVERAL_STORES, direct_env

import refcount
from refcount import interrupts
from refcount.core.grouping import DeleteRequest
from refcount.errors import DeleteRefused, InvalidDigest, NotFound
from refcount.group import GroupCommit, Withdrawn
from refcount.reports import DeleteReport, to_json
from refcount.store import CRASH_ENV, Store

DEADLINE = 30.0


def tags(*names: str) -> DeleteRequest:
    return DeleteRequest(tags=names)


# --------------------------------------------------------------------------
# The library: one transaction, one rewrite, each request its own result
# --------------------------------------------------------------------------
def test_a_batch_is_one_rewrite_and_a_missing_tag_fails_alone(
    store: Path, rewrites: list[int]
) -> None:
    sk.four_images(store)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
        before = sk.blob_files(store)
        results = rc.delete_groups([tags("a"), tags("nope"), tags("d")])

    assert len(rewrites) == 1
    first, missing, last = results
    assert isinstance(first, DeleteReport) and isinstance(last, DeleteReport)
    assert isinstance(missing, NotFound)
    assert str(missing) == f"nope: no such tag in {store / 'index.json'}"
    assert [e.tag for e in first.removed] == ["a"]
    assert [e.tag for e in last.removed] == ["d"]
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == ["b", "c", "a-again"]
    freed = {b.digest for b in (*first.freed, *last.freed)}
    assert freed == before - sk.reachable(store)
    assert sk.blob_files(store) == sk.reachable(store)
    with refcount.open(store) as rc:
        assert rc.verify().ok


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_a_batch_gives_what_the_same_deletes_give_one_after_another(
    store: Path, tmp_path: Path
) -> None:
    """b and c alone share a layer: it is freed by c, the later of the two."""
    made = sk.four_images(store)
    serial = tmp_path / "serial"
    shutil.copytree(store, serial)
    requests = [tags("b"), tags("c"), DeleteRequest(digest=made["a"]["digest"]), tags("b")]

    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
        batched = rc.delete_groups(requests)
    one_by_one: list[object] = []
    with refcount.open(serial, trash_ttl=timedelta(0)) as rc:
        rc.init()
        for request in requests:
            try:
                if request.digest is not None:
                    one_by_one.append(rc.delete_manifest(request.digest))
                else:
                    one_by_one.append(rc.delete_tags(list(request.tags)))
            except NotFound as exc:
                one_by_one.append(exc)

    assert [to_json(r) for r in batched[:3]] == [to_json(r) for r in one_by_one[:3]]
    # The second delete of b finds it gone, with the same words as alone (the
    # store's path differs).
    assert isinstance(batched[3], NotFound) and isinstance(one_by_one[3], NotFound)
    assert str(batched[3]) == str(one_by_one[3]).replace(str(serial), str(store))
    shared = sk.sha256_digest(b"b and c")
    assert shared not in {b.digest for b in batched[0].freed}  # type: ignore[union-attr]
    assert shared in {b.digest for b in batched[1].freed}  # type: ignore[union-attr]
    assert sk.read_index(store) == sk.read_index(serial)
    assert sk.blob_files(store) == sk.blob_files(serial)


def test_a_refused_image_and_a_malformed_digest_fail_alone(store: Path) -> None:
    sk.four_images(store)
    broken = sk.write_blob(store, b"{not json", "application/vnd.oci.image.manifest.v1+json")
    sk.add_entry(store, broken, "broken")
    with refcount.open(store) as rc:
        rc.init()
        refused, malformed, deleted = rc.delete_groups(
            [tags("broken"), DeleteRequest(digest="sha256:beef"), tags("a")]
        )
        checked = rc.verify()  # not ok: the damaged manifest is a problem it reports
        assert (checked.drift, checked.missing) == ((), ())

    assert isinstance(refused, DeleteRefused), refused
    assert "damaged" in str(refused)
    assert isinstance(malformed, InvalidDigest)
    assert isinstance(deleted, DeleteReport) and [e.tag for e in deleted.removed] == ["a"]
    assert [sk.tag_of(e) for e in sk.read_index(store)["manifests"]] == [
        "b",
        "c",
        "d",
        "a-again",
        "broken",
    ]


def test_a_batch_where_every_request_fails_changes_nothing(
    store: Path, rewrites: list[int]
) -> None:
    sk.four_images(store)
    with refcount.open(store) as rc:
        rc.init()
        before = sk.listing(store)
        results = rc.delete_groups([tags("nope"), tags("gone")])
        assert rc.verify().ok
    assert [type(r) for r in results] == [NotFound, NotFound]
    assert rewrites == []
    assert sk.listing(store) == before


# --------------------------------------------------------------------------
# The queue: leaders, followers, withdrawals (threads and a fake batch)
# --------------------------------------------------------------------------
class Batches:
    """A `run` for GroupCommit that records its batches and can be held."""

    def __init__(self) -> None:
        self.ran: list[list[str]] = []
        self.hold = threading.Event()
        self.hold.set()
        self.started = threading.Event()

    def __call__(self, requests: Sequence[str]) -> list[str]:
        self.started.set()
        assert self.hold.wait(DEADLINE)
        self.ran.append(list(requests))
        return [f"done {r}" for r in requests]


def start(target: Callable[[], object]) -> tuple[threading.Thread, list[object]]:
    out: list[object] = []

    def body() -> None:
        try:
            out.append(target())
        except Exception as exc:
            out.append(exc)

    thread = threading.Thread(target=body)
    thread.start()
    return thread, out


def wait_until(condition: Callable[[], object], what: str, timeout: float = DEADLINE) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.01)
    return value


def queued(group: GroupCommit[str, str], key: str) -> int:
    queue = group._queues.get(key)
    return 0 if queue is None else len(queue.waiting)


def test_a_lone_request_runs_at_once_and_those_arriving_meanwhile_form_the_next_batch() -> None:
    group: GroupCommit[str, str] = GroupCommit()
    batches = Batches()
    batches.hold.clear()
    first, first_out = start(lambda: group.submit("s", "a", batches))
    assert batches.started.wait(DEADLINE)
    others = [start(lambda r=r: group.submit("s", r, batches)) for r in ("b", "c", "d")]  # type: ignore[misc]
    wait_until(lambda: queued(group, "s") == 3, "three queued requests")
    batches.hold.set()
    for thread, _ in [(first, first_out), *others]:
        thread.join(DEADLINE)
    assert batches.ran[0] == ["a"]
    assert sorted(batches.ran[1]) == ["b", "c", "d"] and len(batches.ran) == 2
    assert first_out == ["done a"]
    assert sorted(str(out[0]) for _, out in others) == ["done b", "done c", "done d"]


def test_a_request_cancelled_while_queued_is_withdrawn_and_never_runs() -> None:
    group: GroupCommit[str, str] = GroupCommit()
    batches = Batches()
    batches.hold.clear()
    gone = threading.Event()
    first, _ = start(lambda: group.submit("s", "a", batches))
    assert batches.started.wait(DEADLINE)
    leaver, leaver_out = start(lambda: group.submit("s", "b", batches, gone.is_set))
    stayer, stayer_out = start(lambda: group.submit("s", "c", batches))
    wait_until(lambda: queued(group, "s") == 2, "two queued requests")
    gone.set()
    leaver.join(DEADLINE)
    batches.hold.set()
    for thread in (first, stayer):
        thread.join(DEADLINE)
    assert len(leaver_out) == 1 and isinstance(leaver_out[0], Withdrawn)
    assert batches.ran == [["a"], ["c"]] and stayer_out == ["done c"]


def test_a_request_cancelled_once_its_batch_was_taken_is_carried_out_and_answered() -> None:
    group: GroupCommit[str, str] = GroupCommit()
    batches = Batches()
    batches.hold.clear()
    gone = threading.Event()
    thread, out = start(lambda: group.submit("s", "a", batches, gone.is_set))
    assert batches.started.wait(DEADLINE)
    gone.set()  # the client leaves while its delete is being written
    batches.hold.set()
    thread.join(DEADLINE)
    assert out == ["done a"] and batches.ran == [["a"]]


def test_work_on_behalf_of_several_requests_stops_only_once_all_are_cancelled() -> None:
    first, second = threading.Event(), threading.Event()
    seen = []

    def body() -> None:
        with interrupts.on_behalf_of([first, second]):
            seen.append(interrupts.requested())
            first.set()
            seen.append(interrupts.requested())
            second.set()
            seen.append(interrupts.requested())
        with interrupts.on_behalf_of([first, None]):  # a request that cannot be cancelled
            seen.append(interrupts.requested())

    thread = threading.Thread(target=body)
    thread.start()
    thread.join(DEADLINE)
    assert seen == [False, False, True, False]


def test_a_failed_batch_reaches_every_member_and_the_next_batch_still_runs() -> None:
    group: GroupCommit[str, str] = GroupCommit()
    hold = threading.Event()

    def failing(requests: Sequence[str]) -> list[str]:
        assert hold.wait(DEADLINE)
        raise RuntimeError(f"broken batch of {len(requests)}")

    first, first_out = start(lambda: group.submit("s", "a", failing))
    wait_until(lambda: "s" in group._queues and group._queues["s"].in_flight, "a batch")
    batches = Batches()
    second, second_out = start(lambda: group.submit("s", "b", batches))
    wait_until(lambda: queued(group, "s") == 1, "a queued request")
    hold.set()
    first.join(DEADLINE)
    second.join(DEADLINE)
    assert [str(e) for e in first_out] == ["broken batch of 1"]
    assert second_out == ["done b"]


def test_requests_of_different_keys_never_share_a_batch() -> None:
    group: GroupCommit[str, str] = GroupCommit()
    batches = Batches()
    threads = [start(lambda k=k: group.submit(k, k, batches))[0] for k in ("x", "y")]  # type: ignore[misc]
    for thread in threads:
        thread.join(DEADLINE)
    assert sorted(batches.ran) == [["x"], ["y"]]


# --------------------------------------------------------------------------
# The daemon: real processes, a real socket
# --------------------------------------------------------------------------


def small_store(path: Path, count: int) -> Path:
    """`count` images t0, t1, ... sharing a base layer, indexed."""
    store = sk.make_layout(path)
    for i in range(count):
        sk.add_image(store, [b"base", f"only t{i}".encode()], tag=f"t{i}")
    refcount_direct(store, "init")
    return store


def refcount_direct(store: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`refcount --store S ARGS...` run by this process, never by a daemon."""
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=direct_env(),
    )


def client(store: Path, *args: str) -> subprocess.Popen[str]:
    """`refcount --store S ARGS...` started now; a daemon on S answers it."""
    return subprocess.Popen(
        [sys.executable, "-m", "refcount", "--store", str(store), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(proc: subprocess.Popen[str]) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=120)
    return proc.returncode, out, err


class Daemon:
    """`refcount -vv --store S watch --metrics-addr 127.0.0.1:0`, its log in a file."""

    def __init__(self, store: Path, log_path: Path) -> None:
        self.store = store
        self.log_path = log_path
        self._log = open(log_path, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "refcount", "-vv", "--store", str(store), "watch"),
                *("--metrics-addr", "127.0.0.1:0", "--debounce", "0.05"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        socket_file = store / ".refcount" / "refcount.sock"
        self.address = self.wait_log(r"serving metrics on http://(\S+)/metrics").group(1)
        wait_until(
            lambda: "full reconcile (start)" in self.log() and socket_file.exists(),
            "the daemon to serve",
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_log(self, pattern: str) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            assert self.proc.poll() is None, self.log()
            return re.search(pattern, self.log())

        match: re.Match[str] = wait_until(found, f"{pattern!r} in the daemon's log")
        return match

    def served(self, proc: subprocess.Popen[str]) -> bool:
        return f"serve: pid {proc.pid}: running" in self.log()

    def metrics(self) -> dict[str, float]:
        with urllib.request.urlopen(f"http://{self.address}/metrics", timeout=5) as response:
            text = response.read().decode()
        figures = {}
        for line in text.splitlines():
            if line.startswith(("refcount_index_rewrites_total", "refcount_delete_group_size_")):
                name, value = line.rsplit(" ", 1)
                figures[name] = float(value)
        return figures

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[[Path], Daemon]]:
    started: list[Daemon] = []

    def start(store: Path) -> Daemon:
        started.append(Daemon(store, tmp_path / f"watch-{len(started)}.log"))
        return started[-1]

    yield start
    for one in started:
        one.stop()


def tags_in(store: Path) -> list[str | None]:
    return [sk.tag_of(e) for e in sk.read_index(store)["manifests"]]


def group_figures(running: Daemon, deletes: int) -> dict[str, float]:
    """The daemon's group-commit figures once it counted `deletes` served deletes."""
    figures: dict[str, float] = wait_until(
        lambda: (
            (found := running.metrics()).get("refcount_delete_group_size_sum") == deletes and found
        ),
        f"{deletes} deletes in the metrics",
    )
    return figures


def test_twenty_clients_at_once_are_answered_each_with_its_own_report_in_two_rewrites(
    tmp_path: Path, daemon: Callable[[Path], Daemon]
) -> None:
    store = small_store(tmp_path / "store", 25)
    running = daemon(store)
    before = sk.blob_files(store)
    with Store(store).locked():  # as a refcount process holds it while it writes
        # The first delete leads a batch that waits for the lock; the other
        # nineteen queue up behind it and form the next batch.
        leader = client(store, "--json", "delete", "tag", "t0")
        wait_until(lambda: running.served(leader), "the first delete to be taken")
        followers = [client(store, "--json", "delete", "tag", f"t{i}") for i in range(1, 20)]
        running.wait_log(r"queued for the next batch \(19 waiting\)")
    results = [finish(p) for p in (leader, *followers)]

    freed: set[str] = set()
    for i, (code, out, err) in enumerate(results):
        assert (code, err) == (0, ""), (i, out, err)
        report = json.loads(out)
        assert report["target"] == f"t{i}" and [e["tag"] for e in report["removed"]] == [f"t{i}"]
        freed |= {b["digest"] for b in report["freed"]}
    assert all(running.served(p) for p in (leader, *followers)), running.log()
    assert tags_in(store) == [f"t{i}" for i in range(20, 25)]
    assert freed == before - sk.reachable(store) == before - sk.blob_files(store)
    assert refcount_direct(store, "verify").returncode == 0
    figures = group_figures(running, 20)
    assert figures["refcount_index_rewrites_total"] == 2  # fewer rewrites than requests
    assert figures["refcount_delete_group_size_count"] == 2


def test_a_client_naming_a_missing_tag_fails_alone_and_the_rest_of_its_batch_is_deleted(
    tmp_path: Path, daemon: Callable[[Path], Daemon]
) -> None:
    store = small_store(tmp_path / "store", 6)
    running = daemon(store)
    before = sk.listing(store)
    with Store(store).locked():  # as a refcount process holds it while it writes
        leader = client(store, "delete", "tag", "t0")
        wait_until(lambda: running.served(leader), "the first delete to be taken")
        batch = {tag: client(store, "--json", "delete", "tag", tag) for tag in ("t1", "nope", "t2")}
        running.wait_log(r"queued for the next batch \(3 waiting\)")
    assert finish(leader)[0] == 0
    results = {tag: finish(proc) for tag, proc in batch.items()}

    alone = refcount_direct(store, "--json", "delete", "tag", "nope")
    assert results["nope"] == (1, alone.stdout, alone.stderr)
    assert results["nope"][2] == f"refcount: error: nope: no such tag in {store / 'index.json'}\n"
    freed = set()
    for tag in ("t1", "t2"):
        code, out, err = results[tag]
        assert (code, err) == (0, ""), (tag, out, err)
        freed |= {b["digest"] for b in json.loads(out)["freed"]}
    assert tags_in(store) == ["t3", "t4", "t5"]
    after = sk.listing(store)
    changed = {p for p in before.keys() | after.keys() if before.get(p) != after.get(p)}
    gone = {p.removeprefix("blobs/").replace("/", ":", 1) for p in changed - {"index.json"}}
    t0 = {sk.sha256_digest(b"only t0")}  # and its config and manifest, below
    assert gone >= freed | t0 and not after.keys() - before.keys()
    assert gone == before_blobs(before) - sk.reachable(store)
    assert refcount_direct(store, "verify").returncode == 0
    figures = group_figures(running, 4)
    assert figures["refcount_index_rewrites_total"] == 2


def before_blobs(listing: dict[str, tuple[int, str]]) -> set[str]:
    return {
        p.removeprefix("blobs/").replace("/", ":", 1) for p in listing if p.startswith("blobs/")
    }


def test_a_client_killed_while_its_delete_is_queued_deletes_nothing(
    tmp_path: Path, daemon: Callable[[Path], Daemon]
) -> None:
    store = small_store(tmp_path / "store", 3)
    running = daemon(store)
    with Store(store).locked():  # as a refcount process holds it while it writes
        leader = client(store, "delete", "tag", "t0")
        wait_until(lambda: running.served(leader), "the first delete to be taken")
        killed = client(store, "delete", "tag", "t1")
        running.wait_log(r"queued for the next batch \(1 waiting\)")
        killed.kill()
        killed.communicate(timeout=30)
        running.wait_log(r"a queued request was withdrawn")
    assert finish(leader)[0] == 0
    assert tags_in(store) == ["t1", "t2"]
    assert sk.blob_files(store) == sk.reachable(store)
    assert sk.sha256_digest(b"only t1") in sk.blob_files(store)
    assert refcount_direct(store, "verify").returncode == 0
    assert f"serve: pid {killed.pid} went away or was interrupted; its command exited 130" in (
        running.log()
    )
    figures = group_figures(running, 1)
    assert figures["refcount_index_rewrites_total"] == 1


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_a_lone_served_delete_prints_what_the_cli_alone_prints(
    tmp_path: Path, daemon: Callable[[Path], Daemon]
) -> None:
    template = small_store(tmp_path / "template", 4)
    served, direct = tmp_path / "served", tmp_path / "direct"
    for copy in (served, direct):
        shutil.copytree(template, copy)
    running = daemon(served)
    for args in (["--json", "delete", "tag", "t0"], ["delete", "tag", "t1", "t2"]):
        proc = client(served, *args)
        got = finish(proc)
        assert running.served(proc)
        alone = refcount_direct(direct, *args)
        assert got == (alone.returncode, alone.stdout, alone.stderr)
    dry = finish(client(served, "--json", "delete", "tag", "t3", "--dry-run"))
    alone = refcount_direct(direct, "--json", "delete", "tag", "t3", "--dry-run")
    assert dry == (alone.returncode, alone.stdout, alone.stderr)
    assert sk.read_index(served) == sk.read_index(direct)
    assert sk.blob_files(served) == sk.blob_files(direct)


@pytest.mark.sqlite_only(SEVERAL_STORES)
@pytest.mark.parametrize(
    "point",
    [
        "delete-before-index",
        "index-before-rename",
        "delete-before-commit",
        "delete-after-commit",
        "settle-between-actions",
    ],
)
def test_a_batch_killed_at_a_crash_point_heals_whole_at_the_next_start(
    store: Path, tmp_path: Path, point: str
) -> None:
    sk.four_images(store)
    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.init()
    reference = tmp_path / "reference"
    shutil.copytree(store, reference)
    requests = [tags("a"), tags("nope"), tags("b"), tags("c")]
    with refcount.open(reference, trash_ttl=timedelta(0)) as rc:
        rc.delete_groups(requests)
    before = sk.read_index(store)

    pid = os.fork()
    if pid == 0:  # the child opens the store only after the fork
        code = 0
        try:
            os.environ[CRASH_ENV] = point
            with refcount.open(store, trash_ttl=timedelta(0)) as rc:
                rc.delete_groups(requests)
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 137, point

    with refcount.open(store, trash_ttl=timedelta(0)) as rc:
        rc.sync()
        assert rc.verify().ok, point
    assert sk.read_index(store) in (before, sk.read_index(reference)), point
    assert sk.reachable(store) <= sk.blob_files(store), point
    if sk.read_index(store) == sk.read_index(reference):
        assert sk.blob_files(store) == sk.blob_files(reference), point


def test_a_prune_beside_queued_deletes_runs_alone_between_batches(
    tmp_path: Path, daemon: Callable[[Path], Daemon]
) -> None:
    """prune is not served: it runs in its own process and takes the store's lock,
    so it goes before or after a batch, never inside one; all of them land."""
    store = small_store(tmp_path / "store", 6)
    running = daemon(store)
    with Store(store).locked():  # as a refcount process holds it while it writes
        leader = client(store, "delete", "tag", "t0")
        wait_until(lambda: running.served(leader), "the first delete to be taken")
        queued_delete = client(store, "delete", "tag", "t1")
        running.wait_log(r"queued for the next batch \(1 waiting\)")
        prune = client(store, "prune", "--keep-last", "0", "--match", "t[45]")
    results = [finish(p) for p in (leader, queued_delete, prune)]
    assert [code for code, _, _ in results] == [0, 0, 0], results
    assert not running.served(prune)
    assert tags_in(store) == ["t2", "t3"]
    assert sk.blob_files(store) == sk.reachable(store)
    assert refcount_direct(store, "verify").returncode == 0
