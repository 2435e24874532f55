"""The window of recent records: the newest stored records of a replicated volume,
kept in memory so its streams ship them without reading the journal back.

Design notes
------------
- **Why.** A stream that keeps up ships each record right after its commit. Read
  back from the journal, that costs a ``read_stored`` per record (a pread and the
  check of every CRC: 15-19 µs per 4 KiB record, ~1 ms per 1 MiB one, ~30 % of the
  source's CPU at 1 MiB), and the target checks every CRC again when it appends. The
  writer had those very bytes in its hands a moment before.
- **How it is filled.** :class:`RecordWindow` is the journal's ``on_stored`` hook: the
  journal hands over each record's bytes exactly as it stored them (header, payload as
  compressed or chunked; as the pieces it wrote, views of its buffer or of the caller's,
  valid during the call), with its seq, after the append succeeded; the window copies
  them into one ``bytes`` (a record that arrives whole as ``bytes``, from
  ``append_stored``, is kept as it is). Only the journal package touches segment
  files; the window sees bytes, never files. The bytes are
  appended, not yet durable: readers still stop at ``durable_seq``
  (:class:`~cdp.replication.source.RecordReader`), so only durable records ship.
- **What it holds.** An unbroken run of seqs ``first .. last`` ending at the journal's
  newest record, at most ``cap`` bytes of records (``[replication] ship_window``, 64 MiB
  by default); the oldest go first. A record larger than ``cap`` empties it (the run
  starts again after it). A seq other than ``last + 1`` (never, from one journal)
  starts the run again at that seq. So :meth:`get` answers exactly the records the
  journal would, or None: a stream falls back to the journal for those (catch-up, a
  target further behind than ``cap``, after a restart).
- **When it exists.** Installed on the volume's journal by the first running stream
  (:meth:`attach`) and removed when the last one ends (:meth:`detach`): with no
  replication running, the journal keeps nothing and pays one test per append.
- **Retention.** A record compacted after it was kept is served as it was appended:
  compaction only elides payloads, and the record as appended is as valid to ship (the
  target's own retention applies); ``RecordReader`` did the same for its read-ahead.
- Cost: :meth:`add` O(1) amortised plus the copy of the record into one ``bytes``
  (measured in one process: ~4 µs per 4 KiB record, ~0.3-0.45 ms per 1 MiB one, most of
  it the fresh memory each copy lands in, against 15-20 µs and 1.3-1.5 ms for reading it
  back); :meth:`get` O(1) near either end (a deque), O(n/64) in the middle.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

from cdp.journal import Journal
from cdp.journal.fs import Buffer


class RecordWindow:
    """The newest stored records of one journal, at most ``cap`` bytes of them, by seq.

    Not thread-safe: the journal calls it on the event loop, in seq order.
    """

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._recs: deque[bytes] = deque()
        #: the seq of the oldest record kept (``last + 1`` when empty)
        self.first = 1
        #: bytes of the records kept
        self.nbytes = 0
        self._owners: set[object] = set()

    @property
    def last(self) -> int:
        """The seq of the newest record kept (``first - 1`` when empty)."""
        return self.first + len(self._recs) - 1

    def __len__(self) -> int:
        return len(self._recs)

    def __call__(self, seq: int, parts: Sequence[Buffer]) -> None:
        """The journal's ``on_stored`` hook: :meth:`add` the record ``parts`` join (copied:
        they are views valid only during the call; one ``bytes`` is kept as it is)."""
        if len(parts) == 1 and type(parts[0]) is bytes:
            self.add(seq, parts[0])
        else:
            self.add(seq, b"".join(parts))

    def add(self, seq: int, raw: bytes) -> None:
        """Keep record ``seq`` (its bytes as stored), dropping the oldest ones past
        ``cap``. Runtime: O(1) amortised."""
        recs = self._recs
        if seq != self.first + len(recs):  # not the next seq: the run starts again here
            recs.clear()
            self.first, self.nbytes = seq, 0
        n = len(raw)
        if n > self.cap:  # never fits: the run starts again after it
            recs.clear()
            self.first, self.nbytes = seq + 1, 0
            return
        self.nbytes += n
        recs.append(raw)
        while self.nbytes > self.cap:
            self.nbytes -= len(recs.popleft())
            self.first += 1

    def get(self, seq: int) -> bytes | None:
        """Record ``seq`` exactly as the journal stored it, or None when it is not kept.
        Runtime: O(1) near the newest and the oldest record."""
        i = seq - self.first
        if 0 <= i < len(self._recs):
            return self._recs[i]
        return None

    def _check(self) -> None:
        """Assert the invariants (tests)."""
        assert self.nbytes == sum(map(len, self._recs)) <= self.cap
        assert self.first >= 1

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
