"""The sans-I/O replication protocol: handshake, authentication, streaming, errors."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from cdp.errors import ConfigError, ProtocolError, UsageError
from cdp.journal.format import RecordKind, encode_record
from cdp.replication import protocol as p
from cdp.replication.protocol import (
    MAGIC,
    NEED_DATA,
    VERSIONS,
    Ack,
    Authenticated,
    Closed,
    Heartbeat,
    MsgType,
    Opened,
    OpenRequest,
    Records,
    Refusal,
    Refused,
    SourceConnection,
    State,
    TargetConnection,
    encode_frame,
    encode_records_frame,
)

SECRET = b"s" * 32
OTHER = b"o" * 32


def events(conn: p._Connection, data: bytes) -> list[object]:
    conn.receive_data(data)
    out: list[object] = []
    while True:
        ev = conn.next_event()
        if ev is NEED_DATA:
            return out
        out.append(ev)


def pump(src: SourceConnection, tgt: TargetConnection) -> tuple[list[object], list[object]]:
    """Move bytes both ways until both are quiet; the events each side saw."""
    se: list[object] = []
    te: list[object] = []
    while True:
        a, b = src.data_to_send(), tgt.data_to_send()
        if not a and not b:
            return se, te
        if a:
            te += events(tgt, a)
        if b:
            se += events(src, b)


def handshake(secret_s: bytes = SECRET, secret_t: bytes = SECRET
              ) -> tuple[SourceConnection, TargetConnection, list[object], list[object]]:
    src = SourceConnection(secret_s, peer="target:1")
    tgt = TargetConnection(secret_t)
    src.start("site-a")
    se, te = pump(src, tgt)
    return src, tgt, se, te


def rec(seq: int, data: bytes = b"abc", ts: int = 1_700_000_000_000_000_000) -> bytes:
    return encode_record(int(RecordKind.WRITE), seq, ts + seq, 4096 * seq, len(data), data)


def opened(applied: int = 0) -> tuple[SourceConnection, TargetConnection]:
    src, tgt, _se, _te = handshake()
    src.open("vol0", "uuid-1", 1 << 20, 1, 10)
    _se, te = pump(src, tgt)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 1, 10)]
    tgt.accept(applied, 0, 0, 1)
    se, _te = pump(src, tgt)
    assert se == [Opened(applied, 0, 0, 1)]
    return src, tgt


def test_handshake_open_stream_ack_close() -> None:
    src, tgt, se, te = handshake()
    assert se == [Authenticated("target:1", VERSIONS[1])]
    assert te == [Authenticated("site-a", VERSIONS[1])]
    assert src.state is State.AUTHENTICATED and tgt.state is State.OPEN_WAIT
    src.open("vol0", "uuid-1", 1 << 20, 1, 10)
    _se, te = pump(src, tgt)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 1, 10)]
    tgt.accept(3, 1234, 99, 1)
    se, _te = pump(src, tgt)
    assert se == [Opened(3, 1234, 99, 1)] and src.next_seq == 4
    recs = [rec(4), rec(5), rec(6)]
    src.send_records(4, recs)
    src.heartbeat(6, 42)
    _se, te = pump(src, tgt)
    assert te == [Records(4, recs), Heartbeat(6, 42)]
    tgt.ack(5)
    tgt.ack(6)
    se, _te = pump(src, tgt)
    assert se == [Ack(5), Ack(6)] and src.acked_seq == 6
    src.close()
    _se, te = pump(src, tgt)
    assert te == [Closed()]
    assert src.state is State.CLOSED and tgt.state is State.CLOSED


def test_records_split_byte_by_byte() -> None:
    src, tgt = opened()
    big = rec(1, bytes(range(256)) * 16)
    src.send_records(1, [big, rec(2)])
    data = src.data_to_send()
    got: list[object] = []
    for i in range(len(data)):
        got += events(tgt, data[i : i + 1])
    assert got == [Records(1, [big, rec(2)])]


def test_wrong_secret_refused_both_ways() -> None:
    # the source holds another secret: the target's proof fails at the source first
    src = SourceConnection(OTHER)
    tgt = TargetConnection(SECRET)
    src.start("a")
    events(tgt, src.data_to_send())
    with pytest.raises(Refusal) as ei:
        events(src, tgt.data_to_send())
    assert ei.value.code == "auth"
    assert events(tgt, src.data_to_send()) == [Refused("auth", "the target failed authentication")]
    with pytest.raises(ProtocolError):
        src.next_event()  # stays failed


def test_peer_without_the_secret_is_refused_by_the_target() -> None:
    # a client that skips the target's proof and guesses an AUTH: refused, nothing opens
    tgt = TargetConnection(SECRET)
    hello = MAGIC + encode_frame(MsgType.HELLO, 1, 1, b"n" * 32, "mallory")
    events(tgt, hello)
    with pytest.raises(Refusal) as ei:
        events(tgt, encode_frame(MsgType.AUTH, b"\0" * 32))
    assert ei.value.code == "auth" and tgt.state is State.CLOSED
    out = tgt.data_to_send()
    assert encode_frame(MsgType.REFUSED, "auth", "peer 'mallory' failed authentication") in out
    with pytest.raises(ProtocolError):
        tgt.receive_data(encode_frame(MsgType.OPEN, "v", "u", 1, 1, 1))


def test_no_secret_is_a_config_error() -> None:
    for bad in (None, b"", b"short"):
        with pytest.raises(ConfigError):
            TargetConnection(bad)
        with pytest.raises(ConfigError):
            SourceConnection(bad)


def test_open_before_auth_is_a_protocol_error() -> None:
    tgt = TargetConnection(SECRET)
    data = MAGIC + encode_frame(MsgType.HELLO, 1, 1, b"n" * 32, "x")
    data += encode_frame(MsgType.OPEN, "v", "u", 1, 1, 1)
    with pytest.raises(ProtocolError, match="unexpected OPEN"):
        events(tgt, data)
    assert tgt.state is State.ERROR


def test_replayed_handshake_fails() -> None:
    # record a good handshake, then replay the source's bytes to a fresh target
    src = SourceConnection(SECRET)
    tgt = TargetConnection(SECRET)
    src.start("a")
    recorded = b""
    for _ in range(3):
        a = src.data_to_send()
        recorded += a
        if a:
            events(tgt, a)
        b = tgt.data_to_send()
        if b:
            events(src, b)
    assert tgt.state is State.OPEN_WAIT
    fresh = TargetConnection(SECRET)
    with pytest.raises(Refusal) as ei:
        events(fresh, recorded)
    assert ei.value.code == "auth" and fresh.state is State.CLOSED
    # and a recorded target answer does not fool a fresh source
    src2 = SourceConnection(SECRET)
    src2.start("a")
    tgt_bytes = MAGIC + encode_frame(
        MsgType.CHALLENGE, 1, b"t" * 32,
        p.proof(SECRET, b"cdp-repl-1 target", b"x" * 32, b"t" * 32))
    with pytest.raises(Refusal):
        events(src2, tgt_bytes)


def test_reflected_proof_fails() -> None:
    # the target's own proof sent back as the source's AUTH: the labels differ
    tgt = TargetConnection(SECRET, nonce=b"t" * 32)
    events(tgt, MAGIC + encode_frame(MsgType.HELLO, 1, 1, b"s" * 32, "x"))
    proof_t = p.proof(SECRET, b"cdp-repl-1 target", b"s" * 32, b"t" * 32)
    with pytest.raises(Refusal):
        events(tgt, encode_frame(MsgType.AUTH, proof_t))


def test_secret_never_on_the_wire() -> None:
    src = SourceConnection(SECRET)
    tgt = TargetConnection(SECRET)
    src.start("a")
    wire = b""
    for _ in range(4):
        a, b = src.data_to_send(), tgt.data_to_send()
        wire += a + b
        if a:
            events(tgt, a)
        if b:
            events(src, b)
    assert SECRET not in wire and SECRET[:16] not in wire


def test_garbage() -> None:
    with pytest.raises(ProtocolError, match="magic"):
        events(TargetConnection(SECRET), b"GET / HTTP/1.1\r\n\r\n")
    with pytest.raises(ProtocolError, match="frame of"):
        events(TargetConnection(SECRET), MAGIC + b"\xff\xff\xff\x00")  # too big before auth
    with pytest.raises(ProtocolError, match=r"msgpack|array"):
        events(TargetConnection(SECRET), MAGIC + b"\x02\x00\x00\x00\xc1\xc1")
    with pytest.raises(ProtocolError, match="unknown message type"):
        events(TargetConnection(SECRET), MAGIC + encode_frame(99))  # type: ignore[arg-type]
    with pytest.raises(ProtocolError, match="malformed HELLO"):
        events(TargetConnection(SECRET), MAGIC + encode_frame(MsgType.HELLO, 1, 1, b"x", "n"))
    t = TargetConnection(SECRET)
    t.receive_data(MAGIC + b"\x05\x00")
    t.receive_data(b"")
    with pytest.raises(ProtocolError, match="inside a frame"):
        t.next_event()


def test_eof_between_frames_is_closed() -> None:
    _src, tgt = opened()
    tgt.receive_data(b"")
    assert tgt.next_event() == Closed()
    assert tgt.next_event() is NEED_DATA


def test_version_negotiation() -> None:
    src = SourceConnection(SECRET, versions=(VERSIONS[1] + 1, VERSIONS[1] + 2))
    tgt = TargetConnection(SECRET)
    src.start("a")
    with pytest.raises(Refusal) as ei:
        events(tgt, src.data_to_send())
    assert ei.value.code == "version"
    assert [type(e) for e in events(src, tgt.data_to_send())] == [Refused]


def test_records_must_continue_the_stream() -> None:
    src, tgt = opened(applied=5)
    with pytest.raises(UsageError):
        src.send_records(7, [rec(7)])  # a gap: the caller's bug, nothing sent
    with pytest.raises(UsageError):
        src.send_records(6, [rec(7)])  # header holds another seq
    assert src.data_to_send() == b""
    # a forged stream that skips seqs is the peer's error on the target
    with pytest.raises(ProtocolError, match="expected 6"):
        events(tgt, encode_frame(MsgType.RECORDS, 7, [rec(7)]))


def test_record_framing_checked_on_arrival() -> None:
    _src, tgt = opened()
    r = bytearray(rec(1))
    r[12] += 1  # stored_length no longer matches
    with pytest.raises(ProtocolError, match="stored length"):
        events(tgt, encode_frame(MsgType.RECORDS, 1, [bytes(r)]))
    _src, tgt2 = opened()
    with pytest.raises(ProtocolError, match="not a journal record"):
        events(tgt2, encode_frame(MsgType.RECORDS, 1, [b"xyz"]))


def test_acks_checked() -> None:
    src, tgt = opened()
    src.send_records(1, [rec(1), rec(2)])
    pump(src, tgt)
    with pytest.raises(UsageError):
        tgt.ack(3)  # never received
    with pytest.raises(ProtocolError, match="ack of seq 5"):
        events(src, encode_frame(MsgType.ACK, 5))


def test_target_can_refuse_open_and_fence_a_stream() -> None:
    src, tgt, _se, _te = handshake()
    src.open("vol0", "uuid-1", 1 << 20, 1, 10)
    pump(src, tgt)
    tgt.refuse("epoch", "volume vol0 failed over (epoch 2)")
    se, _te = pump(src, tgt)
    assert se == [Refused("epoch", "volume vol0 failed over (epoch 2)")]
    assert src.state is State.CLOSED
    src2, tgt2 = opened()
    tgt2.refuse("epoch", "failed over")
    se, _te = pump(src2, tgt2)
    assert se == [Refused("epoch", "failed over")]


def test_commands_out_of_order_are_usage_errors() -> None:
    src = SourceConnection(SECRET)
    with pytest.raises(UsageError):
        src.open("v", "u", 1, 1, 1)
    tgt = TargetConnection(SECRET)
    with pytest.raises(UsageError):
        tgt.accept(0, 0, 0, 1)
    assert tgt.state is State.HELLO_WAIT


def test_every_transition_is_reachable_in_its_role() -> None:
    target = {State.HELLO_WAIT, State.AUTH_WAIT, State.OPEN_WAIT, State.OPENING, State.RECEIVING}
    for (state, _d, _k), new in p.TRANSITIONS.items():
        assert new in target | {State.CLOSED} if state in target else new not in target


def test_core_does_no_io() -> None:
    src = Path(p.__file__).read_text()
    names: set[str] = set()
    for node in ast.walk(ast.parse(src)):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    assert not names & {"asyncio", "socket", "selectors", "ssl", "os", "threading"}


def test_open_fork_seq_needs_version_2() -> None:
    """Version 2 carries OPEN's fork_seq (failback); a version-1 pair still streams
    without it and refuses to send one."""
    src, tgt, _se, _te = handshake()
    src.open("vol0", "uuid-1", 1 << 20, 2, 10, fork_seq=7)
    _se, te = pump(src, tgt)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 2, 10, 7)]
    old = SourceConnection(SECRET, peer="t", versions=(1, 1))
    tgt1 = TargetConnection(SECRET)
    old.start("old")
    pump(old, tgt1)
    assert old.version == tgt1.version == 1
    with pytest.raises(UsageError, match="version 1"):
        old.open("vol0", "uuid-1", 1 << 20, 2, 10, fork_seq=7)
    old.open("vol0", "uuid-1", 1 << 20, 1, 10)
    _se, te = pump(old, tgt1)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 1, 10, 0)]
    # a 6-field OPEN on a version-1 connection is malformed
    tgt2 = TargetConnection(SECRET)
    old2 = SourceConnection(SECRET, peer="t", versions=(1, 1))
    old2.start("old")
    pump(old2, tgt2)
    with pytest.raises(ProtocolError, match="malformed OPEN"):
        events(tgt2, encode_frame(MsgType.OPEN, "v", "u", 1, 1, 1, 1))


def test_records_frame_is_msgpacks_bytes() -> None:
    """The hand-framed RECORDS frame equals msgpack's packing at every header size."""
    for n in (0, 1, 15, 16, 17, 65535, 65536):
        for size in (0, 1, 255, 256, 65535, 65536, 70000):
            recs = [bytes([n % 251]) * size] * (n if size * n < 1 << 24 else 2)
            for first in (1, 127, 128, 1 << 32, (1 << 64) - 1):
                assert encode_records_frame(first, recs) == encode_frame(
                    MsgType.RECORDS, first, recs), (n, size, first)


