"""SBC-3 block commands: READ / WRITE / WRITE AND VERIFY / VERIFY, ORWRITE, COMPARE AND
WRITE, WRITE SAME, UNMAP, SYNCHRONIZE CACHE, PRE-FETCH, READ CAPACITY 10/16 and GET LBA
STATUS, over a :class:`~cdp.targets.blockdev.BlockDevice`.

512-byte logical blocks, 4096-byte physical blocks (LBPPBE 3). The device is thin
(LBPME) and unmapped blocks read as zeroes (LBPRZ): UNMAP and WRITE SAME with UNMAP go to
``write_zeroes(may_trim=True)``. FUA and SYNCHRONIZE CACHE go to the device's ``fua`` and
``flush()`` (the journal's group commit). A command whose device call answers directly
returns its :class:`~cdp.targets.iscsi.command.ScsiResult` directly (the READ/WRITE fast
path), else an awaitable of one.

:class:`BlockCommands` is the part of :class:`~cdp.targets.iscsi.scsi.LogicalUnit` that
runs these commands.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar, cast

from cdp.targets.blockdev import BlockDevice
from cdp.targets.iscsi.command import (
    BLOCK,
    GOOD,
    PREFETCH16,
    READ6,
    SAI_GET_LBA_STATUS,
    SAI_READ_CAPACITY16,
    SYNC_CACHE16,
    WRITE6,
    WRITE_SAME16,
    ScsiRequest,
    ScsiResult,
    check_condition,
    is_awaitable,
    u16,
    u32,
    u64,
)
from cdp.targets.iscsi.pr import LuState
from cdp.targets.iscsi.sense import Asc, ScsiError, Sense, SenseKey, Status, illegal

LBPPBE = 3  # 2**3 logical blocks per physical block (4096)
MAX_XFER_BLOCKS = 16384  # 8 MiB per command, as advertised in the Block Limits VPD page
HARD_XFER_BLOCKS = 1 << 18  # what is actually refused (128 MiB)
MAX_WS_BLOCKS = 1 << 22  # 2 GiB per WRITE SAME
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCS = 256
MAX_CAW_BLOCKS = 128
OPT_GRAN = 8


T = TypeVar("T")


def _then(value: T | Awaitable[T], after: Callable[[T], ScsiResult]) -> ScsiResult | Awaitable[ScsiResult]:
    """``after(value)`` now, or once ``value`` (an awaitable) resolves."""
    if is_awaitable(value):
        aw = cast(Awaitable[T], value)

        async def _wait() -> ScsiResult:
            return after(await aw)

        return _wait()
    return after(cast(T, value))


async def _aw(value: Any) -> Any:
    if inspect.isawaitable(value):
        return await value
    return value


def _lba_len(cdb: bytes) -> tuple[int, int]:
    """(LBA, number of blocks) of a READ/WRITE/VERIFY-style CDB of any size."""
    n = len(cdb)
    op = cdb[0]
    if op in (READ6, WRITE6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        count = cdb[4] or 256
        return lba, count
    if n >= 16 and op >= 0x80 and op < 0xA0:
        return u64(cdb, 2), u32(cdb, 10)
    if op >= 0xA0:
        return u32(cdb, 2), u32(cdb, 6)
    return u32(cdb, 2), u16(cdb, 7)


class BlockCommands:
    """Block commands of a logical unit (mixed into LogicalUnit)."""

    device: BlockDevice
    state: LuState
    blocks: int
    read_only: bool

    def _range(self, lba: int, count: int) -> None:
        if lba + count > self.blocks or lba > self.blocks:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE))

    def _writable(self) -> None:
        if self.read_only or self.state.swp:
            raise ScsiError(Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED))

    @staticmethod
    def _no_protect(cdb: bytes) -> None:
        if cdb[0] not in (READ6, WRITE6) and cdb[1] & 0xE0:
            raise illegal(field=1, bit=7)

    def _xfer_check(self, req: ScsiRequest, nbytes: int) -> None:
        """Data-Out must be exactly what the CDB asks for (else INVALID FIELD IN IU)."""
        if req.edtl != nbytes or len(req.data) != nbytes:
            raise ScsiError(
                Sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_INFORMATION_UNIT)
            )

    # --- READ / WRITE -------------------------------------------------------------------
    def _read(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = _lba_len(cdb)
        self._no_protect(cdb)
        self._range(lba, count)
        if count == 0:
            return GOOD
        if count > HARD_XFER_BLOCKS:
            raise illegal(field=7 if len(cdb) == 10 else 6)
        return _then(self.device.read(lba * BLOCK, count * BLOCK), _data_result)

    def _write(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = _lba_len(cdb)
        self._no_protect(cdb)
        nbytes = count * BLOCK
        self._range(lba, count)
        self._writable()
        fua = bool(cdb[1] & 0x08) and cdb[0] != WRITE6
        if req.edtl != nbytes or len(req.data) != nbytes:
            return self._write_truncated(lba, nbytes, req, fua)
        if count == 0:
            return GOOD
        return _then(self.device.write(lba * BLOCK, req.data, fua), _good)

    def _write_truncated(self, lba: int, nbytes: int, req: ScsiRequest,
                         fua: bool) -> ScsiResult | Awaitable[ScsiResult]:
        """EDTL differs from the CDB's length: write the whole blocks both cover and
        report the residual (FCP-4 / RFC 7143 §11.4.5: data past EDTL is not moved)."""
        n = min(nbytes, req.edtl, len(req.data)) // BLOCK * BLOCK
        res = ScsiResult(Status.GOOD, spdtl=nbytes)
        if n == 0:
            return res
        return _then(self.device.write(lba * BLOCK, req.data[:n], fua), lambda _: res)

    def _write_verify(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = _lba_len(cdb)
        self._no_protect(cdb)
        self._range(lba, count)
        self._writable()
        nbytes = count * BLOCK
        if req.edtl != nbytes or len(req.data) != nbytes:
            return self._write_truncated(lba, nbytes, req, True)
        if count == 0:
            return GOOD
        # write-and-verify is durable before status: the verify reads stable media
        return _then(self.device.write(lba * BLOCK, req.data, True), _good)

    def _verify(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = _lba_len(cdb)
        self._no_protect(cdb)
        bytchk = (cdb[1] >> 1) & 3
        if bytchk == 2:
            raise illegal(field=1, bit=2)
        self._range(lba, count)
        if count == 0 or bytchk == 0:
            return GOOD
        want = BLOCK if bytchk == 3 else count * BLOCK
        self._xfer_check(req, want)
        expect = req.data * count if bytchk == 3 else req.data

        def compare(got: bytes) -> ScsiResult:
            if got != expect:
                return check_condition(_miscompare(got, expect), self.state.d_sense)
            return GOOD

        return _then(self.device.read(lba * BLOCK, count * BLOCK), compare)

    def _orwrite(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = _lba_len(cdb)
        self._no_protect(cdb)
        self._range(lba, count)
        self._writable()
        if count == 0:
            return GOOD
        self._xfer_check(req, count * BLOCK)
        fua = bool(cdb[1] & 0x08)

        async def run() -> ScsiResult:
            old = await _aw(self.device.read(lba * BLOCK, count * BLOCK))
            new = (int.from_bytes(old, "big") | int.from_bytes(req.data, "big")).to_bytes(
                len(old), "big"
            )
            await _aw(self.device.write(lba * BLOCK, new, fua))
            return GOOD

        return run()

    def _compare_and_write(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba = u64(cdb, 2)
        count = cdb[13]
        self._no_protect(cdb)
        if count > MAX_CAW_BLOCKS:
            raise illegal(field=13)
        self._range(lba, count)
        self._writable()
        if count == 0:
            if req.edtl:  # a length that wrapped (256 -> 0) with data attached
                raise illegal(field=13)
            return GOOD
        self._xfer_check(req, 2 * count * BLOCK)
        n = count * BLOCK
        verify, data = req.data[:n], req.data[n:]
        fua = bool(cdb[1] & 0x08)

        async def run() -> ScsiResult:
            got = await _aw(self.device.read(lba * BLOCK, n))
            if got != verify:
                return check_condition(_miscompare(got, verify), self.state.d_sense)
            await _aw(self.device.write(lba * BLOCK, data, fua))
            return GOOD

        return run()

    def _write_same(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        lba, count = (u64(cdb, 2), u32(cdb, 10)) if cdb[0] == WRITE_SAME16 else (
            u32(cdb, 2), u16(cdb, 7))
        self._no_protect(cdb)
        unmap = bool(cdb[1] & 0x08)
        ndob = cdb[0] == WRITE_SAME16 and bool(cdb[1] & 0x01)
        if cdb[1] & 0x10:  # ANCHOR
            raise illegal(field=1, bit=4)
        if ndob and not unmap:
            raise illegal(field=1, bit=0)
        if count == 0:
            count = self.blocks - lba if lba <= self.blocks else 0
            if count == 0:
                self._range(lba, 0)
                return GOOD
        if count > MAX_WS_BLOCKS:
            raise illegal(field=10 if cdb[0] == WRITE_SAME16 else 7)
        self._range(lba, count)
        self._writable()
        if not ndob:
            self._xfer_check(req, BLOCK)
        block = bytes(BLOCK) if ndob else req.data
        off, length = lba * BLOCK, count * BLOCK
        if unmap or block.count(0) == BLOCK:
            # UNMAP: the blocks are deallocated (and read as zeroes, LBPRZ) whatever
            # the data block holds, as initiators and the conformance suite expect
            return _then(self.device.write_zeroes(off, length, False, unmap, False), _good)

        async def run() -> ScsiResult:
            chunk_blocks = 2048
            pos = 0
            while pos < count:
                n = min(chunk_blocks, count - pos)
                await _aw(self.device.write(off + pos * BLOCK, block * n, False))
                pos += n
            return GOOD

        return run()

    def _unmap(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        if cdb[1] & 0x01:  # ANCHOR
            raise illegal(field=1, bit=0)
        plen = u16(cdb, 7)
        if plen == 0:
            return GOOD
        data = req.data[:plen]
        if plen < 8 or len(data) < 8:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        bd_len = u16(data, 2)
        if bd_len + 8 > len(data):
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        ndesc = bd_len // 16
        if ndesc > MAX_UNMAP_DESCS:
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=2, in_cdb=False)
        ranges = []
        for i in range(ndesc):
            o = 8 + 16 * i
            lba, count = u64(data, o), u32(data, o + 8)
            self._range(lba, count)
            if count > MAX_UNMAP_BLOCKS:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=o + 8, in_cdb=False)
            if count:
                ranges.append((lba, count))
        self._writable()

        async def run() -> ScsiResult:
            for lba, count in ranges:
                await _aw(self.device.write_zeroes(lba * BLOCK, count * BLOCK, False, True, False))
            return GOOD

        return run()

    # --- cache, capacity, provisioning --------------------------------------------------
    def _sync_cache(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        if cdb[0] == SYNC_CACHE16:
            lba, count = u64(cdb, 2), u32(cdb, 10)
        else:
            lba, count = u32(cdb, 2), u16(cdb, 7)
        self._range(lba, count)
        return _then(self.device.flush(), _good)

    def _prefetch(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        if cdb[0] == PREFETCH16:
            lba, count = u64(cdb, 2), u32(cdb, 10)
        else:
            lba, count = u32(cdb, 2), u16(cdb, 7)
        self._range(lba, count)
        if count == 0:
            count = self.blocks - lba
        return _then(self.device.cache(lba * BLOCK, count * BLOCK), _condition_met)

    def _read_capacity10(self, req: ScsiRequest) -> ScsiResult:
        last = self.blocks - 1
        return ScsiResult(
            Status.GOOD, min(last, 0xFFFFFFFF).to_bytes(4, "big") + BLOCK.to_bytes(4, "big")
        )

    def _service_action_in(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        alloc = u32(cdb, 10)
        if sa == SAI_READ_CAPACITY16:
            b = bytearray(32)
            b[0:8] = (self.blocks - 1).to_bytes(8, "big")
            b[8:12] = BLOCK.to_bytes(4, "big")
            b[13] = LBPPBE
            b[14] = 0x80 | 0x40  # LBPME, LBPRZ
            return ScsiResult(Status.GOOD, bytes(b[:alloc]))
        if sa == SAI_GET_LBA_STATUS:
            return self._get_lba_status(u64(cdb, 2), alloc)
        raise illegal(field=1, bit=4)

    def _get_lba_status(self, lba: int, alloc: int) -> ScsiResult | Awaitable[ScsiResult]:
        if lba >= self.blocks:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE))
        if alloc < 4:
            return ScsiResult(Status.GOOD, b"")
        max_desc = max(1, min(64, (alloc - 8) // 16))
        offset = lba * BLOCK
        length = min(self.device.size - offset, 1 << 30)

        async def run() -> ScsiResult:
            runs = await _aw(self.device.block_status("base:allocation", offset, length))
            descs: list[tuple[int, int, int]] = []
            pos = lba
            for run_len, flags in runs:
                nblk = -(-run_len // BLOCK)
                if nblk <= 0:
                    continue
                nblk = min(nblk, self.blocks - pos)
                state = 1 if flags & 1 else 0
                if descs and descs[-1][2] == state:
                    s_lba, s_n, _ = descs[-1]
                    descs[-1] = (s_lba, s_n + nblk, state)
                else:
                    if len(descs) == max_desc:
                        break
                    descs.append((pos, nblk, state))
                pos += nblk
                if pos >= self.blocks:
                    break
            body = b"".join(
                a.to_bytes(8, "big") + min(n, 0xFFFFFFFF).to_bytes(4, "big") + bytes([s, 0, 0, 0])
                for a, n, s in descs
            )
            head = (len(body) + 4).to_bytes(4, "big") + bytes(4)
            return ScsiResult(Status.GOOD, (head + body)[:alloc])

        return run()


def _miscompare(got: bytes, want: bytes) -> Sense:
    off = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
    return Sense(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, info=off)


def _data_result(data: bytes) -> ScsiResult:
    return ScsiResult(Status.GOOD, data)


def _good(_: object) -> ScsiResult:
    return GOOD


def _condition_met(_: object) -> ScsiResult:
    return ScsiResult(Status.CONDITION_MET)
