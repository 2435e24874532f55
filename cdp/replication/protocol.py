"""Sans-I/O replication protocol: bytes in, events out; commands in, bytes out.

The wire format, the messages and the handshake are specified in docs/REPLICATION.md
("Wire protocol", "Authentication").

Design notes
------------
- h11 style, like :mod:`cdp.targets.nbd.core`. ``conn = TargetConnection(secret)`` (the
  replica side, which listens) or ``SourceConnection(secret, peer=NAME)`` (the side that
  ships records, which connects and calls :meth:`SourceConnection.start`). Feed what the
  socket gives to ``conn.receive_data(data)`` (``b""`` = peer closed), call
  ``conn.next_event()`` until it returns :data:`NEED_DATA`, send ``conn.data_to_send()``.
  The core opens no socket, reads no file and knows no volume: the caller answers
  :class:`OpenRequest` with :meth:`TargetConnection.accept` or
  :meth:`TargetConnection.refuse`, and sends records, acks and heartbeats through
  commands that only pack bytes.
- Both roles' states live in one table, :data:`TRANSITIONS`, keyed by
  ``(state, direction, message type)``; each role has its own states, so a row is never
  ambiguous. A received message without a row is a protocol error (the connection goes
  to ERROR); a command without a row is a caller bug (UsageError, state unchanged).
- Peer bytes either parse or raise :class:`cdp.errors.ProtocolError` (fuzz tested,
  whole and byte by byte); after that every call raises it again. A failed handshake
  raises :class:`Refusal` (a ProtocolError with a ``code``) after queueing a REFUSED
  frame, so the pump sends ``data_to_send()`` and then closes.
- Authentication: mutual HMAC-SHA256 over both sides' fresh 32-byte nonces, with a
  different label per role (no reflection), checked with ``hmac.compare_digest``. The
  secret never leaves the process. Until the handshake is done a frame may hold at most
  :data:`PRE_AUTH_FRAME` bytes, so an unauthenticated peer cannot make us buffer more.
- Records travel as their stored bytes (one msgpack ``bin`` each); the core checks the
  framing of each (magic, seq in sequence, stored length) so a mis-sequenced stream is
  refused before the journal sees it; the journal checks CRCs when it appends them.
  Cost: one msgpack decode (one copy of the payload) per RECORDS frame. A RECORDS frame
  is packed by :func:`encode_records_parts` (the same bytes as msgpack's packer, whose
  buffer regrowth costs ~15 ms per 4 MiB frame against ~1 ms for one join), and the
  source hands the pieces to a gathering write, so its records are not copied at all.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, IntEnum, auto
from typing import Final, NoReturn

import msgpack

from cdp.errors import ConfigError, ProtocolError, UsageError
from cdp.journal.format import RECORD_HEADER, RECORD_HEADER_SIZE, RECORD_MAGIC_BYTES

#: first bytes each side sends (never changes)
MAGIC: Final = b"CDPREPL\0"
#: protocol versions this core speaks (lowest, highest); 2 adds OPEN's ``fork_seq``,
#: 3 OPEN's ``epochs`` (the sender's epoch table: chained failback)
VERSIONS: Final = (1, 3)
#: at most this many entries in OPEN's ``epochs``
MAX_EPOCHS: Final = 4096
NONCE_SIZE: Final = 32
PROOF_SIZE: Final = 32
#: shortest shared secret accepted
MIN_SECRET: Final = 16
#: largest frame before the handshake is done
PRE_AUTH_FRAME: Final = 4096
#: largest frame afterwards: one stored record of the largest size, plus framing
MAX_FRAME: Final = (1 << 30) + (1 << 20)
#: longest name or message string accepted in a frame
MAX_TEXT: Final = 1024

_LEN = struct.Struct("<I")
_U64 = (1 << 64) - 1
_LABEL_TARGET = b"cdp-repl-1 target"
_LABEL_SOURCE = b"cdp-repl-1 source"


class MsgType(IntEnum):
    """Message types on the wire (never renumbered)."""

    HELLO = 1
    CHALLENGE = 2
    AUTH = 3
    AUTH_OK = 4
    OPEN = 5
    OPENED = 6
    RECORDS = 7
    ACK = 8
    HEARTBEAT = 9
    REFUSED = 10
    CLOSE = 11


class State(Enum):
    # target (replica) side
    HELLO_WAIT = auto()
    AUTH_WAIT = auto()
    OPEN_WAIT = auto()
    OPENING = auto()  # OpenRequest delivered; the caller accepts or refuses
    RECEIVING = auto()
    # source side
    START = auto()
    CHALLENGE_WAIT = auto()
    AUTH_OK_WAIT = auto()
    AUTHENTICATED = auto()
    OPENED_WAIT = auto()
    SENDING = auto()
    # both
    CLOSED = auto()
    ERROR = auto()  # protocol violation: drop the connection


class Dir(Enum):
    IN = auto()  # a message the peer sent
    OUT = auto()  # a message we send


_T, _S = State, MsgType
#: every legal transition; a received message without a row -> State.ERROR
TRANSITIONS: Final[dict[tuple[State, Dir, MsgType], State]] = {
    # target
    (_T.HELLO_WAIT, Dir.IN, _S.HELLO): _T.AUTH_WAIT,  # CHALLENGE sent with it
    (_T.HELLO_WAIT, Dir.OUT, _S.REFUSED): _T.CLOSED,  # no common version
    (_T.AUTH_WAIT, Dir.IN, _S.AUTH): _T.OPEN_WAIT,  # AUTH_OK sent with it
    (_T.AUTH_WAIT, Dir.OUT, _S.REFUSED): _T.CLOSED,  # wrong proof
    (_T.AUTH_WAIT, Dir.IN, _S.REFUSED): _T.CLOSED,  # we failed the source's check
    (_T.OPEN_WAIT, Dir.IN, _S.OPEN): _T.OPENING,
    (_T.OPEN_WAIT, Dir.IN, _S.CLOSE): _T.CLOSED,
    (_T.OPENING, Dir.OUT, _S.OPENED): _T.RECEIVING,
    (_T.OPENING, Dir.OUT, _S.REFUSED): _T.CLOSED,
    (_T.RECEIVING, Dir.IN, _S.RECORDS): _T.RECEIVING,
    (_T.RECEIVING, Dir.IN, _S.HEARTBEAT): _T.RECEIVING,
    (_T.RECEIVING, Dir.OUT, _S.ACK): _T.RECEIVING,
    (_T.RECEIVING, Dir.OUT, _S.REFUSED): _T.CLOSED,  # e.g. failover: stream fenced
    (_T.RECEIVING, Dir.IN, _S.CLOSE): _T.CLOSED,
    # source
    (_T.START, Dir.OUT, _S.HELLO): _T.CHALLENGE_WAIT,
    (_T.CHALLENGE_WAIT, Dir.IN, _S.CHALLENGE): _T.AUTH_OK_WAIT,  # AUTH sent with it
    (_T.CHALLENGE_WAIT, Dir.IN, _S.REFUSED): _T.CLOSED,
    (_T.CHALLENGE_WAIT, Dir.OUT, _S.REFUSED): _T.CLOSED,  # target failed its proof
    (_T.AUTH_OK_WAIT, Dir.IN, _S.AUTH_OK): _T.AUTHENTICATED,
    (_T.AUTH_OK_WAIT, Dir.IN, _S.REFUSED): _T.CLOSED,
    (_T.AUTHENTICATED, Dir.OUT, _S.OPEN): _T.OPENED_WAIT,
    (_T.AUTHENTICATED, Dir.OUT, _S.CLOSE): _T.CLOSED,
    (_T.OPENED_WAIT, Dir.IN, _S.OPENED): _T.SENDING,
    (_T.OPENED_WAIT, Dir.IN, _S.REFUSED): _T.CLOSED,
    (_T.SENDING, Dir.OUT, _S.RECORDS): _T.SENDING,
    (_T.SENDING, Dir.OUT, _S.HEARTBEAT): _T.SENDING,
    (_T.SENDING, Dir.IN, _S.ACK): _T.SENDING,
    (_T.SENDING, Dir.IN, _S.REFUSED): _T.CLOSED,
    (_T.SENDING, Dir.OUT, _S.CLOSE): _T.CLOSED,
}

#: states in which the peer has proven the secret (larger frames allowed)
_TRUSTED: Final = frozenset({State.OPEN_WAIT, State.OPENING, State.RECEIVING,
                             State.AUTHENTICATED, State.OPENED_WAIT, State.SENDING})

# field kinds of the schema below
_INT, _STR, _NONCE, _PROOF, _RECS, _EPOCHS = ("int", "str", "nonce", "proof", "records",
                                             "epochs")
#: the fields of each message, in order
SCHEMA: Final[dict[MsgType, tuple[str, ...]]] = {
    _S.HELLO: (_INT, _INT, _NONCE, _STR),  # vmin, vmax, nonce_s, peer
    _S.CHALLENGE: (_INT, _NONCE, _PROOF),  # version, nonce_t, proof_t
    _S.AUTH: (_PROOF,),  # proof_s
    _S.AUTH_OK: (),
    _S.OPEN: (_STR, _STR, _INT, _INT, _INT),  # volume, lineage, size, epoch, source_last_seq
    _S.OPENED: (_INT, _INT, _INT, _INT),  # applied_seq, tip_ts, tip_crc, epoch
    _S.RECORDS: (_INT, _RECS),  # first_seq, stored records
    _S.ACK: (_INT,),  # durable_seq
    _S.HEARTBEAT: (_INT, _INT),  # source_last_seq, now_ns
    _S.REFUSED: (_STR, _STR),  # code, message
    _S.CLOSE: (),
}
#: messages whose fields differ from version 2 on (the others keep SCHEMA's)
SCHEMA_V2: Final[dict[MsgType, tuple[str, ...]]] = {
    _S.OPEN: (_STR, _STR, _INT, _INT, _INT, _INT),  # ..., source_last_seq, fork_seq
}
#: messages whose fields differ from version 3 on
SCHEMA_V3: Final[dict[MsgType, tuple[str, ...]]] = {
    _S.OPEN: (_STR, _STR, _INT, _INT, _INT, _INT, _EPOCHS),  # ..., fork_seq, epochs
}


def schema(kind: MsgType, version: int) -> tuple[str, ...]:
    """The fields of message ``kind`` in protocol ``version``."""
    if version >= 3 and kind in SCHEMA_V3:
        return SCHEMA_V3[kind]
    if version >= 2 and kind in SCHEMA_V2:
        return SCHEMA_V2[kind]
    return SCHEMA[kind]


class Refusal(ProtocolError):
    """The handshake failed (``code``: "auth" wrong proof, "version" no common version);
    a REFUSED frame is queued in ``data_to_send()``."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


