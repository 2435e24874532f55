"""The catalog's cdpctl operations (same signature as every operation; registered in :mod:`cdp.ops`): ``files``,
``file_versions``, ``find``, ``restore``, ``files_diff``, ``file_systems``. All only read
the volume, so they also run offline on a stopped store. NTFS and ext2/3/4 alike; only
``restore`` reads the file system itself (per the partition's ``fs``)."""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Awaitable, Callable
from typing import Any

from cdp.catalog.indexer import View
from cdp.catalog.model import Entry, join, split
from cdp.catalog.service import reader_at, service_for
from cdp.errors import Corruption, NotFound, UsageError
from cdp.ext4.fs import Ext4
from cdp.ntfs.attribute import DataStream
from cdp.ntfs.mft import NtfsVolume
from cdp.ntfs.runlist import read_runs
from cdp.outputs import commit_partial, discard_partial, open_partial, set_size, write_at
from cdp.points import point_arg
from cdp.progress import Progress
from cdp.store import Store


def _header(vol_name: str, point: str, view: View) -> dict[str, Any]:
    return {
        "volume": vol_name, "at": point, "seq": view.seq,
        "version": view.version, "from_catalog": view.computed is None,
        "ntfs": sum(1 for p in view.parts if p.get("fs", "ntfs") == "ntfs"),
        "fs": [p.get("fs", "ntfs") for p in view.parts], "note": view.note,
    }


def _part_dirs(view: View) -> list[dict[str, Any]]:
    return [{"path": "/" + p["name"], "dir": "/", "name": p["name"], "type": "dir", "size": 0,
             "partition": True} for p in view.parts if p["name"]]


