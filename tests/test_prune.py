"""`prune`: retention by policy, through the same one-plan, one-rewrite path as `delete tag`.

The store: two repositories, `web` and `api`, and a tag `tools` of its own, whose
images share one base layer and each hold one layer of their own. Creation times
are set by hand, relative to now: in the manifest's annotation for most, in the
config's `created` for some, and for `tools` nowhere (it is then as old as
refcount's first sighting of it: the newest). Each expected set below is worked
out by hand from the table in `AGES`; the oracles for a real run are the dry
run's plan, `du`, the bytes that leave blobs/, `verify`, and `umoci gc`.
"""

from __future__ import annotations

import json
import os
import pty
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import storekit as sk
from conftest import SEVERAL_STORES, Cli
from hypothesis import given, settings
from hypothesis import strategies as st
from test_du import TAGS as DU_TAGS
from test_du import Image, random_store
from test_du import image as du_image

import refcount
from refcount.core.policyfile import parse as parse_policy
from refcount.core.replay import Graph, Replay
from refcount.core.retention import Budget, Candidate, MinFree, PrunePolicy, choose, repository
from refcount.db.engine import transaction
from refcount.errors import InvalidPolicy
from refcount.store import Store
from refcount.units import parse_percent, parse_size

NOW = datetime.now(UTC)
CREATED = "org.opencontainers.image.created"
BASE = b"B" * 4000  # in every image
# tag -> (days old, where the date is written)
AGES: dict[str, tuple[int, str]] = {
    "web:1.0": (100, "annotation"),
    "web:1.1": (70, "config"),
    "web:2.0": (20, "annotation"),
    "web:stable": (5, "annotation"),
    "api:1": (90, "config"),
    "api:2": (50, "annotation"),
    "api:3": (10, "annotation"),
    "tools": (0, "nowhere"),
}
OWN = {tag: (tag.encode() * 200)[: 300 + 100 * i] for i, tag in enumerate(AGES)}


def _created(days: int) -> str:
    return (NOW - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.%f123Z")  # nanoseconds


def build(store: Path) -> dict[str, sk.Descriptor]:
    made = {}
    for tag, (days, where) in AGES.items():
        config = {"architecture": "amd64", "os": "linux", "tag": tag}
        if where == "config":
            config["created"] = _created(days)
        annotations = {CREATED: _created(days)} if where == "annotation" else None
        made[tag] = sk.add_image(
            store,
            [BASE, OWN[tag]],
            tag=tag,
            config=json.dumps(config).encode(),
            annotations=annotations,
        )
    return made


@pytest.fixture
def two_repos(store: Path, cli: Cli) -> Path:
    build(store)
    assert cli("--store", store, "init").code == 0
    return store


def plan(cli: Cli, store: Path, *args: str) -> dict[str, Any]:
    ran = cli("--store", store, "--json", "prune", "--dry-run", *args)
    assert ran.code == 0, ran
    data: dict[str, Any] = ran.json()
    return data


def dry_run_chooses(cli: Cli, store: Path, args: list[str], expected: set[str]) -> dict[str, Any]:
    """The dry run's plan, once it is known to choose `expected` and change nothing."""
    before = sk.listing(store)
    report = plan(cli, store, *args)
    assert chosen(report) == expected
    assert report["dry_run"] is True
    assert sk.listing(store) == before
    return report


def chosen(report: dict[str, Any]) -> set[str]:
    return {c["tag"] for c in report["chosen"]}


def blob_bytes(store: Path) -> int:
    return sum(size for path, (size, _) in sk.listing(store).items() if path.startswith("blobs/"))


# --- each policy's plan, worked out by hand ---------------------------------------
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        # web's newest is web:stable (5 d), api's api:3; tools is a repository of its own
        (["--keep-last", "1"], {"web:1.0", "web:1.1", "web:2.0", "api:1", "api:2"}),
        (["--keep-last", "2"], {"web:1.0", "web:1.1", "api:1"}),
        (["--keep-last", "0"], set(AGES)),
        (["--older-than", "60d"], {"web:1.0", "web:1.1", "api:1"}),
        (["--older-than", "1000d"], set()),
        # older-than selects, keep-last keeps: api's two newest survive though 50 d old
        (["--older-than", "30d", "--keep-last", "2"], {"web:1.0", "web:1.1", "api:1"}),
        (["--older-than", "30d", "--keep-last", "3"], {"web:1.0"}),
        # the README's worked example
        (
            ["--older-than", "30d", "--keep-last", "2", "--exclude", "web:stable"],
            {"web:1.0", "api:1"},
        ),
        (["--older-than", "15d", "--match", "api:*"], {"api:1", "api:2"}),
        # web:stable is excluded and takes no keep slot: web:2.0 is web's newest left
        (
            ["--keep-last", "1", "--match", "web:*", "--exclude", "web:stable"],
            {"web:1.0", "web:1.1"},
        ),
        (["--keep-last", "1", "--exclude", "web:*"], {"api:1", "api:2"}),
        (
            ["--older-than", "1d", "--match", "web:1.*", "--match", "api:1"],
            {"web:1.0", "web:1.1", "api:1"},
        ),
    ],
)
def test_each_policy_dry_run_lists_exactly_the_tags_worked_out_by_hand(
    cli: Cli, two_repos: Path, args: list[str], expected: set[str]
) -> None:
    dry_run_chooses(cli, two_repos, args, expected)