# ----------------------------------------------------------------------- events


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


#: next_event() found no complete message: feed more bytes
NEED_DATA: Final = _NeedData()


@dataclass(frozen=True)
class Authenticated:
    """Both sides proved the secret. ``peer``: the source's name (on the target) or
    the target's address as the caller named it (on the source)."""

    peer: str
    version: int


@dataclass(frozen=True)
class OpenRequest:
    """Target: the source asks to stream into replica ``volume``; answer with
    :meth:`TargetConnection.accept` or :meth:`TargetConnection.refuse`."""

    volume: str
    lineage: str
    size: int
    epoch: int
    source_last_seq: int
    #: the sender's last seq of the epoch before its own (its failover point; 0 when
    #: it never failed over): where a failback finds the newest common point
    fork_seq: int = 0
    #: (version 3) the sender's epoch table, ``(epoch, first local seq, offset)`` per
    #: entry (``replica.json``'s ``epochs``); empty from an older sender
    epochs: tuple[tuple[int, int, int], ...] = ()


@dataclass(frozen=True)
class Opened:
    """Source: the target accepted; stream from ``applied_seq + 1``. ``tip_ts`` and
    ``tip_crc`` describe its record ``applied_seq`` (0, 0 when it has none, or when
    that record was rebased at a failback and cannot be compared)."""

    applied_seq: int
    tip_ts: int
    tip_crc: int
    epoch: int