async def files(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """List a directory (or one file) as of a point; ``recursive`` lists the subtree.
    Cost: at a catalogued marker one index scan; elsewhere plus an MFT diff."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    view = await service_for(vol).view(point)
    path = "/" + (args.get("path") or "/").strip("/")
    out = _header(vol.name, point, view)
    out["path"] = path
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
                raise NotFound(f"{path}: no such file or directory at {point}")
    out["entries"] = rows
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
    d, n = split(args["path"])
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
        rows.append(r)
    if not rows:
        raise NotFound(f"{args['path']}: never catalogued on volume {vol.name}")
    return {"volume": vol.name, "path": join(d, n), "versions": rows}


async def find(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Glob over names (or whole paths when the pattern has a ``/``), case-insensitive;
    every version unless ``at``. A path pattern is anchored at the root: ``reports/*/q3*``
    means ``/reports/*/q3*`` (as a ``.gitignore`` pattern with a ``/`` in it is anchored
    at its directory); ``**`` is not special, but ``*`` crosses ``/``, so ``*/q3*``
    matches in every directory below the root. Cost: a scan of the catalog."""
    vol = store.volume(args.get("volume"))
    pattern = args["pattern"]
    on_path = "/" in pattern
    if on_path and not pattern.startswith("/"):
        pattern = "/" + pattern
    svc = service_for(vol)
    if args.get("at"):
        view = await svc.view(args["at"])
        pat = pattern.lower()
        rows = [e.to_dict() for e in view.walk("/")
                if fnmatch.fnmatchcase((e.path if on_path else e.name).lower(), pat)]
        return {**_header(vol.name, args["at"], view), "pattern": pattern, "entries": rows}
    rows = [e.to_dict() for e in svc.catalog.glob(pattern, on_path=on_path)]
    return {"volume": vol.name, "pattern": pattern, "entries": rows}


async def restore(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Write a file's bytes as of a point to ``output``: the record is re-read at that
    point and its runlist (or resident bytes) followed — sparse runs become holes, the
    size is exact, modification/access times are set. ``path`` is taken literally (a
    name may hold ``:``, spaces, newlines, a leading ``-``); ``stream`` names an
    alternate data stream. Cost: O(file size) reads."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    out_path = args.get("output")
    if not out_path or out_path == "-":
        raise UsageError("restore needs an output file (-o FILE)")
    svc = service_for(vol)
    view = await svc.view(point)
    path = args["path"]
    stream_name = str(args.get("stream") or "")
    d, n = split(path)
    e = view.lookup(d, n)
    if e is None:
        raise NotFound(f"{path}: no such file at {point}")
    if e.is_dir:
        raise UsageError(f"{path} is a directory; restore takes files")
    part = next((p for p in view.parts if p["name"] == e.part), None)
    if part is None:
        raise NotFound(f"{path}: its file system is not on the volume at {point}")
    read = reader_at(vol, view.seq)
    if part.get("fs", "ntfs") != "ntfs":
        if stream_name:
            raise UsageError(f"{path}: ext file systems have no alternate data streams")
        return _restore_ext(vol.name, point, view.seq, read, part, e, join(d, n), out_path, progress)
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
        what = f"stream {stream_name!r}" if stream_name else "data"
        raise NotFound(f"{path}: no {what} at {point}")
    out = os.path.abspath(out_path)
    fd, tmp = open_partial(out)
    written = 0
    try:
        set_size(fd, stream.size, out)
        if stream.resident:
            write_at(fd, (stream.content or b"")[: stream.size], 0, out)
            written = stream.size
        else:
            if stream.compressed or stream.encrypted:
                raise UsageError(f"{path}: compressed or encrypted streams cannot be restored yet")
            runs = stream.runs(nv.max_lcn)
            for off, piece in read_runs(nv.read, runs, nv.cluster_size, stream.size):
                if piece.count(0) != len(piece):
                    write_at(fd, piece, off, out)
                written += len(piece)
                progress(written, stream.size, "restore")
        if e.mtime:
            os.utime(tmp, ns=(e.atime or e.mtime, e.mtime))
    except BaseException:
        discard_partial(fd, tmp)
        raise
    commit_partial(fd, tmp, out)
    return {"volume": vol.name, "at": point, "seq": view.seq, "path": join(d, n),
            "stream": stream_name or None, "output": out, "size": stream.size,
            "record": e.record, "modified_ns": e.mtime}


def _restore_ext(vol_name: str, point: str, seq: int, read: Callable[[int, int], bytes],
                 part: dict[str, Any], e: Entry, path: str, out_path: str,
                 progress: Progress) -> dict[str, Any]:
    """Restore from ext2/3/4: re-read inode ``e.record`` at the point (its generation
    must be the catalogued one) and follow its extents or block map; holes and
    uninitialised extents stay holes; inline data and symlink targets come from the
    inode. Cost: one read per run (1 MiB at most a read)."""
    fs = Ext4(read, part["offset"], part["size"])
    ino = fs.read_inodes([e.record]).get(e.record)
    if ino is None or ino.damaged or not ino.in_use or ino.generation != e.seq:
        why = ino.damaged if ino is not None and ino.damaged else "not the catalogued file"
        raise NotFound(f"{path}: inode {e.record} at {point}: {why}")
    out = os.path.abspath(out_path)
    fd, tmp = open_partial(out)
    try:
        set_size(fd, ino.size, out)
        if ino.has_inline_data or ino.is_symlink or not (ino.is_reg or ino.is_dir):
            write_at(fd, fs.read_file(ino), 0, out)
        else:
            step = 1 << 20
            done = 0
            for r in fs.file_runs(ino):
                if r.uninit:
                    continue
                for o in range(0, r.length, step):
                    n = min(step, r.length - o)
                    piece = fs.read(r.vol_off - fs.base + o, n)
                    if piece.count(0) != n:
                        write_at(fd, piece, r.file_off + o, out)
                    done += n
                    progress(done, ino.size, "restore")
        if e.mtime:
            os.utime(tmp, ns=(e.atime or e.mtime, e.mtime))
    except Corruption as err:
        discard_partial(fd, tmp)
        raise NotFound(f"{path}: inode {e.record} at {point} is damaged: {err}") from None
    except BaseException:
        discard_partial(fd, tmp)
        raise
    commit_partial(fd, tmp, out)
    return {"volume": vol_name, "at": point, "seq": seq, "path": path, "stream": None,
            "output": out, "size": ino.size, "record": e.record, "modified_ns": e.mtime}


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
