"""Periodic verification (issue 14): deep checks in resumable slices, every verify
recorded, `verify --last`, and the options' refusals."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import threading
from collections import Counter
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

import pytest
from conftest import Cli
from storekit import add_image, blob_files, listing, sha256_digest, write_blob

import refcount
from refcount.core import Refcounter, scan
from refcount.db.engine import transaction
from refcount.reports import VerifyRun
from refcount.store import Store

IMAGES = 8
"""Images of the sliced store: each a config, a manifest and two layers of its own,
plus one layer all share: 8 x 4 + 1 = 33 blobs."""


@pytest.fixture
def images(store: Path) -> Path:
    for n in range(IMAGES):
        add_image(store, [b"shared", f"layer {n}".encode(), f"other {n}".encode()], tag=f"t{n}")
    return store


@pytest.fixture
def hashed(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every digest `Store.hash_batch` hashes, counted (the stores here are smaller
    than a batch: they are hashed in the test's process)."""
    calls: Counter[str] = Counter()
    real = Store.hash_batch

    def spy(
        self: Store, digests: Sequence[str], deadline: float | None = None, *, first: bool = True
    ) -> list[str | None]:
        hashes = real(self, digests, deadline, first=first)
        calls.update(digests[: len(hashes)])
        return hashes

    monkeypatch.setattr(Store, "hash_batch", spy)
    return calls


def history(rc: Refcounter) -> list[VerifyRun]:
    with transaction(rc.engine, write=False) as repo:
        return repo.verify_runs()


def in_range(digests: set[str], run: VerifyRun) -> set[str]:
    """The digests a recorded slice covered: after `after`, up to `through`."""
    assert run.through is not None
    return {d for d in digests if (run.after is None or d > run.after) and d <= run.through}


def blob_path(store: Path, digest: str) -> Path:
    return store / "blobs" / "sha256" / digest.split(":", 1)[1]


def test_successive_slices_hash_every_blob_present_exactly_once_per_lap(
    images: Path, hashed: Counter[str]
) -> None:
    present = blob_files(images)
    assert len(present) == 4 * IMAGES + 1
    with refcount.open(images) as rc:
        rc.init()
        slices = []
        while not slices or slices[-1].lap is None or slices[-1].lap.done < len(present):
            slices.append(rc.verify(deep=True, max_blobs=5))
            assert slices[-1].ok and len(slices) <= len(present)
        runs = history(rc)
    assert len(slices) == math.ceil(len(present) / 5)
    assert [r.checked for r in runs] == [5] * (len(slices) - 1) + [len(present) % 5 or 5]
    covered = [in_range(present, r) for r in runs]
    assert set().union(*covered) == present
    assert sum(len(c) for c in covered) == len(present)  # the ranges do not overlap
    assert hashed == Counter(present)  # and no blob was hashed twice


def test_the_lap_starts_again_after_it_ends_and_reports_its_progress(images: Path) -> None:
    total = len(blob_files(images))
    with refcount.open(images) as rc:
        rc.init()
        first = rc.verify(deep=True, max_blobs=total - 3)
        assert first.lap is not None and (first.lap.done, first.lap.total) == (total - 3, total)
        assert first.after is None and rc.verify_status().lap == first.lap
        end = rc.verify(deep=True, max_blobs=total)
        assert end.checked == 3 and end.lap is not None and end.lap.done == total
        again = rc.verify(deep=True, max_blobs=2)
        assert again.after is None and again.lap is not None and again.lap.done == 2
        assert again.lap.started is not None and first.lap.started is not None
        assert again.lap.started > first.lap.started


