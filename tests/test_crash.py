"""Fault injection: a refcount process killed at any instant heals at the next start (SPEC §7).

How a trial runs. The parent builds a store (a copy of a template whose database
is already initialised, so no trial pays for the migrations) and forks. The
child names a crash point in REFCOUNT_CRASH_AT, opens the store only *after* the
fork (an SQLite connection must never cross a fork), runs one operation and
exits 0; the crash point makes it `os._exit(137)` instead. The parent reaps it
and plays the next start (`sync`), then checks what a user relies on:

- `verify` is ok and every count equals the independent oracle's;
- no blob reachable from index.json is missing from blobs/;
- index.json is either untouched or exactly what the uncrashed operation writes
  (a reference run on a copy of the same store), never something in between;
- nothing unreachable outlives grace + trash TTL: `gc` with both at 0 leaves
  blobs/ == reachable and an empty trash.

Every trial draws its store, operation and policy from `random.Random(seed)`;
the seed, point and operation are in every assertion message, and
`CRASH_SEED=<n>` replays another series.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import random
import re
import select
import shutil
import signal
import tarfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from conftest import SEVERAL_STORES
from storekit import (
    OCI_CONFIG,
    OCI_LAYER_GZIP,
    OCI_MANIFEST,
    REF_NAME,
    Descriptor,
    add_entry,
    add_image,
    add_index,
    add_referrer,
    blob_files,
    blob_path,
    expected_counts,
    graph,
    make_layout,
    need_tool,
    reachable,
    read_index,
    remove_entries,
    run,
    sha256_digest,
    tag_of,
    write_blob,
)
from test_push import PUSH_POINTS

import refcount
from refcount import Changes, ConcurrentChange, InvalidStore, Refcounter
from refcount.store import CRASH_ENV, Store

SEED = int(os.environ.get("CRASH_SEED", "20240917"))
CHILD_DEADLINE = 60.0
ZERO = timedelta(0)
SOURCE = Path(refcount.__file__).parent

POINTS = (
    "delete-before-index",
    "index-before-rename",
    "delete-before-commit",
    "delete-after-commit",
    "settle-between-actions",
    "gc-after-commit",
    "sync-before-commit",
    "sync-after-commit",
)
BEFORE_INDEX_REWRITE = {"delete-before-index", "index-before-rename"}
DELETES = ("delete tag", "delete manifest")
RECONCILES = ("sync", "init", "watch batch")
OPERATIONS: dict[str, tuple[str, ...]] = {
    "delete-before-index": DELETES,
    "index-before-rename": DELETES,
    "delete-before-commit": DELETES,
    "delete-after-commit": DELETES,
    "settle-between-actions": (*DELETES, *RECONCILES, "gc"),
    "gc-after-commit": ("gc",),
    "sync-before-commit": (*RECONCILES, "gc"),
    "sync-after-commit": (*RECONCILES, "gc"),
}
CRASH_TRIALS = 112  # 14 per point
KILL_TRIALS = 40


# --------------------------------------------------------------------------
# Child processes
# --------------------------------------------------------------------------
def fork(body: Callable[[], object], log: Path, *, crash_at: str | None = None) -> int:
    """Run `body` in a forked child and return its pid; the child never returns here.

    The child exits 0 when `body` returns and 1 with the traceback in `log` when
    it raises; a crash point or a signal ends it before that.
    """
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            if crash_at is None:
                os.environ.pop(CRASH_ENV, None)
            else:
                os.environ[CRASH_ENV] = crash_at
            body()
        except BaseException:
            log.write_text(traceback.format_exc())
            code = 1
        os._exit(code)
    return pid


def reap(pid: int, timeout: float = CHILD_DEADLINE) -> int:
    """Wait for a child (at most `timeout` s) and return its exit code (-N for signal N)."""
    pidfd = os.pidfd_open(pid)
    try:
        ready, _, _ = select.select([pidfd], [], [], timeout)
    finally:
        os.close(pidfd)
    if not ready:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        raise AssertionError(f"child {pid} still ran after {timeout} s: killed")
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def child_log(log: Path) -> str:
    return log.read_text() if log.exists() else "(no traceback)"


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------
def trash_files(store: Path) -> set[str]:
    return {f"{p.parent.name}:{p.name}" for p in (store / ".refcount" / "trash").glob("*/*")}


def assert_healed(store: Path, why: str) -> None:
    """The next start (`sync`) brings the store back to a state a user can trust."""
    with refcount.open(store) as rc:
        rc.sync()
        report = rc.verify()
        assert report.ok, f"{why}: verify after the next start: {report}"
        lost = reachable(store) - blob_files(store)
        assert not lost, f"{why}: referenced blobs lost: {sorted(lost)}"
        expected = expected_counts(store)
        recorded = {digest: rc.count(digest) for digest in expected}
        assert recorded == expected, f"{why}: counts differ from the oracle"
    with refcount.open(store, grace=ZERO, trash_ttl=ZERO) as rc:
        rc.gc()
        assert rc.verify().ok, f"{why}: verify after gc"
    leaked = blob_files(store) - reachable(store)
    assert not leaked, f"{why}: unreachable blobs outlived grace 0: {sorted(leaked)}"
    assert not trash_files(store), f"{why}: trash outlived TTL 0: {sorted(trash_files(store))}"
    leftovers = sorted(p.name for p in (store / ".refcount" / "tmp").iterdir())
    assert not leftovers, f"{why}: temporary files outlived the next start: {leftovers}"


# --------------------------------------------------------------------------
# Stores
# --------------------------------------------------------------------------
@dataclass
class Built:
    """A template store and what a trial may do to it."""

    path: Path
    tags: list[str]
    manifests: list[str]
    images: dict[str, Descriptor] = field(default_factory=dict)
    shared: bytes = b""


def shared_layers(store: Path) -> Built:
    """Four images over one base layer; a and b also share a middle layer.

    keep=[base]  a=[base, mid, a]  b=[base, mid, b]  c=[base, c] (Docker)  a2 -> a's manifest
    """
    base, mid = b"base layer", b"middle layer of a and b"
    images = {
        "keep": add_image(store, [base], tag="keep", config=b'{"keep":1}'),
        "a": add_image(store, [base, mid, b"own layer of a"], tag="a", config=b'{"a":1}'),
        "b": add_image(store, [base, mid, b"own layer of b"], tag="b", config=b'{"b":1}'),
        "c": add_image(store, [base, b"own layer of c"], tag="c", docker=True),
    }
    add_entry(store, images["a"], "a2")
    images["a2"] = images["a"]
    manifests = [images["a"]["digest"], images["c"]["digest"]]
    return Built(store, ["a", "b", "c", "a2", "keep"], manifests, images, base)


def multi_arch(store: Path) -> Built:
    """An image index whose platform manifests are also untagged roots, beside a plain image.

    multi -> index -> {amd=[common, amd], arm=[common, arm]}; amd and arm listed untagged;
    other=[common, other]
    """
    common = b"layer common to every platform"
    amd = add_image(store, [common, b"amd64 layer"], tag=None, index_entry=False)
    arm = add_image(store, [common, b"arm64 layer"], tag=None, index_entry=False)
    multi = add_index(store, [amd, arm], tag="multi", list_children_untagged=True)
    other = add_image(store, [common, b"other layer"], tag="other")
    images = {"multi": multi, "other": other}
    return Built(store, ["multi", "other"], [amd["digest"], multi["digest"]], images, common)


def with_referrers(store: Path) -> Built:
    """An image with an untagged SBOM (itself signed, untagged) and a tagged signature.

    app=[base, app] <- sbom (untagged) <- sbom-sig (untagged);  app <- app-sig (tagged);
    other=[base]
    """
    base = b"base of app and other"
    app = add_image(store, [base, b"app layer"], tag="app")
    sbom = add_referrer(store, app, payload=b'{"spdx":"app"}')
    add_referrer(store, sbom, payload=b"signature of the sbom")
    add_referrer(store, app, tag="app-sig", payload=b"signature of app")
    other = add_image(store, [base], tag="other")
    images = {"app": app, "other": other}
    return Built(store, ["app", "app-sig", "other"], [app["digest"], sbom["digest"]], images, base)


SCENARIOS: dict[str, Callable[[Path], Built]] = {
    "shared-layers": shared_layers,
    "multi-arch": multi_arch,
    "referrers": with_referrers,
}


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Built]:
    """One initialised store per scenario; trials work on copies."""
    built = {}
    for name, build in SCENARIOS.items():
        store = make_layout(tmp_path_factory.mktemp("template") / name)
        built[name] = build(store)
        with refcount.open(store) as rc:
            rc.init()
            assert rc.verify().ok, name
    return built


def copy_store(template: Built, path: Path) -> Built:
    shutil.copytree(template.path, path, symlinks=True)
    return Built(path, template.tags, template.manifests, template.images, template.shared)


def push_new_image(store: Path, shared: bytes, name: str) -> Descriptor:
    """An outside tool pushes an image reusing a layer the store already has."""
    return add_image(store, [shared, f"layer of {name}".encode()], tag=name)


def write_orphans(store: Path, label: str) -> None:
    """An abandoned upload (old) and one in progress (new): blobs no root reaches."""
    old = write_blob(store, f"abandoned upload {label}".encode(), "application/octet-stream")
    hour_ago = time.time() - 3600
    os.utime(blob_path(store, old["digest"]), (hour_ago, hour_ago))
    write_blob(store, f"upload in progress {label}".encode(), "application/octet-stream")


# --------------------------------------------------------------------------
# One crash trial
# --------------------------------------------------------------------------
@dataclass
class Plan:
    """What the child runs, and what index.json may hold after it died."""

    describe: str
    action: Callable[[Refcounter], object]
    trash_ttl: timedelta | None
    allowed_index: dict[str, bytes]


def plan_trial(built: Built, op: str, rng: random.Random, scratch: Path) -> Plan:
    store = built.path
    ttl = rng.choice([None, ZERO])
    before = (store / "index.json").read_bytes()
    if op in DELETES:
        if rng.random() < 0.5:  # an outside push the delete's catch-up must count first
            push_new_image(store, built.shared, "pushed")
            before = (store / "index.json").read_bytes()
        if op == "delete tag":
            target = rng.choice(built.tags)
            action: Callable[[Refcounter], object] = lambda rc: rc.delete_tag(target)  # noqa: E731
        else:
            target = rng.choice(built.manifests)
            action = lambda rc: rc.delete_manifest(target)  # noqa: E731
        reference = scratch / "reference"
        shutil.copytree(store, reference, symlinks=True)
        with refcount.open(reference, trash_ttl=ttl) as rc:
            action(rc)
        after = (reference / "index.json").read_bytes()
        assert after != before
        return Plan(f"{op} {target}", action, ttl, {"untouched": before, "deleted": after})

    # sync, init, gc: first a refcount delete (so something sits in the trash), then
    # outside edits the crashed operation has to apply.
    deleted, removed = rng.sample(built.tags, 2)
    files_before = blob_files(store)
    with refcount.open(store) as rc:
        rc.delete_tag(deleted)
    if op == "gc":
        write_orphans(store, str(rng.random()))
        describe = f"gc after delete {deleted} and two orphans"
        action = lambda rc: rc.gc(grace=ZERO)  # noqa: E731
        ttl = rng.choice([ZERO, timedelta(hours=1)])
    else:
        remove_entries(store, lambda e: tag_of(e) == removed)
        readded = rng.random() < 0.5 and deleted in built.images
        if readded:  # the image comes back while its blobs are in the quarantine
            add_entry(store, built.images[deleted], deleted)
        push_new_image(store, built.shared, "pushed")
        describe = (
            f"{op} after delete {deleted}, outside rm {removed}"
            + (f", outside re-push {deleted}" if readded else "")
            + ", outside push"
        )
        # What the daemon's event handler would hand over: index.json and every blob file
        # that came or went (refcount's own quarantines included: seeing them is harmless).
        batch = Changes(index=True, blobs=frozenset(files_before ^ blob_files(store)))
        action = {
            "sync": lambda rc: rc.sync(),
            "init": lambda rc: rc.init(),
            "watch batch": lambda rc: rc.sync(batch),
        }[op]
    return Plan(describe, action, ttl, {"untouched": (store / "index.json").read_bytes()})


def crash_trials() -> Iterator[Any]:
    for number in range(CRASH_TRIALS):
        point = POINTS[number % len(POINTS)]
        yield pytest.param(number, point, id=f"{point}-{number}")


@pytest.mark.parametrize(("number", "point"), list(crash_trials()))
def test_a_process_killed_at_a_crash_point_heals_at_the_next_start(
    templates: dict[str, Built], tmp_path: Path, number: int, point: str
) -> None:
    seed = SEED + number
    rng = random.Random(seed)
    op = rng.choice(OPERATIONS[point])
    scenario = rng.choice(sorted(SCENARIOS))
    built = copy_store(templates[scenario], tmp_path / "store")
    plan = plan_trial(built, op, rng, tmp_path)
    why = f"seed {seed}, point {point}, {scenario}: {plan.describe} (trash TTL {plan.trash_ttl})"
    store = built.path

    def child() -> None:
        with refcount.open(store, trash_ttl=plan.trash_ttl) as rc:
            plan.action(rc)

    log = tmp_path / "child.log"
    status = reap(fork(child, log, crash_at=point))
    assert status == 137, f"{why}: child exited {status}, not at the crash point\n{child_log(log)}"

    index = (store / "index.json").read_bytes()
    outcome = [name for name, data in plan.allowed_index.items() if data == index]
    assert outcome, f"{why}: index.json is neither untouched nor the finished delete's"
    if op in DELETES:
        expected = "untouched" if point in BEFORE_INDEX_REWRITE else "deleted"
        assert outcome == [expected], f"{why}: index.json is {outcome}, expected {expected}"
    assert_healed(store, why)


def test_every_crash_point_in_the_code_is_exercised() -> None:
    named = set()
    for source in SOURCE.rglob("*.py"):
        named |= set(re.findall(r"crash_point\(\s*\"([a-z-]+)\"\s*\)", source.read_text()))
    assert named == set(POINTS) | set(PUSH_POINTS) | set(INIT_POINTS)  # a push's: test_push.py


# --------------------------------------------------------------------------
# init's bulk build, killed half-way
# --------------------------------------------------------------------------
INIT_POINTS = ("init-mid-load",)


@pytest.mark.parametrize("scenario", sorted(SCENARIOS))
def test_an_init_killed_during_its_bulk_load_is_redone_whole_by_the_next_start(
    tmp_path: Path, scenario: str
) -> None:
    """The bulk build writes its edges as it reads manifests, in the one
    transaction of init: killed with the edges written and no blob row yet, it
    leaves nothing behind, and the next init indexes the whole store again."""
    built = SCENARIOS[scenario](make_layout(tmp_path / "store"))
    store = built.path
    entries = len(read_index(store)["manifests"])
    why = f"{scenario}: init killed at init-mid-load"

    def child() -> None:
        with refcount.open(store) as rc:
            rc.init()

    log = tmp_path / "child.log"
    status = reap(fork(child, log, crash_at="init-mid-load"))
    assert status == 137, f"{why}: child exited {status}, not at the crash point\n{child_log(log)}"

    with refcount.open(store) as rc:
        redone = rc.init()
    assert redone.roots_added == entries, f"{why}: the next init did not index every entry"
    assert redone.became_live == len(reachable(store))
    assert_healed(store, why)


# --------------------------------------------------------------------------
# SIGKILL at random moments
# --------------------------------------------------------------------------
def kill_sequence(
    built: Built, rng: random.Random
) -> tuple[list[str], Callable[[Refcounter], None]]:
    steps: list[str] = []
    for tag in rng.sample(built.tags, rng.randint(2, len(built.tags))):
        steps.append(f"delete {tag}")
        steps.append(rng.choice(["sync", "gc", "none"]))
    steps.append("gc")

    def body(rc: Refcounter) -> None:
        for step in steps:
            if step.startswith("delete "):
                with contextlib.suppress(refcount.NotFound):  # a2 goes with a's manifest
                    rc.delete_tag(step.removeprefix("delete "))
            elif step == "sync":
                rc.sync()
            elif step == "gc":
                rc.gc()

    return steps, body


@pytest.mark.sqlite_only(SEVERAL_STORES)
def test_sigkill_at_random_moments_never_loses_a_referenced_blob(
    templates: dict[str, Built], tmp_path: Path
) -> None:
    killed = 0
    for number in range(KILL_TRIALS):
        seed = SEED + 10_000 + number
        rng = random.Random(seed)
        scenario = rng.choice(sorted(SCENARIOS))
        trial = tmp_path / str(number)
        built = copy_store(templates[scenario], trial / "store")
        store = built.path
        # Outside edits the first operation catches up with: a push and an rm.
        push_new_image(store, built.shared, "pushed")
        untouched = [e for e in read_index(store)["manifests"] if tag_of(e) == "pushed"]
        ttl = rng.choice([None, ZERO])
        steps, body = kill_sequence(built, rng)
        why = f"seed {seed}, {scenario}, trash TTL {ttl}, steps {steps}"

        # An uncrashed run on a copy tells how long the sequence takes.
        reference = trial / "reference"
        shutil.copytree(store, reference, symlinks=True)
        start = time.monotonic()
        with refcount.open(reference, trash_ttl=ttl) as rc:
            body(rc)
        delay = rng.uniform(0, (time.monotonic() - start) * 1.2)

        def child(store: Path = store, ttl: timedelta | None = ttl, body: Any = body) -> None:
            with refcount.open(store, trash_ttl=ttl) as rc:
                body(rc)

        log = trial / "child.log"
        pid = fork(child, log)
        time.sleep(delay)  # the random moment itself: the point of this test, not a wait
        os.kill(pid, signal.SIGKILL)  # harmless on a child that already finished (a zombie)
        status = reap(pid)
        assert status in (0, -signal.SIGKILL), f"{why}: child exited {status}\n{child_log(log)}"
        killed += status == -signal.SIGKILL
        entries = read_index(store)["manifests"]
        assert all(e in entries for e in untouched), f"{why}: an entry nobody deleted vanished"
        assert_healed(store, f"{why}, killed after {delay * 1000:.1f} ms")
    assert killed >= KILL_TRIALS // 2, f"only {killed} of {KILL_TRIALS} children were killed"


# --------------------------------------------------------------------------
# A crashed free, then an outside tool that needs the blob again
# --------------------------------------------------------------------------
@pytest.mark.parametrize("trash_ttl", [None, ZERO], ids=["quarantine", "unlink"])
def test_a_layer_an_outside_push_reuses_after_a_crashed_delete_survives_the_next_start(
    store: Path, tmp_path: Path, trash_ttl: timedelta | None
) -> None:
    """A delete commits "free layer L" and dies before doing it. Before the next start, an
    outside tool sees L in blobs/, so it pushes image C using L without writing it. The next
    start must not carry out the stale free on a blob index.json needs again."""
    shared = b"layer shared by a and c"
    add_image(store, [shared, b"own layer of a"], tag="a")
    with refcount.open(store) as rc:
        rc.init()
    log = tmp_path / "child.log"

    def child() -> None:
        with refcount.open(store, trash_ttl=trash_ttl) as rc:
            rc.delete_tag("a")

    status = reap(fork(child, log, crash_at="delete-after-commit"))
    assert status == 137, child_log(log)
    layer = write_blob(store, shared, "application/vnd.oci.image.layer.v1.tar")
    assert blob_path(store, layer["digest"]).exists()  # the tool's existence check
    c = add_image(store, [shared, b"own layer of c"], tag="c")
    assert_healed(store, f"trash TTL {trash_ttl}")
    assert layer["digest"] in graph(store)[c["digest"]]


# --------------------------------------------------------------------------
# The outside-push race the quarantine exists for (SPEC §3), deterministic
# --------------------------------------------------------------------------
def tar_layer(name: str) -> bytes:
    """A gzip-compressed tar holding one file `name`, byte-identical on every call."""
    raw = io.BytesIO()
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = f"content of {name}\n".encode()
        info = tarfile.TarInfo(name)
        info.size, info.mtime, info.mode = len(data), 0, 0o644
        tar.addfile(info, io.BytesIO(data))
    return gzip.compress(raw.getvalue(), mtime=0)


def push_without_layer(
    store: Path, reused: Descriptor, reused_bytes: bytes, own: bytes, tag: str
) -> Descriptor:
    """What a tool that saw `reused` in blobs/ writes: own layer, config, manifest, entry."""
    layers = [reused, write_blob(store, own, OCI_LAYER_GZIP)]
    diff_ids = [sha256_digest(gzip.decompress(x)) for x in (reused_bytes, own)]
    config_body = {
        "architecture": "amd64",
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    }
    config = write_blob(store, json.dumps(config_body).encode(), OCI_CONFIG)
    body = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers}
    manifest = write_blob(store, json.dumps(body).encode(), OCI_MANIFEST)
    add_entry(store, manifest, tag)
    return manifest


def run_race(store: Path) -> Descriptor:
    """Images A and B share layer L. An outside tool checks that L exists; refcount deletes
    A and B (L goes to the quarantine); the tool writes image C needing L; sync restores L."""
    shared = tar_layer("shared")
    add_image(store, [shared, tar_layer("a")], tag="A")
    add_image(store, [shared, tar_layer("b")], tag="B")
    layer = {"mediaType": OCI_LAYER_GZIP, "digest": sha256_digest(shared), "size": len(shared)}
    with refcount.open(store) as rc:
        rc.init()
        tool_saw_layer = blob_path(store, layer["digest"]).exists()
        assert tool_saw_layer
        rc.delete_tag("A")
        freed = {b.digest for b in rc.delete_tag("B").freed}
        assert layer["digest"] in freed
        assert not blob_path(store, layer["digest"]).exists()
        assert layer["digest"] in trash_files(store)
        c = push_without_layer(store, layer, shared, tar_layer("c"), "C")
        report = rc.sync()
        assert layer["digest"] in report.restored
    return c


def test_a_layer_freed_between_an_outside_tools_check_and_its_index_write_is_restored(
    store: Path,
) -> None:
    c = run_race(store)
    assert_healed(store, "outside-push race")
    image = {c["digest"], *graph(store)[c["digest"]]}
    assert len(image) == 4  # manifest, config, shared layer, own layer
    assert image <= blob_files(store)


@pytest.mark.tools
def test_the_image_pushed_across_the_free_unpacks_with_umoci(store: Path, tmp_path: Path) -> None:
    need_tool("umoci")
    run_race(store)
    bundle = tmp_path / "bundle"
    rootless = [] if os.geteuid() == 0 else ["--rootless"]
    run(["umoci", "unpack", *rootless, "--image", f"{store}:C", str(bundle)])
    assert (bundle / "rootfs" / "shared").read_text() == "content of shared\n"
    assert (bundle / "rootfs" / "c").read_text() == "content of c\n"


# --------------------------------------------------------------------------
# An outside index.json writer racing refcount's rewrites
# --------------------------------------------------------------------------
def write_index_like(store: Path, index: dict[str, Any], in_place: bool, number: int) -> None:
    """umoci: temp file in a `.umoci-*` dir + rename; skopeo: truncate and write in place."""
    data = json.dumps(index).encode()
    if in_place:
        with open(store / "index.json", "wb") as handle:
            handle.write(data)
        return
    temp_dir = store / f".umoci-{os.getpid()}"
    temp_dir.mkdir(exist_ok=True)
    temp = temp_dir / f"index-{number}"
    temp.write_bytes(data)
    os.rename(temp, store / "index.json")


def outside_writer(
    store: Path, keep: Descriptor, base: bytes, appends: int, stop: Path, log: Path, seed: int
) -> None:
    """Append `appends` tagged entries (or fewer, once `stop` exists), alternating umoci's
    rename and skopeo's in-place write; log each tag once its write is complete."""
    rng = random.Random(seed)
    with open(log, "a") as appended:
        for number in range(appends):
            if stop.exists():
                return
            tag = f"w-{number}"
            if number % 4 == 0:  # a real push: blobs first, then the entry
                entry = add_image(store, [base, tag.encode()], tag=None, index_entry=False)
            else:
                entry = dict(keep)
            entry["annotations"] = {REF_NAME: tag}
            index = json.loads((store / "index.json").read_bytes())
            index["manifests"] = [*index["manifests"], entry]
            write_index_like(store, index, number % 2 == 1, number)
            appended.write(tag + "\n")
            appended.flush()
            time.sleep(rng.uniform(0, 0.015))  # a tool pushing now and then, not a wait


