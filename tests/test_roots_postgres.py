"""`refcount --root DIR --db postgresql+psycopg://...`: every repository of a root in
one PostgreSQL database, each in a schema of its own (issue 12, "many repositories,
one database"). Each repository still counts on its own: a blob in two repositories is
two files and two counts, its writer lock is keyed by its own identity, and nothing
done to one repository reads or changes another's files or rows. Every test has a
database of its own (the `pg_url` fixture)."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pgkit
import pytest
import storekit as sk
from conftest import Cli, direct_env
from test_roots import _watching, listings, wait_until

from refcount import roots
from refcount.db.engine import SCHEMA_NAME, store_lock_key
from refcount.db.tables import SCHEMA_HEAD
from refcount.layout import identity_path

pytest.importorskip("psycopg", reason="psycopg is not installed (pip install psycopg)")

pytestmark = pytest.mark.postgres

REFCOUNT = (sys.executable, "-m", "refcount")
WAIT = 30.0  # seconds: a bound on waiting for other processes, never an expected duration
NAMES = ("app", "library/nginx", "library/nginx/debug", "team/apps/api", "twin")
"""Flat and nested names, `library/nginx` inside another repository's directory;
`twin` and `app` are byte-identical copies of one layout."""


@pytest.fixture
def root(tmp_path: Path, templates: list[Path]) -> Path:
    """The repositories of NAMES; `app` and `twin` are copies of one layout."""
    root = tmp_path / "root"
    for name, layout in zip(NAMES, (0, 1, 2, 1, 0), strict=True):
        shutil.copytree(templates[layout], root / name)
    return root


def schemas(url: str) -> set[str]:
    """The repository schemas in the database (information_schema)."""
    rows = pgkit.sql(
        url,
        "SELECT schema_name FROM information_schema.schemata WHERE schema_name LIKE %s",
        roots.SCHEMA_PREFIX + "%",
    )
    return {r[0] for r in rows}


def tables_in(url: str, schema: str) -> set[str]:
    rows = pgkit.sql(
        url, "SELECT table_name FROM information_schema.tables WHERE table_schema = %s", schema
    )
    return {r[0] for r in rows}


def counts(url: str, name: str) -> dict[str, tuple[int, str]]:
    """digest -> (count, state) of every blob row in the repository's schema."""
    schema = roots.schema_name(name)
    assert SCHEMA_NAME.fullmatch(schema)  # a plain identifier: safe in the statement
    rows = pgkit.sql(url, f"SELECT digest, count, state FROM {schema}.blobs")
    return {digest: (count, state) for digest, count, state in rows}


def test_each_repository_of_a_root_counts_in_a_schema_of_its_own_in_one_database(
    root: Path, pg_url: str, cli: Cli
) -> None:
    init = cli("--root", root, "--db", pg_url, "init")
    assert init.code == 0, init.err
    assert schemas(pg_url) == {roots.schema_name(n) for n in NAMES}
    for name in NAMES:  # the same revisions, Alembic's version row in the schema itself
        schema = roots.schema_name(name)
        assert {"alembic_version", "blobs", "edges", "roots"} <= tables_in(pg_url, schema)
        [(revision,)] = pgkit.sql(pg_url, f"SELECT version_num FROM {schema}.alembic_version")
        assert revision == SCHEMA_HEAD
        assert not (root / name / ".refcount" / "refcount.db").exists()
    assert tables_in(pg_url, "public") == set()
    # Twins: the same blobs, two files each, two counts, one in each schema.
    assert sk.blob_files(root / "app") == sk.blob_files(root / "twin")
    assert counts(pg_url, "app") == counts(pg_url, "twin")
    assert {count for count, _ in counts(pg_url, "app").values()} == {1}
    verified = cli("--json", "--root", root, "--db", pg_url, "verify")
    assert verified.code == 0, verified.err
    doc = verified.json()
    assert [r["repo"] for r in doc["repositories"]] == sorted(NAMES)
    for result in doc["repositories"]:
        assert result["exit_code"] == 0 and result["report"]["ok"]
        assert result["report"]["roots"] == len(sk.root_digests(root / result["repo"]))
    tags = cli("--json", "--root", root, "--db", pg_url, "tags").json()
    by_repo = {r["repo"]: [t["tag"] for t in r["report"]] for r in tags["repositories"]}
    assert by_repo["library/nginx"] == ["img-0", "img-1", "img-2", "img-3"]
    assert by_repo["library/nginx/debug"] == ["img-0", "img-1"]


