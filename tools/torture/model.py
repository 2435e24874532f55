"""What the torture writers wrote and what must therefore be readable.

Every 4 KiB block of a checked volume holds either zeros or ``content(block, gen)``: a
16-byte header (block number, generation) and filler derived from both, so one read
says which write a block came from and whether any byte of it is wrong. Generations are
globally unique (one counter), 0 means "zeros".

The rule checked after every crash, per block: the content is the generation that was
there at the last completed FLUSH covering it (``durable``), or one written after that
flush (``pending``: acknowledged or not, a write after the last flush may or may not
survive), or — while a rewind was in flight — the rewind target's generation. Anything
else is a lost (or corrupted) acknowledged write.
"""

from __future__ import annotations

import hashlib
import random
import struct
import threading
from dataclasses import dataclass, field

import numpy as np

BLOCK = 4096
_HDR = struct.Struct("<QQ")


def content(block: int, gen: int) -> bytes:
    """The 4 KiB written as generation *gen* of *block* (zeros for gen 0)."""
    if gen == 0:
        return bytes(BLOCK)
    head = _HDR.pack(block, gen)
    if gen % 3 == 0:  # compressible: lz4 path in the journal
        d = hashlib.blake2b(head, digest_size=64).digest()
        return head + (d * (BLOCK // 64))[: BLOCK - len(head)]
    return head + random.Random(gen * 1_000_003 + block).randbytes(BLOCK - len(head))


def decode(block: int, data: bytes) -> int | None:
    """The generation *data* (4 KiB read from *block*) is, or None if it is no valid one."""
    if data == bytes(BLOCK):
        return 0
    b, gen = _HDR.unpack_from(data)
    if b != block or gen <= 0 or gen >= 1 << 62:
        return None
    return gen if content(block, gen) == data else None


@dataclass
class Model:
    """The expected state of one volume of ``nblocks`` 4 KiB blocks."""

    nblocks: int
    durable: np.ndarray = field(init=False)
    pending: dict[int, set[int]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)
    _gen: int = 0

    def __post_init__(self) -> None:
        self.durable = np.zeros(self.nblocks, dtype=np.int64)

    def next_gen(self) -> int:
        with self.lock:
            self._gen += 1
            return self._gen

    def issued(self, block: int, gen: int) -> None:
        """A write of *gen* to *block* was sent (its outcome is unknown until a flush)."""
        with self.lock:
            self.pending.setdefault(block, set()).add(gen)

    def flushed(self, writes: list[tuple[int, int]]) -> None:
        """A FLUSH completed after *writes* (in send order) were acknowledged."""
        with self.lock:
            for block, gen in writes:  # send order: the last write of a block wins
                self.durable[block] = gen
                # each block has one writer, which waited for this flush: nothing of it
                # is in flight any more
                self.pending.pop(block, None)

    def allowed(self, block: int) -> set[int]:
        s = {int(self.durable[block])}
        s.update(self.pending.get(block, ()))
        return s

    def snapshot(self) -> np.ndarray:
        """The durable state (callers quiesce writers first, so pending is empty)."""
        with self.lock:
            return self.durable.copy()

    def settle(self, observed: np.ndarray) -> None:
        """After a crash and its check: what was read is the new truth."""
        with self.lock:
            self.durable = observed.copy()
            self.pending.clear()


@dataclass
class CheckResult:
    checked: int = 0  # blocks holding acknowledged, flushed data that were verified
    lost: int = 0  # blocks whose content is not allowed
    details: list[str] = field(default_factory=list)


def check_blocks(
    model: Model, data: bytes, first_block: int = 0, extra: np.ndarray | None = None
) -> tuple[CheckResult, np.ndarray]:
    """Check *data* (read from block *first_block* on) against *model*; *extra*: another
    allowed generation per block (a rewind target while the rewind was in flight)."""
    res = CheckResult()
    n = len(data) // BLOCK
    observed = np.zeros(n, dtype=np.int64)
    mv = memoryview(data)
    for i in range(n):
        b = first_block + i
        chunk = bytes(mv[i * BLOCK : (i + 1) * BLOCK])
        gen = decode(b, chunk)
        allowed = model.allowed(b)
        if extra is not None:
            allowed.add(int(extra[b]))
        if model.durable[b]:
            res.checked += 1
        if gen is None or gen not in allowed:
            res.lost += 1
            if len(res.details) < 10:
                res.details.append(f"block {b}: read gen {gen}, allowed {sorted(allowed)}")
            observed[i] = -1 if gen is None else gen
        else:
            observed[i] = gen
    return res, observed


def check_exact(expect: np.ndarray, data: bytes, first_block: int = 0) -> CheckResult:
    """A read-only point-in-time view must hold exactly *expect* (no pending writes)."""
    res = CheckResult()
    mv = memoryview(data)
    for i in range(len(data) // BLOCK):
        b = first_block + i
        gen = decode(b, bytes(mv[i * BLOCK : (i + 1) * BLOCK]))
        res.checked += 1
        if gen != int(expect[b]):
            res.lost += 1
            if len(res.details) < 10:
                res.details.append(f"block {b}: read gen {gen}, expected {int(expect[b])}")
    return res
