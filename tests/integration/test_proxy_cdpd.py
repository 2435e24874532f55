"""Proxy mode with a real cdpd and real clients: the appliance owns the primary.

qemu-io patterns, fio verify and an iSCSI read against a proxy volume; initial copy of an
existing primary; rewind compared with qemu-img; kill -9 with writes in flight and the
crash reconcile; a primary served by nbdkit with its error filter; a journal on a tmpfs
that fills up."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.proxy.drl import read_drl
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal
from tools.harness import Cdpd, run

MiB = 1 << 20
PSIZE = 64 * MiB


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    args = ["qemu-io", "-f", "raw"] + (["-r"] if "@" in uri.rsplit("/", 1)[1] else [])
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check)


def make_primary(path: Path, size: int = PSIZE, seed: int = 1) -> None:
    """A primary that already holds data: random 1 MiB pieces every 4 MiB."""
    rng = random.Random(seed)
    with open(path, "wb") as f:
        f.truncate(size)
        for off in range(0, size, 4 * MiB):
            f.seek(off)
            f.write(rng.randbytes(MiB))


def compare(a: Path, b: Path) -> None:
    r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(a), str(b), check=False)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def status(d: Cdpd, vol: str = "p") -> dict:
    s = d.cdpctl_json("status", "-V", vol)
    return s[0] if isinstance(s, list) else s


def wait_for(pred, timeout: float = 30.0, what: str = "") -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture
def proxyd(tmp_path: Path) -> Iterator[Cdpd]:
    require_tool("qemu-img", "qemu-io")
    make_primary(tmp_path / "primary.img")
    d = Cdpd(tmp_path, size="16MiB").start()
    try:
        r = d.cdpctl_json("volume", "create", "p", "--mode", "proxy", "--primary",
                          str(tmp_path / "primary.img"), "--drl-region", "256KiB")
        assert r["mode"] == "proxy" and r["size"] == PSIZE and r["initial_copy_bytes"] == 16 * MiB
        yield d
    finally:
        if d.proc is not None and d.proc.poll() is None:
            d.stop()


def test_initial_copy_clients_and_primary_equals_journal(proxyd: Cdpd, tmp_path: Path) -> None:
    require_tool("fio", "iscsi-inq")
    d = proxyd
    prim = tmp_path / "primary.img"
    # time zero (the initial copy) is the original primary
    orig = tmp_path / "orig.img"
    shutil.copyfile(prim, orig)
    head = status(d)["last_seq"]
    d.cdpctl("image", "-V", "p", "--at", f"@{head}", "-o", str(tmp_path / "t0.img"))
    compare(orig, tmp_path / "t0.img")
    # reads come from the primary; patterns written over NBD land in both
    qemu_io(d.uri("p"), "write -P 0x5a 1M 1M", "write -P 0xa5 5M 64k", "flush")
    qemu_io(d.uri("p"), "read -P 0x5a 1M 1M", "read -P 0xa5 5M 64k")
    with open(prim, "rb") as f:
        f.seek(MiB)
        assert_bytes_equal(f.read(MiB), b"\x5a" * MiB)
    # fio verify through NBD, iSCSI read of the same bytes
    run("fio", "--name=v", "--ioengine=nbd", f"--uri={d.uri('p')}", "--rw=randwrite",
        "--bs=4k", "--iodepth=32", "--size=16m", "--offset=32m", "--verify=crc32c",
        "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1")
    qemu_io(d.iscsi_uri("p"), "read -P 0x5a 1M 1M", "read -P 0xa5 5M 64k")
    qemu_io(d.iscsi_uri("p"), "write -P 0x33 8M 128k")
    qemu_io(d.uri("p"), "read -P 0x33 8M 128k")
    st = status(d)
    assert st["mode"] == "proxy" and not st["proxy"]["degraded"]
    assert st["proxy"]["initial_copy"]["done"]
    d.cdpctl("image", "-V", "p", "-o", str(tmp_path / "now.img"))
    compare(prim, tmp_path / "now.img")
    # regions are cleaned lazily once both sides are durable
    wait_for(lambda: status(d)["proxy"]["drl"]["dirty_regions"] == 0, what="clean DRL")
    assert d.stop() == 0
    assert read_drl(d.store / "volumes" / "p" / "drl")["dirty"] == []


def test_rewind_rewrites_the_primary(proxyd: Cdpd, tmp_path: Path) -> None:
    d = proxyd
    prim = tmp_path / "primary.img"
    qemu_io(d.uri("p"), "write -P 0x11 0 2M", "flush")
    d.cdpctl("snapshot", "-V", "p", "--label", "good")
    qemu_io(d.uri("p"), "write -P 0x66 1M 3M", "write -z 10M 1M", "flush")
    d.cdpctl("rewind", "-V", "p", "--to", "good")
    qemu_io(d.uri("p"), "read -P 0x11 0 2M")
    d.cdpctl("image", "-V", "p", "--at", "good", "-o", str(tmp_path / "good.img"))
    compare(prim, tmp_path / "good.img")
    rw = status(d)["proxy"]["rewind"]
    assert rw["finished"] and rw["rewritten"] > 0


def test_kill9_with_writes_in_flight_then_reconcile(proxyd: Cdpd, tmp_path: Path) -> None:
    require_tool("fio")
    d = proxyd
    prim = tmp_path / "primary.img"
    fio = subprocess.Popen(
        ["fio", "--name=k", "--ioengine=nbd", f"--uri={d.uri('p')}", "--rw=randwrite",
         "--bs=64k", "--iodepth=16", "--size=48m", "--time_based", "--runtime=20"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        time.sleep(1.5)
        d.kill9()
    finally:
        fio.wait(30)
    drl = read_drl(d.store / "volumes" / "p" / "drl")
    assert drl["dirty"], "writes were in flight: some regions must be dirty"
    d.start()
    st = status(d)
    rep = st["proxy"]["reconcile"]
    assert rep["dirty_regions"] == len(drl["dirty"]) and rep["failed_regions"] == 0
    assert st["durable_seq"] == st["last_seq"]
    assert "crash recovery" in d.logs()
    d.cdpctl("image", "-V", "p", "--at", f"@{st['durable_seq']}", "-o", str(tmp_path / "after.img"))
    compare(prim, tmp_path / "after.img")
    assert d.stop() == 0
    assert read_drl(d.store / "volumes" / "p" / "drl")["dirty"] == []


class NbdkitErrors:
    """nbdkit memory behind the error filter: pwrite fails (EIO) at *rate* while the
    trigger file exists."""

    def __init__(self, tmp: Path, size: int, rate: float) -> None:
        self.sock = tmp / "nbdkit.sock"
        self.trigger = tmp / "errors-on"
        self.proc = subprocess.Popen(
            ["nbdkit", "-f", "--exit-with-parent", "-U", str(self.sock), "--filter=error",
             "memory", str(size), f"error-pwrite-rate={rate}", "error=EIO",
             f"error-pwrite-file={self.trigger}"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for(self.sock.exists, 20, "nbdkit socket")

    @property
    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.sock}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


def test_primary_over_nbdkit_with_random_eio(tmp_path: Path) -> None:
    require_tool("nbdkit", "qemu-io", "qemu-img", "nbdcopy")
    kit = NbdkitErrors(tmp_path, 16 * MiB, 0.3)
    d = Cdpd(tmp_path, size="16MiB").start()
    try:
        d.cdpctl("volume", "create", "e", "--mode", "proxy", "--primary", kit.uri,
                 "--no-initial-copy", "--drl-region", "64KiB")
        kit.trigger.touch()
        failed = 0
        for i in range(40):
            r = qemu_io(d.uri("e"), f"write -P {i + 1} {i * 256}k 64k", check=False)
            out = r.stdout.decode() + r.stderr.decode()
            failed += "error" in out.lower() or r.returncode != 0
        assert 0 < failed < 40, "the error filter should fail some writes, not all"
        kit.trigger.unlink()
        st = status(d, "e")
        assert st["proxy"]["primary_errors"] >= failed
        wait_for(lambda: status(d, "e")["proxy"]["catchup_pending_regions"] == 0, what="catch-up")
        qemu_io(d.uri("e"), "write -P 0x77 0 4k", "flush")
        run("nbdcopy", kit.uri, str(tmp_path / "primary.img"))
        d.cdpctl("image", "-V", "e", "-o", str(tmp_path / "now.img"))
        compare(tmp_path / "primary.img", tmp_path / "now.img")
        assert "primary write of" in d.logs()
    finally:
        if d.proc is not None:
            d.stop()
        kit.stop()


def _mount_tmpfs(path: Path, size: str) -> None:
    run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))


def test_journal_fills_up_host_acked_degraded_then_catches_up(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img", "nbdcopy", "mount", "umount")
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs for the journal")
    with open(tmp_path / "primary.img", "wb") as f:  # empty: --no-initial-copy
        f.truncate(64 * MiB)
    d = Cdpd(tmp_path, size="16MiB", segment_bytes="4MiB").start()
    jdir = d.store / "volumes" / "f" / "journal"
    mounted = False
    try:
        d.cdpctl("volume", "create", "f", "--mode", "proxy", "--primary",
                 str(tmp_path / "primary.img"), "--no-initial-copy")
        assert d.stop() == 0
        old = jdir.with_name("journal.old")
        jdir.rename(old)
        jdir.mkdir()
        _mount_tmpfs(jdir, "12m")
        mounted = True
        for p in old.iterdir():
            shutil.copy2(p, jdir / p.name)
        d.start()
        # 24 MiB of incompressible writes into a 12 MiB journal: every one is acknowledged
        rng = random.Random(3)
        blob = tmp_path / "blob"
        blob.write_bytes(rng.randbytes(24 * MiB))
        run("nbdcopy", "--flush", str(blob), d.uri("f"))
        qemu_io(d.uri("f"), "flush")
        st = status(d, "f")
        assert st["proxy"]["degraded"] and st["proxy"]["journal_errors"] > 0
        with open(tmp_path / "primary.img", "rb") as f:
            assert_bytes_equal(f.read(24 * MiB), blob.read_bytes())
        # room again: the journal catches up from the primary by itself
        run("mount", "-o", "remount,size=96m", str(jdir))
        wait_for(lambda: not status(d, "f")["proxy"]["degraded"], 60, "catch-up")
        d.cdpctl("image", "-V", "f", "-o", str(tmp_path / "now.img"))
        compare(tmp_path / "primary.img", tmp_path / "now.img")
        assert "DEGRADED" in d.logs() and "no longer degraded" in d.logs()
    finally:
        if d.proc is not None:
            d.stop()
        if mounted:
            run("umount", str(jdir), check=False)
