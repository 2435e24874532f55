"""Shared test fixtures.

Real clients are required: when a tool the test needs is missing, the test fails with
``requires TOOL`` under CI (``CI=true``) and outside CI too — ``make test`` installs them.
Set ``CDP_ALLOW_MISSING_TOOLS=1`` to skip such tests instead on a developer machine.

S3 tests run against a real Ceph RGW (``tools/ceph-s3``; fixtures ``rgw``, ``s3``,
``s3_bucket``, ``s3_locked_bucket``, ``s3_fault_proxy`` below, helpers in ``tests/s3/``).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from cdp.tier.s3 import S3
    from tests.s3.fault_proxy import FaultProxy
    from tests.s3.rgw import Rgw


def require_tool(*names: str) -> None:
    """Fail (or, when explicitly allowed outside CI, skip) unless every tool is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = "requires " + ", ".join(missing) + " (run `make test`, which installs them)"
    if os.environ.get("CDP_ALLOW_MISSING_TOOLS") == "1" and os.environ.get("CI") != "true":
        pytest.skip(msg)
    pytest.fail(msg)


# -- the test Ceph RGW (tools/ceph-s3; see tests/s3/rgw.py) -----------------------------


@pytest.fixture(scope="session")
def rgw() -> Iterator[Rgw]:
    """The running test RGW: found, or started (outside CI) and then stopped at the end;
    under CI=true a test fails when it is not running. Never skipped."""
    from tests.s3.rgw import require_rgw, stop_rgw

    found = require_rgw()
    yield found
    if found.started_here:
        stop_rgw()


@pytest.fixture
def s3(rgw: Rgw) -> S3:
    """A cdp S3 client (cdp.tier.s3) on the test RGW, 3 attempts per call."""
    return rgw.s3(max_attempts=3)


@pytest.fixture
def s3_bucket(s3: S3) -> Iterator[str]:
    """A fresh bucket on the test RGW, emptied and deleted afterwards."""
    from tests.s3.rgw import drop_bucket, new_bucket

    name = new_bucket(s3)
    yield name
    drop_bucket(s3, name)


@pytest.fixture
def s3_locked_bucket(s3: S3) -> Iterator[str]:
    """A fresh bucket with object lock enabled (so versioned)."""
    from tests.s3.rgw import drop_bucket, new_bucket

    name = new_bucket(s3, object_lock=True)
    yield name
    drop_bucket(s3, name)


@pytest.fixture
def s3_fault_proxy(rgw: Rgw) -> Iterator[FaultProxy]:
    """A fault proxy (tests/s3/fault_proxy.py) in front of the test RGW, mode ``pass``."""
    from tests.s3.fault_proxy import FaultProxy

    with FaultProxy(*rgw.host_port) as proxy:
        yield proxy