def test_creation_times_come_from_the_annotation_the_config_or_the_first_sighting(
    cli: Cli, two_repos: Path
) -> None:
    report = plan(cli, two_repos, "--keep-last", "0")
    sources = {c["tag"]: c["created_from"] for c in report["chosen"]}
    assert sources == {
        tag: {"nowhere": "first-seen"}.get(where, where) for tag, (_, where) in AGES.items()
    }
    # oldest first: the deletion order
    assert [c["tag"] for c in report["chosen"]] == sorted(AGES, key=lambda t: -AGES[t][0])


def test_a_real_prune_removes_exactly_the_planned_set_and_frees_what_du_predicted(
    cli: Cli, two_repos: Path
) -> None:
    store = two_repos
    args = ["--older-than", "30d", "--keep-last", "2"]
    dry = plan(cli, store, *args)
    du = {u["tag"]: u["exclusive"] for u in cli("--store", store, "--json", "du").json()["tags"]}
    on_disk = blob_bytes(store)

    ran = cli("--store", store, "--trash-ttl", "0", "--json", "prune", *args)

    assert ran.code == 0, ran
    real = ran.json()
    assert chosen(real) == chosen(dry) == {"web:1.0", "web:1.1", "api:1"}
    assert real["removed"] == dry["removed"]
    assert {b["digest"] for b in real["freed"]} == {b["digest"] for b in dry["freed"]}
    # the images share only the base layer, which survivors hold: exclusive bytes add up
    assert real["freed_bytes"] == sum(du[t] for t in chosen(dry))
    assert on_disk - blob_bytes(store) == real["freed_bytes"]
    tags = {t["tag"] for t in cli("--store", store, "--json", "tags").json()}
    assert tags == set(AGES) - chosen(dry)
    assert sk.blob_path(store, sk.sha256_digest(BASE)).is_file()
    assert cli("--store", store, "verify").code == 0
    assert sk.blob_files(store) == sk.reachable(store)


def test_umoci_gc_after_a_prune_finds_nothing_left_to_remove(cli: Cli, two_repos: Path) -> None:
    sk.need_tool("umoci")
    store = two_repos
    assert cli("--store", store, "--trash-ttl", "0", "prune", "--keep-last", "1").code == 0
    before = sk.blob_files(store)
    sk.run(["umoci", "gc", "--layout", str(store)])
    assert sk.blob_files(store) == before
    assert cli("--store", store, "verify").code == 0


def test_the_shared_base_layer_survives_until_the_last_image_goes(
    cli: Cli, two_repos: Path
) -> None:
    store = two_repos
    base = sk.blob_path(store, sk.sha256_digest(BASE))
    ran = cli(
        "--store",
        store,
        "--trash-ttl",
        "0",
        "--json",
        "prune",
        "--keep-last",
        "0",
        "--exclude",
        "tools",
    )
    assert ran.code == 0, ran
    assert base.is_file()
    assert sk.sha256_digest(BASE) not in {b["digest"] for b in ran.json()["freed"]}
    last = cli("--store", store, "--trash-ttl", "0", "--json", "prune", "--keep-last", "0")
    assert sk.sha256_digest(BASE) in {b["digest"] for b in last.json()["freed"]}
    assert not base.exists()


