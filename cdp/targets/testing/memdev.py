"""A RAM-backed block device and export provider, for protocol tests and benchmarks.

The data lives in one bytearray; a byte per 4 KiB block records whether the block is
allocated, so ``base:allocation`` reports holes (never written, trimmed, or zeroed with
trimming allowed) and data. Not used by the appliance itself.
"""

from __future__ import annotations

from collections.abc import Iterable

from cdp.errors import NotFound, OutOfRange, ReadOnly
from cdp.targets.blockdev import BlockDevice
from cdp.targets.nbd.proto import BASE_ALLOCATION, StateFlag

BLOCK = 4096
_HOLE = int(StateFlag.HOLE | StateFlag.ZERO)


class MemoryDevice:
    """A fixed-size RAM disk. Every connection shares it (so ``can_multi_conn``)."""

    def __init__(
        self,
        size: int,
        *,
        read_only: bool = False,
        description: str = "",
        extra_contexts: Iterable[str] = (),
        min_block_size: int = 1,
    ) -> None:
        self.size = size
        self.read_only = read_only
        self.can_multi_conn = True
        self.description = description
        #: the alignment the NBD core advertises and enforces (byte addressed: 1)
        self.min_block_size = min_block_size
        self.data = bytearray(size)
        self._view = memoryview(self.data)
        self.alloc = bytearray((size + BLOCK - 1) // BLOCK)
        self.extra_contexts = list(extra_contexts)
        self.flushes = 0
        self.closed = 0

    def _check(self, offset: int, length: int, write: bool) -> None:
        if write and self.read_only:
            raise ReadOnly("read-only export")
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OutOfRange(f"{offset}+{length} beyond {self.size}")

    def read(self, offset: int, length: int) -> bytes:
        self._check(offset, length, False)
        return self._view[offset : offset + length].tobytes()

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        n = len(data)
        self._check(offset, n, True)
        self.data[offset : offset + n] = data
        if n:
            first, last = offset // BLOCK, (offset + n - 1) // BLOCK
            self.alloc[first : last + 1] = b"\x01" * (last - first + 1)

    def flush(self) -> None:
        self.flushes += 1

    def _punch(self, offset: int, length: int) -> None:
        """Zero a range; whole blocks inside it become holes."""
        self.data[offset : offset + length] = bytes(length)
        first = -(-offset // BLOCK)
        end = offset + length
        last = end // BLOCK if end < self.size else len(self.alloc)
        if last > first:
            self.alloc[first:last] = bytes(last - first)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self._check(offset, length, True)
        self._punch(offset, length)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool) -> None:
        self._check(offset, length, True)
        if may_trim:
            self._punch(offset, length)
        elif length:
            self.write(offset, bytes(length), fua)

    def cache(self, offset: int, length: int) -> None:
        self._check(offset, length, False)

    def meta_contexts(self) -> list[str]:
        return [BASE_ALLOCATION, *self.extra_contexts]

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        self._check(offset, length, False)
        end = offset + length
        if context != BASE_ALLOCATION:
            return [(length, 0)]
        alloc = self.alloc
        runs: list[tuple[int, int]] = []
        pos = offset
        while pos < end:
            blk = pos // BLOCK
            state = alloc[blk]
            nxt = blk + 1
            # extend over blocks in the same state
            while nxt * BLOCK < end and alloc[nxt] == state:
                nxt += 1
            stop = min(nxt * BLOCK, end)
            runs.append((stop - pos, 0 if state else _HOLE))
            pos = stop
        return runs

    def close(self) -> None:
        self.closed += 1


class MemoryProvider:
    """Exports by name; the empty name opens the first export (the default)."""

    def __init__(self) -> None:
        self.exports: dict[str, MemoryDevice] = {}

    def add(
        self,
        name: str,
        size: int,
        *,
        read_only: bool = False,
        description: str = "",
        extra_contexts: Iterable[str] = (),
        min_block_size: int = 1,
    ) -> MemoryDevice:
        dev = MemoryDevice(
            size, read_only=read_only, description=description, extra_contexts=extra_contexts,
            min_block_size=min_block_size,
        )
        self.exports[name] = dev
        return dev

    def list_exports(self) -> list[tuple[str, str]]:
        return [(name, dev.description) for name, dev in self.exports.items()]

    def open_export(self, name: str) -> BlockDevice:
        if name == "" and self.exports:
            return next(iter(self.exports.values()))
        try:
            return self.exports[name]
        except KeyError:
            raise NotFound(f"no export named {name!r}") from None
