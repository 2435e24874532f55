"""The catalog's cdpctl operations (same signature as every operation; registered in :mod:`cdp.ops`): ``files``,
``file_versions``, ``find``, ``restore``, ``files_diff``, ``file_systems``. All only read
the volume, so they also run offline on a stopped store. NTFS and ext2/3/4 alike; only
``restore`` reads the file system itself (per the partition's ``fs``).

Names: the catalog holds NTFS names in their stored form (:mod:`cdp.ntfs.names`, which
keeps lone surrogates); these operations take and return exact names, converting at
this boundary (paths and patterns in, ``path``/``dir``/``name``/stream names out).

Design notes
------------
- **Restore over tiered history.** The file system parsers and ``FileBytes.pieces`` read
  synchronously. When the volume has an S3 tier (which may drop local copies of its
  history at any time), :func:`open_file` and the piece loop of :func:`restore` run in a worker thread
  of their own (``_TIER_READERS``) with a reader that hands each read to the event loop
  as :meth:`~cdp.volume.Volume.read_async` (fetch the records missing, then read): the
  journal is still touched on the loop only, GETs and cache writes never are. A volume
  without a tier takes the plain path (no thread, no hop). The pool is not asyncio's
  default executor, which the fetches themselves use: a restore waiting on a fetch can
  never hold the fetch's thread. Every consumer of a file's bytes on the loop (the
  ``restore`` operation, the web console's download and its tar of a directory) takes
  them through :meth:`FileBytes.async_pieces`, which runs each step of ``pieces`` there.
"""

from __future__ import annotations

import asyncio
import fnmatch
import os
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol

from cdp.catalog.indexer import View
from cdp.catalog.model import Entry, join, split
from cdp.catalog.service import reader_at, service_for
from cdp.errors import NotFound, UsageError
from cdp.ext4.fs import Ext4
from cdp.ntfs.attribute import DataStream
from cdp.ntfs.mft import NtfsVolume
from cdp.ntfs.names import exact, shown, stored
from cdp.ntfs.runlist import read_runs
from cdp.outputs import (
    ON_ERROR,
    DamageMap,
    commit_partial,
    discard_partial,
    on_error_arg,
    open_partial,
    salvage_read,
    set_size,
    write_at,
)
from cdp.points import point_arg
from cdp.progress import Progress
from cdp.store import Store
from cdp.volume import Volume

#: worker threads that run restores of tiered history (see the module notes)
_TIER_READERS = ThreadPoolExecutor(4, thread_name_prefix="cdp-tier-restore")


def _tiered(vol: Volume) -> bool:
    """True when *vol* has an S3 tier that can fetch history (and so may drop its local
    copies at any time)."""
    return vol.journal.remote is not None


def tier_reader_at(vol: Volume, seq: int) -> Callable[[int, int], bytes]:
    """:func:`reader_at` for a worker thread: each read runs on the event loop as
    :meth:`Volume.read_async` (fetching records only the S3 tier holds) and the thread
    waits for it; called on the loop itself it reads directly (NotLocal possible).
    Create it on the loop. Cost per read: two thread hand-offs plus the read."""
    loop = asyncio.get_running_loop()
    on_loop = threading.get_ident()
    direct: Callable[[int, int], bytes] = reader_at(vol, seq)
    size = vol.size

    def read(offset: int, length: int) -> bytes:
        if threading.get_ident() == on_loop:
            return direct(offset, length)
        if offset >= size or length <= 0:
            return bytes(max(length, 0))
        n = min(length, size - offset)
        data: bytes = asyncio.run_coroutine_threadsafe(
            vol.read_async(offset, n, seq), loop).result()
        return data if n == length else data + bytes(length - n)

    return read


def _header(vol_name: str, point: str, view: View) -> dict[str, Any]:
    return {
        "volume": vol_name, "at": point, "seq": view.seq,
        "version": view.version, "from_catalog": view.computed is None,
        "ntfs": sum(1 for p in view.parts if p.get("fs", "ntfs") == "ntfs"),
        "fs": [p.get("fs", "ntfs") for p in view.parts], "note": view.note,
    }


_NAME_KEYS = ("path", "dir", "name", "new_path")


def _exact_row(row: dict[str, Any]) -> dict[str, Any]:
    """*row* with its names in exact form (a no-op for ordinary names). Cost: one
    ``isascii`` for a row whose path is ASCII (its directory and name are then too)."""
    path = row.get("path")
    if not (type(path) is str and path.isascii()) or "new_path" in row:
        for k in _NAME_KEYS:
            v = row.get(k)
            if isinstance(v, str):
                row[k] = exact(v)
    for st in row.get("streams") or ():
        if isinstance(st, dict) and isinstance(st.get("name"), str):
            st["name"] = exact(st["name"])
    return row