@dataclass(frozen=True)
class Records:
    """Target: stored records of seqs ``first_seq ..`` (framing checked, CRC not yet);
    from :meth:`_Connection.receive_frame`, views of the frame's bytes (not copies)."""

    first_seq: int
    records: Sequence[bytes | memoryview]


@dataclass(frozen=True)
class Heartbeat:
    """Target: the source's newest seq and clock, sent while it has nothing to ship."""

    source_last_seq: int
    now_ns: int


@dataclass(frozen=True)
class Ack:
    """Source: every record up to ``durable_seq`` is durable on the target."""

    durable_seq: int


@dataclass(frozen=True)
class Refused:
    """The peer refused (``code``, ``message``) and closes."""

    code: str
    message: str


@dataclass(frozen=True)
class Closed:
    """The peer closed (a CLOSE message, or end of stream between frames)."""


Event = Authenticated | OpenRequest | Opened | Records | Heartbeat | Ack | Refused | Closed


# ----------------------------------------------------------------------- helpers


def proof(secret: bytes, label: bytes, nonce_s: bytes, nonce_t: bytes) -> bytes:
    """HMAC-SHA256 of ``label || nonce_s || nonce_t`` under the shared secret."""
    return hmac.new(secret, label + nonce_s + nonce_t, hashlib.sha256).digest()


