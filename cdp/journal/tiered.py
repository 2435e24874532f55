"""Sealed segments whose local copy was dropped after the S3 tier uploaded them.

A dropped segment keeps everything but its bytes: its index sidecar (record offsets and
timestamps), its size, count and raw bytes. It is listed in ``journal/tiered.json``;
reads of its records come from a bounded read cache of whole stored records
(``journal/cache/``), and a miss raises :class:`NotLocal` naming exactly the records
needed, for the caller to fetch (``Journal.remote``) and put (``Journal.cache_put``).

Design notes
------------
- **A file layer, not a second reader.** :class:`TieredFS` wraps the journal's
  :class:`~cdp.journal.fs.FileLayer`: it lists a dropped segment as if its file were
  there, and its descriptors for such a segment read through the cache. The reader,
  recovery and the scans stay as they are (each record's CRC is checked on read as
  today, so a tampered object is Corruption, never data). The wrapper is installed only
  when a journal has dropped segments: a fully local journal pays nothing.
- **Whole records.** A pread of a dropped segment is served from the cached records it
  starts in and after, up to the first one missing (a short read: the reader then asks
  again from there); when the record it starts in is missing, NotLocal names that one
  record as ``(first_seq, offset, length)``. So a read fetches exactly the records it
  decodes, one round-trip per record (a point's read touches one record per extent).
- **State first, unlink after.** :meth:`TieredFS.add` rewrites ``tiered.json`` (temp
  file, fsync, rename, directory fsync) before the ``.seg`` is unlinked, so a crash in
  between leaves a listed segment whose file is still there (the file is then ignored,
  and removed at the next open). ``Journal.drop_segments`` (the tier's path) splits it:
  the segments switch to the cache in memory on the loop (:meth:`TieredFS.switch`; a
  crash now leaves them local and listed nowhere), then the state write and the unlinks
  run in a worker thread (:meth:`TieredFS.persist`: versioned, so a slower older
  listing never overwrites a newer one).
- **Cache.** One file per record, ``cache/<first_seq:020d>-<offset:020d>``; LRU by bytes
  up to ``cache_bytes`` (rebuilt from the listing at open, oldest name first). Fetched
  records are written by :func:`write_cache_files` in the fetcher's worker thread (plain
  file writes under a unique temporary name, then a rename: nothing of the journal's
  state is touched there); :meth:`TieredFS.cache_index` then lists them on the loop.
- **Open descriptors, closed where a name changes.** The descriptors of the last
  ``CACHE_FDS`` cached records read stay open (LRU; at most ``CACHE_FDS_TOTAL`` in the
  process, a quarter of the descriptor limit), so a cached read is one pread of
  the slice it needs, as a local one is (no open, no close, no join when one record
  covers it). A descriptor is closed wherever its name stops meaning that file: the
  record leaves the cache (:meth:`TieredFS._trim`), a fetch renames a new file over the
  name (:meth:`TieredFS.cache_index`: a name may be given other bytes), the journal
  closes (:meth:`TieredFS.close_cached`). A cached copy is trusted as the bytes fetched
  for it: each record's CRC is checked on every read, as from a local segment; the
  object's sha256 is checked by ``verify --tier``, not per ranged GET.
- **Fetch then retry, planned.** A caller that may meet dropped history runs its
  synchronous read through :func:`fetch_retry`: on NotLocal it fetches (``Journal.remote``)
  and tries again. A ``plan`` widens the fetch from the one record the miss names to
  every record the read will need that is not cached (:func:`missing_records`, the
  volume's extents of the read) or, for a sequential scan, the records that follow
  (:func:`readahead`), bounded by half the cache so a prefetch never evicts its own
  records: one round of coalesced GETs instead of one round-trip per record.
"""

from __future__ import annotations

import bisect
import json
import os
import resource
import threading
from array import array
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, TypeVar

from cdp.errors import CdpError, Corruption
from cdp.journal.format import SEGMENT_HEADER_SIZE, parse_segment_name, segment_name
from cdp.journal.fs import Buffer, FileLayer
from cdp.journal.segment import SegmentState, load_index_entries, read_index_header