def _part_dirs(view: View) -> list[dict[str, Any]]:
    return [{"path": "/" + p["name"], "dir": "/", "name": p["name"], "type": "dir", "size": 0,
             "partition": True} for p in view.parts if p["name"]]


async def files(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """List a directory (or one file) as of a point; ``recursive`` lists the subtree.
    Cost: at a catalogued marker one index scan; elsewhere plus an MFT diff."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    view = await service_for(vol).view(point)
    path = "/" + stored(args.get("path") or "/").strip("/")
    out = _header(vol.name, point, view)
    out["path"] = exact(path)
    if args.get("recursive"):
        rows = [e.to_dict() for e in view.walk(path)]
        if path == "/":
            rows = _part_dirs(view) + rows
    else:
        rows = [e.to_dict() for e in view.list_dir(path)]
        if path == "/":
            rows = _part_dirs(view) + rows
        elif not rows:
            d, n = split(path)
            e = view.lookup(d, n)
            if e is not None and not e.is_dir:
                rows = [e.to_dict()]
            elif e is None and not any(p["name"] == n and d == "/" for p in view.parts):
                raise NotFound(f"{shown(exact(path))}: no such file or directory at {point}")
    out["entries"] = [_exact_row(r) for r in rows]
    return out


async def file_versions(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Every catalogued version of a path with its time span; without a path, the
    catalogued markers. Cost: one index lookup."""
    vol = store.volume(args.get("volume"))
    svc = service_for(vol)
    cat = svc.catalog
    versions = {v.version: v for v in cat.versions()}
    if not args.get("path"):
        return {"volume": vol.name, "versions": [v.to_dict() for v in versions.values()],
                "last_error": svc.last_error}
    d, n = split(stored(args["path"]))
    rows = []
    for e in cat.history(d, n):
        end_v = versions.get(e.end)
        state = "current" if e.end == 0 else ("replaced" if e.ref == e.end else "deleted")
        r = e.to_dict()
        r.update({
            "from_marker": f"marker{e.start}", "from_ns": e.backup_ns,
            "to_marker": f"marker{e.end}" if e.end else None,
            "to_ns": end_v.time_ns if end_v else None, "state": state,
        })
        rows.append(_exact_row(r))
    if not rows:
        raise NotFound(f"{shown(args['path'])}: never catalogued on volume {vol.name}")
    return {"volume": vol.name, "path": exact(join(d, n)), "versions": rows}


async def find(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Glob over names (or whole paths when the pattern has a ``/``), case-insensitive;
    every version unless ``at``. A path pattern is anchored at the root: ``reports/*/q3*``
    means ``/reports/*/q3*`` (as a ``.gitignore`` pattern with a ``/`` in it is anchored
    at its directory); ``**`` is not special, but ``*`` crosses ``/``, so ``*/q3*``
    matches in every directory below the root. Cost: a scan of the catalog."""
    vol = store.volume(args.get("volume"))
    pattern = stored(args["pattern"])
    on_path = "/" in pattern
    if on_path and not pattern.startswith("/"):
        pattern = "/" + pattern
    svc = service_for(vol)
    if args.get("at"):
        view = await svc.view(args["at"])
        pat = pattern.lower()
        rows = [_exact_row(e.to_dict()) for e in view.walk("/")
                if fnmatch.fnmatchcase((e.path if on_path else e.name).lower(), pat)]
        return {**_header(vol.name, args["at"], view), "pattern": exact(pattern), "entries": rows}
    rows = [_exact_row(e.to_dict()) for e in svc.catalog.glob(pattern, on_path=on_path)]
    return {"volume": vol.name, "pattern": exact(pattern), "entries": rows}


class Pieces(Protocol):
    """``FileBytes.pieces``: see :class:`FileBytes`."""

    def __call__(self, on_error: str = "stop",
                 damage: DamageMap | None = None) -> Iterator[tuple[int, bytes]]: ...


@dataclass
class FileBytes:
    """A file (one stream) as of a point, ready to be read: what :func:`open_file`
    found. ``pieces(on_error, damage)`` yields ``(file offset, bytes)`` in order, each at
    most 4 MiB of stored data (sparse runs as zeros), so a reader of any size file holds
    one piece. With ``on_error="stop"`` data failing its checksum raises
    :class:`~cdp.errors.Corruption`; otherwise each damaged piece (to the 4 KiB granule)
    reads as zeros and is added to *damage* (file offsets; volume offsets as
    ``source_offset``). ``path`` and ``stream`` are exact names."""

    volume: str
    point: str
    seq: int
    path: str
    stream: str
    size: int
    record: int
    mtime: int
    atime: int
    pieces: Pieces
    #: read through :func:`tier_reader_at`: ``pieces`` must run off the event loop
    tiered: bool = False

    async def async_pieces(self, on_error: str = "stop",
                           damage: DamageMap | None = None) -> AsyncIterator[tuple[int, bytes]]:
        """``pieces(on_error, damage)`` for a consumer on the event loop: over tiered
        history each piece is made in a worker thread (``_TIER_READERS``) whose reads
        fetch what the S3 tier holds on the loop (see the module notes); otherwise
        directly. Memory: one piece. Cost per piece when tiered: one thread hand-off."""
        pieces = iter(self.pieces(on_error, damage))
        if not self.tiered:
            for got in pieces:
                yield got
            return
        loop = asyncio.get_running_loop()

        def step() -> tuple[int, bytes] | None:
            return next(pieces, None)

        while (piece := await loop.run_in_executor(_TIER_READERS, step)) is not None:
            yield piece

    def result(self, output: str | None = None) -> dict[str, Any]:
        """The ``restore`` operation's result for these bytes."""
        return {"volume": self.volume, "at": self.point, "seq": self.seq, "path": self.path,
                "stream": self.stream or None, "output": output, "size": self.size,
                "record": self.record, "modified_ns": self.mtime}


async def open_file(store: Store, args: dict[str, Any]) -> FileBytes:
    """The bytes of ``path`` (``stream``: an alternate data stream) on ``volume`` as of
    ``at``: the record is re-read at that point and its runlist (or resident bytes)
    followed. ``path`` is taken literally (a name may hold ``:``, spaces, newlines, a
    leading ``-``). NotFound for a missing file, UsageError for a directory. Cost: one
    view and one record read; the bytes are read by ``pieces()``."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    svc = service_for(vol)
    view = await svc.view(point)
    path = args["path"]  # exact, for messages
    stream_name = stored(str(args.get("stream") or ""))
    d, n = split(stored(path))
    e = view.lookup(d, n)
    if e is None:
        raise NotFound(f"{shown(path)}: no such file at {point}")
    if e.is_dir:
        raise UsageError(f"{shown(path)} is a directory; restore takes files")
    if _tiered(vol):  # tiered history: parse in a worker thread, reads fetch on the loop
        f = await asyncio.get_running_loop().run_in_executor(
            _TIER_READERS, _file_of, vol.name, point, view, tier_reader_at(vol, view.seq), e,
            join(d, n), stream_name)
        f.tiered = True
        return f
    return _file_of(vol.name, point, view, tier_reader_at(vol, view.seq), e, join(d, n),
                    stream_name)


def _file_of(vol_name: str, point: str, view: View, read: Callable[[int, int], bytes],
             e: Entry, path: str, stream_name: str = "") -> FileBytes:
    """:class:`FileBytes` of catalog entry *e* (named *path*, stored form) in *view*,
    read through *read*."""
    shown_path = shown(exact(path))
    part = next((p for p in view.parts if p["name"] == e.part), None)
    if part is None:
        raise NotFound(f"{shown_path}: its file system is not on the volume at {point}")
    if part.get("fs", "ntfs") != "ntfs":
        if stream_name:
            raise UsageError(f"{shown_path}: ext file systems have no alternate data streams")
        return _ext_file_of(vol_name, point, view.seq, read, part, e, path)
    nv = NtfsVolume(read, part["offset"], part["size"])
    rec = nv.read_records([e.record]).get(e.record)
    stream: DataStream | None
    if rec is not None and rec.in_use and not rec.damaged and rec.sequence == e.seq:
        stream = rec.data if not stream_name else next(
            (s for s in rec.streams if s.name == stream_name), None)
    elif not stream_name:
        stream = e.stream()  # the record is damaged at this point: use the catalog's copy
    else:
        stream = None
    if stream is None:
        what = f"stream {exact(stream_name)!r}" if stream_name else "data"
        raise NotFound(f"{shown_path}: no {what} at {point}")
    if not stream.resident and (stream.compressed or stream.encrypted):
        raise UsageError(f"{shown_path}: compressed or encrypted streams cannot be restored yet")
    st = stream
    base = part["offset"]

    def pieces(on_error: str = "stop", damage: DamageMap | None = None) -> Iterator[tuple[int, bytes]]:
        if st.resident:
            if st.size:
                yield 0, bytes((st.content or b"")[: st.size])
            return
        runs = st.runs(nv.max_lcn)
        if on_error == "stop" or damage is None:
            yield from read_runs(nv.read, runs, nv.cluster_size, st.size)
            return
        pending = DamageMap()  # of the current piece, offsets relative to it

        def salvaging(offset: int, length: int) -> bytes:
            return salvage_read(read, offset, length, 0, pending)

        for off, piece in read_runs(salvaging, runs, nv.cluster_size, st.size, base=base):
            for r in pending.ranges:
                damage.add(off + r["offset"], r["length"], r["source_offset"], r["reason"])
            pending.ranges.clear()
            yield off, piece

    return FileBytes(vol_name, point, view.seq, exact(path), exact(stream_name), stream.size,
                     e.record, e.mtime, e.atime, pieces)


def _ext_file_of(vol_name: str, point: str, seq: int, read: Callable[[int, int], bytes],
                 part: dict[str, Any], e: Entry, path: str) -> FileBytes:
    """:class:`FileBytes` from ext2/3/4: inode ``e.record`` re-read at the point (its
    generation must be the catalogued one); its extents or block map followed, holes
    and uninitialised extents read as zeros; inline data and symlink targets come from
    the inode. Cost: one inode read; ``pieces()`` reads each run once (4 MiB a read)."""
    fs = Ext4(read, part["offset"], part["size"])
    ino = fs.read_inodes([e.record]).get(e.record)
    if ino is None or ino.damaged or not ino.in_use or ino.generation != e.seq:
        why = ino.damaged if ino is not None and ino.damaged else "not the catalogued file"
        raise NotFound(f"{shown(exact(path))}: inode {e.record} at {point}: {why}")
    size = ino.size
    chunk = 4 << 20

    def zeros(n: int) -> Iterator[bytes]:
        while n > 0:
            k = min(chunk, n)
            yield bytes(k)
            n -= k

    def pieces(on_error: str = "stop", damage: DamageMap | None = None) -> Iterator[tuple[int, bytes]]:
        if ino.has_inline_data or ino.is_symlink or not (ino.is_reg or ino.is_dir):
            if size:
                yield 0, fs.read_file(ino)
            return
        pos = 0
        for r in fs.file_runs(ino):
            if r.file_off > pos:  # a hole
                for z in zeros(r.file_off - pos):
                    yield pos, z
                    pos += len(z)
            if r.uninit:
                for z in zeros(r.length):
                    yield pos, z
                    pos += len(z)
                continue
            for o in range(0, r.length, chunk):
                n = min(chunk, r.length - o)
                if on_error == "stop" or damage is None:
                    piece = read(r.vol_off + o, n)
                else:
                    piece = salvage_read(read, r.vol_off + o, n, r.file_off + o, damage)
                yield r.file_off + o, piece
            pos = r.file_off + r.length
        for z in zeros(size - pos):
            yield pos, z
            pos += len(z)

    return FileBytes(vol_name, point, seq, exact(path), "", size, e.record, e.mtime, e.atime,
                     pieces)


async def open_tree(store: Store, args: dict[str, Any]) -> tuple[str, list[FileBytes | Entry]]:
    """The directory ``path`` on ``volume`` as of ``at``, for a tar stream: (its path,
    its subtree in walk order: a :class:`FileBytes` per file whose data can be read, the
    :class:`Entry` of each directory). Files that cannot be read (compressed, no data)
    are left out. Cost: one walk of the subtree and one record read per file (over
    tiered history in a worker thread, as :func:`open_file`)."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    view = await service_for(vol).view(point)
    path = "/" + stored(args.get("path") or "/").strip("/")
    walked = view.walk(path)  # the catalog is read on the loop, the volume maybe not
    tiered = _tiered(vol)
    read = tier_reader_at(vol, view.seq) if tiered else reader_at(vol, view.seq)

    def files() -> list[FileBytes | Entry]:
        out: list[FileBytes | Entry] = []
        for e in walked:
            if e.is_dir:
                out.append(e)
                continue
            try:
                f = _file_of(vol.name, point, view, read, e, e.path)
            except (NotFound, UsageError):
                continue
            f.tiered = tiered
            out.append(f)
        return out

    if tiered:
        return exact(path), await asyncio.get_running_loop().run_in_executor(_TIER_READERS, files)
    return exact(path), files()


async def restore(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Write a file's bytes as of a point to ``output`` (:func:`open_file`): sparse runs
    become holes, the size is exact, modification/access times are set. Cost: O(file
    size) reads.

    ``on_error`` for data that fails its checksum: ``stop`` (default) ends at once;
    ``zero`` writes zeros for each damaged piece (to the 4 KiB granule) and goes on;
    ``skip-file`` reads on to find every damaged piece, then leaves the file unwritten
    (``skipped``). ``damaged`` lists the ranges (file offsets, and volume offsets as
    ``source_offset``)."""
    on_error = on_error_arg(args, ON_ERROR)
    out_path = args.get("output")
    if not out_path or out_path == "-":
        raise UsageError("restore needs an output file (-o FILE)")
    f = await open_file(store, args)
    damage = DamageMap()
    out = os.path.abspath(out_path)
    fd, tmp = open_partial(out)
    written = 0
    try:
        set_size(fd, f.size, out)
        async for off, piece in f.async_pieces(on_error, damage):
            if piece.count(0) != len(piece):
                write_at(fd, piece, off, out)
            written += len(piece)
            progress(written, f.size, "restore")
        if f.mtime:
            os.utime(tmp, ns=(f.atime or f.mtime, f.mtime))
    except BaseException:
        discard_partial(fd, tmp)
        raise
    skipped = on_error == "skip-file" and bool(damage.ranges)
    if skipped:
        discard_partial(fd, tmp)
    else:
        commit_partial(fd, tmp, out)
    return {**f.result(out), "on_error": on_error, "skipped": skipped,
            "damaged": damage.ranges, "damaged_bytes": damage.bytes}


async def file_systems(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """The file systems each volume held at its newest catalogued marker (what
    ``cdpctl status`` shows): ``[{"volume", "marker", "fs": [{"name", "fs"}]}]``.
    Cost: one catalog query per volume."""
    names = args.get("volumes") or sorted(store.volumes)
    out: list[dict[str, Any]] = []
    for name in names:
        vol = store.volume(name)
        last = service_for(vol).catalog.last_version()
        out.append({"volume": vol.name, "marker": f"marker{last.version}" if last else None,
                    "fs": [{"name": p["name"], "fs": p.get("fs", "ntfs")} for p in last.parts]
                    if last else []})
    return out


def _classify(a: list[Entry], b: list[Entry]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def row(change: str, e: Entry, **kw: Any) -> dict[str, Any]:
        return {"change": change, "path": e.path, "type": "dir" if e.is_dir else "file",
                "record": e.record, **kw}

    if a and b and a[0].seq == b[0].seq:
        pa = {x.path: x for x in a}
        pb = {x.path: x for x in b}
        for p in sorted(set(pa) & set(pb)):
            x, y = pa[p], pb[p]
            if not x.same_state(y) or x.streams != y.streams:
                rows.append(row("modified", y, size_before=x.size, size_after=y.size))
        gone = sorted(set(pa) - set(pb))
        came = sorted(set(pb) - set(pa))
        while gone and came:
            x, y = pa[gone.pop(0)], pb[came.pop(0)]
            rows.append(row("renamed", x, new_path=y.path, size_before=x.size, size_after=y.size))
        rows += [row("deleted", pa[p], size_before=pa[p].size) for p in gone]
        rows += [row("added", pb[p], size_after=pb[p].size) for p in came]
        return rows
    rows += [row("deleted", x, size_before=x.size) for x in a]
    rows += [row("added", y, size_after=y.size) for y in b]
    return rows


async def files_diff(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Files added / modified / deleted / renamed between two points (like ``zfs
    diff``). Cost: O(entries that changed between the points)."""
    vol = store.volume(args.get("volume"))
    svc = service_for(vol)
    va = await svc.view(args["from"])
    vb = await svc.view(args["to"])
    cand = svc.catalog.changed_between(va.version or 0, vb.version or 0)
    cand |= va.overlay_records() | vb.overlay_records()
    by_part: dict[str, set[int]] = {}
    for part, rec in cand:
        by_part.setdefault(part, set()).add(rec)
    rows: list[dict[str, Any]] = []
    for part, recs in sorted(by_part.items()):
        ea = va.entries_of(part, recs)
        eb = vb.entries_of(part, recs)
        for r in sorted(set(ea) | set(eb)):
            rows += _classify(ea.get(r, []), eb.get(r, []))
    rows.sort(key=lambda r: (r["path"], r["change"]))
    rows = [_exact_row(r) for r in rows]
    return {"volume": vol.name, "from": args["from"], "to": args["to"],
            "from_seq": va.seq, "to_seq": vb.seq, "changes": rows}


OPS: dict[str, Callable[[Store, dict[str, Any], Progress], Awaitable[Any]]] = {
    "files": files,
    "file_versions": file_versions,
    "find": find,
    "restore": restore,
    "files_diff": files_diff,
    "file_systems": file_systems,
}
#: all of them only read the store
OFFLINE_OPS = frozenset(OPS)