def test_records_go_out_as_pieces_of_the_same_bytes() -> None:
    """``buffers_to_send`` hands a RECORDS frame's pieces to a gathering write: the
    records themselves (not copies), joined the very bytes ``data_to_send`` gives."""
    recs = [rec(1), rec(2, bytes(70_000)), rec(3, b"x")]
    (a, _ta), (b, _tb) = opened(), opened()
    a.send_records(1, recs)
    b.send_records(1, recs)
    pieces = a.buffers_to_send()
    assert b"".join(pieces) == b.data_to_send() == encode_frame(MsgType.RECORDS, 1, recs)
    assert all(any(p is r for p in pieces) for r in recs)
    assert a.buffers_to_send() == []


def test_open_epochs_need_version_3() -> None:
    """Version 3 carries OPEN's epoch table (chained failback); a version-2 pair
    streams and fails back without it; a malformed table is a protocol error."""
    src, tgt, _se, _te = handshake()
    assert src.version == tgt.version == 3
    src.open("vol0", "uuid-1", 1 << 20, 3, 10, fork_seq=7, epochs=[[1, 1, 0], [2, 5, 2], [3, 8, 0]])
    _se, te = pump(src, tgt)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 3, 10, 7, ((1, 1, 0), (2, 5, 2), (3, 8, 0)))]
    v2 = SourceConnection(SECRET, peer="t", versions=(1, 2))
    tgt2 = TargetConnection(SECRET)
    v2.start("v2")
    pump(v2, tgt2)
    assert v2.version == tgt2.version == 2
    v2.open("vol0", "uuid-1", 1 << 20, 2, 10, fork_seq=7, epochs=[[1, 1, 0]])
    _se, te = pump(v2, tgt2)
    assert te == [OpenRequest("vol0", "uuid-1", 1 << 20, 2, 10, 7)]
    for bad in ([[1, 1]], [[1, 1, -1]], [1, 1, 0], [[1, 1, "x"]], [[1, 1, 0]] * (p.MAX_EPOCHS + 1)):
        src, tgt, _se, _te = handshake()
        with pytest.raises(ProtocolError, match="malformed OPEN"):
            events(tgt, encode_frame(MsgType.OPEN, "v", "u", 1, 1, 1, 1, bad))


