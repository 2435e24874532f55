"""A running QEMU mirrors its drive into cdp, the way a KVM host protects a VM.

One ``qemu-system-x86_64`` per module (TCG, ``-machine none``: no guest OS is needed,
the drives' writes come from HMP ``qemu-io`` sent over QMP), with a qcow2 drive for the
NBD test and a raw one for the iSCSI test. Each test:

- starts ``blockdev-mirror`` with ``sync: full`` and ``copy-mode: write-blocking`` to a
  cdp export (an ``nbd`` / ``iscsi`` node made with ``blockdev-add``), writing into the
  drive while the initial copy runs;
- once the job is READY, writes (aligned, 1 byte, 511 bytes, straddling 4 KiB, at the
  end, zeroes) and takes cdp markers between the writes. In write-blocking mode a guest
  write completes only after the target acknowledged it, and an HMP ``qemu-io`` command
  returns only when its write completed, so at each marker exactly the writes sent so
  far are in: the test keeps a model and saves it at every marker;
- cancels the job, writes while nothing mirrors, and restarts: NBD with an incremental
  catch-up (QEMU 7.2's ``blockdev-mirror`` has no bitmap sync, so a dirty bitmap added
  when the mirror stopped feeds ``blockdev-backup`` ``sync: incremental``, then a
  ``sync: none`` mirror takes over) and then with ``sync: top``; iSCSI with
  ``sync: top``;
- checks that cdp's live volume equals the drive (``qemu-img compare`` over NBD) and
  that every marker equals the model saved when it was taken.
"""

from __future__ import annotations

import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tests.integration.qmp import Qmp, QmpError
from tools.harness import Cdpd, run

MiB = 1 << 20
SIZE = 32 * MiB


@dataclass
class Vm:
    """The QEMU process, its QMP connection and what its drives hold."""

    proc: subprocess.Popen[bytes]
    qmp: Qmp
    stdout: Path
    images: dict[str, Path]
    #: drive id -> its content as the writes so far made it
    models: dict[str, bytearray] = field(default_factory=dict)


def initial_image(path: Path, fmt: str, seed: int) -> bytearray:
    """A drive that already holds data: random 1 MiB pieces every 4 MiB."""
    rng = random.Random(seed)
    model = bytearray(SIZE)
    for off in range(0, SIZE, 4 * MiB):
        model[off : off + MiB] = rng.randbytes(MiB)
    raw = path.with_suffix(".raw") if fmt != "raw" else path
    raw.write_bytes(model)
    if fmt != "raw":
        run("qemu-img", "convert", "-f", "raw", "-O", fmt, str(raw), str(path))
        raw.unlink()
    return model


