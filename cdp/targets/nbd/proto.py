"""NBD wire constants and struct layouts (doc/proto.md of the NBD project).

Everything is big-endian ("network byte order"). Numbers here are the protocol's and
must never change. Names follow the specification with the ``NBD_`` prefix and the
group prefix dropped: ``NBD_OPT_GO`` is :attr:`Opt.GO`, ``NBD_CMD_FLAG_FUA`` is
:attr:`CmdFlag.FUA`.
"""

from __future__ import annotations

import struct
from enum import IntEnum, IntFlag


class Magic(IntEnum):
    """Magic numbers on the wire."""

    NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC", first 8 bytes of every handshake
    IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT", newstyle greeting and option header
    OLDSTYLE = 0x00420281861253  # oldstyle greeting (never sent by us)
    OPT_REPLY = 0x3E889045565A9  # option reply header
    REQUEST = 0x25609513  # transmission request
    SIMPLE_REPLY = 0x67446698  # simple reply
    STRUCTURED_REPLY = 0x668E33EF  # structured reply chunk
    EXTENDED_REQUEST = 0x21E41C71  # experimental EXTENDED_HEADERS (unsupported)
    EXTENDED_REPLY = 0x6E8A278C  # experimental EXTENDED_HEADERS (unsupported)


class HandshakeFlag(IntFlag):
    """16-bit flags the server sends in the greeting."""

    FIXED_NEWSTYLE = 1 << 0
    NO_ZEROES = 1 << 1


class ClientFlag(IntFlag):
    """32-bit flags the client answers the greeting with."""

    C_FIXED_NEWSTYLE = 1 << 0
    C_NO_ZEROES = 1 << 1


class TransmissionFlag(IntFlag):
    """16-bit per-export flags sent when transmission starts."""

    HAS_FLAGS = 1 << 0
    READ_ONLY = 1 << 1
    SEND_FLUSH = 1 << 2
    SEND_FUA = 1 << 3
    ROTATIONAL = 1 << 4
    SEND_TRIM = 1 << 5
    SEND_WRITE_ZEROES = 1 << 6
    SEND_DF = 1 << 7
    CAN_MULTI_CONN = 1 << 8
    SEND_RESIZE = 1 << 9
    SEND_CACHE = 1 << 10
    SEND_FAST_ZERO = 1 << 11
    BLOCK_STATUS_PAYLOAD = 1 << 12


class Opt(IntEnum):
    """Option types (handshake phase)."""

    EXPORT_NAME = 1
    ABORT = 2
    LIST = 3
    PEEK_EXPORT = 4  # withdrawn
    STARTTLS = 5
    INFO = 6
    GO = 7
    STRUCTURED_REPLY = 8
    LIST_META_CONTEXT = 9
    SET_META_CONTEXT = 10
    EXTENDED_HEADERS = 11  # experimental (unsupported)


#: bit 31 marks an error reply
REP_FLAG_ERROR = 1 << 31


class Rep(IntEnum):
    """Option reply types; errors have bit 31 set."""

    ACK = 1
    SERVER = 2
    INFO = 3
    META_CONTEXT = 4
    ERR_UNSUP = REP_FLAG_ERROR | 1
    ERR_POLICY = REP_FLAG_ERROR | 2
    ERR_INVALID = REP_FLAG_ERROR | 3
    ERR_PLATFORM = REP_FLAG_ERROR | 4
    ERR_TLS_REQD = REP_FLAG_ERROR | 5
    ERR_UNKNOWN = REP_FLAG_ERROR | 6
    ERR_SHUTDOWN = REP_FLAG_ERROR | 7
    ERR_BLOCK_SIZE_REQD = REP_FLAG_ERROR | 8
    ERR_TOO_BIG = REP_FLAG_ERROR | 9
    ERR_EXT_HEADER_REQD = REP_FLAG_ERROR | 10


class Info(IntEnum):
    """Information types in NBD_REP_INFO replies to NBD_OPT_INFO / NBD_OPT_GO."""

    EXPORT = 0
    NAME = 1
    DESCRIPTION = 2
    BLOCK_SIZE = 3


class Cmd(IntEnum):
    """Request types (transmission phase)."""

    READ = 0
    WRITE = 1
    DISC = 2
    FLUSH = 3
    TRIM = 4
    CACHE = 5
    WRITE_ZEROES = 6
    BLOCK_STATUS = 7
    RESIZE = 8  # experimental (unsupported)