def test_a_prune_rewrites_index_json_once(
    cli: Cli, two_repos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    writes: list[int] = []
    original = Store.replace_index

    def counted(self: Store, data: bytes, expected_hash: str) -> str:
        writes.append(len(data))
        return original(self, data, expected_hash)

    monkeypatch.setattr(Store, "replace_index", counted)
    ran = cli("--store", two_repos, "--json", "prune", "--keep-last", "1")
    assert ran.code == 0, ran
    assert len(ran.json()["removed"]) == 5
    assert len(writes) == 1


def test_a_second_prune_reads_no_manifest_for_creation_times(
    cli: Cli, two_repos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: list[str] = []
    original = Store.read_blob

    def counted(self: Store, digest: str) -> bytes | None:
        reads.append(digest)
        return original(self, digest)

    monkeypatch.setattr(Store, "read_blob", counted)
    first = plan(cli, two_repos, "--keep-last", "1")
    assert len(reads) >= len(AGES)  # every root manifest, and the configs some need
    reads.clear()
    second = plan(cli, two_repos, "--keep-last", "1")
    assert reads == []
    assert second["chosen"] == first["chosen"]


# --- unused for: the last use, or the first sighting of a tag never used ----------------
# tag -> days since its last use (`refcount touch`, written through the library);
# None: never touched, so used when refcount first saw it (at init, now).
USED: dict[str, int | None] = {
    "web:1.0": 2,
    "web:1.1": 40,
    "web:2.0": None,
    "web:stable": 100,
    "api:1": None,
    "api:2": 45,
    "api:3": 1,
    "tools": 60,
}


def touch_at(store: Path, used: dict[str, datetime]) -> None:
    """Record each tag's last use at the given time, as `refcount touch` does."""
    with refcount.open(store) as rc, transaction(rc.engine) as repo:
        for name, at in used.items():
            repo.touch([name], at)


@pytest.fixture
def used(two_repos: Path) -> Path:
    touch_at(two_repos, {t: NOW - timedelta(days=d) for t, d in USED.items() if d is not None})
    return two_repos


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["--unused-for", "30d"], {"web:1.1", "web:stable", "api:2", "tools"}),
        (["--unused-for", "50d"], {"web:stable", "tools"}),
        (["--unused-for", "1000d"], set()),
        # keep-last keeps the newest by creation: web:stable, api:3, tools
        (["--unused-for", "30d", "--keep-last", "1"], {"web:1.1", "api:2"}),
        (["--unused-for", "30d", "--exclude", "web:*"], {"api:2", "tools"}),
        # web:stable excluded takes no slot: web:2.0 is web's newest eligible, kept
        (
            ["--unused-for", "30d", "--keep-last", "1", "--exclude", "web:stable"],
            {"web:1.1", "api:2"},
        ),
        (["--unused-for", "30d", "--match", "web:*"], {"web:1.1", "web:stable"}),
    ],
)
def test_unused_for_selects_the_tags_whose_last_use_is_older_worked_out_by_hand(
    cli: Cli, used: Path, args: list[str], expected: set[str]
) -> None:
    report = dry_run_chooses(cli, used, args, expected)
    assert {c["reason"] for c in report["chosen"]} <= {"unused-for"}


def test_unused_for_and_older_than_together_each_name_the_rule_that_chose(
    cli: Cli, used: Path
) -> None:
    report = plan(cli, used, "--unused-for", "30d", "--older-than", "60d")
    reasons = {c["tag"]: c["reason"] for c in report["chosen"]}
    # older than 60 d: web:1.0, web:1.1, api:1; unused for 30 d: web:1.1, web:stable, api:2, tools
    assert reasons == {
        "web:1.0": "older-than",
        "web:1.1": "older-than",
        "api:1": "older-than",
        "web:stable": "unused-for",
        "api:2": "unused-for",
        "tools": "unused-for",
    }


