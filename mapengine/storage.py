"""Map files and the manifest on disk (format: docs/FORMATS.md ("Delta maps")).

Design notes
------------
* A map file is written once: temp file, fsync, rename, directory fsync. Its entries are
  cut into blocks of ``BLOCK_ENTRIES``; each block is msgpack of five little-endian
  int64 columns (start delta-encoded, end stored as length) compressed with lz4. A small
  uncompressed index at the end (first start, max end, offset, length, count, crc32 per
  block) lets a lookup read one block, never the whole map.
* Files are opened lazily: the manifest gives name, window and entry count; the header
  and index are read (and checked) on first use. What a lookup keeps of a file goes
  through one LRU (:class:`BlockCache`) bounded by ``cache_bytes``: decoded blocks, and
  per map its block index (seven int64 arrays, 56 bytes a block of ``BLOCK_ENTRIES``
  entries) and its offset filter. An evicted index is read again from the file when the
  map is next used; an evicted filter is not rebuilt (lookups then go by the index, as
  for a map that never had one). What stays in memory per map whatever the cache holds
  is its :class:`MapFile` (name, window, size: ~0.5 KiB with the manifest row), which
  is per ``l0_max_writes`` writes, not per write (issue 27: before, indexes and filters
  were kept for every map ever used, ~20 bytes a write, beside a block cache of their
  own size).
* The manifest names every live file. It is replaced atomically, so whatever a crash
  interrupts, the previous manifest (and the files it names) stays valid; files it does
  not name are leftovers and are deleted on open.
* Every write goes through :class:`FileOps`; its :meth:`FileOps.hook` is called between
  steps so tests can interrupt a write at any point.
* **Deferred durability** (``defer=True`` on :meth:`DirStore.put` and
  :meth:`DirStore.commit`, what a live seal uses): the map files are written and renamed
  into place on the caller's thread (readable at once, from the page cache) without an
  fsync; the commit packs the manifest there too and hands the rest to the store's one
  writer thread, which runs its jobs in order: fsync each of those map files, fsync the
  directory, then write the manifest (temp, fsync, rename, directory fsync). So a
  manifest is made durable only after every file it names, and manifests in the order
  they were committed; the caller's thread does no fsync. Until the job ran, the
  manifest on disk is the previous one (a crash replays a little more journal); a job
  with a newer one queued behind it syncs its files and leaves the manifest to that
  one (a backlog writes one manifest). Every
  write that is not deferred (a rewind, a retain, a blocking seal, :meth:`DirStore.drop`
  after a switch, close) first waits for the pending job (:meth:`DirStore.flush`). A
  failed job makes the store refuse further writes and calls ``on_failure`` (the
  history then refuses to be fed, as after a failed write in the caller's thread).
* This module names the files (:func:`map_name`, LevelDB's ``filename.h``) and defines
  what the history needs of a store (:class:`MapStore`, :class:`MapRef`); the history
  imports it, never the other way round. :class:`MemoryStore` is the store of a history
  opened without a directory.
"""

from __future__ import annotations

import os
import struct
import zlib
from array import array
from bisect import bisect_left, bisect_right
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Protocol

import lz4.block
import msgpack
import numpy as np

from .core import Columns, DeltaMap
from .errors import MapCorruption, MapUsageError

EMPTY = Columns.empty()

__all__ = [
    "BLOCK_ENTRIES",
    "DirStore",
    "FileOps",
    "MapFile",
    "MapRef",
    "MapStore",
    "MemoryStore",
    "decode_map",
    "encode_map",
    "map_name",
]

# On-disk constants: these must never change (a new format gets new values).
MAP_MAGIC = b"CDPMAP\x00\x01"
MAP_VERSION = 1
MANIFEST_MAGIC = b"CDPMANIF"
MANIFEST_VERSION = 1
MANIFEST = "MANIFEST"
#: the head (the newest flat map) a clean close left, for the next open (FORMATS.md "HEAD")
HEAD = "HEAD"
#: on disk, never change
HEAD_MAGIC = b"CDPHEAD\x00"
HEAD_VERSION = 1
#: magic(8s) version(I) reserved(I) gen(Q) sealed_seq(Q) count(Q) body_crc(I) header_crc(I)
HEAD_HEADER = struct.Struct("<8sIIQQQII")
KIND_L0 = 0  # overlapping: every write of the window, sorted by (start, seq)
KIND_MERGED = 1  # flat: newest per byte of the window
KIND_FULL = 2  # flat: newest per byte since the epoch began
_HEADER = struct.Struct("<8sHBBIQQQIIQII")  # 64 bytes, see FORMATS.md ("Delta maps")
_MHEADER = struct.Struct("<8sIII")  # 20 bytes
assert _HEADER.size == 64

BLOCK_ENTRIES = 256

# In-memory offset filter of a map (not stored: built when the map is written, or from a
# whole read of it on its first lookup after a reopen; held in the block cache's LRU and
# not rebuilt once evicted). Sorted, disjoint ranges of
# ``FILTER_SHIFT`` granules covering every entry, so a lookup of a range the map does
# not touch costs one binary search instead of a block read. Dense maps (full maps)
# get none: it would rarely say no.
FILTER_SHIFT = 12
FILTER_MAX_ENTRIES = 1 << 17
_FILTER_U32_MAX = (1 << 32) - 1
# Bytes of Python objects around a cached index or filter (headers, tuple, LRU slot),
# counted with the arrays' bytes against ``cache_bytes``.
_META_OVERHEAD = 512
# A filter missing since open is built (a whole read of the map) only for a lookup of at
# most this many bytes: wider ones (changed, a view region) it would rarely answer.
_LAZY_FILTER_SPAN = 1 << 20
_INDEX = -1  # BlockCache key (path, _INDEX): a map's block index
_FILTER = -2  # BlockCache key (path, _FILTER): a map's offset filter
#: a map's block index: first start, max end, running max end, offset, length, count, crc32
_BlockIndex = tuple[
    "array[int]", "array[int]", "array[int]", "array[int]", "array[int]", "array[int]",
    "array[int]",
]


