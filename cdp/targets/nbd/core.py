"""Sans-I/O NBD server protocol: bytes in, events out; reply calls in, bytes out.

Design notes
------------
- h11 style. ``conn = ServerConnection(provider)``; write ``conn.initial_bytes()``; feed
  what the socket gives to ``conn.receive_data(data)`` (``b""`` = peer closed); call
  ``conn.next_event()`` until it returns :data:`NEED_DATA`; send ``conn.data_to_send()``
  (or ``conn.pieces_to_send()`` for ``writelines``). Events: :class:`Ready` (transmission
  starts; ``conn.device`` is the opened export), :class:`Request` (a valid request for
  the caller to run), :class:`Refused` (an export was refused during option haggling:
  the client got the reason and may try another; the caller logs it), :class:`Closed`
  (soft disconnect, refused NBD_OPT_EXPORT_NAME, or EOF).
  The caller answers each Request, in any order, with :meth:`ServerConnection.reply_ok`,
  :meth:`~ServerConnection.reply_read`, :meth:`~ServerConnection.reply_block_status` or
  :meth:`~ServerConnection.reply_error`.
- Option haggling is handled entirely inside the core; it asks the
  :class:`~cdp.targets.blockdev.ExportProvider` for exports (a synchronous call) and the
  opened device for its size, flags and metadata contexts. No device I/O happens here.
- Every request is validated here (range, flags, read-only, lengths); invalid ones are
  answered here with the spec's error and never reach the caller. Only the request
  magic is fatal: after a bad magic the stream cannot be resynchronised.
- Connection states live in :data:`TRANSITIONS`; anything not in it moves to ERROR.
  Peer bytes either parse or raise :class:`cdp.errors.ProtocolError` (nothing else,
  fuzz tested); after that every call raises ProtocolError again.
- Hot path: one ``struct.unpack_from`` per request header straight from the receive
  buffer, one copy of a WRITE payload, replies are pre-packed headers plus the data
  object itself (no join) so the pump can hand them to ``writelines``.
- Large WRITE payloads (``DIRECT_PAYLOAD`` or more) that have not fully arrived get
  their own buffer at once; :meth:`ServerConnection.recv_buffer` hands its unfilled
  tail to the socket (``recv_into``, an ``asyncio.BufferedProtocol``), so such a payload
  is copied once, by the kernel, and reaches the device as a ``bytearray``.

Decisions where the spec leaves room (see also docs in the tests):

- Block sizes advertised: minimum 1 (the devices are byte addressed: any offset and
  length, as ``nbdkit file``), preferred 4096, maximum payload 64 MiB. A device that
  declares ``min_block_size`` (:class:`~cdp.targets.blockdev.HasBlockSize`, e.g. a proxy
  volume over an NBD primary that needs 512) gets it advertised (preferred at least as
  large) and requests not aligned to it answered EINVAL here, as the spec suggests.
  Maximum payload 64 MiB, as nbdkit and nbd-server serve: a client of the old
  NBD_OPT_EXPORT_NAME handshake never learns the maximum, and some send 32-48 MiB.
- READ / WRITE longer than 64 MiB -> EOVERFLOW (the spec allows it, and it tells the
  client "too large" rather than "invalid"); a READ that also runs past the end is
  EINVAL, as before (the range is checked first, as nbdkit does). An oversized WRITE's payload is skipped
  (not buffered) and the connection goes on, as current qemu servers do.
- Requests of length 0 (other than FLUSH) -> EINVAL, as nbdkit does.
- Past the end: WRITE / WRITE_ZEROES -> ENOSPC (the spec's SHOULD), others -> EINVAL.
- Options larger than 64 KiB -> the data is skipped, NBD_REP_ERR_TOO_BIG.
- NBD_OPT_STARTTLS: with ``tls="off"`` -> NBD_REP_ERR_POLICY. With "on"/"require" ->
  NBD_REP_ACK and a :class:`StartTls` event: the caller sends the ACK, upgrades the
  transport and calls :meth:`ServerConnection.tls_started`. Plaintext bytes already
  sent after STARTTLS are a protocol error; STARTTLS under TLS -> NBD_REP_ERR_INVALID.
  With "require", every option but STARTTLS and ABORT before TLS gets
  NBD_REP_ERR_TLS_REQD (NBD_OPT_EXPORT_NAME, which has no error reply, closes).
- Successful non-READ replies are simple replies even with structured replies
  negotiated (the spec allows it); errors then use an NBD_REPLY_TYPE_ERROR chunk with
  a message. READ data goes in one NBD_REPLY_TYPE_OFFSET_DATA chunk flagged DONE, so
  NBD_CMD_FLAG_DF is honoured trivially and NBD_FLAG_SEND_DF is advertised.
- Metadata contexts: ids are 1..n in the order the device lists them. A listing query
  ending in ``:`` lists every context with that prefix (``base:``, ``x-cdp:``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from enum import Enum, auto
from typing import Final, NoReturn

from cdp.errors import CdpError, ProtocolError
from cdp.targets.blockdev import (
    BlockDevice,
    ExportProvider,
    HasBlockSize,
    HasDescription,
    MatchesMetaContexts,
)
from cdp.targets.nbd.proto import (
    BLOCK_DESCRIPTOR,
    CLIENT_FLAGS,
    ERROR_CHUNK,
    EXPORT_NAME_REPLY,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    MAX_EXTENTS,
    MAX_PAYLOAD,
    MAX_STRING,
    MIN_BLOCK_SIZE,
    OFFSET_DATA_HEADER,
    OPTION_HEADER,
    OPTION_REPLY,
    PREFERRED_BLOCK_SIZE,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    U16,
    U32,
    ClientFlag,
    Cmd,
    CmdFlag,
    HandshakeFlag,
    Info,
    Magic,
    NbdErrno,
    Opt,
    Rep,
    ReplyFlag,
    ReplyType,
    TransmissionFlag,
)

log = logging.getLogger("cdp.nbd")

#: option data larger than this is skipped and answered NBD_REP_ERR_TOO_BIG
MAX_OPTION_DATA: Final = 64 << 10


class State(Enum):
    """Connection states."""

    CLIENT_FLAGS = auto()  # greeting sent, waiting for the client's 32-bit flags
    OPTIONS = auto()  # option haggling
    TRANSMISSION = auto()  # requests and replies
    CLOSED = auto()  # soft disconnect, refused export or EOF: nothing more to parse
    ERROR = auto()  # protocol violation: the connection must be dropped


class Input(Enum):
    """What happened, as the transition table sees it."""

    FLAGS_OK = auto()
    OPTION = auto()  # any option that does not end the handshake
    GO_OK = auto()
    REFUSED = auto()  # INFO / GO / a metadata context option named an export we refused
    EXPORT_NAME_OK = auto()
    EXPORT_NAME_REFUSED = auto()
    ABORT = auto()
    STARTTLS = auto()  # STARTTLS acknowledged: the transport is upgraded in place
    REQUEST = auto()
    DISC = auto()
    EOF = auto()


#: every legal transition; anything else -> State.ERROR
TRANSITIONS: Final[dict[tuple[State, Input], State]] = {
    (State.CLIENT_FLAGS, Input.FLAGS_OK): State.OPTIONS,
    (State.CLIENT_FLAGS, Input.EOF): State.CLOSED,
    (State.OPTIONS, Input.OPTION): State.OPTIONS,
    (State.OPTIONS, Input.GO_OK): State.TRANSMISSION,
    (State.OPTIONS, Input.REFUSED): State.OPTIONS,
    (State.OPTIONS, Input.EXPORT_NAME_OK): State.TRANSMISSION,
    (State.OPTIONS, Input.EXPORT_NAME_REFUSED): State.CLOSED,
    (State.OPTIONS, Input.ABORT): State.CLOSED,
    (State.OPTIONS, Input.STARTTLS): State.OPTIONS,
    (State.OPTIONS, Input.EOF): State.CLOSED,
    # REQUEST keeps TRANSMISSION; the hot path relies on this row without a lookup
    (State.TRANSMISSION, Input.REQUEST): State.TRANSMISSION,
    (State.TRANSMISSION, Input.DISC): State.CLOSED,
    (State.TRANSMISSION, Input.EOF): State.CLOSED,
}


class _NeedData:
    """Sentinel: feed more bytes (or EOF) before the next event."""

    _instance: _NeedData | None = None

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()


class Ready:
    """Transmission starts on ``device`` (the export named ``name``)."""

    __slots__ = ("contexts", "device", "flags", "name", "structured")

    def __init__(
        self,
        name: str,
        device: BlockDevice,
        flags: int,
        structured: bool,
        contexts: list[tuple[int, str]],
    ) -> None:
        self.name = name
        self.device = device
        self.flags = flags
        self.structured = structured
        self.contexts = contexts

    def __repr__(self) -> str:
        return f"Ready(name={self.name!r}, flags={self.flags:#x}, structured={self.structured})"


class Closed:
    """Nothing more will be parsed. ``reason``: abort, disc, refused, eof."""

    __slots__ = ("message", "reason")

    def __init__(self, reason: str, message: str = "") -> None:
        self.reason = reason
        self.message = message

    def __repr__(self) -> str:
        return f"Closed({self.reason!r}, {self.message!r})"


class Refused:
    """An option named an export that cannot be opened: ``name`` as the client sent it,
    ``reason`` as sent in the NBD_REP_ERR_UNKNOWN error string. Haggling goes on."""

    __slots__ = ("name", "option", "reason")

    def __init__(self, name: str, reason: str, option: int) -> None:
        self.name = name
        self.reason = reason
        self.option = option

    def __repr__(self) -> str:
        return f"Refused({self.name!r}, {self.reason!r})"


class StartTls:
    """STARTTLS was acknowledged: send pending output, then start the TLS handshake on
    the transport, then call :meth:`ServerConnection.tls_started`."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "StartTls()"