def test_a_tag_never_touched_counts_as_used_when_refcount_first_saw_it(
    cli: Cli, two_repos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    later = NOW + timedelta(days=200)  # refcount first saw every root at init, about NOW
    touch_at(
        two_repos,
        {"web:stable": NOW - timedelta(days=100), "api:3": later - timedelta(days=10)},
    )
    monkeypatch.setattr("refcount.core.refcounter.now", lambda: later)
    # first seen 200 days before `later`: unused for 100 d, not for 250 d
    assert chosen(plan(cli, two_repos, "--unused-for", "100d")) == set(AGES) - {"api:3"}
    assert chosen(plan(cli, two_repos, "--unused-for", "250d")) == {"web:stable"}


def test_a_real_prune_by_unused_for_removes_exactly_the_planned_set(cli: Cli, used: Path) -> None:
    args = ["--unused-for", "30d", "--keep-last", "1"]
    dry = plan(cli, used, *args)
    on_disk = blob_bytes(used)
    ran = cli("--store", used, "--trash-ttl", "0", "--json", "prune", *args)
    assert ran.code == 0, ran
    real = ran.json()
    assert chosen(real) == chosen(dry) == {"web:1.1", "api:2"}
    assert {b["digest"] for b in real["freed"]} == {b["digest"] for b in dry["freed"]}
    assert on_disk - blob_bytes(used) == real["freed_bytes"] > 0
    tags = {t["tag"] for t in cli("--store", used, "--json", "tags").json()}
    assert tags == set(AGES) - {"web:1.1", "api:2"}
    with refcount.open(used) as rc:
        assert set(rc.last_used(AGES)) == {t for t, d in USED.items() if d is not None} - {
            "web:1.1",
            "api:2",
        }
    assert cli("--store", used, "verify").code == 0


def test_the_policy_files_unused_for_means_what_the_flag_means(cli: Cli, used: Path) -> None:
    path = write_policy(used, 'unused_for = "30d"\nkeep_last = 1\n')
    report = plan(cli, used)
    assert report["policy_file"] == str(path)
    assert chosen(report) == chosen(plan(cli, used, "--unused-for", "30d", "--keep-last", "1"))
    assert chosen(report) == {"web:1.1", "api:2"}


# --- budgets ---------------------------------------------------------------------------
def oldest_first(store: Path, cli: Cli) -> list[tuple[str, int]]:
    du = {u["tag"]: u["exclusive"] for u in cli("--store", store, "--json", "du").json()["tags"]}
    return [(t, du[t]) for t in sorted(AGES, key=lambda t: -AGES[t][0])]


def test_max_size_stops_at_the_first_tag_that_brings_live_bytes_within_it(
    cli: Cli, two_repos: Path
) -> None:
    store = two_repos
    live = cli("--store", store, "--json", "du").json()["live"]
    order = oldest_first(store, cli)
    three = sum(size for _, size in order[:3])
    exactly = plan(cli, store, "--max-size", str(live - three))
    assert [c["tag"] for c in exactly["chosen"]] == [t for t, _ in order[:3]]
    assert exactly["budget_met"] is True
    one_more = plan(cli, store, "--max-size", str(live - three - 1))
    assert [c["tag"] for c in one_more["chosen"]] == [t for t, _ in order[:4]]
    assert plan(cli, store, "--max-size", str(live))["chosen"] == []

    ran = cli(
        "--store", store, "--trash-ttl", "0", "--json", "prune", "--max-size", str(live - three)
    )
    assert ran.code == 0, ran
    after = cli("--store", store, "--json", "du").json()["live"]
    assert after == live - three


def test_max_size_never_deletes_what_keep_last_keeps_and_says_when_unreachable(
    cli: Cli, two_repos: Path
) -> None:
    report = plan(cli, two_repos, "--max-size", "0", "--keep-last", "1")
    assert chosen(report) == {"web:1.0", "web:1.1", "web:2.0", "api:1", "api:2"}
    assert report["budget_met"] is False
    text = cli("--store", two_repos, "prune", "--dry-run", "--max-size", "0", "--keep-last", "1")
    assert "still over budget" in text.out


def test_min_free_takes_the_oldest_tags_until_the_filesystem_would_have_enough_free(
    cli: Cli, two_repos: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = two_repos
    order = oldest_first(store, cli)
    monkeypatch.setattr(Store, "free_space", lambda self: (10_000, 1_000_000))
    two = order[0][1] + order[1][1]
    report = plan(cli, store, "--min-free", str(10_000 + two))
    assert [c["tag"] for c in report["chosen"]] == [t for t, _ in order[:2]]
    assert {c["reason"] for c in report["chosen"]} == {"min-free"}
    # 1% of 1,000,000 is 10,000: free already
    assert plan(cli, store, "--min-free", "1%")["chosen"] == []
    pct = (10_000 + two) / 1_000_000 * 100
    assert len(plan(cli, store, "--min-free", f"{pct}%")["chosen"]) == 2


def test_min_free_reads_the_real_filesystem(cli: Cli, two_repos: Path) -> None:
    assert plan(cli, two_repos, "--min-free", "0")["chosen"] == []
    everything = plan(cli, two_repos, "--min-free", "100%", "--exclude", "tools")
    assert chosen(everything) == set(AGES) - {"tools"}
    assert everything["budget_met"] is False


# --- untagged entries --------------------------------------------------------------------
def test_untagged_selects_loose_entries_and_keeps_platform_manifests_and_referrers(
    cli: Cli, store: Path
) -> None:
    app = sk.add_image(store, [BASE, b"app"], tag="app:1")
    amd = sk.add_image(store, [b"amd"], tag=None, index_entry=False)
    multi = sk.add_index(store, [amd], tag="multi:1")
    sk.add_entry(store, amd)  # a platform manifest listed untagged (needed)
    sbom = sk.add_referrer(store, app)  # a referrer of app (needed)
    loose = sk.add_image(store, [b"left behind by skopeo"], tag=None)
    assert cli("--store", store, "init").code == 0
    assert multi and sbom

    young = plan(cli, store, "--untagged")  # the grace period (1 h) protects it
    assert young["chosen"] == []
    report = cli("--store", store, "--grace", "0", "--json", "prune", "--untagged")
    assert report.code == 0, report
    assert [(c["tag"], c["digest"]) for c in report.json()["chosen"]] == [(None, loose["digest"])]
    roots = sk.root_digests(store)
    assert loose["digest"] not in roots
    assert amd["digest"] in roots and sbom["digest"] in roots
    assert cli("--store", store, "verify").code == 0


# --- the policy file ----------------------------------------------------------------------
def write_policy(store: Path, text: str) -> Path:
    path = store / ".refcount" / "policy.toml"
    path.write_text(text)
    return path


def test_prune_without_flags_applies_the_policy_file_and_flags_replace_it(
    cli: Cli, two_repos: Path
) -> None:
    path = write_policy(two_repos, 'keep_last = 1\nmatch = ["web:*"]\nexclude = "web:stable"\n')
    report = plan(cli, two_repos)
    assert chosen(report) == {"web:1.0", "web:1.1"}
    assert report["policy_file"] == str(path)
    assert chosen(plan(cli, two_repos, "--older-than", "60d")) == {"web:1.0", "web:1.1", "api:1"}


def test_every_key_of_the_policy_file_means_what_its_flag_means() -> None:
    text = (
        'keep_last = 2\nolder_than = "30d"\nunused_for = "90d"\nmatch = ["a:*", "b"]\nexclude = "a:keep"\n'
        'untagged = true\nmax_size = "10G"\nmin_free = "15%"\n'
    )
    assert parse_policy(text.encode(), "p.toml") == PrunePolicy(
        keep_last=2,
        older_than=timedelta(days=30),
        unused_for=timedelta(days=90),
        match=("a:*", "b"),
        exclude=("a:keep",),
        untagged=True,
        max_size=10 << 30,
        min_free=MinFree(fraction=0.15),
    )
    assert parse_policy(b"min_free = 1000\nmax_size = 5", "p.toml") == PrunePolicy(
        max_size=5, min_free=MinFree(bytes=1000)
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep_last = 1\nkeep_lats = 2\n", ":2: keep_lats: unknown key"),
        ("keep_last = 1\nolder_than = 30d\n", ":2: not TOML: "),
        ('older_than = "-3d"\n', ":1: older_than '-3d': invalid duration"),
        ('keep_last = 1\nunused_for = "soon"\n', ":2: unused_for 'soon': invalid duration"),
        ("unused_for = 30\n", ":1: unused_for: 30: not a string"),
        ('max_size = "lots"\n', ":1: max_size 'lots': invalid size"),
        ("keep_last = -1\n", ":1: keep_last: -1: not a whole number"),
        ('untagged = "yes"\n', ":1: untagged: 'yes': not true or false"),
        ("[prune]\nkeep_last = 1\n", ":1: prune: unknown key"),
    ],
)
def test_a_bad_policy_file_is_exit_2_naming_file_line_and_key_and_prunes_nothing(
    cli: Cli, two_repos: Path, text: str, message: str
) -> None:
    path = write_policy(two_repos, text)
    before = sk.listing(two_repos)
    ran = cli("--store", two_repos, "prune", "--yes")
    assert ran.code == 2, ran
    assert ran.err.startswith(f"refcount: error: {path}{message}"), ran.err
    assert len(ran.err.strip().splitlines()) == 1
    assert sk.listing(two_repos) == before


def test_a_policy_file_that_is_a_link_is_not_followed(
    cli: Cli, two_repos: Path, tmp_path: Path
) -> None:
    outside = tmp_path / "outside.toml"
    outside.write_text("keep_last = 0\n")
    (two_repos / ".refcount" / "policy.toml").symlink_to(outside)
    before = sk.listing(two_repos)
    ran = cli("--store", two_repos, "prune")
    assert ran.code == 2
    assert "symbolic link; not followed" in ran.err
    assert sk.listing(two_repos) == before


# --- bad input --------------------------------------------------------------------------
def test_a_glob_that_matches_nothing_is_nothing_to_prune(cli: Cli, two_repos: Path) -> None:
    before = sk.listing(two_repos)
    ran = cli("--store", two_repos, "prune", "--keep-last", "0", "--match", "nosuch:*")
    assert (ran.code, ran.out) == (0, "nothing to prune\n")
    assert sk.listing(two_repos) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max-size", "-1G"], "--max-size '-1G': invalid size"),
        (["--max-size", "10X"], "--max-size '10X': invalid size"),
        (["--min-free", "-5%"], "--min-free '-5%': invalid percentage"),
        (["--min-free", "150%"], "--min-free '150%': invalid percentage"),
        (["--older-than", "-30d"], "--older-than '-30d': invalid duration"),
        (["--unused-for", "-30d"], "--unused-for '-30d': invalid duration"),
        (["--unused-for", "3 weeks"], "--unused-for '3 weeks': invalid duration"),
        (["--older-than", "a month"], "--older-than 'a month': invalid duration"),
        (["--keep-last", "-1"], "--keep-last: -1: not a whole number"),
        (["--keep-last", "two"], "Invalid value for '--keep-last'"),
        (["--match", "web:*"], "nothing selects tags"),
        ([], "no policy: give --keep-last"),
    ],
)
def test_bad_sizes_durations_and_counts_are_exit_2_and_change_nothing(
    cli: Cli, two_repos: Path, args: list[str], message: str
) -> None:
    before = sk.listing(two_repos, include_refcount=False)
    ran = cli("--store", two_repos, "prune", "--yes", *args)
    assert ran.code == 2, ran
    assert message in ran.err
    assert len(ran.err.strip().splitlines()) == 1
    assert sk.listing(two_repos) == before