#: the journal-owned state file listing dropped segments
TIERED_NAME = "tiered.json"
TIERED_FORMAT = 1
#: the read cache's subdirectory of the journal directory
CACHE_DIR = "cache"
#: descriptors of dropped segments are numbered from here (real ones are small)
_VFD_BASE = 1 << 40
#: dropped segments whose offsets stay in memory
_OFFS_CACHE = 16
#: descriptors of cached records kept open per journal (LRU, see TieredFS._cache_fd)
CACHE_FDS = 512


def _fd_budget() -> int:
    """Descriptors of cached records kept open by all journals of this process: a
    quarter of the soft ``RLIMIT_NOFILE`` (sockets and segments need the rest), 16 to
    4096."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 16
    return max(16, min(4096, soft // 4))


#: see :func:`_fd_budget`
CACHE_FDS_TOTAL = _fd_budget()
#: descriptors kept by every TieredFS of this process (one cell: shared, loop threads)
_KEPT = [0]

#: attempts of one :func:`fetch_retry` (one fetch each) before it gives up
FETCH_ATTEMPTS = 4096

Range = tuple[int, int, int]
_T = TypeVar("_T")


class Journal(Protocol):
    """What the fetch helpers below use of :class:`cdp.journal.Journal` (typed here so
    that this module, which the writer imports, does not import it back)."""

    @property
    def remote(self) -> Callable[[list[Range]], Awaitable[None]] | None: ...

    @property
    def _fs(self) -> FileLayer: ...

    @property
    def _dir(self) -> str: ...

    def _seg_for(self, seq: int) -> SegmentState: ...

    def _where(self, seg: SegmentState, seq: int, loc: int) -> int: ...


class NotLocal(CdpError):
    """Records of tiered history needed by a read are neither on local disk nor in the
    read cache. ``ranges``: ``[(first_seq, offset, length)]`` of the whole stored records,
    for a fetcher to GET and :meth:`cdp.journal.Journal.cache_put` (a plain message, as
    every CdpError takes, gives no ranges)."""

    def __init__(self, ranges: Sequence[Range] | str) -> None:
        if isinstance(ranges, str):
            self.ranges: list[Range] = []
            super().__init__(ranges)
            return
        self.ranges = list(ranges)
        n = sum(r[2] for r in self.ranges)
        super().__init__(
            f"tiered history not local: {len(self.ranges)} record(s), {n} bytes of "
            f"segment(s) {sorted({r[0] for r in self.ranges})} must be fetched from the "
            f"tier (see `cdpctl tier status`)")


def encode_tiered(segments: dict[int, int]) -> bytes:
    """The bytes of ``tiered.json`` for dropped segments ``{first_seq: size}``."""
    body = {"format": TIERED_FORMAT,
            "segments": [{"first_seq": f, "size": segments[f]} for f in sorted(segments)]}
    return (json.dumps(body, sort_keys=True, separators=(",", ":")) + "\n").encode()


def decode_tiered(data: bytes, where: str) -> dict[int, int]:
    """``{first_seq: size}`` from ``tiered.json`` bytes; Corruption if malformed."""
    try:
        body: Any = json.loads(data)
        if body.get("format") != TIERED_FORMAT:
            raise ValueError(f"format {body.get('format')!r}, expected {TIERED_FORMAT}")
        out = {int(e["first_seq"]): int(e["size"]) for e in body["segments"]}
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise Corruption(f"{where}: bad tiered state: {exc}") from None
    if any(f < 1 or s < SEGMENT_HEADER_SIZE for f, s in out.items()):
        raise Corruption(f"{where}: bad tiered state: bad first_seq or size")
    return out


def read_tiered(fs: FileLayer, directory: str) -> dict[int, int] | None:
    """The dropped segments listed in ``directory``'s ``tiered.json``, None if absent."""
    path = os.path.join(directory, TIERED_NAME)
    try:
        fd = fs.open_read(path)
    except FileNotFoundError:
        return None
    try:
        data = fs.pread(fd, fs.size(path), 0)
    finally:
        fs.close(fd)
    return decode_tiered(data, path)