class Request:
    """A validated transmission request. ``cmd`` and ``flags`` are plain ints
    (compare with :class:`Cmd` / :class:`CmdFlag`); ``data`` is the WRITE payload."""

    __slots__ = ("cmd", "cookie", "data", "flags", "length", "offset")

    def __init__(
        self, cmd: int, flags: int, cookie: int, offset: int, length: int,
        data: bytes | bytearray | None,
    ) -> None:
        self.cmd = cmd
        self.flags = flags
        self.cookie = cookie
        self.offset = offset
        self.length = length
        self.data = data

    def __repr__(self) -> str:
        return (
            f"Request(cmd={self.cmd}, flags={self.flags:#x}, cookie={self.cookie:#x}, "
            f"offset={self.offset}, length={self.length})"
        )


Event = Request | Ready | Refused | Closed | StartTls | _NeedData
BytesLike = bytes | bytearray | memoryview


class _BadOption(ProtocolError):
    """Malformed option data: answered NBD_REP_ERR_INVALID, the connection goes on."""


class _Reader:
    """Bounds-checked reader over option data; raises _BadOption."""

    __slots__ = ("data", "pos")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise _BadOption("option data too short")
        out = self.data[self.pos : self.pos + n]
        self.pos += n
        return out

    def u16(self) -> int:
        return int(U16.unpack(self.take(2))[0])

    def u32(self) -> int:
        return int(U32.unpack(self.take(4))[0])

    def string(self) -> str:
        n = self.u32()
        if n > MAX_STRING:
            raise _BadOption("string longer than 4096 bytes")
        try:
            return self.take(n).decode("utf-8")
        except UnicodeDecodeError:
            raise _BadOption("string is not UTF-8") from None

    def end(self) -> None:
        if self.pos != len(self.data):
            raise _BadOption("trailing option data")