# --- confirmation on a terminal -------------------------------------------------------
def prune_on_a_terminal(store: Path, answer: bytes, *args: str) -> subprocess.CompletedProcess[str]:
    """`refcount prune ARGS` with stdin a real terminal (a pty), answering `answer`."""
    leader, follower = pty.openpty()
    try:
        os.write(leader, answer)
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "refcount",
                "--store",
                str(store),
                "--trash-ttl",
                "0",
                "prune",
                *args,
            ],
            stdin=follower,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    finally:
        os.close(follower)
        os.close(leader)


def test_on_a_terminal_answering_no_deletes_nothing(two_repos: Path) -> None:
    before = sk.listing(two_repos)
    ran = prune_on_a_terminal(two_repos, b"n\n", "--keep-last", "1")
    assert ran.returncode == 1, ran
    assert "would prune 5 entries" in ran.stdout
    assert "Prune these?" in ran.stderr
    assert "prune cancelled; nothing deleted" in ran.stderr
    assert sk.listing(two_repos) == before


def test_on_a_terminal_answering_yes_prunes_the_plan_shown(two_repos: Path) -> None:
    ran = prune_on_a_terminal(two_repos, b"y\n", "--keep-last", "1")
    assert ran.returncode == 0, ran
    assert "would prune 5 entries" in ran.stdout and "pruned 5 entries" in ran.stdout
    left = {sk.tag_of(e) for e in sk.read_index(two_repos)["manifests"]}
    assert left == {"web:stable", "api:3", "tools"}