def encode_frame(kind: MsgType, *fields: object) -> bytes:
    """One frame: u32 LE length + msgpack array ``[kind, *fields]``."""
    body = msgpack.packb([int(kind), *fields], use_bin_type=True)
    return _LEN.pack(len(body)) + body


def encode_records_frame(first_seq: int, records: Sequence[bytes]) -> bytes:
    """The RECORDS frame of ``records``: byte for byte what :func:`encode_frame` makes
    (msgpack ``[7, first_seq, [bin, ...]]``, shortest headers), built by joining the
    records behind hand-packed ``bin`` headers. Cost: one copy of the records."""
    return b"".join(encode_records_parts(first_seq, records))


def encode_records_parts(first_seq: int, records: Sequence[bytes]) -> list[bytes]:
    """:func:`encode_records_frame` as the pieces it joins (the records themselves among
    them, not copied), for a gathering write (``writelines``): on uvloop over loopback,
    0.27 ms of the sender's CPU per MiB of 1 MiB records against 0.50 ms for the joined
    frame, and 0.36 against 0.52 for 4 KiB records. Cost: O(records)."""
    parts: list[bytes] = [b"", b"\x93", msgpack.packb(int(MsgType.RECORDS)),
                          msgpack.packb(first_seq), _array_header(len(records))]
    for r in records:
        parts.append(_bin_header(len(r)))
        parts.append(r)
    parts[0] = _LEN.pack(sum(map(len, parts)))
    return parts


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    return b"\xdc" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xdd" + n.to_bytes(4, "big")


def _bin_header(n: int) -> bytes:
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    return b"\xc5" + n.to_bytes(2, "big") if n < 1 << 16 else b"\xc6" + n.to_bytes(4, "big")


#: records of at least this many bytes on average are decoded as views (one process,
#: per record: 4 KiB 1.1 µs as views against 0.25 µs for msgpack's copy; 64 KiB 0.8
#: against 2.5 µs; 1 MiB 1.3 against 29 µs)
VIEW_MIN: Final = 32 << 10
_BIN_LEN: Final = {0xC4: 1, 0xC5: 2, 0xC6: 4}
_UINT_LEN: Final = {0xCC: 1, 0xCD: 2, 0xCE: 4, 0xCF: 8}


def _decode_records(body: bytes | bytearray | memoryview) -> list[object] | None:
    """The fields ``[first_seq, records]`` of a RECORDS frame body, the records as views
    of ``body`` (no copy), when it is one in the shape :func:`encode_records_parts`
    makes (fixarray 3, type 7, a msgpack uint, an array of ``bin``) and its records
    average :data:`VIEW_MIN` bytes or more; else None (the caller then decodes with
    msgpack, which accepts or refuses it as before). Where it answers, it answers what
    msgpack would (values; bytes as views). O(records)."""
    n = len(body)
    if n < 4 or body[0] != 0x93 or body[1] != int(MsgType.RECORDS):
        return None
    b = body[2]
    if b < 0x80:
        first, p = b, 3
    elif (w := _UINT_LEN.get(b)) is not None and n >= 3 + w:
        first, p = int.from_bytes(body[3 : 3 + w], "big"), 3 + w
    else:
        return None
    if p >= n:
        return None
    b = body[p]
    if 0x90 <= b <= 0x9F:
        count, p = b & 0x0F, p + 1
    elif b == 0xDC and n >= p + 3:
        count, p = int.from_bytes(body[p + 1 : p + 3], "big"), p + 3
    elif b == 0xDD and n >= p + 5:
        count, p = int.from_bytes(body[p + 1 : p + 5], "big"), p + 5
    else:
        return None
    if n - p < count * VIEW_MIN:  # small records: msgpack's C copies them faster
        return None
    mv = memoryview(body)
    recs: list[memoryview] = []
    for _ in range(count):
        if p >= n or (w := _BIN_LEN.get(body[p])) is None or n < p + 1 + w:
            return None
        ln = int.from_bytes(body[p + 1 : p + 1 + w], "big")
        p += 1 + w
        if n < p + ln:
            return None
        recs.append(mv[p : p + ln])
        p += ln
    if p != n:
        return None
    return [first, recs]


def _check_secret(secret: bytes | None) -> bytes:
    if not isinstance(secret, bytes | bytearray) or len(secret) < MIN_SECRET:
        raise ConfigError(f"replication secret must be at least {MIN_SECRET} bytes")
    return bytes(secret)