def match_contexts(device: BlockDevice, queries: Sequence[str], listing: bool) -> list[str]:
    """Context names a query list selects (SET) or lists (LIST) on ``device``."""
    hook = device.match_meta_contexts if isinstance(device, MatchesMetaContexts) else None
    offered = device.meta_contexts()
    if listing and not queries:
        return list(offered)
    out: list[str] = []
    for q in queries:
        if hook is not None:
            found: list[str] = list(hook(q, listing))
        elif q in offered:
            found = [q]
        elif listing and q.endswith(":"):
            found = [c for c in offered if c.startswith(q)]
        else:
            found = []
        out.extend(c for c in found if c not in out)
    return out


_REQ_MAGIC: Final = int(Magic.REQUEST)
_CMD_READ: Final = int(Cmd.READ)
_CMD_WRITE: Final = int(Cmd.WRITE)
_CMD_DISC: Final = int(Cmd.DISC)
_CMD_FLUSH: Final = int(Cmd.FLUSH)
_CMD_TRIM: Final = int(Cmd.TRIM)
_CMD_WRITE_ZEROES: Final = int(Cmd.WRITE_ZEROES)
_CMD_BLOCK_STATUS: Final = int(Cmd.BLOCK_STATUS)
_WRITING: Final = frozenset({_CMD_WRITE, _CMD_TRIM, _CMD_WRITE_ZEROES})
_FLAG_REQ_ONE: Final = int(CmdFlag.REQ_ONE)
_SIMPLE_MAGIC: Final = int(Magic.SIMPLE_REPLY)
_STRUCT_MAGIC: Final = int(Magic.STRUCTURED_REPLY)
_DONE: Final = int(ReplyFlag.DONE)
_OFFSET_DATA: Final = int(ReplyType.OFFSET_DATA)
_HDR: Final = REQUEST.size
_TOO_LONG: Final = f"%s of %d bytes: longer than the maximum payload ({MAX_PAYLOAD >> 20} MiB)"
#: WRITE payloads of at least this many bytes are received into their own buffer
DIRECT_PAYLOAD: Final = 64 << 10
#: the scratch buffer :meth:`ServerConnection.recv_buffer` offers between payloads
RECV_BUFFER: Final = 256 << 10
_SERVER_FLAGS: Final = HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES
_KNOWN_CLIENT_FLAGS: Final = int(ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)
#: the spec's ceiling for a minimum block size
_MAX_MIN_BLOCK: Final = 1 << 16


def min_block_size(device: BlockDevice) -> int:
    """The minimum block size to advertise for ``device``: its ``min_block_size``
    rounded up to a power of 2 and capped at 64 KiB, else :data:`MIN_BLOCK_SIZE`."""
    if not isinstance(device, HasBlockSize):
        return MIN_BLOCK_SIZE
    m = min(max(1, int(device.min_block_size)), _MAX_MIN_BLOCK)
    return 1 << (m - 1).bit_length()