class TieredFS(FileLayer):
    """A journal's file layer with dropped segments served from the read cache (see the
    module notes). Everything else goes to ``base``. Event-loop thread only (like the
    journal), except the plain delegations."""

    def __init__(self, base: FileLayer, directory: str, dropped: dict[int, int],
                 cache_bytes: int = 0) -> None:
        self.base = base
        self._base_pread = base.pread
        self.directory = directory
        self.dropped = dict(dropped)
        self.cache_bytes = cache_bytes
        self._names = {segment_name(f): f for f in self.dropped}
        self._vfds: dict[int, int] = {}  # descriptor -> first_seq
        self._next_vfd = _VFD_BASE
        self._offs: OrderedDict[int, array[int]] = OrderedDict()
        self._cdir = os.path.join(directory, CACHE_DIR)
        self._cprefix = self._cdir + os.sep
        #: (first_seq, offset) -> length, least recently used first
        self._cache: OrderedDict[tuple[int, int], int] = OrderedDict()
        #: (first_seq, offset) -> open descriptor of its cache file, least recently used
        #: first; every key is also in ``_cache`` (see _cache_fd)
        self._fds: OrderedDict[tuple[int, int], int] = OrderedDict()
        self.cached = 0
        self.hits = 0
        self.misses = 0
        #: versions of the in-memory listing and of the one last written (see persist)
        self._version = 0
        self._written = 0
        self._state_lock = threading.Lock()
        for f in self.dropped:  # a crash between the state write and the unlink
            try:
                base.unlink(os.path.join(directory, segment_name(f)))
            except FileNotFoundError:
                pass
        base.makedirs(self._cdir)
        for n in sorted(base.listdir(self._cdir)):
            p = os.path.join(self._cdir, n)
            if n.endswith(".tmp"):  # a fetch cut short by a crash
                base.unlink(p)
                continue
            try:
                a, b = n.split("-")
                key = (int(a), int(b))
            except ValueError:
                continue
            if key[0] not in self.dropped:
                base.unlink(p)
                continue
            size = base.size(p)
            self._cache[key] = size
            self.cached += size
        self._trim()

    # ---------------------------------------------------------------- dropped segments

    def add(self, first_seq: int, size: int) -> None:
        """List segment ``first_seq`` (``size`` bytes) as dropped, durably (tiered.json
        rewritten atomically). The caller unlinks the file afterwards."""
        self.switch(first_seq, size)
        self.persist(*self.snapshot(), [])

    def switch(self, first_seq: int, size: int) -> None:
        """List segment ``first_seq`` as dropped in memory only: its reads go through
        the cache from now on (its file is still there). :meth:`persist` makes it
        durable. Event-loop thread."""
        self.dropped[first_seq] = size
        self._names[segment_name(first_seq)] = first_seq
        self._version += 1

    def snapshot(self) -> tuple[int, dict[int, int]]:
        """(version, dropped segments) of the in-memory listing, for :meth:`persist`."""
        return self._version, dict(self.dropped)

    def persist(self, version: int, state: dict[int, int], unlink: Sequence[str]) -> None:
        """Write ``tiered.json`` for ``state`` (a :meth:`snapshot`) unless a newer one is
        already written (concurrent callers: the newest listing wins, never an older
        one), then unlink the files ``unlink`` (segments ``state`` lists) and fsync the
        directory. Any thread: touches files only. Cost: a small write, an fdatasync,
        a rename, one or two directory fsyncs."""
        with self._state_lock:
            if version > self._written:
                self._write_state(state)
                self._written = version
        for path in unlink:
            try:
                self.base.unlink(path)
            except FileNotFoundError:
                pass
        if unlink:
            self.base.fsync_dir(self.directory)

    def _write_state(self, state: dict[int, int]) -> None:
        base = self.base
        path = os.path.join(self.directory, TIERED_NAME)
        tmp = path + ".tmp"
        fd = base.open_append(tmp)
        try:
            base.truncate(fd, 0)
            base.write(fd, encode_tiered(state))
            base.fdatasync(fd)
        finally:
            base.close(fd)
        base.rename(tmp, path)
        base.fsync_dir(self.directory)

    def is_dropped(self, first_seq: int) -> bool:
        return first_seq in self.dropped

    def _offsets(self, first_seq: int) -> array[int]:
        offs = self._offs.get(first_seq)
        if offs is not None:
            self._offs.move_to_end(first_seq)
            return offs
        hdr = read_index_header(self.base, self.directory, first_seq)
        got = load_index_entries(self.base, self.directory, hdr) if hdr is not None else None
        if got is None or hdr is None or hdr.data_end != self.dropped[first_seq]:
            raise Corruption(f"{self.directory}: the index sidecar of tiered segment "
                             f"{segment_name(first_seq)} is missing or damaged")
        offs = got[1]
        self._offs[first_seq] = offs
        if len(self._offs) > _OFFS_CACHE:
            self._offs.popitem(last=False)
        return offs

    def records(self, first_seq: int, offset: int, n: int) -> list[Range]:
        """The stored records of dropped segment ``first_seq`` overlapping bytes
        ``[offset, offset + n)`` (the segment header counts as one). O(log records)."""
        size = self.dropped[first_seq]
        end = min(offset + n, size)
        offs = self._offsets(first_seq)
        out: list[Range] = []
        if offset < SEGMENT_HEADER_SIZE and end > 0:
            out.append((first_seq, 0, SEGMENT_HEADER_SIZE))
        i = max(0, bisect.bisect_right(offs, offset) - 1)
        while i < len(offs) and offs[i] < end:
            a = offs[i]
            b = offs[i + 1] if i + 1 < len(offs) else size
            if b > offset:
                out.append((first_seq, a, b - a))
            i += 1
        return out

    def uncached(self, first_seq: int, offset: int, n: int) -> list[Range]:
        """:meth:`records` overlapping ``[offset, offset + n)`` that are not in the cache."""
        c = self._cache
        return [r for r in self.records(first_seq, offset, n) if (r[0], r[1]) not in c]

    # ---------------------------------------------------------------- the read cache

    def _cpath(self, first_seq: int, offset: int) -> str:
        return f"{self._cprefix}{first_seq:020d}-{offset:020d}"

    def cache_index(self, written: Iterable[Range]) -> None:
        """List records whose cache files :func:`write_cache_files` wrote (the least
        recently used leave beyond the bound). A descriptor kept open for one of those
        names is closed: the name is a new file now. Event-loop thread; no file writes."""
        for f, a, n in written:
            if (f, a) in self._fds:
                self._forget_fd((f, a))
            if f not in self.dropped or (f, a) in self._cache:
                continue
            self._cache[(f, a)] = n
            self.cached += n
        self._trim()

    def cache_put(self, first_seq: int, offset: int, data: bytes) -> None:
        """Store fetched bytes ``[offset, offset + len(data))`` of dropped segment
        ``first_seq``: every whole record they hold goes into the cache (partial ones
        at the edges are ignored), the least recently used leave beyond the bound."""
        if first_seq not in self.dropped:
            return
        end = offset + len(data)
        mv = memoryview(data)
        for f, a, n in self.records(first_seq, offset, len(data)):
            if a < offset or a + n > end or (f, a) in self._cache:
                continue
            path = self._cpath(f, a)
            fd = self.base.open_append(path + ".tmp")
            try:
                self.base.truncate(fd, 0)
                self.base.write(fd, mv[a - offset : a - offset + n])
            finally:
                self.base.close(fd)
            self.base.rename(path + ".tmp", path)
            self._cache[(f, a)] = n
            self.cached += n
        self._trim()

    def _trim(self) -> None:
        while self.cached > self.cache_bytes and self._cache:
            (f, a), n = self._cache.popitem(last=False)
            self.cached -= n
            if (f, a) in self._fds:
                self._forget_fd((f, a))
            try:
                self.base.unlink(self._cpath(f, a))
            except FileNotFoundError:
                pass

    def _forget_fd(self, key: tuple[int, int]) -> None:
        fd = self._fds.pop(key, None)
        if fd is not None:
            _KEPT[0] -= 1
            self.base.close(fd)

    def close_cached(self) -> None:
        """Close every descriptor kept open for cached records (the journal closes)."""
        while self._fds:
            _KEPT[0] -= 1
            self.base.close(self._fds.popitem()[1])

    def _cache_fd(self, key: tuple[int, int]) -> int | None:
        """An open descriptor of cached record ``key`` (kept: LRU of ``CACHE_FDS`` per
        journal, ``CACHE_FDS_TOTAL`` in the process), None when it is not cached. Marks
        it recently used. Cost: two dict moves; an open (and maybe a close) when its
        descriptor is not kept."""
        fds = self._fds
        fd = fds.get(key)
        if fd is not None:
            fds.move_to_end(key)
            self._cache.move_to_end(key)
            return fd
        if key not in self._cache:
            return None
        self._cache.move_to_end(key)
        fd = self.base.open_read(self._cpath(key[0], key[1]))
        fds[key] = fd
        _KEPT[0] += 1
        while (len(fds) > CACHE_FDS or _KEPT[0] > CACHE_FDS_TOTAL) and len(fds) > 1:
            _KEPT[0] -= 1
            self.base.close(fds.popitem(last=False)[1])
        return fd

    def _read_cached(self, f: int, recs: list[Range], buf: memoryview, offset: int) -> int:
        """Fill ``buf`` with bytes from ``offset`` of dropped segment ``f`` from its
        cached records ``recs`` (:meth:`records` of that span), in place; stops at the
        first record missing or short. Returns the bytes filled (0: the first missing:
        the caller raises NotLocal)."""
        pos = 0
        size = len(buf)
        for _f, a, n in recs:
            fd = self._cache_fd((f, a))
            if fd is None:
                break
            start = offset + pos - a
            want = min(n - start, size - pos)
            got = self.base.pread_into(fd, buf[pos : pos + want], start)
            self.hits += 1
            pos += got
            if got < want or pos >= size:
                break
        return pos

    # ---------------------------------------------------------------- FileLayer

    def open_read(self, path: str) -> int:
        f = self._names.get(os.path.basename(path))
        if f is None or f not in self.dropped or os.path.dirname(path) != self.directory:
            return self.base.open_read(path)
        fd = self._next_vfd
        self._next_vfd += 1
        self._vfds[fd] = f
        return fd

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        if fd < _VFD_BASE:
            return self.base.pread(fd, size, offset)
        f = self._vfds[fd]
        end_f = self.dropped[f]
        if size > 0 and SEGMENT_HEADER_SIZE <= offset < end_f:
            # the common small read, inline: one record covers it (:meth:`records`'
            # first step), one pread of the slice from its cache file
            offs = self._offs.get(f)
            if offs is None:
                offs = self._offsets(f)
            else:
                self._offs.move_to_end(f)
            i = bisect.bisect_right(offs, offset) - 1
            if i >= 0:
                a = offs[i]
                b = offs[i + 1] if i + 1 < len(offs) else end_f
                if offset + size <= b or b == end_f:
                    key = (f, a)
                    cfd = self._fds.get(key)
                    if cfd is not None:  # _cache_fd's hit, inline
                        self._fds.move_to_end(key)
                        self._cache.move_to_end(key)
                    else:
                        cfd = self._cache_fd(key)
                        if cfd is None:
                            self.misses += 1
                            raise NotLocal([(f, a, b - a)])
                    self.hits += 1
                    return self._base_pread(cfd, size, offset - a)
        recs = self.records(f, offset, size) if size > 0 else []
        if not recs:
            return b""
        r = recs[0]
        buf = bytearray(size)
        n = self._read_cached(f, recs, memoryview(buf), offset)
        if n == 0:  # the record the read starts in is missing
            self.misses += 1
            raise NotLocal([r])
        del buf[n:]  # a short read: callers read again past what they got
        return bytes(buf)

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        if fd < _VFD_BASE:
            return self.base.pread_into(fd, buf, offset)
        f = self._vfds[fd]
        mv = memoryview(buf)
        recs = self.records(f, offset, len(mv)) if len(mv) else []
        if not recs:
            return 0
        n = self._read_cached(f, recs, mv, offset)
        if n == 0:
            self.misses += 1
            raise NotLocal([recs[0]])
        return n

    def close(self, fd: int) -> None:
        if fd < _VFD_BASE:
            self.base.close(fd)
        else:
            self._vfds.pop(fd, None)

    def size(self, path: str) -> int:
        f = self._names.get(os.path.basename(path))
        if f is not None and f in self.dropped and os.path.dirname(path) == self.directory:
            return self.dropped[f]
        return self.base.size(path)

    def listdir(self, directory: str) -> list[str]:
        names = self.base.listdir(directory)
        if os.path.normpath(directory) == os.path.normpath(self.directory):
            have = set(names)
            names += [n for n in self._names if n not in have]
        return names

    def open_append(self, path: str) -> int:
        return self.base.open_append(path)

    def write(self, fd: int, data: Buffer) -> None:
        self.base.write(fd, data)

    def writev(self, fd: int, parts: Sequence[Buffer]) -> None:
        self.base.writev(fd, parts)

    def open_write(self, path: str) -> int:
        return self.base.open_write(path)

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        self.base.pwrite(fd, data, offset)

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> None:
        self.base.pwritev(fd, parts, offset)

    def fdatasync(self, fd: int) -> None:
        self.base.fdatasync(fd)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        self.base.start_writeback(fd, offset, length)

    def truncate(self, fd: int, size: int) -> None:
        self.base.truncate(fd, size)

    def rename(self, src: str, dst: str) -> None:
        self.base.rename(src, dst)

    def unlink(self, path: str) -> None:
        self.base.unlink(path)

    def fsync_dir(self, directory: str) -> None:
        self.base.fsync_dir(directory)

    def makedirs(self, directory: str) -> None:
        self.base.makedirs(directory)


