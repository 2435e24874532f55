"""The source side: a volume service that ships the volume's journal to one target.

Design notes
------------
- :class:`ReplicationSource` is a :class:`~cdp.volume.VolumeService`: ``on_record``
  only sets an event (O(1), no I/O); its own task connects, authenticates, opens the
  replica and streams. Several targets are several services.
- What is shipped is read back from the journal (``scan_stored`` from the seq the
  target reports in OPENED), never taken from the write path and never from a scan of
  the volume: a reconnect, a restart and a live stream are the same loop. Records of
  segments the S3 tier dropped locally are fetched when the scan meets them, with the
  records that follow (up to half the read cache) in one round of ranged GETs.
- Only **durable** records are shipped: when the journal has records beyond
  ``durable_seq`` the task awaits ``journal.commit()`` itself (a group commit shared
  with the host's flushes) before reading them. So the target can never be ahead of
  what the source still has after a crash (which OPEN would refuse as "diverged").
- Flow control: at most ``window`` stored bytes beyond the last ACK; frames of at most
  ``batch`` bytes; with ``rate`` a pause of ``bytes / rate`` after each frame. A
  heartbeat goes out after a second without records.
- ``lag_seconds`` = now - timestamp of the oldest record not yet acknowledged (0 when
  caught up): the age of the oldest write the target could still lose.
- Connection loss: state ``disconnected``, retry after 1 s (doubling to 30 s). A
  REFUSED from the target (auth, epoch, lineage, diverged, ...): state ``refused``,
  no retry until restarted.
- ``persist`` (set by :mod:`cdp.ops.replication`) is called when the acknowledged seq
  moved (at most every :data:`PERSIST_EVERY` seconds) and when the target refuses, so
  status and lag survive a kill -9 of the source; the stream itself never depends on
  it (it resumes from what OPENED reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import struct
import time
from collections.abc import Callable
from typing import Any

from cdp.errors import CdpError, ProtocolError
from cdp.journal import NotLocal, RecordKind
from cdp.journal.tiered import fetch_missed, prefetch_limit, readahead
from cdp.replication.protocol import (
    NEED_DATA,
    Ack,
    Authenticated,
    Closed,
    Opened,
    Refusal,
    Refused,
    SourceConnection,
)
from cdp.volume import Volume, VolumeService

log = logging.getLogger("cdp.replication")
_CRC = struct.Struct("<I")
#: the states a stream reports (``replicate status``, ``cdp_replication_state``)
STATES = ("streaming", "catching-up", "disconnected", "refused", "stopped")
#: at most one ``persist`` call per this many seconds while ACKs arrive
PERSIST_EVERY = 2.0


class _Stop(Exception):
    pass


def status_row(vol: Volume, target: str, as_name: str, state: str, acked_seq: int,
               sent_bytes: int, refused: str | None) -> dict[str, Any]:
    """One ``replicate status`` row: ``lag_seconds`` is the age of the oldest record
    the target has not acknowledged as durable (0 when caught up), ``lag_records``
    how many. Cost: O(1) (one seq-to-time lookup)."""
    j = vol.journal
    last = j.last_seq
    acked = min(acked_seq, last)
    lag = 0.0
    if acked < last:
        lag = max(0.0, (time.time_ns() - j.time_of_seq(acked + 1)) / 1e9)
    return {"volume": vol.name, "target": target, "as": as_name, "state": state,
            "lag_seconds": round(lag, 3), "lag_records": last - acked,
            "acked_seq": acked_seq, "sent_bytes": sent_bytes, "refused": refused}


def sources_of(vol: Volume) -> list[ReplicationSource]:
    """The replication streams attached to ``vol`` (one per target)."""
    return [s for s in vol.services if isinstance(s, ReplicationSource)]


class ReplicationSource(VolumeService):
    """Streams ``vol``'s journal to ``host:port`` into the replica named ``as_name``."""

    def __init__(self, vol: Volume, host: str, port: int, secret: bytes, *,
                 as_name: str | None = None, name: str = "cdp", lineage: str | None = None,
                 epoch: int = 1, window: int = 64 << 20, batch: int = 4 << 20,
                 rate: int = 0, tls: ssl.SSLContext | None = None, fork_seq: int = 0) -> None:
        self.vol = vol
        self.host, self.port = host, port
        self._secret = secret
        self.as_name = as_name or vol.name
        self.name = name
        self.lineage = lineage or vol.uuid
        self.epoch = epoch
        self.window, self.batch = window, batch
        #: bytes/s of stored records sent (0: unlimited)
        self.rate = rate
        #: our failover point (the last seq of the previous epoch; 0: never failed over)
        self.fork_seq = fork_seq
        #: TLS client context (:mod:`cdp.replication.tls`); None: plain TCP
        self.tls = tls
        self.state = "stopped"
        self.acked_seq = 0
        self.sent_bytes = 0
        self.refused: tuple[str, str] | None = None
        #: the highest epoch a target reported (a failover there fences us: docs/REPLICATION.md)
        self.epoch_seen = epoch
        #: called with this source when acked_seq or refused should be saved
        self.persist: Callable[[ReplicationSource], None] | None = None
        self._persisted_at = 0.0
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ service callbacks

    def on_record(self, vol: Volume, kind: RecordKind, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview | None) -> None:
        self._wake.set()

    def close(self, vol: Volume) -> None:
        self.stop()

    # ------------------------------------------------------------------ control

    def start(self) -> None:
        """Start streaming (needs a running event loop); idempotent."""
        if self._task is None or self._task.done():
            self.refused = None
            self.state = "disconnected"
            self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
        self.state = "stopped"

    async def wait_acked(self, seq: int, timeout: float = 30.0) -> None:
        """Wait until the target acknowledged ``seq`` (tests, tools)."""
        deadline = time.monotonic() + timeout
        while self.acked_seq < seq:
            if self.state in ("refused", "stopped") or time.monotonic() > deadline:
                raise TimeoutError(f"replication to {self.target}: acked {self.acked_seq}, "
                                   f"waiting for {seq} ({self.state})")
            await asyncio.sleep(0.01)

    def status(self) -> dict[str, Any]:
        """The ``replicate status`` row (docs/REPLICATION.md). Cost: O(1)."""
        return status_row(self.vol, self.target, self.as_name, self.state, self.acked_seq,
                          self.sent_bytes,
                          None if self.refused is None else ": ".join(self.refused))

    def _save(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.persist is not None and (force or now - self._persisted_at >= PERSIST_EVERY):
            self._persisted_at = now
            try:
                self.persist(self)
            except (OSError, CdpError) as e:
                log.warning("replication %s -> %s: cannot save state: %s", self.vol.name,
                            self.target, e)

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        delay = 1.0
        while True:
            try:
                await self._session()
                delay = 1.0
            except _Stop:
                return
            except (OSError, ProtocolError, CdpError, asyncio.IncompleteReadError) as e:
                if self.refused is not None:
                    return
                log.warning("replication %s -> %s: %s", self.vol.name, self.target, e)
            self.state = "disconnected"
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _session(self) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None)
        conn = SourceConnection(self._secret, peer=self.target)
        acks: asyncio.Task[None] | None = None
        try:
            conn.start(self.name)
            writer.write(conn.data_to_send())
            await self._until(conn, reader, writer, Authenticated)
            j = self.vol.journal
            conn.open(self.as_name, self.lineage, self.vol.size, self.epoch, j.last_seq,
                      self.fork_seq)
            writer.write(conn.data_to_send())
            ev = await self._until(conn, reader, writer, Opened)
            assert isinstance(ev, Opened)
            self._check_tip(ev)
            self.acked_seq = ev.applied_seq
            acks = asyncio.get_running_loop().create_task(self._read_acks(conn, reader))
            await self._stream(conn, writer, acks)
        finally:
            if acks is not None:
                acks.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await acks
            writer.close()

    async def _until(self, conn: SourceConnection, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter, want: type) -> object:
        """Pump the handshake until an event of type ``want``."""
        while True:
            try:
                ev = conn.next_event()
            except Refusal as e:  # the target failed its proof: tell it, then stop
                writer.write(conn.data_to_send())
                with contextlib.suppress(OSError):
                    await writer.drain()
                self._refused(e.code, str(e))
            writer.write(conn.data_to_send())
            if ev is NEED_DATA:
                await writer.drain()
                conn.receive_data(await reader.read(1 << 16))
                continue
            if isinstance(ev, want):
                return ev
            if isinstance(ev, Refused):
                self._refused(ev.code, ev.message)
            if isinstance(ev, Closed):
                raise ConnectionResetError("the target closed the connection")

    def _refused(self, code: str, message: str) -> None:
        self.refused = (code, message)
        self.state = "refused"
        if code == "epoch" and (m := re.search(r"at epoch (\d+)", message)):
            self.epoch_seen = max(self.epoch_seen, int(m.group(1)))
        log.error("replication %s -> %s refused: %s (%s)", self.vol.name, self.target,
                  message, code)
        self._save(force=True)
        raise _Stop

    def _check_tip(self, ev: Opened) -> None:
        j = self.vol.journal
        if not ev.applied_seq:
            return
        if ev.applied_seq > j.last_seq:
            self._refused("diverged", f"the target has seq {ev.applied_seq}, we {j.last_seq}")
        if (ev.tip_ts, ev.tip_crc) == (0, 0):
            return  # rebased at a failback there: not comparable (docs/REPLICATION.md)
        raw = j.read_stored(ev.applied_seq)
        if (j.time_of_seq(ev.applied_seq), _CRC.unpack_from(raw, 4)[0]) != (ev.tip_ts, ev.tip_crc):
            self._refused("diverged", f"the target's record {ev.applied_seq} differs from ours")

    async def _read_acks(self, conn: SourceConnection, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(1 << 16)
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, Ack):
                    self.acked_seq = ev.durable_seq
                    self._wake.set()
                    self._save()
                elif isinstance(ev, Refused):
                    self._refused(ev.code, ev.message)
                elif isinstance(ev, Closed):
                    raise ConnectionResetError("the target closed the connection")

    async def _stream(self, conn: SourceConnection, writer: asyncio.StreamWriter,
                      acks: asyncio.Task[None]) -> None:
        j = self.vol.journal
        sizes: dict[int, int] = {}  # seq of the last record of each frame in flight -> bytes
        inflight = 0
        missed: list[tuple[int, int, int]] | None = None  # of the last fetch from the tier
        while True:
            if acks.done():
                acks.result()  # raises what ended it
                raise ConnectionResetError("the ack reader stopped")
            for s in [s for s in sizes if s <= self.acked_seq]:
                inflight -= sizes.pop(s)
            nxt = conn.next_seq
            self.state = "streaming" if j.last_seq - nxt < 1024 else "catching-up"
            if nxt <= j.last_seq and inflight < self.window:
                if j.durable_seq < nxt:
                    await j.commit()
                batch: list[bytes] = []
                n = 0
                gen = j.scan_stored(nxt)
                try:
                    for raw in gen:
                        if batch and (n + len(raw) > self.batch or nxt + len(batch) > j.durable_seq):
                            break
                        batch.append(raw)
                        n += len(raw)
                except NotLocal as exc:  # tiered history: fetch what catch-up reads next
                    if not batch:
                        missed = await fetch_missed(
                            j, exc, missed, lambda r: readahead(j, r, prefetch_limit(j)))
                        continue
                finally:
                    gen.close()
                missed = None
                conn.send_records(nxt, batch)
                writer.write(conn.data_to_send())
                await writer.drain()
                sizes[nxt + len(batch) - 1] = n
                inflight += n
                self.sent_bytes += n
                if self.rate:
                    await asyncio.sleep(n / self.rate)
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                conn.heartbeat(j.last_seq, time.time_ns())
                writer.write(conn.data_to_send())
                await writer.drain()