class CmdFlag(IntFlag):
    """16-bit request flags."""

    FUA = 1 << 0
    NO_HOLE = 1 << 1
    DF = 1 << 2
    REQ_ONE = 1 << 3
    FAST_ZERO = 1 << 4
    PAYLOAD_LEN = 1 << 5  # experimental (unsupported)


class ReplyFlag(IntFlag):
    """Structured reply chunk flags."""

    DONE = 1 << 0


#: bit 15 marks an error chunk
REPLY_TYPE_FLAG_ERROR = 1 << 15


class ReplyType(IntEnum):
    """Structured reply chunk types."""

    NONE = 0
    OFFSET_DATA = 1
    OFFSET_HOLE = 2
    BLOCK_STATUS = 5
    BLOCK_STATUS_EXT = 6  # experimental (unsupported)
    ERROR = REPLY_TYPE_FLAG_ERROR | 1
    ERROR_OFFSET = REPLY_TYPE_FLAG_ERROR | 2


class StateFlag(IntFlag):
    """Status flags of the ``base:allocation`` metadata context."""

    HOLE = 1 << 0
    ZERO = 1 << 1


class NbdErrno(IntEnum):
    """Error values allowed on the wire (not the host's errno numbers)."""

    OK = 0
    EPERM = 1
    EIO = 5
    ENOMEM = 12
    EINVAL = 22
    ENOSPC = 28
    EOVERFLOW = 75
    ENOTSUP = 95
    ESHUTDOWN = 108


#: name of the one metadata context the specification defines
BASE_ALLOCATION = "base:allocation"

#: longest string (export name, description, context name) the spec allows
MAX_STRING = 4096

#: default export size constraints we advertise in NBD_INFO_BLOCK_SIZE: the devices are
#: byte addressed (a minimum of 1, as ``nbdkit file`` advertises), so libnbd clients
#: (nbdfuse) pass unaligned requests straight through; a device may ask for more
#: (:class:`cdp.targets.blockdev.HasBlockSize`)
MIN_BLOCK_SIZE = 1
PREFERRED_BLOCK_SIZE = 4096
#: the largest READ / WRITE payload served (what nbdkit and nbd-server serve; larger:
#: NBD_EOVERFLOW, the connection goes on). Clients of the old NBD_OPT_EXPORT_NAME
#: handshake never see it advertised, so it is also what they may rely on.
MAX_PAYLOAD = 64 << 20

#: most extents a server should send in one block status chunk
MAX_EXTENTS = 1 << 20

# --- struct layouts -----------------------------------------------------------------

#: S: NBDMAGIC u64, IHAVEOPT u64, handshake flags u16
GREETING = struct.Struct(">QQH")
#: C: client flags u32
CLIENT_FLAGS = struct.Struct(">I")
#: C: IHAVEOPT u64, option u32, length u32
OPTION_HEADER = struct.Struct(">QII")
#: S: reply magic u64, option u32, reply type u32, length u32
OPTION_REPLY = struct.Struct(">QIII")
#: S: (reply to NBD_OPT_EXPORT_NAME) size u64, transmission flags u16
EXPORT_NAME_REPLY = struct.Struct(">QH")
#: NBD_REP_INFO payload: NBD_INFO_EXPORT u16, size u64, transmission flags u16
INFO_EXPORT = struct.Struct(">HQH")
#: NBD_REP_INFO payload: NBD_INFO_BLOCK_SIZE u16, minimum u32, preferred u32, maximum u32
INFO_BLOCK_SIZE = struct.Struct(">HIII")
#: C: request magic u32, flags u16, type u16, cookie u64, offset u64, length u32
REQUEST = struct.Struct(">IHHQQI")
#: S: simple reply magic u32, error u32, cookie u64
SIMPLE_REPLY = struct.Struct(">IIQ")
#: S: structured reply magic u32, flags u16, type u16, cookie u64, length u32
STRUCTURED_REPLY = struct.Struct(">IHHQI")
#: structured chunk header + NBD_REPLY_TYPE_OFFSET_DATA's offset u64
OFFSET_DATA_HEADER = struct.Struct(">IHHQIQ")
#: NBD_REPLY_TYPE_OFFSET_HOLE payload: offset u64, hole size u32
OFFSET_HOLE = struct.Struct(">QI")
#: NBD_REPLY_TYPE_ERROR payload head: error u32, message length u16
ERROR_CHUNK = struct.Struct(">IH")
#: one block status descriptor: extent length u32, status flags u32
BLOCK_DESCRIPTOR = struct.Struct(">II")

U16 = struct.Struct(">H")
U32 = struct.Struct(">I")
U64 = struct.Struct(">Q")
