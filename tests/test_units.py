"""The systemd units in scripts/: `systemd-analyze verify` accepts them without a
warning, and the verify service's command exits 0 on a clean store and 1 on a
broken one, so that a failed unit is the alert."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from storekit import add_image, blob_path, listing, sha256_digest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
UNITS = ("refcount-watch.service", "refcount-verify.service", "refcount-verify.timer")
INSTALLED = "/usr/local/bin/refcount"
"""Where the units expect the console script (their install instructions put it there)."""
HERE = str(Path(sys.executable).parent / "refcount")
"""The console script of the environment running the tests."""


def installed_here(tmp_path: Path) -> Path:
    """The units copied to `tmp_path`, pointing at this environment's refcount: the
    verifier checks that the program a unit starts exists."""
    for unit in UNITS:
        text = (SCRIPTS / unit).read_text()
        (tmp_path / unit).write_text(text.replace(INSTALLED, HERE))
    return tmp_path


def exec_start(unit: str) -> list[str]:
    lines = (SCRIPTS / unit).read_text().splitlines()
    [command] = [line.split("=", 1)[1] for line in lines if line.startswith("ExecStart=")]
    return shlex.split(command)


def test_the_units_pass_systemd_analyze_verify_without_a_warning(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed (apt-get install systemd)")
    where = installed_here(tmp_path)
    ran = subprocess.run(
        [analyze, "verify", *(str(where / unit) for unit in UNITS)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert ran.returncode == 0 and ran.stderr == "", ran.stderr
    timer = (SCRIPTS / "refcount-verify.timer").read_text()
    assert "Unit=refcount-verify.service" in timer and "Persistent=true" in timer


def test_the_verify_service_exits_0_on_a_clean_store_and_1_on_a_missing_blob(
    store: Path,
) -> None:
    command = exec_start("refcount-verify.service")
    assert command[0] == INSTALLED and command[1:3] == ["--json", "verify"]
    add_image(store, [b"base", b"own"], tag="app")
    env = {**os.environ, "REFCOUNT_STORE": str(store)}

    def run() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "refcount", *command[1:]],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            check=False,
        )

    init = subprocess.run(
        [sys.executable, "-m", "refcount", "init"], env=env, capture_output=True, check=False
    )
    assert init.returncode == 0, init.stderr
    clean = run()
    assert clean.returncode == 0, clean.stderr
    assert '"ok": true' in clean.stdout and '"sliced": true' in clean.stdout
    layer = sha256_digest(b"own")
    blob_path(store, layer).unlink()
    before = listing(store)
    broken = run()
    assert broken.returncode == 1 and f'"{layer}"' in broken.stdout
    assert listing(store) == before  # found, recorded, nothing repaired or deleted
