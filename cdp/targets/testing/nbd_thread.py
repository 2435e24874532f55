"""Run an NBD server on its own event loop in a background thread (tests, benchmarks)."""

from __future__ import annotations

from cdp.targets.blockdev import ExportProvider
from cdp.targets.nbd.server import serve_nbd
from cdp.targets.testing.thread import BackgroundServer


class ServerThread(BackgroundServer):
    """``with ServerThread(provider) as s: ... nbd://127.0.0.1:{s.port}/NAME``."""

    name = "nbd"

    def __init__(self, provider: ExportProvider, host: str = "127.0.0.1", port: int = 0) -> None:
        self.provider = provider
        super().__init__(lambda: serve_nbd(provider, host, port), host)

    def uri(self, name: str = "") -> str:
        return f"nbd://{self.host}:{self.port}/{name}"
