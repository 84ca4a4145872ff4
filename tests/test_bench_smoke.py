"""scripts/bench.py at a tiny size: a smoke test of the script, never of the times.

The benchmark's figures depend on the machine; this only proves that the script
runs end to end (store generation, init, deletes both ways, the daemon, umoci
when installed, the watcher script) and writes every figure's key to its JSON.
"""

from __future__ import annotations

import importlib.util
import json
import sqlite3
import subprocess
import sys
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.sqlite_only(
    "the benchmark reads its stores' SQLite files; its PostgreSQL figures name a database of their own"
)

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "bench.py"

SIZE_KEYS = {
    "images",
    "delete_batch_s",
    "delete_batch_index_writes",
    "delete_singles_extrapolated_s",
    "ratio_singles_vs_delete_batch",
    "prune_s",
    "prune_index_writes",
    "prune_singles_extrapolated_s",
    "ratio_singles_vs_prune",
    "roots",
    "tags",
    "blobs",
    "blob_bytes",
    "index_json_bytes",
    "init_s",
    "init_peak_rss_mb",
    "db_bytes",
    "sync_noop_median_s",
    "sync_floor_median_s",
    "ratio_sync_noop_vs_floor",
    "verify_s",
    "verify_files_per_s",
    "verify_ok",
    "verify_deep_s",
    "verify_deep_files_per_s",
    "verify_deep_ok",
    "sha256sum_s",
    "sha256sum_files_per_s",
    "verify_deep_vs_sha256sum",
    "du_s",
    "du_vs_verify",
    "du_cpu_vs_verify",
    "du_ref_median_ms",
    "du_html_s",
    "delete_lib_n",
    "delete_lib_median_ms",
    "delete_lib_p99_ms",
    "delete_lib_median_vs_1k",
    "delete_proc_direct_median_s",
    "daemon_ready_s",
    "daemon_idle_rss_mb",
    "daemon_fast_path",
    "delete_proc_daemon_median_s",
    "umoci_rm_gc_median_s",
    "umoci_gc_median_s",
    "ratio_umoci_vs_direct",
    "ratio_umoci_vs_daemon",
    "delete_floor_median_s",
    "ratio_daemon_vs_floor",
    "ratio_direct_vs_floor",
    "import_floor_median_s",
    "ratio_direct_vs_import_floor",
    "daemon_rss_deletes",
    "daemon_rss_after_deletes_mb",
    "ratio_daemon_rss_after_vs_idle",
    "group_clients",
    "group_all_median_s",
    "group_one_median_s",
    "ratio_group_vs_one",
}
MACHINE_KEYS = {"cpu", "cores", "ram_gb", "python", "sqlite", "disk"}
WATCH_KEYS = {
    *("single_p50_ms", "single_p99_ms", "burst_p50_ms", "burst_p99_ms"),
    *("deep_p50_ms", "deep_p99_ms", "deep_p99_ratio"),
}


def test_the_benchmark_runs_at_a_tiny_size_and_writes_every_figure(tmp_path: Path) -> None:
    results_path = tmp_path / "results.json"
    tiny = ["--sizes", "200", "--deletes", "10", "--process-deletes", "3"]
    short_watch = ["--watch-singles", "5", "--watch-burst", "20"]
    paths = ["--out", str(tmp_path / "bench"), "--json", str(results_path)]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny, *short_watch, *paths],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    results = json.loads(results_path.read_text())
    assert not MACHINE_KEYS - results["machine"].keys()
    assert list(results["sizes"]) == ["200"]
    size = results["sizes"]["200"]
    assert not SIZE_KEYS - size.keys()
    assert size["images"] == 200
    assert size["delete_lib_n"] == 10
    assert size["verify_ok"] and size["verify_deep_ok"]
    # many deletes, one rewrite: 100 tags in one call, and prune of img-10..img-99
    assert (size["delete_batch_tags"], size["delete_batch_index_writes"]) == (100, 1)
    assert (size["prune_tags"], size["prune_index_writes"]) == (90, 1)
    # the floor beside every whole-process delete, both ways; the daemon's figures
    assert size["delete_floor_n"] == 2 * 3
    assert (size["daemon_rss_deletes"], size["group_clients"]) == (10, 20)
    assert not WATCH_KEYS - results["watch"].keys()
    assert results["targets"]
    assert all(not {"issue", "target", "measured", "met"} - t.keys() for t in results["targets"])
    assert "| images" in done.stdout  # the table was printed


def _delete_floor() -> Any:
    spec = importlib.util.spec_from_file_location("delete_floor", SCRIPT.parent / "delete_floor.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("tag", ["first", "mid", "last"])
def test_the_delete_floor_cuts_exactly_the_entry_of_its_tag(tmp_path: Path, tag: str) -> None:
    """scripts/delete_floor.py leaves a valid index without that one entry (and no
    temporary file), and records the delete in its SQLite database."""
    ref = "org.opencontainers.image.ref.name"
    entries = [
        {"mediaType": "m", "digest": f"sha256:{i}", "size": 1, "annotations": {ref: name}}
        for i, name in enumerate(["first", "mid", "last"])
    ]
    untagged = {"mediaType": "m", "digest": "sha256:u", "size": 2}
    index = {"schemaVersion": 2, "manifests": [entries[0], untagged, *entries[1:]]}
    (tmp_path / "index.json").write_text(json.dumps(index, separators=(",", ":")))
    floor = _delete_floor()

    assert floor.main([str(tmp_path), tag]) == 0
    left = json.loads((tmp_path / "index.json").read_bytes())
    assert left["manifests"] == [
        e for e in index["manifests"] if e.get("annotations", {}).get(ref) != tag
    ]
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("floor.db")) == [
        "index.json"
    ]
    with closing(sqlite3.connect(tmp_path / "floor.db")) as db:
        assert db.execute("SELECT tag FROM deletes").fetchall() == [(tag,)]
    assert floor.main([str(tmp_path), tag]) == 1  # gone: nothing to cut