def test_a_blob_written_behind_the_cursor_waits_for_the_next_lap(images: Path) -> None:
    with refcount.open(images) as rc:
        rc.init()
        first = rc.verify(deep=True, max_blobs=16)
        assert first.lap is not None and first.lap.cursor is not None
        for n in range(1000):  # a new blob whose digest sorts before the cursor
            late = write_blob(images, f"late {n}".encode(), "application/octet-stream")
            if late["digest"] < first.lap.cursor:
                break
            blob_path(images, late["digest"]).unlink()
        blob_path(images, late["digest"]).write_bytes(b"not what its name says")
        rest = rc.verify(deep=True, max_blobs=1000)
        assert rest.lap is not None and rest.lap.done == rest.lap.total
        assert rest.ok and rest.corrupt == ()  # the late blob is an orphan, not yet hashed
        nxt = rc.verify(deep=True, max_blobs=1000)
        assert [c.digest for c in nxt.corrupt] == [late["digest"]] and not nxt.ok


def test_deep_slices_find_changed_bytes_within_one_lap_and_name_the_tag(images: Path) -> None:
    with refcount.open(images) as rc:
        rc.init()
    layer = sha256_digest(b"layer 3")
    blob_path(images, layer).write_bytes(b"layer 9")  # same size, other bytes
    total = len(blob_files(images))
    found = []
    with refcount.open(images) as rc:
        for _ in range(math.ceil(total / 6)):
            found += rc.verify(deep=True, max_blobs=6).corrupt
            assert rc.verify().ok  # the shallow verify cannot tell
        report = rc.verify_status()
    assert [c.digest for c in found] == [layer]
    deep = report.deep
    assert deep is not None and deep.corrupt in (0, 1)
    corrupt = [f for run in history_of(images) for f in run.findings if f.kind == "corrupt"]
    assert [(f.digest, f.tags) for f in corrupt] == [(layer, ("t3",))]


def history_of(store: Path) -> list[VerifyRun]:
    with refcount.open(store) as rc, transaction(rc.engine, write=False) as repo:
        return [
            VerifyRun(**{**r.__dict__, "findings": repo.verify_findings(r.id)})
            for r in repo.verify_runs()
        ]