class ServerConnection:
    """One NBD client connection, server side, without I/O."""

    def __init__(self, provider: ExportProvider, tls: str = "off") -> None:
        self.provider = provider
        if tls not in ("off", "on", "require"):
            raise ValueError(f"tls must be off, on or require, not {tls!r}")
        self.tls = tls
        self.tls_active = False
        self.state = State.CLIENT_FLAGS
        self.device: BlockDevice | None = None
        self.export_name: str | None = None
        self.structured = False
        self.no_zeroes = False
        self.transmission_flags = 0
        #: selected metadata contexts: (id, name), and the export they were selected for
        self.contexts: list[tuple[int, str]] = []
        self._contexts_export: str | None = None
        self._buf = bytearray()
        self._pos = 0
        self._eof = False
        self._discard = 0  # payload bytes to skip (oversized option / WRITE)
        #: a large WRITE payload being received into its own buffer: the buffer, bytes
        #: filled, and the request header fields (flags, cmd, cookie, offset, length)
        self._pl: bytearray | None = None
        self._pl_fill = 0
        self._pl_req = (0, 0, 0, 0, 0)
        self._scratch = memoryview(bytearray(RECV_BUFFER))
        self._into_pl = False
        self._big_writes = False  # the last request was a large WRITE
        self._out: list[BytesLike] = []
        self._size = 0
        self._align = 0  # minimum block size - 1: offset | length & it must be 0
        self._allowed: dict[int, int] = {}
        self._refused: Refused | None = None  # set by _open, returned by _option

    # --- state table ------------------------------------------------------------

    def _transition(self, what: Input) -> None:
        new = TRANSITIONS.get((self.state, what))
        if new is None:
            self._fail(f"{what.name} is not valid in state {self.state.name}")
        else:
            self.state = new

    def _fail(self, message: str) -> NoReturn:
        self.state = State.ERROR
        raise ProtocolError(message)

    # --- bytes in / events out --------------------------------------------------

    def initial_bytes(self) -> bytes:
        """The greeting: NBDMAGIC, IHAVEOPT, handshake flags (fixed newstyle, no zeroes)."""
        return GREETING.pack(Magic.NBDMAGIC, Magic.IHAVEOPT, _SERVER_FLAGS)

    def recv_buffer(self) -> memoryview:
        """Where the next bytes from the socket should go (for ``recv_into``): the
        unfilled tail of a large WRITE payload, else a scratch buffer. Follow with
        :meth:`recv_done`."""
        pl = self._pl
        if pl is not None and self._pl_fill < len(pl):
            self._into_pl = True
            return memoryview(pl)[self._pl_fill :]
        self._into_pl = False
        if self._big_writes and self._pos >= len(self._buf):
            # large WRITEs are streaming: read just the next header, so the payload
            # behind it lands in its own buffer instead of being copied twice
            return self._scratch[:_HDR]
        return self._scratch

    def recv_done(self, n: int) -> None:
        """``n`` bytes arrived in the buffer :meth:`recv_buffer` gave."""
        if n <= 0:
            return
        if self._into_pl:
            self._into_pl = False
            if self.state is State.ERROR:
                raise ProtocolError("connection already failed")
            self._pl_fill += n
        else:
            self.receive_data(self._scratch[:n])

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Add bytes from the peer; ``b""`` means the peer closed its side."""
        if self.state is State.ERROR:
            raise ProtocolError("connection already failed")
        if not data:
            self._eof = True
            return
        if self.state is State.CLOSED:
            return  # the client MUST NOT send more; ignore it
        pl = self._pl
        if pl is not None:
            fill = self._pl_fill
            k = min(len(pl) - fill, len(data))
            if k:
                pl[fill : fill + k] = data[:k]
                self._pl_fill = fill + k
                if k == len(data):
                    return
                data = data[k:]
        buf = self._buf
        pos = self._pos
        if pos:
            if pos >= len(buf):
                buf.clear()
                self._pos = 0
            elif pos > 1 << 16:
                del buf[:pos]
                self._pos = 0
        buf += data

    def next_event(self) -> Event:
        """The next event, or :data:`NEED_DATA`. Raises ProtocolError on bad input."""
        if self.state is not State.TRANSMISSION or self._discard:
            return self._next_slow()
        buf = self._buf
        pos = self._pos
        unpack = REQUEST.unpack_from
        pl = self._pl
        align = self._align
        while True:
            data: bytes | bytearray | None = None
            if pl is not None:  # a large payload received into its own buffer
                if self._pl_fill < len(pl):
                    return self._need_data()
                self._pl = None
                self._big_writes = True
                flags, cmd, cookie, offset, length = self._pl_req
                data, pl = pl, None
            else:
                if len(buf) - pos < _HDR:
                    self._pos = pos
                    return self._need_data()
                magic, flags, cmd, cookie, offset, length = unpack(buf, pos)
                if magic != _REQ_MAGIC:
                    self._pos = pos
                    self._fail(f"bad request magic {magic:#x}")
                if cmd == _CMD_WRITE:
                    if length > MAX_PAYLOAD:
                        self._pos = pos + _HDR
                        self._discard = length
                        self._reply_error_raw(
                            cmd, cookie, NbdErrno.EOVERFLOW, _TOO_LONG % ("write", length))
                        return self._next_slow()
                    end = pos + _HDR + length
                    if len(buf) < end:
                        if length >= DIRECT_PAYLOAD:
                            # the rest goes straight into the payload's own buffer
                            got = memoryview(buf)[pos + _HDR :]
                            pl = bytearray(length)
                            pl[: len(got)] = got
                            self._pl, self._pl_fill = pl, len(got)
                            got.release()
                            self._pl_req = (flags, cmd, cookie, offset, length)
                            self._pos = len(buf)
                            return self._need_data()
                        self._pos = pos
                        return self._need_data()
                    data = memoryview(buf)[pos + _HDR : end].tobytes()
                    pos = end
                else:
                    pos += _HDR
                self._big_writes = False
            mask = self._allowed.get(cmd)
            if (
                mask is not None
                and not flags & ~mask
                and length > 0
                and offset + length <= self._size
                and (length <= MAX_PAYLOAD or cmd != _CMD_READ)
                and (not align or not (offset | length) & align)
            ):
                self._pos = pos
                return Request(cmd, flags, cookie, offset, length, data)
            elif cmd == _CMD_DISC:
                self._pos = pos
                self._transition(Input.DISC)
                return Closed("disc")
            elif (
                cmd == _CMD_FLUSH
                and mask is not None
                and not flags & ~mask
                and offset == 0
                and length == 0
            ):
                self._pos = pos
                return Request(cmd, flags, cookie, 0, 0, None)
            self._reject(cmd, flags, cookie, offset, length, mask)

    def _need_data(self) -> Event:
        if self._eof:
            if len(self._buf) > self._pos or self._discard or self._pl is not None:
                self._fail("connection closed in the middle of a message")
            self._transition(Input.EOF)
            return Closed("eof")
        return NEED_DATA

    def _reject(
        self, cmd: int, flags: int, cookie: int, offset: int, length: int, mask: int | None
    ) -> None:
        """Answer an invalid request with the spec's error."""
        err, msg = NbdErrno.EINVAL, ""
        if cmd in _WRITING and TransmissionFlag.READ_ONLY & self.transmission_flags:
            err, msg = NbdErrno.EPERM, "export is read-only"
        elif cmd == _CMD_BLOCK_STATUS and not self.contexts:
            msg = "no metadata context selected"
        elif mask is None:
            msg = f"unknown command {cmd}"
        elif flags & ~mask:
            msg = f"invalid flags {flags:#x} for command {cmd}"
        elif cmd == _CMD_FLUSH:
            msg = "flush offset and length must be zero"
        elif length == 0:
            msg = "zero length"
        elif offset + length > self._size:
            msg = "request beyond the end of the export"
            if cmd in (_CMD_WRITE, _CMD_WRITE_ZEROES):
                err = NbdErrno.ENOSPC
        elif length > MAX_PAYLOAD and cmd == _CMD_READ:  # (an oversized WRITE never gets here)
            err, msg = NbdErrno.EOVERFLOW, _TOO_LONG % ("read", length)
        elif (offset | length) & self._align:
            msg = f"offset and length must be multiples of {self._align + 1} bytes"
        self._reply_error_raw(cmd, cookie, err, msg)

    def _next_slow(self) -> Event:
        """Everything but the transmission fast path."""
        while True:
            if self._discard:
                avail = len(self._buf) - self._pos
                n = min(avail, self._discard)
                self._pos += n
                self._discard -= n
                if self._discard:
                    return self._need_data()
            state = self.state
            if state is State.TRANSMISSION:
                return self.next_event()
            if state is State.CLOSED:
                return NEED_DATA
            if state is State.ERROR:
                raise ProtocolError("connection already failed")
            buf, pos = self._buf, self._pos
            avail = len(buf) - pos
            if state is State.CLIENT_FLAGS:
                if avail < 4:
                    return self._need_data()
                (cflags,) = CLIENT_FLAGS.unpack_from(buf, pos)
                self._pos = pos + 4
                if cflags & ~_KNOWN_CLIENT_FLAGS:
                    self._fail(f"unknown client flags {cflags:#x}")
                self.no_zeroes = bool(cflags & ClientFlag.C_NO_ZEROES)
                self._transition(Input.FLAGS_OK)
                continue
            # State.OPTIONS
            if avail < OPTION_HEADER.size:
                return self._need_data()
            magic, opt, optlen = OPTION_HEADER.unpack_from(buf, pos)
            if magic != Magic.IHAVEOPT:
                self._fail(f"bad option magic {magic:#x}")
            if optlen > MAX_OPTION_DATA:
                self._pos = pos + OPTION_HEADER.size
                self._discard = optlen
                if opt == Opt.EXPORT_NAME:
                    self._transition(Input.EXPORT_NAME_REFUSED)
                    return Closed("refused", "export name too long")
                self._option_reply(opt, Rep.ERR_TOO_BIG, b"option data too large")
                self._transition(Input.OPTION)
                continue
            if avail < OPTION_HEADER.size + optlen:
                return self._need_data()
            start = pos + OPTION_HEADER.size
            payload = bytes(buf[start : start + optlen])
            self._pos = start + optlen
            event = self._option(opt, payload)
            if event is not None:
                return event

    # --- option haggling ----------------------------------------------------------

    def _option_reply(self, opt: int, rep: int, data: bytes = b"") -> None:
        self._out.append(OPTION_REPLY.pack(Magic.OPT_REPLY, opt, rep, len(data)) + data)

    def _option(self, opt: int, data: bytes) -> Event | None:
        """Handle one option; return an event when the handshake ends."""
        if opt == Opt.ABORT:
            self._option_reply(opt, Rep.ACK)
            self._transition(Input.ABORT)
            return Closed("abort")
        if self.tls == "require" and not self.tls_active and opt != Opt.STARTTLS:
            if opt == Opt.EXPORT_NAME:
                self._transition(Input.EXPORT_NAME_REFUSED)
                return Closed("refused", "export refused: TLS is required (NBD_OPT_STARTTLS first)")
            self._option_reply(opt, Rep.ERR_TLS_REQD, b"TLS is required")
            self._transition(Input.OPTION)
            return None
        if opt == Opt.EXPORT_NAME:
            return self._export_name(data)
        if opt == Opt.STARTTLS and self.tls != "off" and not self.tls_active and not data:
            if len(self._buf) > self._pos:
                self._fail("plaintext data after NBD_OPT_STARTTLS")
            self._option_reply(opt, Rep.ACK)
            self._transition(Input.STARTTLS)
            return StartTls()
        try:
            if opt == Opt.GO or opt == Opt.INFO:
                started = self._info_or_go(opt, data)
                if started is not None:
                    return started
            elif opt == Opt.LIST:
                if data:
                    raise _BadOption("NBD_OPT_LIST takes no data")
                for name, description in self.provider.list_exports():
                    n = name.encode()
                    self._option_reply(opt, Rep.SERVER, U32.pack(len(n)) + n + description.encode())
                self._option_reply(opt, Rep.ACK)
            elif opt == Opt.STRUCTURED_REPLY:
                if data:
                    raise _BadOption("NBD_OPT_STRUCTURED_REPLY takes no data")
                if self.structured:
                    raise _BadOption("structured replies already negotiated")
                self.structured = True
                self._option_reply(opt, Rep.ACK)
            elif opt == Opt.SET_META_CONTEXT or opt == Opt.LIST_META_CONTEXT:
                self._meta_context(opt, data)
            elif opt == Opt.STARTTLS:
                if data:
                    raise _BadOption("NBD_OPT_STARTTLS takes no data")
                if self.tls_active:
                    raise _BadOption("TLS is already active")
                self._option_reply(opt, Rep.ERR_POLICY, b"TLS is not configured")
            else:
                self._option_reply(opt, Rep.ERR_UNSUP, b"option not supported")
        except _BadOption as exc:
            self._option_reply(opt, Rep.ERR_INVALID, str(exc).encode())
        except ProtocolError:
            raise
        except Exception as exc:  # a provider or device bug must not kill the parser
            log.error("option %d failed: %r", opt, exc, exc_info=exc)
            self._option_reply(opt, Rep.ERR_INVALID, b"internal error")
        refused, self._refused = self._refused, None
        if refused is not None:
            self._transition(Input.REFUSED)
            return refused
        self._transition(Input.OPTION)
        return None

    def tls_started(self) -> None:
        """The transport now runs TLS (after a :class:`StartTls` event)."""
        self.tls_active = True

    def _open(self, opt: int, name: str) -> BlockDevice | None:
        """Open an export, or note a :class:`Refused` (its reason: the provider's error
        text) and return None; options with a reply get NBD_REP_ERR_UNKNOWN carrying
        the reason as its error string (as nbdkit sends it), or NBD_REP_ERR_POLICY when
        the provider raised a PermissionError (this client may not use the export)."""
        rep = Rep.ERR_UNKNOWN
        try:
            return self.provider.open_export(name)
        except CdpError as exc:
            msg = str(exc) or f"export {name!r} not available"
            if isinstance(exc, PermissionError):  # this client may not use the export
                rep = Rep.ERR_POLICY
        except Exception as exc:
            log.error("opening export %r failed: %r", name, exc, exc_info=exc)
            msg = f"export {name!r} not available (internal error)"
        self._refused = Refused(name, msg, opt)
        if opt != Opt.EXPORT_NAME:
            self._option_reply(opt, rep, msg.encode()[:MAX_STRING])
        return None

    def _flags_for(self, device: BlockDevice) -> int:
        tf = TransmissionFlag
        flags = tf.HAS_FLAGS | tf.SEND_FLUSH | tf.SEND_CACHE
        if device.read_only:
            flags |= tf.READ_ONLY
        else:
            flags |= tf.SEND_FUA | tf.SEND_TRIM | tf.SEND_WRITE_ZEROES | tf.SEND_FAST_ZERO
        if self.structured:
            flags |= tf.SEND_DF
        if device.can_multi_conn:
            flags |= tf.CAN_MULTI_CONN
        return int(flags)

    def _start(self, name: str, device: BlockDevice, flags: int, how: Input) -> Ready:
        """Enter transmission on ``device``."""
        self._transition(how)
        self.device = device
        self.export_name = name
        self.transmission_flags = flags
        self._size = device.size
        self._align = min_block_size(device) - 1
        if self._contexts_export != name:
            self.contexts = []
        fua = int(CmdFlag.FUA)
        allowed = {int(c): fua for c in (Cmd.READ, Cmd.FLUSH, Cmd.CACHE)}
        if self.structured:
            allowed[_CMD_READ] |= int(CmdFlag.DF)
        if self.contexts:
            allowed[_CMD_BLOCK_STATUS] = fua | _FLAG_REQ_ONE
        if not device.read_only:
            allowed[_CMD_WRITE] = fua
            allowed[_CMD_TRIM] = fua
            allowed[_CMD_WRITE_ZEROES] = fua | int(CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO)
        self._allowed = allowed
        return Ready(name, device, flags, self.structured, list(self.contexts))

    def _export_name(self, data: bytes) -> Event:
        try:
            name = data.decode("utf-8")
        except UnicodeDecodeError:
            name = None
        device = self._open(Opt.EXPORT_NAME, name) if name is not None else None
        if name is None or device is None:
            refused, self._refused = self._refused, None
            reason = refused.reason if refused is not None else "the name is not UTF-8"
            self._transition(Input.EXPORT_NAME_REFUSED)
            # NBD_OPT_EXPORT_NAME has no error reply: the reason reaches only our log
            return Closed("refused", f"export {(name or data[:64])!r} refused: {reason}")
        flags = self._flags_for(device)
        reply = EXPORT_NAME_REPLY.pack(device.size, flags)
        self._out.append(reply if self.no_zeroes else reply + bytes(124))
        return self._start(name, device, flags, Input.EXPORT_NAME_OK)

    def _info_or_go(self, opt: int, data: bytes) -> Event | None:
        r = _Reader(data)
        name = r.string()
        wanted = {r.u16() for _ in range(r.u16())}
        r.end()
        device = self._open(opt, name)
        if device is None:
            return None
        flags = self._flags_for(device)
        rep = Rep.INFO
        self._option_reply(opt, rep, INFO_EXPORT.pack(Info.EXPORT, device.size, flags))
        minimum = min_block_size(device)
        self._option_reply(
            opt,
            rep,
            INFO_BLOCK_SIZE.pack(
                Info.BLOCK_SIZE, minimum, max(minimum, PREFERRED_BLOCK_SIZE), MAX_PAYLOAD
            ),
        )
        if Info.NAME in wanted:
            self._option_reply(opt, rep, U16.pack(Info.NAME) + name.encode())
        if Info.DESCRIPTION in wanted:
            desc = device.description if isinstance(device, HasDescription) else None
            if desc is None:
                desc = dict(self.provider.list_exports()).get(name, "")
            if desc:
                self._option_reply(
                    opt, rep, U16.pack(Info.DESCRIPTION) + str(desc).encode()[:MAX_STRING]
                )
        self._option_reply(opt, Rep.ACK)
        if opt == Opt.GO:
            return self._start(name, device, flags, Input.GO_OK)
        device.close()
        return None

    def _meta_context(self, opt: int, data: bytes) -> None:
        setting = opt == Opt.SET_META_CONTEXT
        if setting:
            self.contexts = []  # replaced even when the option fails
            self._contexts_export = None
            if not self.structured:
                raise _BadOption("negotiate structured replies first")
        r = _Reader(data)
        name = r.string()
        count = r.u32()
        if count > MAX_OPTION_DATA // 4:
            raise _BadOption("too many queries")
        queries = [r.string() for _ in range(count)]
        r.end()
        for q in queries:
            if ":" not in q or q.startswith(":"):
                raise _BadOption(f"query {q[:64]!r} lacks a namespace")
        device = self._open(opt, name)
        if device is None:
            return
        try:
            found = match_contexts(device, queries, listing=not setting)
        finally:
            device.close()
        if setting:
            found = [c for c in found if not c.endswith(":")]
            self.contexts = [(i, c) for i, c in enumerate(found, start=1)]
            self._contexts_export = name
            for cid, c in self.contexts:
                self._option_reply(opt, Rep.META_CONTEXT, U32.pack(cid) + c.encode())
        else:
            for c in found:
                self._option_reply(opt, Rep.META_CONTEXT, U32.pack(0) + c.encode())
        self._option_reply(opt, Rep.ACK)

    # --- replies (actions in) -------------------------------------------------------

    def reply_ok(self, req: Request) -> None:
        """Success without payload (every command but READ and BLOCK_STATUS)."""
        self._out.append(SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, req.cookie))

    def reply_read(self, req: Request, data: bytes | bytearray | memoryview) -> None:
        """Success of a READ: exactly ``req.length`` bytes (else EIO is sent)."""
        if len(data) != req.length:
            self.reply_error(req, NbdErrno.EIO, "device returned a short read")
            return
        if self.structured:
            hdr = OFFSET_DATA_HEADER.pack(
                _STRUCT_MAGIC, _DONE, _OFFSET_DATA, req.cookie, 8 + req.length, req.offset
            )
        else:
            hdr = SIMPLE_REPLY.pack(_SIMPLE_MAGIC, 0, req.cookie)
        out = self._out
        out.append(hdr)
        out.append(data)

    def reply_error(self, req: Request, error: int, message: str = "") -> None:
        """Failure of a request; ``error`` is an :class:`NbdErrno` (never 0)."""
        self._reply_error_raw(req.cmd, req.cookie, error, message)

    def _reply_error_raw(self, cmd: int, cookie: int, error: int, message: str) -> None:
        if error == 0:
            error = NbdErrno.EIO
        if self.structured:
            msg = message.encode("utf-8", "replace")[:MAX_STRING]
            self._out.append(
                STRUCTURED_REPLY.pack(
                    _STRUCT_MAGIC, _DONE, ReplyType.ERROR, cookie, ERROR_CHUNK.size + len(msg)
                )
                + ERROR_CHUNK.pack(error, len(msg))
                + msg
            )
        else:
            self._out.append(SIMPLE_REPLY.pack(_SIMPLE_MAGIC, error, cookie))

    def reply_block_status(
        self, req: Request, results: Sequence[tuple[int, Sequence[tuple[int, int]]]]
    ) -> None:
        """Success of a BLOCK_STATUS: ``(context id, [(length, flags), ...])`` per
        selected context. Extents are clipped to the request (REQ_ONE: to one extent);
        zero-length extents are dropped; a context without extents makes it EIO."""
        req_one = bool(req.flags & _FLAG_REQ_ONE)
        chunks: list[bytes] = []
        pack = BLOCK_DESCRIPTOR.pack
        for ctx_id, extents in results:
            parts = [U32.pack(ctx_id)]
            remaining = req.length
            for length, flags in extents:
                if length <= 0:
                    continue
                if length > remaining:
                    length = remaining
                parts.append(pack(length, flags & 0xFFFFFFFF))
                remaining -= length
                if req_one or remaining == 0 or len(parts) > MAX_EXTENTS:
                    break
            if len(parts) == 1:
                self.reply_error(req, NbdErrno.EIO, "no block status for the range")
                return
            payload = b"".join(parts)
            chunks.append(payload)
        if not chunks:
            self.reply_error(req, NbdErrno.EINVAL, "no metadata context selected")
            return
        last = len(chunks) - 1
        for i, payload in enumerate(chunks):
            self._out.append(
                STRUCTURED_REPLY.pack(
                    _STRUCT_MAGIC,
                    _DONE if i == last else 0,
                    ReplyType.BLOCK_STATUS,
                    req.cookie,
                    len(payload),
                )
                + payload
            )

    # --- bytes out ----------------------------------------------------------------

    def data_to_send(self) -> bytes:
        """Everything queued so far, joined (for tests and simple pumps)."""
        out = b"".join(self._out)
        self._out = []
        return out

    def pieces_to_send(self) -> list[BytesLike]:
        """Everything queued so far as separate buffers (for ``writelines``)."""
        out = self._out
        self._out = []
        return out

    @property
    def backlog(self) -> int:
        """Received bytes not parsed yet (requests waiting for their turn), excluding a
        large WRITE payload being received into its own buffer. Cost: O(1)."""
        return len(self._buf) - self._pos

    @property
    def has_output(self) -> bool:
        """True when replies are queued."""
        return bool(self._out)
