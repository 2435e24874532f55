"""Byte-granular NBD with real clients straight at cdpd (no nbdkit blocksize filter in
front): nbdfuse + mkntfs + ntfs-3g and nbdfuse + mkfs.ext4 + fuse2fs on a cdp export;
unaligned qemu-io and libnbd (``import nbd``) requests (1 byte, 511 bytes, straddling
4 KiB, at the export's end) against a model; a proxy volume over a file primary (byte
granular too) and over an NBD primary that needs 512-byte alignment (cdp advertises
that minimum and refuses unaligned requests with EINVAL)."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.fuse import nbdfuse_file
from tools.ext4_fixture import mounted as ext4_mounted
from tools.harness import Cdpd, run
from tools.ntfs_fixture import mounted

MiB = 1 << 20
SIZE = 32 * MiB

#: unaligned (offset, length) pairs every client below writes and reads back
CASES = [(4095, 1), (1, 511), (4000, 200), (8191, 4098), (SIZE - 1, 1), (SIZE - 511, 511),
         (3 * MiB + 17, 70000), (12345, 1)]  # fmt: skip


@pytest.fixture
def cdpd(tmp_path: Path) -> Iterator[Cdpd]:
    d = Cdpd(tmp_path, size="32MiB").start()
    try:
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def written_bytes(d: Cdpd, vol: str = "vol0") -> int:
    s = d.cdpctl_json("status", "-V", vol)
    s = s[0] if isinstance(s, list) else s
    return int(s["session_bytes_written"])


@contextmanager
def fused(uri: str, tmp: Path) -> Iterator[Path]:
    """The export as a file, through nbdfuse talking NBD straight to cdpd."""
    with nbdfuse_file(uri, tmp / "nbdfuse") as disk:
        yield disk


def files_for(rng: random.Random) -> dict[str, bytes]:
    """Files of awkward sizes (1 and 511 bytes, odd lengths, a few MiB)."""
    return {"one": b"\x01", "sector-1": rng.randbytes(511), "odd": rng.randbytes(70001),
            "dir/nested": rng.randbytes(5000), "big": rng.randbytes(3 * MiB + 3)}  # fmt: skip


def write_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        p = mnt / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
    os.sync()


def read_files(mnt: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        got = (mnt / name).read_bytes()
        assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest(), name


def test_ntfs_straight_on_a_cdp_export(cdpd: Cdpd, tmp_path: Path) -> None:
    """mkntfs and ntfs-3g write unaligned byte ranges; without the blocksize filter they
    reach cdp as they are, and a marker's image holds the files."""
    require_tool("nbdfuse", "mkntfs", "ntfs-3g", "fusermount3")
    files = files_for(random.Random(1))
    with fused(cdpd.uri(), tmp_path) as disk:
        r = run("mkntfs", "-F", "-Q", "-q", "-L", "cdp", str(disk), check=False)
        assert r.returncode == 0, r.stderr.decode()  # was "Error writing ... Invalid argument"
        with mounted(disk) as mnt:
            write_files(mnt, files)
        with mounted(disk, "ro") as mnt:
            read_files(mnt, files)
    marker = cdpd.cdpctl("snapshot").stdout.strip()
    img = tmp_path / "ntfs.img"
    cdpd.cdpctl("image", "--at", marker, "-o", str(img))
    with mounted(img, "ro") as mnt:
        read_files(mnt, files)


def test_ext4_straight_on_a_cdp_export(cdpd: Cdpd, tmp_path: Path) -> None:
    require_tool("nbdfuse", "mkfs.ext4", "fuse2fs", "e2fsck", "fusermount3")
    files = files_for(random.Random(2))
    with fused(cdpd.uri(), tmp_path) as disk:
        run("mkfs.ext4", "-F", "-q", "-E", "lazy_itable_init=0,lazy_journal_init=0", str(disk))
        with ext4_mounted(disk) as mnt:
            write_files(mnt, files)
        run("e2fsck", "-fn", str(disk))
    marker = cdpd.cdpctl("snapshot").stdout.strip()
    img = tmp_path / "ext4.img"
    cdpd.cdpctl("image", "--at", marker, "-o", str(img))
    run("e2fsck", "-fn", str(img))
    with ext4_mounted(img, "ro") as mnt:
        read_files(mnt, files)


def qemu_io(uri: str, *cmds: str) -> str:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    out = run(*args, uri).stdout.decode()
    assert "failed" not in out.lower(), out
    return out


