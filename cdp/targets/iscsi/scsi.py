"""SCSI block device emulation (SPC-4 / SBC-3) over a :class:`BlockDevice`.

One :class:`LogicalUnit` per opened export; the state that SCSI says belongs to the
logical unit rather than to a session (SPC-2 reservations, persistent reservations,
mode page settings) lives in a :class:`LuState` shared by every session on that export.

512-byte logical blocks, 4096-byte physical blocks (LBPPBE 3). The device is thin
(LBPME) and unmapped blocks read as zeroes (LBPRZ): UNMAP and WRITE SAME with UNMAP go to
``write_zeroes(may_trim=True)``. FUA and SYNCHRONIZE CACHE go to the device's ``fua`` and
``flush()`` (the journal's group commit).

:meth:`LogicalUnit.execute` returns a :class:`ScsiResult` directly when the device answered
directly (the READ/WRITE fast path) and an awaitable otherwise. Every failure becomes
CHECK CONDITION with sense data: protocol-level ones raised here as
:class:`~cdp.targets.iscsi.sense.ScsiError`, device errors through
:func:`~cdp.targets.iscsi.sense.scsi_sense`.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from cdp.targets.blockdev import BlockDevice
from cdp.targets.iscsi.sense import Asc, ScsiError, Sense, SenseKey, Status, illegal, scsi_sense

BLOCK = 512
LBPPBE = 3  # 2**3 logical blocks per physical block (4096)
MAX_XFER_BLOCKS = 16384  # 8 MiB per command, as advertised in the Block Limits VPD page
HARD_XFER_BLOCKS = 1 << 18  # what is actually refused (128 MiB)
MAX_WS_BLOCKS = 1 << 22  # 2 GiB per WRITE SAME
MAX_UNMAP_BLOCKS = 1 << 20
MAX_UNMAP_DESCS = 256
MAX_CAW_BLOCKS = 128
OPT_GRAN = 8
VENDOR = b"CDP     "
PRODUCT = b"VOLUME          "
REVISION = b"0001"

T = TypeVar("T")


@dataclass(slots=True)
class ScsiRequest:
    """One command as the iSCSI layer hands it over."""

    cdb: bytes
    data: bytes = b""  # Data-Out, exactly the expected data transfer length
    edtl: int = 0
    nexus: str = ""  # I_T nexus: initiator name + ",i,0x" + ISID
    read: bool = False
    write: bool = False


@dataclass(slots=True)
class ScsiResult:
    """Status, Data-In (the length the command produced, already cut to the allocation
    length) and sense bytes. ``spdtl`` is the data-out length the CDB asked for, for the
    write residual; None for commands that read."""

    status: int = Status.GOOD
    data: bytes = b""
    sense: bytes = b""
    spdtl: int | None = None


GOOD = ScsiResult()


#: types a device or handler returns when it finishes at once: checked by identity
#: before the (slower, ABC-based) inspect.isawaitable on the per-command path
_PLAIN = frozenset((bytes, bytearray, memoryview, type(None), ScsiResult, list, int))


def is_awaitable(value: object) -> bool:
    """``inspect.isawaitable(value)``, answered at once for the plain results."""
    return type(value) not in _PLAIN and inspect.isawaitable(value)


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


def _u16(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 2], "big")


def _u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "big")


def _u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 8], "big")


# --- persistent reservations ----------------------------------------------------------
PR_WE, PR_EA, PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR = 1, 3, 5, 6, 7, 8
_PR_TYPES = {PR_WE, PR_EA, PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR}


@dataclass
class LuState:
    """Logical-unit state shared by every session on one export."""

    reserved_by: str | None = None  # SPC-2 RESERVE holder nexus
    pr_generation: int = 0
    pr_keys: dict[str, int] = field(default_factory=dict)  # nexus -> key
    pr_holder: str | None = None
    pr_type: int = 0
    prevent: set[str] = field(default_factory=set)
    d_sense: bool = False
    swp: bool = False
    wce: bool = True

    def release_nexus(self, nexus: str) -> None:
        """I_T nexus loss or logout: SPC-2 reservation and medium-removal prevention go."""
        if self.reserved_by == nexus:
            self.reserved_by = None
        self.prevent.discard(nexus)

    def reset(self) -> None:
        """LOGICAL UNIT RESET / target reset: SPC-2 reservations and PREVENT are cleared."""
        self.reserved_by = None
        self.prevent.clear()

    def pr_is_holder(self, nexus: str) -> bool:
        if self.pr_holder is None:
            return False
        if self.pr_type in (PR_WE_AR, PR_EA_AR):
            return nexus in self.pr_keys
        return self.pr_holder == nexus


# opcodes
TEST_UNIT_READY = 0x00
REQUEST_SENSE = 0x03
READ6 = 0x08
WRITE6 = 0x0A
INQUIRY = 0x12
MODE_SELECT6 = 0x15
RESERVE6 = 0x16
RELEASE6 = 0x17
MODE_SENSE6 = 0x1A
START_STOP_UNIT = 0x1B
PREVENT_ALLOW = 0x1E
READ_CAPACITY10 = 0x25
READ10 = 0x28
WRITE10 = 0x2A
WRITE_VERIFY10 = 0x2E
VERIFY10 = 0x2F
PREFETCH10 = 0x34
SYNC_CACHE10 = 0x35
WRITE_SAME10 = 0x41
UNMAP = 0x42
MODE_SELECT10 = 0x55
RESERVE10 = 0x56
RELEASE10 = 0x57
MODE_SENSE10 = 0x5A
PR_IN = 0x5E
PR_OUT = 0x5F
READ16 = 0x88
COMPARE_AND_WRITE = 0x89
WRITE16 = 0x8A
ORWRITE16 = 0x8B
WRITE_VERIFY16 = 0x8E
VERIFY16 = 0x8F
PREFETCH16 = 0x90
SYNC_CACHE16 = 0x91
WRITE_SAME16 = 0x93
SERVICE_ACTION_IN16 = 0x9E
REPORT_LUNS = 0xA0
MAINTENANCE_IN = 0xA3
READ12 = 0xA8
WRITE12 = 0xAA
WRITE_VERIFY12 = 0xAE
VERIFY12 = 0xAF

SAI_READ_CAPACITY16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_OPCODES = 0x0C

#: opcode -> (service action or None, CDB usage data) for REPORT SUPPORTED OPERATION CODES
_USAGE: dict[tuple[int, int | None], bytes] = {
    (TEST_UNIT_READY, None): bytes([0x00, 0, 0, 0, 0, 0x07]),
    (REQUEST_SENSE, None): bytes([0x03, 0x01, 0, 0, 0xFF, 0x07]),
    (READ6, None): bytes([0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (WRITE6, None): bytes([0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (INQUIRY, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),
    (MODE_SELECT6, None): bytes([0x15, 0x11, 0, 0, 0xFF, 0x07]),
    (RESERVE6, None): bytes([0x16, 0, 0, 0, 0, 0x07]),
    (RELEASE6, None): bytes([0x17, 0, 0, 0, 0, 0x07]),
    (MODE_SENSE6, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),
    (START_STOP_UNIT, None): bytes([0x1B, 0x01, 0, 0x0F, 0xF7, 0x07]),
    (PREVENT_ALLOW, None): bytes([0x1E, 0, 0, 0, 0x03, 0x07]),
    (READ_CAPACITY10, None): bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (READ10, None): bytes([0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE10, None): bytes([0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE_VERIFY10, None): bytes([0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (VERIFY10, None): bytes([0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (PREFETCH10, None): bytes([0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (SYNC_CACHE10, None): bytes([0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE_SAME10, None): bytes([0x41, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (UNMAP, None): bytes([0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x07]),
    (MODE_SELECT10, None): bytes([0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (RESERVE10, None): bytes([0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (RELEASE10, None): bytes([0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (MODE_SENSE10, None): bytes([0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 0): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 1): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 2): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 3): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    **{
        (PR_OUT, sa): bytes([0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07])
        for sa in range(7)
    },
    (READ16, None): bytes([0x88, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (COMPARE_AND_WRITE, None): bytes([0x89, 0xF8] + [0xFF] * 8 + [0, 0, 0, 0xFF, 0x3F, 0x07]),
    (WRITE16, None): bytes([0x8A, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (ORWRITE16, None): bytes([0x8B, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (WRITE_VERIFY16, None): bytes([0x8E, 0xF2] + [0xFF] * 12 + [0x3F, 0x07]),
    (VERIFY16, None): bytes([0x8F, 0xF6] + [0xFF] * 12 + [0x3F, 0x07]),
    (PREFETCH16, None): bytes([0x90, 0x02] + [0xFF] * 12 + [0x3F, 0x07]),
    (SYNC_CACHE16, None): bytes([0x91, 0x02] + [0xFF] * 12 + [0x3F, 0x07]),
    (WRITE_SAME16, None): bytes([0x93, 0xE9] + [0xFF] * 12 + [0x3F, 0x07]),
    (SERVICE_ACTION_IN16, SAI_READ_CAPACITY16): bytes([0x9E, 0x10] + [0] * 8 + [0xFF] * 4 + [0, 0x07]),
    (SERVICE_ACTION_IN16, SAI_GET_LBA_STATUS): bytes([0x9E, 0x12] + [0xFF] * 8 + [0xFF] * 4 + [0, 0x07]),
    (REPORT_LUNS, None): bytes([0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),
    (MAINTENANCE_IN, MI_REPORT_OPCODES): bytes([0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),
    (READ12, None): bytes([0xA8, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (WRITE12, None): bytes([0xAA, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (WRITE_VERIFY12, None): bytes([0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (VERIFY12, None): bytes([0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
}

#: commands allowed whatever reservation is held (SPC-4 table of reservation conflicts)
_ALWAYS_ALLOWED = frozenset(
    {INQUIRY, REPORT_LUNS, REQUEST_SENSE, PR_IN, PR_OUT, MAINTENANCE_IN, READ_CAPACITY10,
     SERVICE_ACTION_IN16, TEST_UNIT_READY}
)
#: commands that only read (allowed to everyone under WRITE EXCLUSIVE reservations)
_READS = frozenset(
    {READ6, READ10, READ12, READ16, VERIFY10, VERIFY12, VERIFY16, MODE_SENSE6, MODE_SENSE10,
     PREFETCH10, PREFETCH16}
)


def _lba_len(cdb: bytes) -> tuple[int, int]:
    """(LBA, number of blocks) of a READ/WRITE/VERIFY-style CDB of any size."""
    n = len(cdb)
    op = cdb[0]
    if op in (READ6, WRITE6):
        lba = ((cdb[1] & 0x1F) << 16) | (cdb[2] << 8) | cdb[3]
        count = cdb[4] or 256
        return lba, count
    if n >= 16 and op >= 0x80 and op < 0xA0:
        return _u64(cdb, 2), _u32(cdb, 10)
    if op >= 0xA0:
        return _u32(cdb, 2), _u32(cdb, 6)
    return _u32(cdb, 2), _u16(cdb, 7)


def check_condition(sense: Sense, d_sense: bool = False) -> ScsiResult:
    return ScsiResult(
        Status.CHECK_CONDITION, b"", sense.descriptor() if d_sense else sense.fixed()
    )


class LogicalUnit:
    """SCSI semantics of one export for one session."""

    def __init__(
        self,
        device: BlockDevice,
        state: LuState | None = None,
        *,
        name: str = "",
        serial: str = "",
        target_iqn: str = "",
    ) -> None:
        self.device = device
        self.state = state if state is not None else LuState()
        self.name = name
        self.serial = (serial or name or "cdp")[:32]
        self.target_iqn = target_iqn
        self.read_only = bool(device.read_only)
        self.blocks = device.size // BLOCK
        self._handlers: dict[int, Callable[[ScsiRequest], ScsiResult | Awaitable[ScsiResult]]] = {
            TEST_UNIT_READY: self._tur,
            REQUEST_SENSE: self._request_sense,
            READ6: self._read,
            READ10: self._read,
            READ12: self._read,
            READ16: self._read,
            WRITE6: self._write,
            WRITE10: self._write,
            WRITE12: self._write,
            WRITE16: self._write,
            INQUIRY: self._inquiry,
            MODE_SELECT6: self._mode_select,
            MODE_SELECT10: self._mode_select,
            MODE_SENSE6: self._mode_sense,
            MODE_SENSE10: self._mode_sense,
            RESERVE6: self._reserve,
            RESERVE10: self._reserve,
            RELEASE6: self._release,
            RELEASE10: self._release,
            START_STOP_UNIT: self._start_stop,
            PREVENT_ALLOW: self._prevent_allow,
            READ_CAPACITY10: self._read_capacity10,
            SERVICE_ACTION_IN16: self._service_action_in,
            WRITE_VERIFY10: self._write_verify,
            WRITE_VERIFY12: self._write_verify,
            WRITE_VERIFY16: self._write_verify,
            VERIFY10: self._verify,
            VERIFY12: self._verify,
            VERIFY16: self._verify,
            PREFETCH10: self._prefetch,
            PREFETCH16: self._prefetch,
            SYNC_CACHE10: self._sync_cache,
            SYNC_CACHE16: self._sync_cache,
            WRITE_SAME10: self._write_same,
            WRITE_SAME16: self._write_same,
            UNMAP: self._unmap,
            PR_IN: self._pr_in,
            PR_OUT: self._pr_out,
            COMPARE_AND_WRITE: self._compare_and_write,
            ORWRITE16: self._orwrite,
            REPORT_LUNS: report_luns,
            MAINTENANCE_IN: self._maintenance_in,
        }

    # --- entry point --------------------------------------------------------------------
    def execute(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        """Run one command; a result now or an awaitable of one. Never raises."""
        cdb = req.cdb
        handler = self._handlers.get(cdb[0])
        if handler is None:
            return check_condition(
                Sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_OPCODE, field=0), self.state.d_sense
            )
        try:
            if cdb[0] not in _ALWAYS_ALLOWED and self._conflict(req):
                return ScsiResult(Status.RESERVATION_CONFLICT)
            res = handler(req)
        except Exception as exc:
            return self._failed(exc)
        if is_awaitable(res):
            return self._finish(cast(Awaitable[ScsiResult], res))
        return cast(ScsiResult, res)

    async def _finish(self, aw: Awaitable[ScsiResult]) -> ScsiResult:
        try:
            return await aw
        except Exception as exc:
            return self._failed(exc)

    def _failed(self, exc: BaseException) -> ScsiResult:
        sense = exc.sense if isinstance(exc, ScsiError) else scsi_sense(exc)
        return check_condition(sense, self.state.d_sense)

    def _conflict(self, req: ScsiRequest) -> bool:
        st = self.state
        op = req.cdb[0]
        if st.reserved_by is not None and st.reserved_by != req.nexus:
            return op not in (RELEASE6, RELEASE10)
        if st.pr_holder is None:
            return False
        if op in (RESERVE6, RESERVE10, RELEASE6, RELEASE10):
            return True
        if st.pr_is_holder(req.nexus):
            return False
        registered = req.nexus in st.pr_keys
        t = st.pr_type
        if op in _READS:
            if t in (PR_WE, PR_WE_RO, PR_WE_AR):
                return False
            return not (t in (PR_EA_RO, PR_EA_AR) and registered)
        return not (t in (PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR) and registered)

    # --- helpers ------------------------------------------------------------------------
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
        lba = _u64(cdb, 2)
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
        lba, count = (_u64(cdb, 2), _u32(cdb, 10)) if cdb[0] == WRITE_SAME16 else (
            _u32(cdb, 2), _u16(cdb, 7))
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
        plen = _u16(cdb, 7)
        if plen == 0:
            return GOOD
        data = req.data[:plen]
        if plen < 8 or len(data) < 8:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        bd_len = _u16(data, 2)
        if bd_len + 8 > len(data):
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7)
        ndesc = bd_len // 16
        if ndesc > MAX_UNMAP_DESCS:
            raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=2, in_cdb=False)
        ranges = []
        for i in range(ndesc):
            o = 8 + 16 * i
            lba, count = _u64(data, o), _u32(data, o + 8)
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

    def _sync_cache(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        if cdb[0] == SYNC_CACHE16:
            lba, count = _u64(cdb, 2), _u32(cdb, 10)
        else:
            lba, count = _u32(cdb, 2), _u16(cdb, 7)
        self._range(lba, count)
        return _then(self.device.flush(), _good)

    def _prefetch(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        if cdb[0] == PREFETCH16:
            lba, count = _u64(cdb, 2), _u32(cdb, 10)
        else:
            lba, count = _u32(cdb, 2), _u16(cdb, 7)
        self._range(lba, count)
        if count == 0:
            count = self.blocks - lba
        return _then(self.device.cache(lba * BLOCK, count * BLOCK), _condition_met)

    # --- misc SPC -------------------------------------------------------------------------
    def _tur(self, req: ScsiRequest) -> ScsiResult:
        return GOOD

    def _request_sense(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sense = Sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE)
        data = sense.descriptor() if cdb[1] & 1 else sense.fixed()
        return ScsiResult(Status.GOOD, data[: cdb[4]])

    def _start_stop(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        loej, start = bool(cdb[4] & 0x02), bool(cdb[4] & 0x01)
        if loej and not start and (cdb[4] >> 4) == 0 and self.state.prevent:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED))
        return GOOD

    def _prevent_allow(self, req: ScsiRequest) -> ScsiResult:
        if req.cdb[4] & 0x01:
            self.state.prevent.add(req.nexus)
        else:
            self.state.prevent.discard(req.nexus)
        return GOOD

    def _reserve(self, req: ScsiRequest) -> ScsiResult:
        st = self.state
        if st.reserved_by not in (None, req.nexus):
            return ScsiResult(Status.RESERVATION_CONFLICT)
        st.reserved_by = req.nexus
        return GOOD

    def _release(self, req: ScsiRequest) -> ScsiResult:
        st = self.state
        if st.reserved_by == req.nexus:
            st.reserved_by = None
        return GOOD

    def _read_capacity10(self, req: ScsiRequest) -> ScsiResult:
        last = self.blocks - 1
        return ScsiResult(
            Status.GOOD, min(last, 0xFFFFFFFF).to_bytes(4, "big") + BLOCK.to_bytes(4, "big")
        )

    def _service_action_in(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        alloc = _u32(cdb, 10)
        if sa == SAI_READ_CAPACITY16:
            b = bytearray(32)
            b[0:8] = (self.blocks - 1).to_bytes(8, "big")
            b[8:12] = BLOCK.to_bytes(4, "big")
            b[13] = LBPPBE
            b[14] = 0x80 | 0x40  # LBPME, LBPRZ
            return ScsiResult(Status.GOOD, bytes(b[:alloc]))
        if sa == SAI_GET_LBA_STATUS:
            return self._get_lba_status(_u64(cdb, 2), alloc)
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

    def _maintenance_in(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        if cdb[1] & 0x1F != MI_REPORT_OPCODES:
            raise illegal(field=1, bit=4)
        opts = cdb[2] & 0x07
        rctd = bool(cdb[2] & 0x80)
        op, sa = cdb[3], _u16(cdb, 4)
        alloc = _u32(cdb, 6)
        timeouts = bytes([0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30]) if rctd else b""
        if opts == 0:
            out = bytearray()
            for (o, s), usage in _USAGE.items():
                flags = (0x02 if rctd else 0) | (0x01 if s is not None else 0)
                out += bytes([o, 0]) + (s or 0).to_bytes(2, "big") + bytes([0, flags])
                out += len(usage).to_bytes(2, "big") + timeouts
            data = len(out).to_bytes(4, "big") + bytes(out)
        elif opts in (1, 2, 3):
            has_sa = any(o == op and s is not None for (o, s) in _USAGE)
            if opts == 1 and has_sa:
                raise illegal(field=2)
            if opts == 2 and not has_sa:
                raise illegal(field=2)
            key = (op, sa if has_sa else None)
            usage = _USAGE.get(key, b"")
            support = 3 if usage else 1
            data = bytes([0, (0x80 if rctd else 0) | support]) + len(usage).to_bytes(2, "big")
            data += usage + timeouts
        else:
            raise illegal(field=2)
        return ScsiResult(Status.GOOD, data[:alloc])

    # --- INQUIRY ------------------------------------------------------------------------
    def _inquiry(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        evpd = cdb[1] & 0x01
        page = cdb[2]
        alloc = _u16(cdb, 3)
        if cdb[1] & 0xFE:
            raise illegal(field=1)
        if not evpd:
            if page:
                raise illegal(field=2)
            return ScsiResult(Status.GOOD, self._standard_inquiry()[:alloc])
        builder = {
            0x00: self._vpd_supported,
            0x80: self._vpd_serial,
            0x83: self._vpd_ids,
            0xB0: self._vpd_block_limits,
            0xB1: self._vpd_characteristics,
            0xB2: self._vpd_provisioning,
        }.get(page)
        if builder is None:
            raise illegal(field=2)
        body = builder()
        data = bytes([0x00, page]) + len(body).to_bytes(2, "big") + body
        return ScsiResult(Status.GOOD, data[:alloc])

    def _standard_inquiry(self) -> bytes:
        b = bytearray(74)
        b[0] = 0x00  # connected, direct access block device
        b[2] = 0x06  # SPC-4
        b[3] = 0x12  # HISUP, response data format 2
        b[4] = len(b) - 5
        b[6] = 0x00
        b[7] = 0x02  # CMDQUE
        b[8:16] = VENDOR
        b[16:32] = PRODUCT
        b[32:36] = REVISION
        b[36:44] = self.serial.encode()[:8].ljust(8)
        versions = (0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3
        for i, v in enumerate(versions):
            b[58 + 2 * i : 60 + 2 * i] = v.to_bytes(2, "big")
        return bytes(b)

    def _vpd_supported(self) -> bytes:
        return bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])

    def _vpd_serial(self) -> bytes:
        return self.serial.encode()

    def naa(self) -> bytes:
        """An NAA 6 (registered extended) identifier derived from the export name."""
        h = 0
        for ch in (self.name or self.serial).encode():
            h = (h * 1099511628211 + ch) & ((1 << 100) - 1)
        return bytes([0x60 | 0x0]) + (0x00CDF0 << 4).to_bytes(3, "big")[0:3] + h.to_bytes(
            13, "big"
        )[1:]

    def _vpd_ids(self) -> bytes:
        out = bytearray()
        t10 = VENDOR + self.serial.encode()
        out += bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # T10 vendor id, ASCII
        naa = self.naa()
        out += bytes([0x01, 0x03, 0x00, len(naa)]) + naa  # NAA, binary, LU
        if self.target_iqn:
            name = self.target_iqn.encode() + b"\0"
            name += bytes(-len(name) % 4)
            out += bytes([0x53, 0x28, 0x00, len(name)]) + name  # SCSI name, target device
        out += bytes([0x61, 0x94, 0x00, 0x04, 0, 0, 0, 1])  # relative target port 1
        return bytes(out)

    def _vpd_block_limits(self) -> bytes:
        b = bytearray(0x3C)
        b[0] = 0  # WSNZ 0: WRITE SAME with 0 blocks means "to the end"
        b[1] = MAX_CAW_BLOCKS
        b[2:4] = OPT_GRAN.to_bytes(2, "big")
        b[4:8] = MAX_XFER_BLOCKS.to_bytes(4, "big")
        b[8:12] = (256).to_bytes(4, "big")
        b[12:16] = MAX_XFER_BLOCKS.to_bytes(4, "big")
        b[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
        b[20:24] = MAX_UNMAP_DESCS.to_bytes(4, "big")
        b[24:28] = OPT_GRAN.to_bytes(4, "big")
        b[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        b[32:40] = MAX_WS_BLOCKS.to_bytes(8, "big")
        return bytes(b)

    def _vpd_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        b[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
        return bytes(b)

    def _vpd_provisioning(self) -> bytes:
        # LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 = thin
        return bytes([0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00])

    # --- MODE SENSE / SELECT --------------------------------------------------------------
    def _pages(self, pc: int) -> dict[int, bytes]:
        st = self.state
        if pc == 1:  # changeable
            caching = bytes([0x08, 0x12, 0x04] + [0] * 17)
            control = bytes([0x0A, 0x0A, 0x04, 0, 0x08] + [0] * 7)
        else:
            wce = st.wce if pc == 0 else True
            caching = bytes([0x08, 0x12, 0x04 if wce else 0] + [0] * 17)
            d_sense = st.d_sense if pc == 0 else False
            swp = st.swp if pc == 0 else False
            control = bytes(
                [0x0A, 0x0A, 0x04 if d_sense else 0, 0x10, 0x08 if swp else 0, 0x00, 0, 0,
                 0xFF, 0xFF, 0, 0]
            )
        rw_recovery = bytes([0x01, 0x0A, 0x80] + [0] * 9)
        disconnect = bytes([0x02, 0x0E] + [0] * 14)
        iec = bytes([0x1C, 0x0A] + [0] * 10)
        return {0x01: rw_recovery, 0x02: disconnect, 0x08: caching, 0x0A: control, 0x1C: iec}

    def _mode_sense(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        ten = cdb[0] == MODE_SENSE10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = _u16(cdb, 7) if ten else cdb[4]
        if pc == 3:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED,
                                  field=2, bit=7))
        pages = self._pages(pc)
        if page == 0x3F:
            if subpage not in (0x00, 0xFF):
                raise illegal(field=3)
            body = b"".join(pages[k] for k in sorted(pages))
        elif page in pages and subpage == 0:
            body = pages[page]
        else:
            raise illegal(field=2 if subpage == 0 else 3)
        wp = 0x80 if (self.read_only or self.state.swp) else 0
        dsp = wp | 0x10  # DPOFUA
        if dbd:
            bdesc = b""
        elif llbaa:
            bdesc = self.blocks.to_bytes(8, "big") + bytes(4) + BLOCK.to_bytes(4, "big")
        else:
            bdesc = min(self.blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + BLOCK.to_bytes(3, "big")
        if ten:
            head_len = 8
            total = head_len + len(bdesc) + len(body)
            head = (total - 2).to_bytes(2, "big") + bytes([0, dsp, 0x01 if llbaa and bdesc else 0, 0])
            head += len(bdesc).to_bytes(2, "big")
        else:
            total = 4 + len(bdesc) + len(body)
            head = bytes([total - 1, 0, dsp, len(bdesc)])
        return ScsiResult(Status.GOOD, (head + bdesc + body)[:alloc])

    def _mode_select(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        ten = cdb[0] == MODE_SELECT10
        plen = _u16(cdb, 7) if ten else cdb[4]
        if cdb[1] & 0x01:  # SP: saving not supported
            raise illegal(Asc.INVALID_FIELD_IN_CDB, field=1, bit=0)
        data = req.data[:plen]
        if plen == 0:
            return GOOD
        hlen = 8 if ten else 4
        if len(data) < hlen:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7 if ten else 4)
        bdlen = _u16(data, 6) if ten else data[3]
        pos = hlen + bdlen
        changeable = self._pages(1)
        current = self._pages(0)
        while pos + 2 <= len(data):
            code = data[pos] & 0x3F
            if data[pos] & 0x40:  # SPF: no subpages here
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos, in_cdb=False)
            page_len = data[pos + 1] + 2
            page = data[pos : pos + page_len]
            if code not in current or len(page) != len(current[code]):
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos, in_cdb=False)
            mask, cur = changeable[code], current[code]
            for i in range(2, len(page)):
                if (page[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos + i,
                                  in_cdb=False)
            if code == 0x0A:
                self.state.d_sense = bool(page[2] & 0x04)
                self.state.swp = bool(page[4] & 0x08)
            elif code == 0x08:
                self.state.wce = bool(page[2] & 0x04)
            pos += page_len
        return GOOD

    # --- persistent reservations --------------------------------------------------------
    def _pr_in(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        alloc = _u16(cdb, 7)
        st = self.state
        gen = st.pr_generation.to_bytes(4, "big")
        if sa == 0:  # READ KEYS
            keys = b"".join(k.to_bytes(8, "big") for k in st.pr_keys.values())
            data = gen + len(keys).to_bytes(4, "big") + keys
        elif sa == 1:  # READ RESERVATION
            if st.pr_holder is None:
                data = gen + bytes(4)
            else:
                key = st.pr_keys.get(st.pr_holder, 0)
                if st.pr_type in (PR_WE_AR, PR_EA_AR):
                    key = 0
                data = gen + (16).to_bytes(4, "big") + key.to_bytes(8, "big") + bytes(
                    [0, 0, 0, 0, 0, st.pr_type & 0x0F, 0, 0])
        elif sa == 2:  # REPORT CAPABILITIES
            data = bytes([0, 8, 0x10, 0x80, 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0])
        elif sa == 3:  # READ FULL STATUS
            out = bytearray()
            for nexus, key in st.pr_keys.items():
                holder = st.pr_is_holder(nexus)
                tid = _transport_id(nexus)
                out += key.to_bytes(8, "big") + bytes(4)
                out += bytes([0x01 if holder else 0, (st.pr_type & 0x0F) if holder else 0])
                out += bytes(4) + (1).to_bytes(2, "big") + len(tid).to_bytes(4, "big") + tid
            data = gen + len(out).to_bytes(4, "big") + bytes(out)
        else:
            raise illegal(field=1, bit=4)
        return ScsiResult(Status.GOOD, data[:alloc])

    def _pr_out(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        ptype = cdb[2] & 0x0F
        scope = cdb[2] >> 4
        plen = _u32(cdb, 5)
        if sa > 7:
            raise illegal(field=1, bit=4)
        if plen != 24 and sa != 7:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=5)
        data = req.data
        if len(data) < 24:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=5)
        key, sa_key = _u64(data, 0), _u64(data, 8)
        flags = data[20]
        st = self.state
        nexus = req.nexus
        conflict = ScsiResult(Status.RESERVATION_CONFLICT)
        registered = nexus in st.pr_keys
        if sa in (0, 6):  # REGISTER / REGISTER AND IGNORE EXISTING KEY
            if flags & 0x0C:  # SPEC_I_PT / ALL_TG_PT not supported
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=20, in_cdb=False)
            if sa == 0:
                if not registered and key != 0:
                    return conflict
                if registered and key != st.pr_keys[nexus]:
                    return conflict
            if sa_key == 0:
                if registered:
                    self._unregister(nexus)
            else:
                st.pr_keys[nexus] = sa_key
            st.pr_generation += 1
            return GOOD
        if sa == 7:
            raise illegal(field=1, bit=4)
        if not registered or st.pr_keys[nexus] != key:
            return conflict
        if sa in (1, 2, 4, 5) and scope != 0:
            raise illegal(field=2, bit=7)
        if sa == 1:  # RESERVE
            if ptype not in _PR_TYPES:
                raise illegal(field=2, bit=3)
            if st.pr_holder is not None:
                if st.pr_is_holder(nexus):
                    return GOOD if st.pr_type == ptype else conflict
                return conflict
            st.pr_holder, st.pr_type = nexus, ptype
            return GOOD
        if sa == 2:  # RELEASE
            if st.pr_holder is None or not st.pr_is_holder(nexus):
                return GOOD
            if st.pr_type != ptype:
                raise illegal(Asc.INVALID_RELEASE_OF_PR)
            st.pr_holder, st.pr_type = None, 0
            return GOOD
        if sa == 3:  # CLEAR
            st.pr_keys.clear()
            st.pr_holder, st.pr_type = None, 0
            st.pr_generation += 1
            return GOOD
        # PREEMPT / PREEMPT AND ABORT
        if ptype not in _PR_TYPES:
            raise illegal(field=2, bit=3)
        all_reg = st.pr_type in (PR_WE_AR, PR_EA_AR) and st.pr_holder is not None
        if st.pr_holder is None or all_reg:
            if sa_key == 0 and not all_reg:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=8, in_cdb=False)
            victims = [n for n, k in st.pr_keys.items() if (k == sa_key or (all_reg and sa_key == 0)) and n != nexus]
            if not victims and not all_reg:
                return conflict
            for n in victims:
                del st.pr_keys[n]
            if all_reg and sa_key == 0:
                st.pr_holder, st.pr_type = nexus, ptype
        else:
            holder_key = st.pr_keys.get(st.pr_holder, None)
            victims = [n for n, k in st.pr_keys.items() if k == sa_key and n != nexus]
            if sa_key == holder_key:
                for n in victims:
                    del st.pr_keys[n]
                st.pr_holder, st.pr_type = nexus, ptype
            else:
                if sa_key == 0:
                    raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=8, in_cdb=False)
                if not victims:
                    return conflict
                for n in victims:
                    del st.pr_keys[n]
        st.pr_generation += 1
        return GOOD

    def _unregister(self, nexus: str) -> None:
        st = self.state
        del st.pr_keys[nexus]
        if st.pr_holder == nexus or (st.pr_type in (PR_WE_AR, PR_EA_AR) and not st.pr_keys):
            if st.pr_type in (PR_WE_AR, PR_EA_AR) and st.pr_keys:
                st.pr_holder = next(iter(st.pr_keys))
            else:
                st.pr_holder, st.pr_type = None, 0


def _transport_id(nexus: str) -> bytes:
    """iSCSI TransportID (format 01b: name + ",i,0x" + ISID) of a nexus."""
    name = nexus.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes([0x45, 0]) + len(name).to_bytes(2, "big") + name


def _miscompare(got: bytes, want: bytes) -> Sense:
    off = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), 0)
    return Sense(SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY, info=off)


def _data_result(data: bytes) -> ScsiResult:
    return ScsiResult(Status.GOOD, data)


def _good(_: object) -> ScsiResult:
    return GOOD


def _condition_met(_: object) -> ScsiResult:
    return ScsiResult(Status.CONDITION_MET)


def report_luns(req: ScsiRequest, luns: tuple[int, ...] = (0,)) -> ScsiResult:
    """REPORT LUNS: LUN 0 only (it is answered on any LUN, present or not)."""
    cdb = req.cdb
    select = cdb[2]
    alloc = _u32(cdb, 6)
    if alloc < 16:
        raise illegal(field=6)
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise illegal(field=2)
    body = b"".join((lun << 48).to_bytes(8, "big") for lun in luns) if select != 0x01 else b""
    data = len(body).to_bytes(4, "big") + bytes(4) + body
    return ScsiResult(Status.GOOD, data[:alloc])


def no_lun(req: ScsiRequest) -> ScsiResult:
    """A command addressed to a LUN that does not exist."""
    cdb = req.cdb
    op = cdb[0]
    try:
        if op == REPORT_LUNS:
            return report_luns(req)
        if op == INQUIRY and not (cdb[1] & 1):
            data = bytearray(36)
            data[0] = 0x7F  # qualifier 011b, type 1Fh: no logical unit
            data[2], data[3], data[4] = 0x06, 0x02, 31
            return ScsiResult(Status.GOOD, bytes(data[: _u16(cdb, 3)]))
        if op == REQUEST_SENSE:
            sense = Sense(SenseKey.ILLEGAL_REQUEST, Asc.LUN_NOT_SUPPORTED).fixed()
            return ScsiResult(Status.GOOD, sense[: cdb[4]])
    except ScsiError as e:
        return check_condition(e.sense)
    return check_condition(Sense(SenseKey.ILLEGAL_REQUEST, Asc.LUN_NOT_SUPPORTED))