def test_deleting_a_tag_in_one_repository_changes_no_other_repositorys_files_or_counts(
    root: Path, pg_url: str, cli: Cli
) -> None:
    assert cli("--root", root, "--db", pg_url, "init").code == 0
    files_before = listings(root, include_refcount=True)
    counts_before = {n: counts(pg_url, n) for n in NAMES}
    target = root / "app"  # `twin` holds byte-identical copies of every blob
    entries = sk.read_index(target)["manifests"]
    [deleted_root] = [e["digest"] for e in entries if sk.tag_of(e) == "img-1"]
    exclusive = sk.closure(target, deleted_root) - set().union(
        *(sk.closure(target, e["digest"]) for e in entries if e["digest"] != deleted_root)
    )
    assert exclusive

    deleted = cli(
        "--json", "--root", root, "--db", pg_url, "--repo", "app", "delete", "tag", "img-1"
    )

    assert deleted.code == 0, deleted.err
    [result] = deleted.json()["repositories"]
    assert {b["digest"] for b in result["report"]["freed"]} == exclusive
    assert not exclusive & sk.blob_files(target)
    assert all(counts(pg_url, "app")[d][0] == 0 for d in exclusive)
    files_after = listings(root, include_refcount=True)
    for name in NAMES:
        if name != "app":
            assert files_after[name] == files_before[name], name
            assert counts(pg_url, name) == counts_before[name], name
    assert exclusive <= sk.blob_files(root / "twin")  # the twin keeps its copies and counts
    assert cli("--root", root, "--db", pg_url, "verify").code == 0
    # Across the root, a tag is deleted where it is: img-3 is only in the layout of
    # library/nginx and team/apps/api.
    across = cli("--json", "--root", root, "--db", pg_url, "delete", "tag", "img-3")
    assert across.code == 0, across.err
    assert [r["repo"] for r in across.json()["repositories"]] == ["library/nginx", "team/apps/api"]
    assert cli("--root", root, "--db", pg_url, "verify").code == 0


def test_du_gc_and_prune_work_across_a_root_on_one_database(
    root: Path, pg_url: str, cli: Cli
) -> None:
    assert cli("--root", root, "--db", pg_url, "init").code == 0
    du = cli("--json", "--root", root, "--db", pg_url, "du")
    assert du.code == 0, du.err
    assert sorted(r["repo"] for r in du.json()["repositories"]) == sorted(NAMES)
    gc = cli("--root", root, "--db", pg_url, "gc", "--dry-run")
    assert gc.code == 0, gc.err
    before = {n: len(sk.root_digests(root / n)) for n in NAMES}
    pruned = cli(
        "--root", root, "--db", pg_url, "prune", "--older-than", "0", "--match", "img-0", "--yes"
    )
    assert pruned.code == 0, pruned.err
    for name in NAMES:  # every repository's img-0, and nothing else
        assert len(sk.root_digests(root / name)) == before[name] - 1, name
        assert "img-0" not in {sk.tag_of(e) for e in sk.read_index(root / name)["manifests"]}
    assert cli("--root", root, "--db", pg_url, "verify").code == 0


