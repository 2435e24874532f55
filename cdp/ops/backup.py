"""The ``changed`` and ``export_diff`` operations (cdpctl changed / export).

They run in the daemon on its event loop (map work in windows of the volume, payload
reads in batches, writes in a worker thread, yielding between batches) or offline on a
stopped store: both only read the store. Payloads that live only in the S3 tier (their
segment's local copy dropped) are fetched when a read meets them, with the records of
the pieces ahead (up to half the read cache) in the same round of GETs
(:func:`~cdp.journal.tiered.fetch_retry`); a fully local volume pays nothing for it.
"""

from __future__ import annotations

import asyncio
import os
import stat
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from cdp.backup import qcow2
from cdp.backup.cdpdiff import Header
from cdp.backup.changes import (
    DATA,
    ZERO,
    Piece,
    PieceColumns,
    align_ranges,
    merged_ranges,
    range_cells,
    totals,
)
from cdp.backup.pipe import BATCH_BYTES, Pipe
from cdp.backup.sinks import NbdSink, Sink, StreamSink
from cdp.errors import UsageError
from cdp.journal import NotLocal
from cdp.journal.tiered import Range, fetch_retry, missing_records, prefetch_limit
from cdp.outputs import commit_partial, open_partial, output_error
from cdp.points import point_arg
from cdp.progress import Progress
from cdp.store import Store
from cdp.volume import Volume
from mapengine import Columns

#: the map work of one step (a window of the volume) before yielding to the loop
WINDOW = 4 << 30
READ_BYTES = 4 << 20
FORMATS = ("qcow2", "cdpdiff")
#: bytes of one qcow2 batch (one hand-off to the writer thread; one of two buffers).
#: 8 MiB buffers made a process's first export to a file twice as slow (1 GiB changed:
#: 2.3-2.8 s against 1.0 s at 1 or 2 MiB; later exports alike)
QCOW2_BATCH = 2 << 20
#: the qcow2 export's two batch buffers, kept for the next export: fresh memory costs a
#: page fault per 4 KiB on first touch
_BUFFERS: list[memoryview] = []


def _fetch_plan(vol: Volume, locs: Callable[[], Iterable[tuple[int, int]]]
                ) -> Callable[[list[Range]], list[Range]]:
    """A :func:`fetch_retry` plan: the records missed, plus the uncached records of the
    ``(seq, loc)`` pairs ``locs()`` gives (what is read next), up to half the cache."""
    j = vol.journal

    def plan(missed: list[Range]) -> list[Range]:
        return missed + missing_records(j, locs(), prefetch_limit(j))

    return plan


def _piece_locs(vol: Volume, seq: int, pieces: list[Piece], i: int) -> Iterator[tuple[int, int]]:
    """``(seq, loc)`` of the records pieces ``i..`` read, in order."""
    for p in pieces[i:]:
        if p.kind != DATA:
            continue
        if p.loc >= 0:
            yield p.seq, p.loc
        else:
            yield from ((e.seq, e.loc) for e in vol.extents(p.start, p.end, seq) if e.loc >= 0)


def _ext_locs(exts: Sequence[Any], i: int) -> Iterator[tuple[int, int]]:
    """``(seq, loc)`` of the records extents ``i..`` read, in order."""
    return ((e.seq, e.loc) for e in exts[i:] if e.loc >= 0)


def _points(store: Store, args: dict[str, Any]) -> tuple[Volume, str, str, int, int]:
    vol = store.volume(args.get("volume"))
    a_text = args.get("from")
    if not a_text:
        raise UsageError("missing --from POINT (use 'origin' for everything ever written)")
    b_text = point_arg(args, "to")
    return vol, a_text, b_text, vol.resolve_point(a_text), vol.resolve_point(b_text)


async def compute_piece_columns(vol: Volume, seq_a: int, seq_b: int,
                                progress: Progress) -> PieceColumns:
    """:func:`~cdp.backup.changes.diff_columns` over the whole volume, a window at a
    time (yielding between). The candidate ranges come from one ``Volume.changed``
    over the volume (its cost follows the changes; one call per window re-queried the
    same maps 256 times on a 1 TiB volume)."""
    ranges = vol.changed(seq_a, seq_b, 0, vol.size)
    cells: list[Columns] = []
    i = 0
    for w in range(0, vol.size, WINDOW):
        we = min(vol.size, w + WINDOW)
        win: list[tuple[int, int]] = []
        while i < len(ranges) and ranges[i][0] < we:
            s, e = ranges[i]
            win.append((max(s, w), min(e, we)))
            if e > we:
                break  # the rest of this range belongs to the next window
            i += 1
        cells.extend(range_cells(vol, seq_a, seq_b, win))
        if vol.size > WINDOW:
            progress(min(vol.size, w + WINDOW), vol.size, "changed")
            await asyncio.sleep(0)
    return PieceColumns.of_cells(cells)