def test_without_a_terminal_a_prune_proceeds_unasked(two_repos: Path) -> None:
    ran = subprocess.run(
        [sys.executable, "-m", "refcount", "--store", str(two_repos), "prune", "--keep-last", "1"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert ran.returncode == 0, ran
    assert "pruned 5 entries" in ran.stdout and "Prune these?" not in ran.stderr


# --- the library --------------------------------------------------------------------------
def test_the_library_prunes_with_a_typed_policy(two_repos: Path) -> None:
    with refcount.open(two_repos) as rc:
        dry = rc.prune(refcount.PrunePolicy(older_than=timedelta(days=60)), dry_run=True)
        assert isinstance(dry, refcount.PruneReport)
        assert {c.tag for c in dry.chosen} == {"web:1.0", "web:1.1", "api:1"}
        with pytest.raises(refcount.ConcurrentChange):
            rc.prune(refcount.PrunePolicy(older_than=timedelta(days=60)), expect=["web:1.0"])
        assert len(rc.tags()) == len(AGES)
        real = rc.prune(refcount.PrunePolicy(older_than=timedelta(days=60)))
        assert real.freed_bytes == dry.freed_bytes
    with pytest.raises(InvalidPolicy):
        PrunePolicy(keep_last=-1)


# --- the rules alone (retention.choose, no store) ------------------------------------------
def tag(name: str, days: float) -> Candidate:
    return Candidate(name, "sha256:" + "0" * 64, NOW - timedelta(days=days), "annotation")


@pytest.fixture
def counted() -> Callable[[int], Budget]:
    """A budget of `live` bytes where every tag frees 100."""

    def make(live: int) -> Budget:
        return Budget(live=live, free=0, total=0, frees=lambda c: 100)

    return make


def test_rules_keep_last_alone_selects_the_rest_of_each_repository() -> None:
    tags = [tag("a:1", 3), tag("a:2", 2), tag("a:3", 1), tag("b:1", 9), tag("c", 5)]
    result, met = choose(tags, PrunePolicy(keep_last=1), NOW, grace=timedelta(0))
    assert [c.candidate.tag for c in result] == ["a:1", "a:2"]
    assert met is None


def test_rules_a_budget_stops_at_the_first_tag_within_it(
    counted: Callable[[int], Budget],
) -> None:
    tags = [tag(f"a:{i}", 10 - i) for i in range(6)]
    result, met = choose(
        tags, PrunePolicy(max_size=750), NOW, grace=timedelta(0), budget=counted(1000)
    )
    assert [c.candidate.tag for c in result] == ["a:0", "a:1", "a:2"]  # 1000 - 300 <= 750
    assert met is True
    result, met = choose(
        tags,
        PrunePolicy(max_size=0, keep_last=2),
        NOW,
        grace=timedelta(0),
        budget=counted(1000),
    )
    assert [c.candidate.tag for c in result] == ["a:0", "a:1", "a:2", "a:3"]
    assert met is False


def test_rules_older_than_and_budget_choices_are_counted_once() -> None:
    calls: list[str] = []

    def frees(c: Candidate) -> int:
        calls.append(c.key)
        return 100

    tags = [tag("a:1", 40), tag("a:2", 35), tag("a:3", 1), tag("a:4", 0.5)]
    result, met = choose(
        tags,
        PrunePolicy(older_than=timedelta(days=30), max_size=150),
        NOW,
        grace=timedelta(0),
        budget=Budget(400, 0, 0, frees),
    )
    assert [(c.candidate.tag, str(c.reason)) for c in result] == [
        ("a:1", "older-than"),
        ("a:2", "older-than"),
        ("a:3", "max-size"),
    ]
    assert calls == ["a:1", "a:2", "a:3"] and met is True


@pytest.mark.parametrize(
    ("name", "repo"),
    [("web:1.0", "web"), ("registry:5000/web:1.0", "registry:5000/web"), ("latest", "latest")],
)
def test_a_repository_is_the_tag_before_its_last_colon(name: str, repo: str) -> None:
    assert repository(name) == repo


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("1048576", 1 << 20),
        ("512K", 512 << 10),
        ("500MiB", 500 << 20),
        ("10G", 10 << 30),
        ("10g", 10 << 30),
        ("2GB", 2 * 10**9),
        ("1.5TiB", int(1.5 * (1 << 40))),
        ("100B", 100),
        ("0", 0),
    ],
)
def test_sizes_read_binary_unless_written_as_si_bytes(text: str, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["-1", "1X", "", "G", "1 GiBs", "5iB", "1e9"])
def test_malformed_sizes_are_refused(text: str) -> None:
    with pytest.raises(refcount.InvalidSize):
        parse_size(text)


