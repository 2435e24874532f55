"""The test Ceph RGW (``tools/ceph-s3``): find it, start it if allowed, make fresh buckets.

The fixtures in ``tests/conftest.py`` (``rgw``, ``s3_bucket``, ``s3_locked_bucket``,
``s3_fault_proxy``) are thin wrappers around this module.

Where the RGW is: ``CDP_TEST_S3_ENDPOINT`` + ``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY`` (what ``eval "$(tools/ceph-s3 env)"`` exports, as ``make test``
does), else the ``cluster.json`` of ``tools/ceph-s3``'s state directory. When it does not
answer: under ``CI=true`` the test fails ("requires Ceph RGW: run tools/ceph-s3 up"); on a
developer machine the session starts it (about 20 s, plus the package install the first
time) and stops it at the end. It is never skipped.
"""

from __future__ import annotations

import os
import subprocess
import uuid
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from cdp.tier.s3 import S3, ObjectRef, S3Settings
from tools import ceph_s3

REPO = Path(__file__).resolve().parents[2]
CEPH_S3 = REPO / "tools" / "ceph-s3"
REQUIRES = "requires Ceph RGW: run tools/ceph-s3 up"


@dataclass(frozen=True)
class Rgw:
    endpoint: str
    access_key: str
    secret_key: str
    #: True if this test session started it (and so stops it at the end)
    started_here: bool = False

    @property
    def host_port(self) -> tuple[str, int]:
        u = urlsplit(self.endpoint)
        assert u.hostname is not None and u.port is not None
        return u.hostname, u.port

    def s3(self, endpoint: str | None = None, **settings: float | int) -> S3:
        """A cdp S3 client with this RGW's keys (``endpoint``: e.g. a fault proxy's)."""
        env = {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}
        old = {k: os.environ.get(k) for k in env}
        os.environ.update(env)  # the SDK's standard chain, as in production
        try:
            return S3(S3Settings(endpoint=endpoint or self.endpoint, **settings))
        finally:
            for k, v in old.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v


def _from_env() -> Rgw | None:
    ep = os.environ.get("CDP_TEST_S3_ENDPOINT")
    ak, sk = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    return Rgw(ep, ak, sk) if ep and ak and sk else None


def _from_state() -> Rgw | None:
    info = ceph_s3.load_info()
    if info is None:
        return None
    return Rgw(str(info["endpoint"]), str(info["access_key"]), str(info["secret_key"]))


def find_rgw() -> Rgw | None:
    """The running test RGW, or None."""
    for rgw in (_from_env(), _from_state()):
        if rgw is not None and ceph_s3.rgw_answers(rgw.endpoint):
            return rgw
    return None


def require_rgw() -> Rgw:
    """The running RGW; started here outside CI, a loud failure under CI."""
    rgw = find_rgw()
    if rgw is not None:
        return rgw
    if os.environ.get("CI") == "true":
        pytest.fail(REQUIRES, pytrace=False)
    r = subprocess.run([str(CEPH_S3), "up"], capture_output=True, text=True, timeout=900)
    rgw = _from_state() if r.returncode == 0 else None
    if rgw is None or not ceph_s3.rgw_answers(rgw.endpoint):
        pytest.fail(f"{REQUIRES} (starting it failed: {r.stderr.strip()[-2000:]})", pytrace=False)
    return Rgw(rgw.endpoint, rgw.access_key, rgw.secret_key, started_here=True)


def stop_rgw() -> None:
    subprocess.run([str(CEPH_S3), "stop"], capture_output=True, timeout=120, check=False)


def new_bucket(s3: S3, *, object_lock: bool = False) -> str:
    """A fresh, empty bucket with a unique name."""
    name = f"cdp-test-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(name, object_lock=object_lock)
    return name


def drop_bucket(s3: S3, bucket: str) -> None:
    """Delete a test bucket with whatever it holds; objects still under retention (and so
    the bucket) stay, which is harmless on the throw-away cluster."""
    with suppress(Exception):
        s3.abort_incomplete_uploads(bucket)
        refs = [ObjectRef(v.key, v.version_id) for v in s3.list_versions(bucket)]
        res = s3.delete_objects(bucket, refs)
        if not res.refused:
            s3.client.delete_bucket(Bucket=bucket)