def _by_frames(tgt: TargetConnection, data: bytes) -> list[object]:
    """What the target's pump does with a large frame: the core sees its length and a
    few bytes (``receive_data``), announces it (``large_frame``), hands over what it
    buffered (``take_frame_start``); the rest read into the same buffer (a bytearray,
    as the pump's) goes to ``receive_frame``."""
    out: list[object] = []
    pos = 0
    while pos < len(data):
        (n,) = p._LEN.unpack_from(data, pos)
        out += events(tgt, data[pos : pos + 4 + min(3, n - 1)])
        assert tgt.large_frame(1) == n
        body = bytearray(n)
        k = tgt.take_frame_start(memoryview(body))
        assert k == min(3, n - 1)
        body[k:] = data[pos + 4 + k : pos + 4 + n]
        pos += 4 + n
        ev = tgt.receive_frame(body)
        if ev is not None:
            out.append(ev)
    return out


def _either(f: object, *args: object) -> object:
    try:
        return f(*args)  # type: ignore[operator]
    except ProtocolError as e:
        return ("ProtocolError", str(e))


def test_whole_frames_decode_as_the_byte_stream_does() -> None:
    """``receive_frame`` (the target pump's path once authenticated) gives the events
    ``receive_data`` gives for the same frames: RECORDS in every header size, and in
    shapes msgpack accepts that the encoder never makes (a long uint for a small seq,
    array16 for 2 records, bin32 for a short record); what the byte path refuses
    (trailing bytes, a str for a record, a torn record, a gap) it refuses alike. The
    records are views of the frame's buffer, not copies."""
    big, small = rec(1, bytes(range(256)) * 300), rec(2, b"x")
    frames = [encode_records_frame(1, [big, small]), encode_records_frame(1, []),
              encode_frame(MsgType.HEARTBEAT, 9, 42)]
    frames += [encode_records_frame(1, [rec(s) for s in range(1, 18)])]  # array16
    odd = (b"\x93\x07\xcf" + (1).to_bytes(8, "big") + b"\xdc\x00\x02"
           + b"\xc6" + len(big).to_bytes(4, "big") + big
           + b"\xc6" + len(small).to_bytes(4, "big") + small)
    frames.append(p._LEN.pack(len(odd)) + odd)
    good = encode_records_frame(1, [big])
    frames.append(p._LEN.pack(len(good) - 4 + 1) + good[4:] + b"\0")  # trailing byte
    as_str = b"\x93\x07\x01\x91\xa3abc"
    frames.append(p._LEN.pack(len(as_str)) + as_str)
    torn = good[4:-10]
    frames.append(p._LEN.pack(len(torn)) + torn)
    frames.append(encode_records_frame(2, [rec(2)]))  # a gap
    for i, frame in enumerate(frames):
        _s1, by_bytes = opened()
        _s2, by_frames = opened()
        want = _either(events, by_bytes, frame)
        got = _either(_by_frames, by_frames, frame)
        assert got == want, i
    _s, tgt = opened()
    [ev] = _by_frames(tgt, encode_records_frame(1, [big, small]))
    assert isinstance(ev, Records) and all(isinstance(r, memoryview) for r in ev.records)
    assert [bytes(r) for r in ev.records] == [big, small]
    _s, tgt = opened()
    tgt.receive_data(p._LEN.pack(p.MAX_FRAME + 1) + b"\x93")
    assert tgt.large_frame(1) == 0  # refused as before, by next_event
    with pytest.raises(ProtocolError, match="frame of"):
        tgt.next_event()
    _s, tgt = opened()
    frame = encode_records_frame(1, [big])
    assert events(tgt, frame[:-1]) == [] and tgt.large_frame(len(frame) - 4) == len(frame) - 4
    assert tgt.large_frame(len(frame) - 3) == 0  # smaller than asked: bytes as usual
    assert events(tgt, frame[-1:]) == [Records(1, [big])] and tgt.large_frame(1) == 0
