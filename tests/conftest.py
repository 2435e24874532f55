"""Shared test fixtures.

Real clients are required: when a tool the test needs is missing, the test fails with
``requires TOOL`` under CI (``CI=true``) and outside CI too — ``make test`` installs them.
Set ``CDP_ALLOW_MISSING_TOOLS=1`` to skip such tests instead on a developer machine.
"""

from __future__ import annotations

import os
import shutil

import pytest


def require_tool(*names: str) -> None:
    """Fail (or, when explicitly allowed outside CI, skip) unless every tool is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = "requires " + ", ".join(missing) + " (run `make test`, which installs them)"
    if os.environ.get("CDP_ALLOW_MISSING_TOOLS") == "1" and os.environ.get("CI") != "true":
        pytest.skip(msg)
    pytest.fail(msg)