def write_cache_files(fs: FileLayer, directory: str, records: Iterable[Range],
                      offset: int, data: bytes) -> list[Range]:
    """Write each whole record of ``records`` (of one segment) that ``data`` (its bytes
    from ``offset``) holds as a cache file of journal ``directory``: a unique temporary
    name, then a rename, so concurrent fetches of one record never mix. Returns the
    records written, for :meth:`TieredFS.cache_index`. Any thread (touches no journal
    state). Cost: one small file write and rename per record, no fsync (a record lost by
    a crash is fetched again; a damaged one fails its CRC)."""
    cdir = os.path.join(directory, CACHE_DIR)
    end = offset + len(data)
    mv = memoryview(data)
    out: list[Range] = []
    tag = f".{os.getpid()}-{threading.get_ident()}.tmp"
    for f, a, n in records:
        if a < offset or a + n > end:
            continue
        path = os.path.join(cdir, f"{f:020d}-{a:020d}")
        fd = fs.open_append(path + tag)
        try:
            fs.truncate(fd, 0)
            fs.write(fd, mv[a - offset : a - offset + n])
        finally:
            fs.close(fd)
        fs.rename(path + tag, path)
        out.append((f, a, n))
    return out


def cache_writer(journal: Journal) -> Callable[[Iterable[Range], int, bytes], list[Range]]:
    """:func:`write_cache_files` bound to *journal*'s cache directory, for a fetcher's
    worker thread (records not of a dropped segment are written and then ignored by
    :func:`index_cached`)."""
    fs = journal._fs
    base = fs.base if isinstance(fs, TieredFS) else fs
    directory = journal._dir

    def write(records: Iterable[Range], offset: int, data: bytes) -> list[Range]:
        return write_cache_files(base, directory, records, offset, data)

    return write


