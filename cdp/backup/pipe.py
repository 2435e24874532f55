"""Reading on the event loop, writing in a worker thread, one batch apart.

The daemon's volumes are event-loop only, so payload reads stay on the loop; the
blocking writes (files, pipes, remote NBD servers) run in a thread while the loop reads
the next batch. Cost: one executor hand-off per batch (a few MiB)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

BATCH_BYTES = 8 << 20


class Pipe:
    """Runs ``fn(*args)`` in a worker thread, at most one call in flight."""

    def __init__(self) -> None:
        self._pending: asyncio.Future[Any] | None = None

    async def put(self, fn: Callable[..., Any], *args: Any) -> None:
        """Wait for the previous call, then start this one (raises the previous error)."""
        await self.drain()
        self._pending = asyncio.get_running_loop().run_in_executor(None, fn, *args)

    async def drain(self) -> None:
        if self._pending is not None:
            p, self._pending = self._pending, None
            await p

    async def abort(self) -> None:
        """Wait for the call in flight, ignoring its error (cleanup after a failure)."""
        try:
            await self.drain()
        except Exception:
            pass
