#!/usr/bin/env python3
"""Soak test: refcount beside a store that real tools keep changing.

    soak.py --minutes N [--store DIR] [--seed S]

For N minutes, at random: outside pushes (umoci new/insert/tag/config/rm and
skopeo copy, including multi-arch `--all` copies, when they are installed; else
storekit-style writes), `refcount delete tag|manifest` and `refcount gc` as
separate CLI processes, and a `refcount watch --debounce 0.05` daemon that is
SIGKILLed and restarted. About a third of the steps run two operations at once.
Two kinds of step aim at the race the quarantine exists for (SPEC §3): a delete
while skopeo copies an image reusing the deleted image's layer, and a scripted
tool that checks a layer exists, lets `refcount delete` free it, then pushes an
image reusing it. Between steps, every listed blob must be in blobs/ or waiting
in the quarantine.

At the end the daemon is killed, `refcount sync` and `refcount verify` run, and
the store is checked against the independent oracle in tests/storekit.py:

- lost:   reachable from index.json but missing from blobs/ (must be 0);
- leaked: in blobs/ but unreachable, and not an orphan (never reachable as far
          as refcount saw: its database says state orphan) younger than the
          grace period. Freed blobs sit in .refcount/trash/ and are not leaks.

WORK/ops.log records every command with its time, for a post-mortem;
WORK/watch.log is the daemon's log.

Exit 0 when nothing is lost and verify is ok, 1 otherwise. Everything is driven
by --seed, but tools and the daemon run concurrently, so a rerun with the same
seed follows a similar, not identical, course.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import random
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import storekit as sk  # noqa: E402

GRACE_SECONDS = 3600  # refcount's default --grace
MIN_TAGS, MAX_TAGS = 6, 24
RACE_LAYER_BYTES = 8 << 20
ROOTLESS = [] if os.geteuid() == 0 else ["--rootless"]


class Soak:
    def __init__(self, store: Path, work: Path, rng: random.Random) -> None:
        self.store = store
        self.work = work
        self.rng = rng
        self.umoci = shutil.which("umoci") is not None
        self.skopeo = shutil.which("skopeo") is not None
        self.source = work / "source"
        self.copied: dict[str, str] = {}  # tag in the store -> image in the source
        self.delete_seconds = [0.8]  # how long recent `refcount delete` processes took
        self.trash_dir = store / ".refcount" / "trash"
        self.race_hits = 0  # scripted races where the tool's layer was freed under it
        self.waited: set[str] = set()  # listed blobs seen in the quarantine between steps
        self.absent: set[str] = set()  # listed blobs seen nowhere between steps
        self.ops: Counter[str] = Counter()
        self.tool_errors: Counter[str] = Counter()
        self.refused: list[str] = []
        self.ever_reachable: set[str] = set()
        self.daemon: subprocess.Popen[bytes] | None = None
        self.daemon_log = work / "watch.log"
        self.daemon_usable = True
        self.daemon_deaths = 0
        self.counter = itertools.count(1)
        self.journal = open(work / "ops.log", "a")  # noqa: SIM115 (closed in finish)
        self.journal_lock = threading.Lock()

    # --- running things -------------------------------------------------------
    def note(self, text: str) -> None:
        """A line in WORK/ops.log, for a post-mortem."""
        with self.journal_lock:
            self.journal.write(f"{time.time():.3f} {text}\n")
            self.journal.flush()

    def refcount(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "refcount", "--store", str(self.store), *args]
        self.note(f"start refcount {' '.join(args)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
        self.note(f"end refcount {' '.join(args)}: exit {proc.returncode} {proc.stderr.strip()}")
        return proc

    def tool(self, name: str, cmd: list[str]) -> bool:
        self.note(f"start {' '.join(cmd)}")
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        self.note(f"end {name}: exit {proc.returncode}")
        if proc.returncode != 0:
            self.tool_errors[name] += 1
            with open(self.work / "tool-errors.log", "a") as log:
                log.write(f"$ {' '.join(cmd)}\n{proc.stderr}\n")
        return proc.returncode == 0

    def fresh(self, prefix: str) -> str:
        return f"{prefix}{next(self.counter)}"  # next() is atomic: two ops may run at once

    def tags(self) -> list[str]:
        for _ in range(50):  # skopeo rewrites index.json in place: retry a torn read
            try:
                entries = sk.read_index(self.store).get("manifests") or []
                return [t for e in entries if (t := sk.tag_of(e)) is not None]
            except ValueError:
                time.sleep(0.01)
        return []

    def image_tags(self) -> list[str]:
        """Tags of plain images (umoci cannot insert into an image index)."""
        return [t for t in self.tags() if not t.startswith("m")]

    # --- setup ----------------------------------------------------------------
    def setup(self) -> None:
        if not (self.store / "oci-layout").exists():
            if self.umoci:
                sk.run(["umoci", "init", "--layout", str(self.store)])
            else:
                sk.make_layout(self.store)
        src = self.work / "files"
        src.mkdir()
        for i in range(4):
            (src / f"f{i}").write_text(f"source file {i}\n")
        if self.umoci:
            # The store's own base, and a source layout for skopeo with shared layers.
            self.umoci_new("base", [src / "f0"])
            sk.run(["umoci", "init", "--layout", str(self.source)])
            for i in range(4):
                image = f"{self.source}:s{i}"
                sk.run(["umoci", "new", "--image", image])
                for j in range(i + 1):  # s_i holds f0..f_i: each shares with the others
                    sk.run(
                        [
                            "umoci",
                            "insert",
                            *ROOTLESS,
                            "--image",
                            image,
                            str(src / f"f{j}"),
                            f"/f{j}",
                        ]
                    )
            entries = {sk.tag_of(e): e for e in sk.read_index(self.source)["manifests"]}
            sk.add_index(self.source, [entries["s1"], entries["s2"]], tag="multi")
        else:
            sk.add_image(self.store, [b"base layer"], tag="base")
        proc = self.refcount("init")
        if proc.returncode != 0:
            raise SystemExit(f"refcount init failed: {proc.stderr.strip()}")

    def umoci_new(self, tag: str, files: list[Path]) -> bool:
        image = f"{self.store}:{tag}"
        ok = self.tool("umoci new", ["umoci", "new", "--image", image])
        for path in files:
            ok = ok and self.tool(
                "umoci insert",
                ["umoci", "insert", *ROOTLESS, "--image", image, str(path), f"/{path.name}"],
            )
        return ok

    # --- the daemon -----------------------------------------------------------
    def start_daemon(self) -> None:
        if self.daemon is not None or not self.daemon_usable:
            return
        log = open(self.daemon_log, "ab")  # noqa: SIM115 (the daemon owns it)
        self.daemon = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "refcount",
                "--store",
                str(self.store),
                "watch",
                "--debounce",
                "0.05",
            ],
            stdout=log,
            stderr=log,
        )
        log.close()
        self.note(f"started the daemon, pid {self.daemon.pid}")
        self.ops["daemon start"] += 1

    def kill_daemon(self) -> None:
        if self.daemon is None:
            return
        self.note("SIGKILL the daemon")
        self.daemon.send_signal(signal.SIGKILL)
        self.daemon.wait(timeout=30)
        self.daemon = None
        self.ops["daemon SIGKILL"] += 1

    def check_daemon(self) -> None:
        """A daemon that died on its own is a finding; after the first start, fall back."""
        if self.daemon is None or self.daemon.poll() is None:
            return
        self.daemon_deaths += 1
        code = self.daemon.returncode
        self.daemon = None
        if self.ops["daemon start"] == 1 and self.daemon_deaths == 1:
            self.daemon_usable = False
            print(
                f"soak: `refcount watch` exited {code} at once; running `sync` instead",
                file=sys.stderr,
            )

    # --- operations -----------------------------------------------------------
    def op_umoci_push(self) -> None:
        """A new image on top of a random one: new layer, config and manifest."""
        parents = self.image_tags()
        if not parents:
            return
        tag = self.fresh("u")
        path = self.work / "files" / self.fresh("file")
        path.write_text(f"{self.rng.random()}\n")
        parent = self.rng.choice(parents)
        if self.tool("umoci tag", ["umoci", "tag", "--image", f"{self.store}:{parent}", tag]):
            self.tool(
                "umoci insert",
                [
                    "umoci",
                    "insert",
                    *ROOTLESS,
                    "--image",
                    f"{self.store}:{tag}",
                    str(path),
                    f"/{path.name}",
                ],
            )

    def op_umoci_tag(self) -> None:
        tags = self.image_tags()
        if tags:
            image = f"{self.store}:{self.rng.choice(tags)}"
            self.tool("umoci tag", ["umoci", "tag", "--image", image, self.fresh("u")])

    def op_umoci_config(self) -> None:
        tags = self.image_tags()
        if tags:
            image = f"{self.store}:{self.rng.choice(tags)}"
            label = f"--config.label=soak={self.rng.random()}"
            self.tool(
                "umoci config",
                ["umoci", "config", "--image", image, "--tag", self.fresh("u"), label],
            )

    def op_umoci_rm(self) -> None:
        tags = self.tags()
        if tags:
            image = f"{self.store}:{self.rng.choice(tags)}"
            self.tool("umoci rm", ["umoci", "rm", "--image", image])

    def skopeo_copy(self, name: str, tag: str) -> None:
        cmd = ["skopeo", "copy", "--quiet", *(["--all"] if name == "multi" else [])]
        if self.tool("skopeo copy", [*cmd, f"oci:{self.source}:{name}", f"oci:{self.store}:{tag}"]):
            self.copied[tag] = name

    def op_skopeo_copy(self) -> None:
        name = self.rng.choice(["s0", "s1", "s2", "s3", "multi"])
        self.skopeo_copy(name, self.fresh("m" if name == "multi" else "s"))

    def op_race(self) -> None:
        """The race the quarantine exists for: delete an image while skopeo copies an image
        that reuses its layer. skopeo skips the layers it sees in blobs/; when refcount
        frees one before skopeo lists the copy, the next reconcile must restore it from
        the quarantine. Each race uses new source images: NAME-a = [A] and NAME-b =
        [A, B], where A is held only by the copy being deleted, and B is a big layer,
        so that skopeo spends a while writing between its check of A and its index.json."""
        name = self.fresh("r")
        small = self.work / "files" / name
        small.write_text(f"{name}\n")
        big = self.work / "files" / f"{name}.tar"
        with tarfile.open(big, "w") as tar:
            info = tarfile.TarInfo(f"big-{name}")
            info.size = RACE_LAYER_BYTES
            tar.addfile(info, io.BytesIO(bytes(RACE_LAYER_BYTES)))
        a, b = f"{self.source}:{name}-a", f"{self.source}:{name}-b"
        built = (
            self.tool("umoci new", ["umoci", "new", "--image", a])
            and self.tool(
                "umoci insert", ["umoci", "insert", *ROOTLESS, "--image", a, str(small), "/s"]
            )
            and self.tool("umoci tag", ["umoci", "tag", "--image", a, f"{name}-b"])
            and self.tool(
                "umoci raw add-layer", ["umoci", "raw", "add-layer", "--image", b, str(big)]
            )
        )
        big.unlink()
        if not built:
            return
        self.skopeo_copy(f"{name}-a", f"{name}-1")
        # skopeo should check A just before the delete frees it: start it after a random
        # part of the time a CLI delete takes (mostly the interpreter's start-up).
        recent = sorted(self.delete_seconds[-7:])
        delay = recent[len(recent) // 2] * self.rng.uniform(0.7, 1.0)

        def copy() -> None:
            time.sleep(delay)  # a random offset between the two, not a wait for anything
            self.skopeo_copy(f"{name}-b", f"{name}-2")

        with ThreadPoolExecutor(max_workers=1) as pool:
            copying = pool.submit(copy)
            start = time.monotonic()
            self.check_refcount("delete tag", self.refcount("delete", "tag", f"{name}-1"))
            self.delete_seconds.append(time.monotonic() - start)
            copying.result()

    def op_scripted_race(self) -> None:
        """The same race with the timing forced: a scripted tool sees layer L of image T
        in blobs/, `refcount delete` removes T (freeing L when T was its only holder),
        then the tool writes a new config, a manifest reusing L and its index.json entry."""
        try:
            entries = sk.read_index(self.store).get("manifests") or []
        except ValueError:
            return
        listed = Counter(e.get("digest") for e in entries)
        images = [  # tagged images listed once: deleting the tag does free something
            e
            for e in entries
            if sk.tag_of(e) and e.get("mediaType") == sk.OCI_MANIFEST and listed[e["digest"]] == 1
        ]
        if not images:
            return
        entry = self.rng.choice(images)
        try:
            manifest = json.loads(sk.blob_path(self.store, entry["digest"]).read_bytes())
            layer = manifest["layers"][-1]  # the top layer: the likeliest to be its own
        except (OSError, ValueError, KeyError, IndexError):
            return
        if not sk.blob_path(self.store, layer["digest"]).exists():  # the tool's check
            return
        self.check_refcount("delete tag", self.refcount("delete", "tag", sk.tag_of(entry)))
        if not sk.blob_path(self.store, layer["digest"]).exists():
            self.race_hits += 1
            self.note(f"race hit: {layer['digest']} freed after the tool saw it")
        config = sk.write_blob(
            self.store, json.dumps({"race": self.fresh("c")}).encode(), sk.OCI_CONFIG
        )
        body = {
            "schemaVersion": 2,
            "mediaType": sk.OCI_MANIFEST,
            "config": config,
            "layers": [{k: layer[k] for k in ("mediaType", "digest", "size")}],
        }
        pushed = sk.write_blob(self.store, json.dumps(body).encode(), sk.OCI_MANIFEST)
        sk.add_entry(self.store, pushed, self.fresh("x"))

    def op_storekit_push(self) -> None:
        """Without the tools: write blobs, then append an entry (umoci's order)."""
        shared = self.rng.choice([b"base layer", b"second shared layer"])
        sk.add_image(
            self.store, [shared, f"layer {self.rng.random()}".encode()], tag=self.fresh("k")
        )

    def op_storekit_rm(self) -> None:
        tags = self.tags()
        if tags:
            victim = self.rng.choice(tags)
            sk.remove_entries(self.store, lambda e: sk.tag_of(e) == victim)

    def op_delete_tag(self) -> None:
        tags = self.tags()
        if tags:
            self.check_refcount("delete tag", self.refcount("delete", "tag", self.rng.choice(tags)))

    def op_delete_manifest(self) -> None:
        try:
            entries = sk.read_index(self.store).get("manifests") or []
        except ValueError:
            return
        if entries:
            digest = self.rng.choice(entries)["digest"]
            self.check_refcount("delete manifest", self.refcount("delete", "manifest", digest))

    def op_gc(self) -> None:
        self.check_refcount("gc", self.refcount("gc"))

    def op_sync(self) -> None:
        self.check_refcount("sync", self.refcount("sync"))

    def check_refcount(self, name: str, proc: subprocess.CompletedProcess[str]) -> None:
        """Exit 1 for a tag an outside tool removed meanwhile, and 2 for index.json that
        kept changing or was half-written, are refusals; anything else is a failure."""
        if proc.returncode == 0:
            return
        message = proc.stderr.strip().splitlines()[-1:] or ["(no message)"]
        self.refused.append(f"{name}: exit {proc.returncode}: {message[0]}")
        if proc.returncode not in (1, 2) or "Traceback" in proc.stderr:
            raise SystemExit(f"refcount {name} failed:\n{proc.stderr}")

    def operations(self) -> list[tuple[str, float, Callable[[], None]]]:
        ops: list[tuple[str, float, Callable[[], None]]] = [
            ("race: check, delete, push", 1.5, self.op_scripted_race),
            ("refcount delete tag", 4, self.op_delete_tag),
            ("refcount delete manifest", 1, self.op_delete_manifest),
            ("refcount gc", 0.5, self.op_gc),
        ]
        if self.umoci:
            ops += [
                ("umoci tag+insert", 3, self.op_umoci_push),
                ("umoci tag", 1.5, self.op_umoci_tag),
                ("umoci config", 1, self.op_umoci_config),
                ("umoci rm", 2.5, self.op_umoci_rm),
            ]
        if self.skopeo and self.umoci:
            ops += [
                ("skopeo copy", 3, self.op_skopeo_copy),
                ("race: delete || skopeo copy", 1.5, self.op_race),
            ]
        if not self.umoci:
            ops += [
                ("storekit push", 4, self.op_storekit_push),
                ("storekit rm", 2.5, self.op_storekit_rm),
            ]
        if not self.daemon_usable:
            ops.append(("refcount sync", 2, self.op_sync))
        return ops

    def pick(self) -> tuple[str, Callable[[], None]]:
        ops = self.operations()
        tags = len(self.tags())
        if tags > MAX_TAGS:  # keep the store small: only removals
            ops = [o for o in ops if "delete" in o[0] or "rm" in o[0]]
        elif tags < MIN_TAGS:  # and busy: only additions
            ops = [o for o in ops if "delete" not in o[0] and "rm" not in o[0]]
        name, _, run = self.rng.choices(ops, weights=[w for _, w, _ in ops])[0]
        return name, run

    def states(self) -> dict[str, str]:
        """Every blob's state as refcount recorded it, read straight from its SQLite
        database (read-only: one query instead of a `refcount show` per blob)."""
        url = f"file:{self.store / '.refcount' / 'refcount.db'}?mode=ro"
        with contextlib.closing(sqlite3.connect(url, uri=True)) as db:
            return dict(db.execute("SELECT digest, state FROM blobs").fetchall())

    def sample(self) -> None:
        with contextlib.suppress(ValueError):  # a torn index.json: skip this sample
            reachable = sk.reachable(self.store)
            for digest in sorted(reachable - self.ever_reachable):
                self.note(f"sampled: {digest} reachable")
            self.ever_reachable |= reachable
            # Between steps, a listed blob may be absent from blobs/ only while it waits
            # in the quarantine for the next reconcile (the race above).
            trash = {f"{p.parent.name}:{p.name}" for p in self.trash_dir.glob("*/*")}
            for digest in sorted(reachable - sk.blob_files(self.store)):
                waiting = digest in trash
                (self.waited if waiting else self.absent).add(digest)
                self.note(f"sampled: {digest} listed, {'in the trash' if waiting else 'ABSENT'}")

    # --- the run ----------------------------------------------------------------
    def run(self, minutes: float) -> None:
        deadline = time.monotonic() + minutes * 60
        self.start_daemon()
        with ThreadPoolExecutor(max_workers=2) as pool:
            while time.monotonic() < deadline:
                self.check_daemon()
                roll = self.rng.random()
                if roll < 0.06:
                    self.kill_daemon()
                elif self.daemon is None and roll < 0.5:
                    self.start_daemon()
                picks = [self.pick() for _ in range(2 if self.rng.random() < 0.33 else 1)]
                futures = [pool.submit(run) for _, run in picks]
                for (name, _), future in zip(picks, futures, strict=True):
                    future.result()
                    self.ops[name] += 1
                self.sample()
        self.kill_daemon()

    def finish(self) -> int:
        sync = self.refcount("sync")
        verify = self.refcount("--json", "verify")
        try:
            report: dict[str, Any] = json.loads(verify.stdout)
        except ValueError:
            report = {}
        present = sk.blob_files(self.store)
        reachable = sk.reachable(self.store)
        lost = sorted(reachable - present)
        unreachable = present - reachable
        recorded = self.states()
        state = {d: recorded.get(d, "not recorded") for d in unreachable}
        now = time.time()
        young = {
            d
            for d in unreachable
            if state[d] == "orphan"
            and now - sk.blob_path(self.store, d).stat().st_mtime < GRACE_SECONDS
        }
        leaked = sorted(unreachable - young)
        trash = list(self.trash_dir.glob("*/*"))

        total = sum(v for k, v in self.ops.items() if not k.startswith("daemon"))
        daemon = "refcount watch --debounce 0.05" if self.daemon_usable else "NOT USABLE: sync"
        print(f"store: {self.store}")
        print(
            f"daemon: {daemon}; started {self.ops['daemon start']}, "
            f"SIGKILLed {self.ops['daemon SIGKILL']}, died on its own {self.daemon_deaths}"
        )
        print(f"operations: {total}")
        for name, count in sorted(self.ops.items()):
            print(f"  {name:<26} {count}")
        print(f"tool errors: {sum(self.tool_errors.values())} {dict(self.tool_errors)}")
        restored = [int(n) for n in re.findall(r"(\d+) restored", self.daemon_log.read_text())]
        print(
            f"outside-push races: {self.ops['race: delete || skopeo copy']} with skopeo, "
            f"{self.ops['race: check, delete, push']} scripted ({self.race_hits} freed the "
            f"layer under the tool); {len(self.waited)} listed blobs seen waiting in the "
            "quarantine between steps; "
            f"the daemon restored {sum(restored)} blobs in {sum(map(bool, restored))} batches"
        )
        print(
            f"listed blobs seen absent from blobs/ and the trash between steps: {len(self.absent)}"
        )
        print(f"refcount refusals (exit 1/2): {len(self.refused)}")
        for message, count in Counter(r.split(": /")[0] for r in self.refused).most_common(6):
            print(f"  {count} x {message}")
        print(
            f"final sync: exit {sync.returncode}; {sync.stdout.strip()} {sync.stderr.strip()}".rstrip()
        )
        print(
            f"verify: exit {verify.returncode}, ok={report.get('ok')}, roots {report.get('roots')}, "
            f"live {report.get('live')}, drift {len(report.get('drift', []))}, "
            f"missing {len(report.get('missing', []))}, problems {len(report.get('problems', []))}"
        )
        print(
            f"blobs: {len(present)} in blobs/, {len(reachable)} reachable, {len(trash)} in trash, "
            f"{len(unreachable)} unreachable of which {len(young)} orphans younger than grace "
            f"({len(young & self.ever_reachable)} of these were listed at a sampled moment)"
        )
        print(f"lost: {len(lost)}")
        for digest in lost:
            print(f"  lost {digest}")
        print(f"leaked: {len(leaked)}")
        for digest in leaked[:20]:
            print(f"  leaked {digest}: state {state[digest]}")
        self.journal.close()
        return 1 if lost or verify.returncode != 0 else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, required=True)
    parser.add_argument(
        "--store", type=Path, help="the layout (made if absent); default: a temp dir"
    )
    parser.add_argument("--seed", type=int, default=int(time.time()))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="refcount-soak-"))
    store = (args.store or work / "store").absolute()
    if ":" in str(store):
        parser.error(f"{store}: umoci and skopeo split image names at the first colon")
    print(f"soak: seed {args.seed}, {args.minutes} minutes, work dir {work}", flush=True)
    soak = Soak(store, work, random.Random(args.seed))
    try:
        soak.setup()
        soak.run(args.minutes)
    finally:
        soak.kill_daemon()
    code = soak.finish()
    shutil.rmtree(soak.source, ignore_errors=True)  # the big race layers; not needed after
    return code


if __name__ == "__main__":
    sys.exit(main())
