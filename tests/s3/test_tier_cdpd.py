"""The S3 tier in a real cdpd against the real test RGW: writes over NBD and markers go
up (`cdpctl tier upload`, `tier status`, metrics, the `cdpctl status` line); `cdpctl
store recover` builds a store from the bucket alone; a second cdpd on it serves every
uploaded marker identical (qemu-img compare over NBD) and `verify` is clean; a bucket
without object lock stops cdpd at start with a clear error; cdpd kill -9 mid-upload
resumes with no manifest naming a missing or partial object."""

from __future__ import annotations

import hashlib
import json
import os
import random
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.targets.nbd.client import NbdClient
from cdp.tier.manifest import generations_prefix
from cdp.tier.s3 import S3
from cdp.tier.service import newest_manifest
from tests.conftest import require_tool
from tests.s3.fault_proxy import FaultProxy
from tests.s3.rgw import Rgw
from tools.harness import Cdpd

MiB = 1 << 20
SIZE = 32 * MiB


@pytest.fixture
def rgw_env(rgw: Rgw, monkeypatch: pytest.MonkeyPatch) -> Iterator[Rgw]:
    """cdpd and cdpctl find the RGW's keys by the SDK's chain, as in production."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rgw.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", rgw.secret_key)
    yield rgw


def tier_config(rgw: Rgw, url: str, extra: str = "") -> str:
    return f'\n[tier]\nurl = "{url}"\nendpoint = "{rgw.endpoint}"\n{extra}'


def _write(c: NbdClient, rng: random.Random, nbytes: int) -> None:
    done = 0
    while done < nbytes:
        ln = rng.choice((4096, 65536, 256 << 10))
        off = rng.randrange(0, SIZE - ln) & ~4095
        c.pwrite(rng.randbytes(ln // 2) + bytes(ln - ln // 2), off)
        done += ln
    c.flush()


def test_upload_recover_serve_identical(tmp_path: Path, rgw_env: Rgw, s3: S3,
                                        s3_bucket: str) -> None:
    require_tool("qemu-img")
    url = f"s3://{s3_bucket}/site1"
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB",
             extra_config=tier_config(rgw_env, url))
    d.start()
    r: Cdpd | None = None
    try:
        rng = random.Random(11)
        markers = []
        with NbdClient.connect(d.uri()) as c:
            for i in range(3):
                _write(c, rng, 2 * MiB)
                markers.append(d.cdpctl_json("snapshot", "--label", f"m{i}"))
            _write(c, rng, 3 * MiB)  # roll past the last marker
        up = d.cdpctl_json("tier", "upload")[0]
        assert up["state"] == "idle" and up["generation"] >= 1, up
        uploaded = up["uploaded_seq"]
        assert all(m["seq"] <= uploaded for m in markers), (markers, uploaded)
        st = d.cdpctl_json("tier", "status")[0]
        assert st["uploaded_segments"] >= 3 and st["last_error"] is None
        for k in ("state", "uploaded_segments", "pending_segments", "uploaded_bytes",
                  "local_bytes", "oldest_pending_age_seconds", "cache_hit_ratio", "last_error"):
            assert k in st
        assert "tier:          idle, generation" in d.cdpctl("status").stdout
        page = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics").read().decode()
        assert 'cdp_tier_uploaded_segments{volume="vol0"}' in page and 'cdp_tier_up{volume="vol0"} 1.0' in page

        dest = tmp_path / "b" / "store"
        rec = d.cdpctl("store", "recover", "--from", url, "--endpoint", rgw_env.endpoint,
                       "--to", str(dest))
        assert "recovering" in rec.stderr and "recovered" in rec.stdout
        r = Cdpd(tmp_path / "b", size="32MiB", segment_bytes="1MiB")
        r.start()
        for m in markers:
            p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw",
                                d.uri(f"vol0@{m['name']}"), r.uri(f"vol0@{m['name']}")],
                               capture_output=True, text=True, timeout=120)
            assert p.returncode == 0, (m, p.stdout, p.stderr)
        assert [m["seq"] for m in r.cdpctl_json("markers")] == [m["seq"] for m in markers]
        assert r.stop() == 0
        r = None
        v = subprocess.run([*_cdpctl(tmp_path / "b"), "verify", "--json"], capture_output=True,
                           text=True, timeout=300)
        assert v.returncode == 0, v.stdout + v.stderr
        # verify --tier: clean, then an object overwritten behind cdp's back is named
        ok = d.cdpctl("verify", "--tier", "--full")
        assert "vol0: tier ok" in ok.stdout, ok.stdout
        m = newest_manifest(s3, s3_bucket, "site1/", "vol0")
        assert m is not None
        victim = m.segments[len(m.segments) // 2]
        body = bytearray(s3.get_object(s3_bucket, victim.key))
        body[-1] ^= 0xFF
        # behind cdp's back (cdp's own put_object signs its digest: the store would
        # refuse a body that does not match it), its metadata lying too
        s3.client.put_object(Bucket=s3_bucket, Key=victim.key, Body=bytes(body),
                             Metadata={"sha256": victim.sha256})
        bad = d.cdpctl("verify", "--tier", "--full", check=False)
        assert bad.returncode == 6 and victim.key in bad.stdout, bad.stdout + bad.stderr
    finally:
        if r is not None:
            r.stop()
        d.stop()


def _cdpctl(tmp: Path) -> list[str]:
    import sys

    return [sys.executable, "-m", "cdp.cli.main", "--config", str(tmp / "cdp.toml")]


def test_object_lock_required_at_start(tmp_path: Path, rgw_env: Rgw, s3_bucket: str) -> None:
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB",
             extra_config=tier_config(rgw_env, f"s3://{s3_bucket}/x", "object_lock_days = 1\n"))
    with pytest.raises(RuntimeError, match="object lock"):
        d.start()


def test_locked_bucket_objects_carry_retention(tmp_path: Path, rgw_env: Rgw, s3: S3,
                                               s3_locked_bucket: str) -> None:
    url = f"s3://{s3_locked_bucket}/l"
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB",
             extra_config=tier_config(rgw_env, url, "object_lock_days = 1\n"))
    d.start()
    try:
        with NbdClient.connect(d.uri()) as c:
            _write(c, random.Random(2), 3 * MiB)
        up = d.cdpctl_json("tier", "upload")[0]
        assert up["generation"] >= 1, up
    finally:
        d.stop()
    m = newest_manifest(s3, s3_locked_bucket, "l/", "vol0")
    assert m is not None
    for key, _size, _sha in m.objects():
        h = s3.head(s3_locked_bucket, key)
        assert h.lock_mode == "COMPLIANCE" and h.retain_until is not None, key


def test_kill9_mid_upload_resumes(tmp_path: Path, rgw_env: Rgw, s3: S3, s3_bucket: str) -> None:
    """Big segments (multipart) and cdpd killed while its task uploads: after restart
    the newest manifest names only whole objects whose bytes match their sha256."""
    url = f"s3://{s3_bucket}/k"
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="64MiB", segment_bytes="20MiB",
             extra_config=tier_config(rgw_env, url, 'rate = "4MiB"\n'))
    d.start()
    rng = random.Random(4)
    with NbdClient.connect(d.uri()) as c:
        for _ in range(3):
            for i in range(21):
                c.pwrite(os.urandom(MiB), (i * MiB) % (60 * MiB))
            c.flush()
    def in_flight() -> list[dict]:  # type: ignore[type-arg]
        return list(s3.client.list_multipart_uploads(Bucket=s3_bucket, Prefix="k/").get("Uploads", []))

    deadline = time.monotonic() + 60
    while not in_flight() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert in_flight(), "no multipart upload seen in flight"
    time.sleep(0.5)  # some parts in
    d.kill9()
    assert in_flight()  # left behind by the kill
    d.start()
    try:
        with NbdClient.connect(d.uri()) as c:
            _write(c, rng, 2 * MiB)
        deadline = time.monotonic() + 120
        while True:
            up = d.cdpctl_json("tier", "upload")[0]
            if up["pending_segments"] == 0 or time.monotonic() > deadline:
                break
        assert up["pending_segments"] == 0 and up["state"] == "idle", up
        assert not in_flight()  # aborted when the task started again
    finally:
        d.stop()
    gens = list(s3.list_objects(s3_bucket, generations_prefix("k/", "vol0")))
    assert gens
    m = newest_manifest(s3, s3_bucket, "k/", "vol0")
    assert m is not None and len(m.segments) >= 3
    for key, size, sha in m.objects():
        body = s3.get_object(s3_bucket, key)
        assert len(body) == size and hashlib.sha256(body).hexdigest() == sha, key
    assert json.loads(json.dumps(m.last_seq)) > 0


def test_bucket_unreachable_ingest_goes_on_then_catches_up(
        tmp_path: Path, rgw_env: Rgw, s3: S3, s3_bucket: str, s3_fault_proxy: FaultProxy) -> None:
    """The store hangs (every request held, never answered) under writes: each flush still
    returns and nothing is uploaded meanwhile, so no flush waits on the tier; then the
    store refuses connections: status says unreachable with the error; once it answers,
    the pending segments go up and a store recovered from the bucket serves the marker
    identical."""
    url = f"s3://{s3_bucket}/u"
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB",
             extra_config=f'\n[tier]\nurl = "{url}"\nendpoint = "{s3_fault_proxy.endpoint}"\n')
    d.start()  # the bucket is checked at start, through the proxy still passing
    s3_fault_proxy.set_mode("hold")
    r: Cdpd | None = None
    try:
        rng = random.Random(8)
        with NbdClient.connect(d.uri()) as c:
            deadline = time.monotonic() + 60
            while s3_fault_proxy.held == 0:  # until the tier's upload hangs on the store
                assert time.monotonic() < deadline, "the tier sent the store no request"
                _write(c, rng, MiB)
                c.flush()
            before = d.cdpctl_json("tier", "status")[0]
            for _ in range(48):  # 12 MiB, every flush returns while the upload hangs
                off = rng.randrange(0, SIZE - (256 << 10)) & ~4095
                c.pwrite(rng.randbytes(256 << 10), off)
                c.flush()
            marker = d.cdpctl_json("snapshot", "--label", "during-outage")
            _write(c, rng, 3 * MiB)
            c.flush()
        during = d.cdpctl_json("tier", "status")[0]  # answers while the store hangs
        assert s3_fault_proxy.held >= 1  # still hanging: the flushes did not wait for it
        assert during["uploaded_seq"] == before["uploaded_seq"], (before, during)
        assert during["pending_segments"] >= before["pending_segments"] + 8, (before, during)
        s3_fault_proxy.set_mode("drop")  # the held connections close; new ones are dropped
        deadline = time.monotonic() + 120
        st = d.cdpctl_json("tier", "status")[0]
        while st["state"] != "unreachable" and time.monotonic() < deadline:
            time.sleep(0.2)
            st = d.cdpctl_json("tier", "status")[0]
        assert st["state"] == "unreachable" and st["pending_segments"] > 0, st
        assert "s3://" in (st["last_error"] or ""), st
        page = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics").read().decode()
        assert 'cdp_tier_up{volume="vol0"} 0.0' in page
        s3_fault_proxy.set_mode("pass")
        deadline = time.monotonic() + 120
        up = d.cdpctl_json("tier", "upload")[0]
        while up["pending_segments"] and time.monotonic() < deadline:
            up = d.cdpctl_json("tier", "upload")[0]
        assert up["state"] == "idle" and up["pending_segments"] == 0 and up["last_error"] is None, up
        assert up["uploaded_seq"] >= marker["seq"]
        dest = tmp_path / "b" / "store"
        d.cdpctl("store", "recover", "--from", url, "--endpoint", rgw_env.endpoint, "--to", str(dest))
        r = Cdpd(tmp_path / "b", size="32MiB", segment_bytes="1MiB").start()
        name = f"vol0@{marker['name']}"
        with NbdClient.connect(d.uri(name)) as a, NbdClient.connect(r.uri(name)) as b:
            for off in range(0, SIZE, 4 * MiB):
                assert a.pread(off, 4 * MiB) == b.pread(off, 4 * MiB), off
    finally:
        if r is not None:
            r.stop()
        d.stop()


def test_wrong_credentials_refused_ingest_goes_on(tmp_path: Path, rgw: Rgw, s3_bucket: str,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", rgw.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong-secret")
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB",
             extra_config=tier_config(rgw, f"s3://{s3_bucket}/w"))
    d.start()
    try:
        with NbdClient.connect(d.uri()) as c:
            _write(c, random.Random(3), 3 * MiB)
            _write(c, random.Random(4), 1 * MiB)  # ingest goes on
        st = d.cdpctl_json("tier", "upload")[0]
        assert st["state"] == "refused" and st["pending_segments"] > 0, st
        assert "SignatureDoesNotMatch" in st["last_error"] or "refused" in st["last_error"].lower(), st
    finally:
        d.stop()


def test_readable_credentials_file_refused_at_start(tmp_path: Path, rgw: Rgw, s3_bucket: str) -> None:
    (tmp_path / "a").mkdir()
    creds = tmp_path / "s3.credentials"
    creds.write_text(f"[default]\naws_access_key_id = {rgw.access_key}\n"
                     f"aws_secret_access_key = {rgw.secret_key}\n")
    creds.chmod(0o644)
    extra = tier_config(rgw, f"s3://{s3_bucket}/c", f'credentials_file = "{creds}"\n')
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB", extra_config=extra)
    with pytest.raises(RuntimeError, match="readable by group or other"):
        d.start()
    creds.chmod(0o600)
    d.start()
    try:
        with NbdClient.connect(d.uri()) as c:
            _write(c, random.Random(1), 3 * MiB)
        assert d.cdpctl_json("tier", "upload")[0]["generation"] >= 1
    finally:
        d.stop()
