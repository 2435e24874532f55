"""Computing a version: the MFT diff (or full index) of one point against a base.

Design notes
------------
* :func:`compute` is the one code path for the background diff at a marker and for the
  on-demand overlay at any other point: find NTFS, load the MFT's extents *at the
  target point*, then either scan the whole MFT (no base, a new or reformatted file
  system) or read only the records whose bytes lie in the ranges that changed since
  the base (``changed ∩ MFT extents``), and plan the catalog updates.
* It is a coroutine that yields to the event loop (``await asyncio.sleep(0)``) after
  every chunk of about :data:`CHUNK_RECORDS` records read and parsed, every chunk of
  as many records planned (:func:`~cdp.catalog.rules.plan_steps`) and every batch of
  :data:`WRITE_BATCH` rows written, so ingest keeps flowing: no step holds the loop
  for more than a few milliseconds (``mft_bench`` measures the longest hold).
  :attr:`Computed.steps` counts the yields. The Volume is not thread-safe, so no
  worker thread is used.
* The cyclic garbage collector is kept off the index's objects while a version is
  computed and written (:func:`gc_paused`, ``gc.freeze`` at every yield): a full
  index keeps ~1M small objects alive (records, names, entries) and every automatic
  full collection would walk them all — 100-300 ms of event loop held each time,
  ~10% of the index's time. None of them form cycles (reference counting frees
  them).
* File systems are found by probing (:data:`PROBES`, :func:`cdp.partition.find_kinds`)
  at every point; NTFS is handled here, ext2/3/4 by :mod:`cdp.catalog.ext4index` (the
  same rules, inodes and directories instead of MFT records). Each ``parts`` object
  names its kind (``"fs"``), and a partition whose kind or identity changed is
  re-indexed (its old entries closed).
* A full scan sorts records into bases and extension records as they are parsed and
  merges the (few) extension records at the end, so no step walks the whole MFT.
* **Reads planned ahead** (history the S3 tier dropped locally): *read* is synchronous
  and raises :class:`~cdp.journal.NotLocal` at the first record not local; the caller
  (:func:`cdp.catalog.service.fetching`) fetches and runs the computation again. So
  that this costs a few rounds of GETs rather than one per record, every step that
  knows the bytes it is about to read hands them to *prefetch* first: the MFT records
  in the changed ranges (or the whole MFT for a full scan); for ext, the changed
  inodes, the directories to list and the inodes they name (:mod:`.ext4index`), and
  the inode tables for a full scan. One round of coalesced GETs per such step; what is
  left (the boot sector, ``$MFT``'s own record, a superblock: one record each) is
  fetched miss by miss. Without a tier *prefetch* is None and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from cdp.catalog import ext4index
from cdp.catalog.db import Catalog, Version
from cdp.catalog.model import Entry
from cdp.catalog.rules import DirInfo, Plan, Resolver, plan_steps
from cdp.errors import CdpError, Corruption
from cdp.ext4.fs import Ext4, is_ext
from cdp.journal import NotLocal
from cdp.ntfs.boot import BootSector
from cdp.ntfs.mft import NtfsVolume
from cdp.ntfs.record import FileRecord
from cdp.partition import Partition, Probe, find_kinds

Reader = Callable[[int, int], bytes]
#: changed(base_seq, start, end) -> volume byte ranges that may differ from the base
Changed = Callable[[int, int, int], list[tuple[int, int]]]
#: prefetch(ranges): bring what reading the volume byte ranges ``[start, end)`` at the
#: point needs from the S3 tier into the local read cache, in one round of GETs
Prefetch = Callable[[list[tuple[int, int]]], Awaitable[None]]

#: records parsed (or planned) between two yields to the event loop (~1-3 ms of work)
CHUNK_RECORDS = 256
#: catalog rows written between two yields (~2-5 ms of SQLite work)
WRITE_BATCH = 500


_gc_pauses = 0


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Keep the objects a version's work allocates out of the garbage collector's
    generations inside the block: :func:`gc_step` (at every yield) moves everything
    allocated so far to the permanent generation (``gc.freeze``, O(1)), so no
    collection walks them; the last block to end puts them back (``gc.unfreeze``,
    O(1)). By then most of them are gone (freed by reference counting)."""
    global _gc_pauses
    _gc_pauses += 1
    try:
        yield
    finally:
        _gc_pauses -= 1
        if _gc_pauses == 0:
            gc.unfreeze()


