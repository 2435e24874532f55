"""The window of recent records: stored records of a replicated volume that its streams
have yet to ship, kept in memory so they ship without reading the journal back.

Design notes
------------
- **Why.** A stream ships each record once. Read back from the journal, that costs a
  ``read_stored`` per record (a pread and the check of every CRC: 15-20 µs per 4 KiB
  record, 1.3-1.5 ms per 1 MiB one in one process, ~30 % of the source's CPU under 1 MiB
  writes), and the target checks every CRC again when it appends. The writer had those
  very bytes in its hands a moment before. (Since ``read_stored(chunks=False)``, which
  leaves a chunked record's chunk and granule CRCs to the target and reads it in one
  pread, a 1 MiB read-back costs ~0.25-0.35 ms; 4 KiB records are unchanged.)
- **How it is filled.** :class:`RecordWindow` is the journal's ``on_stored`` hook: the
  journal hands over each record's bytes exactly as it stored them (header, payload as
  compressed or chunked; as the pieces it wrote, views of its buffer or of the caller's,
  valid during the call), with its seq, after the append succeeded; the window copies
  them into one ``bytes`` (a record that arrives whole as ``bytes``, from
  ``append_stored``, is kept as it is). Only the journal package touches segment files;
  the window sees bytes, never files. The bytes are appended, not yet durable: readers
  still stop at ``durable_seq`` (:class:`~cdp.replication.source.RecordReader`), so only
  durable records ship.
- **What it holds: what is still to be read.** An unbroken run of seqs ``first ..
  last``, at most ``cap`` bytes (``[replication] ship_window``, 64 MiB by default).
  Each reader (a stream's session) tells the window the next seq it needs
  (:meth:`passed`); when a record does not fit, the records below every reader's are
  dropped to make room (not sooner: memory that stays in use is reused by the next
  copies, while memory given back costs a page fault per 4 KiB on the next ones, ~1 ms
  per MiB on this VM; and a stream that reconnects a few records back still finds
  them). If it still does not fit, the run is *closed*: nothing more is kept (not even
  copied) until the readers have read the whole run, then a new one starts at the next
  record appended. So a target slower than the writes (the records pile up faster than
  they ship) still gets ``cap`` bytes at a time from memory, and every record kept is
  read from memory once: dropping the oldest instead would, under such a backlog, evict
  each record just before the stream reaches it (copied, never served). Records not
  kept (the gaps between runs, a catch-up, the first ones after a restart, a stream
  reconnected from an older seq) are read from the journal. :meth:`get` answers
  exactly the bytes the journal would, or None.
- **When it exists.** Installed on the volume's journal by the first running stream
  (:meth:`attach`) and removed when the last one ends (:meth:`detach`): with no
  replication running, the journal keeps nothing and pays one test per append.
  Several targets share it; the slowest holds its front (a faster one then reads the
  journal past a closed run), which is always correct and only costs reads.
- **Retention.** A record compacted after it was kept is served as it was appended:
  compaction only elides payloads, and the record as appended is as valid to ship (the
  target's own retention applies); ``RecordReader`` did the same for its read-ahead.
- Cost: :meth:`add` O(1) amortised plus the copy of the record into one ``bytes``
  (measured in one process: ~4 µs per 4 KiB record, ~0.3-0.45 ms per 1 MiB one, most of
  it the fresh memory each copy lands in, against 15-20 µs and 1.3-1.5 ms for reading it
  back); nothing while the run is closed; :meth:`get` O(1) near either end (a deque),
  O(n/64) in the middle; :meth:`passed` O(readers), O(records) when it empties a
  closed run.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from cdp.journal import Journal
from cdp.journal.fs import Buffer


class RecordWindow:
    """Stored records of one journal its readers have yet to read, at most ``cap`` bytes
    of them, by seq (design notes above).

    Not thread-safe: the journal calls it on the event loop, in seq order.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._recs: deque[bytes] = deque()
        #: the seq of the oldest record kept (``last + 1`` when empty)
        self.first = 1
        #: bytes of the records kept
        self.nbytes = 0
        #: the run takes more records (False: closed until the readers emptied it)
        self.open = True
        #: each reader's next seq (records below all of them are dropped)
        self._readers: dict[object, int] = {}
        self._owners: set[object] = set()

    @property
    def last(self) -> int:
        """The seq of the newest record kept (``first - 1`` when empty)."""
        return self.first + len(self._recs) - 1

    def __len__(self) -> int:
        return len(self._recs)

    def __call__(self, seq: int, parts: Sequence[Buffer]) -> None:
        """The journal's ``on_stored`` hook: :meth:`add` the record ``parts`` join (copied:
        they are views valid only during the call; one ``bytes`` is kept as it is), unless
        the run is closed or it does not fit (then nothing is copied)."""
        if not self._takes(seq, sum(map(len, parts))):
            return
        if len(parts) == 1 and type(parts[0]) is bytes:
            self._keep(parts[0])
        else:
            self._keep(b"".join(parts))

    def add(self, seq: int, raw: bytes) -> bool:
        """Keep record ``seq`` (its bytes as stored) if the run takes it; whether it did.
        Runtime: O(1) amortised."""
        if not self._takes(seq, len(raw)):
            return False
        self._keep(raw)
        return True

    def _takes(self, seq: int, n: int) -> bool:
        """Whether record ``seq`` of ``n`` bytes extends the run; a new run starts at
        ``seq`` when the last one is empty (or, never from one journal, when ``seq`` does
        not follow it); a record that does not fit closes the run."""
        recs = self._recs
        if not recs:
            self.first, self.nbytes, self.open = seq, 0, True
        elif not self.open:
            return False
        elif seq != self.first + len(recs):
            recs.clear()
            self.first, self.nbytes = seq, 0
        if self.nbytes + n > self.cap and self._readers:
            self._drop(n)  # make room: the oldest every reader is past
        if self.nbytes + n > self.cap:
            if recs:
                self.open = False
            else:  # larger than the whole window: not kept, the run starts after it
                self.first = seq + 1
            return False
        return True

    def _keep(self, raw: bytes) -> None:
        self._recs.append(raw)
        self.nbytes += len(raw)

    def get(self, seq: int) -> bytes | None:
        """Record ``seq`` exactly as the journal stored it, or None when it is not kept.
        Runtime: O(1) near the newest and the oldest record."""
        i = seq - self.first
        if 0 <= i < len(self._recs):
            return self._recs[i]
        return None

    def passed(self, reader: object, seq: int) -> None:
        """``reader`` needs no record below ``seq`` any more (its next one is ``seq``):
        what every reader is past goes when room is needed. Runtime: O(1)."""
        self._readers[reader] = seq
        if not self.open and self.first + len(self._recs) <= min(self._readers.values()):
            self._drop()  # a closed run read whole: empty, the next record starts one
            self.open = True

    def forget(self, reader: object) -> None:
        """``reader`` reads no more (its session ended): it holds nothing back."""
        self._readers.pop(reader, None)

    def _drop(self, room: int = 0) -> None:
        """Drop the oldest records every reader is past, until ``room`` more bytes fit
        (0: all of them). Runtime: O(readers + records dropped)."""
        upto = min(self._readers.values())
        recs = self._recs
        limit = self.cap - room if room else -1
        while recs and self.first < upto and self.nbytes > limit:
            self.nbytes -= len(recs.popleft())
            self.first += 1

    def _check(self) -> None:
        """Assert the invariants (tests)."""
        assert self.nbytes == sum(map(len, self._recs)) <= self.cap
        assert self.first >= 1
        assert self.open or self._recs

    # ------------------------------------------------------------------ the journal's hook

    @classmethod
    def attach(cls, journal: Journal, cap: int, owner: object) -> RecordWindow | None:
        """The window of ``journal`` (installed as its ``on_stored`` hook if it has none)
        for ``owner`` (a stream); None when ``cap`` is 0 (no window: every record is
        read from the journal)."""
        if cap <= 0:
            return None
        win = journal.on_stored
        if not isinstance(win, RecordWindow):
            win = cls(cap)
            win.first = journal.last_seq + 1
            journal.on_stored = win
        win.cap = max(win.cap, cap)
        win._owners.add(owner)
        return win

    @staticmethod
    def detach(journal: Journal, owner: object) -> None:
        """``owner`` no longer reads ``journal``'s window; the last one removes it (the
        journal then keeps nothing)."""
        win = journal.on_stored
        if isinstance(win, RecordWindow):
            win._owners.discard(owner)
            if not win._owners:
                journal.on_stored = None
                win._recs.clear()
                win.nbytes = 0