def test_a_repositorys_writer_lock_is_keyed_by_its_own_identity(
    root: Path, pg_url: str, cli: Cli
) -> None:
    """A writer of one repository waits for that repository's advisory lock only:
    `twin` (a byte-identical copy of `app`) is written while `app` is locked."""
    assert cli("--root", root, "--db", pg_url, "init").code == 0
    identity = identity_path(root / "app").read_text().strip()
    assert identity != identity_path(root / "twin").read_text().strip()
    other_host = pgkit.psycopg().connect(
        pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True
    )
    other_host.execute("SELECT pg_advisory_lock(%s)", (store_lock_key(identity),))
    outcome: list[subprocess.CompletedProcess[str]] = []

    def delete_in_app() -> None:
        outcome.append(refcount_cmd(root, pg_url, "--repo", "app", "delete", "tag", "img-0"))

    worker = threading.Thread(target=delete_in_app)
    try:
        worker.start()
        sk.wait_until(lambda: waiting_for_an_advisory_lock(pg_url), "app's delete to wait")
        twin = refcount_cmd(root, pg_url, "--repo", "twin", "delete", "tag", "img-0")
        assert twin.returncode == 0, twin.stderr
        assert worker.is_alive()  # still waiting for app's own lock
    finally:
        other_host.execute("SELECT pg_advisory_unlock(%s)", (store_lock_key(identity),))
        other_host.close()
        worker.join(WAIT)
    [app] = outcome
    assert app.returncode == 0, app.stderr
    assert "img-0" not in {sk.tag_of(e) for e in sk.read_index(root / "app")["manifests"]}
    assert cli("--root", root, "--db", pg_url, "verify").code == 0


def waiting_for_an_advisory_lock(url: str) -> bool:
    rows = pgkit.sql(
        url, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
    )
    return bool(rows[0][0])


def refcount_cmd(root: Path, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "refcount", "--root", str(root), "--db", url, *args],
        capture_output=True,
        text=True,
        env=direct_env(),
        timeout=120,
        check=False,
    )


def test_a_second_root_on_the_same_database_is_refused_for_a_repository_name_it_shares(
    root: Path, tmp_path: Path, templates: list[Path], pg_url: str, cli: Cli
) -> None:
    """One database per root: a schema records its repository's identity, so another
    root's `app` is refused (exit 2, nothing changed) instead of mixing counts."""
    assert cli("--root", root, "--db", pg_url, "init").code == 0
    other = tmp_path / "other"
    shutil.copytree(templates[0], other / "app")
    before = sk.listing(other, include_refcount=True)
    counts_before = counts(pg_url, "app")
    refused = cli("--root", other, "--db", pg_url, "init")
    assert refused.code == 2
    assert f"schema {roots.schema_name('app')} already counts the repository at" in refused.err
    assert "give each root its own database" in refused.err
    assert sk.listing(other, include_refcount=True) == before
    assert counts(pg_url, "app") == counts_before


def test_sqlite_db_with_root_is_refused_and_changes_nothing(
    root: Path, tmp_path: Path, cli: Cli
) -> None:
    before = sk.listing(root, include_refcount=True)
    refused = cli("--root", root, "--db", f"sqlite:///{tmp_path / 'all.db'}", "init")
    assert refused.code == 2
    assert "--db with --root must be a PostgreSQL URL (one schema per repository)" in refused.err
    assert sk.listing(root, include_refcount=True) == before
    assert not (tmp_path / "all.db").exists()


def test_watch_root_on_one_database_picks_up_new_repositories_and_drops_a_removed_ones_schema(
    tmp_path: Path, templates: list[Path], pg_url: str
) -> None:
    root = tmp_path / "root"
    for name, layout in (("a", 0), ("lib/b", 1), ("lib/c", 0)):
        shutil.copytree(templates[layout], root / name)
    log_path = tmp_path / "watch.log"
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [*REFCOUNT, "--root", str(root), "--db", pg_url, "watch", "--debounce", "0.05"],
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _watching(proc, log_path, root, ["a", "lib/b", "lib/c"])
            shutil.copytree(templates[2], root / "lib" / "new")  # a copy, as a tool makes one
            _watching(proc, log_path, root, ["lib/new"])
            served = served_tags(root, pg_url, "lib/new")
            assert {t["tag"] for t in served} == {"img-0", "img-1"}
            assert roots.schema_name("lib/new") in schemas(pg_url)

            shutil.rmtree(root / "a")
            dropped = f"a: schema {roots.schema_name('a')} dropped"
            wait_until(lambda: dropped in log_path.read_text(), "a's schema dropped")
            assert schemas(pg_url) == {roots.schema_name(n) for n in ("lib/b", "lib/c", "lib/new")}

            shutil.copytree(templates[1], root / "a")  # made again under the same name
            _watching(proc, log_path, root, ["a"])
            wait_until(  # _watching counts the first a's start-up reconcile too
                lambda: log_path.read_text().count("full reconcile (start)") >= 5,
                "the new a's start-up reconcile",
            )
            assert {t["tag"] for t in served_tags(root, pg_url, "a")} == {
                "img-0",
                "img-1",
                "img-2",
                "img-3",
            }
            verified = refcount_cmd(root, pg_url, "verify")
            assert verified.returncode == 0, verified.stdout + verified.stderr
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(WAIT) == 0, log_path.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
    assert schemas(pg_url) == {roots.schema_name(n) for n in ("a", "lib/b", "lib/c", "lib/new")}
    assert "Traceback" not in log_path.read_text()