def test_qemu_io_unaligned_against_a_model(cdpd: Cdpd, tmp_path: Path) -> None:
    """qemu's NBD client honours the advertised minimum: with 1 it sends each unaligned
    request as it is (no read-modify-write: cdp journals exactly the bytes written)."""
    require_tool("qemu-io", "qemu-img", "nbdinfo")
    exp = json.loads(run("nbdinfo", "--json", cdpd.uri()).stdout)["exports"][0]
    assert exp["block_size_minimum"] == 1 and exp["block_size_preferred"] == 4096
    model = bytearray(SIZE)
    cmds = []
    for i, (off, n) in enumerate(CASES):
        cmds.append(f"write -P {i + 1} {off} {n}")
        model[off : off + n] = bytes([i + 1]) * n
    cmds += ["write -z 4097 3", "write -P 0x77 -f 5 7"]  # a zeroed range, a FUA write
    model[4097:4100] = bytes(3)
    model[5:12] = b"\x77" * 7
    qemu_io(cdpd.uri(), *cmds)
    assert written_bytes(cdpd) == sum(n for _, n in CASES) + 7
    qemu_io(cdpd.uri(), *[f"read -P {model[off]} {off} 1" for off, _ in CASES],
            "read -P 0 4097 3", "read -P 0x77 5 7", f"read -P 0 {SIZE - 512} 1")  # fmt: skip
    ref = tmp_path / "model.img"
    ref.write_bytes(model)
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), cdpd.uri())


LIBNBD_SCRIPT = r'''
import errno, random, sys
import nbd

uri, seed, expect_min = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
cases = [tuple(map(int, c.split(":"))) for c in sys.argv[4].split(",")]
h = nbd.NBD()
h.add_meta_context("base:allocation")
h.connect_uri(uri)
assert h.get_block_size(nbd.SIZE_MINIMUM) == expect_min, h.get_block_size(nbd.SIZE_MINIMUM)
if expect_min > 1:
    # libnbd itself refuses unaligned requests unless told not to; then cdp answers EINVAL
    h.set_strict_mode(h.get_strict_mode() & ~nbd.STRICT_ALIGN)
    for what, call in [("pwrite", lambda: h.pwrite(b"x", 1)),
                       ("pread", lambda: h.pread(511, 512)),
                       ("zero", lambda: h.zero(100, 0))]:
        try:
            call()
        except nbd.Error as e:
            assert e.errnum == errno.EINVAL, (what, e)
        else:
            raise AssertionError(what + " of an unaligned range succeeded")
    h.pwrite(b"a" * 512, 512)
    assert h.pread(512, 512) == b"a" * 512
    print("ok")
    sys.exit(0)
size = h.get_size()
rng = random.Random(seed)
model = bytearray(h.pread(size, 0))
alloc = bytearray(size)  # 1: data, 0: hole or zeroed


def pwrite(off, n, fua=False):
    data = rng.randbytes(n)
    h.pwrite(data, off, nbd.CMD_FLAG_FUA if fua else 0)
    model[off:off + n] = data
    alloc[off:off + n] = b"\1" * n


def zero(off, n, trim=False):
    (h.trim if trim else h.zero)(n, off)
    model[off:off + n] = bytes(n)
    alloc[off:off + n] = bytes(n)


def check(off, n):
    assert h.pread(n, off) == model[off:off + n], ("pread", off, n)
    h.cache(n, off)
    runs = []

    def extents(ctx, o, entries, err):
        if ctx == "base:allocation":
            runs.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(n, off, extents)
    # cdp answers in whole 512-byte sectors (qemu-img works in sectors): a sector is
    # data when any byte of it (inside the request) is, else hole and zero
    pos, end = off, off + n
    for length, flags in runs:
        assert flags in (0, 3), flags
        if flags:
            assert not any(model[pos:pos + length]), ("hole that is not zero", pos, length)
        for sector in range(pos // 512, (min(pos + length, end) - 1) // 512 + 1):
            lo, hi = max(off, sector * 512), min(end, sector * 512 + 512)
            assert (flags == 0) == any(alloc[lo:hi]), ("block_status", off, n, sector, flags)
        pos += length
    assert pos == end, (off, n, runs)


for off, n in cases:
    pwrite(off, n)
    check(off, n)
    check(max(0, off - 3), min(size - max(0, off - 3), n + 7))
for _ in range(300):
    n = rng.choice([1, 2, 511, 513, 4095, 4097, rng.randrange(1, 200000)])
    off = rng.randrange(0, size - n + 1)
    k = rng.random()
    if k < 0.6:
        pwrite(off, n, fua=k < 0.1)
    elif k < 0.75:
        zero(off, n)
    elif k < 0.85:
        zero(off, n, trim=True)
    check(off, n)
h.flush()
assert h.pread(size, 0) == model
print("ok")
'''


