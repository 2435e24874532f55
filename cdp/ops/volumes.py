"""The volume operations: list, create, delete, resize, status, markers, snapshot, rewind, pause,
resume, image and verify (same signature as every operation; see :mod:`cdp.ops`)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

from cdp.backup.pipe import Pipe
from cdp.config import VolumeSpec
from cdp.errors import NotFound, UsageError
from cdp.journal import NotLocal, verify_journal
from cdp.journal.tiered import Range, fetch_retry, missing_records, prefetch_limit
from cdp.ops.replication import status_rows as replication_rows
from cdp.ops.retention import marker_fields, status_fields
from cdp.outputs import (
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
from cdp.proxy.drl import DEFAULT_REGION
from cdp.proxy.volume import ProxyVolume
from cdp.replication.role import load_role
from cdp.store import Store
from cdp.units import parse_size
from cdp.verify import CATALOG_FILE, problem_dict, verify_catalog, verify_maps, verify_volume_dir
from cdp.volume import Volume, check_size

# ---------------------------------------------------------------------------- volumes


async def volume_list(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    return [
        {
            "volume": v.name,
            "size": v.size,
            "markers": len(v.markers),
            "last_seq": v.head_seq,
            "connections": v.connections,
            **_role(v),
        }
        for v in sorted(store.volumes.values(), key=lambda v: v.name)
    ]


def _role(vol: Volume) -> dict[str, Any]:
    """``role`` (primary/replica) and ``source`` (a replica's, else None): docs/REPLICATION.md."""
    r = load_role(vol)
    return {"role": r.role, "source": r.source or None if r.role == "replica" else None}


def _writable(vol: Volume) -> Volume:
    """``vol``, unless it is a replica: only its replication stream writes it
    (markers and rewinds arrive from the source); UsageError naming failover."""
    if load_role(vol).role == "replica":
        raise UsageError(f"volume {vol.name} is a replica (read-only): its markers and rewinds "
                         "come from the source; `cdpctl failover` makes it a primary")
    return vol


#: options that only a proxy volume takes (argument -> the cdpctl option naming it)
PROXY_ONLY = {"primary": "--primary", "ack": "--ack", "initial_copy": "--no-initial-copy",
              "drl_region": "--drl-region", "copy_rate": "--copy-rate"}


async def volume_create(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Create a volume: mirror (default) or proxy (``mode``). An option of the other
    mode is refused, naming it (docs/PROXY.md), never silently ignored."""
    if args.get("mode") == "proxy":
        return await _proxy_volume_create(store, args, progress)
    name = args["name"]
    for key, flag in PROXY_ONLY.items():
        v = args.get(key)
        if v is not None and not (key == "initial_copy" and v is True):
            raise UsageError(f"{flag}: only with --mode proxy (volume {name} would be a mirror volume)")
    image = args.get("from_image")
    size = args.get("size")
    src_size = None
    fmt = None
    if image:
        fmt, src_size = _image_info(image)
    if size is None:
        if src_size is None:
            raise UsageError("volume create needs --size (or --from-image)")
        size = src_size
    size = parse_size(size, "--size")
    check_size(size, "--size")
    if src_size is not None and src_size > size:
        raise UsageError(f"--size {size} is smaller than the image ({src_size} bytes)")
    vol = store.create_volume(VolumeSpec(name, size))
    copied = 0
    if image:
        assert fmt is not None
        copied = await _initial_copy(vol, image, fmt, progress)
    return {"volume": vol.name, "size": vol.size, "initial_copy_bytes": copied}


async def _proxy_volume_create(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Proxy mode: the appliance owns ``primary``; initial full copy unless told not to."""
    if args.get("from_image"):
        raise UsageError("--from-image is for mirror volumes; a proxy volume copies its --primary")
    if not args.get("primary"):
        raise UsageError("--mode proxy needs --primary PATH (file, block device or nbd:// URL)")
    size = parse_size(args["size"], "--size") if args.get("size") else 0
    if size:
        check_size(size, "--size")
    region = parse_size(args["drl_region"], "--drl-region") if args.get("drl_region") else DEFAULT_REGION
    rate = parse_size(args["copy_rate"], "--copy-rate") if args.get("copy_rate") else 0
    initial = args.get("initial_copy", True)
    vol = store.create_volume(VolumeSpec(
        args["name"], size, "proxy", args["primary"], ack=args.get("ack") or "primary",
        drl_region=region, initial_copy=initial, copy_rate=rate,
    ))
    assert isinstance(vol, ProxyVolume)
    copied = await vol.wait_initial_copy(progress, rate) if initial else 0
    return {"volume": vol.name, "size": vol.size, "mode": "proxy", "primary": vol.primary_spec,
            "ack": vol.ack, "initial_copy_bytes": copied}


def _image_info(path: str) -> tuple[str, int]:
    """(format, virtual size) of an image via ``qemu-img info``; raw files without it."""
    if not os.path.exists(path):
        raise NotFound(f"image {path} not found")
    exe = shutil.which("qemu-img")
    if exe is None:
        return "raw", os.path.getsize(path)
    r = subprocess.run(
        [exe, "info", "--output=json", path], capture_output=True, text=True, check=False
    )
    if r.returncode != 0:
        raise UsageError(f"qemu-img cannot read {path}: {r.stderr.strip()}")
    info = json.loads(r.stdout)
    return str(info["format"]), int(info["virtual-size"])


async def _initial_copy(vol: Volume, image: str, fmt: str, progress: Progress) -> int:
    """Copy *image* into the journal as INIT records (time zero); zero runs are skipped
    (the volume is thin). Returns the bytes journalled."""
    tmpdir = None
    src = image
    if fmt != "raw":
        tmpdir = tempfile.mkdtemp(prefix="cdp-import-", dir=vol.path)
        src = os.path.join(tmpdir, "image.raw")
        proc = await asyncio.create_subprocess_exec(
            "qemu-img", "convert", "-O", "raw", image, src,
            stderr=asyncio.subprocess.PIPE,
        )
        _out, err = await proc.communicate()
        if proc.returncode != 0:
            shutil.rmtree(tmpdir, ignore_errors=True)
            raise UsageError(f"qemu-img convert of {image} failed: {err.decode().strip()}")
    try:
        total = os.path.getsize(src)
        chunk = 1 << 20
        zero = bytes(chunk)
        copied = 0
        with open(src, "rb") as f:
            pos = 0
            while True:
                data = f.read(chunk)
                if not data:
                    break
                if data != zero[: len(data)]:
                    vol._record_write(pos, data, init=True)  # the volume's one append path
                    copied += len(data)
                pos += len(data)
                if pos % (64 << 20) == 0:
                    progress(pos, total, "initial copy")
                    await asyncio.sleep(0)
        await vol.flush()
        vol.seal()
        progress(total, total, "initial copy")
        return copied
    finally:
        if tmpdir:
            shutil.rmtree(tmpdir, ignore_errors=True)


async def volume_delete(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Delete a volume and its whole history: cdpd stops serving it at once (new
    connections find no such export), its files are removed (``freed_bytes``).
    Refused (UsageError) while clients are connected or while a marker is kept
    (``retention keep``), unless ``force``: then open connections get errors."""
    name = str(args["name"])
    vol = store.volumes.get(name)
    if vol is not None and not args.get("force"):
        if vol.connections:
            raise UsageError(
                f"volume {name} has {vol.connections} open connection(s): disconnect the "
                "clients first, or delete it anyway with --force")
        kept = [m.name for m in vol.markers if marker_fields(vol, m.id, m.seq)["keep_until_ns"]]
        if kept:
            raise UsageError(
                f"volume {name} has kept markers ({', '.join(kept)}): release them with "
                "`cdpctl retention keep MARKER --keep none`, or delete anyway with --force")
    seq = vol.head_seq if vol is not None else None
    store.delete_volume(name)
    freed = await asyncio.get_running_loop().run_in_executor(None, store.purge_deleted)
    out: dict[str, Any] = {"volume": name, "deleted": True, "last_seq": seq, "freed_bytes": freed}
    if any(spec.name == name for spec in store.settings.volumes):
        out["warning"] = (f"volume {name} is named in the configuration: cdpd will create it "
                          "again, empty, at its next start unless it is removed there")
    return out


async def volume_resize(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Grow a mirror volume (``size``; shrinking is refused, see :meth:`Volume.grow`).
    New connections see the new size; points before the resize read zeros past the
    old size."""
    vol = store.volume(args.get("volume"))
    if isinstance(vol, ProxyVolume):
        raise UsageError(f"volume {vol.name} is a proxy volume: its size is its primary's; "
                         "resize is for mirror volumes")
    size = parse_size(str(args["size"]), "SIZE")
    old = vol.size
    change = vol.grow(size)
    return {"volume": vol.name, "old_size": old, "size": vol.size, "changed": change is not None,
            "seq": None if change is None else change["seq"]}


# ---------------------------------------------------------------------------- status


async def status(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    names = args.get("volumes") or [None]
    if names == [None] and (len(store.volumes) > 1 or store.damaged):
        names = sorted(store.volumes)  # every volume, the damaged ones listed first
    out: list[dict[str, Any]] = [
        {"volume": n, "damaged": err} for n, err in sorted(store.damaged.items())
        if not args.get("volumes") or n in args["volumes"]]
    if out and args.get("volumes"):
        store.volume(out[0]["volume"])  # asked for a damaged volume: say so (exit 6)
    for n in names:
        vol = store.volume(n)
        st = vol.status()
        st["retention"] = status_fields(vol)
        st.update(_role(vol))
        st["replication"] = replication_rows(vol)
        out.append(st)
    return out


async def markers(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    vol = store.volume(args.get("volume"))
    return [dict(m.to_dict(), volume=vol.name, **marker_fields(vol, m.id, m.seq)) for m in vol.markers]


# ---------------------------------------------------------------------------- markers


async def snapshot(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Markers on one or several volumes; several are paused so the markers are one
    consistent point."""
    names = args.get("volumes") or [None]
    vols = [_writable(store.volume(n)) for n in names]
    if len({v.name for v in vols}) != len(vols):
        raise UsageError("a volume is named twice")
    label = args.get("label") or ""
    if len(vols) == 1 and not vols[0].paused:
        return [dict((await vols[0].snapshot(label)).to_dict(), volume=vols[0].name)]
    already = {v.name for v in vols if v.paused}
    for v in vols:
        v.pause()
    try:
        out = []
        for v in vols:
            m = await v.snapshot_paused(label)
            out.append(dict(m.to_dict(), volume=v.name))
        return out
    finally:
        for v in vols:
            if v.name not in already:
                v.resume()


async def rewind(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Rewind the live volume to ``to``. The result carries the undo handle (``undo``:
    the point to rewind to for undoing it). A target that is already the live state
    (``now``, the head) writes nothing and says so (``changed`` false, ``undo`` None)."""
    vol = _writable(store.volume(args.get("volume")))
    to = point_arg(args, "to")
    target = vol.resolve_point(to)
    if target == vol.head_seq:
        return {"volume": vol.name, "rewind_seq": None, "target_seq": target, "to": to,
                "changed": False, "undo": None}
    if isinstance(vol, ProxyVolume):  # also rewrites the primary, with progress
        seq = await vol.rewind(target, progress=progress)
    else:
        seq = await vol.rewind(target)
    return {"volume": vol.name, "rewind_seq": seq, "target_seq": target, "to": to,
            "changed": True, "undo": f"@{seq - 1}"}


async def pause(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    vols = [store.volume(n) for n in (args.get("volumes") or [None])]
    for v in vols:
        v.pause()
    return [{"volume": v.name, "paused": True} for v in vols]


async def resume(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Release held writes; each row says whether the volume was paused at all
    (``was_paused``), so resuming a running volume is reported, not silent."""
    names = args.get("volumes") or ([None] if len(store.volumes) <= 1 else sorted(store.volumes))
    vols = [store.volume(n) for n in names]
    rows = [{"volume": v.name, "paused": False, "was_paused": v.paused} for v in vols]
    for v in vols:
        v.resume()
    return rows


# ---------------------------------------------------------------------------- images


#: bytes of one image batch (one hand-off to the writer thread; as QCOW2_BATCH)
IMAGE_BATCH = 2 << 20


async def _image_data(vol: Volume, seq: int, on_error: str, damage: DamageMap,
                      bufs: list[memoryview], chunk: int = 64 << 20,
                      ) -> AsyncIterator[tuple[list[tuple[int, memoryview]], int]]:
    """Batches ``([(offset, bytes)], end offset)`` of the volume's data at *seq*, in
    offset order, each read into one of *bufs* (taken in turn: the consumer is done
    with a buffer's batch before the batch after next; zero/hole extents are left out,
    holes of the sparse output), adjacent data joined into one item (one output write,
    not one per 4 KiB write of a fragmented history). With ``on_error == "zero"`` what
    fails its checksum is zeroed and recorded in *damage* (volume offset = image
    offset), and records that live only in the S3 tier are fetched (``journal.remote``)
    as the extents need them, with the records of the extents ahead (up to half the
    read cache) in the same round of GETs. Cost: one map resolve per *chunk*, then per
    extent one read into the buffer (``Journal.read_slice_into``: a raw record is read
    in place, its CRC checked; anything else through :meth:`Volume.read_extent` and
    copied); nothing more when all is local."""
    def attempt(e: Any, pos: int, n: int) -> tuple[bytes | memoryview, DamageMap]:
        found = DamageMap()  # this extent's damage, kept only once it is read
        data = (vol.read_extent(e, pos, n) if on_error == "stop"
                else salvage_read(partial(_extent_bytes, vol, e), pos, n, pos, found))
        return data, found

    j = vol.journal
    read_into = j.read_slice_into
    b = 0
    buf = bufs[0]
    cap = len(buf)
    used = 0
    items: list[tuple[int, memoryview]] = []
    run_at = -1  # volume offset of the run of adjacent data being filled (-1: none)
    run_used = 0  # where it starts in the buffer
    last_end = -1  # volume offset where that run ends
    pos = 0
    while pos < vol.size:
        stop = min(vol.size, pos + chunk)
        exts = vol.extents(pos, stop, seq)
        for k, e in enumerate(exts):
            if e.loc < 0:
                continue
            at = e.start
            end = e.end
            while at < end:
                if used == cap:
                    items.append((run_at, buf[run_used:used]))
                    yield items, at
                    b ^= 1
                    buf, used, items, run_at, last_end = bufs[b], 0, [], -1, -1
                n = end - at
                if n > cap - used:
                    n = cap - used
                if at != last_end:
                    if run_at >= 0:
                        items.append((run_at, buf[run_used:used]))
                    run_at, run_used = at, used
                view = buf[used : used + n]
                if not read_into(e.seq, e.loc, e.poff + at - e.start, view):
                    try:
                        data, found = attempt(e, at, n)
                    except NotLocal:  # tiered history: fetch this and the next extents' records
                        def plan(missed: list[Range], k: int = k, exts: list[Any] = exts) -> list[Range]:
                            locs = ((x.seq, x.loc) for x in exts[k:] if x.loc >= 0)
                            return missed + missing_records(j, locs, prefetch_limit(j))

                        data, found = await fetch_retry(j, partial(attempt, e, at, n), plan)
                    for r in found.ranges:
                        damage.add(r["offset"], r["length"], r["source_offset"], r["reason"])
                    view[:] = data
                used += n
                at += n
                last_end = at
        pos = stop
    if run_at >= 0:
        items.append((run_at, buf[run_used:used]))
        yield items, vol.size


def _write_items(fd: int, items: list[tuple[int, memoryview]], path: Path) -> None:
    for off, data in items:
        write_at(fd, data, off, path)


def _extent_bytes(vol: Volume, e: Any, offset: int, length: int) -> bytes:
    return bytes(vol.read_extent(e, offset, length))


async def image(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Write a sparse raw image of a volume at a point. Cost: O(changed extents) map
    work + reading the data bytes once; zero runs become holes in the output.
    ``on_error``: ``stop`` (default) ends at the first record failing its checksum;
    ``zero`` writes zeros for each damaged piece (found to the 4 KiB granule) and goes
    on. ``damaged`` lists every damaged range (a ddrescue-like map)."""
    vol = store.volume(args.get("volume"))
    point = point_arg(args, "at")
    on_error = on_error_arg(args, ("stop", "zero"))
    seq = vol.resolve_point(point)
    out = Path(args["output"])
    if str(out) == "-" or out.name == "-":
        raise UsageError("image writes a file (-o FILE); to stream a point, read the export "
                         f"{vol.name}@{point} with nbdcopy or qemu-img")
    if out.exists() and not out.is_file():
        raise UsageError(f"{out}: not a regular file (image writes a sparse file; to copy a "
                         f"point onto a device, read the export {vol.name}@{point} with nbdcopy)")
    damage = DamageMap()
    # two batch buffers: the loop reads into one while a worker thread writes the other
    bufs = [memoryview(bytearray(IMAGE_BATCH)) for _ in range(2)]
    batches = _image_data(vol, seq, on_error, damage, bufs)
    fd, tmp = open_partial(out)
    data_bytes = 0
    t0 = time.perf_counter()
    pipe = Pipe()
    try:
        set_size(fd, vol.size, out)
        async for items, end in batches:
            await pipe.put(_write_items, fd, items, out)  # waits for the batch before
            data_bytes += sum(len(v) for _o, v in items)
            progress(end, vol.size, "image")
        await pipe.drain()
    except BaseException:
        await pipe.abort()
        discard_partial(fd, tmp)
        raise
    commit_partial(fd, tmp, out)
    progress(vol.size, vol.size, "image")
    return {
        "volume": vol.name,
        "at": point,
        "seq": seq,
        "output": str(out),
        "size": vol.size,
        "data_bytes": data_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
        "on_error": on_error,
        "damaged": damage.ranges,
        "damaged_bytes": damage.bytes,
    }


# ---------------------------------------------------------------------------- verify


async def verify(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Check every record of every (or one) volume's journal, the map files and manifest
    (checksums; nothing past the journal), the markers and the file catalog (SQLite
    integrity). Result ``ok`` is False when anything is damaged."""
    loop = asyncio.get_running_loop()
    names = [args["volume"]] if args.get("volume") else sorted(store.volumes)
    results = []
    for name in sorted(store.damaged):  # not open: checked as files, like offline
        if not args.get("volume") or args["volume"] == name:
            r = await loop.run_in_executor(None, verify_volume_dir, store.path / "volumes" / name)
            if r["ok"]:  # what kept it from opening is damage too
                r["ok"] = False
                r["problems"].append({"what": "volume", "reason": store.damaged[name]})
            results.append(r)
    names = [n for n in names if n not in store.damaged]
    for i, name in enumerate(names):
        vol = store.volume(name)
        vol.journal.sync()
        durable = vol.journal.durable_seq
        rep = await loop.run_in_executor(None, verify_journal, vol.path / "journal")
        problems = [problem_dict(p) for p in rep.problems]
        for p in problems:
            p.setdefault("what", "journal")
        for m in vol.markers:
            if m.seq > durable:
                problems.append({"what": "markers", "reason": f"{m.name} at @{m.seq} is past the journal end @{durable}"})
        # maps on the loop thread: no seal or merge replaces files while they are read
        nmaps, map_problems = verify_maps(vol.path / "maps", durable)
        problems.extend(map_problems)
        ncat, cat_problems = await loop.run_in_executor(
            None, verify_catalog, vol.path / CATALOG_FILE, {m.id: m.seq for m in vol.markers})
        problems.extend(cat_problems)
        results.append(
            {
                "volume": name,
                "ok": rep.ok and not problems,
                "records": rep.records,
                "bytes": rep.bytes,
                "markers": len(vol.markers),
                "maps": nmaps,
                "catalog_versions": ncat,
                "problems": problems,
            }
        )
        progress(i + 1, len(names), "verify")
    return {"ok": all(r["ok"] for r in results), "volumes": results}


OPS: dict[str, Callable[[Store, dict[str, Any], Progress], Awaitable[Any]]] = {
    "volume_list": volume_list,
    "volume_create": volume_create,
    "volume_delete": volume_delete,
    "volume_resize": volume_resize,
    "status": status,
    "markers": markers,
    "snapshot": snapshot,
    "rewind": rewind,
    "pause": pause,
    "resume": resume,
    "image": image,
    "verify": verify,
}

#: the operations cdpctl may run on a stopped store (they only read)
OFFLINE = {"volume_list", "status", "markers", "image", "verify"}
