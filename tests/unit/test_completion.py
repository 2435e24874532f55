"""The write-completion hook (cdp.targets.completion) alone and through the NBD server:
replies in completion order, an error completes only its own request, a batch's
replies leave in one send."""

from __future__ import annotations

import asyncio
import errno
from pathlib import Path

import pytest

import cdp.proxy.volume as pv
from cdp.errors import Corruption
from cdp.proxy.primary import FilePrimary
from cdp.targets import completion
from cdp.targets.completion import Completion, at_batch_end
from cdp.targets.nbd import server as nbd_server
from cdp.targets.nbd.errors import nbd_errno
from cdp.targets.nbd.proto import Cmd, NbdErrno
from cdp.targets.nbd.server import serve_nbd
from cdp.targets.testing.memdev import MemoryDevice, MemoryProvider
from cdp.targets.testing.nbd_wire import req
from tests.unit.test_nbd_server import handshake, reply
from tests.unit.test_proxy import SIZE as PROXY_SIZE
from tests.unit.test_proxy import create_proxy_volume, open_store

SIZE = 1 << 20


async def test_callback_runs_at_finish_once_with_its_result() -> None:
    got: list[tuple[str, BaseException | None]] = []
    ok, bad = Completion(), Completion()
    ok.on_done(lambda arg, exc: got.append((arg, exc)), "ok")
    bad.on_done(lambda arg, exc: got.append((arg, exc)), "bad")
    assert got == []
    err = OSError(errno.EIO, "boom")
    bad.finish(err)
    ok.finish()
    ok.finish(OSError(errno.EIO, "too late"))  # later calls do nothing
    assert got == [("bad", err), ("ok", None)]
    late: list[BaseException | None] = []
    bad.on_done(lambda arg, exc: late.append(exc), None)  # after the end: at once
    assert late == [err]


async def test_awaiting_a_completion() -> None:
    c = Completion()
    t = asyncio.ensure_future(_wait(c))
    await asyncio.sleep(0)
    assert not t.done()
    c.finish()
    assert await t is None
    await c  # already finished: no future, no turn
    e = Completion()
    e.finish(Corruption("primary write failed"))
    with pytest.raises(Corruption):
        await e
    x = Completion()
    t2 = asyncio.ensure_future(_wait(x))
    await asyncio.sleep(0)
    x.finish(asyncio.CancelledError())  # cancels the awaiters
    with pytest.raises(asyncio.CancelledError):
        await t2


async def _wait(c: Completion) -> None:
    await c


async def test_a_failing_callback_does_not_stop_the_batch() -> None:
    errors: list[object] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: errors.append(ctx["exception"]))
    got: list[int] = []

    def cb(i: int, exc: BaseException | None) -> None:
        if i == 1:
            raise KeyError("a bug")
        got.append(i)

    cs = [Completion() for _ in range(3)]
    for i, c in enumerate(cs):
        c.on_done(cb, i)
    with completion.batch():
        for c in cs:
            c.finish()
    assert got == [0, 2]
    assert len(errors) == 1 and isinstance(errors[0], KeyError)
    loop.set_exception_handler(None)


async def test_batch_end_runs_once_per_request_in_order_outermost_only() -> None:
    ran: list[str] = []
    with completion.batch():
        at_batch_end(lambda: ran.append("a"))
        with completion.batch():  # nested: nothing runs at its end
            at_batch_end(lambda: ran.append("b"))
        assert ran == []

        def more() -> None:
            ran.append("c")
            at_batch_end(lambda: ran.append("d"))  # asked for while the end runs

        at_batch_end(more)
    assert ran == ["a", "b", "c", "d"]
    at_batch_end(lambda: ran.append("next turn"))  # outside a batch: call_soon
    assert ran[-1] == "d"
    await asyncio.sleep(0)
    assert ran[-1] == "next turn"


class HookDevice(MemoryDevice):
    """Writes return completions the test finishes (as the proxy's writer does)."""

    def __init__(self) -> None:
        super().__init__(SIZE)
        self.pending: list[tuple[int, Completion]] = []
        self.arrived = asyncio.Event()

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> Completion:  # type: ignore[override]
        super().write(offset, data, fua)
        c = Completion()
        self.pending.append((offset, c))
        self.arrived.set()
        return c


