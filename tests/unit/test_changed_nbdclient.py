"""cdp.targets.nbd.client against nbdkit (memory and file plugins, TCP and unix sockets): sizes,
pipelined writes, zeroes, flush, reads back, errors; and export_diff --to-nbd of random
Volume histories into nbdkit file equals image(B)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import Settings, VolumeSpec
from cdp.errors import UsageError
from cdp.store import Store
from cdp.targets.nbd.client import NbdClient, NbdClientError, parse_uri
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal
from tools.harness import listening_port, refused_port

MiB = 1 << 20


class Nbdkit:
    """nbdkit on a unix socket, or on loopback TCP port 0 (the port it got is read
    back with :func:`tools.harness.listening_port`)."""

    def __init__(self, *plugin: str, unix: Path | None = None, extra: tuple[str, ...] = ()) -> None:
        addr = ["-U", str(unix)] if unix else ["-i", "127.0.0.1", "-p", "0"]
        self.unix = unix
        self.port = 0
        self.proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", *extra, *addr, *plugin],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not unix:
            self.port = listening_port(self.proc, "nbdkit")
            return
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.socket(socket.AF_UNIX) as s:
                    s.connect(str(unix))
                return
            except OSError:
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("nbdkit did not start") from None
                time.sleep(0.05)

    def uri(self) -> str:
        return f"nbd+unix:///?socket={self.unix}" if self.unix else f"nbd://127.0.0.1:{self.port}/"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def memory() -> Iterator[Nbdkit]:
    require_tool("nbdkit")
    k = Nbdkit("memory", "size=16M")
    yield k
    k.stop()


def test_parse_uri() -> None:
    t = parse_uri("nbd://host:1234/vol0@marker3")
    assert (t.host, t.port, t.export, t.socket_path) == ("host", 1234, "vol0@marker3", None)
    assert parse_uri("nbd://h/").port == 10809
    u = parse_uri("nbd+unix:///e?socket=/tmp/s")
    assert (u.socket_path, u.export) == ("/tmp/s", "e")
    for bad in ("http://x/", "nbd:///e", "nbd+unix:///e"):
        with pytest.raises(UsageError):
            parse_uri(bad)


def test_write_zero_flush_read(memory: Nbdkit) -> None:
    rng = random.Random(5)
    model = bytearray(16 * MiB)
    with NbdClient.connect(memory.uri(), window=4) as c:
        assert c.size == 16 * MiB and not c.read_only
        for _ in range(100):  # more requests than the window: replies are read as we go
            off = rng.randrange(0, 16 * MiB - 70000)
            d = rng.randbytes(rng.randrange(1, 70000))
            c.pwrite(d, off)
            model[off : off + len(d)] = d
        big = rng.randbytes(9 * MiB)  # split at the maximum payload
        c.pwrite(big, 5 * MiB)
        model[5 * MiB : 14 * MiB] = big
        c.zero(6 * MiB, 3 * MiB + 17)
        model[6 * MiB : 9 * MiB + 17] = bytes(3 * MiB + 17)
        c.flush()
        assert_bytes_equal(c.pread(0, 16 * MiB), model)
        with pytest.raises(UsageError):
            c.pwrite(b"x", 16 * MiB)


def test_server_errors() -> None:
    require_tool("nbdkit")
    k = Nbdkit("memory", "size=1M", extra=("-r",))
    try:
        c = NbdClient.connect(k.uri())
        assert c.read_only
        c.pwrite(b"x" * 512, 0)
        with pytest.raises(NbdClientError, match="errno"):
            c.flush()
        c.close()
    finally:
        k.stop()
    with refused_port() as port, pytest.raises(NbdClientError, match="connect"):
        NbdClient.connect(f"nbd://127.0.0.1:{port}/")


def test_export_diff_to_nbdkit_file(tmp_path: Path) -> None:
    require_tool("nbdkit")
    size = 8 * MiB
    settings = replace(Settings(), store=tmp_path / "store", volumes=(VolumeSpec("vol0", size),))

    async def go() -> None:
        from cdp.ops.backup import export_diff

        store = Store.open(settings)
        vol = store.volume("vol0")
        rng = random.Random(11)
        model = bytearray(size)
        imgs = {"origin": bytes(size)}
        for _ in range(4):
            for _ in range(20):
                off = rng.randrange(0, size - 300_000)
                ln = rng.randrange(1, 300_000)
                if rng.random() < 0.25:
                    vol.zero(off, ln)
                    model[off : off + ln] = bytes(ln)
                else:
                    d = rng.randbytes(ln)
                    vol.write(off, d)
                    model[off : off + ln] = d
            imgs[(await vol.snapshot()).name] = bytes(model)
        names = list(imgs)
        for i in range(4):
            a, b = rng.sample(names, 2)
            target = tmp_path / "t.img"
            target.write_bytes(imgs[a])
            sock = tmp_path / f"nbd{i}.sock"
            k = Nbdkit("file", str(target), unix=sock)
            try:
                r = await export_diff(store, {"from": a, "to": b, "to_nbd": k.uri()}, lambda *x: None)
            finally:
                k.stop()
            assert_bytes_equal(target.read_bytes(), imgs[b], f"diff {a} -> {b}")
            assert r["copy_bytes"] == r["data_bytes"]
        # a target of another size is refused before anything is written
        (tmp_path / "small.img").write_bytes(bytes(MiB))
        k = Nbdkit("file", str(tmp_path / "small.img"), unix=tmp_path / "s2.sock")
        try:
            with pytest.raises(UsageError, match="bytes"):
                await export_diff(store, {"from": "origin", "to_nbd": k.uri()}, lambda *x: None)
        finally:
            k.stop()
        store.close()

    asyncio.run(go())
    shutil.rmtree(tmp_path / "store", ignore_errors=True)
    assert not os.path.exists(tmp_path / "store")


class _MemSink:
    """A sink of granularity 512 that checks alignment."""

    grain = 512

    def __init__(self, img: bytes) -> None:
        self.img = bytearray(img)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        assert offset % 512 == 0 and (len(data) % 512 == 0 or offset + len(data) == len(self.img))
        self.img[offset : offset + len(data)] = data

    def zero(self, offset: int, length: int) -> None:
        assert offset % 512 == 0 and length % 512 == 0
        self.img[offset : offset + length] = bytes(length)

    def finish(self) -> None:
        return None

    def close(self) -> None:
        return None


def test_unaligned_changes_are_widened_for_block_servers(tmp_path: Path) -> None:
    from cdp.backup.changes import diff_pieces
    from cdp.ops.backup import _aligned, emit

    size = 2 * MiB
    settings = replace(Settings(), store=tmp_path / "store", volumes=(VolumeSpec("vol0", size),))

    async def go() -> None:
        store = Store.open(settings)
        vol = store.volume("vol0")
        rng = random.Random(2)
        model = bytearray(size)
        a = (await vol.snapshot()).seq
        ia = bytes(model)
        for _ in range(40):
            off = rng.randrange(0, size - 5000)
            ln = rng.randrange(1, 5000)
            if rng.random() < 0.3:
                vol.zero(off, ln)
                model[off : off + ln] = bytes(ln)
            else:
                d = rng.randbytes(ln)
                vol.write(off, d)
                model[off : off + ln] = d
        b = (await vol.snapshot()).seq
        pieces = _aligned(vol, diff_pieces(vol, a, b), 512)
        sink = _MemSink(ia)
        await emit(vol, b, pieces, sink, lambda *x: None, 0)
        assert_bytes_equal(sink.img, model)
        store.close()

    asyncio.run(go())