def _valid(kind: str, v: object) -> bool:
    if kind == _INT:
        return type(v) is int and 0 <= v <= _U64
    if kind == _STR:
        return type(v) is str and len(v) <= MAX_TEXT
    if kind == _NONCE:
        return type(v) is bytes and len(v) == NONCE_SIZE
    if kind == _PROOF:
        return type(v) is bytes and len(v) == PROOF_SIZE
    if kind == _EPOCHS:
        return (type(v) is list and len(v) <= MAX_EPOCHS
                and all(type(e) is list and len(e) == 3 and all(map(_valid, (_INT,) * 3, e))
                        for e in v))
    return type(v) is list and all(type(r) is bytes for r in v)


# ----------------------------------------------------------------------- connections


class _Connection:
    """What both roles share: the receive buffer, framing, the table, the output."""

    def __init__(self, secret: bytes | None, initial: State) -> None:
        self._secret = _check_secret(secret)
        self.state = initial
        self.version = 0
        self._buf = bytearray()
        self._pos = 0
        self._magic_seen = False
        self._eof = False
        self._out: list[bytes] = []
        self._error: ProtocolError | None = None

    # -- output

    def data_to_send(self) -> bytes:
        """Bytes to write to the socket (and forget)."""
        out, self._out = self._out, []
        return b"".join(out)

    def buffers_to_send(self) -> list[bytes]:
        """:meth:`data_to_send` as the pieces it would join, for a gathering write (a
        RECORDS frame's records are among them, not copied)."""
        out, self._out = self._out, []
        return out

    def _send(self, kind: MsgType, *fields: object) -> None:
        """Queue our message ``kind`` after moving by its row (a caller command)."""
        self._send_frame(kind, lambda: encode_frame(kind, *fields))

    def _send_frame(self, kind: MsgType, encode: Callable[[], bytes | list[bytes]]) -> None:
        """Queue the frame ``encode()`` (its bytes, or the pieces they join) of our
        message ``kind`` after moving by its row."""
        new = TRANSITIONS.get((self.state, Dir.OUT, kind))
        if new is None:
            if self.state is State.ERROR and self._error is not None:
                raise self._error
            raise UsageError(f"replication: cannot send {kind.name} in state {self.state.name}")
        frame = encode()
        if isinstance(frame, list):
            self._out += frame
        else:
            self._out.append(frame)
        self.state = new

    def _refuse_handshake(self, code: str, message: str) -> NoReturn:
        self._send(MsgType.REFUSED, code, message)
        exc = Refusal(code, message)
        self._error = exc
        raise exc

    # -- input

    def receive_data(self, data: bytes | bytearray | memoryview) -> None:
        """Buffer bytes from the peer; ``b""`` means the peer closed its side."""
        if self._error is not None:
            raise self._error
        if not data:
            self._eof = True
        else:
            self._buf += data

    def next_event(self) -> Event | _NeedData:
        """The next event, or :data:`NEED_DATA`. ProtocolError on bad peer bytes."""
        if self._error is not None:
            raise self._error
        try:
            return self._next()
        except ProtocolError as exc:
            self._fail(exc)

    def _fail(self, exc: ProtocolError) -> NoReturn:
        if not isinstance(exc, Refusal):
            self.state = State.ERROR
        self._error = exc
        raise exc

    def _next(self) -> Event | _NeedData:
        while True:
            got = self._frame()
            if got is not None:
                return got

    def _frame(self) -> Event | _NeedData | None:
        """Parse and handle one frame; None when it produced no event (keep going)."""
        if self.state is State.CLOSED:
            return NEED_DATA
        buf, pos = self._buf, self._pos
        if not self._magic_seen:
            have = bytes(buf[pos : pos + len(MAGIC)])
            if have != MAGIC[: len(have)]:
                raise ProtocolError("replication: bad magic (not a cdp replication peer)")
            if len(have) < len(MAGIC):
                return self._at_end(len(have))
            self._magic_seen = True
            pos = self._pos = pos + len(MAGIC)
        if len(buf) - pos < _LEN.size:
            return self._at_end(len(buf) - pos)
        (n,) = _LEN.unpack_from(buf, pos)
        limit = MAX_FRAME if self.state in _TRUSTED else PRE_AUTH_FRAME
        if n > limit:
            raise ProtocolError(f"replication: frame of {n} bytes (at most {limit} here)")
        if len(buf) - pos - _LEN.size < n:
            return self._at_end(len(buf) - pos)
        start = pos + _LEN.size
        with memoryview(buf) as mv, mv[start : start + n] as body:  # no copy of the frame
            kind, fields = self._decode(body, self.version)
        self._pos = start + n
        if self._pos == len(buf):
            buf.clear()
            self._pos = 0
        elif self._pos > 1 << 20 and self._pos * 2 > len(buf):
            del buf[: self._pos]
            self._pos = 0
        new = TRANSITIONS.get((self.state, Dir.IN, kind))
        if new is None:
            raise ProtocolError(f"replication: unexpected {kind.name} in state {self.state.name}")
        return self._handle(kind, fields, new)

    def _at_end(self, partial: int) -> Closed | _NeedData:
        if self._eof:
            if partial:
                raise ProtocolError("replication: connection closed inside a frame")
            if self.state is State.CLOSED:
                return NEED_DATA
            self.state = State.CLOSED
            return Closed()
        return NEED_DATA

    # -- input, a large frame at a time (the target's pump)

    def large_frame(self, min_size: int) -> int:
        """The body length of the frame at the head of the buffer when it is
        ``min_size`` bytes or more and not all here yet, once the peer is authenticated:
        the pump may then read it whole itself (:meth:`take_frame_start`, the rest,
        :meth:`receive_frame`); else 0 (feed bytes to :meth:`receive_data` as usual:
        small frames are parsed many to a read). O(1)."""
        if not self._magic_seen or self.state not in _TRUSTED or self._eof or \
                self._error is not None:
            return 0
        buf, pos = self._buf, self._pos
        if len(buf) - pos < _LEN.size:
            return 0
        (n,) = _LEN.unpack_from(buf, pos)
        if n < min_size or n > MAX_FRAME or len(buf) - pos - _LEN.size >= n:
            return 0
        return int(n)

    def take_frame_start(self, into: memoryview) -> int:
        """Move the buffered start of the body of the frame :meth:`large_frame`
        announced into ``into``; how many bytes. The core's buffer is empty after."""
        buf = self._buf
        start = self._pos + _LEN.size
        k = len(buf) - start
        with memoryview(buf) as mv, mv[start:] as part:
            into[:k] = part
        buf.clear()
        self._pos = 0
        return k

    def receive_frame(self, body: bytes | bytearray | memoryview) -> Event | None:
        """Handle the whole body of the frame :meth:`large_frame` announced: the event
        :meth:`next_event` would give for it, or None. A RECORDS frame's records are views of ``body``, not copies (msgpack's
        copy of each record was ~16 % of the target's CPU at 1 MiB records, issue
        #20): the caller keeps ``body`` unchanged until they are appended.
        ProtocolError on bad bytes, as :meth:`next_event`. Cost: O(records) plus
        msgpack for other messages."""
        if self._error is not None:
            raise self._error
        try:
            got = _decode_records(body) if self.state in _TRUSTED else None
            if got is not None:
                kind, fields = MsgType.RECORDS, got
            else:
                kind, fields = self._decode(body, self.version)
            new = TRANSITIONS.get((self.state, Dir.IN, kind))
            if new is None:
                raise ProtocolError(f"replication: unexpected {kind.name} in state "
                                    f"{self.state.name}")
            return self._handle(kind, fields, new)
        except ProtocolError as exc:
            self._fail(exc)

    @staticmethod
    def _decode(body: bytes | bytearray | memoryview, version: int = 1
                ) -> tuple[MsgType, list[object]]:
        try:
            msg = msgpack.unpackb(body, raw=False, use_list=True, strict_map_key=True)
        except Exception as exc:
            raise ProtocolError(f"replication: frame is not msgpack: {exc}") from None
        if type(msg) is not list or not msg or type(msg[0]) is not int:
            raise ProtocolError("replication: a frame must be an array [type, ...]")
        try:
            kind = MsgType(msg[0])
        except ValueError:
            raise ProtocolError(f"replication: unknown message type {msg[0]}") from None
        fields = msg[1:]
        fs = schema(kind, version)
        if len(fields) != len(fs) or not all(map(_valid, fs, fields)):
            raise ProtocolError(f"replication: malformed {kind.name} message")
        return kind, fields

    def _handle(self, kind: MsgType, f: list[object], new: State) -> Event | None:
        raise NotImplementedError


