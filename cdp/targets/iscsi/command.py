"""What every SCSI command set shares: opcodes, the request and result of one command,
and readers for big-endian CDB fields.

The command sets (:mod:`.sbc`, :mod:`.spc`, :mod:`.pr`) and the dispatch table in
:mod:`.scsi` build on this module; it imports none of them.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

from cdp.targets.iscsi.sense import Sense, Status

#: logical block size (bytes)
BLOCK = 512

# operation codes (SPC-4 / SBC-3)
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

# service actions of SERVICE ACTION IN (16) and MAINTENANCE IN
SAI_READ_CAPACITY16 = 0x10
SAI_GET_LBA_STATUS = 0x12
MI_REPORT_OPCODES = 0x0C


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


def check_condition(sense: Sense, d_sense: bool = False) -> ScsiResult:
    """CHECK CONDITION with ``sense`` (descriptor format when ``d_sense``, else fixed)."""
    return ScsiResult(
        Status.CHECK_CONDITION, b"", sense.descriptor() if d_sense else sense.fixed()
    )


def u16(b: bytes, o: int) -> int:
    """The big-endian 2-byte field at offset ``o`` (u32, u64: 4 and 8 bytes)."""
    return int.from_bytes(b[o : o + 2], "big")


def u32(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 4], "big")


def u64(b: bytes, o: int) -> int:
    return int.from_bytes(b[o : o + 8], "big")
