"""The web console's file download over history the S3 tier dropped locally, in a real
cdpd against the real test RGW: after `cdpctl tier upload` has dropped the segments
holding a marker's records, `GET /api/v1/volumes/vol0/restore` of a file (and of a
directory, as a tar stream) at that marker returns the bytes that were written: the
download fetches what it needs from the bucket, streaming, and never fails with
NotLocal."""

from __future__ import annotations

import io
import random
import tarfile
import time
import urllib.request
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from tests.conftest import require_tool
from tests.s3.rgw import Rgw
from tests.s3.test_tier_cdpd import rgw_env, tier_config  # noqa: F401 (fixture)
from tools.ext4_fixture import mkfs
from tools.harness import Cdpd

MiB = 1 << 20


def _put(c: NbdClient, data: bytes, at: int) -> None:
    for off in range(0, len(data), 256 << 10):
        c.pwrite(data[off : off + (256 << 10)], at + off)
    c.flush()


def _get(d: Cdpd, token: str, query: str) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(f"{d.http_url}/api/v1/volumes/vol0/restore?{query}",
                                 headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, dict(r.headers), r.read()
    except urllib.error.HTTPError as e:
        return e.code, dict(e.headers), e.read()


def test_web_download_over_dropped_history(tmp_path: Path, rgw_env: Rgw,  # noqa: F811
                                           s3_bucket: str) -> None:
    require_tool("mkfs.ext4", "e2fsck")
    rng = random.Random(2626)
    files = {"/a.bin": rng.randbytes(3 * MiB + 1234), "/dir/b.bin": rng.randbytes(700_000),
             "/dir/c.txt": b"see\n"}
    src = tmp_path / "src"
    for path, data in files.items():
        (src / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (src / path.lstrip("/")).write_bytes(data)
    fs = mkfs(tmp_path / "fs.img", 12 * MiB, src).read_bytes()
    (tmp_path / "a").mkdir()
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB", extra_config=tier_config(
        rgw_env, f"s3://{s3_bucket}/web", 'local_cache_bytes = "6MiB"\n'))
    d.start()
    try:
        with NbdClient.connect(d.uri()) as c:
            _put(c, fs, 0)  # the file system: only m1 needs these records
            d.cdpctl_json("snapshot", "--label", "m1")
            _put(c, rng.randbytes(16 * MiB), 0)  # overwrites all of it
            _put(c, rng.randbytes(3 * MiB), 24 * MiB)  # roll past the marker
        deadline = time.monotonic() + 120
        while not d.cdpctl_json("versions")["versions"]:  # m1 catalogued
            assert time.monotonic() < deadline
            time.sleep(0.2)
        up = d.cdpctl_json("tier", "upload")[0]
        assert up["state"] == "idle" and up["dropped_segments"] >= 15, up
        jdir = d.store / "volumes" / "vol0" / "journal"
        assert len(list(jdir.glob("*.seg"))) <= 6  # m1's records are in the bucket
        token = (d.store / "http.token").read_text().strip()

        for path, data in files.items():
            status, headers, body = _get(d, token, f"path={path}&at=m1")
            assert status == 200, (path, body[:300])
            assert int(headers["Content-Length"]) == len(data)
            assert body == data, path
        # a directory: a tar stream of its files, each read from the bucket
        status, headers, body = _get(d, token, "path=/dir&at=m1")
        assert status == 200 and headers["Content-Type"] == "application/x-tar", body[:300]
        with tarfile.open(fileobj=io.BytesIO(body)) as tar:
            got = {m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
                   for m in tar.getmembers() if m.isfile()}
        assert got == {"dir/b.bin": files["/dir/b.bin"], "dir/c.txt": files["/dir/c.txt"]}
        st = d.cdpctl_json("tier", "status")[0]
        assert st["cache_hit_ratio"] is not None and st["last_error"] is None, st
        assert "NotLocal" not in d.logs() and "not local" not in d.logs()
    finally:
        d.stop()
