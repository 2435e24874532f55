"""Run an iSCSI server on its own event loop in a background thread (tests, benchmarks)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cdp.targets.blockdev import ExportProvider
from cdp.targets.iscsi.login import ChapConfig
from cdp.targets.iscsi.naming import target_name
from cdp.targets.iscsi.server import serve_iscsi
from cdp.targets.testing.thread import BackgroundServer


class IscsiServerThread(BackgroundServer):
    """``with IscsiServerThread(provider) as s: ... s.uri("vol0")`` ->
    ``iscsi://127.0.0.1:PORT/iqn.2026-11.io.cdp:vol0/0``."""

    name = "iscsi"

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
        self.targets = targets
        self.kwargs = kwargs
        super().__init__(
            lambda: serve_iscsi(provider, host, port, targets=targets, **kwargs), host
        )

    def uri(self, export: str = "vol0", lun: int = 0, auth: str = "") -> str:
        """libiscsi URL of an export's LUN (``auth``: ``"user%secret@"``)."""
        return f"iscsi://{auth}{self.host}:{self.port}/{target_name(export)}/{lun}"
