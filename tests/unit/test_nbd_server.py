"""The asyncio pump: async devices, out-of-order replies, error mapping, drain."""

from __future__ import annotations

import asyncio
import errno
import struct
from collections.abc import Awaitable

from cdp.errors import StoreFull
from cdp.targets.nbd.proto import GREETING, SIMPLE_REPLY, Cmd, CmdFlag, Magic, NbdErrno, Opt
from cdp.targets.nbd.server import serve_nbd
from cdp.targets.testing.memdev import MemoryDevice, MemoryProvider
from cdp.targets.testing.nbd_wire import FLAGS, go, option_replies, req

SIZE = 1 << 20


class SlowDevice(MemoryDevice):
    """Reads at offset 0 are slow; writes at offset 4096 fail; flush has a bug."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.gate = asyncio.Event()

    def read(self, offset: int, length: int):  # type: ignore[no-untyped-def,override]
        if offset == 0:

            async def slow() -> bytes:
                await self.gate.wait()
                return b"s" * length

            return slow()
        return super().read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool):  # type: ignore[no-untyped-def,override]
        if offset == 4096:

            async def fail() -> None:
                raise StoreFull("store is full")

            return fail()
        return super().write(offset, data, fua)

    def flush(self) -> None:
        raise KeyError("a bug")


async def handshake(
    port: int, name: str = "disk"
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await asyncio.open_connection("127.0.0.1", port)
    assert GREETING.unpack(await r.readexactly(18))[0] == Magic.NBDMAGIC
    w.write(FLAGS + go(name))
    head = await r.readexactly(20)
    reps = []
    while True:
        n = struct.unpack(">I", head[16:])[0]
        reps += option_replies(head + await r.readexactly(n))
        if reps[-1][1] != 3:  # not NBD_REP_INFO
            break
        head = await r.readexactly(20)
    assert reps[-1][0] == Opt.GO and reps[-1][1] == 1, reps
    return r, w


async def reply(r: asyncio.StreamReader) -> tuple[int, int]:
    magic, err, cookie = SIMPLE_REPLY.unpack(await r.readexactly(16))
    assert magic == Magic.SIMPLE_REPLY
    return err, cookie


async def test_async_device_out_of_order_and_errors() -> None:
    p = MemoryProvider()
    dev = SlowDevice()
    p.exports["disk"] = dev
    server = await serve_nbd(p, "127.0.0.1", 0)
    try:
        r, w = await handshake(server.port)
        assert server.connections == 1
        w.write(req(Cmd.READ, 0, 512, cookie=1) + req(Cmd.READ, 512, 512, cookie=2))
        assert await reply(r) == (0, 2)  # the fast one overtakes the slow one
        assert await r.readexactly(512) == bytes(512)
        w.write(req(Cmd.WRITE, 4096, 512, cookie=3) + bytes(512) + req(Cmd.FLUSH, cookie=4))
        got = {await reply(r), await reply(r)}
        assert got == {(NbdErrno.ENOSPC, 3), (NbdErrno.EIO, 4)}
        dev.gate.set()
        assert await reply(r) == (0, 1)
        assert await r.readexactly(512) == b"s" * 512
        w.write(req(Cmd.DISC))
        assert await r.read() == b""
        w.close()
    finally:
        server.close()
        await server.wait_closed()
    assert server.connections == 0


class UnsupportedDevice(MemoryDevice):
    """A store whose file system refuses fdatasync (EOPNOTSUPP), and a device that has
    no fast zero: the errors a request can meet that are spelled "not supported"."""

    def flush(self) -> None:
        raise OSError(errno.EOPNOTSUPP, "fdatasync not supported")

    def write_zeroes(  # type: ignore[override]
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> Awaitable[None]:
        if fast:
            raise NotImplementedError("zeroing is not faster than writing")

        async def fail() -> None:
            raise OSError(errno.ENOTSUP, "fallocate not supported")

        return fail()


async def test_enotsup_reaches_the_wire_only_for_a_fast_zero() -> None:
    """Sync and task paths both pass the request flags to nbd_errno (NBD spec:
    ENOTSUP answers only WRITE_ZEROES with FAST_ZERO)."""
    p = MemoryProvider()
    p.exports["disk"] = UnsupportedDevice(SIZE)
    server = await serve_nbd(p, "127.0.0.1", 0)
    try:
        r, w = await handshake(server.port)
        w.write(req(Cmd.FLUSH, cookie=1))
        assert await reply(r) == (NbdErrno.EIO, 1)
        w.write(req(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, cookie=2))
        assert await reply(r) == (NbdErrno.ENOTSUP, 2)
        w.write(req(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE, cookie=3))
        assert await reply(r) == (NbdErrno.EIO, 3)
        w.write(req(Cmd.DISC))
        assert await r.read() == b""
        w.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_drain_finishes_inflight_requests() -> None:
    p = MemoryProvider()
    dev = SlowDevice()
    p.exports["disk"] = dev
    server = await serve_nbd(p, "127.0.0.1", 0)
    r, w = await handshake(server.port)
    w.write(req(Cmd.READ, 0, 512, cookie=1))
    await w.drain()
    await asyncio.sleep(0.05)
    server.close()
    closing = asyncio.ensure_future(server.wait_closed())
    await asyncio.sleep(0.05)
    assert not closing.done()  # waits for the slow read
    dev.gate.set()
    assert await reply(r) == (0, 1)
    assert await r.readexactly(512) == b"s" * 512
    assert await r.read() == b""
    await asyncio.wait_for(closing, 5)
    w.close()


async def test_backpressure_many_pipelined_requests() -> None:
    p = MemoryProvider()
    dev = SlowDevice()
    p.exports["disk"] = dev
    server = await serve_nbd(p, "127.0.0.1", 0, max_inflight=4)
    try:
        r, w = await handshake(server.port)
        n = 50
        w.write(b"".join(req(Cmd.READ, 0, 512, cookie=i) for i in range(n)))
        await asyncio.sleep(0.05)
        dev.gate.set()
        cookies = set()
        for _ in range(n):
            err, cookie = await reply(r)
            assert err == 0
            await r.readexactly(512)
            cookies.add(cookie)
        assert cookies == set(range(n))
        w.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_bad_magic_closes_only_that_connection() -> None:
    p = MemoryProvider()
    p.add("disk", SIZE)
    server = await serve_nbd(p, "127.0.0.1", 0)
    try:
        r1, w1 = await handshake(server.port)
        r2, w2 = await handshake(server.port)
        w1.write(b"\xff" * 28)
        assert await r1.read() == b""
        w2.write(req(Cmd.FLUSH, cookie=5))
        assert await reply(r2) == (0, 5)
        w1.close()
        w2.close()
    finally:
        server.close()
        await server.wait_closed()


async def test_many_reads_arrive_whole_and_right() -> None:
    """2,000 pipelined READs of distinct data, the replies read only after all were
    sent (the socket fills, sends are partial): every reply whole and right."""
    p = MemoryProvider()
    dev = p.add("disk", SIZE)
    data = bytes(range(256)) * (SIZE // 256)
    assert dev.write(0, data, False) is None
    server = await serve_nbd(p, "127.0.0.1", 0)
    try:
        r, w = await handshake(server.port)
        n, size = 2000, 4096 + 7
        w.write(b"".join(req(Cmd.READ, i * 509 % (SIZE - size), size, cookie=i) for i in range(n)))
        await w.drain()
        await asyncio.sleep(0.2)
        for _ in range(n):
            err, cookie = await reply(r)
            assert err == 0
            off = cookie * 509 % (SIZE - size)
            assert await r.readexactly(size) == data[off : off + size]
        w.close()
    finally:
        server.close()
        await server.wait_closed()
