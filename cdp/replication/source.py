"""The source side: a volume service that ships the volume's journal to one target.

Design notes
------------
- :class:`ReplicationSource` is a :class:`~cdp.volume.VolumeService`: ``on_record``
  only sets an event (O(1), no I/O); its own task connects, authenticates, opens the
  replica and streams. Several targets are several services.
- What is shipped is the journal's stored records from the seq the target reports in
  OPENED, never a scan of the volume: a reconnect, a restart and a live stream are the
  same loop. Records not shipped yet come from memory when the window the journal
  fills as it appends holds them (:mod:`cdp.replication.window`: the bytes as stored,
  so the same frames), the rest is read back from the journal (catch-up, the gaps a
  slow target leaves, a restart). Records of
  segments the S3 tier dropped locally are fetched when the scan meets them, with the
  records that follow (up to half the read cache) in one round of ranged GETs.
- Only **durable** records are shipped: when the journal has records beyond
  ``durable_seq`` the task starts a ``journal.commit()`` itself (a group commit shared
  with the host's flushes) and reads none of them before it returned. It waits for
  that commit only when nothing durable is left to send: the ``fdatasync`` runs while
  the frames of what the previous one made durable go out (:meth:`_commit`). It
  starts a commit only after :data:`COMMIT_GAP` (100 ms) in which no commit made
  records durable: under a stream of writes the commits the volume makes anyway (the
  host's flushes, those before each seal) carry the stream, which ships what each made
  durable, and it adds an ``fdatasync`` of its own only where they leave a gap, or at
  once when the writes pause (:data:`COMMIT_IDLE`, 10 ms). So the
  target can never be ahead of what the source still has after a crash (which OPEN
  would refuse as "diverged").
- Flow control: at most ``window`` stored bytes beyond the last ACK; frames of at most
  ``batch`` bytes. ``rate`` is a token bucket on the sent bytes: a frame goes out when
  its turn comes (``due``), and moves ``due`` on by ``bytes / rate`` from when it was
  due (credit of at most :data:`RATE_BURST` seconds of an idle link is kept, so the
  link is used at the rate, not below it by the time reading and sending take); frames
  are at most 1/8 s of the rate. A heartbeat goes out after a second without records.
- ``lag_seconds`` = now - timestamp of the oldest record not yet acknowledged (0 when
  caught up): the age of the oldest write the target could still lose.
- **Fallback** (:class:`Fallback`, docs/REPLICATION.md "Fallback"): when the points
  after the target's last seq were expired by the source's retention, the records up to
  the next point the source still has (``Q``) are not shipped; a synthetic run with the
  same seqs and times stands for them: an elided stub over the whole volume (the gap:
  every point in it reads as expired), zero-length fillers, a REWIND to the target's
  last seq, the blocks ``changed()`` reports since the source's newest point at or
  before it, read from the volume at ``Q``, then record ``Q`` as stored. Streaming
  resumes after ``Q``. State ``catching-up`` with a ``reason`` meanwhile.
- All reads of the records a stream ships are :class:`RecordReader`'s (the window
  first, then one ``read_stored`` per record, see its notes); the fallback's are
  :meth:`Fallback.records`.
- Connection loss: state ``disconnected``, retry after 1 s (doubling to 30 s). A
  REFUSED from the target (auth, epoch, lineage, diverged, ...): state ``refused``,
  no retry until restarted; except ``busy``, which is retried as a lost connection
  (the target may not have seen our previous connection end yet).
- ``persist`` (set by :mod:`cdp.ops.replication`) is called when the acknowledged seq
  moved (at most every :data:`PERSIST_EVERY` seconds, in a worker thread: its file
  write and fsyncs stay off the loop) and when the target refuses (on the loop), so
  status and lag survive a kill -9 of the source; the stream itself never depends on
  it (it resumes from what OPENED reports).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import ssl
import struct
import time
from bisect import bisect_left, bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from cdp.errors import CdpError, ProtocolError
from cdp.journal import Compression, Journal, NotLocal, RecordKind
from cdp.journal.format import REWIND_PAYLOAD, encode_data_record, encode_record
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
from cdp.replication.window import RecordWindow
from cdp.replication.wire import send, widen
from cdp.volume import Volume, VolumeService

log = logging.getLogger("cdp.replication")
_CRC = struct.Struct("<I")
#: the states a stream reports (``replicate status``, ``cdp_replication_state``)
STATES = ("streaming", "catching-up", "disconnected", "refused", "stopped")
#: at most one ``persist`` call per this many seconds while ACKs arrive
PERSIST_EVERY = 2.0
#: seconds of unused rate a stream may catch up on at once (the token bucket's depth)
RATE_BURST = 0.05
#: seconds without a commit that made records durable (anyone's: the host's flushes,
#: a seal's, the stream's) after which the stream starts one of its own, to ship what
#: it makes durable. Under writes the volume commits anyway: before each seal (every
#: ``l0_max_writes`` writes or ``seal_interval``) and at each host flush; the stream
#: ships on those and adds an ``fdatasync`` only where they leave a gap this long.
#: Each ``fdatasync`` forced on the source costs it the writeback of what it covers on
#: its own cores (1.6-2.1 ms of system CPU each at 4 KiB writes, issue #20: at a gap
#: of 20 ms the stream forced ~100 in 4 s where the volume alone made 60). The lag
#: (RPO) grows by at most this much.
COMMIT_GAP = 0.1
#: seconds without a new record after which the stream commits at once (the writes
#: paused: nothing more to batch with; e.g. the end of a burst), whatever COMMIT_GAP says
COMMIT_IDLE = 0.01
#: raw bytes appended beyond the last commit after which the stream starts one of its
#: own at once, whatever COMMIT_GAP says: under large writes (1 MiB) a gap of 100 ms
#: let ~70 MiB pile up, shipped in one burst after each fdatasync, with the target idle
#: in between (issue #20: 1 MiB apply 0.52 of ingest); every byte must be synced before
#: it ships anyway, so a sync per this many bytes adds no writeback, only calls (one
#: per ~23 ms at 700 MB/s). At 4 KiB writes (16 MiB: 4,096 writes, ~150-200 ms at
#: 20-28k IOPS) COMMIT_GAP comes first, as before.
COMMIT_BYTES = 16 << 20
#: raw bytes of one synthetic WRITE record of a fallback
FALLBACK_PIECE = 1 << 20
#: a fallback needs this many seqs besides its pieces: stub, REWIND, record Q
_FALLBACK_FIXED = 3


class _Stop(Exception):
    pass


def status_row(vol: Volume, target: str, as_name: str, state: str, acked_seq: int,
               sent_bytes: int, refused: str | None, reason: str | None = None
               ) -> dict[str, Any]:
    """One ``replicate status`` row: ``lag_seconds`` is the age of the oldest record
    the target has not acknowledged as durable (0 when caught up), ``lag_records``
    how many; ``reason`` why the state is what it is (a fallback), else None.
    Cost: O(1) (one seq-to-time lookup)."""
    j = vol.journal
    last = j.last_seq
    acked = min(acked_seq, last)
    lag = 0.0
    if acked < last:
        lag = max(0.0, (time.time_ns() - j.time_of_seq(acked + 1)) / 1e9)
    return {"volume": vol.name, "target": target, "as": as_name, "state": state,
            "lag_seconds": round(lag, 3), "lag_records": last - acked,
            "acked_seq": acked_seq, "sent_bytes": sent_bytes, "refused": refused,
            "reason": reason}


class RecordReader:
    """Reads the stored records a stream ships, in seq order: the one place catch-up
    and the live stream read the journal.

    Design notes: one :meth:`Journal.read_stored` per record, not ``scan_stored``.
    ``read_stored`` preads the record's own bytes through the journal's cached read fds;
    ``scan_stored`` opens the segment at every call, preads 4 MiB windows from the first
    record on (again from a record the window ends inside) and copies each record once
    more out of the window. CPU per record, in one process: from a backlog 0.64 ms per
    MiB of 1 MiB records against 1.47, 14.7 µs per 4 KiB record against 17.6; right
    after their commit (a stream that keeps up) 1.03 ms against 1.22 and 18.9 µs against
    19.4. The record read past a frame's budget (one must be read to know it does not
    fit) is kept for the next frame, so each record is read and checked once. A kept
    record is as stored when read; a compaction meanwhile could only have elided its
    payload, and the whole record is as valid to ship.

    Before the journal it asks ``window`` (:class:`~cdp.replication.window.RecordWindow`,
    the records as the journal stored them, kept as it appended them, until every reader
    is past them: each :meth:`read` says how far this one is): those are not read back
    (no pread, no CRC check; the target checks every record as it appends it).
    ``window_hits`` / ``journal_reads`` count the records each way; :meth:`close` when
    the session ends."""

    def __init__(self, journal: Journal, window: RecordWindow | None = None) -> None:
        self.journal = journal
        self.window = window
        self._ahead: tuple[int, bytes] | None = None
        self.window_hits = 0
        self.journal_reads = 0

    def read(self, first: int, budget: int, last: int) -> list[bytes]:
        """The stored records ``first ..`` (at most ``last``, every one durable) for one
        RECORDS frame: at least one, then as many as fit in ``budget`` bytes; NotLocal
        (tiered history the caller fetches) if the first is not here. Cost: for the
        records the window lacks, one pread per run of them in one segment
        (``read_stored_run``, up to the budget or the window's first record) and the
        record CRC of each (the next one's when it did not fit, kept for the next call);
        nothing for the records the window holds. The CRCs of a chunked record's chunks
        and granules are left to the target, which checks every byte as it appends
        (``chunks=False``: half the cost at 1 MiB)."""
        j = self.journal
        last = min(last, j.durable_seq)
        ahead, self._ahead = self._ahead, None
        get = self.window.get if self.window is not None else None
        batch: list[bytes] = []
        n = 0
        seq = first
        hits = 0
        run: list[tuple[int, bytes]] = []  # read from the journal, not yet taken
        while seq <= last:
            if ahead is not None and ahead[0] == seq:
                raw = ahead[1]
            elif get is not None and (kept := get(seq)) is not None:
                raw = kept
                hits += 1
            else:
                if run and run[0][0] == seq:
                    raw = run.pop(0)[1]
                else:
                    # the records up to the window's (or ``last``) in one pread
                    upto = last
                    if self.window is not None and len(self.window) and \
                            self.window.first > seq:
                        upto = min(upto, self.window.first - 1)
                    try:  # no CRC check here: the target checks every byte
                        got = j.read_stored_run(seq, upto, budget - n, check=False)
                    except NotLocal:  # the caller fetches it, unless some came first
                        if not batch:
                            raise
                        break
                    run = list(enumerate(got, seq))
                    raw = run.pop(0)[1]
                self.journal_reads += 1
            if batch and n + len(raw) > budget:
                self._ahead = (seq, raw)
                break
            batch.append(raw)
            n += len(raw)
            seq += 1
        self.window_hits += hits
        if self.window is not None:  # what we hold or shipped may go from memory
            self.window.passed(self, seq + (self._ahead is not None))
        return batch

    def close(self) -> None:
        """This reader reads no more (its session ended): the window keeps nothing for it."""
        if self.window is not None:
            self.window.forget(self)


def verbatim_end(vol: Volume, seq: int) -> int:
    """The last seq of the unbroken run of points from ``seq`` (itself resolvable) that
    the source can still resolve: records up to it ship as stored. O(log retained)."""
    maps = vol.maps
    if seq >= maps.keep_after:
        return vol.journal.last_seq
    ret = maps.retained
    i = bisect_left(ret, seq)
    end = seq - 1
    while i < len(ret) and ret[i] == end + 1:
        end += 1
        i += 1
    return max(end, seq)


@dataclass
class Fallback:
    """Synthetic records standing for the source's records ``after+1 .. point`` whose
    points retention expired (docs/REPLICATION.md "Fallback"), same seqs and times:

    - ``after+1``: an elided WRITE stub over the whole volume (every point of the gap
      reads as expired on the target);
    - up to ``first_piece - 2``: zero-length ZERO records (no change);
    - ``first_piece - 1``: REWIND to ``rewind_to`` (the target's last seq, or 0 when a
      rewind in the span makes that state unusable as a base);
    - ``first_piece .. point-1``: the blocks that may differ between ``base`` and
      ``point`` (``Volume.changed``), read from the volume at ``point`` in pieces of
      :data:`FALLBACK_PIECE` (a ZERO record for an all-zero piece);
    - ``point``: the source's own record, as stored (so the tips compare at reconnect).
    """

    after: int
    point: int
    base: int
    rewind_to: int
    pieces: list[tuple[int, int]]
    #: planned because the target stopped inside an earlier fallback (not for expiry)
    reset: bool = False

    @property
    def first_piece(self) -> int:
        return self.point - len(self.pieces)

    @property
    def changed_bytes(self) -> int:
        return sum(n for _o, n in self.pieces)

    def stamp(self, vol: Volume, seq: int) -> int:
        """The timestamp of synthetic record ``seq``: the source's minus 1 ns (never
        before the target's last), so that a target stopped inside a fallback is told
        from one whose record was compacted here since (same time, other CRC). O(log n)."""
        j = vol.journal
        return max(j.time_of_seq(seq) - 1, j.time_of_seq(self.after) if self.after else 0)

    def record(self, vol: Volume, seq: int) -> bytes:
        """The stored record this fallback sends as ``seq``. Cost: O(1), or a read of
        one piece at ``point``."""
        j = vol.journal
        if seq == self.point:
            return j.read_stored(seq)
        ts = self.stamp(vol, seq)
        fp = self.first_piece
        if seq >= fp:
            off, n = self.pieces[seq - fp]
            data = vol.read(off, n, self.point)
            if data.count(0) == n:
                return encode_record(RecordKind.ZERO, seq, ts, off, n, b"")
            return encode_data_record(RecordKind.WRITE, seq, ts, off, data)
        if seq == fp - 1:
            return encode_record(RecordKind.REWIND, seq, ts, 0, 0,
                                 REWIND_PAYLOAD.pack(self.rewind_to))
        if seq == self.after + 1:
            return encode_record(RecordKind.WRITE, seq, ts, 0, vol.size, b"",
                                 Compression.ELIDED)
        return encode_record(RecordKind.ZERO, seq, ts, 0, 0, b"")

    def records(self, vol: Volume, first: int, budget: int) -> list[bytes]:
        """Records ``first ..`` (at most ``point``) for one RECORDS frame: at least one,
        then as many as fit in ``budget`` bytes."""
        out: list[bytes] = []
        n = 0
        for seq in range(first, self.point + 1):
            raw = self.record(vol, seq)
            if out and n + len(raw) > budget:
                break
            out.append(raw)
            n += len(raw)
        return out

    def describe(self) -> str:
        if self.reset:
            return (f"fallback: the target stopped inside an earlier fallback at "
                    f"@{self.after}; sending the whole state as of @{self.point} "
                    f"({len(self.pieces)} pieces, {self.changed_bytes} bytes)")
        return (f"fallback: points @{self.after + 1}..@{self.point - 1} were expired by "
                f"retention here; sending what changed since @{self.base} as of "
                f"@{self.point} ({len(self.pieces)} pieces, {self.changed_bytes} bytes)")


def plan_fallback(vol: Volume, after: int, *, reset: bool = False) -> Fallback | None:
    """The :class:`Fallback` for a target whose last seq is ``after`` (the point after
    it expired here), ending at the oldest point the source still resolves that leaves
    room for its records (a retained point before ``keep_after``, else ``keep_after`` or
    later); None if no durable point leaves room (the caller then ships the records as
    stored: correct at the head, their expired payloads elided). ``reset``: the target's
    state at ``after`` is not the source's (an interrupted fallback), so REWIND to 0
    and send everything the point holds. Cost: one ``changed()`` per point tried."""
    maps = vol.maps
    ka = maps.keep_after
    ret = maps.retained
    durable = vol.journal.durable_seq
    i = bisect_right(ret, after)
    newest = ret[i - 1] if i else 0  # the newest point at or before ``after`` kept here
    points = [p for p in ret[i:] if p < ka]
    points.append(max(ka, after + _FALLBACK_FIXED))
    grown = 0
    while points:
        q = points.pop(0)
        if q > durable:
            return None
        if vol.journal.read_stored(q)[9] == RecordKind.REWIND:
            if not points:
                points.append(q + 1)
            continue
        if reset or any(after < r <= q for r, _t in maps.rewinds):
            base, rewind_to = 0, 0
        else:
            base, rewind_to = newest, after
        pieces = [(o, min(FALLBACK_PIECE, b - o))
                  for a, b in vol.changed(base, q) for o in range(a, b, FALLBACK_PIECE)]
        if q - after >= len(pieces) + _FALLBACK_FIXED:
            return Fallback(after, q, base, rewind_to, pieces, reset)
        if not points and grown < 3:
            grown += 1
            points.append(after + len(pieces) + _FALLBACK_FIXED)
    return None


def sources_of(vol: Volume) -> list[ReplicationSource]:
    """The replication streams attached to ``vol`` (one per target)."""
    return [s for s in vol.services if isinstance(s, ReplicationSource)]


class ReplicationSource(VolumeService):
    """Streams ``vol``'s journal to ``host:port`` into the replica named ``as_name``."""

    def __init__(self, vol: Volume, host: str, port: int, secret: bytes, *,
                 as_name: str | None = None, name: str = "cdp", lineage: str | None = None,
                 epoch: int = 1, window: int = 64 << 20, batch: int = 4 << 20,
                 rate: int = 0, tls: ssl.SSLContext | None = None, fork_seq: int = 0,
                 epochs: list[list[int]] | None = None, ship_window: int = 64 << 20) -> None:
        self.vol = vol
        self.host, self.port = host, port
        self._secret = secret
        self.as_name = as_name or vol.name
        self.name = name
        self.lineage = lineage or vol.uuid
        self.epoch = epoch
        self.window, self.batch = window, batch
        #: bytes of records not shipped yet kept in memory (the volume's
        #: :class:`RecordWindow`, shared by its streams while one runs; 0: none)
        self.ship_window = ship_window
        #: bytes/s of stored records sent (0: unlimited)
        self.rate = rate
        self._due = 0.0  # monotonic time the next frame may go (with rate)
        #: our failover point (the last seq of the previous epoch; 0: never failed over)
        self.fork_seq = fork_seq
        #: our epoch table (``replica.json``), sent in OPEN (protocol 3): chained failback
        self.epochs = epochs or [[epoch, 1, 0]]
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
        self._persisting = False  # a save runs in a worker thread (see _save)
        #: the fallback being sent (kept across reconnects: the target may stop inside it)
        self._fallback: Fallback | None = None
        #: the target stopped inside a fallback this process no longer knows: the next
        #: one rewinds it to 0 (its state there is not a state of ours)
        self._reset = False
        #: no fallback had room after the target's seq: records as stored up to this seq
        self._no_room = 0
        #: why the state is what it is (a fallback), for status
        self.reason: str | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        #: the stream's reader of the journal (a new one per session)
        self._reader = RecordReader(vol.journal)
        #: the group commit the stream started and has not yet seen end (:meth:`_commit`)
        self._sync: asyncio.Task[None] | None = None
        #: monotonic time from which the stream may start its next commit
        self._sync_due = 0.0
        #: the journal's durable_seq when the stream last looked (see _commit)
        self._durable_seen = -1
        #: the journal's last_seq when the stream last looked, and when it last moved
        self._last_seen = -1
        self._last_moved = 0.0
        #: the journal's appended_bytes when a commit of ours last started, or when every
        #: record was seen durable (COMMIT_BYTES counts from here)
        self._bytes_mark = 0
        #: a session streams (``on_record`` may start commits for it)
        self._live = False
        #: set when ``on_record`` started a commit (the stream may be waiting for one)
        self._kick = asyncio.Event()

    @property
    def target(self) -> str:
        return f"{self.host}:{self.port}"

    # ------------------------------------------------------------------ service callbacks

    def on_record(self, vol: Volume, kind: RecordKind, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview | None) -> None:
        self._wake.set()
        # a commit per COMMIT_BYTES appended, started here too: the stream checks only
        # between frames, and may wait in drain() (the target reading) for long; the
        # fdatasync then runs meanwhile. O(1): two ints compared.
        if self._live and self._sync is None and \
                vol.journal.appended_bytes - self._bytes_mark >= COMMIT_BYTES:
            self._start_commit(time.monotonic(), vol.journal.appended_bytes)
            self._kick.set()

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
                          None if self.refused is None else ": ".join(self.refused),
                          self.reason if self._in_fallback or self._reset else None)

    @property
    def _budget(self) -> int:
        """Bytes of the next frame at most: ``batch``, or 1/8 s of the rate."""
        return min(self.batch, max(64 << 10, self.rate >> 3)) if self.rate else self.batch

    @property
    def _in_fallback(self) -> bool:
        """A fallback was (being) sent that the target has not acknowledged whole."""
        fb = self._fallback
        return fb is not None and self.acked_seq < fb.point

    def _save(self, force: bool = False) -> None:
        """Have ``persist`` save the acknowledged seq (and refusal): at most every
        :data:`PERSIST_EVERY` s while ACKs arrive, in a worker thread (its read, write and
        fsyncs off the loop; one at a time: a save due while one runs is skipped, the
        next ACK brings it), or now on this thread with ``force`` (a refusal). What a
        crash costs: status shows the acked seq of up to ~2 s before until the stream
        reconnects; the stream itself resumes from what the target reports (OPENED), so
        no record is resent or lost for it."""
        now = time.monotonic()
        if self.persist is None:
            return
        if force:
            self._persisted_at = now
            self._persist_now()
        elif now - self._persisted_at >= PERSIST_EVERY and not self._persisting:
            self._persisted_at = now
            self._persisting = True
            fut = asyncio.get_running_loop().run_in_executor(None, self._persist_now)
            fut.add_done_callback(self._persisted)

    def _persisted(self, fut: asyncio.Future[None]) -> None:
        self._persisting = False
        if not fut.cancelled():
            fut.exception()  # _persist_now logs its errors; nothing else is expected

    def _persist_now(self) -> None:
        """One ``persist`` call, its errors logged (any thread)."""
        if self.persist is None:
            return
        try:
            self.persist(self)
        except (OSError, CdpError) as e:
            log.warning("replication %s -> %s: cannot save state: %s", self.vol.name,
                        self.target, e)

    # ------------------------------------------------------------------ the task

    async def _run(self) -> None:
        j = self.vol.journal
        token = object()  # this run's hold on the window (a restart overlaps its end)
        win = RecordWindow.attach(j, self.ship_window, token)
        try:
            await self._retry(win)
        finally:
            RecordWindow.detach(j, token)

    async def _retry(self, win: RecordWindow | None) -> None:
        delay = 1.0
        while True:
            try:
                await self._session(win)
                delay = 1.0
            except _Stop:
                return
            except (OSError, ProtocolError, CdpError, asyncio.IncompleteReadError) as e:
                if self.refused is not None:
                    return
                log.warning("replication %s -> %s: %s", self.vol.name, self.target, e)
            except Exception:  # a bug: say so, and go on trying (never a silent stop)
                log.exception("replication %s -> %s: unexpected error; reconnecting",
                              self.vol.name, self.target)
            self.state = "disconnected"
            await asyncio.sleep(delay)
            delay = min(30.0, delay * 2)

    async def _session(self, win: RecordWindow | None) -> None:
        reader, writer = await asyncio.open_connection(
            self.host, self.port, ssl=self.tls, server_hostname=self.host if self.tls else None)
        widen(writer, socket.SO_SNDBUF)
        conn = SourceConnection(self._secret, peer=self.target)
        acks: asyncio.Task[None] | None = None
        try:
            conn.start(self.name)
            send(writer, conn.data_to_send())
            await self._until(conn, reader, writer, Authenticated)
            j = self.vol.journal
            conn.open(self.as_name, self.lineage, self.vol.size, self.epoch, j.last_seq,
                      self.fork_seq, self.epochs)
            send(writer, conn.data_to_send())
            ev = await self._until(conn, reader, writer, Opened)
            assert isinstance(ev, Opened)
            self._check_tip(ev)
            self.acked_seq = ev.applied_seq
            self._reader = RecordReader(j, win)
            acks = asyncio.get_running_loop().create_task(self._read_acks(conn, reader))
            self._live = True
            await self._stream(conn, writer, acks)
        finally:
            self._live = False
            self._reader.close()
            sync, self._sync = self._sync, None
            if sync is not None:  # the commit goes on (shared, shielded); its result is ours
                sync.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await sync
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
                send(writer, conn.data_to_send())
                with contextlib.suppress(OSError):
                    await writer.drain()
                self._refused(e.code, str(e))
            send(writer, conn.data_to_send())
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
        if code == "busy":  # transient: e.g. the target has not yet seen our last
            # connection end (a cut link, a kill -9): retried like a lost connection
            raise ConnectionRefusedError(f"the target is busy: {message}")
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
        seq = ev.applied_seq
        raw = j.read_stored(seq)
        if (j.time_of_seq(seq), _CRC.unpack_from(raw, 4)[0]) == (ev.tip_ts, ev.tip_crc):
            return
        expired = not self.vol.maps.resolvable(seq)
        if ev.tip_ts == j.time_of_seq(seq) and expired:
            return  # our record was compacted since the target got it (same time, new CRC)
        fb = self._fallback
        if fb is not None and fb.after < seq < fb.point and self.vol.maps.resolvable(fb.point):
            raw = fb.record(self.vol, seq)
            if (fb.stamp(self.vol, seq), _CRC.unpack_from(raw, 4)[0]) == (ev.tip_ts, ev.tip_crc):
                return  # it stopped inside the fallback we are sending: go on with it
        if expired:  # inside a fallback this process no longer has (see Fallback.stamp)
            log.warning("replication %s -> %s: the target stopped inside an earlier "
                        "fallback at @%d; the next one starts from an empty volume",
                        self.vol.name, self.target, seq)
            self._fallback, self._reset = None, True
            return
        self._refused("diverged", f"the target's record {seq} differs from ours")

    async def _read_acks(self, conn: SourceConnection, reader: asyncio.StreamReader) -> None:
        while True:
            data = await reader.read(1 << 16)
            conn.receive_data(data)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(ev, Ack):
                    fb = self._fallback
                    if fb is not None and self.acked_seq < fb.point <= ev.durable_seq:
                        log.info("replication %s -> %s: fallback done at @%d", self.vol.name,
                                 self.target, ev.durable_seq)
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
            self.state = ("streaming" if j.last_seq - nxt < 1024 and not self._in_fallback
                          and not self._reset else "catching-up")
            if nxt <= j.last_seq and inflight < self.window:
                if not self._commit(nxt):
                    if self._sync is not None:
                        await asyncio.wait((self._sync,))
                    else:  # the next commit of ours is not due yet (or the writes pause),
                        # unless on_record starts one (COMMIT_BYTES appended): it kicks us
                        self._kick.clear()
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(self._kick.wait(), max(0.0, min(
                                self._sync_due - time.monotonic(), COMMIT_IDLE)))
                    continue  # durable_seq moved (or the commit failed: _commit raises)
                if self.rate and (wait := self._due - time.monotonic()) > 0:
                    await asyncio.sleep(wait)
                    continue  # things may have moved meanwhile (acks, the window)
                try:
                    batch = self._next_batch(nxt)
                except NotLocal as exc:  # tiered history: fetch what catch-up reads next
                    missed = await fetch_missed(
                        j, exc, missed, lambda r: readahead(j, r, prefetch_limit(j)))
                    continue
                missed = None
                if self._in_fallback or self._reset:
                    self.state = "catching-up"  # until the target acknowledged it
                if not batch:  # a fallback waits for room (more records here)
                    self._wake.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), 1.0)
                    continue
                n = sum(len(r) for r in batch)
                conn.send_records(nxt, batch)
                send(writer, conn.buffers_to_send())
                await writer.drain()
                sizes[nxt + len(batch) - 1] = n
                inflight += n
                self.sent_bytes += n
                if self.rate:
                    self._due = max(self._due, time.monotonic() - RATE_BURST) + n / self.rate
                elif self._fallback is not None:
                    await asyncio.sleep(0)  # its reads run on the loop: let others in
                continue
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except TimeoutError:
                conn.heartbeat(j.last_seq, time.time_ns())
                send(writer, conn.data_to_send())
                await writer.drain()

    def _commit(self, nxt: int) -> bool:
        """Whether record ``nxt`` is durable (so it may ship); a group commit of what the
        journal holds beyond ``durable_seq`` started if none of ours runs and no commit
        made records durable for :data:`COMMIT_GAP` (``_sync_due``: moved on each time
        ``durable_seq`` is seen to move, whoever's commit moved it), or no record was
        appended for :data:`COMMIT_IDLE` (the writes paused); what one of ours
        that ended raised, raised. The stream does not wait for that commit while it
        has durable records to send: the ``fdatasync`` runs while the frames of the
        records the previous one made durable go out. Cost: O(1)."""
        j = self.vol.journal
        sync = self._sync
        if sync is not None and sync.done():
            self._sync = None
            sync.result()
        durable, last, appended = j.durable_seq, j.last_seq, j.appended_bytes
        now = time.monotonic()
        if durable != self._durable_seen:  # a commit (any) made records durable
            self._durable_seen = durable
            self._sync_due = now + COMMIT_GAP
            if durable == last:  # all of it (else: ours marked what they cover)
                self._bytes_mark = appended
        if last != self._last_seen:  # records were appended since the last look
            self._last_seen, self._last_moved = last, now
        if self._sync is None and durable < last and (
                now >= self._sync_due or now - self._last_moved >= COMMIT_IDLE
                or appended - self._bytes_mark >= COMMIT_BYTES):
            self._start_commit(now, appended)
        return durable >= nxt

    def _start_commit(self, now: float, appended: int) -> None:
        """Start a group commit of ours (none of ours runs): ``_commit`` takes its end."""
        self._sync_due = now + COMMIT_GAP
        self._bytes_mark = appended
        self._sync = asyncio.get_running_loop().create_task(self.vol.journal.commit())

    def _next_batch(self, nxt: int) -> list[bytes]:
        """The records of the next RECORDS frame, from ``nxt`` (durable): as stored,
        or a :class:`Fallback`'s where the points after the target's were expired here."""
        vol = self.vol
        fb = self._fallback
        if fb is not None and self.acked_seq >= fb.point:
            fb = self._fallback = None
        if fb is not None and fb.after < nxt <= fb.point:
            return fb.records(vol, nxt, self._budget)
        if self._reset or (nxt > self._no_room and not vol.maps.resolvable(nxt)):
            fb = plan_fallback(vol, nxt - 1, reset=self._reset)
            if fb is None and self._reset:  # records as stored would not be right there
                self.reason = (f"fallback: the target stopped inside an earlier fallback at "
                               f"@{nxt - 1}; waiting for more records here to send the "
                               f"whole state after them")
                return []
            self._reset = False
            if fb is not None:
                self._fallback, self.reason = fb, fb.describe()
                log.warning("replication %s -> %s: %s", vol.name, self.target, self.reason)
                return fb.records(vol, nxt, self._budget)
            # no room: as stored up to keep_after (right at the head; the expired
            # payloads arrive elided, so the target's points there read as expired)
            self._no_room = vol.maps.keep_after
            log.info("replication %s -> %s: no room for a fallback after @%d; shipping "
                     "records as stored up to @%d", vol.name, self.target, nxt - 1,
                     self._no_room)
        if nxt <= self._no_room:
            return self._reader.read(nxt, self._budget, self._no_room)
        return self._reader.read(nxt, self._budget, verbatim_end(vol, nxt))