class TargetConnection(_Connection):
    """The replica side of one connection (the listener)."""

    def __init__(self, secret: bytes | None, *, nonce: bytes | None = None) -> None:
        super().__init__(secret, State.HELLO_WAIT)
        self._nonce_t = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._nonce_s = b""
        self.peer = ""
        #: the seq the next RECORDS must start with (set by accept)
        self.expected_seq = 0
        self._out.append(MAGIC)

    def _handle(self, kind: MsgType, f: list[object], new: State) -> Event | None:
        if kind is MsgType.HELLO:
            vmin, vmax, nonce_s, peer = f
            assert isinstance(vmin, int) and isinstance(vmax, int)
            assert isinstance(nonce_s, bytes) and isinstance(peer, str)
            self.peer, self._nonce_s = peer, nonce_s
            version = min(vmax, VERSIONS[1])
            if version < max(vmin, VERSIONS[0]):
                self._refuse_handshake("version", f"no common protocol version "
                                       f"(peer {vmin}..{vmax}, we {VERSIONS[0]}..{VERSIONS[1]})")
            self.version = version
            self.state = new
            self._out.append(encode_frame(
                MsgType.CHALLENGE, version, self._nonce_t,
                proof(self._secret, _LABEL_TARGET, nonce_s, self._nonce_t)))
            return None
        if kind is MsgType.AUTH:
            want = proof(self._secret, _LABEL_SOURCE, self._nonce_s, self._nonce_t)
            got = f[0]
            assert isinstance(got, bytes)
            if not hmac.compare_digest(want, got):
                self._refuse_handshake("auth", f"peer {self.peer!r} failed authentication")
            self.state = new
            self._out.append(encode_frame(MsgType.AUTH_OK))
            return Authenticated(self.peer, self.version)
        self.state = new
        if kind is MsgType.OPEN:
            vol, lineage, size, epoch, last, *fork = f
            assert isinstance(vol, str) and isinstance(lineage, str)
            assert isinstance(size, int) and isinstance(epoch, int) and isinstance(last, int)
            fork_seq = fork[0] if fork else 0
            assert isinstance(fork_seq, int)
            table = fork[1] if len(fork) > 1 else []
            assert isinstance(table, list)
            return OpenRequest(vol, lineage, size, epoch, last, fork_seq,
                               tuple((int(a), int(b), int(c)) for a, b, c in table))
        if kind is MsgType.RECORDS:
            first, recs = f
            assert isinstance(first, int) and isinstance(recs, list)
            if first != self.expected_seq:
                raise ProtocolError(f"replication: records from seq {first}, "
                                    f"expected {self.expected_seq}")
            check_records(first, recs)
            self.expected_seq = first + len(recs)
            return Records(first, recs)
        if kind is MsgType.HEARTBEAT:
            last, now = f
            assert isinstance(last, int) and isinstance(now, int)
            return Heartbeat(last, now)
        if kind is MsgType.REFUSED:
            code, message = f
            assert isinstance(code, str) and isinstance(message, str)
            return Refused(code, message)
        return Closed()  # CLOSE

    # -- commands

    def accept(self, applied_seq: int, tip_ts: int, tip_crc: int, epoch: int) -> None:
        """Answer the OpenRequest: stream on from ``applied_seq + 1``."""
        self._send(MsgType.OPENED, applied_seq, tip_ts, tip_crc, epoch)
        self.expected_seq = applied_seq + 1

    def refuse(self, code: str, message: str) -> None:
        """Refuse the OpenRequest (or stop a stream); then close the socket."""
        self._send(MsgType.REFUSED, code, message[:MAX_TEXT])

    def ack(self, durable_seq: int) -> None:
        """Report every record up to ``durable_seq`` durable (call after the commit)."""
        if not 0 <= durable_seq < self.expected_seq:
            raise UsageError(f"replication: ack of seq {durable_seq} never received")
        self._send(MsgType.ACK, durable_seq)