def gc_step() -> None:
    """Inside :func:`gc_paused`: freeze what was allocated since the last step."""
    if _gc_pauses:
        gc.freeze()


@dataclass(repr=False)
class Computed:
    """The outcome of :func:`compute` for one point."""

    kind: str  # "full", "diff" or "none"
    parts: list[dict[str, Any]] = field(default_factory=list)
    plans: list[Plan] = field(default_factory=list)
    note: str = ""
    parsed: int = 0  # records parsed (the work done)
    changed_records: int = 0  # records the changed ranges touched
    seconds: float = 0.0
    steps: int = 0  # yields to the event loop (reads, parsing and planning)
    sb_gdt_changed: int = 0  # ext: superblock / group descriptor ranges written since the base


def _is_ntfs(read: Reader, offset: int, length: int) -> bool:
    return BootSector.is_ntfs(read(offset, 512))


#: the file systems the catalog knows, by kind, as :func:`cdp.partition.find_kinds`
#: probes them (NTFS first: its boot sector is at byte 0, ext's superblock at 1024)
PROBES: dict[str, Probe] = {"ntfs": _is_ntfs, "ext": is_ext}
NOTHING_FOUND = "no NTFS or ext2/3/4 file system found"


def find_filesystems(read: Reader, size: int) -> list[tuple[str, Partition]]:
    """``(kind, partition)`` of every file system the catalog knows on a volume of
    *size* bytes ("ntfs" or "ext"). Cost: a few sector reads."""
    return find_kinds(read, size, PROBES)


def fingerprint(p: Partition, nv: NtfsVolume) -> dict[str, Any]:
    b = nv.boot
    return {"name": p.name, "offset": p.offset, "size": p.size, "fs": "ntfs",
            "serial": f"{b.serial:016x}",
            "mft_lcn": b.mft_lcn, "record_size": b.record_size, "cluster_size": b.cluster_size,
            "mft_records": nv.record_count,
            "mft_extents": [[e.first, e.count, e.offset] for e in nv.extents]}


def _same_fs(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("offset", "fs", "serial", "mft_lcn", "record_size", "cluster_size")
    return all(a.get(k) == b.get(k) for k in keys)


async def compute(
    read: Reader, size: int, catalog: Catalog | None, base: Version | None,
    changed: Changed | None, backup_ns: int, *, chunk: int = CHUNK_RECORDS,
    prefetch: Prefetch | None = None,
) -> Computed:
    """Plan the catalog changes from *base* (None: full index) to the point *read*
    reads; *prefetch* is told the bytes each step will read before it reads them (see
    the design notes). Cost: full index O(MFT records); diff O(changed records + their
    entries)."""
    with gc_paused():
        return await _compute(read, size, catalog, base, changed, backup_ns, chunk, prefetch)


def record_ranges(nv: NtfsVolume, numbers: list[int]) -> list[tuple[int, int]]:
    """Volume byte ranges ``[start, end)`` of MFT records *numbers* (sorted), adjacent
    ones merged. Cost: O(numbers log extents)."""
    rs = nv.record_size
    out: list[tuple[int, int]] = []
    for n in numbers:
        try:
            a = nv.base + nv.record_offset(n)
        except CdpError:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], a + rs)
        else:
            out.append((a, a + rs))
    return out