def test_a_blob_freed_while_a_slice_hashes_is_skipped_not_reported(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with refcount.open(images) as rc:
        rc.init()
        own = {c.digest for c in rc.show("t0").children} | {rc.show("t0").digest}
        own.discard(sha256_digest(b"shared"))
    total = len(blob_files(images))
    real = Store.hash_batch
    deleted: list[int] = []
    once = threading.Lock()

    def hash_after_a_delete(
        self: Store, digests: Sequence[str], deadline: float | None = None, *, first: bool = True
    ) -> list[str | None]:
        with once:
            if not deleted:  # another refcount process deletes t0 before anything is hashed
                with refcount.open(images) as other:
                    deleted.append(len(other.delete_tag("t0").freed))
        return real(self, digests, deadline, first=first)

    monkeypatch.setattr(Store, "hash_batch", hash_after_a_delete)
    with refcount.open(images) as rc:
        report = rc.verify(deep=True)
    assert deleted == [len(own)]
    assert not any(blob_path(images, d).exists() for d in own)
    assert report.ok and report.corrupt == ()
    assert report.checked == total - len(own)


def test_a_plain_deep_verify_hashes_everything_and_leaves_the_lap_alone(
    images: Path, hashed: Counter[str]
) -> None:
    with refcount.open(images) as rc:
        rc.init()
        first = rc.verify(deep=True, max_blobs=4)
        whole = rc.verify(deep=True)
        assert whole.checked == len(blob_files(images)) and whole.lap is None
        second = rc.verify(deep=True, max_blobs=4)
        assert first.lap is not None and second.after == first.lap.cursor


def test_every_verify_is_recorded_with_its_kind_counts_and_digests(images: Path) -> None:
    with refcount.open(images) as rc:
        rc.init()
        layer = sha256_digest(b"other 5")
        assert rc.verify().ok
        blob_path(images, layer).unlink()
        bad = rc.verify()
        deep = rc.verify(deep=True)
        status = rc.verify_status()
    assert not bad.ok and bad.run is not None and deep.run == bad.run + 1
    runs = history_of(images)
    assert [(r.deep, r.ok, r.missing) for r in runs] == [
        (False, True, 0),
        (False, False, 1),
        (True, False, 1),
    ]
    assert status.shallow == runs[1] and status.deep == runs[2]
    missing = [f for f in runs[1].findings if f.kind == "missing"]
    assert [(f.digest, f.tags) for f in missing] == [(layer, ("t5",))]
    assert runs[2].checked == len(blob_files(images))


def test_verify_last_prints_the_recorded_results_and_runs_nothing(cli: Cli, images: Path) -> None:
    assert cli("--store", images, "init").code == 0
    never = cli("--store", images, "verify", "--last")
    assert never.code == 0 and never.out.splitlines() == ["shallow: never run", "deep: never run"]
    assert cli("--store", images, "verify", "--deep", "--slice", "10").code == 0
    layer = sha256_digest(b"layer 2")
    blob_path(images, layer).unlink()
    before = listing(images, include_refcount=True)
    quiet = cli("--store", images, "verify", "--last")
    assert listing(images, include_refcount=True) == before
    assert quiet.code == 0 and "shallow: never run" in quiet.out  # the blob gone: not looked at
    assert "deep: OK" in quiet.out and "10 blobs hashed" in quiet.out
    assert "deep lap: 30% of blobs checked this lap, lap started 20" in quiet.out
    assert cli("--store", images, "verify").code == 1
    last = cli("--store", images, "verify", "--last")
    assert last.code == 1
    assert f"  missing {layer}: referenced but not in blobs/ (needed by t2)" in last.out
    data = cli("--store", images, "--json", "verify", "--last")
    assert data.code == 1
    document = data.json()
    assert document["ok"] is False and document["shallow"]["missing"] == 1
    assert document["deep"]["checked"] == 10 and document["lap"]["done"] == 10
    assert [f["digest"] for f in document["shallow"]["findings"] if f["kind"] == "missing"] == [
        layer
    ]


def test_a_deep_slice_prints_the_lap_and_exits_1_on_a_corrupt_blob(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    manifest = json.loads(cli("--store", images, "--json", "show", "t0").out)["digest"]
    layer = sha256_digest(b"other 0")
    blob_path(images, layer).write_bytes(b"other 9")
    outputs = [cli("--store", images, "verify", "--deep", "--max-duration", "1h", "--slice", "11")]
    outputs += [cli("--store", images, "verify", "--deep", "--slice", "11") for _ in range(2)]
    assert [o.out.count("% of blobs checked this lap") for o in outputs] == [1, 1, 1]
    assert "deep: 33% of blobs checked this lap, lap started 20" in outputs[0].out
    assert "lap complete, the next slice starts a new one" in outputs[2].out
    bad = [o for o in outputs if o.code == 1]
    assert len(bad) == 1 and f"corrupt {layer}: content hashes to " in bad[0].out
    assert "(needed by t0)" in bad[0].out and manifest not in bad[0].out


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--slice", "5"], "--slice and --max-duration need --deep"),
        (["--max-duration", "1m"], "--slice and --max-duration need --deep"),
        (["--deep", "--slice", "0"], "--slice 0: must be 1 or more blobs"),
        (["--deep", "--slice", "-3"], "--slice -3: must be 1 or more blobs"),
        (["--deep", "--max-duration", "0"], "--max-duration 0s: must be longer than 0"),
        (["--deep", "--max-duration", "soon"], "'soon': invalid duration"),
        (["--deep", "--slice", "many"], "Invalid value for '--slice'"),
        (["--last", "--deep"], "--last runs nothing: it takes no other verify option"),
        (["--last", "--repair"], "--last runs nothing"),
    ],
)
def test_bad_slice_options_are_refused_and_change_nothing(
    cli: Cli, images: Path, args: list[str], needle: str
) -> None:
    cli("--store", images, "init")
    before = listing(images, include_refcount=True)
    result = cli("--store", images, "verify", *args)
    assert result.code == 2 and needle in result.err, result.err
    assert "Traceback" not in result.err and result.out == ""
    assert listing(images, include_refcount=True) == before


