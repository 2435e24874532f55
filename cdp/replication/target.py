"""The replica side: one asyncio pump per incoming stream, and the replica's role file.

Design notes
------------
- :func:`serve_stream` pumps one connection through a
  :class:`~cdp.replication.protocol.TargetConnection`: the handshake, then OPEN
  (identity checked against ``replica.json``, docs/REPLICATION.md "Identity"), then
  RECORDS applied with :meth:`cdp.volume.Volume.apply_stored` and acknowledged once
  durable. One stream per replica volume: a second OPEN of a volume that is streaming
  is refused (``busy``).
- **Pipelined durability.** The pump does not wait for a frame's group commit before
  applying the next: each RECORDS frame's :meth:`~cdp.volume.Volume.apply_stored` runs
  as a task whose first step appends all its records (in the order the frames came:
  the pump lets it run before reading on, and checks ``last_seq``), then waits for the
  commit while the pump decodes, checks and appends frame N+1, which joins the next
  group commit. ACKs are sent as those tasks finish, oldest first, each cumulative
  (the journal's durable seq then): only durable records are acknowledged, in seq
  order. At most :data:`PIPELINE` frames are pending. A frame holding a MARKER or a
  REWIND is applied alone (the pending ones finish first; its own apply awaited), as
  are the frames of a failback epoch: those records wait or renumber on the loop.
  A failed handshake, garbage or a gap: logged with the peer's address, the REFUSED
  frame (if any) sent, the socket closed; nothing of it is stored.
- ``replica.json`` (docs/FORMATS.md) is written before the first record of a new
  replica is applied, so a volume never holds replicated records without knowing their
  lineage.
- **Failover** (:func:`failover`): the volume's incoming stream is *fenced* first
  (REFUSED ``epoch`` sent, the socket closed, and its pump awaited, so no record of the
  old epoch lands afterwards), then ``replica.json`` becomes ``role = primary`` with
  ``epoch + 1`` (written durably) before anything may write the volume. A later OPEN of
  the old epoch is refused ``epoch`` by :func:`check_open`; its message names the new
  epoch ("at epoch N"), which the old source records.
- **Failback** (:func:`failback_point`, :func:`become_replica`): the newest point the
  old primary shares with the stream is found through the two epoch tables
  (:func:`common_point`: shared records are those of the same epoch's origin seq,
  whatever seq each side stores them at), walking back to a point this volume can
  still rewind to; the records to come are stored at ``seq + d``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import struct
from bisect import bisect_right
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import cast

from cdp.errors import CdpError, Corruption, ProtocolError, UsageError
from cdp.journal import RecordKind
from cdp.journal.format import (
    MARKER_PAYLOAD,
    RECORD_HEADER,
    RECORD_HEADER_SIZE,
    REWIND_PAYLOAD,
    Compression,
    encode_record,
)
from cdp.replication.protocol import (
    NEED_DATA,
    Authenticated,
    Closed,
    Event,
    Heartbeat,
    OpenRequest,
    Records,
    Refused,
    State,
    TargetConnection,
)

# the role file lives in cdp.replication.role; its names stay importable from here
from cdp.replication.role import ROLE_FILE, Role, save_role
from cdp.replication.role import load_role as load_role
from cdp.replication.wire import send
from cdp.volume import Volume

log = logging.getLogger("cdp.replication")

_CRC = struct.Struct("<I")
#: a frame's length prefix (u32 LE)
_LEN = struct.Struct("<I")
#: frames of at least this many bytes are read whole into the frame buffer
LARGE_FRAME = 256 << 10
#: RECORDS frames applied but not yet durable, at most (the pump then waits for the oldest)
PIPELINE = 4
#: record kinds applied with awaits between appends (flush, role file): never pipelined
_SERIAL_KINDS = (int(RecordKind.MARKER), int(RecordKind.REWIND))


@dataclass
class _Stream:
    """An incoming stream being applied to a volume (for :func:`fence`)."""

    conn: TargetConnection
    writer: asyncio.StreamWriter
    done: asyncio.Event


#: volume directory -> its incoming stream (one per volume; the ``busy`` rule)
_streams: dict[Path, _Stream] = {}


def tip(vol: Volume, role: Role | None = None) -> tuple[int, int, int]:
    """(applied seq in the sender's numbering, its timestamp, its record CRC) of a
    volume's journal; zeros if empty. A record rebased at a failback (seq and maybe
    time rewritten) cannot be compared by the sender: its ts and CRC are reported as 0."""
    j = vol.journal
    seq = j.last_seq
    if not seq:
        return 0, 0, 0
    _epoch, first, d = (role or load_role(vol)).epochs[-1]
    if d and seq >= first - 1:
        if seq >= first:
            return seq - d, 0, 0
        # just after the failback's REWIND (or at the common point): the common point,
        # comparable when both sides number it alike (not after a chained failback)
        raw = j.read_stored(seq)
        if raw[9] != RecordKind.REWIND or REWIND_PAYLOAD.unpack_from(
                raw, RECORD_HEADER_SIZE)[0] != seq - d:
            return seq - d, 0, 0
        seq -= d
    return seq, j.time_of_seq(seq), _CRC.unpack_from(j.read_stored(seq), 4)[0]


#: one entry of an epoch table as spans: (epoch, first local seq, last local seq, offset)
_Span = tuple[int, int, int, int]


def spans(epochs: Sequence[Sequence[int]], last: int) -> list[_Span]:
    """The local seq ranges of an epoch table up to ``last``: each entry
    ``[epoch, first, offset]`` covers ``first .. next first - 1``; a record there is the
    epoch's writer's record ``seq - offset`` (its *origin*). O(entries)."""
    out: list[_Span] = []
    ents = sorted(epochs, key=lambda e: e[1])
    for i, (e, first, off) in enumerate(ents):
        hi = min(last, ents[i + 1][1] - 1) if i + 1 < len(ents) else last
        if first <= hi:
            out.append((e, first, hi, off))
    return out


def common_point(sender: Sequence[Sequence[int]], fork: int, mine: Sequence[Sequence[int]],
                 last: int, newest_ok: Callable[[int, int], int | None]) -> tuple[int, int]:
    """The newest point both volumes hold: (sender seq, local seq), by the two epoch
    tables (a record is shared when both hold the same epoch's origin seq), at or before
    the sender's ``fork`` and our ``last``, walking back to the newest one
    ``newest_ok(lo, hi)`` (a local point in ``[lo, hi]`` we can rewind to, or None)
    accepts; (0, 0), the empty volume, when none. O(entries^2 + lookups)."""
    best = (0, 0)
    for e, slo, shi, soff in spans(sender, fork):
        for me, mlo, mhi, moff in spans(mine, last):
            if me != e:
                continue
            lo, hi = max(slo - soff, mlo - moff), min(shi - soff, mhi - moff)
            if lo > hi:
                continue
            local = newest_ok(lo + moff, hi + moff)
            if local is not None and local - moff + soff > best[0]:
                best = (local - moff + soff, local)
    return best


def sender_to_local(sender: Sequence[Sequence[int]], mine: Sequence[Sequence[int]],
                    last: int, seq: int) -> int | None:
    """Our seq of the sender's record ``seq`` of shared history (at or before our
    ``last``), or None if we do not hold it. O(entries)."""
    if seq == 0:
        return 0
    for e, slo, shi, soff in spans(sender, seq):
        if slo <= seq <= shi:
            for me, mlo, mhi, moff in spans(mine, last):
                if me == e and mlo <= seq - soff + moff <= mhi:
                    return seq - soff + moff
    return None


def failback_point(vol: Volume, req: OpenRequest) -> tuple[int, int] | None:
    """The newest common point of ``vol`` and a stream that failed over from it, as
    (sender seq, local seq), if ``req`` is such a failback: the same lineage, a newer
    epoch, a volume that is a primary here. None otherwise.

    With the sender's epoch table (protocol 3) the two tables decide (chained
    failbacks number shared records differently on the two sides), walking back to a
    point this volume can still rewind to (its retention may have expired the newest
    one); without it (protocol 2) ``min(fork_seq, last seq, sender's last seq)``, the
    same seq on both sides. O(entries^2 + log retained)."""
    role = load_role(vol)
    j = vol.journal
    if (role.role != "primary" or req.lineage != role.lineage or req.epoch <= role.epoch
            or not req.fork_seq or not j.last_seq):
        return None
    if not req.epochs:
        c = min(req.fork_seq, j.last_seq, req.source_last_seq)
        return c, c
    maps = vol.maps

    def newest_ok(lo: int, hi: int) -> int | None:
        if hi >= maps.keep_after:
            return hi
        ret = maps.retained
        i = bisect_right(ret, hi)
        return ret[i - 1] if i and ret[i - 1] >= lo else None

    return common_point(req.epochs, min(req.fork_seq, req.source_last_seq), role.epochs,
                        j.last_seq, newest_ok)


async def become_replica(vol: Volume, req: OpenRequest, common: int, peer: str,
                         local: int | None = None) -> None:
    """Failback on the old primary (docs/REPLICATION.md): a REWIND to the newest common
    point (``common`` in the sender's numbering, ``local`` in ours; the same by default)
    appended (its divergent records keep their seqs and stay readable), then
    ``replica.json`` says replica of ``req``'s epoch with the seq offset ``d`` for the
    records to come (sender seq ``b`` stored at ``b + d``). Outgoing streams of the
    volume stop. Cost: one rewind (metadata) and one role file write."""
    from cdp.replication.source import sources_of  # the source imports nothing of ours

    for s in sources_of(vol):
        s.stop()
    role = load_role(vol)
    await vol.flush()
    local = common if local is None else local
    base = local
    if vol.journal.last_seq > local:
        base = await vol.rewind(local)
    d = base - common
    role.role, role.epoch, role.source = "replica", req.epoch, peer
    role.epochs.append([req.epoch, base + 1, d])
    save_role(vol.path, role)
    log.warning("replication: %s fails back from %s: common point @%d here (@%d there), "
                "records of epoch %d stored at their seq + %d", vol.name, peer, local, common,
                req.epoch, d)


def rebase_records(vol: Volume, role: Role, records: Sequence[bytes | memoryview],
                   sender: Sequence[Sequence[int]] = ()) -> Sequence[bytes | memoryview]:
    """The records of a failback epoch as this journal stores them: seq + d, a REWIND
    target after the common point + d (one at or before it mapped through the sender's
    epoch table ``sender`` when given: shared history may be numbered differently
    there), a timestamp not older than the journal's last, a marker id this volume
    already uses renumbered (the pair kept in ``role``, which the caller saves). Record
    CRCs recomputed (chunk CRCs do not cover these fields)."""
    _epoch, first, d = role.epochs[-1]
    if not d:
        return records
    common = first - 1 - d
    j = vol.journal
    last_ts = j.time_of_seq(j.last_seq) if j.last_seq else 0
    ids = {m.id for m in vol.markers}
    remap = {a: b for a, b in role.marker_ids}
    ids.update(remap.values())
    out: list[bytes | memoryview] = []
    for view in records:
        raw = bytes(view)  # (records of a frame are views of it)
        (_m, _crc, version, kind, comp, flags, _n, seq, ts, offset, length
         ) = RECORD_HEADER.unpack_from(raw)
        payload = raw[RECORD_HEADER_SIZE:]
        if kind == RecordKind.REWIND and comp == Compression.NONE:
            (t,) = REWIND_PAYLOAD.unpack_from(payload)
            if t > common:
                payload = REWIND_PAYLOAD.pack(t + d)
            elif sender:
                mine = sender_to_local(sender, role.epochs[:-1], first - 1, t)
                if mine is None:
                    raise Corruption(f"the sender rewinds to its @{t}, which this "
                                     f"volume does not hold")
                payload = REWIND_PAYLOAD.pack(mine)
        elif kind == RecordKind.MARKER and comp == Compression.NONE:
            mid, _ln = MARKER_PAYLOAD.unpack_from(payload)
            new = remap.get(mid)
            if new is None and mid in ids:
                new = max(*ids, vol.next_marker_id - 1) + 1
                remap[mid] = new
                role.marker_ids.append([mid, new])
            if new is not None:
                ids.add(new)
                payload = struct.pack("<Q", new) + payload[8:]
            ids.add(mid if new is None else new)
        ts = max(ts, last_ts)
        last_ts = ts
        out.append(encode_record(kind, seq + d, ts, offset, length, payload, comp, flags,
                                 version))
    return out


def check_open(vol: Volume, req: OpenRequest, peer: str) -> tuple[str, str] | None:
    """Why ``req`` may not stream into ``vol`` as (code, message), or None; a volume
    that was never replicated into and holds no record becomes a replica of ``req``'s
    lineage here (``replica.json`` written)."""
    role = load_role(vol)
    fresh = not (vol.path / ROLE_FILE).exists()
    applied = tip(vol, role)[0]
    if fresh:
        if vol.journal.last_seq:
            return "exists", f"volume {vol.name} holds its own data; not a replica"
        if vol.size != req.size:
            return "size", f"volume {vol.name} has {vol.size} bytes, the source {req.size}"
        save_role(vol.path, Role("replica", req.lineage, req.epoch, peer))
        return None
    if role.lineage != req.lineage:
        return "lineage", f"volume {vol.name} replicates another volume ({role.lineage})"
    if req.epoch < role.epoch:
        return "epoch", (f"volume {vol.name} failed over: it is at epoch {role.epoch}; "
                         f"the stream's is {req.epoch}")
    if role.role != "replica":  # the same epoch: a loop; a newer one: failback (not built)
        return "primary", f"volume {vol.name} is a primary (epoch {role.epoch})"
    if vol.size != req.size:
        return "size", f"volume {vol.name} has {vol.size} bytes, the source {req.size}"
    if applied > req.source_last_seq:
        return "diverged", (f"volume {vol.name} has seq {applied}, "
                            f"the source only {req.source_last_seq}")
    if req.epoch > role.epoch:
        role.epochs.append([req.epoch, vol.journal.last_seq + 1, 0])
        role.epoch = req.epoch
        save_role(vol.path, role)
    return None


#: the replica volume for an OPEN: (volume, or None to refuse as "unknown")
Lookup = Callable[[OpenRequest], Volume | None]


async def serve_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                       secret: bytes, lookup: Lookup, busy: set[str]) -> None:
    """Pump one replication connection until it ends; never raises (logs instead)."""
    addr = writer.get_extra_info("peername")
    peer = f"{addr[0]}:{addr[1]}" if isinstance(addr, tuple) else str(addr)
    conn = TargetConnection(secret)
    vol: Volume | None = None
    role: Role | None = None
    sender: tuple[tuple[int, int, int], ...] = ()
    done = asyncio.Event()
    #: apply_stored tasks in frame order whose records are appended, not yet acked
    pending: deque[asyncio.Task[int]] = deque()
    read: asyncio.Task[bytes | _Frame] | None = None
    frames = _FrameReader(reader, conn)
    loop = asyncio.get_running_loop()

    def acked(durable: int) -> None:
        """ACK ``durable`` (the journal's numbering) in the sender's numbering."""
        assert role is not None
        if conn.state is State.RECEIVING:  # not once fenced or closed
            conn.ack(durable - role.epochs[-1][2])

    try:
        send(writer, conn.data_to_send())
        while True:
            if read is None:
                read = loop.create_task(frames.read())
            if not read.done():
                await asyncio.wait((read, pending[0]) if pending else (read,),
                                   return_when=asyncio.FIRST_COMPLETED)
            while pending and pending[0].done():
                acked(pending.popleft().result())
            if not read.done():  # only acks to send
                send(writer, conn.data_to_send())
                await writer.drain()
                continue
            got = read.result()
            read = None
            data: bytes | memoryview
            if isinstance(got, _Frame):
                data, first = got.body, conn.receive_frame(got.body)
            else:
                data, first = got, None
                conn.receive_data(data)
            for ev in _events(conn, first):
                if isinstance(ev, Authenticated):
                    log.info("replication: %s (%s) authenticated", peer, ev.peer)
                elif isinstance(ev, OpenRequest):
                    vol = await _open(conn, ev, lookup, busy, peer)
                    if vol is None:
                        break
                    role = load_role(vol)
                    sender = ev.epochs
                    _streams[vol.path] = _Stream(conn, writer, done)
                elif isinstance(ev, Records):
                    assert vol is not None and role is not None
                    await _apply(vol, role, ev.records, pending, acked, sender)
                elif isinstance(ev, Heartbeat):
                    pass
                elif isinstance(ev, Refused):
                    log.warning("replication: %s (%s) refused us: %s", peer, conn.peer,
                                ev.message)
                    break
                elif isinstance(ev, Closed):
                    break
            if isinstance(got, _Frame):  # its records are appended (_apply returned)
                frames.release()
            if not data or conn.state in (State.CLOSED, State.ERROR):
                await _drain(pending, acked)
            if writer.is_closing():  # the peer is gone (uvloop raises on a write then)
                return
            send(writer, conn.data_to_send())
            await writer.drain()
            if not data or conn.state in (State.CLOSED, State.ERROR):
                return
    except ProtocolError as e:
        log.warning("replication: refused %s: %s", peer, e)
        try:
            send(writer, conn.data_to_send())
            await writer.drain()
        except OSError:
            pass
    except (CdpError, OSError) as e:
        log.warning("replication: stream from %s stopped: %s", peer, e)
    finally:
        if read is not None:
            read.cancel()
            with contextlib.suppress(BaseException):
                await read
        if pending:  # their records are appended: let the commits finish (fence waits)
            await asyncio.gather(*pending, return_exceptions=True)
        if vol is not None:
            busy.discard(vol.name)
            if (st := _streams.get(vol.path)) is not None and st.done is done:
                del _streams[vol.path]
        done.set()
        writer.close()


@dataclass(frozen=True)
class _Frame:
    """A whole frame's body, read as one (see :class:`_FrameReader`)."""

    body: memoryview


#: bytes of frame buffer a stream keeps for the next frames (a larger frame's buffer is
#: not kept: one record may be up to 1 GiB)
KEEP_FRAME_BUFFER = 64 << 20


class _FrameReader:
    """Reads what the peer sends next (:meth:`read`): up to 1 MiB as it comes, except
    that a frame of :data:`LARGE_FRAME` bytes or more, once the core has seen its
    length (``large_frame``), is read whole into a buffer reused frame after frame,
    which ``receive_frame`` decodes without copying large records out of it.

    Why: a 1 MiB record crossed user space four times on its way to ``append_stored``
    (the reader's buffer, the bytes ``read`` returned, the core's buffer, msgpack's copy
    of each record), ~35 % of the target's CPU at 1 MiB records (issue #20); now three
    (the reader's buffer, the bytes ``read`` returns, the frame buffer), and the frame
    buffer is reused, where the core's buffer grew anew for each frame (fresh memory:
    a page fault per 4 KiB on this VM). Small frames (a
    few small records: light writes) still go many to a read. The pump gives the
    buffer back (:meth:`release`) once the frame's records are appended (``_apply``
    returns only then): nothing reads them after that.
    """

    def __init__(self, reader: asyncio.StreamReader, conn: TargetConnection) -> None:
        self.reader = reader
        self.conn = conn
        self._spare: bytearray | None = None
        self._last: bytearray | None = None

    async def read(self) -> bytes | _Frame:
        """The next bytes, or a large frame's body; ``b""`` at the end of the stream
        (inside a large frame, what came of it is given back to the core first, which
        then refuses the torn frame at that end). Cost: the copies above, O(bytes)."""
        reader, conn = self.reader, self.conn
        n = conn.large_frame(LARGE_FRAME)
        if not n:
            return await reader.read(1 << 20)
        buf = self._spare
        if buf is None or len(buf) < n:
            buf = bytearray(n)
        self._spare = None
        mv = memoryview(buf)[:n]
        pos = conn.take_frame_start(mv)
        while pos < n:
            chunk = await reader.read(n - pos)
            if not chunk:  # the end inside the frame: the core refuses it at the end
                conn.receive_data(_LEN.pack(n) + bytes(mv[:pos]))
                return b""
            mv[pos : pos + len(chunk)] = chunk
            pos += len(chunk)
        self._last = buf
        return _Frame(mv)

    def release(self) -> None:
        """The last frame read is done with (its records appended): its buffer may take
        the next one."""
        buf, self._last = self._last, None
        if buf is not None and len(buf) <= KEEP_FRAME_BUFFER:
            self._spare = buf


def _events(conn: TargetConnection, first: Event | None) -> Iterator[Event]:
    """``first`` (if any), then the events ``conn`` has buffered, each looked for only
    when the one before was handled."""
    if first is not None:
        yield first
    while (ev := conn.next_event()) is not NEED_DATA:
        yield cast(Event, ev)


async def _drain(pending: deque[asyncio.Task[int]], acked: Callable[[int], None],
                 keep: int = 0) -> None:
    """Wait for the oldest pending applies until ``keep`` are left, acknowledging each
    as it turns durable (its error, if any, raised)."""
    while len(pending) > keep:
        acked(await pending.popleft())


async def _apply(vol: Volume, role: Role, records: Sequence[bytes | memoryview],
                 pending: deque[asyncio.Task[int]], acked: Callable[[int], None],
                 sender: Sequence[Sequence[int]] = ()) -> None:
    """Apply one RECORDS frame: appended when this returns, durable later (a task in
    ``pending``, acknowledged by whoever finds it done); or, for a frame that must be
    applied alone, appended, durable and acknowledged (the pending ones first)."""
    loop = asyncio.get_running_loop()
    while pending and pending[0].done():  # ACK what is durable; stop at a failed apply
        acked(pending.popleft().result())
    d = role.epochs[-1][2]  # a failback epoch: stored at seq + d
    if d or any(len(r) > 9 and r[9] in _SERIAL_KINDS for r in records):
        await _drain(pending, acked)
        renumbered = len(role.marker_ids)
        pending.append(loop.create_task(vol.apply_stored(
            rebase_records(vol, role, records, sender))))
        await _drain(pending, acked)
        if len(role.marker_ids) != renumbered:
            save_role(vol.path, role)
        return
    await _drain(pending, acked, PIPELINE - 1)
    last = vol.journal.last_seq + len(records)
    task = loop.create_task(vol.apply_stored(records))
    pending.append(task)
    await asyncio.sleep(0)  # its first step appends every record, then awaits the commit
    if not task.done() and vol.journal.last_seq != last:
        await _drain(pending, acked)  # not all appended yet (not expected here): wait


class Listener:
    """Accepts replication streams, each pumped by :func:`serve_stream`.

    ``close()`` stops accepting and ends every open stream as if its source had closed
    it: reading stops and the handler sees the end of the stream, lets the records
    already appended commit, sends their acknowledgement and closes the connection, so
    the source knows what it need not send again. ``wait_closed()`` returns once every
    handler has returned; a handler still blocked after ``grace`` seconds (a source
    that reads nothing) has its connection closed. The same on every Python:
    ``asyncio.Server.wait_closed`` waits for handlers only since 3.12, and ends none."""

    def __init__(self, secret: bytes, lookup: Lookup) -> None:
        self._secret = secret
        self._lookup = lookup
        self._busy: set[str] = set()
        self._streams: dict[asyncio.Task[None],
                            tuple[asyncio.StreamReader, asyncio.StreamWriter]] = {}
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int, tls: ssl.SSLContext | None = None) -> int:
        """Listen on ``host:port`` (0: any free port); returns the port bound."""
        self.server = await asyncio.start_server(self._handle, host, port, ssl=tls)
        return int(self.server.sockets[0].getsockname()[1])

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._streams[task] = (r, w)
        try:
            await serve_stream(r, w, self._secret, self._lookup, self._busy)
        finally:
            del self._streams[task]

    def close(self) -> None:
        if self.server is not None:
            self.server.close()
        for r, w in self._streams.values():
            if not w.is_closing():
                pause = getattr(w.transport, "pause_reading", None)  # (typed write-only)
                if pause is not None:
                    pause()  # nothing more is fed to r after its EOF
                r.feed_eof()

    async def wait_closed(self, grace: float = 10.0) -> None:
        if self._streams:
            _, late = await asyncio.wait(list(self._streams), timeout=grace)
            for task in late:
                self._streams[task][1].close()
            if late:
                await asyncio.wait(late)
        if self.server is not None:
            await self.server.wait_closed()


async def listen(host: str, port: int, secret: bytes, lookup: Lookup, *,
                 tls: ssl.SSLContext | None = None) -> tuple[Listener, int]:
    """Accept replication streams on ``host:port`` (cdpd's ``[replication] listen``),
    inside TLS with ``tls`` (:mod:`cdp.replication.tls`); the listener and the port
    bound."""
    lst = Listener(secret, lookup)
    return lst, await lst.start(host, port, tls)


async def _open(conn: TargetConnection, req: OpenRequest, lookup: Lookup, busy: set[str],
                peer: str) -> Volume | None:
    try:
        vol = lookup(req)
    except CdpError as e:
        log.warning("replication: no replica %r for %s: %s", req.volume, peer, e)
        vol = None
    why: tuple[str, str] | None
    if vol is None:
        why = "unknown", f"no volume {req.volume!r} here"
    elif vol.name in busy:
        why = "busy", f"volume {vol.name} is receiving another stream"
    elif (fb := failback_point(vol, req)) is not None:
        why = None
        if vol.size != req.size:
            why = "size", f"volume {vol.name} has {vol.size} bytes, the source {req.size}"
        elif vol.connections:
            why = "busy", f"hosts are connected to {vol.name}; disconnect them to fail back"
        else:
            busy.add(vol.name)
            try:
                await become_replica(vol, req, fb[0], peer, fb[1])
            finally:
                busy.discard(vol.name)
            why = check_open(vol, req, peer)
    else:
        why = check_open(vol, req, peer)
    if why is not None:
        log.warning("replication: refused %s for %s: %s", peer, req.volume, why[1])
        conn.refuse(*why)
        return None
    assert vol is not None
    busy.add(vol.name)
    seq, ts, crc = tip(vol)
    conn.accept(seq, ts, crc, load_role(vol).epoch)
    log.info("replication: %s streams into %s from seq %d", peer, vol.name, seq + 1)
    return vol


async def fence(vol: Volume, code: str, message: str, timeout: float = 30.0) -> bool:
    """End ``vol``'s incoming stream, if any: REFUSED (``code``, ``message``) sent, the
    socket closed, and its pump finished (a batch being applied completes first), so
    nothing of that stream is applied afterwards. Whether there was one."""
    st = _streams.get(vol.path)
    if st is None:
        return False
    with contextlib.suppress(ProtocolError, OSError, RuntimeError):
        st.conn.refuse(code, message)
        st.writer.write(st.conn.data_to_send())
    st.writer.transport.abort()
    await asyncio.wait_for(st.done.wait(), timeout)
    return True


async def failover(vol: Volume) -> Role:
    """Make the replica ``vol`` a writable primary of the next epoch: its stream fenced,
    ``replica.json`` written (role primary, epoch + 1, the epoch's first seq) before the
    caller lets anything write. UsageError if ``vol`` is not a replica."""
    role = load_role(vol)
    if role.role != "replica":
        raise UsageError(f"volume {vol.name} is not a replica (role {role.role})")
    epoch = role.epoch + 1
    if await fence(vol, "epoch", f"volume {vol.name} failed over: it is at epoch {epoch}"):
        log.info("replication: %s: incoming stream fenced for the failover", vol.name)
    await vol.flush()
    role.role, role.epoch = "primary", epoch
    role.epochs.append([epoch, vol.journal.last_seq + 1, 0])
    save_role(vol.path, role)
    log.warning("replication: %s failed over: primary at epoch %d from seq %d", vol.name,
                epoch, vol.journal.last_seq + 1)
    return role
