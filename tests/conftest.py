"""Shared fixtures: a fresh OCI layout, and the CLI run in-process through its error boundary."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from storekit import make_layout

from refcount.cli import main

# Timing health checks and deadlines measure the machine, not the code: on two
# busy cores they fail at random. Property tests judge behaviour only.
settings.register_profile("refcount", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("refcount")


@dataclass(frozen=True)
class Result:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


Cli = Callable[..., Result]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """An empty OCI image layout."""
    return make_layout(tmp_path / "store")


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Cli:
    """Run `refcount ARGS...` in-process; returns its exit code and what it printed."""

    def run(*args: str | Path) -> Result:
        capsys.readouterr()
        root = logging.getLogger()
        handlers = root.handlers[:]
        try:
            code = main([str(a) for a in args])
        finally:
            # main() logs to this test's captured stderr: a later test must not
            # log into it once it is closed.
            root.handlers[:] = handlers
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return run
