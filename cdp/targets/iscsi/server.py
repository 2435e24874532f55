"""asyncio iSCSI server: a thin pump around the sans-I/O core.

Design notes
------------
- One :class:`asyncio.Protocol` per TCP connection; ``data_received`` feeds
  :meth:`Connection.receive_data` and everything the core queued leaves with one
  ``transport.writelines`` per batch. uvloop is used when installed.
- :class:`~cdp.targets.iscsi.core.ScsiCommand` events run on the session's
  :class:`~cdp.targets.iscsi.scsi.LogicalUnit`. A command whose device call answered
  directly completes at once, without a task (the READ/WRITE fast path); otherwise it
  runs as an asyncio task and its response leaves when it finishes (iSCSI responses
  carry the task tag, so order does not matter).
- A :class:`~cdp.errors.ProtocolError` from the core closes the connection after
  sending what is queued (the Reject, if any); :class:`~cdp.targets.iscsi.core.Closed`
  (logout, failed login, reinstated session) does the same without an error.
- Back-pressure: reading pauses while ``max_inflight`` commands run as tasks or while
  the transport's write buffer is above its high-water mark.
- Target pings: every ``nop_interval`` seconds an idle connection gets a NOP-In; one
  still unanswered at the next tick closes the connection (a dead peer).
- ``close()`` stops listening and closes every connection; ``wait_closed()`` returns
  when they are all gone.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Mapping
from typing import Any, cast

from cdp.errors import ProtocolError
from cdp.targets.blockdev import ExportProvider
from cdp.targets.iscsi.command import ScsiResult, is_awaitable
from cdp.targets.iscsi.core import Closed, Connection, Portal, ScsiCommand, Task
from cdp.targets.iscsi.login import ChapConfig
from cdp.targets.iscsi.scsi import no_lun

log = logging.getLogger("cdp.iscsi")

DEFAULT_PORT = 3260


class _IscsiProtocol(asyncio.Protocol):
    """One initiator connection."""

    def __init__(self, server: IscsiServer) -> None:
        self.server = server
        self.conn: Connection | None = None
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.read_paused = False
        self.write_paused = False
        self.closing = False
        self.busy = False
        self.ping_handle: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        peer = transport.get_extra_info("peername")
        conn = Connection(self.server.portal, peer=str(peer))
        sock = transport.get_extra_info("sockname")
        if sock and self.server.advertise is None:
            host = sock[0]
            conn.address = f"[{host}]:{sock[1]}" if ":" in host else f"{host}:{sock[1]}"
        elif self.server.advertise is not None:
            conn.address = self.server.advertise
        self.conn = conn
        self.server.protocols[conn] = self
        self._arm_ping()

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        self.busy = True
        try:
            events = conn.receive_data(data)
        except ProtocolError as e:
            log.info("iSCSI protocol error from %s: %s", conn.peer, e)
            self._flush()
            self._close()
            return
        for ev in events:
            if type(ev) is ScsiCommand:
                self._run(ev.task)
            elif isinstance(ev, Closed):
                self._flush()
                self._close()
                return
        self._flush()

    def _run(self, task: Task) -> None:
        lu = task.lu
        res = lu.execute(task.request) if lu is not None else no_lun(task.request)
        if type(res) is not ScsiResult and is_awaitable(res):
            t = asyncio.ensure_future(self._finish(task, cast(Awaitable[ScsiResult], res)))
            self.tasks.add(t)
            t.add_done_callback(self.tasks.discard)
            if len(self.tasks) >= self.server.max_inflight and not self.read_paused:
                self._pause()
            return
        assert self.conn is not None
        self.conn.complete(task, cast(ScsiResult, res))

    async def _finish(self, task: Task, aw: Awaitable[ScsiResult]) -> None:
        res = await aw
        conn = self.conn
        if conn is None:
            return
        conn.complete(task, res)
        self._flush()
        if self.read_paused and not self.write_paused and len(self.tasks) <= self.server.max_inflight // 2:
            self._resume()

    def _flush(self) -> None:
        conn, transport = self.conn, self.transport
        if conn is None or transport is None or transport.is_closing():
            return
        out = conn.data_to_send()
        if out:
            transport.writelines(out)

    def _pause(self) -> None:
        if self.transport is not None and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()

    def _resume(self) -> None:
        if self.transport is not None and self.read_paused and not self.closing:
            self.read_paused = False
            self.transport.resume_reading()

    def pause_writing(self) -> None:
        self.write_paused = True
        self._pause()

    def resume_writing(self) -> None:
        self.write_paused = False
        if len(self.tasks) < self.server.max_inflight:
            self._resume()

    def _arm_ping(self) -> None:
        interval = self.server.nop_interval
        if interval > 0 and not self.closing:
            loop = asyncio.get_running_loop()
            self.ping_handle = loop.call_later(interval, self._tick)

    def _tick(self) -> None:
        conn = self.conn
        if conn is None or self.closing:
            return
        if conn.ping_ttt is not None:
            log.info("iSCSI initiator %s did not answer a NOP-In: closing", conn.peer)
            self._close()
            return
        if not self.busy:
            conn.ping()
            self._flush()
        self.busy = False
        self._arm_ping()

    def _close(self) -> None:
        self.closing = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closing = True
        if self.ping_handle is not None:
            self.ping_handle.cancel()
        conn = self.conn
        if conn is not None:
            conn.connection_lost()
            self.server.protocols.pop(conn, None)
        for t in list(self.tasks):
            t.cancel()
        self.server._gone()


class IscsiServer:
    """A listening iSCSI target portal; see :func:`serve_iscsi`."""

    def __init__(self, portal: Portal, *, max_inflight: int = 128, nop_interval: float = 30.0,
                 advertise: str | None = None) -> None:
        self.portal = portal
        self.max_inflight = max_inflight
        self.nop_interval = nop_interval
        self.advertise = advertise
        self.protocols: dict[Connection, _IscsiProtocol] = {}
        self._server: asyncio.Server | None = None
        self._idle: asyncio.Event | None = None
        portal.on_kill = self._kill

    @property
    def port(self) -> int:
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Open TCP connections."""
        return len(self.protocols)

    @property
    def sessions(self) -> int:
        return len(self.portal.sessions)

    def _kill(self, conn: Connection) -> None:
        proto = self.protocols.get(conn)
        if proto is not None:
            proto._flush()
            proto._close()

    def _gone(self) -> None:
        if not self.protocols and self._idle is not None:
            self._idle.set()

    def close(self) -> None:
        """Stop listening and close every connection."""
        if self._server is not None:
            self._server.close()
        for proto in list(self.protocols.values()):
            proto._close()
        self._idle = asyncio.Event()
        if not self.protocols:
            self._idle.set()

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_closed()
        if self._idle is not None:
            await self._idle.wait()


async def serve_iscsi(
    provider: ExportProvider,
    host: str = "127.0.0.1",
    port: int = DEFAULT_PORT,
    *,
    targets: Mapping[str, ChapConfig | Mapping[str, str]] | None = None,
    max_inflight: int = 128,
    nop_interval: float = 30.0,
    advertise: str | None = None,
    **kwargs: Any,
) -> IscsiServer:
    """Listen for iSCSI initiators on ``host:port`` (port 0: any free port).

    ``targets`` maps a target IQN, a volume or export name, ``"*"`` or ``"discovery"`` to
    CHAP settings (``{"user", "secret"}`` plus ``"mutual_user", "mutual_secret"`` for
    mutual CHAP); targets not listed need no authentication. ``advertise`` overrides the
    ``host:port`` SendTargets reports (default: the address the initiator connected to).
    """
    portal = Portal(provider, targets, address=f"{host}:{port}", **kwargs)
    server = IscsiServer(portal, max_inflight=max_inflight, nop_interval=nop_interval,
                         advertise=advertise)
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(lambda: _IscsiProtocol(server), host, port)
    portal.address = f"{host}:{server.port}"
    return server
