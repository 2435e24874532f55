"""Run a target server (NBD, iSCSI) on its own event loop in a background thread, for
tests and benchmarks: ``with NbdServerThread(provider) as s: ... s.port``."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, Protocol, Self


def new_event_loop() -> asyncio.AbstractEventLoop:
    """A uvloop event loop when uvloop is installed, else the default one."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency
        return asyncio.new_event_loop()
    return uvloop.new_event_loop()


class _Server(Protocol):
    @property
    def port(self) -> int: ...

    def close(self) -> None: ...

    async def wait_closed(self) -> None: ...


class BackgroundServer:
    """Starts ``serve()`` (a coroutine returning a listening server) on a private loop
    in a daemon thread; ``stop()`` closes it and ends the thread."""

    name = "target"

    def __init__(self, serve: Callable[[], Coroutine[Any, Any, Any]], host: str) -> None:
        self._serve = serve
        self.host = host
        self.loop = new_event_loop()
        self.server: Any = None
        self._thread = threading.Thread(target=self.loop.run_forever, name=self.name, daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return int(self.server.port)

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn()`` on the server's loop and return its result."""

        async def _do() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_do(), self.loop).result(10)

    def start(self) -> Self:
        self._thread.start()
        self.server = asyncio.run_coroutine_threadsafe(self._serve(), self.loop).result(10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            server: _Server = self.server

            async def _stop() -> None:
                server.close()
                await server.wait_closed()

            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(30)
            self.server = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