def map_name(kind: str, level: int, lo: int, hi: int, tag: str = "") -> str:
    """File name of a map: ``L<k>-<first:020d>-<last:020d>.map`` or ``F-<last:020d>.map``.

    ``first = lo + 1`` and ``last = hi``: the seqs the window covers. ``tag`` (``-r<n>``)
    marks maps written by the n-th :meth:`~mapengine.history.MapHistory.retain`, so that
    they never reuse the name of a file the previous manifest still names.

    >>> map_name("L", 0, 0, 8192)
    'L0-00000000000000000001-00000000000000008192.map'
    >>> map_name("F", 0, 0, 64, "-r2")
    'F-00000000000000000064-r2.map'
    """
    if kind == "F":
        return f"F-{hi:020d}{tag}.map"
    return f"L{level}-{lo + 1:020d}-{hi:020d}{tag}.map"


class MapRef(Protocol):
    """A map the history holds: in memory (:class:`DeltaMap`) or in a file (lazy)."""

    name: str
    lo: int
    hi: int
    flat: bool

    def __len__(self) -> int: ...

    def query(self, start: int, end: int) -> Columns: ...

    def load(self) -> DeltaMap: ...

    def check_filter(self, c: Columns) -> list[str]:
        """Problems of the in-memory offset filter (if any) against the map's entries."""
        ...


class MapStore(Protocol):
    """Where maps and the manifest go (memory, or a directory of files)."""

    def put(self, kind: str, level: int, m: DeltaMap, tag: str = "",
            register: bool = True, defer: bool = False) -> MapRef:
        """Write a map. ``register=False``: touch no shared state (safe in another
        thread); the owner thread then hands the refs to :meth:`adopt`. ``defer``: not
        durable yet, the next ``commit(defer=True)`` makes it so before its manifest."""
        ...

    def adopt(self, refs: list[MapRef]) -> None: ...

    def drop(self, names: list[str]) -> None: ...

    def unregister(self, names: list[str]) -> list[str]:
        """:meth:`drop` minus the file deletion: the paths to :meth:`remove` (any thread)."""
        ...

    def remove(self, paths: list[str]) -> None: ...

    def commit(self, state: dict[str, Any], defer: bool = False) -> None: ...

    def flush(self) -> None:
        """Wait until every deferred commit is durable; raise what one raised."""
        ...

    @property
    def pending(self) -> Future[None] | None:
        """The newest deferred commit's job while it has not ended, else None."""
        ...

    @property
    def pending_jobs(self) -> int:
        """Deferred commits whose job has not ended."""
        ...

    def disk_bytes(self) -> int: ...

    def cache_bytes(self) -> int: ...

    def close(self) -> None: ...

    def save_head(self, head: Columns, sealed_seq: int) -> None:
        """Keep *head* (the flat head of the maps as committed) for the next open."""
        ...

    def take_head(self, sealed_seq: int) -> Columns | None:
        """The head :meth:`save_head` kept for exactly the maps as opened, else None;
        none is kept after this call."""
        ...


class _MemRef:
    """An in-memory map (the memory store's handle)."""

    __slots__ = ("flat", "hi", "lo", "m", "name")

    def __init__(self, name: str, m: DeltaMap) -> None:
        self.name = name
        self.m = m
        self.lo = m.lo
        self.hi = m.hi
        self.flat = m.flat

    def __len__(self) -> int:
        return len(self.m)

    def query(self, start: int, end: int) -> Columns:
        return self.m.query(start, end)

    def load(self) -> DeltaMap:
        return self.m

    def check_filter(self, c: Columns) -> list[str]:
        return []  # no filter: the map is in memory


class MemoryStore:
    """Keeps every map in memory; nothing persists. For tests and benchmarks."""

    def __init__(self) -> None:
        self.state: dict[str, Any] | None = None
        self._bytes = 0

    def put(self, kind: str, level: int, m: DeltaMap, tag: str = "",
            register: bool = True, defer: bool = False) -> MapRef:
        if register:
            self._bytes += m.nbytes
        return _MemRef(map_name(kind, level, m.lo, m.hi, tag), m)

    def adopt(self, refs: list[MapRef]) -> None:
        for r in refs:
            if isinstance(r, _MemRef):
                self._bytes += r.m.nbytes

    def drop(self, names: list[str]) -> None:
        pass

    def unregister(self, names: list[str]) -> list[str]:
        return []

    def remove(self, paths: list[str]) -> None:
        pass

    def commit(self, state: dict[str, Any], defer: bool = False) -> None:
        self.state = state

    def flush(self) -> None:
        pass

    @property
    def pending(self) -> Future[None] | None:
        return None

    @property
    def pending_jobs(self) -> int:
        return 0

    def disk_bytes(self) -> int:
        return 0

    def cache_bytes(self) -> int:
        return self._bytes

    def close(self) -> None:
        pass

    def save_head(self, head: Columns, sealed_seq: int) -> None:
        return None

    def take_head(self, sealed_seq: int) -> Columns | None:
        return None


