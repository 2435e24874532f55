"""`make serve` sets up the runtime dependencies only (issue 28, item 15); the
development toolchain stays with `make test` / `make unit`. Checked on the commands make
would run (``make -n -B``), nothing is installed."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _plan(target: str) -> str:
    if shutil.which("make") is None:
        pytest.skip("requires make")
    r = subprocess.run(["make", "--no-print-directory", "-n", "-B", target], cwd=ROOT, capture_output=True, text=True,
                       check=True, timeout=60)
    return r.stdout


def test_serve_installs_runtime_dependencies_only() -> None:
    plan = _plan("serve")
    assert "pip install -q -e ." in plan and "[dev]" not in plan and "--upgrade pip" not in plan
    assert plan.rstrip().endswith(".venv/bin/cdpd")


def test_unit_still_installs_the_development_toolchain() -> None:
    assert "pip install -q -e '.[dev]'" in _plan("unit")