def test_an_outside_writer_appending_during_deletes_never_loses_an_entry(
    store: Path, tmp_path: Path
) -> None:
    """A tool appends entries to index.json while refcount deletes 30 tags. The tool may
    resurrect a deleted tag (its own lost update: the quarantine covers it), but refcount's
    compare-before-rename must never overwrite an entry the tool wrote. A delete that keeps
    colliding may give up, with exit 2 and a message naming index.json."""
    seed = SEED + 20_000
    base = b"base layer"
    keep = add_image(store, [base], tag="keep", config=b'{"keep":1}')
    targets = [f"t{i:02}" for i in range(30)]
    for tag in targets:
        add_image(store, [base, tag.encode()], tag=tag)
    with refcount.open(store) as rc:
        rc.init()
    stop, appended, log = tmp_path / "stop", tmp_path / "appended", tmp_path / "writer.log"
    writer = fork(lambda: outside_writer(store, keep, base, 80, stop, appended, seed), log)
    refused: list[str] = []
    try:
        with refcount.open(store) as rc:
            for tag in targets:
                for _attempt in range(3):
                    try:
                        rc.delete_tag(tag)
                        break
                    except (ConcurrentChange, InvalidStore) as exc:
                        assert exc.exit_code == 2
                        assert "index.json" in str(exc)
                        refused.append(str(exc))
    finally:
        stop.touch()
        status = reap(writer)
    assert status == 0, child_log(log)
    tags = {tag_of(e) for e in read_index(store)["manifests"]}
    written = appended.read_text().split()
    assert len(written) >= len(targets), "the writer hardly overlapped the deletes"
    lost = [tag for tag in written if tag not in tags]
    why = f"seed {seed}, {len(refused)} deletes refused"
    assert not lost, f"{why}: outside entries overwritten by a delete: {lost}"
    assert_healed(store, f"{why}: outside writer during deletes")