def index_cached(journal: Journal, written: Iterable[Range]) -> None:
    """:meth:`TieredFS.cache_index` of *journal* (nothing for a fully local one)."""
    fs = journal._fs
    if isinstance(fs, TieredFS):
        fs.cache_index(written)


def missing_records(journal: Journal, locs: Iterable[tuple[int, int]],
                    limit: int) -> list[Range]:
    """The stored records of dropped segments that reading the records at ``locs``
    (``(seq, loc)`` pairs, as the maps give them) needs and the cache lacks, in order,
    at most ``limit`` bytes of them (at least one). Empty for a fully local journal.
    Event-loop thread. Cost: O(log records) per pair; no I/O but sidecar loads."""
    fs = journal._fs  # the journal package's own state (this module is its tier room)
    if not isinstance(fs, TieredFS):
        return []
    out: list[Range] = []
    seen: set[tuple[int, int]] = set()
    total = 0
    for seq, loc in locs:
        seg = journal._seg_for(seq)
        if seg.first_seq not in fs.dropped:
            continue
        for r in fs.uncached(seg.first_seq, journal._where(seg, seq, loc), 1):
            if (r[0], r[1]) in seen:
                continue
            if out and total + r[2] > limit:
                return out
            seen.add((r[0], r[1]))
            out.append(r)
            total += r[2]
    return out


