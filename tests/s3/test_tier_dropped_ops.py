"""What reads history besides exports, on history the S3 tier dropped locally, in a real
cdpd against the real test RGW: after `cdpctl tier upload` has dropped the segments
holding a marker's records, `cdpctl restore` of files on ext4 at that marker equals
what was written, `changed` lists the change, `export` (a qcow2 overlay and a cdpdiff
stream) rebuilds the marker from the one before (qemu-img compare, `cdpctl apply`), and
a replica started afterwards catches up through the dropped history (qemu-img compare
of both NBD exports at the marker and at the head). Each fetches what it needs from the
bucket; none stops with NotLocal."""

from __future__ import annotations

import os
import random
import socket
import subprocess
import time
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from tests.conftest import require_tool
from tests.s3.rgw import Rgw
from tests.s3.test_tier_cdpd import rgw_env, tier_config  # noqa: F401 (fixture)
from tools.ext4_fixture import mkfs
from tools.harness import Cdpd

MiB = 1 << 20
SECRET = b"tier-replication-secret-0123456789"


def _put(c: NbdClient, data: bytes, at: int, img: bytearray) -> None:
    for off in range(0, len(data), 256 << 10):
        piece = data[off : off + (256 << 10)]
        c.pwrite(piece, at + off)
    img[at : at + len(data)] = data
    c.flush()


def _compare(a: str, b: str) -> None:
    p = subprocess.run(["qemu-img", "compare", "-f", "raw", "-F", "raw", a, b],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, (a, b, p.stdout, p.stderr)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _caught_up(src: Cdpd, timeout: float = 180) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = src.cdpctl_json("replicate", "status", "-V", "vol0")[0]
        if st["state"] in ("streaming", "catching-up") and st["lag_records"] == 0:
            return dict(st)
        assert st["state"] not in ("refused",), st
        assert time.monotonic() < deadline, st
        time.sleep(0.3)


def test_restore_changed_export_replicate_over_dropped_history(
        tmp_path: Path, rgw_env: Rgw, s3_bucket: str) -> None:  # noqa: F811
    require_tool("qemu-img", "mkfs.ext4", "e2fsck")
    rng = random.Random(26)
    files = {"/a.bin": rng.randbytes(3 * MiB + 1234), "/dir/b.bin": rng.randbytes(700_000)}
    src = tmp_path / "src"
    for path, data in files.items():
        (src / path.lstrip("/")).parent.mkdir(parents=True, exist_ok=True)
        (src / path.lstrip("/")).write_bytes(data)
    fs = mkfs(tmp_path / "fs.img", 12 * MiB, src).read_bytes()

    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    os.chmod(secret, 0o600)
    port = _free_port()
    for name in ("a", "t"):
        (tmp_path / name).mkdir()
    url = f"s3://{s3_bucket}/ops"
    d = Cdpd(tmp_path / "a", size="32MiB", segment_bytes="1MiB", extra_config=(
        tier_config(rgw_env, url, 'local_cache_bytes = "6MiB"\n')
        + f'\n[replication]\nsecret_file = "{secret}"\n'))
    tgt = Cdpd(tmp_path / "t", size="32MiB", extra_config=(
        f'\n[replication]\nlisten = "127.0.0.1:{port}"\nsecret_file = "{secret}"\n'))
    d.start()
    tgt.start()
    try:
        img = bytearray(32 * MiB)
        with NbdClient.connect(d.uri()) as c:
            _put(c, rng.randbytes(4 * MiB), 20 * MiB, img)
            d.cdpctl_json("snapshot", "--label", "m0")
            (d.tmp / "m0.img").write_bytes(img)
            _put(c, fs, 0, img)  # the file system: only m1 needs these records
            d.cdpctl_json("snapshot", "--label", "m1")
            (d.tmp / "m1.img").write_bytes(img)
            _put(c, rng.randbytes(16 * MiB), 0, img)  # overwrites all of it
            _put(c, rng.randbytes(3 * MiB), 24 * MiB, img)  # roll past the last marker
        deadline = time.monotonic() + 120
        while len(d.cdpctl_json("versions")["versions"]) < 2:  # m1 catalogued
            assert time.monotonic() < deadline
            time.sleep(0.2)
        up = d.cdpctl_json("tier", "upload")[0]
        assert up["state"] == "idle" and up["dropped_segments"] >= 20, up
        jdir = d.store / "volumes" / "vol0" / "journal"
        assert len(list(jdir.glob("*.seg"))) <= 6  # m0's and m1's records are in the bucket

        # restore: each file as it was written
        for path, data in files.items():
            out = d.tmp / "restored"
            r = d.cdpctl("restore", path, "--at", "m1", "-o", str(out), check=False)
            assert r.returncode == 0, r.stdout + r.stderr
            assert out.read_bytes() == data, path
        # changed: the file system's blocks changed between m0 and m1
        ch = d.cdpctl_json("changed", "--from", "m0", "--to", "m1")
        assert ch["ranges"] and ch["data_bytes"] >= 4 * MiB, ch
        # export: a qcow2 overlay over m0's image is m1's image; so is m0 + the stream
        d.cdpctl("export", "--from", "m0", "--to", "m1", "-o", str(d.tmp / "d.qcow2"),
                 "--backing", "m0.img")
        p = subprocess.run(["qemu-img", "compare", str(d.tmp / "d.qcow2"), str(d.tmp / "m1.img")],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stdout + p.stderr
        d.cdpctl("export", "--from", "m0", "--to", "m1", "-o", str(d.tmp / "d.cdpdiff"))
        copy = d.tmp / "applied.img"
        copy.write_bytes((d.tmp / "m0.img").read_bytes())
        d.cdpctl("apply", str(d.tmp / "d.cdpdiff"), "--to", str(copy))
        assert copy.read_bytes() == (d.tmp / "m1.img").read_bytes()
        # replication catch-up from the first record, most of it only in the bucket
        d.cdpctl("replicate", "start", "-V", "vol0", "--to", f"127.0.0.1:{port}", "--as", "rep0")
        _caught_up(d)
        _compare(tgt.uri("rep0@m1"), str(d.tmp / "m1.img"))
        _compare(tgt.uri("rep0"), d.uri("vol0"))
        st = d.cdpctl_json("tier", "status")[0]
        assert st["cache_hit_ratio"] is not None and st["last_error"] is None, st
        assert "NotLocal" not in d.logs() and "not local" not in d.logs()
    finally:
        tgt.stop()
        d.stop()
