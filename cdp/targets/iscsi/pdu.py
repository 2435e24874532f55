"""iSCSI PDU codec (RFC 7143 §11): wire constants, the basic header segment, text keys,
CRC32C digests and an incremental reader. No I/O.

A PDU on the wire::

    pdu := BHS (48 bytes) || AHS (TotalAHSLength * 4) || [HeaderDigest u32 LE]
           || data (DataSegmentLength) || pad to 4 || [DataDigest u32 LE]

Every multi-byte field of the BHS is big-endian; the digests are CRC32C of the covered
bytes, sent least significant byte first (as every initiator does).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from enum import IntEnum

import crc32c as _crc32c

from cdp.errors import ProtocolError

BHS_LEN = 48


class IscsiProtocolError(ProtocolError):
    """The one error the iSCSI codec and core raise for bad peer bytes.

    ``reject`` is the Reject reason to send (or None when the connection must close);
    ``pdu`` is the header being rejected (echoed in the Reject data segment).
    """

    def __init__(self, message: str, reject: int | None = None, pdu: bytes = b"") -> None:
        super().__init__(message)
        self.reject = reject
        self.pdu = pdu


class Op(IntEnum):
    """Opcodes (byte 0, low 6 bits)."""

    NOP_OUT = 0x00
    SCSI_CMD = 0x01
    TASK_MGMT_REQ = 0x02
    LOGIN_REQ = 0x03
    TEXT_REQ = 0x04
    DATA_OUT = 0x05
    LOGOUT_REQ = 0x06
    SNACK = 0x10
    NOP_IN = 0x20
    SCSI_RSP = 0x21
    TASK_MGMT_RSP = 0x22
    LOGIN_RSP = 0x23
    TEXT_RSP = 0x24
    DATA_IN = 0x25
    LOGOUT_RSP = 0x26
    R2T = 0x31
    ASYNC_MSG = 0x32
    REJECT = 0x3F


INITIATOR_OPS = frozenset(
    {Op.NOP_OUT, Op.SCSI_CMD, Op.TASK_MGMT_REQ, Op.LOGIN_REQ, Op.TEXT_REQ, Op.DATA_OUT,
     Op.LOGOUT_REQ, Op.SNACK}
)


class RejectReason(IntEnum):
    """Reject PDU reason codes (RFC 7143 §11.17.1)."""

    DATA_DIGEST = 0x02
    SNACK_REJECT = 0x03
    PROTOCOL_ERROR = 0x04
    COMMAND_NOT_SUPPORTED = 0x05
    IMMEDIATE_REJECTED = 0x06
    TASK_IN_PROGRESS = 0x07
    INVALID_DATA_ACK = 0x08
    INVALID_PDU_FIELD = 0x09
    OUT_OF_RESOURCES = 0x0A
    NEGOTIATION_RESET = 0x0B
    WAITING_FOR_LOGOUT = 0x0C


class LoginStatus(IntEnum):
    """Login response (Status-Class << 8 | Status-Detail)."""

    SUCCESS = 0x0000
    TARGET_MOVED_TEMP = 0x0101
    INITIATOR_ERROR = 0x0200
    AUTH_FAILED = 0x0201
    FORBIDDEN = 0x0202
    NOT_FOUND = 0x0203
    TARGET_REMOVED = 0x0204
    UNSUPPORTED_VERSION = 0x0205
    TOO_MANY_CONNECTIONS = 0x0206
    MISSING_PARAMETER = 0x0207
    CANT_INCLUDE_IN_SESSION = 0x0208
    SESSION_TYPE_UNSUPPORTED = 0x0209
    SESSION_DOES_NOT_EXIST = 0x020A
    INVALID_DURING_LOGIN = 0x020B
    TARGET_ERROR = 0x0300
    SERVICE_UNAVAILABLE = 0x0301
    OUT_OF_RESOURCES = 0x0302


class TmfFunction(IntEnum):
    """Task management functions (byte 1, low 7 bits)."""

    ABORT_TASK = 1
    ABORT_TASK_SET = 2
    CLEAR_ACA = 3
    CLEAR_TASK_SET = 4
    LOGICAL_UNIT_RESET = 5
    TARGET_WARM_RESET = 6
    TARGET_COLD_RESET = 7
    TASK_REASSIGN = 8


class TmfResponse(IntEnum):
    """Task management response codes."""

    COMPLETE = 0
    NO_TASK = 1
    NO_LUN = 2
    TASK_ALLEGIANT = 3
    NO_REASSIGN = 4
    NOT_SUPPORTED = 5
    AUTH_FAILED = 6
    REJECTED = 255


# --- flags ---------------------------------------------------------------------------
F_IMMEDIATE = 0x40  # byte 0
F_FINAL = 0x80  # byte 1
F_READ = 0x40  # SCSI command byte 1
F_WRITE = 0x20
F_ACK = 0x40  # Data-In
F_OVERFLOW_BIDI = 0x10
F_UNDERFLOW_BIDI = 0x08
F_OVERFLOW = 0x04
F_UNDERFLOW = 0x02
F_STATUS = 0x01  # Data-In
F_TRANSIT = 0x80  # login byte 1
F_CONTINUE = 0x40  # login / text byte 1

RESERVED_TAG = 0xFFFFFFFF


def crc32c(data: bytes | bytearray | memoryview) -> int:
    """CRC32C (Castagnoli) of ``data``, as iSCSI digests use it."""
    return int(_crc32c.crc32c(data))


def digest_bytes(data: bytes | bytearray | memoryview) -> bytes:
    """The 4 digest bytes of ``data`` as they go on the wire (little-endian)."""
    return crc32c(data).to_bytes(4, "little")


def pad4(n: int) -> int:
    """Bytes of padding after a data segment of ``n`` bytes."""
    return -n & 3


# --- BHS --------------------------------------------------------------------------------
@dataclass(slots=True)
class Pdu:
    """One PDU: the 48-byte BHS (mutable), additional header segments and the data.

    Field accessors read and write the BHS in place; the layout of bytes 20..47 depends
    on the opcode, so opcode-specific names (``cmdsn``, ``statsn``...) are offsets.
    """

    bhs: bytearray = field(default_factory=lambda: bytearray(BHS_LEN))
    ahs: bytes = b""
    data: bytes = b""

    # generic fields
    @property
    def opcode(self) -> int:
        return self.bhs[0] & 0x3F

    @property
    def immediate(self) -> bool:
        return bool(self.bhs[0] & F_IMMEDIATE)

    @property
    def flags(self) -> int:
        return self.bhs[1]

    @property
    def final(self) -> bool:
        return bool(self.bhs[1] & F_FINAL)

    @property
    def dlength(self) -> int:
        return int.from_bytes(self.bhs[5:8], "big")

    @property
    def lun_raw(self) -> int:
        return self.u64(8)

    @property
    def itt(self) -> int:
        return self.u32(16)

    def u32(self, off: int) -> int:
        return int.from_bytes(self.bhs[off : off + 4], "big")

    def u16(self, off: int) -> int:
        return int.from_bytes(self.bhs[off : off + 2], "big")

    def u64(self, off: int) -> int:
        return int.from_bytes(self.bhs[off : off + 8], "big")

    def set(self, off: int, size: int, value: int) -> None:
        self.bhs[off : off + size] = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "big")

    def encode(self, header_digest: bool = False, data_digest: bool = False) -> bytes:
        """Wire bytes; DataSegmentLength and TotalAHSLength are filled in here."""
        bhs = self.bhs
        n = len(self.data)
        bhs[4] = len(self.ahs) // 4
        bhs[5:8] = n.to_bytes(3, "big")
        head = bytes(bhs) + self.ahs
        parts = [head]
        if header_digest:
            parts.append(digest_bytes(head))
        if n:
            padded = self.data + b"\0" * pad4(n)
            parts.append(padded)
            if data_digest:
                parts.append(digest_bytes(padded))
        return b"".join(parts)


def new_pdu(op: int, flags: int = 0, itt: int = RESERVED_TAG, data: bytes = b"") -> Pdu:
    """A target PDU with opcode, byte-1 flags, ITT and data set."""
    bhs = bytearray(BHS_LEN)
    bhs[0] = op
    bhs[1] = flags
    bhs[16:20] = itt.to_bytes(4, "big")
    return Pdu(bhs, b"", data)


# --- LUN encoding (SAM-5 flat / peripheral addressing) ---------------------------------
def decode_lun(raw: int) -> int:
    """The LUN number from the 8-byte LUN field (peripheral or flat space addressing)."""
    top = raw >> 48
    method = top >> 14
    if method in (0, 1):
        return top & 0x3FFF if method == 1 else (top & 0xFF if (top >> 8) == 0 else -1)
    return -1


def encode_lun(lun: int) -> int:
    """The 8-byte LUN field for a LUN number below 16384."""
    if lun < 256:
        return lun << 48
    return (0x4000 | lun) << 48


# --- text keys ---------------------------------------------------------------------------
def parse_text(data: bytes) -> list[tuple[str, str]]:
    """``key=value`` pairs of a text/login data segment (NUL separated, trailing NULs ok)."""
    out: list[tuple[str, str]] = []
    for item in data.split(b"\0"):
        if not item:
            continue
        key, sep, value = item.partition(b"=")
        if not sep or not key:
            raise IscsiProtocolError(f"malformed text key {item[:64]!r}")
        try:
            out.append((key.decode("utf-8"), value.decode("utf-8")))
        except UnicodeDecodeError:
            raise IscsiProtocolError("text key is not UTF-8") from None
    return out


def build_text(pairs: list[tuple[str, str]]) -> bytes:
    """Data segment for ``pairs``."""
    return b"".join(f"{k}={v}".encode() + b"\0" for k, v in pairs)


def decode_binary(value: str) -> bytes:
    """A binary value: ``0x`` hex or ``0b`` base64 (RFC 7143 §6.1)."""
    try:
        if value[:2] in ("0x", "0X"):
            h = value[2:]
            if len(h) % 2:
                h = "0" + h
            return binascii.unhexlify(h)
        if value[:2] in ("0b", "0B"):
            return base64.b64decode(value[2:], validate=True)
    except (ValueError, binascii.Error):
        pass
    raise IscsiProtocolError(f"bad binary value {value[:32]!r}")


def encode_binary(data: bytes) -> str:
    return "0x" + data.hex()


# --- reader -----------------------------------------------------------------------------
class PduReader:
    """Incremental PDU framing: ``feed(bytes)`` then ``next()`` until it returns None.

    ``max_data`` caps DataSegmentLength (our MaxRecvDataSegmentLength, or the login
    limit). A bad header digest or an oversized segment raises IscsiProtocolError with
    ``reject=None`` (the framing can no longer be trusted: close). A bad data digest
    raises with ``reject=DATA_DIGEST`` after the PDU was consumed, so the stream stays
    in sync and the caller may answer with Reject and carry on.
    """

    def __init__(self, max_data: int = 65536) -> None:
        self.buf = bytearray()
        self.max_data = max_data
        self.header_digest = False
        self.data_digest = False
        self.pos = 0

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        if self.pos > 65536 and self.pos * 2 > len(self.buf):
            del self.buf[: self.pos]
            self.pos = 0
        self.buf += data

    def pending(self) -> int:
        return len(self.buf) - self.pos

    def next(self) -> Pdu | None:
        buf = self.buf
        pos = self.pos
        avail = len(buf) - pos
        if avail < BHS_LEN:
            return None
        ahs_len = buf[pos + 4] * 4
        dlen = int.from_bytes(buf[pos + 5 : pos + 8], "big")
        hd = 4 if self.header_digest else 0
        head_len = BHS_LEN + ahs_len
        if dlen > self.max_data:
            raise IscsiProtocolError(
                f"data segment of {dlen} bytes exceeds {self.max_data}", None,
                bytes(buf[pos : pos + BHS_LEN]),
            )
        dd = 4 if (self.data_digest and dlen) else 0
        total = head_len + hd + dlen + pad4(dlen) + dd
        if avail < total:
            return None
        if hd:
            got = bytes(buf[pos + head_len : pos + head_len + 4])
            if got != digest_bytes(buf[pos : pos + head_len]):
                raise IscsiProtocolError("header digest mismatch", None)
        bhs = bytearray(buf[pos : pos + BHS_LEN])
        ahs = bytes(buf[pos + BHS_LEN : pos + head_len])
        dstart = pos + head_len + hd
        data = bytes(buf[dstart : dstart + dlen])
        self.pos = pos + total
        if dd:
            padded_end = dstart + dlen + pad4(dlen)
            if bytes(buf[padded_end : padded_end + 4]) != digest_bytes(buf[dstart:padded_end]):
                raise IscsiProtocolError(
                    "data digest mismatch", RejectReason.DATA_DIGEST, bytes(bhs)
                )
        if self.pos == len(buf):
            buf.clear()
            self.pos = 0
        return Pdu(bhs, ahs, data)