def served_tags(root: Path, url: str, repo: str) -> list[Any]:
    """`tags` of one repository, answered by its daemon (the client forwards --db)."""
    args = ["--root", str(root), "--db", url, "--repo", repo, "--json", "tags"]
    served = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "refcount", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert served.returncode == 0, served.stderr
    imported = {
        line.rsplit("|", 1)[1].strip()
        for line in served.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "refcount.cli" not in imported  # the repository's daemon answered
    [result] = json.loads(served.stdout)["repositories"]
    assert result["repo"] == repo
    return list(result["report"])


def test_a_repository_schema_migrated_to_head_holds_exactly_the_models_and_nothing_outside(
    pg_url: str,
) -> None:
    """The same Alembic revisions, run in a schema: autogenerate finds nothing to do,
    both on the engine that created the schema and on a fresh one."""
    from alembic.autogenerate import compare_metadata
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    from refcount.db.engine import current_revision, make_engine, upgrade
    from refcount.db.models import Base

    schema = roots.schema_name("library/nginx")
    creator = make_engine(pg_url, schema=schema)
    fresh = make_engine(pg_url, schema=schema)
    try:
        assert current_revision(creator) is None  # no schema yet: nothing to read
        assert schemas(pg_url) == set()
        upgrade(creator)
        for engine in (creator, fresh):
            assert current_revision(engine) == SCHEMA_HEAD
            assert set(Base.metadata.tables) <= set(inspect(engine).get_table_names())
            with engine.connect() as connection:
                context = MigrationContext.configure(
                    connection, opts={"compare_type": True, "compare_server_default": True}
                )
                assert list(compare_metadata(context, Base.metadata)) == []
    finally:
        creator.dispose()
        fresh.dispose()
    assert schemas(pg_url) == {schema}
    assert tables_in(pg_url, "public") == set()


def test_a_repository_schema_is_the_search_path_of_each_transaction_never_of_the_session(
    pg_url: str,
) -> None:
    """Behind a pooler in transaction mode the next transaction of a connection may run
    on another server session: a setting left on the session would reach it."""
    from sqlalchemy import func, select

    from refcount.db.engine import make_engine, transaction

    schema = roots.schema_name("app")
    engine = make_engine(pg_url, schema=schema)
    try:
        with transaction(engine, write=False) as repo:
            inside = repo.connection.execute(select(func.current_setting("search_path")))
            assert inside.scalar() == schema
        raw = engine.raw_connection()  # the same pooled session, after the transaction
        try:
            cursor = raw.cursor()
            cursor.execute("SHOW search_path")
            assert schema not in cursor.fetchone()[0]
        finally:
            raw.close()
    finally:
        engine.dispose()


def test_only_a_schema_of_refcount_tables_is_ever_dropped(pg_url: str) -> None:
    from refcount.db.engine import drop_schema
    from refcount.errors import DatabaseError

    pgkit.sql(pg_url, "CREATE SCHEMA rc_theirs_0123456789ab")
    pgkit.sql(pg_url, "CREATE TABLE rc_theirs_0123456789ab.invoices (id int)")
    with pytest.raises(DatabaseError, match="holds tables refcount did not make"):
        drop_schema(pg_url, "rc_theirs_0123456789ab")
    with pytest.raises(DatabaseError, match="schema public: not a repository's schema"):
        drop_schema(pg_url, "public")
    assert schemas(pg_url) == {"rc_theirs_0123456789ab"}
    assert drop_schema(pg_url, "rc_absent_0123456789ab") is False