async def compute_pieces(vol: Volume, seq_a: int, seq_b: int, progress: Progress) -> list[Piece]:
    """:func:`~cdp.backup.changes.diff_pieces` over the whole volume, a window at a time
    (yielding between)."""
    return (await compute_piece_columns(vol, seq_a, seq_b, progress)).pieces()


def _base(vol: Volume, a_text: str, b_text: str, a: int, b: int,
          tot: dict[str, int]) -> dict[str, Any]:
    return {
        "volume": vol.name,
        "from": a_text,
        "to": b_text,
        "from_seq": a,
        "to_seq": b,
        "size": vol.size,
        **tot,
    }


async def changed(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Merged, sorted byte ranges that differ between two points, with totals."""
    vol, a_text, b_text, a, b = _points(store, args)
    pc = await compute_piece_columns(vol, a, b, progress)
    ranges = pc.ranges()
    r = _base(vol, a_text, b_text, a, b, pc.totals())
    r["ranges_count"] = len(ranges)
    r["ranges"] = [{"offset": s, "length": e - s} for s, e in ranges]
    if args.get("kinds"):
        r["pieces"] = [
            {"offset": s, "length": e - s, "kind": "data" if k == DATA else "zero"}
            for s, e, k in zip(pc.start.tolist(), pc.end.tolist(), pc.kind.tolist(), strict=True)
        ]
    return r


def _infer_format(output: str | None, fmt: str | None, to_nbd: str | None,
                  dry_run: bool = False) -> str:
    if to_nbd:
        if output:
            raise UsageError("give either -o FILE or --to-nbd URI, not both")
        return "nbd"
    if not output and dry_run:  # nothing is written: the format decides the estimate only
        output = "-"
    if not output:
        raise UsageError("export needs -o FILE (.qcow2, .cdpdiff or -) or --to-nbd URI")
    if fmt:
        if fmt not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}")
        return fmt
    if output.endswith(".qcow2"):
        return "qcow2"
    if output.endswith(".cdpdiff") or output == "-":
        return "cdpdiff"
    raise UsageError(f"cannot tell the format of {output!r}: name it .qcow2 or .cdpdiff, or pass --format")


async def export_diff(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """Write what changed between two points as a qcow2 overlay, a cdpdiff stream, or
    into an NBD server. Cost: the map work of :func:`compute_pieces` + reading the
    changed bytes once (qcow2: whole clusters) + writing them."""
    vol, a_text, b_text, a, b = _points(store, args)
    output = args.get("output")
    to_nbd = args.get("to_nbd")
    fmt = _infer_format(output, args.get("format"), to_nbd, bool(args.get("dry_run")))
    if output == "-":
        raise UsageError("the daemon cannot write to cdpctl's stdout; cdpctl passes a pipe")
    pieces = await compute_pieces(vol, a, b, progress)
    r = _base(vol, a_text, b_text, a, b, totals(pieces))
    r["format"] = fmt
    r["output"] = to_nbd or output
    lay = None
    if fmt == "qcow2":
        bits = int(args.get("cluster_bits") or qcow2.DEFAULT_CLUSTER_BITS)
        lay = qcow2.plan(vol, b, pieces, bits)
        backing = args.get("backing")
        if backing is None:
            backing = f"{vol.name}@{a_text}.img"
        r.update(
            cluster_size=lay.cluster_size,
            data_clusters=lay.data_clusters,
            zero_clusters=lay.zero_clusters,
            copy_bytes=lay.data_clusters * lay.cluster_size,
            file_bytes=lay.file_size,
            backing=backing or None,
        )
    else:
        r["copy_bytes"] = r["data_bytes"]
    if args.get("dry_run"):
        r["dry_run"] = True
        return r
    t0 = time.perf_counter()
    if lay is not None:
        assert output is not None
        await _write_qcow2(vol, b, lay, pieces, output, r["backing"], args.get("backing_format") or "raw", progress)
    elif fmt == "cdpdiff":
        assert output is not None
        header = Header(vol.size, a, b, vol.uuid, vol.name, a_text, b_text)
        r["stream_bytes"] = await _write_stream(vol, b, pieces, output, header, progress, r["copy_bytes"])
    else:
        assert to_nbd is not None
        loop = asyncio.get_running_loop()
        sink = await loop.run_in_executor(None, NbdSink, to_nbd, vol.size)
        await emit(vol, b, _aligned(vol, pieces, sink.grain), sink, progress, r["copy_bytes"])
    r["seconds"] = round(time.perf_counter() - t0, 3)
    return r


def _aligned(vol: Volume, pieces: list[Piece], grain: int) -> list[Piece]:
    """Pieces whose ends are multiples of ``grain``: aligned pieces stay as they are;
    a widened range becomes one piece read through the volume (``loc`` -1, DATA)."""
    if grain <= 1 or all(p.start % grain == 0 and (p.end % grain == 0 or p.end == vol.size) for p in pieces):
        return pieces
    out: list[Piece] = []
    i = 0
    for s, e in align_ranges(merged_ranges(pieces), grain, vol.size):
        group = []
        while i < len(pieces) and pieces[i].start < e:
            group.append(pieces[i])
            i += 1
        if group and group[0].start == s and group[-1].end == e:
            out.extend(group)
        else:
            out.append(Piece(s, e, DATA))
    return out


def _open_output(path: str) -> tuple[int, Path | None]:
    """An fd for ``path``: FIFOs and devices directly, regular files through a
    temporary name renamed at the end (returned as the second item). CdpError naming
    ``path`` when it cannot be opened."""
    try:
        st = os.stat(path)
        special = not stat.S_ISREG(st.st_mode)
    except FileNotFoundError:
        special = False
    if not special:
        return open_partial(path)
    try:
        return os.open(path, os.O_WRONLY), None
    except OSError as exc:
        raise output_error(path, exc) from None


def _commit(fd: int, tmp: Path | None, path: str) -> None:
    if tmp is not None:
        commit_partial(fd, tmp, path)
    else:
        os.close(fd)


def _run_extents(vol: Volume, seq: int, pieces: list[Piece], i: int, start: int,
                 stop: int) -> tuple[Sequence[Piece | Any], int]:
    """The extents of ``[start, stop)`` at ``seq`` and the index of the first piece not
    before ``stop``: the pieces themselves when they tile the range exactly and name
    their records (ZERO pieces read as holes: zeroes at ``seq``), else one resolve
    (:meth:`Volume.extents`: parts of a cluster the pieces leave out are unchanged
    bytes, and a widened DATA piece names no record). Pieces are sorted, disjoint."""
    n = len(pieces)
    while i < n and pieces[i].end <= start:
        i += 1
    j = i
    at = start
    while j < n and pieces[j].start == at and pieces[j].end <= stop:
        p = pieces[j]
        if p.kind == DATA and p.loc < 0:
            break
        at = p.end
        j += 1
    if at == stop:
        return pieces[i:j], j
    return vol.extents(start, stop, seq), i


async def _write_qcow2(
    vol: Volume, seq: int, lay: qcow2.Layout, pieces: list[Piece], path: str,
    backing: str | None, backing_format: str, progress: Progress,
) -> None:
    loop = asyncio.get_running_loop()
    fd, tmp = await loop.run_in_executor(None, _open_output, path)
    pipe = Pipe()
    cs = lay.cluster_size
    total = lay.data_clusters * cs
    done = pending = 0
    # two batch buffers, one filled while the writer thread writes the other (Pipe keeps
    # one call in flight): payloads are read into them, so no new memory is touched per
    # read (a fresh 1 MiB bytes per extent cost more in page faults than the read)
    size = max(QCOW2_BATCH, cs)  # a run holds at least one cluster
    bufs = [_BUFFERS.pop() if _BUFFERS and len(_BUFFERS[-1]) >= size
            else memoryview(bytearray(size)) for _ in range(2)]
    buf = bufs[0]
    try:
        if tmp is not None:
            os.ftruncate(fd, lay.file_size)
        await pipe.put(qcow2.write_at, fd, list(qcow2.metadata(lay, backing, backing_format)))
        journal = vol.journal
        read_slice = journal.read_slice
        read_into = journal.read_slice_into
        items: list[tuple[int, bytes | memoryview]] = []
        pi = 0  # the first piece not before the run
        joined = (0, -1)  # (len(items), buffer end) when the last item is a buffer view
        j0 = 0  # where that item starts in the buffer
        for guest, host, n in qcow2.data_runs(lay, max(1, size // cs)):
            # one resolve per run; each extent's payload is written where it belongs (no
            # assembly copy). Zero/hole parts stay holes of the new sparse file (written
            # out only when the output is a device that may hold old bytes). Runs are
            # gathered up to QCOW2_BATCH per hand-off to the writer thread (one hand-off
            # per run cost ~0.6 ms each when random 1 MiB changes made 1 MiB runs).
            if pending + n * cs > size and items:
                await pipe.put(qcow2.write_at, fd, items)
                progress(done, total, "export qcow2")
                items, pending = [], 0
                buf = bufs[1] if buf is bufs[0] else bufs[0]
            stop = min(guest + n * cs, vol.size)
            exts, pi = _run_extents(vol, seq, pieces, pi, guest, stop)
            for k, e in enumerate(exts):
                at = host + e.start - guest
                if e.loc >= 0:
                    b0 = pending + e.start - guest
                    b1 = b0 + e.end - e.start
                    view = buf[b0:b1]
                    if read_into(e.seq, e.loc, e.poff, view):
                        if joined == (len(items), b0):  # adjacent in the buffer and the file
                            items[-1] = (items[-1][0], buf[j0:b1])
                        else:
                            items.append((at, view))
                            j0 = b0
                        joined = (len(items), b1)
                        continue
                    try:
                        data = read_slice(e.seq, e.loc, e.poff, e.end - e.start)
                    except NotLocal:  # tiered history: fetch this run's records, read again
                        data = await fetch_retry(
                            journal, partial(read_slice, e.seq, e.loc, e.poff, e.end - e.start),
                            _fetch_plan(vol, partial(_ext_locs, exts, k)))
                    items.append((at, data))
                elif tmp is None:
                    items.append((at, bytes(e.end - e.start)))
            if tmp is None and stop < guest + n * cs:
                items.append((host + stop - guest, bytes(guest + n * cs - stop)))
            done += n * cs
            pending += n * cs
        if items:
            await pipe.put(qcow2.write_at, fd, items)
            progress(done, total, "export qcow2")
        await pipe.drain()
    except BaseException:
        await pipe.abort()
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    finally:  # the writer is done with them (drained or aborted): the next export's
        _BUFFERS[:] = (_BUFFERS + bufs)[-2:]
    # _commit owns fd from here (it closes it, also on failure)
    await loop.run_in_executor(None, _commit, fd, tmp, path)


async def _write_stream(
    vol: Volume, seq: int, pieces: list[Piece], path: str, header: Header,
    progress: Progress, total: int,
) -> int:
    loop = asyncio.get_running_loop()
    fd, tmp = await loop.run_in_executor(None, _open_output, path)
    sink = StreamSink(fd, header, close_fd=False)
    try:
        await emit(vol, seq, pieces, sink, progress, total, close=False)
    except BaseException:
        os.close(fd)
        if tmp is not None:
            tmp.unlink(missing_ok=True)
        raise
    # _commit owns fd from here (it closes it, also on failure)
    await loop.run_in_executor(None, _commit, fd, tmp, path)
    return sink.writer.stream_bytes


def _run_batch(sink: Sink, batch: list[tuple[int, int, Any]]) -> None:
    for kind, off, x in batch:
        if kind == ZERO:
            sink.zero(off, x)
        else:
            sink.write(off, x)


async def emit(
    vol: Volume, seq: int, pieces: list[Piece], sink: Sink, progress: Progress, total: int,
    *, close: bool = True,
) -> None:
    """Send every piece to ``sink`` (DATA read from the journal, ZERO as zeroing), in
    batches written by a worker thread while the loop reads the next batch."""
    loop = asyncio.get_running_loop()
    pipe = Pipe()
    batch: list[tuple[int, int, Any]] = []
    nbytes = 0
    done = 0
    read_slice = vol.journal.read_slice

    def read(p: Piece, pos: int, n: int) -> bytes:
        if p.loc >= 0:
            return read_slice(p.seq, p.loc, p.poff + (pos - p.start), n)
        return vol.read(pos, n, seq)

    try:
        for i, p in enumerate(pieces):
            if p.kind == ZERO:
                batch.append((ZERO, p.start, p.length))
            else:
                pos = p.start
                while pos < p.end:
                    n = min(p.end - pos, READ_BYTES)
                    try:
                        data = read(p, pos, n)
                    except NotLocal:  # tiered history: fetch what is read next, read again
                        data = await fetch_retry(
                            vol.journal, partial(read, p, pos, n),
                            _fetch_plan(vol, partial(_piece_locs, vol, seq, pieces, i)))
                    batch.append((DATA, pos, data))
                    nbytes += n
                    pos += n
                    if nbytes >= BATCH_BYTES:
                        done += nbytes
                        await pipe.put(_run_batch, sink, batch)
                        progress(done, total, "export")
                        batch, nbytes = [], 0
            if len(batch) >= 4096:
                done += nbytes
                await pipe.put(_run_batch, sink, batch)
                batch, nbytes = [], 0
        if batch:
            done += nbytes
            await pipe.put(_run_batch, sink, batch)
        await pipe.drain()
        await loop.run_in_executor(None, sink.finish)
        progress(total, total, "export")
    except BaseException:
        await pipe.abort()
        raise
    finally:
        if close:
            sink.close()


OPS: dict[str, Callable[[Store, dict[str, Any], Progress], Awaitable[Any]]] = {
    "changed": changed,
    "export_diff": export_diff,
}
#: both only read the store
OFFLINE = set(OPS)