def readahead(journal: Journal, ranges: Sequence[Range], limit: int) -> list[Range]:
    """``ranges`` (the records a NotLocal named) and the uncached records that follow
    the first one in its segment, up to ``limit`` bytes in all: what a sequential scan
    (replication catch-up) will read next. Event-loop thread."""
    fs = journal._fs
    if not isinstance(fs, TieredFS) or not ranges:
        return list(ranges)
    f, a, _n = ranges[0]
    if f not in fs.dropped:
        return list(ranges)
    out = {(r[0], r[1]): r for r in ranges}
    total = sum(r[2] for r in ranges)
    for r in fs.uncached(f, a, max(1, limit)):
        if total + r[2] > limit:
            break
        if (r[0], r[1]) not in out:
            out[(r[0], r[1])] = r
            total += r[2]
    return sorted(out.values())


def prefetch_limit(journal: Journal) -> int:
    """The most bytes one planned fetch may bring: half the read cache, so the records
    a read needs are not evicted by its own prefetch."""
    fs = journal._fs
    return max(1, fs.cache_bytes // 2) if isinstance(fs, TieredFS) else 0


async def fetch_missed(journal: Journal, exc: NotLocal, last: list[Range] | None,
                       plan: Callable[[list[Range]], list[Range]] | None = None) -> list[Range]:
    """Fetch what a read that raised *exc* missed (``plan(missed)``, which must include
    them, may widen it) through ``journal.remote``; returns the ranges missed, to pass as
    *last* after the next miss. Raises *exc* when no fetcher is attached, it names no
    ranges, or they equal *last* (missing again right after their fetch: the cache
    cannot hold what the read needs)."""
    remote = journal.remote
    if remote is None or not exc.ranges or exc.ranges == last:
        raise exc
    want = plan(exc.ranges) if plan is not None else exc.ranges
    await remote(want or exc.ranges)
    return exc.ranges


async def fetch_retry(journal: Journal, read: Callable[[], _T],
                      plan: Callable[[list[Range]], list[Range]] | None = None) -> _T:
    """``read()``; when it meets dropped history (:class:`NotLocal`) fetch what it misses
    (:func:`fetch_missed`, widened by ``plan``: :func:`missing_records`,
    :func:`readahead`) and try again, up to ``FETCH_ATTEMPTS`` fetches. NotLocal as
    :func:`fetch_missed` raises it. Costs nothing beyond ``read()`` when all is local."""
    last: list[Range] | None = None
    for _ in range(FETCH_ATTEMPTS):
        try:
            return read()
        except NotLocal as exc:
            last = await fetch_missed(journal, exc, last, plan)
    return read()


def local_segment_files(fs: FileLayer, directory: str) -> list[int]:
    """First seqs of the segment files really present in ``directory``."""
    return sorted(f for f in (parse_segment_name(n) for n in fs.listdir(directory))
                  if f is not None)