class FileOps:
    """The single door for file writes and reads; override :meth:`hook` to inject faults.

    ``hook(point, name)`` is called at ``"open"``, ``"write"`` (after half the bytes),
    ``"fsync"``, ``"rename"``, ``"dirsync"`` and ``"done"``.
    """

    max_open = 128  #: read descriptors kept open (LRU)

    def hook(self, point: str, name: str) -> None:
        """Called between the steps of a write. Default: nothing."""

    def _fds(self) -> OrderedDict[str, int]:
        d: OrderedDict[str, int] | None = self.__dict__.get("_fd_cache")
        if d is None:
            d = self.__dict__["_fd_cache"] = OrderedDict()
        return d

    def pread(self, path: str, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` through a small cache of open descriptors."""
        fds = self._fds()
        fd = fds.get(path)
        if fd is None:
            fd = os.open(path, os.O_RDONLY)
            fds[path] = fd
            while len(fds) > self.max_open:
                os.close(fds.popitem(last=False)[1])
        else:
            fds.move_to_end(path)
        return os.pread(fd, length, offset)

    def forget(self, path: str) -> None:
        """Close the cached descriptor of ``path``, if any."""
        fd = self._fds().pop(path, None)
        if fd is not None:
            os.close(fd)

    def close_all(self) -> None:
        """Close every cached descriptor."""
        fds = self._fds()
        while fds:
            os.close(fds.popitem()[1])

    def write_atomic(self, directory: str, name: str, data: bytes, forget: bool = True) -> None:
        """Write ``directory/name`` once: temp + fsync + rename + directory fsync.
        ``forget=False`` for a name never read before (leaves the descriptor cache,
        which is not thread-safe, alone)."""
        if forget:
            self.forget(os.path.join(directory, name))
        self._write_renamed(directory, name, data, sync=True)
        self.hook("dirsync", name)
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.hook("done", name)

    def write_unsynced(self, directory: str, name: str, data: bytes) -> None:
        """Write ``directory/name`` once, not durable yet: temp + rename, no fsync (hooks
        ``open``, ``write``, ``rename``). Readable at once; :meth:`sync_files` makes it
        durable. For a name never read before (the descriptor cache is left alone)."""
        self._write_renamed(directory, name, data, sync=False)

    def _write_renamed(self, directory: str, name: str, data: bytes, *, sync: bool) -> None:
        """``directory/name`` written under a temp name (in two halves, a hook between)
        and renamed into place; fsynced before the rename when ``sync``. Hooks ``open``,
        ``write``, [``fsync``], ``rename``."""
        tmp = os.path.join(directory, name + ".tmp")
        self.hook("open", name)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            half = len(data) // 2
            _write_all(fd, memoryview(data)[:half])
            self.hook("write", name)
            _write_all(fd, memoryview(data)[half:])
            if sync:
                self.hook("fsync", name)
                os.fsync(fd)
        finally:
            os.close(fd)
        self.hook("rename", name)
        os.replace(tmp, os.path.join(directory, name))

    def sync_files(self, directory: str, names: list[str]) -> None:
        """Make files written by :meth:`write_unsynced` durable: fsync each (hook
        ``fsync``), then the directory once (hooks ``dirsync``, ``done``). Any thread."""
        for name in names:
            self.hook("fsync", name)
            fd = os.open(os.path.join(directory, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        self.hook("dirsync", ",".join(names))
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self.hook("done", ",".join(names))

    def read(self, path: str, offset: int = 0, length: int = -1) -> bytes:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read(length) if length >= 0 else f.read()

    def listdir(self, directory: str) -> list[str]:
        return os.listdir(directory)

    def remove(self, path: str) -> None:
        self.forget(path)
        os.remove(path)


def _write_all(fd: int, data: memoryview) -> None:
    while data:
        n = os.write(fd, data)
        data = data[n:]


def _crc(b: bytes) -> int:
    return zlib.crc32(b) & 0xFFFFFFFF


def _kind_code(kind: str, flat: bool) -> int:
    if kind == "F":
        return KIND_FULL
    return KIND_MERGED if flat else KIND_L0


def _encode_block(c: Columns) -> bytes:
    s = c.start
    ds = np.empty_like(s)
    if s.shape[0]:
        ds[0] = s[0]
        ds[1:] = s[1:] - s[:-1]
    cols = [ds, c.end - c.start, c.seq, c.loc, c.poff]
    body = msgpack.packb([int(s.shape[0])] + [a.astype("<i8").tobytes() for a in cols])
    return bytes(lz4.block.compress(body, store_size=True))


def _decode_block(raw: bytes, path: str) -> Columns:
    try:
        body = msgpack.unpackb(lz4.block.decompress(raw), raw=True)
        n = int(body[0])
        cols = [np.frombuffer(b, dtype="<i8").astype(np.int64) for b in body[1:6]]
        if len(cols) != 5 or any(a.shape[0] != n for a in cols):
            raise ValueError("column lengths")
    except Exception as e:  # any decoding failure is corruption of this file
        raise MapCorruption(path, f"bad block: {e}") from None
    start = np.cumsum(cols[0])
    return Columns(start, start + cols[1], cols[2], cols[3], cols[4])


def encode_map(m: DeltaMap, kind: str, level: int, block_entries: int = BLOCK_ENTRIES) -> bytes:
    """The bytes of a map file (see docs/FORMATS.md ("Delta maps")).

    The columns of every block are prepared for the whole map at once (one numpy pass
    per column); each block then costs one msgpack call over byte slices and one lz4
    compression. Runtime complexity: O(n).
    """
    c = m.cols
    n = c.n
    blocks: list[bytes] = []
    first: list[int] = []
    maxend: list[int] = []
    counts: list[int] = []
    if n:
        s = c.start
        ds = np.empty_like(s)
        ds[0] = s[0]
        np.subtract(s[1:], s[:-1], out=ds[1:])
        ds[::block_entries] = s[::block_entries]  # each block starts absolute
        cuts = np.arange(0, n, block_entries)
        first = s[cuts].tolist()
        maxend = np.maximum.reduceat(c.end, cuts).tolist()
        counts = np.diff(np.append(cuts, n)).tolist()
        mvs = [  # byte views, no copy (the arrays are little-endian int64)
            np.ascontiguousarray(a, "<i8").data.cast("B")
            for a in (ds, c.end - s, c.seq, c.loc, c.poff)
        ]
        mv0, mv1, mv2, mv3, mv4 = mvs
        pack = msgpack.packb
        compress = lz4.block.compress
        for i, cnt in zip(cuts.tolist(), counts, strict=True):
            p0 = i * 8
            p1 = p0 + cnt * 8
            body = pack([cnt, mv0[p0:p1], mv1[p0:p1], mv2[p0:p1], mv3[p0:p1], mv4[p0:p1]])
            blocks.append(compress(body, store_size=True))
    offs: list[int] = []
    pos = _HEADER.size
    for b in blocks:
        offs.append(pos)
        pos += len(b)
    index = msgpack.packb(
        [
            np.asarray(v, "<i8").tobytes()
            for v in (
                first,
                maxend,
                offs,
                [len(b) for b in blocks],
                counts,
                [_crc(b) for b in blocks],
            )
        ]
    )
    head = _HEADER.pack(
        MAP_MAGIC,
        MAP_VERSION,
        _kind_code(kind, m.flat),
        level,
        block_entries,
        m.lo,
        m.hi,
        n,
        len(blocks),
        len(index),
        pos,
        0,
        _crc(index),
    )
    crc = _crc(head[:56])
    head = head[:56] + struct.pack("<I", crc) + head[60:]
    return head + b"".join(blocks) + index


def _parse_header(raw: bytes, path: str) -> tuple[int, ...]:
    if len(raw) < _HEADER.size:
        raise MapCorruption(path, "short header")
    f = _HEADER.unpack(raw[: _HEADER.size])
    if f[0] != MAP_MAGIC:
        raise MapCorruption(path, "bad magic")
    if _crc(raw[:56]) != f[11]:
        raise MapCorruption(path, "header checksum mismatch")
    if f[1] != MAP_VERSION:
        raise MapCorruption(path, f"unknown map version {f[1]}")
    return tuple(f[1:])


class MapFile:
    """A map in a file, read lazily block by block through the shared cache.

    Its block index (``_idx``: first start, max end, running max end, offset, length,
    entry count and crc32 of each block, as ``array("q")``) and offset filter (``_filt``)
    are entries of the cache's LRU too: either may be dropped between two lookups.
    """

    __slots__ = (
        "_cache",
        "_filt",
        "_filt_done",
        "_fs",
        "_idx",
        "flat",
        "hi",
        "kind",
        "lo",
        "n",
        "name",
        "path",
        "size",
    )

    def __init__(
        self,
        path: str,
        name: str,
        kind: str,
        lo: int,
        hi: int,
        n: int,
        flat: bool,
        size: int,
        cache: BlockCache,
        fs: FileOps,
    ) -> None:
        self.path = path
        self.name = name
        self.kind = kind
        self.lo = lo
        self.hi = hi
        self.n = n
        self.flat = flat
        self.size = size
        self._cache = cache
        self._fs = fs
        self._idx: _BlockIndex | None = None
        self._filt: tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]] | None = None
        self._filt_done = n > FILTER_MAX_ENTRIES  # True: no (more) attempt to build one

    def __len__(self) -> int:
        return self.n

    def _index(self) -> _BlockIndex:
        """Read and check the header and block index, and cache the index. Cost: two
        preads (64 bytes, then 48 bytes a block) and a CRC."""
        raw = self._fs.pread(self.path, 0, _HEADER.size)
        f = _parse_header(raw, self.path)
        (_v, kind, _lvl, _be, lo, hi, n, nblocks, ilen, ioff, _hc, icrc) = f
        if (lo, hi, n) != (self.lo, self.hi, self.n) or (kind != KIND_L0) != self.flat:
            raise MapCorruption(self.path, "header disagrees with the manifest")
        idx = self._fs.pread(self.path, ioff, ilen)
        if len(idx) != ilen or _crc(idx) != icrc:
            raise MapCorruption(self.path, "index checksum mismatch")
        try:
            cols = [np.frombuffer(b, "<i8").astype(np.int64) for b in msgpack.unpackb(idx)]
            if len(cols) != 6 or any(c.shape[0] != nblocks for c in cols):
                raise ValueError("index shape")
        except Exception as e:
            raise MapCorruption(self.path, f"bad index: {e}") from None
        if int(cols[4].sum()) != n:
            raise MapCorruption(self.path, "index entry count mismatch")
        pmax = np.maximum.accumulate(cols[1]) if nblocks else cols[1]
        first, maxend, off, ln, cnt, crc = (array("q", c.tobytes()) for c in cols)
        bi = (first, maxend, array("q", pmax.tobytes()), off, ln, cnt, crc)
        self._idx = bi
        self._cache.put_meta((self.path, _INDEX), self, 7 * 8 * nblocks + _META_OVERHEAD)
        return bi

    def _index_evicted(self) -> None:
        self._idx = None

    def _filter_evicted(self) -> None:
        self._filt = None

    def _block(self, j: int, bi: _BlockIndex) -> Columns:
        key = (self.path, j)
        c = self._cache.get(key)
        if c is None:
            raw = self._fs.pread(self.path, bi[3][j], bi[4][j])
            if len(raw) != bi[4][j] or _crc(raw) != bi[6][j]:
                raise MapCorruption(self.path, f"block {j} checksum mismatch")
            c = _decode_block(raw, self.path)
            if c.n != bi[5][j]:
                raise MapCorruption(self.path, f"block {j} entry count mismatch")
            self._cache.put(key, c)
        return c

    def set_filter(self, c: Columns) -> None:
        """Build the offset filter from the map's entries (not for more than
        ``FILTER_MAX_ENTRIES``) and put it in the cache."""
        self._filt_done = True
        if c.n > FILTER_MAX_ENTRIES:
            return
        self._filt = offset_filter(c)
        self._cache_filter()

    def _cache_filter(self) -> None:
        f = self._filt
        if f is not None:
            self._cache.put_meta((self.path, _FILTER), self,
                                 f[0].nbytes + f[1].nbytes + _META_OVERHEAD)

    def drop_filter(self) -> None:
        """Forget the filter and the index (the map is leaving the store)."""
        self._cache.forget_meta(self.path)
        self._filt = None
        self._idx = None

    def check_filter(self, c: Columns) -> list[str]:
        """Problems of the offset filter (if any): it must be sorted, disjoint, and cover
        every one of the map's entries ``c``. Runtime complexity: O(n log f)."""
        f = self._filt
        if f is None:
            return []
        fs, fe = (a.astype(np.int64) for a in f)
        if not (fs.shape == fe.shape and (fs < fe).all() and (fe[:-1] < fs[1:]).all()):
            return [f"{self.name}: offset filter not sorted and disjoint"]
        if c.n:
            g0 = c.start >> FILTER_SHIFT
            g1 = (c.end - 1) >> FILTER_SHIFT
            i = np.searchsorted(fe, g0, side="right")
            if not (i < fe.shape[0]).all():
                return [f"{self.name}: offset filter misses entries"]
            if not ((fs[i] <= g0).all() and (fe[i] > g1).all()):
                return [f"{self.name}: offset filter misses entries"]
        return []

    def _lazy_filter(self) -> None:
        """First small lookup since open: read the whole map once to build its filter."""
        self._filt_done = True
        try:
            m = self.load()
        except MapCorruption:
            return  # the lookups report damage where they touch it
        self.set_filter(m.cols)

    def query(self, start: int, end: int) -> Columns:
        """Entries intersecting ``[start, end)``. Runtime complexity: O(log n + block);
        O(log n) without any block read when the offset filter rules the range out."""
        if not self._filt_done and end - start <= _LAZY_FILTER_SPAN:
            self._lazy_filter()
        f = self._filt
        cache = self._cache
        if f is not None and end > start:
            cache.touch((self.path, _FILTER))
            fs, fe = f
            g = start >> FILTER_SHIFT
            if g > _FILTER_U32_MAX and fe.dtype == np.uint32:
                return EMPTY  # past every granule a uint32 filter can hold
            # the key in the filter's dtype: searching a uint32 array for a Python int,
            # numpy casts the whole array to int64 first (up to 1 MiB written at
            # FILTER_MAX_ENTRIES, ~35 µs at 100k entries, and the core's cache with it)
            i = int(fe.searchsorted(fe.dtype.type(g), "right"))
            if i >= fe.shape[0] or fs.item(i) > (end - 1) >> FILTER_SHIFT:
                return EMPTY
        bi = self._idx
        if bi is None:
            bi = self._index()
        else:
            cache.touch((self.path, _INDEX))
        first, maxend, pmax = bi[0], bi[1], bi[2]
        j0 = bisect_right(pmax, start)
        j1 = bisect_left(first, end)
        parts: list[Columns] = []
        for j in range(j0, j1):
            if maxend[j] <= start:
                continue
            c = self._block(j, bi)
            if self.flat:
                i0 = int(c.end.searchsorted(start, "right"))
                if i0 >= c.start.shape[0] or c.start[i0] >= end:
                    continue
                i1 = int(c.start.searchsorted(end, "left"))
                parts.append(c.take(slice(i0, i1)))
            else:
                cme = cache.get_aux((self.path, j))
                if cme is None:
                    cme = np.maximum.accumulate(c.end)
                    cache.put_aux((self.path, j), cme)
                i0 = int(cme.searchsorted(start, "right"))
                i1 = int(c.start.searchsorted(end, "left"))
                if i1 > i0:
                    part = c.take(slice(i0, i1))
                    parts.append(part.take(part.end > start))
        if not parts:
            return EMPTY
        return parts[0] if len(parts) == 1 else Columns.concat(parts)

    def load(self) -> DeltaMap:
        """The whole map (not cached). Runtime complexity: O(n)."""
        return decode_map(self._fs.read(self.path), self.path)


def decode_map(raw: bytes, path: str) -> DeltaMap:
    """Parse a whole map file, checking every checksum. Runtime complexity: O(n)."""
    f = _parse_header(raw, path)
    (_v, kind, _lvl, _be, lo, hi, n, nblocks, ilen, ioff, _hc, icrc) = f
    idx = raw[ioff : ioff + ilen]
    if len(idx) != ilen or _crc(idx) != icrc or ioff + ilen != len(raw):
        raise MapCorruption(path, "index checksum mismatch")
    try:
        cols = [np.frombuffer(b, "<i8").astype(np.int64) for b in msgpack.unpackb(idx)]
    except Exception as e:
        raise MapCorruption(path, f"bad index: {e}") from None
    parts = []
    for j in range(nblocks):
        o, ln = int(cols[2][j]), int(cols[3][j])
        b = raw[o : o + ln]
        if _crc(b) != int(cols[5][j]):
            raise MapCorruption(path, f"block {j} checksum mismatch")
        parts.append(_decode_block(b, path))
    c = Columns.concat(parts)
    if c.n != n:
        raise MapCorruption(path, "entry count mismatch")
    return DeltaMap(lo, hi, c, flat=kind != KIND_L0)


def offset_filter(c: Columns) -> tuple[np.ndarray[Any, Any], np.ndarray[Any, Any]]:
    """``(gs, ge)``: sorted, disjoint granule ranges ``[gs, ge)`` (granules of
    ``2**FILTER_SHIFT`` bytes) covering every entry of ``c`` (sorted by start; entries
    may overlap). uint32 when the granules fit. Runtime complexity: O(n)."""
    if not c.n:
        z = np.zeros(0, np.uint32)
        return z, z
    gs = c.start >> FILTER_SHIFT
    ce = np.maximum.accumulate(((c.end - 1) >> FILTER_SHIFT) + 1)
    new = np.ones(gs.shape[0], dtype=bool)
    new[1:] = gs[1:] > ce[:-1]
    last = np.ones(gs.shape[0], dtype=bool)
    last[:-1] = new[1:]
    fs, fe = gs[new], ce[last]
    if int(fe[-1]) < 1 << 32:
        return fs.astype(np.uint32), fe.astype(np.uint32)
    return fs.copy(), fe.copy()


class BlockCache:
    """One LRU of what map lookups keep from the files, bounded by ``limit`` bytes:
    decoded blocks (key ``(path, j)``, with their derived arrays, see :meth:`put_aux`)
    and per map its block index (``(path, _INDEX)``) and offset filter
    (``(path, _FILTER)``), whose eviction tells the :class:`MapFile` to let go of them.

    Runtime complexity: O(1) per get, put and touch (amortised, evictions included).
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        #: bytes of the indexes and filters among them
        self.meta_bytes = 0
        self._d: OrderedDict[tuple[str, int], Any] = OrderedDict()
        self._aux: dict[tuple[str, int], np.ndarray[Any, np.dtype[np.int64]]] = {}
        self._meta: dict[tuple[str, int], int] = {}  # index/filter key -> its bytes

    def get(self, key: tuple[str, int]) -> Columns | None:
        c: Columns | None = self._d.get(key)
        if c is not None:
            self._d.move_to_end(key)
        return c

    def put(self, key: tuple[str, int], c: Columns) -> None:
        self._d[key] = c
        self.bytes += c.nbytes
        self._evict()

    def touch(self, key: tuple[str, int]) -> None:
        """Mark an index or filter as just used."""
        if key in self._d:
            self._d.move_to_end(key)

    def put_meta(self, key: tuple[str, int], owner: MapFile, nbytes: int) -> None:
        """Account an index or filter *owner* now holds (replacing an older one)."""
        old = self._meta.pop(key, None)
        if old is not None:
            self.bytes -= old
            self.meta_bytes -= old
        self._d[key] = owner
        self._d.move_to_end(key)
        self._meta[key] = nbytes
        self.bytes += nbytes
        self.meta_bytes += nbytes
        self._evict()

    def forget_meta(self, path: str) -> None:
        """Drop the accounts of a map's index and filter (the map is leaving)."""
        for key in ((path, _INDEX), (path, _FILTER)):
            nb = self._meta.pop(key, None)
            if nb is not None:
                del self._d[key]
                self.bytes -= nb
                self.meta_bytes -= nb

    def _evict(self) -> None:
        d = self._d
        while self.bytes > self.limit and len(d) > 1:
            k, old = d.popitem(last=False)
            j = k[1]
            if j >= 0:
                self.bytes -= old.nbytes
                aux = self._aux.pop(k, None)
                if aux is not None:
                    self.bytes -= aux.nbytes
                continue
            nb = self._meta.pop(k)
            self.bytes -= nb
            self.meta_bytes -= nb
            if j == _INDEX:
                old._index_evicted()
            else:
                old._filter_evicted()

    def get_aux(self, key: tuple[str, int]) -> np.ndarray[Any, np.dtype[np.int64]] | None:
        return self._aux.get(key)

    def put_aux(self, key: tuple[str, int], a: np.ndarray[Any, np.dtype[np.int64]]) -> None:
        """Derived data of a cached block (dropped with it)."""
        if key in self._d:
            self._aux[key] = a
            self.bytes += a.nbytes
            self._evict()

    def clear(self) -> None:
        for k, v in self._d.items():
            if k[1] == _INDEX:
                v._index_evicted()
            elif k[1] == _FILTER:
                v._filter_evicted()
        self._d.clear()
        self._aux.clear()
        self._meta.clear()
        self.bytes = 0
        self.meta_bytes = 0


def encode_manifest(body: dict[str, Any]) -> bytes:
    """``MANIFEST`` bytes: fixed header (magic, version, length, crc32) + msgpack body."""
    return _framed_manifest(msgpack.packb(body))


def _framed_manifest(b: bytes) -> bytes:
    return _MHEADER.pack(MANIFEST_MAGIC, MANIFEST_VERSION, len(b), _crc(b)) + b


def decode_manifest(raw: bytes, path: str) -> dict[str, Any]:
    if len(raw) < _MHEADER.size:
        raise MapCorruption(path, "short manifest")
    magic, ver, ln, crc = _MHEADER.unpack(raw[: _MHEADER.size])
    if magic != MANIFEST_MAGIC:
        raise MapCorruption(path, "bad manifest magic")
    if ver != MANIFEST_VERSION:
        raise MapCorruption(path, f"unknown manifest version {ver}")
    body = raw[_MHEADER.size :]
    if len(body) != ln or _crc(body) != crc:
        raise MapCorruption(path, "manifest checksum mismatch")
    try:
        d = msgpack.unpackb(body)
        if not isinstance(d, dict):
            raise ValueError("not a map")
        for key in ("gen", "sealed_seq", "fanout", "full_every", "epochs", "maps"):
            if key not in d:
                raise ValueError(f"missing {key}")
    except Exception as e:
        raise MapCorruption(path, f"bad manifest body: {e}") from None
    return d


#: optional manifest keys written by MapHistory.retain (see FORMATS.md ("Delta maps"))
RETAIN_KEYS = ("retained", "keep_after", "retain_gen")


def encode_head(gen: int, sealed_seq: int, head: Columns) -> bytes:
    """``HEAD``'s bytes: a 48-byte header, then the five columns as little-endian i64
    (all starts, then all ends, seqs, locs, poffs)."""
    body = b"".join(np.ascontiguousarray(c, dtype="<i8").tobytes() for c in head)
    hdr = HEAD_HEADER.pack(HEAD_MAGIC, HEAD_VERSION, 0, gen, sealed_seq, head.n,
                           zlib.crc32(body), 0)
    return hdr[:-4] + struct.pack("<I", zlib.crc32(hdr[:-4])) + body


def decode_head(data: bytes, gen: int, sealed_seq: int) -> Columns | None:
    """The columns of ``HEAD`` bytes when whole and tagged (*gen*, *sealed_seq*), else
    None."""
    n_hdr = HEAD_HEADER.size
    if len(data) < n_hdr:
        return None
    magic, ver, _res, g, sealed, n, bcrc, hcrc = HEAD_HEADER.unpack_from(data)
    if (magic != HEAD_MAGIC or ver != HEAD_VERSION or hcrc != zlib.crc32(data[: n_hdr - 4])
            or g != gen or sealed != sealed_seq or len(data) != n_hdr + 40 * n):
        return None
    body = memoryview(data)[n_hdr:]
    if zlib.crc32(body) != bcrc:
        return None
    cols = [np.frombuffer(body, dtype="<i8", count=n, offset=8 * n * i).astype(np.int64)
            for i in range(5)]
    return Columns(*cols)


class DirStore:
    """Maps as files in one directory plus its ``MANIFEST``."""

    def __init__(self, directory: str, cache_bytes: int, fs: FileOps,
                 readonly: bool = False) -> None:
        self.dir = directory
        self.fs = fs
        self.readonly = readonly
        self.cache = BlockCache(cache_bytes)
        self.files: dict[str, MapFile] = {}
        self.gen = 0
        # msgpack bytes of each manifest row, by (name, kind, level, epoch, index): a
        # commit packs only the rows it has not packed before
        self._rows: dict[tuple[Any, ...], tuple[MapFile, bytes]] = {}
        # deferred durability (module notes): map files written by put(defer=True) not
        # yet handed to a commit, the writer thread, its newest job, its first failure
        self._unsynced: list[str] = []
        self._writer: ThreadPoolExecutor | None = None
        self._pending: Future[None] | None = None
        self._submitted = 0  # deferred commits handed to the writer thread so far
        self._finished = 0  # ... and of those, ended (either way)
        self._failed: BaseException | None = None
        #: called (from the writer thread) with the error when a deferred commit fails
        self.on_failure: Callable[[BaseException], None] | None = None

    @classmethod
    def open(
        cls, directory: str, cache_bytes: int, fs: FileOps | None = None,
        readonly: bool = False,
    ) -> tuple[DirStore, dict[str, Any] | None]:
        """Read the manifest (if any) and delete files it does not name.

        ``readonly``: create and delete nothing, and refuse every write later
        (:class:`MapUsageError`); for inspecting a history another process may own.

        Runtime complexity: O(files in the directory).
        """
        if not readonly:
            os.makedirs(directory, exist_ok=True)
        st = cls(directory, cache_bytes, fs or FileOps(), readonly)
        path = os.path.join(directory, MANIFEST)
        state: dict[str, Any] | None = None
        if os.path.exists(path):
            body = decode_manifest(st.fs.read(path), path)
            st.gen = int(body["gen"])
            refs: dict[str, MapFile] = {}
            maps = []
            try:
                for name, kind, level, ei, idx, lo, hi, n, size in body["maps"]:
                    p = os.path.join(directory, name)
                    try:
                        got = os.stat(p).st_size  # one stat a map: O(M) at open
                    except FileNotFoundError:
                        raise MapCorruption(p, "named by the manifest but missing") from None
                    if got != size:
                        raise MapCorruption(p, f"size {got} != manifest {size}")
                    flat = kind == "F" or level > 0
                    refs[name] = MapFile(p, name, kind, lo, hi, n, flat, size, st.cache, st.fs)
                    maps.append((name, kind, level, ei, idx))
                state = {
                    **{k: body[k] for k in RETAIN_KEYS if k in body},
                    "sealed_seq": int(body["sealed_seq"]),
                    "fanout": int(body["fanout"]),
                    "full_every": int(body["full_every"]),
                    "epochs": [(int(r), int(t)) for r, t in body["epochs"]],
                    "maps": maps,
                    "refs": refs,
                }
            except (TypeError, ValueError) as e:
                raise MapCorruption(path, f"bad manifest entry: {e}") from None
            st.files = refs
        if readonly:
            return st, state
        if state is None and os.path.exists(os.path.join(directory, HEAD)):
            st.fs.remove(os.path.join(directory, HEAD))  # of no manifest this store has
        for f in st.fs.listdir(directory):
            if (f.endswith(".map") or f.endswith(".tmp")) and f not in st.files:
                st.fs.remove(os.path.join(directory, f))
        return st, state

    def put(self, kind: str, level: int, m: DeltaMap, tag: str = "",
            register: bool = True, defer: bool = False) -> MapFile:
        """Write a map file. ``register=False`` (any thread): the file is written and its
        offset filter computed, but the store's shared state (files, cache accounting)
        is only updated by :meth:`adopt` on the owner thread. ``defer`` (owner thread):
        written and renamed without an fsync; the next ``commit(defer=True)`` has the
        writer thread make it durable before its manifest (module notes)."""
        self._writable()
        name = map_name(kind, level, m.lo, m.hi, tag)
        data = encode_map(m, kind, level)
        if defer and register:
            self.fs.write_unsynced(self.dir, name, data)
            self._unsynced.append(name)
        else:
            self.fs.write_atomic(self.dir, name, data, forget=register)
        mf = MapFile(
            os.path.join(self.dir, name),
            name,
            kind,
            m.lo,
            m.hi,
            m.cols.n,
            m.flat,
            len(data),
            self.cache,
            self.fs,
        )
        if not register:
            if m.cols.n <= FILTER_MAX_ENTRIES:
                mf._filt = offset_filter(m.cols)  # accounted (or dropped) by adopt
            return mf
        mf.set_filter(m.cols)
        self.files[name] = mf
        return mf

    def _writable(self) -> None:
        if self.readonly:
            raise MapUsageError(f"{self.dir}: maps opened read-only")
        if self._failed is not None:
            raise MapUsageError(f"{self.dir}: a deferred map write failed: {self._failed}")

    def adopt(self, refs: list[Any]) -> None:
        """Register maps written with ``register=False`` (owner thread)."""
        for mf in refs:
            self.files[mf.name] = mf
            mf._filt_done = True
            mf._cache_filter()

    def commit(self, state: dict[str, Any], defer: bool = False) -> None:
        """Replace the manifest atomically with one naming ``state["maps"]``.

        The bytes are those of :func:`encode_manifest` of the body; rows packed by an
        earlier commit are reused. Runtime complexity: O(M) dictionary look-ups for M
        maps, plus packing the new rows. ``defer``: the manifest is packed here and
        written by the writer thread after it made the map files of the deferred puts
        durable (:attr:`pending`; module notes); else this thread waits for pending
        jobs first, then writes it.
        """
        self._writable()
        if not defer:
            self.flush()
        old = self._rows
        rows: dict[tuple[Any, ...], tuple[MapFile, bytes]] = {}
        parts: list[bytes] = []
        pack = msgpack.packb
        files = self.files
        for key in state["maps"]:
            key = tuple(key)
            f = files[key[0]]
            hit = old.get(key)
            if hit is not None and hit[0] is f:
                b = hit[1]
            else:
                name, kind, level, ei, idx = key
                b = pack([name, kind, level, ei, idx, f.lo, f.hi, f.n, f.size])
            rows[key] = (f, b)
            parts.append(b)
        items: list[tuple[str, Any]] = [
            ("gen", self.gen + 1),
            ("sealed_seq", state["sealed_seq"]),
            ("fanout", state["fanout"]),
            ("full_every", state["full_every"]),
            ("epochs", [list(e) for e in state["epochs"]]),
            ("maps", None),
        ]
        items += [(k, state[k]) for k in RETAIN_KEYS if k in state]
        pk = msgpack.Packer()
        out = [pk.pack_map_header(len(items))]
        for k, v in items:
            out.append(pack(k))
            if k == "maps":
                out.append(pk.pack_array_header(len(parts)))
                out.extend(parts)
            else:
                out.append(pack(v))
        data = _framed_manifest(b"".join(out))
        if defer:
            names, self._unsynced = self._unsynced, []
            if self._writer is None:
                self._writer = ThreadPoolExecutor(1, thread_name_prefix="map-writer")
            self._submitted += 1
            self._pending = self._writer.submit(self._persist, names, data, self._submitted)
        else:
            if self._unsynced:  # deferred puts without their deferred commit
                self.fs.sync_files(self.dir, self._unsynced)
                self._unsynced = []
            self.fs.write_atomic(self.dir, MANIFEST, data)
        self._rows = rows
        self.gen += 1

    def _persist(self, names: list[str], manifest: bytes, job: int) -> None:
        """The writer thread's job for one deferred commit: its map files durable, then
        the manifest naming them. Jobs run one at a time, in commit order; a job with a
        newer one queued behind it leaves the manifest to that one (which names its
        files too: only a commit that is not deferred removes files from a manifest,
        and it waits for the jobs first), so a backlog writes one manifest."""
        try:
            if self._failed is not None:  # an earlier job failed: write nothing after it
                raise MapUsageError(f"{self.dir}: a deferred map write failed: "
                                    f"{self._failed}")
            try:
                if names:
                    self.fs.sync_files(self.dir, names)
                if job == self._submitted:
                    # forget=False: the descriptor cache belongs to the owner thread (and
                    # never holds the manifest, which is read whole)
                    self.fs.write_atomic(self.dir, MANIFEST, manifest, forget=False)
            except BaseException as e:
                self._failed = e
                if self.on_failure is not None:
                    self.on_failure(e)
                raise
        finally:
            self._finished += 1

    @property
    def pending_jobs(self) -> int:
        """Deferred commits handed to the writer thread that have not ended."""
        return self._submitted - self._finished

    @property
    def pending(self) -> Future[None] | None:
        """The newest deferred commit's job while it runs (or waits), else None. Jobs
        run in order, so once it is done every earlier one is too."""
        p = self._pending
        if p is not None and p.done() and p.exception() is None:
            self._pending = p = None
        return p

    def flush(self) -> None:
        """Block until every deferred commit is durable; raise what failed (then the
        store refuses writes: reopen). Cost: the pending jobs' fsyncs, if any."""
        p = self._pending
        if p is not None:
            p.result()
            self._pending = None
        if self._failed is not None:
            raise MapUsageError(f"{self.dir}: a deferred map write failed: {self._failed}")

    def drop(self, names: list[str]) -> None:
        """Delete map files no longer named by the (already committed) manifest.

        A crash before or during this only leaves files the next open deletes.
        """
        self.remove(self.unregister(names))

    def unregister(self, names: list[str]) -> list[str]:
        """Forget map files (owner thread); returns their paths for :meth:`remove`."""
        out = []
        for name in names:
            f = self.files.pop(name, None)
            if f is None:
                continue
            f.drop_filter()
            self.fs.forget(f.path)
            out.append(f.path)
        return out

    def remove(self, paths: list[str]) -> None:
        """Delete unregistered map files (any thread: their descriptors are closed)."""
        if paths:
            self._writable()
        for p in paths:
            try:
                self.fs.remove(p)
            except FileNotFoundError:
                pass

    def disk_bytes(self) -> int:
        return sum(f.size for f in self.files.values())

    def cache_bytes(self) -> int:
        return self.cache.bytes

    def close(self) -> None:
        """Wait for the deferred commits (their errors are left to the caller's earlier
        calls: a history refuses writes after one), then release files and caches."""
        try:
            if self._pending is not None:
                self._pending.exception()  # waits; what it raised was reported
                self._pending = None
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self.cache.clear()
            self.fs.close_all()

    def save_head(self, head: Columns, sealed_seq: int) -> None:
        """Write ``HEAD``: *head* tagged with the manifest's generation and
        ``sealed_seq`` (FORMATS.md "HEAD"). Derived data: a failure is ignored (the next
        open rebuilds). Cost: 40 bytes per head entry written once, one fsync."""
        if self.readonly:
            return
        try:
            self.fs.write_atomic(self.dir, HEAD, encode_head(self.gen, sealed_seq, head))
        except OSError:
            pass

    def take_head(self, sealed_seq: int) -> Columns | None:
        """The head in ``HEAD`` when it is whole (both CRCs) and tagged with this
        manifest's generation and *sealed_seq*, else None; the file is removed either
        way (unless read-only), so no later state of the maps can meet it. Cost: one
        read of the file and its CRC (no map decoding)."""
        path = os.path.join(self.dir, HEAD)
        try:
            data = self.fs.read(path)
        except FileNotFoundError:
            return None
        if not self.readonly:
            self.fs.remove(path)
        return decode_head(data, self.gen, sealed_seq)
