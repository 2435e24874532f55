"""Run an iSCSI server on its own event loop in a background thread (tests, benchmarks)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Mapping
from types import TracebackType
from typing import Any

from cdp.targets.blockdev import ExportProvider
from cdp.targets.iscsi.core import ChapConfig
from cdp.targets.iscsi.naming import target_name
from cdp.targets.iscsi.server import IscsiServer, new_event_loop, serve_iscsi


class IscsiServerThread:
    """``with IscsiServerThread(provider) as s: ... s.uri("vol0")`` ->
    ``iscsi://127.0.0.1:PORT/iqn.2026-11.io.cdp:vol0/0``."""

    def __init__(
        self,
        provider: ExportProvider,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        targets: Mapping[str, ChapConfig | Mapping[str, str]] | None = None,
        **kwargs: Any,
    ) -> None:
        self.provider = provider
        self.host = host
        self._port = port
        self.targets = targets
        self.kwargs = kwargs
        self.loop = new_event_loop()
        self.server: IscsiServer | None = None
        self._thread = threading.Thread(target=self.loop.run_forever, name="iscsi", daemon=True)

    @property
    def port(self) -> int:
        assert self.server is not None
        return self.server.port

    def uri(self, export: str = "vol0", lun: int = 0, auth: str = "") -> str:
        """libiscsi URL of an export's LUN (``auth``: ``"user%secret@"``)."""
        return f"iscsi://{auth}{self.host}:{self.port}/{target_name(export)}/{lun}"

    def call(self, fn: Any) -> Any:
        """Run ``fn()`` on the server's loop and return its result."""

        async def _do() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(_do(), self.loop).result(10)

    def start(self) -> IscsiServerThread:
        self._thread.start()
        fut = asyncio.run_coroutine_threadsafe(
            serve_iscsi(self.provider, self.host, self._port, targets=self.targets,
                        **self.kwargs),
            self.loop,
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

    def __enter__(self) -> IscsiServerThread:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
