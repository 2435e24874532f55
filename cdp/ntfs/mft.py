"""An NTFS file system read through a ``read(offset, length) -> bytes`` callable.

Design notes
------------
* The reader never caches volume bytes: it is built per point in time (a Volume read at
  a seq, a file, fuzz bytes). Building it costs two record reads (boot sector and MFT
  record 0 with its extension records).
* The MFT's extents come from record 0's ``$DATA`` runlist, so a grown or fragmented MFT
  is followed; :meth:`records_in` maps changed volume byte ranges to the record numbers
  they may touch.
* :meth:`read_records` returns records with extension records merged (it reads the
  bases of changed extension records and the extensions of changed bases).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterable, Iterator

from cdp.errors import Corruption
from cdp.ntfs.attribute import DataStream, parse_attribute_list
from cdp.ntfs.boot import BootSector
from cdp.ntfs.defs import MFT_RECORD, MFT_SEGMENT_MASK
from cdp.ntfs.record import FileRecord, parse_chunk

Reader = Callable[[int, int], bytes]

#: records read per chunk in a scan (4 MiB with 1 KiB records)
SCAN_CHUNK_RECORDS = 4096


class MftExtent:
    """Records ``[first, first + count)`` lie at volume byte ``offset`` (contiguous)."""

    __slots__ = ("count", "first", "offset")

    def __init__(self, first: int, count: int, offset: int) -> None:
        self.first = first
        self.count = count
        self.offset = offset

    def __repr__(self) -> str:
        return f"MftExtent(records {self.first}+{self.count} at {self.offset})"


class NtfsVolume:
    """An NTFS file system at byte *base* of what *read* reads."""

    def __init__(self, read: Reader, base: int = 0, size: int | None = None) -> None:
        self._read = read
        self.base = base
        self.boot = BootSector.from_bytes(read(base, 512))
        self.size = self.boot.size if size is None else min(size, self.boot.size)
        self.record_size = self.boot.record_size
        self.cluster_size = self.boot.cluster_size
        self.max_lcn = self.size // self.cluster_size + 1
        self.extents: list[MftExtent] = []
        self._load_mft()

    # ------------------------------------------------------------------ MFT layout

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at *offset* of the file system (relative to its first sector)."""
        return self._read(self.base + offset, length)

    def _load_mft(self) -> None:
        rs = self.record_size
        bps = self.boot.bytes_per_sector
        rec0 = FileRecord.from_bytes(self.read(self.boot.mft_lcn * self.cluster_size, rs), 0, bps)
        if rec0.damaged or rec0.data is None or rec0.data.resident:
            # the first records are mirrored in $MFTMirr
            mirror = FileRecord.from_bytes(self.read(self.boot.mft2_lcn * self.cluster_size, rs), 0, bps)
            if mirror.damaged or mirror.data is None or mirror.data.resident:
                raise Corruption(f"$MFT record 0 is unreadable ({rec0.damaged or 'no $DATA'})")
            rec0 = mirror
        assert rec0.data is not None
        self._set_extents(rec0.data)
        if rec0.extensions:
            # a very fragmented MFT: the rest of its runlist is in extension records,
            # which the first fragment is expected to cover
            for n in sorted(set(self._extension_numbers(rec0)) - {0}):
                ext = self.read_record(n)
                if ext.base_number == 0 and not ext.damaged:
                    rec0.merge(ext)
            self._set_extents(rec0.data)
        self.mft_size = rec0.data.size
        self.record_count = min(self.mft_size // rs, sum(e.count for e in self.extents))

    def _set_extents(self, data: DataStream) -> None:
        rs, cs = self.record_size, self.cluster_size
        exts: list[MftExtent] = []
        for run in data.runs(self.max_lcn):
            if run.lcn is None:
                raise Corruption("$MFT has a sparse run")
            start_b = run.vcn * cs
            end_b = start_b + run.length * cs
            first = -(-start_b // rs)  # records fully inside this run
            last = end_b // rs
            if last > first:
                exts.append(MftExtent(first, last - first, run.lcn * cs + (first * rs - start_b)))
        self.extents = exts
        self._firsts = [e.first for e in exts]

    def record_offset(self, number: int) -> int:
        """Byte offset (file-system relative) of record *number*. Raises Corruption."""
        i = bisect.bisect_right(self._firsts, number) - 1
        if i >= 0:
            e = self.extents[i]
            if number < e.first + e.count:
                return e.offset + (number - e.first) * self.record_size
        raise Corruption(f"MFT record {number} is outside the MFT's extents")

    def records_in(self, ranges: Iterable[tuple[int, int]]) -> list[int]:
        """Record numbers whose bytes intersect the given *volume* byte ranges
        ``[start, end)`` (sorted, as :meth:`Volume.changed` returns them).
        Cost: O(ranges + extents + result)."""
        rs = self.record_size
        out: set[int] = set()
        rl = sorted(ranges)
        starts = [r[0] for r in rl]
        for e in self.extents:
            lo = self.base + e.offset
            hi = lo + e.count * rs
            i = max(bisect.bisect_right(starts, lo) - 1, 0)
            while i < len(rl) and rl[i][0] < hi:
                s, t = rl[i]
                s, t = max(s, lo), min(t, hi)
                if s < t:
                    a = e.first + (s - lo) // rs
                    b = e.first + (t - lo - 1) // rs
                    out.update(range(a, min(b, self.record_count - 1) + 1))
                i += 1
        return sorted(n for n in out if n < self.record_count)

    # ------------------------------------------------------------------ records

    def read_record(self, number: int) -> FileRecord:
        """One record (extension records not merged). Damaged → ``damaged`` set."""
        try:
            off = self.record_offset(number)
        except Corruption as e:
            rec = FileRecord(number)
            rec.damaged = str(e)
            return rec
        return FileRecord.from_bytes(self.read(off, self.record_size), number, self.boot.bytes_per_sector)

    def _read_raw(self, numbers: list[int]) -> dict[int, FileRecord]:
        """Records by number, consecutive numbers in one extent read together."""
        out: dict[int, FileRecord] = {}
        rs = self.record_size
        bps = self.boot.bytes_per_sector
        i = 0
        nums = sorted(set(numbers))
        while i < len(nums):
            n = nums[i]
            try:
                off = self.record_offset(n)
            except Corruption as e:
                rec = FileRecord(n)
                rec.damaged = str(e)
                out[n] = rec
                i += 1
                continue
            j = i + 1
            while j < len(nums) and nums[j] == nums[j - 1] + 1 and j - i < 1024:
                try:
                    if self.record_offset(nums[j]) != off + (nums[j] - n) * rs:
                        break
                except Corruption:
                    break
                j += 1
            chunk = self.read(off, (j - i) * rs)
            for rec in parse_chunk(chunk, n, rs, bps, include_free=True):
                out[rec.number] = rec
            i = j
        return out

    def _extension_numbers(self, rec: FileRecord) -> list[int]:
        if rec.attribute_list is not None:
            try:
                value = rec.attribute_list.read(self.read, self.cluster_size, self.max_lcn)
                rec.extensions = [e[2] for e in parse_attribute_list(value)]
            except Corruption as e:
                rec.damaged = f"$ATTRIBUTE_LIST: {e}"
                rec.extensions = []
            rec.attribute_list = None
        return [n for n in (rec.extensions or []) if n != rec.number]

    def read_records(self, numbers: Iterable[int]) -> dict[int, FileRecord]:
        """Records by number with extension records merged into their bases.

        The result has an entry for every requested number and for the base of every
        requested extension record; an extension record itself maps to its base's
        state via the base's number (it is not a file). Cost: one read per run of
        consecutive record numbers.
        """
        want = set(numbers)
        raw = self._read_raw(sorted(want))
        bases = {r.base_number for r in raw.values() if r.in_use and r.base_number and not r.damaged}
        missing = [b for b in bases if b not in raw]
        raw.update(self._read_raw(missing))
        need: set[int] = set()
        for r in list(raw.values()):
            if r.in_use and not r.base_number and not r.damaged and (r.extensions is not None or r.attribute_list is not None):
                need.update(n for n in self._extension_numbers(r) if n not in raw)
        raw.update(self._read_raw(sorted(need)))
        return merge_extensions(raw)

    def scan(self, chunk_records: int = SCAN_CHUNK_RECORDS) -> Iterator[list[FileRecord]]:
        """Every in-use record, chunk by chunk in MFT order (extension records are
        yielded as they are; :func:`merge_extensions` joins them). Cost: one read per
        chunk; ~5-8 us of Python per used record."""
        rs = self.record_size
        bps = self.boot.bytes_per_sector
        for e in self.extents:
            done = 0
            count = min(e.count, max(self.record_count - e.first, 0))
            while done < count:
                n = min(chunk_records, count - done)
                chunk = self.read(e.offset + done * rs, n * rs)
                yield list(parse_chunk(chunk, e.first + done, rs, bps))
                done += n

    def read_stream(self, stream: DataStream) -> bytes:
        """The bytes of a stream of this file system. Raises Corruption."""
        return stream.read(self.read, self.cluster_size, self.max_lcn)


def merge_extensions(raw: dict[int, FileRecord]) -> dict[int, FileRecord]:
    """Merge extension records into their bases (matching sequence numbers); returns
    base records only (extension records are dropped; ones whose base is missing or
    reused are dropped too). Cost: O(records)."""
    out: dict[int, FileRecord] = {}
    exts: list[FileRecord] = []
    for n, r in raw.items():
        if r.in_use and r.base and not r.damaged:
            exts.append(r)
        else:
            out[n] = r
    for x in exts:
        b = out.get(x.base_number)
        if b is not None and b.in_use and not b.damaged and b.sequence == x.base >> 48:
            b.merge(x)
    return out


__all__ = ["MFT_RECORD", "MFT_SEGMENT_MASK", "MftExtent", "NtfsVolume", "merge_extensions"]
