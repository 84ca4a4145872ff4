"""`refcount --root DIR`: one OCI layout per repository under one directory (as zot
keeps them), each counted on its own; `watch --root` picks up repositories
created and removed while it runs."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import storekit as sk
from conftest import ON_POSTGRESQL, Cli, direct_env

from refcount import roots
from refcount.db.engine import SCHEMA_NAME

pytestmark = pytest.mark.sqlite_only(
    "a PostgreSQL run gives each test a schema of one database, and --root makes schemas of its "
    "own there; test_roots_postgres.py runs --root on PostgreSQL, a database per test"
)

DEADLINE = 20.0


def served_tags(root: Path) -> list[str]:
    return ["--root", str(root), "--repo", "lib/new", "--json", "tags"]


def wait_until(condition: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + DEADLINE
    while not (value := condition()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {DEADLINE} s waiting for {what}")
        time.sleep(0.05)
    return value


def repo_names(n: int) -> list[str]:
    """Flat, one-level and two-level nested names, as zot lays repositories out."""
    shapes = ("r{:02d}", "library/r{:02d}", "team/apps/r{:02d}")
    return [shapes[i % 3].format(i) for i in range(n)]


@pytest.fixture
def root50(tmp_path: Path, templates: list[Path]) -> Path:
    """50 repositories, copies of three templates: most have byte-identical twins."""
    root = tmp_path / "root"
    for i, name in enumerate(repo_names(50)):
        shutil.copytree(templates[i % 3], root / name, symlinks=True)
    return root


def listings(root: Path, *, include_refcount: bool = False) -> dict[str, Any]:
    return {r.name: sk.listing(r.path, include_refcount=include_refcount) for r in roots.find(root)}


def test_a_root_of_50_repositories_is_indexed_and_verified_clean_repository_by_repository(
    root50: Path, cli: Cli
) -> None:
    assert cli("--root", root50, "init").code == 0
    verified = cli("--json", "--root", root50, "verify")
    assert verified.code == 0, verified.err
    doc = verified.json()
    assert [r["repo"] for r in doc["repositories"]] == sorted(repo_names(50))
    assert all(r["report"]["ok"] and r["exit_code"] == 0 for r in doc["repositories"])
    for r in doc["repositories"]:  # each counted on its own: its own roots, its own database
        assert r["report"]["roots"] == len(sk.root_digests(root50 / r["repo"]))
        # (on a PostgreSQL run, a schema of the test's database: test_roots_postgres.py)
        own_file = (root50 / r["repo"] / ".refcount" / "refcount.db").is_file()
        assert own_file is not ON_POSTGRESQL
    tags = cli("--json", "--root", root50, "tags").json()
    first = next(r for r in tags["repositories"] if r["repo"] == "library/r01")
    assert [t["tag"] for t in first["report"]] == ["img-0", "img-1", "img-2", "img-3"]
    text = cli("--root", root50, "tags").out.splitlines()
    assert text[0].split() == ["REPO", "TAG", "DIGEST", "SIZE"]
    assert sum(line.startswith("team/apps/r02 ") for line in text) == 2


def test_deleting_a_tag_in_one_repository_never_touches_another_repositorys_files(
    root50: Path, cli: Cli
) -> None:
    assert cli("--root", root50, "init").code == 0
    before = listings(root50, include_refcount=True)
    target = root50 / "library" / "r04"  # twin of library/r01 and r07 (same template)
    entries = sk.read_index(target)["manifests"]
    [deleted_root] = [e["digest"] for e in entries if sk.tag_of(e) == "img-1"]
    exclusive = sk.closure(target, deleted_root) - set().union(
        *(sk.closure(target, e["digest"]) for e in entries if e["digest"] != deleted_root)
    )
    assert exclusive
    deleted = cli("--json", "--root", root50, "--repo", "library/r04", "delete", "tag", "img-1")
    assert deleted.code == 0, deleted.err
    [result] = deleted.json()["repositories"]
    assert result["repo"] == "library/r04"
    assert {b["digest"] for b in result["report"]["freed"]} == exclusive
    after = listings(root50, include_refcount=True)
    assert {k: v for k, v in after.items() if k != "library/r04"} == {
        k: v for k, v in before.items() if k != "library/r04"
    }
    assert not exclusive & sk.blob_files(target)
    assert exclusive <= sk.blob_files(root50 / "library" / "r01")  # the twin keeps its copies
    assert cli("--root", root50, "verify").code == 0


def test_delete_tag_across_the_root_deletes_it_where_it_is_and_a_tag_nowhere_changes_nothing(
    tmp_path: Path, templates: list[Path], cli: Cli
) -> None:
    root = tmp_path / "root"
    for name, template in (("a", templates[0]), ("b/c", templates[1]), ("d", templates[2])):
        shutil.copytree(template, root / name)
    before = listings(root)
    missing = cli("--root", root, "delete", "tag", "img-3", "nope")
    assert missing.code == 1
    assert "'nope': in no repository of 3; nothing was changed" in missing.err
    assert listings(root) == before
    deleted = cli("--json", "--root", root, "delete", "tag", "img-3")  # only b/c has img-3
    assert deleted.code == 0, deleted.err
    assert [r["repo"] for r in deleted.json()["repositories"]] == ["b/c"]
    assert listings(root)["a"] == before["a"]
    assert listings(root)["d"] == before["d"]
    assert "img-3" not in {sk.tag_of(e) for e in sk.read_index(root / "b" / "c")["manifests"]}


def test_a_damaged_repository_gives_its_error_and_the_worst_exit_code_and_the_rest_still_run(
    tmp_path: Path, templates: list[Path], cli: Cli
) -> None:
    root = tmp_path / "root"
    shutil.copytree(templates[0], root / "good")
    shutil.copytree(templates[1], root / "bad")
    assert cli("--root", root, "init").code == 0
    (root / "bad" / "index.json").write_text("{")  # a tool's write cut short
    init = cli("--root", root, "sync")
    assert init.code == 2
    assert init.out.startswith("good  roots +0 -0")
    before = listings(root)
    verified = cli("--json", "--root", root, "verify")
    assert verified.code == 2
    doc = {r["repo"]: r for r in verified.json()["repositories"]}
    assert doc["good"]["exit_code"] == 0 and doc["good"]["report"]["ok"]
    assert doc["bad"]["exit_code"] == 2 and "index.json" in doc["bad"]["error"]
    assert "refcount: error: bad: " in verified.err
    assert listings(root) == before


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--store", "{root}/a", "tags"], "--root and --store: give one"),
        (["--repo", "nothing", "tags"], "--repo 'nothing': no such repository"),
        (["--repo", "a", "watch"], "watch --root watches every repository"),
        (["watch", "--metrics-addr", "127.0.0.1:0"], "--metrics-addr with --root"),
        (["watch", "--run-dir", "{root}"], "--run-dir with --root"),
        (["--db", "sqlite:////tmp/x.db", "tags"], "--db with --root"),
        (["show", "img-0"], "show works on one repository: give --repo NAME"),
        (["delete", "manifest", "sha256:" + "0" * 64], "delete manifest works on one repo"),
    ],
)
def test_bad_root_options_exit_2_and_change_nothing(
    tmp_path: Path, templates: list[Path], cli: Cli, args: list[str], message: str
) -> None:
    root = tmp_path / "root"
    shutil.copytree(templates[0], root / "a")
    before = sk.listing(root, include_refcount=True)
    result = cli("--root", root, *[a.format(root=root) for a in args])
    assert result.code == 2, result.err
    assert message in result.err
    assert "Traceback" not in result.err
    assert sk.listing(root, include_refcount=True) == before


def test_a_root_without_layouts_and_repo_without_root_exit_2(tmp_path: Path, cli: Cli) -> None:
    empty = tmp_path / "empty"
    (empty / "x" / "blobs").mkdir(parents=True)
    before = sk.listing(empty, include_refcount=True)
    result = cli("--root", empty, "verify")
    assert result.code == 2
    assert "no repository (no directory with an oci-layout file within 8 levels)" in result.err
    assert sk.listing(empty, include_refcount=True) == before
    alone = cli("--store", empty, "--repo", "x", "tags")
    assert alone.code == 2
    assert "--repo NAME names a repository under --root DIR" in alone.err


def test_the_walk_finds_nested_layouts_and_never_follows_links_or_enters_blobs_or_state(
    tmp_path: Path,
) -> None:
    root = tmp_path / "root"
    for name in ("a", "a/b", "x/y/z", "a/blobs/inner", "a/.refcount/inner", "q/.refcount/r"):
        sk.make_layout(root / name)
    outside = sk.make_layout(tmp_path / "outside")
    (root / "link").symlink_to(outside)
    (root / "deep").mkdir()
    sk.make_layout(root.joinpath("deep", *"123456789"))  # 10 levels: past MAX_DEPTH
    sk.make_layout(root.joinpath("deep", *"1234567"))  # 8 levels: found
    names = [r.name for r in roots.find(root)]
    assert names == ["a", "a/b", "deep/1/2/3/4/5/6/7", "x/y/z"]
    with pytest.raises(roots.InvalidStore, match="not a directory"):
        roots.find(root / "link")


def test_watch_root_picks_up_a_repository_created_and_forgets_one_removed(
    tmp_path: Path, templates: list[Path]
) -> None:
    root = tmp_path / "root"
    shutil.copytree(templates[0], root / "a")
    shutil.copytree(templates[1], root / "lib" / "b")
    log_path = tmp_path / "watch.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-m", "refcount", "--root", str(root), "watch", "--debounce", "0.05"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _watching(proc, log_path, root, ["a", "lib/b"])
            shutil.copytree(templates[2], root / "lib" / "new")  # a copy, as a tool makes one
            _watching(proc, log_path, root, ["lib/new"])
            served = subprocess.run(
                [sys.executable, "-X", "importtime", "-m", "refcount", *served_tags(root)],
                capture_output=True,
                text=True,
                check=False,
            )
            assert served.returncode == 0, served.stderr
            imported = {
                line.rsplit("|", 1)[1].strip()
                for line in served.stderr.splitlines()
                if line.startswith("import time:")
            }
            assert "refcount.cli" not in imported  # the new repository's daemon answered
            [new] = json.loads(served.stdout)["repositories"]
            assert new["repo"] == "lib/new"
            assert {t["tag"] for t in new["report"]} == {"img-0", "img-1"}
            shutil.rmtree(root / "a")
            wait_until(lambda: "a: forgotten" in log_path.read_text(), "a forgotten")
            verified = cli_verify(root)
            assert verified.returncode == 0, verified.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(30) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert not (root / "lib" / "new" / ".refcount" / "refcount.sock").exists()


def _watching(proc: subprocess.Popen[bytes], log: Path, root: Path, names: list[str]) -> None:
    """Wait until each repository's daemon serves its socket and the daemons have
    applied `started` start-up reconciles (each daemon logs one; the socket is
    served from the daemon's start, before its first reconcile is done)."""
    for name in names:
        sock = root / name / ".refcount" / "refcount.sock"
        wait_until(lambda s=sock: s.exists() or proc.poll() is not None, f"{name}'s socket")
        assert proc.poll() is None, log.read_text()
    started = len(roots.find(root))
    wait_until(
        lambda: (
            log.read_text().count("full reconcile (start)") >= started or proc.poll() is not None
        ),
        f"{started} start-up reconciles",
    )
    assert proc.poll() is None, log.read_text()


def cli_verify(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--root", str(root), "verify"],
        capture_output=True,
        text=True,
        env=direct_env(),
        check=False,
    )


def test_databases_upgraded_at_once_on_threads_of_one_process_each_get_the_whole_schema(
    tmp_path: Path,
) -> None:
    """What `watch --root` does when it starts a daemon per fresh repository."""
    import threading

    from sqlalchemy import inspect

    from refcount.db.engine import current_revision, make_engine, upgrade
    from refcount.db.tables import SCHEMA_HEAD, metadata

    engines = [make_engine(f"sqlite:///{tmp_path / f'db{i}.sqlite'}") for i in range(6)]
    errors: list[BaseException] = []

    def migrate(engine: Any) -> None:
        try:
            upgrade(engine)
        except BaseException as exc:  # reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=migrate, args=(e,)) for e in engines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    for engine in engines:
        assert current_revision(engine) == SCHEMA_HEAD
        assert set(metadata.tables) <= set(inspect(engine).get_table_names())
        engine.dispose()


def test_schema_names_are_plain_identifiers_that_keep_lookalike_names_apart() -> None:
    names = ["a-b", "a_b", "a/b", "App", "app", "x" * 300, "déjà/vu", "-", "library/nginx"]
    made = [roots.schema_name(n) for n in names]
    assert len(set(made)) == len(names)
    for schema in made:
        assert SCHEMA_NAME.fullmatch(schema), schema
        assert schema.startswith(roots.SCHEMA_PREFIX)
        assert len(schema) <= 63
    assert roots.schema_name("library/nginx").startswith("rc_library_nginx_")
    assert roots.schema_name("library/nginx") == roots.schema_name("library/nginx")


@pytest.mark.parametrize(
    ("gone", "watched", "forget"),
    [(1, 3, True), (2, 4, True), (3, 4, False), (1, 1, False), (2, 2, False), (0, 5, False)],
)
def test_watch_root_forgets_schemas_unless_most_repositories_vanish_at_once(
    gone: int, watched: int, forget: bool
) -> None:
    assert roots.may_forget(gone, watched) is forget
