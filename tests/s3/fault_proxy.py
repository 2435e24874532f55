"""A fault-injecting TCP proxy in front of an S3 endpoint (the test RGW), switchable at run time.

    with FaultProxy("127.0.0.1", rgw_port) as proxy:   # asyncio, in its own thread
        client = ...endpoint_url=proxy.endpoint...
        proxy.set_mode("503", times=2)                 # the next 2 requests get a 503
        proxy.set_mode("cut", cut_after=100, match="GET ")  # GET bodies end after 100 bytes
        proxy.set_mode("pass")

Modes, per request: ``pass``; ``drop`` (the connection is closed once the request head
has arrived, no answer); ``delay`` (``delay`` seconds before the request goes upstream);
``hold`` (the request head arrives and is never answered: the connection stays open,
silent, until the mode changes, then it is closed; ``held`` counts those waiting now);
``503`` (a well-formed S3 XML error, ``ServiceUnavailable``, without bothering upstream);
``cut`` (the upstream answer is forwarded up to ``cut_after`` bytes of its body, then both
connections are closed). ``times``: fault only that many requests, then back to ``pass``.
``match``: fault only requests whose request line contains it (``"PUT "``,
``"partNumber="``, ``"?uploads"``); the others pass. ``requests`` / ``faults`` count what
went through.

Design notes: the proxy speaks just enough HTTP/1.1 to see request boundaries. Every
request goes upstream on a fresh connection with ``Connection: close`` (in both
directions), so an answer ends where the upstream closes: no response framing (chunked,
100-continue, HEAD) needs parsing, and a fault never leaves a half-used keep-alive
connection behind. A request body is forwarded as it arrives (``Content-Length`` bytes);
``Expect: 100-continue`` is honoured by the upstream's own interim answer, or by the 503
itself, which a client then takes instead of sending the body.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from dataclasses import dataclass
from typing import Literal

Mode = Literal["pass", "drop", "hold", "delay", "503", "cut"]
MODES: tuple[str, ...] = ("pass", "drop", "hold", "delay", "503", "cut")

_ERROR_503 = (
    '<?xml version="1.0" encoding="UTF-8"?>\n'
    "<Error><Code>ServiceUnavailable</Code>"
    "<Message>Service is unable to handle request (cdp fault proxy).</Message>"
    "<Resource>{resource}</Resource><RequestId>{rid}</RequestId></Error>"
)


@dataclass
class _Fault:
    mode: str = "pass"
    times: int | None = None
    delay: float = 1.0
    cut_after: int = 0
    match: str | None = None


class FaultProxy:
    """An asyncio TCP proxy on 127.0.0.1 in front of ``upstream_host:upstream_port``."""

    def __init__(self, upstream_host: str, upstream_port: int, *, port: int = 0) -> None:
        self.upstream = (upstream_host, upstream_port)
        self.port = port
        self.requests = 0
        self.faults = 0
        self.held = 0
        self._fault = _Fault()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._rid = itertools.count(1)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---- control (any thread)
    def set_mode(
        self, mode: Mode, *, times: int | None = None, delay: float = 1.0, cut_after: int = 0,
        match: str | None = None,
    ) -> None:
        """Fault the coming requests (see the module docstring); takes effect for the next
        request head that arrives."""
        if mode not in MODES:
            raise ValueError(f"mode {mode!r}: one of {', '.join(MODES)}")
        with self._lock:
            self._fault = _Fault(mode, times, delay, cut_after, match)

    def _take(self, request_line: str) -> _Fault:
        """The fault for this request (counting it against ``times``)."""
        with self._lock:
            self.requests += 1
            f = self._fault
            if f.mode == "pass" or (f.match is not None and f.match not in request_line):
                return _Fault()
            self.faults += 1
            if f.times is not None:
                f.times -= 1
                if f.times <= 0:
                    self._fault = _Fault()
            return _Fault(f.mode, None, f.delay, f.cut_after, f.match)

    def start(self) -> FaultProxy:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._thread = threading.Thread(target=loop.run_forever, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._client, "127.0.0.1", self.port, limit=1 << 16), loop)
        self._server = fut.result(10)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def stop(self) -> None:
        loop = self._loop
        if loop is None:
            return

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            for t in list(self._tasks):
                t.cancel()
            if self._tasks:
                await asyncio.wait(list(self._tasks), timeout=5)

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        loop.close()
        self._loop = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- the proxy (loop thread)
    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        up_writer: asyncio.StreamWriter | None = None
        try:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
                return
            lines = head.decode("latin-1").split("\r\n")
            request_line = lines[0]
            headers = {}
            for h in lines[1:]:
                name, sep, value = h.partition(":")
                if sep:
                    headers[name.strip().lower()] = value.strip()
            length = int(headers.get("content-length", "0"))
            expect = headers.get("expect", "").lower() == "100-continue"
            fault = self._take(request_line)

            if fault.mode == "drop":
                writer.transport.abort()
                return
            if fault.mode == "hold":
                await self._hold()
                writer.transport.abort()
                return
            if fault.mode == "503":
                if not expect and length:
                    await reader.readexactly(length)
                await self._answer_503(writer, request_line)
                return
            if fault.mode == "delay":
                await asyncio.sleep(fault.delay)

            up_reader, up_writer = await asyncio.open_connection(*self.upstream)
            up_writer.write(_with_close(lines))
            await up_writer.drain()
            body = asyncio.create_task(_pump(reader, up_writer, length))
            try:
                await self._response(up_reader, writer, fault)
            finally:
                body.cancel()
                with contextlib.suppress(asyncio.CancelledError, ConnectionError):
                    await body
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if up_writer is not None:
                up_writer.close()
            writer.close()
            self._tasks.discard(task)

    async def _hold(self) -> None:
        """Wait, counted in ``held``, until the mode is no longer ``hold``."""
        with self._lock:
            self.held += 1
        try:
            while True:
                with self._lock:
                    if self._fault.mode != "hold":
                        return
                await asyncio.sleep(0.05)
        finally:
            with self._lock:
                self.held -= 1

    async def _answer_503(self, writer: asyncio.StreamWriter, request_line: str) -> None:
        method, _, rest = request_line.partition(" ")
        resource = rest.rsplit(" ", 1)[0].split("?", 1)[0]
        rid = f"faultproxy-{next(self._rid)}"
        body = _ERROR_503.format(resource=resource, rid=rid).encode()
        head = (
            "HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/xml\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"x-amz-request-id: {rid}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        writer.write(head if method == "HEAD" else head + body)
        await writer.drain()

    async def _response(
        self, up: asyncio.StreamReader, writer: asyncio.StreamWriter, fault: _Fault
    ) -> None:
        """Forward the upstream's answer (interim 100 answers first) until it closes;
        ``cut``: only ``cut_after`` bytes of the final answer's body, then abort."""
        while True:
            head = await up.readuntil(b"\r\n\r\n")
            status = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if status == b"100":
                writer.write(head)
                await writer.drain()
                continue
            break
        lines = head.decode("latin-1").split("\r\n")
        writer.write(_with_close(lines))
        budget = fault.cut_after if fault.mode == "cut" else None
        while True:
            chunk = await up.read(1 << 16)
            if not chunk:
                break
            if budget is not None:
                chunk = chunk[:budget]
                budget -= len(chunk)
            writer.write(chunk)
            await writer.drain()
            if budget == 0:
                writer.transport.abort()  # mid-body: the client sees the connection end
                return
        await writer.drain()


def _with_close(lines: list[str]) -> bytes:
    """An HTTP head (split lines, ending with two empty ones) with ``Connection: close``."""
    kept = [h for h in lines[1:] if h and not h.lower().startswith(("connection:", "keep-alive:"))]
    return ("\r\n".join([lines[0], *kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, length: int) -> None:
    """Copy ``length`` request body bytes as they arrive."""
    left = length
    while left > 0:
        chunk = await reader.read(min(left, 1 << 16))
        if not chunk:
            return
        left -= len(chunk)
        writer.write(chunk)
        await writer.drain()
