"""SCSI status, sense keys and additional sense codes (SPC-4) as IntEnums, sense data,
and :func:`scsi_sense`: the iSCSI target's one map from exceptions to sense."""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from enum import IntEnum

from cdp.errors import CdpError, Corruption, OutOfRange, ReadOnly, StoreFull

log = logging.getLogger("cdp.iscsi")


class Status(IntEnum):
    """SCSI status byte."""

    GOOD = 0x00
    CHECK_CONDITION = 0x02
    CONDITION_MET = 0x04
    BUSY = 0x08
    RESERVATION_CONFLICT = 0x18
    TASK_SET_FULL = 0x28
    TASK_ABORTED = 0x40


class SenseKey(IntEnum):
    NO_SENSE = 0x0
    RECOVERED_ERROR = 0x1
    NOT_READY = 0x2
    MEDIUM_ERROR = 0x3
    HARDWARE_ERROR = 0x4
    ILLEGAL_REQUEST = 0x5
    UNIT_ATTENTION = 0x6
    DATA_PROTECT = 0x7
    ABORTED_COMMAND = 0xB
    MISCOMPARE = 0xE


class Asc(IntEnum):
    """Additional sense code and qualifier, as ``ASC << 8 | ASCQ``."""

    NO_ADDITIONAL_SENSE = 0x0000
    WRITE_ERROR = 0x0C00
    INVALID_FIELD_IN_INFORMATION_UNIT = 0x0E03
    UNRECOVERED_READ_ERROR = 0x1100
    PARAMETER_LIST_LENGTH_ERROR = 0x1A00
    MISCOMPARE_DURING_VERIFY = 0x1D00
    INVALID_OPCODE = 0x2000
    LBA_OUT_OF_RANGE = 0x2100
    INVALID_FIELD_IN_CDB = 0x2400
    LUN_NOT_SUPPORTED = 0x2500
    INVALID_FIELD_IN_PARAMETER_LIST = 0x2600
    INVALID_RELEASE_OF_PR = 0x2604
    WRITE_PROTECTED = 0x2700
    SPACE_ALLOCATION_FAILED_WRITE_PROTECT = 0x2707
    POWER_ON_RESET = 0x2900
    SAVING_PARAMETERS_NOT_SUPPORTED = 0x3900
    MEDIUM_NOT_PRESENT = 0x3A00
    INTERNAL_TARGET_FAILURE = 0x4400
    MEDIUM_REMOVAL_PREVENTED = 0x5302


@dataclass(frozen=True, slots=True)
class Sense:
    """One sense condition; ``info`` fills the INFORMATION field when not None and
    ``field`` (byte offset in the CDB, or in the parameter list when ``in_cdb`` is False)
    the SENSE KEY SPECIFIC field pointer."""

    key: SenseKey
    asc: Asc
    info: int | None = None
    field: int | None = None
    in_cdb: bool = True
    bit: int | None = None

    def fixed(self) -> bytes:
        """Fixed-format sense data (response code 0x70), 18 bytes."""
        b = bytearray(18)
        b[0] = 0x70 | (0x80 if self.info is not None else 0)
        b[2] = int(self.key)
        if self.info is not None:
            b[3:7] = (self.info & 0xFFFFFFFF).to_bytes(4, "big")
        b[7] = 10
        b[12] = int(self.asc) >> 8
        b[13] = int(self.asc) & 0xFF
        if self.field is not None:
            b[15] = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                b[15] |= 0x08 | (self.bit & 7)
            b[16:18] = self.field.to_bytes(2, "big")
        return bytes(b)

    def descriptor(self) -> bytes:
        """Descriptor-format sense data (response code 0x72)."""
        descs = bytearray()
        if self.info is not None:
            descs += bytes([0x00, 0x0A, 0x80, 0]) + self.info.to_bytes(8, "big")
        if self.field is not None:
            sks = 0x80 | (0x40 if self.in_cdb else 0)
            if self.bit is not None:
                sks |= 0x08 | (self.bit & 7)
            descs += bytes([0x02, 0x06, 0, 0, sks]) + self.field.to_bytes(2, "big") + b"\0"
        head = bytes([0x72, int(self.key), int(self.asc) >> 8, int(self.asc) & 0xFF, 0, 0, 0,
                      len(descs)])
        return head + bytes(descs)


class ScsiError(Exception):
    """Raised inside the SCSI emulation to end a command with CHECK CONDITION."""

    def __init__(self, sense: Sense) -> None:
        super().__init__(f"{sense.key.name}/{sense.asc.name}")
        self.sense = sense


def illegal(asc: Asc = Asc.INVALID_FIELD_IN_CDB, field: int | None = None,
            in_cdb: bool = True, bit: int | None = None) -> ScsiError:
    """An ILLEGAL REQUEST error (INVALID FIELD IN CDB unless told)."""
    return ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, asc, None, field, in_cdb, bit))


def scsi_sense(exc: BaseException) -> Sense:
    """The SCSI sense a failed command reports for ``exc`` (the iSCSI target's one map).

    ReadOnly -> DATA PROTECT / WRITE PROTECTED; OutOfRange -> ILLEGAL REQUEST / LBA OUT OF
    RANGE; Corruption -> MEDIUM ERROR / UNRECOVERED READ ERROR; StoreFull -> DATA PROTECT /
    SPACE ALLOCATION FAILED WRITE PROTECT; other CdpErrors and OSErrors go by errno
    (EPERM/EROFS like ReadOnly, ENOSPC like StoreFull, EINVAL like OutOfRange); anything
    else -> HARDWARE ERROR / INTERNAL TARGET FAILURE (logged with its traceback when it is
    not an OSError or CdpError).
    """
    if isinstance(exc, ReadOnly):
        return Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    if isinstance(exc, OutOfRange):
        return Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    if isinstance(exc, Corruption):
        return Sense(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
    if isinstance(exc, StoreFull):
        return Sense(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if isinstance(exc, (CdpError, OSError)):
        code = exc.errno
        if code in (errno.EPERM, errno.EACCES, errno.EROFS):
            return Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return Sense(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        if code == errno.EINVAL and isinstance(exc, CdpError):
            return Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
        return Sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    log.error("unexpected error in a SCSI command: %r", exc, exc_info=exc)
    return Sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
