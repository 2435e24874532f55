from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tools.harness import Cdpd


@pytest.fixture
def cdpd(tmp_path: Path) -> Iterator[Cdpd]:
    d = Cdpd(tmp_path).start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()