async def _compute(
    read: Reader, size: int, catalog: Catalog | None, base: Version | None,
    changed: Changed | None, backup_ns: int, chunk: int, prefetch: Prefetch | None = None,
) -> Computed:
    t0 = time.perf_counter()
    out = Computed("diff" if base is not None else "full")

    async def step() -> None:
        out.steps += 1
        gc_step()
        await asyncio.sleep(0)

    try:
        found = find_filesystems(read, size)
    except NotLocal:  # tiered history: the caller fetches it and runs again
        raise
    except CdpError as e:
        found = []
        note = f"partition table unreadable: {e}"
    else:
        note = "" if found else NOTHING_FOUND
    out.note = note
    base_parts = {p["name"]: p for p in base.parts} if base is not None else {}
    seen: set[str] = set()
    for fs_kind, part in found:
        if fs_kind == "ext":
            async for _ in _compute_ext(out, read, part, catalog, base, base_parts.get(part.name),
                                        changed, backup_ns, chunk, prefetch):
                await step()
            seen.add(part.name)
            continue
        try:
            nv = NtfsVolume(read, part.offset, part.size)
        except NotLocal:  # tiered history: the caller fetches it and runs again
            raise
        except CdpError as e:
            out.note += f"{part.name or 'volume'}: NTFS unreadable: {e}; "
            continue
        fp = fingerprint(part, nv)
        out.parts.append(fp)
        seen.add(part.name)
        bp = base_parts.get(part.name)
        same = base is not None and bp is not None and _same_fs(bp, fp)
        reset = bp is not None and not same
        prefix = "/" + part.name if part.name else ""
        ranges = _changed_ranges(out, part, base, changed) if same else None
        if same and ranges is not None:
            assert base is not None and catalog is not None
            numbers = nv.records_in(ranges)
            out.changed_records += len(numbers)
            if prefetch is not None:
                await prefetch(record_ranges(nv, numbers))
            new: dict[int, FileRecord] = {}
            for i in range(0, len(numbers), chunk):
                new.update(nv.read_records(numbers[i : i + chunk]))
                await step()
            out.parsed += len(new)
            old = catalog.visible(part.name, new, base.version)
        else:
            out.kind = "full"
            new = {}
            exts: list[FileRecord] = []
            parsed = 0
            if prefetch is not None:  # the MFT in scan order (as much as the cache takes)
                await prefetch([(nv.base + e.offset, nv.base + e.offset + e.count * nv.record_size)
                                for e in nv.extents])
            for recs in nv.scan(chunk):
                parsed += len(recs)
                for r in recs:
                    if r.base and not r.damaged:  # an extension record (scan: in use)
                        exts.append(r)
                    else:
                        new[r.number] = r
                await step()
            # merge_extensions(), with the bases already sorted out above
            for i in range(0, len(exts), chunk):
                for x in exts[i : i + chunk]:
                    b = new.get(x.base_number)
                    if b is not None and b.in_use and not b.damaged and b.sequence == x.base >> 48:
                        b.merge(x)
                await step()
            out.parsed += parsed
            out.changed_records += nv.record_count
            old = {}
            if bp is not None and catalog is not None and base is not None:
                old = catalog.all_visible(part.name, base.version)
                for num in old:  # catalogued records now free or beyond the MFT: deleted
                    new.setdefault(num, FileRecord(num))
                await step()
        plan = Plan(part.name, records=len(new))
        if same and catalog is not None and base is not None:
            resolver = Resolver(prefix, new, _dir_lookup(catalog, part.name, base.version))
            steps = plan_steps(plan, new, old, resolver, backup_ns,
                               _subtree_lookup(catalog, base.version), chunk=chunk)
        else:
            steps = plan_steps(plan, new, old, Resolver(prefix, new), backup_ns, reset=reset,
                               chunk=chunk)
        for _ in steps:
            await step()
        out.plans.append(plan)
        # free the parsed records a few thousand at a time: letting a full index's
        # ~1M objects go at once (when this function returns) takes 100 ms or more
        numbers = list(new)
        for i in range(0, len(numbers), 8 * chunk):
            for n in numbers[i : i + 8 * chunk]:
                del new[n]
            await step()
    # file systems that vanished (reformatted as something else, partition deleted)
    for name in base_parts:
        if name not in seen and catalog is not None and base is not None:
            plan = Plan(name)
            for entries in catalog.all_visible(name, base.version).values():
                plan.deleted.extend(entries)
            out.plans.append(plan)
    if not out.parts:
        out.kind = "none"
    out.seconds = time.perf_counter() - t0
    return out