@pytest.mark.parametrize("after_read", [1, 2])
def test_an_outside_write_landing_right_after_any_index_read_is_never_overwritten(
    store: Path, monkeypatch: pytest.MonkeyPatch, after_read: int
) -> None:
    """The race above made deterministic: the outside tool's rename lands right after
    refcount's n-th read of index.json during a delete (1: the snapshot, 2: the check just
    before the swap, which RENAME_EXCHANGE then re-checks), whatever refcount does next."""
    base = b"base layer"
    add_image(store, [base, b"a"], tag="a")
    add_image(store, [base], tag="keep")
    with refcount.open(store) as rc:
        rc.init()
    reads = 0
    read_index_of = Store.read_index

    def read_then_outside_push(self: Store) -> Any:
        nonlocal reads
        snapshot = read_index_of(self)
        reads += 1
        if reads == after_read:
            add_image(store, [base, b"pushed"], tag="pushed")
        return snapshot

    monkeypatch.setattr(Store, "read_index", read_then_outside_push)
    with refcount.open(store) as rc, contextlib.suppress(ConcurrentChange):
        rc.delete_tag("a")
    monkeypatch.undo()
    assert reads >= after_read
    tags = [tag_of(e) for e in read_index(store)["manifests"]]
    assert "pushed" in tags, f"outside entry written after read {after_read} was overwritten"
    assert_healed(store, f"outside push after read {after_read}")