class SourceConnection(_Connection):
    """The shipping side of one connection (it connects); call :meth:`start` first."""

    def __init__(self, secret: bytes | None, *, peer: str = "", nonce: bytes | None = None,
                 versions: tuple[int, int] = VERSIONS) -> None:
        super().__init__(secret, State.START)
        self._nonce_s = nonce if nonce is not None else secrets.token_bytes(NONCE_SIZE)
        self._versions = versions
        self.peer = peer
        #: seq the next RECORDS must start with (set by Opened), and the newest acked
        self.next_seq = 0
        self.acked_seq = 0

    def start(self, name: str) -> None:
        """Queue the magic and HELLO (``name``: this appliance, for the target's log)."""
        self._out.append(MAGIC)
        self._send(MsgType.HELLO, self._versions[0], self._versions[1], self._nonce_s,
                   name[:MAX_TEXT])

    def _handle(self, kind: MsgType, f: list[object], new: State) -> Event | None:
        if kind is MsgType.CHALLENGE:
            version, nonce_t, proof_t = f
            assert isinstance(version, int) and isinstance(nonce_t, bytes)
            assert isinstance(proof_t, bytes)
            if not self._versions[0] <= version <= self._versions[1]:
                raise ProtocolError(f"replication: target chose version {version}")
            want = proof(self._secret, _LABEL_TARGET, self._nonce_s, nonce_t)
            if not hmac.compare_digest(want, proof_t):
                self._refuse_handshake("auth", "the target failed authentication")
            self.version = version
            self.state = new
            self._out.append(encode_frame(
                MsgType.AUTH, proof(self._secret, _LABEL_SOURCE, self._nonce_s, nonce_t)))
            return None
        self.state = new
        if kind is MsgType.AUTH_OK:
            return Authenticated(self.peer, self.version)
        if kind is MsgType.OPENED:
            applied, ts, crc, epoch = f
            assert isinstance(applied, int) and isinstance(ts, int)
            assert isinstance(crc, int) and isinstance(epoch, int)
            self.next_seq = applied + 1
            self.acked_seq = applied
            return Opened(applied, ts, crc, epoch)
        if kind is MsgType.ACK:
            seq = f[0]
            assert isinstance(seq, int)
            if not self.acked_seq <= seq < self.next_seq:
                raise ProtocolError(f"replication: ack of seq {seq} (acked {self.acked_seq}, "
                                    f"sent up to {self.next_seq - 1})")
            self.acked_seq = seq
            return Ack(seq)
        code, message = f  # REFUSED
        assert isinstance(code, str) and isinstance(message, str)
        return Refused(code, message)

    # -- commands

    def open(self, volume: str, lineage: str, size: int, epoch: int, source_last_seq: int,
             fork_seq: int = 0, epochs: Sequence[Sequence[int]] = ()) -> None:
        """Ask the target to stream into replica ``volume``; ``fork_seq``: our failover
        point (version 2; a version-1 target cannot take a failback: UsageError);
        ``epochs``: our epoch table (sent from version 3 on)."""
        if self.version >= 3:
            self._send(MsgType.OPEN, volume, lineage, size, epoch, source_last_seq, fork_seq,
                       [list(e) for e in epochs])
            return
        if self.version >= 2:
            self._send(MsgType.OPEN, volume, lineage, size, epoch, source_last_seq, fork_seq)
            return
        if fork_seq:
            raise UsageError("replication: the target speaks protocol version 1 (no failback)")
        self._send(MsgType.OPEN, volume, lineage, size, epoch, source_last_seq)

    def send_records(self, first_seq: int, records: Sequence[bytes]) -> None:
        """Queue stored records of seqs ``first_seq ..`` (must continue the stream), as
        the pieces of :func:`encode_records_parts` (no copy of the records; take them
        with :meth:`buffers_to_send`, or joined with :meth:`data_to_send`). O(records)."""
        if first_seq != self.next_seq:
            raise UsageError(f"replication: records from seq {first_seq}, next is {self.next_seq}")
        check_records(first_seq, records, error=UsageError)
        self._send_frame(MsgType.RECORDS, lambda: encode_records_parts(first_seq, records))
        self.next_seq = first_seq + len(records)

    def heartbeat(self, source_last_seq: int, now_ns: int) -> None:
        self._send(MsgType.HEARTBEAT, source_last_seq, now_ns)

    def close(self) -> None:
        """Queue an orderly CLOSE (then close the socket)."""
        self._send(MsgType.CLOSE)


def check_records(first_seq: int, records: Sequence[bytes],
                  error: type[Exception] = ProtocolError) -> None:
    """Framing of stored records: each is header + stored_length bytes with the record
    magic and seq ``first_seq + i``. O(records); the CRC is the journal's to check."""
    for i, r in enumerate(records):
        if len(r) < RECORD_HEADER_SIZE or r[:4] != RECORD_MAGIC_BYTES:
            raise error(f"replication: item {i} is not a journal record")
        h = RECORD_HEADER.unpack_from(r)
        if h[6] != len(r) - RECORD_HEADER_SIZE:
            raise error(f"replication: record {first_seq + i}: stored length {h[6]} "
                        f"but {len(r) - RECORD_HEADER_SIZE} bytes")
        if h[7] != first_seq + i:
            raise error(f"replication: record holds seq {h[7]}, expected {first_seq + i}")