@pytest.fixture(scope="module")
def vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Vm]:
    require_tool("qemu-system-x86_64", "qemu-img")
    tmp = tmp_path_factory.mktemp("vm")
    images = {"drive0": tmp / "drive0.qcow2", "drive1": tmp / "drive1.raw"}
    models = {"drive0": initial_image(images["drive0"], "qcow2", 1),
              "drive1": initial_image(images["drive1"], "raw", 2)}  # fmt: skip
    sock = tmp / "qmp.sock"
    stdout = tmp / "qemu.out"
    cmd = ["qemu-system-x86_64", "-nodefaults", "-display", "none", "-machine", "none",
           "-accel", "tcg", "-qmp", f"unix:{sock},server=on,wait=off",
           "-drive", f"if=none,id=drive0,file={images['drive0']},format=qcow2",
           "-drive", f"if=none,id=drive1,file={images['drive1']},format=raw"]  # fmt: skip
    with open(stdout, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    try:
        qmp = Qmp.connect(str(sock))
        yield Vm(proc, qmp, stdout, images, models)
        try:
            qmp.execute("quit", timeout=10)
        except (OSError, QmpError, TimeoutError):
            pass
    finally:
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


class Guest:
    """Writes into one running drive through HMP ``qemu-io``, kept in a model; markers
    taken through ``cdpctl snapshot`` with the model saved at that moment."""

    def __init__(self, vm: Vm, drive: str, cdpd: Cdpd, tmp: Path) -> None:
        self.vm, self.drive, self.cdpd, self.tmp = vm, drive, cdpd, tmp
        self.model = vm.models[drive]
        self.markers: list[tuple[str, Path]] = []
        #: (offset, length) of every write so far
        self.written: list[tuple[int, int]] = []

    def io(self, command: str, off: int, n: int) -> None:
        """One qemu-io command; returns when the write completed (write-blocking: on
        the mirror target too)."""
        self.vm.qmp.hmp(f'qemu-io {self.drive} "{command}"')
        self.written.append((off, n))

    def write(self, off: int, n: int, pattern: int) -> None:
        self.io(f"write -P {pattern} {off} {n}", off, n)
        self.model[off : off + n] = bytes([pattern]) * n

    def zero(self, off: int, n: int) -> None:
        self.io(f"write -z {off} {n}", off, n)
        self.model[off : off + n] = bytes(n)

    def burst(self, rng: random.Random) -> None:
        """Aligned and unaligned writes (1 byte, 511 bytes, straddling 4 KiB, the
        drive's last bytes) and a zeroed range."""
        p = rng.randrange(1, 256)
        self.write(rng.randrange(0, SIZE // 65536) * 65536, 65536, p)
        self.write(rng.randrange(0, SIZE), 1, p ^ 1)
        self.write(rng.randrange(0, SIZE - 511), 511, p ^ 2)
        self.write(rng.randrange(1, SIZE // 4096) * 4096 - 100, 200, p ^ 3)
        self.write(SIZE - 1 - rng.randrange(0, 512), 1, p ^ 4)
        self.zero(rng.randrange(0, SIZE - 8192), rng.randrange(1, 8192))

    def marker(self, expect: bytes | bytearray | None = None) -> str:
        """A cdp marker now; what it must equal (default: the model now) is saved."""
        name = self.cdpd.cdpctl("snapshot", "--label", f"{self.drive}-{len(self.markers)}").stdout.strip()
        ref = self.tmp / f"{name}.raw"
        ref.write_bytes(self.model if expect is None else expect)
        self.markers.append((name, ref))
        return name

    def check_live(self) -> None:
        """cdp's live volume equals the model."""
        now = self.tmp / "now.raw"
        now.write_bytes(self.model)
        compare(now, "raw", self.cdpd.uri(), "raw")

    def check(self) -> None:
        """The drive equals the model; cdp's live volume equals the drive; every marker
        equals the model saved when it was taken."""
        fmt = "qcow2" if self.vm.images[self.drive].suffix == ".qcow2" else "raw"
        self.vm.qmp.hmp(f'qemu-io {self.drive} "flush"')  # qcow2 metadata to the file
        now = self.tmp / "now.raw"
        now.write_bytes(self.model)
        compare(now, "raw", str(self.vm.images[self.drive]), fmt)  # -U: the VM holds it
        compare(str(self.vm.images[self.drive]), fmt, self.cdpd.uri(), "raw")
        for name, ref in self.markers:
            compare(ref, "raw", self.cdpd.uri(f"vol0@{name}"), "raw")
        out = self.vm.stdout.read_bytes().decode(errors="replace")
        assert "failed" not in out.lower(), out[-2000:]


def compare(a: Path | str, fa: str, b: str, fb: str) -> None:
    r = run("qemu-img", "compare", "-U", "-f", fa, "-F", fb, str(a), b, check=False)
    assert r.returncode == 0, f"{a} vs {b}: " + r.stdout.decode() + r.stderr.decode()


def mirror(q: Qmp, job: str, drive: str, target: str, sync: str) -> None:
    q.execute("blockdev-mirror", **{"job-id": job, "device": drive, "target": target,
                                    "sync": sync, "copy-mode": "write-blocking"})  # fmt: skip


def wait_ready(q: Qmp, job: str) -> None:
    q.wait_event("BLOCK_JOB_READY", device=job)
    (info,) = [j for j in q.execute("query-block-jobs") if j["device"] == job]
    assert info["ready"] and info["offset"] == info["len"], info


def cancel(q: Qmp, job: str) -> None:
    """Cancel a READY mirror: it stops after the target holds everything written so far
    (BLOCK_JOB_COMPLETED without error; the drive stays where it is)."""
    q.execute("block-job-cancel", device=job)
    ev = q.wait_event("BLOCK_JOB_COMPLETED", device=job)
    assert "error" not in ev["data"], ev


def format_node(q: Qmp, drive: str) -> str:
    """The node name of a drive's image: its format node (query-block skips the
    mirror's implicit filter node)."""
    (dev,) = [b for b in q.execute("query-block") if b["device"] == drive]
    return str(dev["inserted"]["node-name"])


def session_bytes(d: Cdpd) -> int:
    s = d.cdpctl_json("status", "-V", "vol0")
    return int((s[0] if isinstance(s, list) else s)["session_bytes_written"])


def test_mirror_into_cdp_over_nbd(vm: Vm, tmp_path: Path) -> None:
    """Full write-blocking mirror into an NBD export with markers; cancel; an incremental
    catch-up from a dirty bitmap and a ``sync: none`` mirror; a ``sync: top`` restart."""
    q = vm.qmp
    d = Cdpd(tmp_path, size=f"{SIZE}").start()
    try:
        g = Guest(vm, "drive0", d, tmp_path)
        rng = random.Random(10)
        q.execute("blockdev-add", **{"driver": "nbd", "node-name": "cdp0", "export": "vol0",
                                     "server": {"type": "inet", "host": "127.0.0.1",
                                                "port": str(d.nbd_port)}})  # fmt: skip
        mirror(q, "m0", "drive0", "cdp0", "full")
        g.burst(rng)  # while the initial copy may still run: not in any marker
        wait_ready(q, "m0")
        for _ in range(3):
            g.burst(rng)
            g.marker()
        g.burst(rng)
        g.check()

        # stop mirroring; a dirty bitmap (64 KiB granules, the qcow2 cluster size) on
        # the drive's format node (not "drive0": that resolves to the mirror's filter
        # node while the job runs) records what the drive gets meanwhile
        node = format_node(q, "drive0")
        q.execute("block-dirty-bitmap-add", node=node, name="gap")
        cancel(q, "m0")
        at_cancel = bytes(g.model)
        n_written = len(g.written)
        g.burst(rng)
        g.burst(rng)
        g.marker(expect=at_cancel)  # nothing mirrors: cdp still holds the state at cancel
        touched = {c for off, n in g.written[n_written:]
                   for c in range(off // 65536, (off + n - 1) // 65536 + 1)}  # fmt: skip

        # incremental catch-up: only the dirty clusters travel, then a sync:none mirror
        # keeps cdp in step (no guest write between the two: the HMP writes wait)
        sent = session_bytes(d)
        q.execute("blockdev-backup", **{"job-id": "b0", "device": node, "target": "cdp0",
                                        "sync": "incremental", "bitmap": "gap"})  # fmt: skip
        ev = q.wait_event("BLOCK_JOB_COMPLETED", device="b0")
        assert "error" not in ev["data"], ev
        moved = session_bytes(d) - sent
        assert 0 < moved <= len(touched) * 65536, (moved, len(touched))
        mirror(q, "m1", "drive0", "cdp0", "none")
        wait_ready(q, "m1")
        g.check_live()
        g.burst(rng)
        g.marker()
        cancel(q, "m1")
        q.execute("block-dirty-bitmap-remove", node=node, name="gap")

        # restart with sync:top (a drive without a backing file: the whole drive again)
        g.burst(rng)
        mirror(q, "m2", "drive0", "cdp0", "top")
        wait_ready(q, "m2")
        g.burst(rng)
        g.marker()
        g.burst(rng)
        cancel(q, "m2")
        g.check()
        assert len(g.markers) == 6
        q.execute("blockdev-del", **{"node-name": "cdp0"})
    finally:
        d.stop()


def test_mirror_into_cdp_over_iscsi(vm: Vm, tmp_path: Path) -> None:
    """The same with the ``iscsi://`` target as the mirror target (qemu's libiscsi
    driver, 512-byte logical blocks: qemu read-modify-writes the unaligned writes)."""
    from cdp.targets.iscsi.naming import target_name

    q = vm.qmp
    d = Cdpd(tmp_path, size=f"{SIZE}").start()
    try:
        g = Guest(vm, "drive1", d, tmp_path)
        rng = random.Random(20)
        try:
            q.execute("blockdev-add", **{"driver": "iscsi", "node-name": "cdp1",
                                         "transport": "tcp", "portal": f"127.0.0.1:{d.iscsi_port}",
                                         "target": target_name("vol0"), "lun": 0})  # fmt: skip
        except QmpError as e:
            if "Unknown driver" in str(e):
                pytest.fail("requires qemu-block-extra (qemu's iscsi driver)")
            raise
        mirror(q, "i0", "drive1", "cdp1", "full")
        g.burst(rng)
        wait_ready(q, "i0")
        for _ in range(2):
            g.burst(rng)
            g.marker()
        cancel(q, "i0")
        g.burst(rng)  # not mirrored
        mirror(q, "i1", "drive1", "cdp1", "top")
        wait_ready(q, "i1")
        g.burst(rng)
        g.marker()
        cancel(q, "i1")
        g.check()
        q.execute("blockdev-del", **{"node-name": "cdp1"})
    finally:
        d.stop()