def test_a_read_only_store_is_verified_in_slices_but_nothing_is_recorded(
    images: Path, tmp_path: Path
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root writes through read-only modes")
    with refcount.open(images) as rc:
        rc.init()
    modes = {p: p.stat().st_mode for p in [images, *images.rglob("*")]}
    for path in modes:
        path.chmod(modes[path] & ~0o222)
    try:
        with refcount.open(images) as rc:
            report = rc.verify(deep=True, max_blobs=3)
            assert report.ok and report.checked == 3 and report.run is None
    finally:
        for path, mode in modes.items():
            path.chmod(mode)


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--verify-every", "0"], "--verify-every 0: must be longer than 0"),
        (["--deep-every", "never"], "'never': invalid duration"),
        (["--deep-slice", "0"], "--deep-slice 0: must be 1 or more"),
        (["--deep-slice", "2x"], "'2x': not a number of blobs nor a duration"),
        (["--deep-slice", "0s"], "--deep-slice 0: must be longer than 0"),
    ],
)
def test_bad_verify_options_of_the_daemon_are_refused_with_exit_2(
    images: Path, args: list[str], needle: str
) -> None:
    with refcount.open(images) as rc:
        rc.init()
    before = listing(images, include_refcount=True)
    ran = subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(images), "watch", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 2 and needle in ran.stderr, ran.stderr
    assert ran.stderr.count("\n") == 1 and "Traceback" not in ran.stderr
    assert listing(images, include_refcount=True) == before


def test_a_deep_run_without_its_recount_hashes_without_the_lock_and_checks_sizes(
    images: Path,
) -> None:
    with refcount.open(images) as rc:
        rc.init()
    changed = sha256_digest(b"layer 6")
    blob_path(images, changed).write_bytes(b"layer 60")  # one byte longer
    reports = []
    with Store(images).locked():  # a writer holds the lock all along

        def run() -> None:
            with refcount.open(images) as rc:
                reports.append(rc.verify(deep=True, max_blobs=100, recount=False))

        worker = threading.Thread(target=run)
        worker.start()
        worker.join(30)
        assert not worker.is_alive(), "the hash-only verify waited for the store's lock"
    [report] = reports
    assert not report.recounted and report.checked == len(blob_files(images))
    assert [(c.digest, c.reason) for c in report.corrupt] == [
        (changed, f"content hashes to {sha256_digest(b'layer 60').split(':')[1]}")
    ]
    assert report.drift == () and report.missing == () and report.run is not None


def test_a_verify_without_its_recount_must_be_deep(images: Path) -> None:
    with refcount.open(images) as rc:
        rc.init()
        with pytest.raises(refcount.RefcountError, match="must be --deep"):
            rc.verify(recount=False)
        with pytest.raises(refcount.RefcountError, match="without --repair"):
            rc.verify(deep=True, repair=True, recount=False)


def test_the_pool_of_processes_finds_what_one_process_finds_and_stops_at_the_deadline(
    images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with refcount.open(images) as rc:
        rc.init()
    changed, longer = sha256_digest(b"layer 3"), sha256_digest(b"other 6")
    blob_path(images, changed).write_bytes(b"layer 9")  # same size, other bytes
    blob_path(images, longer).write_bytes(b"other 60")  # one byte longer
    total = len(blob_files(images))
    expected = sorted(
        [
            (changed, f"content hashes to {sha256_digest(b'layer 9').split(':')[1]}"),
            (longer, f"content hashes to {sha256_digest(b'other 60').split(':')[1]}"),
        ]
    )
    with refcount.open(images) as rc:
        alone = rc.verify(deep=True)  # 33 blobs: one batch, hashed in this process
        monkeypatch.setattr(scan, "BATCH", 2)  # 17 batches, to two worker processes
        pooled = rc.verify(deep=True)
        before = listing(images, include_refcount=False)
        late = rc.verify(deep=True, max_duration=timedelta(microseconds=1))
    for report in (alone, pooled):
        assert report.checked == total and not report.ok
        assert sorted((c.digest, c.reason) for c in report.corrupt) == expected
    assert late.lap is not None and 1 <= late.checked < total
    assert late.lap.done == late.checked  # the blobs hashed are the lap's first ones
    assert listing(images, include_refcount=False) == before