def _changed_ranges(out: Computed, part: Partition, base: Version | None,
                    changed: Changed | None) -> list[tuple[int, int]] | None:
    """The byte ranges of *part* changed since *base*, or None (no base, or the base
    point is gone from the journal: a note, and the caller rescans). NotLocal passes:
    tiered history is fetched by the caller, which runs again."""
    if base is None or changed is None:
        return None
    try:
        return changed(base.seq, part.offset, part.offset + part.size)
    except NotLocal:
        raise
    except CdpError as e:
        out.note += f"changed ranges unavailable ({e}); full rescan; "
        return None


async def _compute_ext(
    out: Computed, read: Reader, part: Partition, catalog: Catalog | None, base: Version | None,
    bp: dict[str, Any] | None, changed: Changed | None, backup_ns: int, chunk: int,
    prefetch: Prefetch | None = None,
) -> AsyncIterator[None]:
    """One ext2/3/4 file system into *out* (:mod:`cdp.catalog.ext4index`): the diff
    against *base* when the file system is the one catalogued there (*bp*) and the
    changed ranges are known, else a full index. Yields between chunks of work."""
    try:
        fs = Ext4(read, part.offset, part.size)
    except NotLocal:  # tiered history: the caller fetches it and runs again
        raise
    except CdpError as e:
        out.note += f"{part.name or 'volume'}: ext file system unreadable: {e}; "
        return
    fp = ext4index.fingerprint(part, fs)
    out.parts.append(fp)
    same = base is not None and bp is not None and ext4index.same_fs(bp, fp)
    ranges = _changed_ranges(out, part, base, changed) if same else None
    ix = ext4index.Ext4Indexer(fs, part, "/" + part.name if part.name else "", backup_ns, chunk)
    ix.prefetch = prefetch
    if same and ranges is not None and catalog is not None and base is not None:
        async for _ in ix.diff(catalog, base, ranges):
            yield None
        out.sb_gdt_changed += ix.sb_gdt_changed
    else:
        out.kind = "full"
        old: dict[int, list[Entry]] = {}
        if bp is not None and catalog is not None and base is not None:
            old = catalog.all_visible(part.name, base.version)
        async for _ in ix.full(old, bp is not None and not same):
            yield None
    out.parsed += ix.parsed
    out.changed_records += ix.changed_records
    out.plans.append(ix.plan)


def _dir_lookup(cat: Catalog, part: str, version: int) -> Callable[[int], DirInfo | None]:
    return lambda r: cat.dir_info(part, r, version)


def _subtree_lookup(cat: Catalog, version: int) -> Callable[[str], list[Entry]]:
    return lambda d: cat.subtree(d, version)


async def persist(catalog: Catalog, c: Computed, version: int, seq: int, time_ns: int,
                  batch: int = WRITE_BATCH) -> int:
    """Write a computed version in one transaction (yielding between batches of
    *batch* rows). Returns the number of yields."""
    with gc_paused():
        return await _persist(catalog, c, version, seq, time_ns, batch)


async def _persist(catalog: Catalog, c: Computed, version: int, seq: int, time_ns: int,
                   batch: int) -> int:
    steps = 0
    catalog.begin()
    try:
        # a first index (nothing catalogued yet): rows in first, indexes built after
        bulk = catalog.bulk_begin()
        for plan in c.plans:
            pos = 0
            while True:
                pos2 = catalog.write_plan(plan, version, pos, batch, time_ns)
                if pos2 == pos:
                    break
                pos = pos2
                steps += 1
                gc_step()
                await asyncio.sleep(0)
        if bulk:
            await _in_thread(catalog.bulk_end)
        extra: dict[str, Any] = {"parsed": c.parsed, "changed_records": c.changed_records,
                                 "seconds": round(c.seconds, 4)}
        if c.sb_gdt_changed:
            extra["sb_gdt_changed"] = c.sb_gdt_changed
        catalog.finish_version(version, seq, time_ns, c.kind, c.parts, c.plans, c.note, extra)
    except BaseException:
        catalog.rollback()
        raise
    # the WAL → database copy runs in a thread: it is all SQLite I/O (no GIL held)
    await asyncio.to_thread(catalog.checkpoint)
    return steps


