"""The RGW itself killed -9 in the middle of a multipart segment upload by a real cdpd
(tools/ceph-s3's RGW, by its pid): ingest over NBD goes on with short flushes while it
is down, status says unreachable; once RGW is started again (and left up for the rest
of the suite) the uploads resume, the incomplete multipart cut off by the kill is
aborted, and every generation manifest in the bucket names only whole objects whose
size and sha256 match; a store recovered from the bucket serves the marker identical."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import time
from pathlib import Path

from cdp.errors import NotFound
from cdp.targets.nbd.client import NbdClient
from cdp.tier.manifest import Manifest, generations_prefix
from cdp.tier.s3 import S3
from tests.s3.rgw import Rgw
from tests.s3.test_tier_cdpd import rgw_env, tier_config  # noqa: F401 (fixture)
from tools import ceph_s3
from tools.harness import Cdpd

MiB = 1 << 20


def _kill9_rgw() -> None:
    """SIGKILL the test RGW by the pid tools/ceph-s3 recorded; wait until it is gone."""
    cluster = ceph_s3.Cluster(ceph_s3.state_dir())
    pid = cluster.pid("rgw")
    assert pid is not None, "the RGW was not started by tools/ceph-s3 here (no pid)"
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while ceph_s3.alive(pid):
        assert time.monotonic() < deadline, "RGW still alive 30 s after SIGKILL"
        time.sleep(0.05)


def _restart_rgw(endpoint: str) -> None:
    ceph_s3.Cluster(ceph_s3.state_dir()).restart()  # starts only what is not running
    assert ceph_s3.rgw_answers(endpoint)


def test_rgw_kill9_mid_upload_resumes(tmp_path: Path, rgw_env: Rgw, s3: S3,  # noqa: F811
                                      s3_bucket: str) -> None:
    url = f"s3://{s3_bucket}/rk"
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="64MiB", segment_bytes="20MiB",
             extra_config=tier_config(rgw_env, url, 'rate = "4MiB"\n'))
    d.start()
    r: Cdpd | None = None
    restarted = False
    try:
        rng = random.Random(9)
        img = bytearray(64 * MiB)
        with NbdClient.connect(d.uri()) as c:
            for _ in range(3):
                for i in range(21):
                    data = rng.randbytes(MiB)
                    off = (i * MiB) % (60 * MiB)
                    c.pwrite(data, off)
                    img[off : off + MiB] = data
                c.flush()
        marker = d.cdpctl_json("snapshot", "--label", "before-kill")

        def in_flight() -> list[dict]:  # type: ignore[type-arg]
            return list(s3.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="rk/")
                        .get("Uploads", []))

        deadline = time.monotonic() + 60
        while not in_flight() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert in_flight(), "no multipart upload seen in flight"
        time.sleep(0.5)  # some parts in
        _kill9_rgw()
        try:
            # ingest goes on while the store is gone: every flush returns, nothing is
            # uploaded meanwhile (tests/s3/test_tier_cdpd.py shows the same with the
            # store hanging instead of gone)
            before = d.cdpctl_json("tier", "status")[0]
            flushes = 0
            with NbdClient.connect(d.uri()) as c:
                t_end = time.monotonic() + 8
                while time.monotonic() < t_end:
                    off = rng.randrange(0, 60 * MiB - (256 << 10)) & ~4095
                    c.pwrite(rng.randbytes(256 << 10), off)
                    c.flush()
                    flushes += 1
                    # at most ~40 MiB in the 8 s, however fast the machine: all of it
                    # goes up at the tier's 4 MiB/s once RGW is back (an unpaced loop
                    # wrote ~860 MiB on a quiet machine: 215 s of uploads)
                    time.sleep(0.05)
            st = d.cdpctl_json("tier", "status")[0]
            assert flushes > 0 and st["uploaded_seq"] == before["uploaded_seq"], (before, st)
            assert st["state"] == "unreachable" and st["last_error"], st
        finally:
            _restart_rgw(rgw_env.endpoint)
            restarted = True
        deadline = time.monotonic() + 180
        while True:
            up = d.cdpctl_json("tier", "upload")[0]
            if (up["pending_segments"] == 0 and up["state"] == "idle") or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert up["pending_segments"] == 0 and up["state"] == "idle", up
        assert up["uploaded_seq"] >= marker["seq"] and up["last_error"] is None, up
        assert not in_flight()  # the upload the kill cut off was aborted
        # no manifest names a missing or partial object
        gens = [o.key for o in s3.list_objects(s3_bucket, generations_prefix("rk/", "vol0"))]
        assert gens
        newest = None
        for key in sorted(gens):
            m = Manifest.decode(s3.get_object(s3_bucket, key), key)
            for okey, size, _sha in m.objects():
                try:
                    h = s3.head(s3_bucket, okey)
                except NotFound:
                    raise AssertionError(f"{key} names {okey}, which is missing") from None
                assert h.size == size, (key, okey, h.size, size)
            newest = m
        assert newest is not None and len(newest.segments) >= 3
        for okey, size, sha in newest.objects():
            body = s3.get_object(s3_bucket, okey)
            assert len(body) == size and hashlib.sha256(body).hexdigest() == sha, okey
        # nothing lost: a store recovered from the bucket alone serves the marker
        dest = tmp_path / "b" / "store"
        d.cdpctl("store", "recover", "--from", url, "--endpoint", rgw_env.endpoint, "--to", str(dest))
        r = Cdpd(tmp_path / "b", size="64MiB", segment_bytes="20MiB").start()
        with NbdClient.connect(r.uri(f"vol0@{marker['name']}")) as c:
            for off in range(0, 64 * MiB, 4 * MiB):
                assert c.pread(off, 4 * MiB) == bytes(img[off : off + 4 * MiB]), off
    finally:
        if not restarted:
            _restart_rgw(rgw_env.endpoint)
        if r is not None:
            r.stop()
        d.stop()