async def test_nbd_replies_in_completion_order_one_send_per_batch(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    sends: list[int] = []
    orig = nbd_server._NbdProtocol._flush

    def flush(self: nbd_server._NbdProtocol) -> None:
        if self.conn.has_output:
            sends.append(len(self.conn._out))
        orig(self)

    monkeypatch.setattr(nbd_server._NbdProtocol, "_flush", flush)
    p = MemoryProvider()
    dev = HookDevice()
    p.exports["disk"] = dev
    server = await serve_nbd(p, "127.0.0.1", 0)
    try:
        r, w = await handshake(server.port)
        n = 6
        w.write(b"".join(req(Cmd.WRITE, i * 4096, 512, cookie=10 + i) + bytes([i]) * 512
                         for i in range(n)))
        while len(dev.pending) < n:
            dev.arrived.clear()
            await dev.arrived.wait()
        sends.clear()
        # the device completes them out of order, one with an error, in one batch
        order = [3, 0, 5, 1, 4, 2]
        by_off = dict(dev.pending)
        with completion.batch():
            for i in order:
                by_off[i * 4096].finish(Corruption("primary write failed") if i == 5 else None)
            assert sends == []  # nothing leaves before the batch ends
        assert sends == [n]  # then all six replies in one writelines
        got = [await reply(r) for _ in range(n)]
        assert got == [(NbdErrno.EIO if i == 5 else 0, 10 + i) for i in order]
        # outside a batch (an NBD primary's writes): each reply at the next turn
        w.write(req(Cmd.WRITE, 0, 512, cookie=99) + bytes(512))
        while len(dev.pending) < n + 1:
            dev.arrived.clear()
            await dev.arrived.wait()
        dev.pending[-1][1].finish(asyncio.CancelledError())
        assert await reply(r) == (_aborted(), 99)
        w.write(req(Cmd.DISC))
        assert await r.read() == b""
        w.close()
    finally:
        server.close()
        await server.wait_closed()


def _aborted() -> int:
    """The wire error of a cancelled request (the one mapping function's answer)."""
    return int(nbd_errno(ConnectionAbortedError(errno.ECONNABORTED, "request cancelled"), 0))


def test_proxy_writes_of_a_turn_finish_in_one_batch_an_error_only_its_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The proxy's writer completes a turn's writes inside one completion batch (their
    replies leave at its end), in queue order; a failed primary write fails alone."""
    prim = tmp_path / "primary.img"
    prim.write_bytes(bytes(PROXY_SIZE))
    monkeypatch.setattr(pv, "USE_LIO", False)  # one pwrite each: the failure is injected there

    async def main() -> None:
        store = open_store(tmp_path)
        vol = create_proxy_volume(store, "p", 0, str(prim), initial_copy=False)
        await vol.write(0, b"w" * 4096)  # the region's DRL bit: durable from now on
        p = vol.primary
        assert isinstance(p, FilePrimary)
        real_pwrite = p.pwrite

        def pwrite(data: bytes, offset: int) -> None:
            if offset == 8192:
                raise OSError(errno.EIO, "injected")
            real_pwrite(data, offset)

        monkeypatch.setattr(p, "pwrite", pwrite)
        got: list[tuple[int, str | None, bool]] = []
        done = asyncio.get_running_loop().create_future()
        offs = [4096 * 50, 8192, 4096 * 7, 4096 * 90]

        def cb(off: int, exc: BaseException | None) -> None:
            got.append((off, None if exc is None else str(exc), completion._state.end is not None))
            if len(got) == len(offs):
                done.set_result(None)

        for o in offs:
            c = vol.write(o, bytes([o // 4096]) * 4096)
            assert isinstance(c, Completion)
            c.on_done(cb, o)
        await done
        assert [g[0] for g in got] == offs  # queue order
        assert all(g[2] for g in got)  # each inside the batch
        assert [g[1] is None for g in got] == [True, False, True, True]
        assert "primary write failed" in str(got[1][1])
        assert vol.primary_errors == 1
        assert prim.read_bytes()[4096 * 7: 4096 * 8] == bytes([7]) * 4096
        store.close()

    asyncio.run(main())