async def _in_thread(fn: Callable[[], None]) -> None:
    """Run *fn* in a worker thread. A cancellation waits for it to end before it is
    raised (the caller then rolls back on the connection *fn* used: never two threads
    on it at once)."""
    fut = asyncio.get_running_loop().run_in_executor(None, fn)
    try:
        await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


class View:
    """The catalog as of one point: a catalogued version, plus (for other points) an
    overlay computed on demand (entries closed by it hidden, entries it adds shown).
    Nothing of an overlay is persisted."""

    def __init__(self, catalog: Catalog, version: int | None, computed: Computed | None = None,
                 seq: int = 0) -> None:
        self.catalog = catalog
        self.version = version
        self.seq = seq
        self.computed = computed
        self.closed: set[int] = set()
        self.added: list[Entry] = []
        self.parts: list[dict[str, Any]] = []
        self.note = ""
        if computed is not None:
            for p in computed.plans:
                self.closed |= p.closed_ids()
                self.added.extend(p.added)
            self.parts = computed.parts
            self.note = computed.note
        elif version is not None:
            for v in catalog.versions():
                if v.version == version:
                    self.parts, self.note = v.parts, v.note
        self._by_dir: dict[str, list[Entry]] = {}
        for e in self.added:
            self._by_dir.setdefault(e.dir, []).append(e)

    def _filter(self, rows: list[Entry]) -> list[Entry]:
        if not self.closed:
            return rows
        return [e for e in rows if e.id not in self.closed]

    def list_dir(self, directory: str) -> list[Entry]:
        """Entries directly in *directory*, sorted by name."""
        rows = self._filter(self.catalog.list_dir(directory, self.version)) if self.version else []
        extra = self._by_dir.get(directory)
        if not extra:
            return rows  # the catalog's listing comes sorted by name
        return sorted(rows + extra, key=lambda e: e.name)

    def walk(self, directory: str) -> list[Entry]:
        """Entries anywhere below *directory*, sorted by path."""
        rows = (self._filter(self.catalog.subtree(directory, self.version, full=False))
                if self.version else [])
        pre = directory.rstrip("/") + "/"
        rows += [e for e in self.added if directory == "/" or e.dir == directory or e.dir.startswith(pre)]
        return sorted(rows, key=lambda e: (e.dir, e.name))

    def lookup(self, directory: str, name: str) -> Entry | None:
        """The entry at a path (exact, then case-insensitive)."""
        for e in self._by_dir.get(directory, []):
            if e.name == name:
                return e
        if self.version:
            e2 = self.catalog.at_path(directory, name, self.version)
            if e2 is not None and e2.id not in self.closed:
                return e2
        low = name.lower()
        for d, rows in self._by_dir.items():
            if d.lower() == directory.lower():
                for e in rows:
                    if e.name.lower() == low:
                        return e
        return None

    def entries_of(self, part: str, records: set[int]) -> dict[int, list[Entry]]:
        """Entries of *records* in this view, by record."""
        out = self.catalog.visible(part, records, self.version) if self.version else {}
        out = {r: self._filter(v) for r, v in out.items()}
        for e in self.added:
            if e.part == part and e.record in records:
                out.setdefault(e.record, []).append(e)
        return {r: v for r, v in out.items() if v}

    def overlay_records(self) -> set[tuple[str, int]]:
        if self.computed is None:
            return set()
        out: set[tuple[str, int]] = set()
        for p in self.computed.plans:
            out |= {(p.part, e.record) for e in p.modified + p.deleted + p.added}
        return out


__all__ = ["CHUNK_RECORDS", "WRITE_BATCH", "Computed", "Corruption", "View", "compute", "gc_paused", "persist"]
