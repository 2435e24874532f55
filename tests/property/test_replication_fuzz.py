"""Whatever bytes a peer sends, the replication core parses them or raises ProtocolError
(fed whole and byte by byte, to both roles, before and after a valid handshake)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ProtocolError
from cdp.journal.format import RecordKind, encode_record
from cdp.replication.protocol import (
    MAGIC,
    NEED_DATA,
    MsgType,
    SourceConnection,
    TargetConnection,
    encode_frame,
    proof,
)

SECRET = b"k" * 32
NS, NT = b"s" * 32, b"t" * 32


def _rec(seq: int) -> bytes:
    return encode_record(int(RecordKind.WRITE), seq, 10 + seq, 512 * seq, 3, b"abc")


#: what a real source sends to a target whose nonce is NT
SOURCE_SIDE = [
    MAGIC + encode_frame(MsgType.HELLO, 1, 1, NS, "a"),
    encode_frame(MsgType.AUTH, proof(SECRET, b"cdp-repl-1 source", NS, NT)),
    encode_frame(MsgType.OPEN, "vol0", "u", 1 << 20, 1, 3),
    encode_frame(MsgType.RECORDS, 1, [_rec(1), _rec(2)]),
    encode_frame(MsgType.HEARTBEAT, 2, 5),
    encode_frame(MsgType.RECORDS, 3, [_rec(3)]),
    encode_frame(MsgType.CLOSE),
]
#: what a real target sends to a source whose nonce is NS
TARGET_SIDE = [
    MAGIC + encode_frame(MsgType.CHALLENGE, 1, NT, proof(SECRET, b"cdp-repl-1 target", NS, NT)),
    encode_frame(MsgType.AUTH_OK),
    encode_frame(MsgType.OPENED, 0, 0, 0, 1),
    encode_frame(MsgType.ACK, 0),
    encode_frame(MsgType.REFUSED, "epoch", "fenced"),
]


def _target() -> TargetConnection:
    return TargetConnection(SECRET, nonce=NT)


def _source() -> SourceConnection:
    s = SourceConnection(SECRET, nonce=NS)
    s.start("a")
    return s


def _drive_one(conn: TargetConnection | SourceConnection, pieces: list[bytes]) -> None:
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while True:
                ev = conn.next_event()
                if ev is NEED_DATA:
                    break
                if isinstance(conn, TargetConnection) and type(ev).__name__ == "OpenRequest":
                    conn.accept(0, 0, 0, 1)
                if isinstance(conn, TargetConnection) and type(ev).__name__ == "Records":
                    conn.ack(conn.expected_seq - 1)
                if isinstance(conn, SourceConnection) and type(ev).__name__ == "Opened":
                    conn.send_records(1, [_rec(1)])
                conn.data_to_send()
    except ProtocolError:
        pass


def _drive(data: bytes, step: int = 0) -> None:
    for make in (_target, _source):
        _drive_one(make(), [data])
        _drive_one(make(), [data[i : i + 1] for i in range(len(data))])
        if step:
            _drive_one(make(), [data[i : i + step] for i in range(0, len(data), step)])


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_valid_transcripts_parse() -> None:
    t = _target()
    t.receive_data(b"".join(SOURCE_SIDE))
    kinds = []
    while True:
        ev = t.next_event()
        if ev is NEED_DATA:
            break
        kinds.append(type(ev).__name__)
        if kinds[-1] == "OpenRequest":
            t.accept(0, 0, 0, 1)
    assert kinds == ["Authenticated", "OpenRequest", "Records", "Heartbeat", "Records", "Closed"]


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _drive(data)


@FUZZ
@given(st.binary(max_size=400), st.sampled_from(["src", "tgt"]), st.integers(0, 4))
def test_random_bytes_after_valid_prefix(data: bytes, side: str, upto: int) -> None:
    msgs = SOURCE_SIDE if side == "src" else TARGET_SIDE
    _drive(b"".join(msgs[:upto]) + data)


@FUZZ
@given(
    st.sampled_from(["src", "tgt"]),
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.integers(1, 64),
)
def test_mutated_transcript(side: str, mutations: list[tuple[int, int]], step: int) -> None:
    data = bytearray(b"".join(SOURCE_SIDE if side == "src" else TARGET_SIDE))
    for pos, value in mutations:
        data[pos % len(data)] = value
    _drive(bytes(data), step)


@FUZZ
@given(st.lists(st.sampled_from(SOURCE_SIDE + TARGET_SIDE), max_size=10), st.integers(0, 2000))
def test_shuffled_valid_messages_truncated(parts: list[bytes], cut: int) -> None:
    _drive(b"".join(parts)[: cut or None])
