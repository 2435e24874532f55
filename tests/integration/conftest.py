from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.replication_env import ReplEnv
from tools.harness import Cdpd


@pytest.fixture
def cdpd(tmp_path: Path) -> Iterator[Cdpd]:
    d = Cdpd(tmp_path).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


@pytest.fixture
def repl(tmp_path: Path) -> Iterator[ReplEnv]:
    """Real cdpds for a replication test, stopped at the end
    (tests/integration/replication_env.py)."""
    env = ReplEnv(tmp_path)
    try:
        yield env
    finally:
        env.close()
