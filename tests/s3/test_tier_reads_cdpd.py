"""Reads of tiered history in a real cdpd against the real test RGW: after `cdpctl tier
upload` the uploaded segments are dropped locally, the store's local journal bytes
shrink, every marker still reads identical over NBD (qemu-img compare against the image
taken before the upload) and with `cdpctl image --at`; the read cache stays within
`local_cache_bytes`; a tiered object overwritten behind cdp's back fails the read of
the point that needs it (EIO over NBD, exit 6), other points read fine."""

from __future__ import annotations

import random
import subprocess
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from cdp.tier.s3 import S3
from cdp.tier.service import newest_manifest
from tests.conftest import require_tool
from tests.s3.rgw import Rgw
from tests.s3.test_tier_cdpd import rgw_env, tier_config  # noqa: F401 (fixture)
from tools.harness import Cdpd

MiB = 1 << 20


def _fill(c: NbdClient, rng: random.Random, start: int, end: int, img: bytearray) -> None:
    for off in range(start, end, 256 << 10):
        data = rng.randbytes(256 << 10)
        c.pwrite(data, off)
        img[off : off + len(data)] = data
    c.flush()


def _compare(a: str, b: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                          capture_output=True, text=True, timeout=300)


def test_dropped_history_serves_identical(tmp_path: Path, rgw_env: Rgw,  # noqa: F811
                                          s3: S3, s3_bucket: str) -> None:
    require_tool("qemu-img")
    url = f"s3://{s3_bucket}/reads"
    d = Cdpd(tmp_path, size="32MiB", segment_bytes="1MiB",
             extra_config=tier_config(rgw_env, url, 'local_cache_bytes = "4MiB"\n'))
    d.start()
    try:
        rng = random.Random(5)
        img = bytearray(32 * MiB)
        before: dict[str, Path] = {}

        def mark(name: str) -> None:
            d.cdpctl_json("snapshot", "--label", name)
            before[name] = tmp_path / f"before-{name}.raw"
            before[name].write_bytes(img)  # what the point holds, known independently

        with NbdClient.connect(d.uri()) as c:
            _fill(c, rng, 0, 8 * MiB, img)  # round 0: only m0 needs these records
            mark("m0")
            _fill(c, rng, 0, 8 * MiB, img)  # round 1 overwrites all of round 0
            mark("m1")
            _fill(c, rng, 8 * MiB, 16 * MiB, img)
            mark("m2")
            _fill(c, rng, 16 * MiB, 19 * MiB, img)  # roll past the last marker
        # (cdpd's own tier task uploads and drops as segments seal; upload = one more batch)
        up = d.cdpctl_json("tier", "upload")[0]
        assert up["state"] == "idle" and up["generation"] >= 1, up
        assert up["dropped_segments"] >= 10, up
        local0 = up["uploaded_bytes"] + (2 << 20)  # what the journal would hold locally
        assert up["local_bytes"] < local0 - 10 * MiB, up
        jdir = d.store / "volumes" / "vol0" / "journal"
        assert len(list(jdir.glob("*.seg"))) <= 8
        # a tiered object overwritten behind cdp's back: the first segment (round 0)
        m = newest_manifest(s3, s3_bucket, "reads/", "vol0")
        assert m is not None
        victim = m.segments[0]
        body = bytearray(s3.get_object(s3_bucket, victim.key))
        for i in range(4096, len(body), 4096):
            body[i] ^= 0x5A
        s3.put_object(s3_bucket, victim.key, bytes(body))
        for name in ("m1", "m2"):
            p = _compare(d.uri(f"vol0@{name}"), str(before[name]))
            assert p.returncode == 0, (name, p.stdout, p.stderr)
            out = tmp_path / f"after-{name}.raw"
            d.cdpctl("image", "--at", name, "-o", str(out))
            assert out.read_bytes() == before[name].read_bytes(), name
        cache = sum(f.stat().st_size for f in (jdir / "cache").iterdir())
        assert 0 < cache <= 4 * MiB
        st = d.cdpctl_json("tier", "status")[0]
        assert st["cache_hit_ratio"] is not None and st["local_bytes"] < local0 - 10 * MiB
        # the point that needs the tampered object fails cleanly, never serves its bytes
        bad = d.cdpctl("image", "--at", "m0", "-o", str(tmp_path / "m0.raw"), check=False)
        assert bad.returncode == 6, bad.stdout + bad.stderr
        assert not (tmp_path / "m0.raw").exists()
        p = _compare(d.uri("vol0@m0"), str(before["m0"]))
        assert p.returncode != 0 and "Input/output error" in p.stderr + p.stdout, p
        p = _compare(d.uri("vol0@m2"), str(before["m2"]))
        assert p.returncode == 0, p.stderr
    finally:
        d.stop()
