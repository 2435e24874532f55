"""The operations layer: every operation cdpctl (and the admin API) runs, one table.

Each operation is ``async op(store, args, progress) -> JSON-able result``: an open
:class:`~cdp.store.Store`, plain JSON-able arguments and a progress callback. The daemon
runs them on its event loop (long ones yield between chunks so I/O keeps flowing);
cdpctl runs the read-only ones (``OFFLINE_OPS``) directly on a stopped store. One
module per subject: :mod:`~cdp.ops.volumes`, :mod:`~cdp.ops.catalog` (files),
:mod:`~cdp.ops.backup` (changed blocks, differential exports) and
:mod:`~cdp.ops.retention` and :mod:`~cdp.ops.sentinel` (alerts). The layer sits above the store and every volume kind and
service; nothing below it imports it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from cdp.errors import UsageError
from cdp.ops import backup, catalog, replication, retention, sentinel, tier, timeline, volumes
from cdp.progress import Progress, no_progress
from cdp.store import Store

OpFn = Callable[[Store, dict[str, Any], Progress], Awaitable[Any]]

OPS: dict[str, OpFn] = {**catalog.OPS, **backup.OPS, **retention.OPS, **sentinel.OPS,
                        **volumes.OPS, **replication.OPS, **tier.OPS,
                        **timeline.OPS}

#: operations cdpctl may run on a stopped store (they only read)
OFFLINE_OPS = {*volumes.OFFLINE, *catalog.OPS, *backup.OFFLINE, *retention.OFFLINE,
               *sentinel.OFFLINE, *tier.OFFLINE, *timeline.OFFLINE}


async def run_op(store: Store, op: str, args: dict[str, Any], progress: Progress | None = None) -> Any:
    """Run operation *op*; UsageError for a name not in :data:`OPS`."""
    fn = OPS.get(op)
    if fn is None:
        raise UsageError(f"unknown operation {op!r}")
    return await fn(store, args, progress or no_progress)


__all__ = ["OFFLINE_OPS", "OPS", "OpFn", "run_op"]
