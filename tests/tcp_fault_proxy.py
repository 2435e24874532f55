"""A fault-injecting TCP relay for replication link tests (asyncio, in its own thread).

    with TcpFaultProxy("127.0.0.1", target_port) as proxy:   # the source connects to proxy.port
        proxy.cut()                  # close every relayed connection now (both ends)
        proxy.set_down(True)         # ... and close new ones at once until set_down(False)
        proxy.set_stall(True)        # hold every byte (connections stay open) until False
        proxy.cut_after(1000)        # forward 1000 more client bytes, then cut (mid-frame)

Design notes: unlike tests/s3/fault_proxy.py (which needs HTTP request boundaries)
this relay knows nothing of the protocol: it moves bytes both ways and faults at byte
granularity, which is what a dropped link looks like to the replication stream.
``up_bytes`` counts client-to-upstream bytes relayed; ``connections`` the accepted ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class TcpFaultProxy:
    def __init__(self, host: str, port: int) -> None:
        self.upstream = (host, port)
        self.port = 0
        self.up_bytes = 0
        self.connections = 0
        self._stall = False
        self._down = False
        self._budget: int | None = None  # client bytes left before a cut
        self._pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> TcpFaultProxy:
        self._thread.start()
        self._server = self._call(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self

    def __exit__(self, *exc: object) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # ------------------------------------------------------------------ faults

    def cut(self) -> None:
        """Close every relayed connection now."""
        async def go() -> None:
            for a, b in list(self._pairs):
                self._close(a, b)
        self._call(go())

    def set_down(self, down: bool) -> None:
        self._down = down
        if down:
            self.cut()

    def set_stall(self, stall: bool) -> None:
        self._stall = stall

    def cut_after(self, nbytes: int) -> None:
        self._budget = nbytes

    # ------------------------------------------------------------------ relay

    def _close(self, a: asyncio.StreamWriter, b: asyncio.StreamWriter) -> None:
        self._pairs.discard((a, b))
        for w in (a, b):
            with contextlib.suppress(Exception):
                w.transport.abort()

    async def _handle(self, cr: asyncio.StreamReader, cw: asyncio.StreamWriter) -> None:
        self.connections += 1
        if self._down:
            cw.transport.abort()
            return
        try:
            ur, uw = await asyncio.open_connection(*self.upstream)
        except OSError:
            cw.transport.abort()
            return
        pair = (cw, uw)
        self._pairs.add(pair)
        await asyncio.gather(self._pipe(cr, uw, pair, True), self._pipe(ur, cw, pair, False),
                             return_exceptions=True)
        self._close(*pair)

    async def _pipe(self, r: asyncio.StreamReader, w: asyncio.StreamWriter,
                    pair: tuple[asyncio.StreamWriter, asyncio.StreamWriter], up: bool) -> None:
        while pair in self._pairs:
            data = await r.read(1 << 16)
            if not data:
                break
            while self._stall and pair in self._pairs:
                await asyncio.sleep(0.02)
            if pair not in self._pairs:
                break
            cut = False
            if up and self._budget is not None:
                if len(data) >= self._budget:
                    data, cut = data[:self._budget], True
                    self._budget = None
                else:
                    self._budget -= len(data)
            w.write(data)
            if up:
                self.up_bytes += len(data)
            await w.drain()
            if cut:
                self._close(*pair)
                break
        self._close(*pair)