def libnbd_python() -> str:
    """An interpreter that can ``import nbd`` (python3-libnbd is a Debian package, so it
    is the system python's, not the virtualenv's)."""
    for exe in (sys.executable, shutil.which("python3"), "/usr/bin/python3"):
        if exe and subprocess.run([exe, "-c", "import nbd"], capture_output=True).returncode == 0:
            return exe
    msg = "requires python3-libnbd (run `make test`, which installs them)"
    if os.environ.get("CDP_ALLOW_MISSING_TOOLS") == "1" and os.environ.get("CI") != "true":
        pytest.skip(msg)
    pytest.fail(msg)


def libnbd(tmp: Path, uri: str, *, seed: int = 1, expect_min: int = 1) -> None:
    script = tmp / "libnbd_unaligned.py"
    script.write_text(LIBNBD_SCRIPT)
    cases = ",".join(f"{o}:{n}" for o, n in CASES if o + n <= SIZE)
    r = run(libnbd_python(), str(script), uri, str(seed), str(expect_min), cases, timeout=600)
    assert r.stdout.decode().strip().endswith("ok")


def test_libnbd_unaligned_against_a_model(cdpd: Cdpd, tmp_path: Path) -> None:
    """libnbd checks alignment against what the server advertises (strict mode): every
    unaligned pwrite/zero/trim/cache/block_status passes, reads and the
    ``base:allocation`` sectors equal a model, on the live export. Then qemu-img, which
    copies and compares by sectors using block status, agrees with ``cdpctl image``."""
    require_tool("qemu-img")
    libnbd(tmp_path, cdpd.uri())
    marker = cdpd.cdpctl("snapshot").stdout.strip()
    ref = tmp_path / "ref.img"
    cdpd.cdpctl("image", "--at", marker, "-o", str(ref))
    live = tmp_path / "live.img"
    run("qemu-img", "convert", "-f", "raw", "-O", "raw", cdpd.uri(), str(live))
    assert live.read_bytes() == ref.read_bytes()
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(ref), cdpd.uri(f"vol0@{marker}"))


def test_proxy_volume_over_a_file_primary_is_byte_granular(tmp_path: Path) -> None:
    require_tool("qemu-img", "nbdinfo")
    primary = tmp_path / "primary.img"
    primary.write_bytes(bytes(SIZE))
    d = Cdpd(tmp_path, size="4MiB").start()
    try:
        d.cdpctl("volume", "create", "p", "--mode", "proxy", "--primary", str(primary),
                 "--no-initial-copy")
        exp = json.loads(run("nbdinfo", "--json", d.uri("p")).stdout)["exports"][0]
        assert exp["block_size_minimum"] == 1
        libnbd(tmp_path, d.uri("p"), seed=3)
        img = tmp_path / "journal.img"
        d.cdpctl("image", "-V", "p", "-o", str(img))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(primary), str(img))
    finally:
        d.stop()


def test_proxy_volume_over_an_aligned_nbd_primary_advertises_its_minimum(tmp_path: Path) -> None:
    """An NBD primary that needs 512-byte requests: cdp's live export of that volume
    advertises 512, refuses unaligned requests with EINVAL (they never reach the
    primary), and qemu-io's unaligned writes arrive as its read-modify-writes."""
    require_tool("nbdkit", "nbdinfo", "qemu-io")
    sock = tmp_path / "nbdkit.sock"
    kit = subprocess.Popen(
        ["nbdkit", "-f", "--exit-with-parent", "-U", str(sock), "--filter=blocksize-policy",
         "memory", "16M", "blocksize-minimum=512", "blocksize-error-policy=error"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    d = Cdpd(tmp_path, size="4MiB").start()
    try:
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert time.monotonic() < deadline, "nbdkit did not start"
            time.sleep(0.05)
        uri = f"nbd+unix:///?socket={sock}"
        d.cdpctl("volume", "create", "a", "--mode", "proxy", "--primary", uri, "--no-initial-copy")
        exp = json.loads(run("nbdinfo", "--json", d.uri("a")).stdout)["exports"][0]
        assert exp["block_size_minimum"] == 512 and exp["block_size_preferred"] == 4096
        d.cdpctl("snapshot", "-V", "a")
        pit = json.loads(run("nbdinfo", "--json", d.uri("a@marker1")).stdout)["exports"][0]
        assert pit["block_size_minimum"] == 1  # read from the journal
        libnbd(tmp_path, d.uri("a"), expect_min=512)
        qemu_io(d.uri("a"), "write -P 0x5a 3000 3", "read -P 0x5a 3000 3", "read -P 0 3003 21")
        st = d.cdpctl_json("status", "-V", "a")
        st = st[0] if isinstance(st, list) else st
        assert st["proxy"]["primary_errors"] == 0
    finally:
        d.stop()
        kit.terminate()
        kit.wait(10)
