"""The command line's contract: exit codes, one-line errors, reports, and no data lost on bad input."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ON_POSTGRESQL, Cli, direct_env
from storekit import (
    add_image,
    add_index,
    add_referrer,
    blob_files,
    listing,
    reachable,
    read_index,
    remove_entries,
    tag_of,
)


@pytest.fixture
def images(store: Path) -> Path:
    base = b"base"
    add_image(store, [base, b"a"], tag="a", config=b'{"a":1}')
    add_image(store, [base, b"b"], tag="b", config=b'{"b":1}')
    return store


def one_error_line(err: str, *needles: str) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("refcount: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    assert "Traceback" not in err


def test_delete_tag_prints_what_it_removed_and_freed(cli: Cli, images: Path) -> None:
    assert cli("--store", images, "init").code == 0
    result = cli("--store", images, "delete", "tag", "a")
    assert result.code == 0
    assert result.out.startswith("removed 1 index.json entry:\n  a  sha256:")
    assert "freed 3 blobs" in result.out
    assert [tag_of(e) for e in read_index(images)["manifests"]] == ["b"]
    assert cli("--store", images, "verify").code == 0


def test_json_reports_are_one_document(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    report = json.loads(cli("--store", images, "--json", "delete", "tag", "a", "--dry-run").out)
    assert report["dry_run"] is True and [e["tag"] for e in report["removed"]] == ["a"]
    assert len(report["freed"]) == 3 and report["freed_bytes"] == sum(
        b["size"] for b in report["freed"]
    )
    verify = json.loads(cli("--store", images, "--json", "verify").out)
    assert verify["ok"] is True and verify["roots"] == 2
    tags = json.loads(cli("--store", images, "--json", "tags").out)
    assert [t["tag"] for t in tags] == ["a", "b"]
    show = json.loads(cli("--store", images, "--json", "show", "a").out)
    assert show["count"] == 1 and show["tags"] == ["a"]


def test_store_and_database_come_from_the_environment(
    cli: Cli, images: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "elsewhere.db"
    monkeypatch.setenv("REFCOUNT_STORE", str(images))
    monkeypatch.setenv("REFCOUNT_DB", f"sqlite:///{db}")
    assert cli("init").code == 0
    assert db.exists() and not (images / ".refcount" / "refcount.db").exists()
    assert cli("tags").out.count("sha256:") == 2


def test_verify_exits_1_and_names_a_missing_blob(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    layer = json.loads(cli("--store", images, "--json", "show", "a").out)["children"][2]["digest"]
    (images / "blobs" / "sha256" / layer.split(":")[1]).unlink()
    result = cli("--store", images, "verify")
    assert result.code == 1
    assert f"missing {layer}" in result.out and "FAILED" in result.out


@pytest.mark.sqlite_only("tampers with the SQLite file through sqlite3")
def test_verify_repair_brings_a_tampered_database_back(cli: Cli, images: Path) -> None:
    import sqlite3

    cli("--store", images, "init")
    with sqlite3.connect(images / ".refcount" / "refcount.db") as db:
        db.execute("UPDATE blobs SET count = count + 5 WHERE state = 'live'")
    before = listing(images)
    drift = cli("--store", images, "verify")
    assert drift.code == 1 and drift.out.count("drift sha256:") == 7
    assert cli("--store", images, "verify", "--repair").code == 0
    assert cli("--store", images, "verify").code == 0
    assert listing(images) == before


# --- bad input: exit code, one line naming the culprit, nothing deleted ----------------------


@pytest.mark.parametrize(
    ("args", "code", "needles"),
    [
        (["delete", "tag", "nope"], 1, ["nope", "no such tag"]),
        (["delete", "manifest", "sha256:" + "0" * 64], 1, ["sha256:" + "0" * 64]),
        (
            ["delete", "manifest", "sha256:../../etc/passwd"],
            2,
            ["sha256:../../etc/passwd", "invalid digest"],
        ),
        (["delete", "manifest", "sha256:" + "A" * 64], 2, ["invalid digest"]),
        (["delete", "manifest", "md5:" + "0" * 32], 2, ["unsupported algorithm"]),
        (["delete", "manifest", ""], 2, ["invalid digest"]),
        (["show", "nope"], 1, ["nope"]),
        (["--trash-ttl", "soon", "gc"], 2, ["soon", "invalid duration"]),
        (["delete", "tag"], 2, ["Missing argument"]),
        (["--no-such-flag", "init"], 2, ["--no-such-flag"]),
    ],
)
def test_bad_arguments_are_refused_without_touching_the_store(
    cli: Cli, images: Path, args: list[str], code: int, needles: list[str]
) -> None:
    cli("--store", images, "init")
    before = listing(images, include_refcount=False)
    result = cli("--store", images, *args)
    assert result.code == code
    one_error_line(result.err, *needles)
    assert listing(images) == before


def break_index_json(store: Path) -> None:
    (store / "index.json").write_text('{"schemaVersion": 2, "manifests": [')


def remove_index_json(store: Path) -> None:
    (store / "index.json").unlink()


def remove_oci_layout(store: Path) -> None:
    (store / "oci-layout").unlink()


def empty_index_json(store: Path) -> None:
    (store / "index.json").write_text("")


@pytest.mark.parametrize(
    ("damage", "file", "why"),
    [
        (break_index_json, "index.json", "invalid JSON"),
        (empty_index_json, "index.json", "empty"),
        (remove_index_json, "index.json", "missing"),
        (remove_oci_layout, "oci-layout", "missing"),
    ],
)
@pytest.mark.parametrize(
    "command", [["sync"], ["delete", "tag", "a"], ["gc"], ["verify"], ["init"]]
)
def test_a_broken_store_is_refused_with_exit_2_naming_the_file(
    cli: Cli, images: Path, damage: object, file: str, why: str, command: list[str]
) -> None:
    cli("--store", images, "init")
    damage(images)  # type: ignore[operator]
    before = listing(images)
    blobs = blob_files(images)
    result = cli("--store", images, *command)
    assert result.code == 2
    one_error_line(result.err, str(images / file), why)
    assert listing(images) == before and blob_files(images) == blobs


def test_a_directory_that_is_not_a_layout_is_refused(cli: Cli, tmp_path: Path) -> None:
    result = cli("--store", tmp_path, "init")
    assert result.code == 2
    one_error_line(result.err, "oci-layout", "missing")
    assert list(tmp_path.iterdir()) == []


def test_sync_after_an_outside_edit_counts_it_then_deleting_the_last_tag_frees_everything(
    cli: Cli, images: Path
) -> None:
    assert cli("--store", images, "init").code == 0
    before = reachable(images)
    # An outside tool untags a and pushes c, which shares the base layer, behind refcount's back.
    remove_entries(images, lambda e: tag_of(e) == "a")
    add_image(images, [b"base", b"c"], tag="c", config=b'{"c":1}')
    sync = cli("--store", images, "--json", "sync")
    assert sync.code == 0, sync.err
    report = sync.json()
    assert (report["roots_added"], report["roots_removed"]) == (1, 1)
    assert {b["digest"] for b in report["freed"]} == before - reachable(images)
    assert len(report["freed"]) == 3  # a's manifest, config and own layer
    assert blob_files(images) == reachable(images)
    assert [t["tag"] for t in cli("--store", images, "--json", "tags").json()] == ["b", "c"]
    base = "sha256:" + hashlib.sha256(b"base").hexdigest()
    assert cli("--store", images, "--json", "show", base).json()["count"] == 2  # b and c
    assert cli("--store", images, "sync").out.startswith(
        "roots +0 -0; 0 blobs became live; 0 freed"
    )
    assert cli("--store", images, "delete", "tag", "b").code == 0
    last = cli("--store", images, "delete", "tag", "c")
    assert last.code == 0 and "freed 4 blobs" in last.out, last.out
    assert blob_files(images) == set() == reachable(images)
    assert read_index(images)["manifests"] == []
    assert cli("--store", images, "verify").code == 0


def test_gc_reports_what_it_swept(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    cli("--store", images, "delete", "tag", "a")
    result = cli("--store", images, "--trash-ttl", "0", "gc")
    assert result.code == 0 and "purged 3 trashed blobs" in result.out


@pytest.fixture
def console_script() -> Path:
    """The `refcount` script that installing the package put beside this interpreter."""
    script = Path(sys.executable).with_name("refcount")
    found = str(script) if script.is_file() else shutil.which("refcount")
    if found is None:
        pytest.fail("no `refcount` console script: install the package (pip install -e .)")
    return Path(found)


def test_python_dash_m_and_the_console_script_run_the_same_cli(
    images: Path, console_script: Path
) -> None:
    env = direct_env(REFCOUNT_STORE=str(images))
    entry_points = {
        "python -m": [sys.executable, "-m", "refcount"],
        "script": [str(console_script)],
    }

    def run(name: str, *args: str) -> tuple[int, str, str]:
        command = [*entry_points[name], *args]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        return done.returncode, done.stdout, done.stderr

    def both(*args: str) -> tuple[int, str, str]:
        """Run by each entry point on the same store: one answer, returned."""
        found = {name: run(name, *args) for name in entry_points}
        assert found["script"] == found["python -m"], found
        return found["script"]

    assert run("script", "init")[0] == 0
    code, out, err = both("--json", "tags")
    assert code == 0 and [t["tag"] for t in json.loads(out)] == ["a", "b"], err
    code, out, err = both("delete", "tag", "nope")
    assert (code, out) == (1, "") and err.startswith("refcount: error: nope")
    assert "Traceback" not in err and len(err.splitlines()) == 1
    code, out, err = both("delete", "manifest", "sha256:nothex")
    assert code == 2 and "invalid digest" in err and "Traceback" not in err
    code, out, err = both("delete", "tag", "a", "--dry-run")
    assert code == 0 and out.startswith("would remove 1 index.json entry:\n  a  sha256:")
    code, out, err = run("script", "delete", "tag", "a")
    assert code == 0 and "freed 3 blobs" in out, err
    assert [tag_of(e) for e in read_index(images)["manifests"]] == ["b"]
    assert both("verify")[0] == 0


# What a plain `delete tag` without a daemon must never load (issue 13): each costs the
# direct process tens of milliseconds of import for nothing it needs. pydantic comes with
# typer 0.29's parameter validation (pyproject pins typer below it); psycopg only with a
# PostgreSQL URL; the rest belong to the daemon, the migrations or the tests.
POSTGRESQL_MODULES = ("psycopg", "sqlalchemy.dialects.postgresql")
"""What a store on SQLite never loads (up to 30 ms of start-up); a PostgreSQL run needs them."""
NOT_ON_THE_DELETE_PATH = (
    *("sqlalchemy.orm", "alembic", "watchdog", "rich", "prometheus_client", "pydantic"),
    *("hypothesis", "refcount.watch", "refcount.daemon", "refcount.metrics"),
    *(() if ON_POSTGRESQL else POSTGRESQL_MODULES),
    # What a delete and its catch-up never need, at a few ms of start-up each: push
    # (tarfile), prune and its rules (tomllib), scan and verify (multiprocessing), the
    # HTML page.
    *("tarfile", "tomllib", "multiprocessing"),
    *("refcount.core.push", "refcount.sources", "refcount.core.pruning"),
    *("refcount.core.policyfile", "refcount.core.scan", "refcount.core.verifying"),
    *("refcount.core.retention", "refcount.htmlreport"),
)


def test_the_direct_delete_path_loads_none_of_the_modules_it_does_not_need(images: Path) -> None:
    """The console script's entry point, in a fresh process, deletes a tag without a
    daemon: the delete succeeds and no module of NOT_ON_THE_DELETE_PATH (nor any of
    their submodules) was imported, at start-up or while the command was parsed and run."""
    env = direct_env(REFCOUNT_STORE=str(images))
    subprocess.run(
        [sys.executable, "-m", "refcount", "init"], env=env, check=True, capture_output=True
    )
    probe = (
        "import json, sys\n"
        "from refcount.client import main\n"
        "code = main(['delete', 'tag', 'a'])\n"
        "print(json.dumps([code, sorted(sys.modules)]))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    code, modules = json.loads(done.stdout.strip().splitlines()[-1])
    assert code == 0, done.stdout + done.stderr
    assert "freed 3 blobs" in done.stdout
    loaded = sorted(
        m for m in modules for heavy in NOT_ON_THE_DELETE_PATH
        if m == heavy or m.startswith(heavy + ".")
    )  # fmt: skip
    assert loaded == []


# --- help, version and usage ------------------------------------------------------------------


@pytest.mark.parametrize(("args", "usage"), [([], "refcount"), (["delete"], "refcount delete")])
def test_no_command_prints_the_help_on_stdout_and_exits_2_without_an_error_line(
    cli: Cli, args: list[str], usage: str
) -> None:
    result = cli(*args)
    assert result.code == 2
    assert result.out.startswith(f"Usage: {usage} [OPTIONS] COMMAND [ARGS]...\n")
    assert result.err == ""


def test_version_prints_the_package_version_without_a_store(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from importlib.metadata import version

    monkeypatch.setenv("REFCOUNT_STORE", str(tmp_path / "nowhere"))
    result = cli("--version")
    assert (result.code, result.out, result.err) == (0, f"refcount {version('refcount')}\n", "")
    assert list(tmp_path.iterdir()) == []


def test_version_through_the_console_script(tmp_path: Path, console_script: Path) -> None:
    from importlib.metadata import version

    done = subprocess.run(
        [str(console_script), "--version"], cwd=tmp_path, capture_output=True, text=True
    )
    assert (done.returncode, done.stdout, done.stderr) == (
        0,
        f"refcount {version('refcount')}\n",
        "",
    )
    assert list(tmp_path.iterdir()) == []


def test_help_names_each_option_with_its_value_and_fits_80_columns(cli: Cli) -> None:
    result = cli("--help")
    assert result.code == 0
    for placeholder in ("<bool>", "<int>", "<str>", "<path>", "…"):
        assert placeholder not in result.out
    assert all(len(line) <= 80 for line in result.out.splitlines())
    for option in (
        "--store DIR ",
        "--db URL ",
        "--json ",
        "-v, --verbose ",
        "--trash-ttl DURATION ",
        "--grace DURATION ",
        "--keep-referrers ",
        "--keep-untagged ",
        "--max-manifest BYTES ",
        "--version ",
    ):
        assert f"\n  {option}" in result.out, option
    assert "sqlite:///STORE/.refcount/refcount.db" in result.out
    assert "--no-" not in result.out and "[default: 0]" not in result.out


@pytest.mark.parametrize(
    ("command", "options"),
    [
        (["verify"], ["--deep ", "--repair "]),
        (["gc"], ["-n, --dry-run ", "--grace DURATION "]),
        (["delete", "tag"], ["-n, --dry-run "]),
        (
            ["watch"],
            [
                "--debounce SECONDS ",
                "--resync DURATION ",
                "--gc-interval DURATION ",
                "--metrics-addr HOST:PORT ",
                "--log-format text|json ",
            ],
        ),
    ],
)
def test_command_help_shows_flags_as_flags(
    cli: Cli, command: list[str], options: list[str]
) -> None:
    result = cli(*command, "--help")
    assert result.code == 0
    for option in options:
        assert f"\n  {option}" in result.out, option
    assert "<bool>" not in result.out and "--no-" not in result.out


def test_an_unknown_log_format_is_a_usage_error(cli: Cli, tmp_path: Path) -> None:
    result = cli("--store", tmp_path, "watch", "--log-format", "yaml")
    assert result.code == 2
    one_error_line(result.err, "--log-format", "'yaml': not a log format; use text or json")
    assert list(tmp_path.iterdir()) == []


# --- global options after the command ---------------------------------------------------------


def test_global_options_may_follow_the_command(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    before = cli("--store", images, "--json", "tags")
    after = cli("tags", "--store", images, "--json")
    assert after.code == 0 and after.out == before.out
    dry = cli("delete", "tag", "a", "--store", images, "--dry-run", "-v", "--keep-untagged")
    assert dry.code == 0 and dry.out.startswith("would remove 1 index.json entr")
    assert [tag_of(e) for e in read_index(images)["manifests"]] == ["a", "b"]


def test_a_global_option_that_a_command_cannot_take_says_where_it_goes(
    cli: Cli, images: Path
) -> None:
    cli("--store", images, "init")
    result = cli("--store", images, "sync", "--grace", "1h")
    assert result.code == 2
    one_error_line(
        result.err,
        "No such option: --grace",
        "--grace is a global option: write it before the command",
    )


def test_only_options_no_command_defines_are_moved() -> None:
    """`refcount.argv` knows every global option, and every command option taking a
    value, of the Typer app; gc's --grace stays gc's."""
    import typer

    from refcount import argv, cli

    group = typer.main.get_command(cli.app)
    own: set[str] = set()
    taking_value: set[str] = set()

    def walk(command: object) -> None:
        for param in getattr(command, "params", []):
            if param.param_type_name != "option":
                continue
            names = {*param.opts, *param.secondary_opts}
            own.update(names)
            if not param.is_flag and not param.count:
                taking_value.update(names)
        for sub in getattr(command, "commands", {}).values():
            walk(sub)

    for sub in group.commands.values():  # type: ignore[attr-defined]
        walk(sub)
    for param in group.params:
        names = {*param.opts, *param.secondary_opts} - {"-h", "--help", "--version", "-v"}
        assert names <= argv.GLOBAL_VALUE_OPTIONS | argv.GLOBAL_FLAGS, names
    assert taking_value == argv.COMMAND_VALUE_OPTIONS
    assert not own & (argv.MOVABLE_VALUE_OPTIONS | argv.GLOBAL_FLAGS | {"-v"})
    assert argv.normalise(["gc", "--grace", "1h", "--json"]) == ["--json", "gc", "--grace", "1h"]
    assert argv.normalise(["watch", "--log-format", "--json"]) == [
        "watch",
        "--log-format",
        "--json",
    ]
    assert argv.normalise(["delete", "tag", "--", "--json"]) == ["delete", "tag", "--", "--json"]
    assert argv.normalise(["--store", "tags", "sync", "-vv"]) == ["--store", "tags", "-vv", "sync"]
    assert argv.normalise(["tags", "--store"]) == ["tags", "--store"]


# --- sizes and counted nouns ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("size", "text"),
    [
        (None, "?"),
        (0, "0 B"),
        (503, "503 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1229, "1.2 KiB"),
        (10189, "10 KiB"),
        (503710, "492 KiB"),
        (1048575, "1.0 MiB"),
        (1258291, "1.2 MiB"),
        (3 * 2**30, "3.0 GiB"),
        (5 * 2**40, "5.0 TiB"),
    ],
)
def test_human_sizes_are_binary_units(size: int | None, text: str) -> None:
    from refcount.units import human_size

    assert human_size(size) == text


def test_counted_nouns_agree_with_their_number() -> None:
    from refcount.units import plural

    assert plural(1, "blob") == "1 blob"
    assert plural(0, "blob") == "0 blobs"
    assert plural(1, "index.json entry", "index.json entries") == "1 index.json entry"
    assert plural(2, "index.json entry", "index.json entries") == "2 index.json entries"


def test_text_reports_show_human_sizes_and_json_exact_bytes(cli: Cli, store: Path) -> None:
    add_image(store, [b"base", b"x" * 503000], tag="big", config=b'{"a":1}')
    add_image(store, [b"base", b"b"], tag="small", config=b'{"b":1}')
    cli("--store", store, "init")
    tags = cli("--store", store, "--json", "tags").json()
    big = tags[0]
    image = json.loads(cli("--store", store, "--json", "show", "big").out)
    expected = image["size"] + sum(
        (store / "blobs" / "sha256" / c["digest"].split(":")[1]).stat().st_size
        for c in image["children"]
    )
    assert big["size"] == expected and isinstance(big["size"], int)
    text = cli("--store", store, "tags").out.splitlines()
    assert text[1].endswith(f"{big['digest']}  492 KiB")
    assert text[2].endswith(f"  {tags[1]['size']} B")
    deleted = cli("--store", store, "delete", "tag", "big").out.splitlines()
    assert deleted[0] == "removed 1 index.json entry:"
    assert deleted[2] == "freed 3 blobs, 492 KiB:"
    layer = "sha256:" + __import__("hashlib").sha256(b"x" * 503000).hexdigest()
    assert f"  {layer}  491 KiB  application/vnd.oci.image.layer.v1.tar" in deleted
    report = cli("--store", store, "verify").out.splitlines()
    assert f"quarantined {layer}: 491 KiB" in report and report[-1] == "OK: 1 root, 4 live blobs"


# --- names that do not exist ------------------------------------------------------------------


def test_an_empty_tag_is_named_as_such(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    for command, message in [
        ("delete", "refcount: error: empty tag: name a tag (see refcount tags)\n"),
        ("show", "refcount: error: empty tag: name a tag or a digest (see refcount tags)\n"),
    ]:
        result = cli(
            "--store", images, *([command, "tag"] if command == "delete" else [command]), ""
        )
        assert (result.code, result.out, result.err) == (1, "", message)


def test_umocis_layout_colon_tag_gets_a_hint(
    cli: Cli, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cli("--store", images, "init")
    monkeypatch.chdir(images.parent)
    index = images / "index.json"
    result = cli("--store", "store", "delete", "tag", "store:b")
    assert result.code == 1
    assert result.err == (
        f"refcount: error: store:b: no such tag in {index}; "
        "did you mean: refcount --store store delete tag b?\n"
    )
    shown = cli("--store", "store", "show", f"{images}:a")
    assert shown.code == 1 and shown.err.endswith(
        f"; did you mean: refcount --store {images} show a?\n"
    )
    # not a tag of the store, not a layout: no guess
    assert cli("--store", "store", "delete", "tag", "store:zz").err == (
        f"refcount: error: store:zz: no such tag in {index}\n"
    )
    assert [tag_of(e) for e in read_index(images)["manifests"]] == ["a", "b"]


def test_a_digest_given_to_delete_tag_points_at_delete_manifest(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    digest = read_index(images)["manifests"][0]["digest"]
    result = cli("--store", images, "delete", "tag", digest)
    assert result.code == 1
    assert result.err == (
        f"refcount: error: {digest}: no such tag in {images / 'index.json'}; "
        f"to delete by digest: refcount delete manifest {digest}\n"
    )
    assert len(read_index(images)["manifests"]) == 2


# --- tags -------------------------------------------------------------------------------------


def test_tags_columns_line_up_when_every_tag_is_shorter_than_the_header(
    cli: Cli, images: Path
) -> None:
    cli("--store", images, "init")
    lines = cli("--store", images, "tags").out.splitlines()
    digests = [e["digest"] for e in read_index(images)["manifests"]]
    assert lines[0] == f"TAG  {'DIGEST':<{len(digests[0])}}  SIZE"
    assert [line.index("sha256:") for line in lines[1:]] == [5, 5] == [lines[0].index("DIGEST")] * 2
    assert lines[1].startswith(f"a    {digests[0]}  ") and lines[2].startswith(
        f"b    {digests[1]}  "
    )


def test_tags_all_lists_untagged_entries_with_what_relates_them_to_tags(
    cli: Cli, store: Path
) -> None:
    """
    index.json: a, multi (an index over m1, m2), m1, m2 (untagged), sbom (an
    untagged referrer of a), old (untagged: what re-tagging leaves).
    """
    a = add_image(store, [b"base", b"a"], tag="a", config=b'{"a":1}')
    m1 = add_image(store, [b"base", b"m1"], tag=None, config=b'{"m":1}', index_entry=False)
    m2 = add_image(store, [b"base", b"m2"], tag=None, config=b'{"m":2}', index_entry=False)
    multi = add_index(store, [m1, m2], tag="multi", list_children_untagged=True)
    sbom = add_referrer(store, a)
    old = add_image(store, [b"old"], tag=None, config=b'{"old":1}')
    cli("--store", store, "init")
    assert [t["tag"] for t in cli("--store", store, "--json", "tags").json()] == ["a", "multi"]

    roots = cli("--store", store, "--json", "tags", "--all").json()
    assert [(t["tag"], t["digest"], t["untagged"]) for t in roots] == [
        ("a", a["digest"], False),
        ("multi", multi["digest"], False),
        (None, m1["digest"], True),
        (None, m2["digest"], True),
        (None, sbom["digest"], True),
        (None, old["digest"], True),
    ]
    assert [(t["subject"], t["subject_tags"], t["included_in"]) for t in roots] == [
        (None, [], []),
        (None, [], []),
        (None, [], ["multi"]),
        (None, [], ["multi"]),
        (a["digest"], ["a"], []),
        (None, [], []),
    ]
    sizes = [t["size"] for t in roots]
    assert sizes[2] == m1["size"] + 4 + 2 + 7 and sizes[5] == old["size"] + 3 + 9

    text = cli("--store", store, "tags", "--all").out.splitlines()
    size = [f"{s} B" if s < 1024 else f"{s / 1024:.1f} KiB" for s in sizes]
    width = max(map(len, size))
    assert text == [
        f"TAG         {'DIGEST':<71}  {'SIZE':<{width}}  RELATION",
        f"a           {a['digest']}  {size[0]:<{width}}  -",
        f"multi       {multi['digest']}  {size[1]:<{width}}  -",
        f"(untagged)  {m1['digest']}  {size[2]:<{width}}  in multi",
        f"(untagged)  {m2['digest']}  {size[3]:<{width}}  in multi",
        f"(untagged)  {sbom['digest']}  {size[4]:<{width}}  referrer of {a['digest']} (a)",
        f"(untagged)  {old['digest']}  {size[5]:<{width}}  -",
    ]
    removed = cli("--store", store, "delete", "manifest", old["digest"])
    assert removed.code == 0 and old["digest"] not in cli("--store", store, "tags", "--all").out


# --- errors under --json ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--json", "delete", "tag", "nope"], 1, "nope: no such tag in {index}"),
        (["delete", "tag", "nope", "--json"], 1, "nope: no such tag in {index}"),
        (["--json", "--no-such-flag", "init"], 2, "No such option: --no-such-flag"),
        (["tags", "--json", "--bogus"], 2, "No such option: --bogus"),
        (["--json", "delete", "manifest", "sha256:x"], 2, "sha256:x: invalid digest"),
        (["--json", "delete", "tag"], 2, "Missing argument 'REF...'."),
        (["delete", "--json"], 2, "Missing command."),
    ],
)
def test_with_json_an_error_is_also_one_json_document_on_stdout(
    cli: Cli, images: Path, args: list[str], code: int, message: str
) -> None:
    cli("--store", images, "init")
    result = cli("--store", images, *args)
    assert result.code == code
    one_error_line(result.err)
    error = result.err.removeprefix("refcount: error: ").rstrip("\n")
    assert result.json() == {"error": error, "exit_code": code}
    assert error.startswith(message.format(index=images / "index.json"))


def test_with_json_an_internal_error_is_a_json_document_too(
    cli: Cli, images: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from refcount.core import Refcounter

    def broken(self: Refcounter, **_: object) -> None:
        raise RuntimeError("boom")

    cli("--store", images, "init")
    monkeypatch.setattr(Refcounter, "tags", broken)
    result = cli("--store", images, "--json", "tags")
    message = "internal error: RuntimeError: boom (run with -vv for details)"
    assert (result.code, result.err) == (3, f"refcount: {message}\n")
    assert result.json() == {"error": message, "exit_code": 3}


def test_without_an_error_json_prints_only_the_report(cli: Cli, images: Path) -> None:
    cli("--store", images, "init")
    layer = cli("--store", images, "--json", "show", "a").json()["children"][2]["digest"]
    (images / "blobs" / "sha256" / layer.split(":")[1]).unlink()
    failed = cli("--store", images, "--json", "verify")
    assert failed.code == 1 and failed.json()["missing"] == [layer]  # the report, nothing else
    assert cli("--store", images, "delete", "tag", "nope").out == ""  # no --json: no document


def test_a_store_named_like_an_option_does_not_ask_for_json() -> None:
    from refcount.argv import asks_for_json

    assert asks_for_json(["--store", "--json", "tags"]) is False
    assert asks_for_json(["--store", "x", "tags", "--json"]) is True
    assert asks_for_json(["delete", "tag", "--", "--json"]) is False


# --- sync ---------------------------------------------------------------------------------------


def test_sync_with_v_says_what_it_did_and_with_vv_which_blobs(cli: Cli, images: Path) -> None:
    from storekit import remove_entries, write_blob

    def plan(tag: str) -> dict[str, Any]:
        report: dict[str, Any] = cli(
            "--store", images, "--json", "delete", "tag", tag, "--dry-run"
        ).json()
        return report

    cli("--store", images, "init")
    assert cli("--store", images, "-v", "sync").err == ""  # nothing changed
    freed = plan("a")
    remove_entries(images, lambda e: tag_of(e) == "a")  # an outside tool's untag
    summary = cli("--store", images, "sync", "-v")
    assert summary.code == 0
    assert summary.err == (
        "refcount: sync: index.json: 0 roots added, 1 removed\n"
        f"refcount: sync: 3 blobs freed ({freed['freed_bytes']} B)\n"
    )
    write_blob(images, b"an upload in progress", "application/octet-stream")
    assert cli("--store", images, "sync").err == ""  # no -v: the report only

    freed = plan("b")
    remove_entries(images, lambda e: tag_of(e) == "b")
    orphan = write_blob(images, b"another upload", "application/octet-stream")
    details = cli("--store", images, "-vv", "sync")
    lines = [line for line in details.err.splitlines() if line.startswith("refcount: sync:")]
    assert lines == [
        "refcount: sync: index.json: 0 roots added, 1 removed",
        f"refcount: sync: 4 blobs freed ({freed['freed_bytes']} B)",
        *(f"refcount: sync: freed {b['digest']} ({b['size']} B)" for b in freed["freed"]),
        "refcount: sync: 1 new orphan",
        f"refcount: sync: orphan {orphan['digest']}",
    ]


@pytest.mark.sqlite_only("removes .refcount/ and the SQLite database in it")
def test_sync_and_init_exit_1_when_they_find_referenced_blobs_missing(
    cli: Cli, images: Path
) -> None:
    import hashlib
    import shutil

    cli("--store", images, "init")
    layer = "sha256:" + hashlib.sha256(b"a").hexdigest()  # a's own layer
    (images / "blobs" / "sha256" / layer.split(":")[1]).unlink()
    found = cli("--store", images, "sync")
    assert found.code == 1
    assert found.out.splitlines()[1:] == [f"missing: {layer}"]
    assert found.err == f"refcount: {layer}: referenced blob is missing from blobs/; needed by a\n"
    again = cli("--store", images, "--json", "sync")  # recorded: verify keeps reporting it
    assert again.code == 0 and again.json()["missing"] == []
    assert cli("--store", images, "verify").code == 1
    shutil.rmtree(images / ".refcount")
    indexed = cli("--store", images, "--json", "init")
    assert indexed.code == 1 and indexed.json()["missing"] == [layer]


def test_a_delete_that_frees_nothing_says_so_without_an_empty_list(cli: Cli, images: Path) -> None:
    from storekit import add_entry

    add_entry(images, read_index(images)["manifests"][0], "a2")  # a second tag on a's manifest
    cli("--store", images, "init")
    result = cli("--store", images, "delete", "tag", "a2")
    digest = read_index(images)["manifests"][0]["digest"]
    assert (result.code, result.out) == (
        0,
        f"removed 1 index.json entry:\n  a2  {digest}\nfreed 0 blobs, 0 B\n",
    )