def test_percentages_are_fractions_from_0_to_100() -> None:
    assert parse_percent("15%") == 0.15
    with pytest.raises(refcount.InvalidSize):
        parse_percent("101%")


def test_on_a_terminal_under_json_the_plan_goes_to_stderr_and_stdout_is_one_document(
    two_repos: Path,
) -> None:
    ran = prune_on_a_terminal(two_repos, b"y\n", "--keep-last", "1", "--json")
    assert ran.returncode == 0, ran
    report = json.loads(ran.stdout)
    assert report["dry_run"] is False
    assert chosen(report) == {"web:1.0", "web:1.1", "web:2.0", "api:1", "api:2"}
    assert "would prune 5 entries" in ran.stderr


@pytest.mark.sqlite_only(SEVERAL_STORES)
@settings(max_examples=25)
@given(
    images=st.lists(du_image, min_size=1, max_size=5),
    index=st.none() | st.tuples(st.sampled_from(DU_TAGS), st.booleans()),
    order=st.permutations(DU_TAGS),
    take=st.integers(1, len(DU_TAGS)),
    keep=st.booleans(),
)
def test_deletes_replayed_one_by_one_free_what_one_batch_delete_frees(
    images: list[Image],
    index: tuple[str, bool] | None,
    order: list[str],
    take: int,
    keep: bool,
) -> None:
    """The budgets' prediction (replay.Replay, tag after tag) is the planner's batch."""
    path = Path(tempfile.mkdtemp(prefix="refcount-prune-"))
    try:
        store = random_store(path / "store", images, index)
        with refcount.open(store, keep_untagged=keep, keep_referrers=keep) as rc:
            rc.init()
            present = {t.tag for t in rc.tags()}
            chosen_tags = [t for t in order if t in present][:take]
            if not chosen_tags:
                return
            with transaction(rc.engine, write=False) as repo:
                replay = Replay(Graph.load(repo), rc.policy)
            steps = [replay.delete_tag(t) for t in chosen_tags]
            batch = rc.delete_tags(chosen_tags, dry_run=True)
            assert set().union(*steps) == {b.digest for b in batch.freed}
            assert sum(len(s) for s in steps) == len(batch.freed)  # each blob freed once
            assert sorted(r.digest for r in replay.removed.values()) == sorted(
                e.digest for e in batch.removed
            )
    finally:
        shutil.rmtree(path, ignore_errors=True)
