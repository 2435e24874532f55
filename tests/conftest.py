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
from typing import TYPE_CHECKING, Any

import pytest
from hypothesis import HealthCheck, settings

if TYPE_CHECKING:
    from cdp.tier.s3 import S3
    from tests.s3.fault_proxy import FaultProxy
    from tests.s3.rgw import Rgw


# Hypothesis's per-example deadline (200 ms) is a timed assertion: on 2 shared cores a
# correct example can take longer (one ext4 column-packing test failed so at load ~9). No
# deadline, and no "too slow" health check, for every property test.
settings.register_profile("cdp", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cdp")


def require_tool(*names: str) -> None:
    """Fail (or, when explicitly allowed outside CI, skip) unless every tool is on PATH."""
    missing = [n for n in names if shutil.which(n) is None]
    if not missing:
        return
    msg = "requires " + ", ".join(missing) + " (run `make test`, which installs them)"
    if os.environ.get("CDP_ALLOW_MISSING_TOOLS") == "1" and os.environ.get("CI") != "true":
        pytest.skip(msg)
    pytest.fail(msg)


# -- parallel runs (pytest-xdist, `make test`: -n 2 --dist loadfile) ---------------------


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadfile`` with one exception: the files of tests/s3 are one unit, run
    one after another on one worker, because one of them kills the test RGW and
    restarts it (tests/s3/test_tier_rgw_kill.py) and no other S3 test may run then.
    Each other file runs whole on one worker, so its module fixtures (a guest VM, a
    browser) start once."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadFileScheduling

    class FilesAndRgw(LoadFileScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return "tests/s3" if path.startswith("tests/s3/") else path

    return FilesAndRgw(config, log)


#: the longest unit, started first under xdist so that no worker idles at the end (not
#: with the bench harness: its fio runs would load the disk under the S3 tests' flushes)
_FIRST = ("tests/s3/",)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """On an xdist worker, the longest unit first (each worker collects the same order)."""
    if hasattr(config, "workerinput"):
        items.sort(key=lambda i: not i.nodeid.startswith(_FIRST))  # stable: else as collected


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

