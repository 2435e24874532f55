"""SCSI block device emulation (SPC-4 / SBC-3) over a :class:`BlockDevice`: the
logical unit and its dispatch table.

One :class:`LogicalUnit` per opened export and session. The commands live with their
standard, as tgt splits ``usr/spc.c`` and ``usr/sbc.c``: :mod:`.sbc` (block I/O, READ
CAPACITY, GET LBA STATUS), :mod:`.spc` (INQUIRY and VPD pages, mode pages, REPORT LUNS /
OPCODES, ...), :mod:`.pr` (SPC-2 and persistent reservations, and :class:`LuState`, the
state SCSI says belongs to the logical unit rather than to a session, shared by every
session on that export). What they share (opcodes, :class:`ScsiRequest`,
:class:`ScsiResult`) is in :mod:`.command`. The opcode -> handler table is here.

:meth:`LogicalUnit.execute` returns a :class:`ScsiResult` directly when the device answered
directly (the READ/WRITE fast path) and an awaitable otherwise. Every failure becomes
CHECK CONDITION with sense data: protocol-level ones raised by the handlers as
:class:`~cdp.targets.iscsi.sense.ScsiError`, device errors through
:func:`~cdp.targets.iscsi.sense.scsi_sense`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import cast

from cdp.targets.blockdev import BlockDevice
from cdp.targets.iscsi.command import (
    BLOCK,
    COMPARE_AND_WRITE,
    INQUIRY,
    MAINTENANCE_IN,
    MODE_SELECT6,
    MODE_SELECT10,
    MODE_SENSE6,
    MODE_SENSE10,
    ORWRITE16,
    PR_IN,
    PR_OUT,
    PREFETCH10,
    PREFETCH16,
    PREVENT_ALLOW,
    READ6,
    READ10,
    READ12,
    READ16,
    READ_CAPACITY10,
    RELEASE6,
    RELEASE10,
    REPORT_LUNS,
    REQUEST_SENSE,
    RESERVE6,
    RESERVE10,
    SERVICE_ACTION_IN16,
    START_STOP_UNIT,
    SYNC_CACHE10,
    SYNC_CACHE16,
    TEST_UNIT_READY,
    UNMAP,
    VERIFY10,
    VERIFY12,
    VERIFY16,
    WRITE6,
    WRITE10,
    WRITE12,
    WRITE16,
    WRITE_SAME10,
    WRITE_SAME16,
    WRITE_VERIFY10,
    WRITE_VERIFY12,
    WRITE_VERIFY16,
    ScsiRequest,
    ScsiResult,
    check_condition,
    is_awaitable,
    u16,
)
from cdp.targets.iscsi.pr import LuState, Reservations
from cdp.targets.iscsi.sbc import BlockCommands
from cdp.targets.iscsi.sense import Asc, ScsiError, Sense, SenseKey, Status, scsi_sense
from cdp.targets.iscsi.spc import PrimaryCommands, report_luns


class LogicalUnit(BlockCommands, PrimaryCommands, Reservations):
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

    def execute(self, req: ScsiRequest) -> ScsiResult | Awaitable[ScsiResult]:
        """Run one command; a result now or an awaitable of one. Never raises."""
        cdb = req.cdb
        handler = self._handlers.get(cdb[0])
        if handler is None:
            return check_condition(
                Sense(SenseKey.ILLEGAL_REQUEST, Asc.INVALID_OPCODE, field=0), self.state.d_sense
            )
        try:
            if self._conflict(req):
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
            return ScsiResult(Status.GOOD, bytes(data[: u16(cdb, 3)]))
        if op == REQUEST_SENSE:
            sense = Sense(SenseKey.ILLEGAL_REQUEST, Asc.LUN_NOT_SUPPORTED).fixed()
            return ScsiResult(Status.GOOD, sense[: cdb[4]])
    except ScsiError as e:
        return check_condition(e.sense)
    return check_condition(Sense(SenseKey.ILLEGAL_REQUEST, Asc.LUN_NOT_SUPPORTED))
