"""Run an NBD server on its own event loop in a background thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from types import TracebackType

from cdp.targets.blockdev import ExportProvider
from cdp.targets.nbd.server import NbdServer, new_event_loop, serve_nbd


class ServerThread:
    """``with ServerThread(provider) as s: ... nbd://127.0.0.1:{s.port}/NAME``."""

    def __init__(self, provider: ExportProvider, host: str = "127.0.0.1", port: int = 0) -> None:
        self.provider = provider
        self.host = host
        self._port = port
        self.loop = new_event_loop()
        self.server: NbdServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="nbd", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def uri(self, name: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{name}"

    def start(self) -> ServerThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            serve_nbd(self.provider, self.host, self._port), self.loop
        )
        self.server = fut.result(10)
        return self

    def stop(self) -> None:
        if self.server is not None:
            server = self.server

            async def _stop() -> None:
                server.close()
                await server.wait_closed()

            asyncio.run_coroutine_threadsafe(_stop(), self.loop).result(30)
            self.server = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        self.loop.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
