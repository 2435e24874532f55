"""The sans-I/O NBD core, driven with hand-built client bytes (no sockets)."""

from __future__ import annotations

import struct

import pytest

from cdp.errors import ProtocolError
from cdp.targets.nbd.core import (
    NEED_DATA,
    TRANSITIONS,
    Closed,
    Ready,
    Refused,
    Request,
    ServerConnection,
    State,
)
from cdp.targets.nbd.proto import (
    BLOCK_DESCRIPTOR,
    GREETING,
    INFO_BLOCK_SIZE,
    INFO_EXPORT,
    U32,
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
    StateFlag,
    TransmissionFlag,
)
from cdp.targets.testing.memdev import MemoryDevice, MemoryProvider
from cdp.targets.testing.nbd_wire import (
    FLAGS,
    chunks,
    go,
    meta,
    opt,
    option_replies,
    req,
    simple,
)

SIZE = 1 << 20


def provider() -> MemoryProvider:
    p = MemoryProvider()
    p.add("disk", SIZE, description="a disk", extra_contexts=["x-cdp:changed:m1", "x-cdp:dirty"])
    p.add("ro", SIZE, read_only=True)
    return p


def events(conn: ServerConnection) -> list[object]:
    out = []
    while (ev := conn.next_event()) is not NEED_DATA:
        out.append(ev)
    return out


def feed(conn: ServerConnection, data: bytes) -> list[object]:
    conn.receive_data(data)
    return events(conn)


def connect(
    name: str = "disk", structured: bool = True, contexts: tuple[str, ...] = ()
) -> ServerConnection:
    """A connection in transmission; handshake output discarded."""
    conn = ServerConnection(provider())
    conn.initial_bytes()
    data = FLAGS
    if structured:
        data += opt(Opt.STRUCTURED_REPLY)
    if contexts:
        data += meta(Opt.SET_META_CONTEXT, name, *contexts)
    evs = feed(conn, data + go(name))
    assert isinstance(evs[-1], Ready)
    conn.data_to_send()
    return conn


def run(conn: ServerConnection, data: bytes) -> list[Request]:
    """Feed requests; execute the valid ones on the memory device like the server."""
    evs = feed(conn, data)
    dev = conn.device
    assert dev is not None
    reqs = []
    for ev in evs:
        assert isinstance(ev, Request), ev
        reqs.append(ev)
        if ev.cmd == Cmd.READ:
            conn.reply_read(ev, dev.read(ev.offset, ev.length))  # type: ignore[arg-type]
        elif ev.cmd == Cmd.WRITE:
            assert ev.data is not None
            dev.write(ev.offset, ev.data, False)
            conn.reply_ok(ev)
        elif ev.cmd == Cmd.BLOCK_STATUS:
            res = [(cid, dev.block_status(n, ev.offset, ev.length)) for cid, n in conn.contexts]
            conn.reply_block_status(ev, res)  # type: ignore[arg-type]
        else:
            conn.reply_ok(ev)
    return reqs


# --- handshake --------------------------------------------------------------------


def test_greeting_bytes() -> None:
    conn = ServerConnection(provider())
    g = conn.initial_bytes()
    assert g == b"NBDMAGICIHAVEOPT\x00\x03"
    assert GREETING.unpack(g) == (Magic.NBDMAGIC, Magic.IHAVEOPT, 3)
    assert conn.state is State.CLIENT_FLAGS
    assert HandshakeFlag.FIXED_NEWSTYLE | HandshakeFlag.NO_ZEROES == 3


def test_go_with_info_requests() -> None:
    conn = ServerConnection(provider())
    evs = feed(conn, FLAGS + go("disk", Info.NAME, Info.DESCRIPTION, Info.BLOCK_SIZE))
    assert len(evs) == 1 and isinstance(evs[0], Ready)
    assert conn.state is State.TRANSMISSION
    reps = option_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [Rep.INFO] * 4 + [Rep.ACK]
    assert all(r[0] == Opt.GO for r in reps)
    infos = {struct.unpack(">H", r[2][:2])[0]: r[2] for r in reps[:-1]}
    _, size, flags = INFO_EXPORT.unpack(infos[Info.EXPORT])
    assert size == SIZE
    tf = TransmissionFlag
    want = (
        tf.HAS_FLAGS
        | tf.SEND_FLUSH
        | tf.SEND_FUA
        | tf.SEND_TRIM
        | tf.SEND_WRITE_ZEROES
        | tf.SEND_FAST_ZERO
        | tf.SEND_CACHE
        | tf.CAN_MULTI_CONN
    )
    assert flags == want  # no SEND_DF without structured replies
    # byte addressed: minimum block size 1 (any offset and length), preferred 4 KiB
    assert INFO_BLOCK_SIZE.unpack(infos[Info.BLOCK_SIZE]) == (3, 1, 4096, 64 << 20)
    assert infos[Info.NAME][2:] == b"disk"
    assert infos[Info.DESCRIPTION][2:] == b"a disk"


def test_info_then_go_same_flags_and_read_only() -> None:
    conn = ServerConnection(provider())
    evs = feed(conn, FLAGS + go("ro", option=Opt.INFO))
    assert evs == [] and conn.state is State.OPTIONS
    info = option_replies(conn.data_to_send())
    evs = feed(conn, go("ro"))
    assert isinstance(evs[0], Ready)
    gor = option_replies(conn.data_to_send())
    assert [r[2] for r in info] == [r[2] for r in gor]
    _, _, flags = INFO_EXPORT.unpack(info[0][2])
    assert flags & TransmissionFlag.READ_ONLY
    assert not flags & (TransmissionFlag.SEND_TRIM | TransmissionFlag.SEND_WRITE_ZEROES)


def test_export_name_fallback_with_and_without_zeroes() -> None:
    for cflags, pad in ((3, 0), (1, 124)):
        conn = ServerConnection(provider())
        evs = feed(conn, struct.pack(">I", cflags) + opt(Opt.EXPORT_NAME, b"disk"))
        assert isinstance(evs[0], Ready)
        out = conn.data_to_send()
        assert len(out) == 10 + pad
        assert struct.unpack(">QH", out[:10])[0] == SIZE
        assert out[10:] == bytes(pad)


def test_export_name_unknown_closes() -> None:
    conn = ServerConnection(provider())
    evs = feed(conn, FLAGS + opt(Opt.EXPORT_NAME, b"nope"))
    assert isinstance(evs[0], Closed) and evs[0].reason == "refused"
    assert evs[0].message == "export 'nope' refused: no export named 'nope'"  # for the log
    assert conn.state is State.CLOSED and conn.data_to_send() == b""


def test_default_export_is_empty_name() -> None:
    conn = ServerConnection(provider())
    evs = feed(conn, FLAGS + go(""))
    assert isinstance(evs[0], Ready) and evs[0].device.size == SIZE


def test_go_unknown_export_error_and_continue() -> None:
    conn = ServerConnection(provider())
    (ev,) = feed(conn, FLAGS + go("nope"))  # the caller logs the refusal
    assert isinstance(ev, Refused) and (ev.name, ev.option) == ("nope", Opt.GO)
    ((o, rep, msg),) = option_replies(conn.data_to_send())
    assert (o, rep) == (Opt.GO, Rep.ERR_UNKNOWN)
    assert b"nope" in msg and msg.decode() == ev.reason  # the client gets the reason
    assert conn.state is State.OPTIONS
    assert isinstance(feed(conn, go("disk"))[0], Ready)


def test_list_exports() -> None:
    conn = ServerConnection(provider())
    feed(conn, FLAGS + opt(Opt.LIST))
    reps = option_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [Rep.SERVER, Rep.SERVER, Rep.ACK]
    assert reps[0][2] == U32.pack(4) + b"disk" + b"a disk"
    assert reps[1][2] == U32.pack(2) + b"ro"
    feed(conn, opt(Opt.LIST, b"x"))
    assert option_replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID


def test_unknown_option_starttls_and_abort() -> None:
    conn = ServerConnection(provider())
    feed(conn, FLAGS + opt(99, b"whatever") + opt(Opt.STARTTLS) + opt(Opt.EXTENDED_HEADERS))
    reps = option_replies(conn.data_to_send())
    assert [(r[0], r[1]) for r in reps] == [
        (99, Rep.ERR_UNSUP),
        (Opt.STARTTLS, Rep.ERR_POLICY),
        (Opt.EXTENDED_HEADERS, Rep.ERR_UNSUP),
    ]
    evs = feed(conn, opt(Opt.ABORT))
    assert isinstance(evs[0], Closed) and evs[0].reason == "abort"
    assert option_replies(conn.data_to_send()) == [(Opt.ABORT, Rep.ACK, b"")]
    assert conn.state is State.CLOSED
    assert feed(conn, b"ignored after abort") == []


def test_structured_reply_twice_is_invalid() -> None:
    conn = ServerConnection(provider())
    feed(conn, FLAGS + opt(Opt.STRUCTURED_REPLY) + opt(Opt.STRUCTURED_REPLY))
    reps = option_replies(conn.data_to_send())
    assert [r[1] for r in reps] == [Rep.ACK, Rep.ERR_INVALID]


def test_malformed_go_is_invalid_not_fatal() -> None:
    conn = ServerConnection(provider())
    bad = opt(Opt.GO, struct.pack(">I", 100) + b"disk")  # name longer than the data
    feed(conn, FLAGS + bad)
    assert option_replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID
    assert conn.state is State.OPTIONS


def test_oversized_option_is_skipped() -> None:
    conn = ServerConnection(provider())
    big = opt(Opt.LIST, b"\0" * (70 << 10))
    evs = []
    for i in range(0, len(big), 4096):
        evs += feed(conn, (FLAGS if i == 0 else b"") + big[i : i + 4096])
    assert option_replies(conn.data_to_send())[0][1] == Rep.ERR_TOO_BIG
    assert isinstance(feed(conn, go("disk"))[0], Ready)


def test_bad_client_flags_and_bad_option_magic() -> None:
    conn = ServerConnection(provider())
    with pytest.raises(ProtocolError):
        feed(conn, struct.pack(">I", 0x80))
    assert conn.state is State.ERROR
    with pytest.raises(ProtocolError):
        conn.next_event()
    conn = ServerConnection(provider())
    with pytest.raises(ProtocolError):
        feed(conn, FLAGS + b"X" * 16)


def test_meta_context_list_and_set() -> None:
    conn = ServerConnection(provider())
    feed(conn, FLAGS + opt(Opt.STRUCTURED_REPLY))
    conn.data_to_send()
    # list all / by prefix / exact; unknown namespaces ignored
    for queries, want in [
        ((), ["base:allocation", "x-cdp:changed:m1", "x-cdp:dirty"]),
        (("x-cdp:",), ["x-cdp:changed:m1", "x-cdp:dirty"]),
        (("base:",), ["base:allocation"]),
        (("other:thing", "x-cdp:dirty"), ["x-cdp:dirty"]),
    ]:
        feed(conn, meta(Opt.LIST_META_CONTEXT, "disk", *queries))
        reps = option_replies(conn.data_to_send())
        assert reps[-1][1] == Rep.ACK
        assert [r[2][4:].decode() for r in reps[:-1]] == want
        assert all(r[2][:4] == bytes(4) for r in reps[:-1])
    # set: wildcards select nothing, exact names get ids 1..n
    feed(conn, meta(Opt.SET_META_CONTEXT, "disk", "base:", "base:allocation", "x-cdp:dirty"))
    reps = option_replies(conn.data_to_send())
    assert [(r[1], r[2]) for r in reps] == [
        (Rep.META_CONTEXT, U32.pack(1) + b"base:allocation"),
        (Rep.META_CONTEXT, U32.pack(2) + b"x-cdp:dirty"),
        (Rep.ACK, b""),
    ]
    ready = feed(conn, go("disk"))[0]
    assert isinstance(ready, Ready)
    assert ready.contexts == [(1, "base:allocation"), (2, "x-cdp:dirty")]


def test_meta_context_errors() -> None:
    conn = ServerConnection(provider())
    feed(conn, FLAGS + meta(Opt.SET_META_CONTEXT, "disk", "base:allocation"))
    assert option_replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID  # not structured
    feed(conn, opt(Opt.STRUCTURED_REPLY) + meta(Opt.SET_META_CONTEXT, "nope", "base:allocation"))
    assert [r[1] for r in option_replies(conn.data_to_send())] == [Rep.ACK, Rep.ERR_UNKNOWN]
    feed(conn, meta(Opt.LIST_META_CONTEXT, "disk", "nocolon"))
    assert option_replies(conn.data_to_send())[0][1] == Rep.ERR_INVALID
    # contexts chosen for another export are dropped at GO
    feed(conn, meta(Opt.SET_META_CONTEXT, "ro", "base:allocation"))
    conn.data_to_send()
    ready = feed(conn, go("disk"))[0]
    assert isinstance(ready, Ready) and ready.contexts == []


def test_transition_table_is_the_only_path() -> None:
    assert (State.TRANSMISSION, State.OPTIONS) not in {(a, b) for (a, _), b in TRANSITIONS.items()}
    assert all(dst is not State.ERROR for dst in TRANSITIONS.values())


# --- transmission -----------------------------------------------------------------


def test_write_read_simple_replies() -> None:
    conn = connect(structured=False)
    payload = b"\xab" * 4096
    reqs = run(
        conn, req(Cmd.WRITE, 8192, 4096, cookie=7) + payload + req(Cmd.READ, 8192, 4096, cookie=8)
    )
    assert [r.cookie for r in reqs] == [7, 8] and reqs[0].data == payload
    out = conn.data_to_send()
    assert simple(out, 0) == (0, 7)
    assert simple(out, 16) == (0, 8)
    assert out[32:] == payload


def test_read_structured_offset_data_chunk() -> None:
    conn = connect()
    run(conn, req(Cmd.READ, 512, 1024, cookie=0xDEADBEEF))
    out = conn.data_to_send()
    ((flags, typ, cookie, payload),) = chunks(out)
    assert (flags, typ, cookie) == (ReplyFlag.DONE, ReplyType.OFFSET_DATA, 0xDEADBEEF)
    assert struct.unpack(">Q", payload[:8])[0] == 512 and payload[8:] == bytes(1024)
    # exact header bytes: magic, flags, type, cookie, length
    assert out[:20] == bytes.fromhex(
        "668e33ef 0001 0001 00000000deadbeef 00000408".replace(" ", "")
    )


def test_every_command_reaches_the_caller() -> None:
    conn = connect(contexts=("base:allocation",))
    data = (
        req(Cmd.WRITE, 0, 512, CmdFlag.FUA, 1)
        + b"x" * 512
        + req(Cmd.FLUSH, cookie=2)
        + req(Cmd.TRIM, 0, 4096, CmdFlag.FUA, 3)
        + req(Cmd.WRITE_ZEROES, 0, 4096, CmdFlag.NO_HOLE | CmdFlag.FAST_ZERO, 4)
        + req(Cmd.CACHE, 0, 4096, cookie=5)
        + req(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE, 6)
        + req(Cmd.READ, 0, 512, CmdFlag.DF, 7)
    )
    reqs = run(conn, data)
    assert [(r.cmd, r.cookie) for r in reqs] == [
        (Cmd.WRITE, 1),
        (Cmd.FLUSH, 2),
        (Cmd.TRIM, 3),
        (Cmd.WRITE_ZEROES, 4),
        (Cmd.CACHE, 5),
        (Cmd.BLOCK_STATUS, 6),
        (Cmd.READ, 7),
    ]
    evs = feed(conn, req(Cmd.DISC))
    assert isinstance(evs[0], Closed) and evs[0].reason == "disc"
    assert conn.state is State.CLOSED


def errors_of(conn: ServerConnection, data: bytes) -> list[tuple[int, int]]:
    """(errno, cookie) of the error replies the core itself produced."""
    assert run(conn, data) == []
    out = conn.data_to_send()
    if not conn.structured:
        return [simple(out, i) for i in range(0, len(out), 16)]
    res = []
    for flags, typ, cookie, payload in chunks(out):
        assert flags == ReplyFlag.DONE and typ == ReplyType.ERROR
        err, n = struct.unpack(">IH", payload[:6])
        assert len(payload) == 6 + n
        res.append((err, cookie))
    return res


@pytest.mark.parametrize("structured", [False, True])
def test_invalid_requests_get_errors_and_connection_continues(structured: bool) -> None:
    conn = connect(structured=structured)
    E = NbdErrno
    cases = [
        (req(Cmd.READ, SIZE - 512, 1024, cookie=1), E.EINVAL),  # past the end
        (req(Cmd.WRITE, SIZE, 512, cookie=2) + bytes(512), E.ENOSPC),  # write past the end
        (req(Cmd.WRITE_ZEROES, SIZE, 512, cookie=3), E.ENOSPC),
        (req(Cmd.TRIM, 2**63, 512, cookie=4), E.EINVAL),
        (req(Cmd.READ, 0, 0, cookie=5), E.EINVAL),  # zero length
        (req(Cmd.READ, 0, 512, CmdFlag.NO_HOLE, cookie=6), E.EINVAL),  # bad flag
        (req(Cmd.FLUSH, 1, 0, cookie=7), E.EINVAL),
        (req(99, 0, 512, cookie=8), E.EINVAL),  # unknown command
        (req(Cmd.BLOCK_STATUS, 0, 512, cookie=9), E.EINVAL),  # no context selected
        (req(Cmd.READ, 0, (32 << 20) + 1, cookie=10), E.EINVAL),  # absurd length
        (req(Cmd.RESIZE, 0, 0, cookie=11), E.EINVAL),
        (req(Cmd.WRITE, 0, 512, 0x8000, cookie=12) + bytes(512), E.EINVAL),
    ]
    if not structured:
        cases.append((req(Cmd.READ, 0, 512, CmdFlag.DF, cookie=13), E.EINVAL))
    for data, err in cases:
        assert errors_of(conn, data) == [(err, data_cookie(data))], data[:28].hex()
    # and the connection still works
    run(conn, req(Cmd.FLUSH, cookie=99))
    assert conn.data_to_send() == struct.pack(">IIQ", Magic.SIMPLE_REPLY, 0, 99)


def data_cookie(data: bytes) -> int:
    return int(struct.unpack(">Q", data[8:16])[0])


def test_read_only_export_eperm() -> None:
    conn = connect("ro")
    for data in (
        req(Cmd.WRITE, 0, 512, cookie=1) + b"y" * 512,
        req(Cmd.TRIM, 0, 512, cookie=2),
        req(Cmd.WRITE_ZEROES, 0, 512, cookie=3),
    ):
        assert errors_of(conn, data) == [(NbdErrno.EPERM, data_cookie(data))]
    run(conn, req(Cmd.READ, 0, 512, cookie=4))
    assert chunks(conn.data_to_send())[0][1] == ReplyType.OFFSET_DATA


def test_oversized_write_payload_is_skipped() -> None:
    conn = connect(structured=False)
    n = (64 << 20) + 4096
    assert feed(conn, req(Cmd.WRITE, 0, n, cookie=5)) == []
    assert simple(conn.data_to_send()) == (NbdErrno.EOVERFLOW, 5)
    blob = bytes(1 << 20)
    for _ in range(n // len(blob)):
        assert feed(conn, blob) == []
    reqs = run(conn, bytes(4096) + req(Cmd.FLUSH, cookie=6))
    assert [r.cookie for r in reqs] == [6]


def test_bad_request_magic_is_fatal() -> None:
    conn = connect()
    with pytest.raises(ProtocolError):
        feed(conn, b"\x12\x56\x09\x53" + bytes(24))
    assert conn.state is State.ERROR


def test_eof_mid_request_is_fatal_eof_at_boundary_is_clean() -> None:
    conn = connect()
    conn.receive_data(req(Cmd.READ, 0, 512)[:10])
    conn.receive_data(b"")
    with pytest.raises(ProtocolError):
        conn.next_event()
    conn = connect()
    conn.receive_data(b"")
    ev = conn.next_event()
    assert isinstance(ev, Closed) and ev.reason == "eof"


def test_out_of_order_replies_keep_cookies() -> None:
    conn = connect(structured=False)
    evs = feed(conn, req(Cmd.READ, 0, 512, cookie=1) + req(Cmd.FLUSH, cookie=2))
    r1, r2 = evs
    assert isinstance(r1, Request) and isinstance(r2, Request)
    conn.reply_ok(r2)
    conn.reply_read(r1, b"z" * 512)
    out = conn.data_to_send()
    assert simple(out, 0) == (0, 2) and simple(out, 16) == (0, 1) and out[32:] == b"z" * 512


def test_short_read_from_device_becomes_eio() -> None:
    conn = connect(structured=False)
    (r,) = feed(conn, req(Cmd.READ, 0, 512, cookie=3))
    assert isinstance(r, Request)
    conn.reply_read(r, b"short")
    assert conn.data_to_send() == struct.pack(">IIQ", Magic.SIMPLE_REPLY, NbdErrno.EIO, 3)


def test_unaligned_requests_reach_the_device_and_match_a_model() -> None:
    """Minimum block size 1: any offset and length, for every command; reads after
    1-byte, 511-byte, 4 KiB-straddling and end-of-export writes equal a model."""
    conn = connect(contexts=("base:allocation",))
    model = bytearray(SIZE)
    writes = [(4095, 1), (1, 511), (4000, 200), (8191, 4098), (SIZE - 1, 1), (SIZE - 511, 511)]
    for i, (off, n) in enumerate(writes):
        data = bytes([i + 1]) * n
        model[off : off + n] = data
        (r,) = run(conn, req(Cmd.WRITE, off, n, cookie=i) + data)
        assert (r.offset, r.length, r.data) == (off, n, data)
        assert simple(conn.data_to_send()) == (0, i)
    model[4097 : 4097 + 3] = bytes(3)
    model[9000 : 9000 + 77] = bytes(77)
    reqs = run(
        conn,
        req(Cmd.WRITE_ZEROES, 4097, 3, CmdFlag.NO_HOLE, 20)
        + req(Cmd.TRIM, 9000, 77, cookie=21)  # the memory device zeroes trimmed bytes
        + req(Cmd.CACHE, 3, 5, cookie=22)
        + req(Cmd.BLOCK_STATUS, 4095, 3, cookie=23),
    )
    assert [(r.offset, r.length) for r in reqs] == [(4097, 3), (9000, 77), (3, 5), (4095, 3)]
    dev = conn.device
    assert isinstance(dev, MemoryDevice)
    dev.write_zeroes(4097, 3, False, False, False)  # run() only answers these two
    dev.trim(9000, 77, False)
    conn.data_to_send()
    for off, n in [*writes, (0, 1), (4094, 5), (4096, 1), (SIZE - 4097, 4097), (8190, 5000)]:
        run(conn, req(Cmd.READ, off, n, cookie=off))
        ((_, typ, cookie, payload),) = chunks(conn.data_to_send())
        assert (typ, cookie) == (ReplyType.OFFSET_DATA, off)
        assert payload[8:] == model[off : off + n], (off, n)


def test_device_min_block_size_is_advertised_and_enforced() -> None:
    p = MemoryProvider()
    p.add("a512", SIZE, min_block_size=512)
    p.add("odd", SIZE, min_block_size=3)  # rounded up to a power of 2
    p.add("huge", SIZE, min_block_size=1 << 20)  # capped at the spec's 64 KiB
    for name, want in [("a512", (512, 4096)), ("odd", (4, 4096)), ("huge", (65536, 65536))]:
        conn = ServerConnection(p)
        feed(conn, FLAGS + go(name, Info.BLOCK_SIZE, option=Opt.INFO))
        (_, info, _) = option_replies(conn.data_to_send())
        assert INFO_BLOCK_SIZE.unpack(info[2]) == (3, *want, 64 << 20)
    conn = ServerConnection(p)
    evs = feed(conn, FLAGS + opt(Opt.STRUCTURED_REPLY) + go("a512"))
    assert isinstance(evs[-1], Ready)
    conn.data_to_send()
    E = NbdErrno
    for data in (
        req(Cmd.WRITE, 1, 512, cookie=1) + bytes(512),
        req(Cmd.WRITE, 512, 511, cookie=2) + bytes(511),
        req(Cmd.READ, 100, 512, cookie=3),
        req(Cmd.WRITE_ZEROES, 0, 4097, cookie=4),
        req(Cmd.TRIM, 513, 512, cookie=5),
        req(Cmd.CACHE, 0, 1, cookie=6),
    ):
        assert errors_of(conn, data) == [(E.EINVAL, data_cookie(data))], data[:28].hex()
    reqs = run(conn, req(Cmd.WRITE, 512, 1024, cookie=7) + b"a" * 1024 + req(Cmd.READ, 1024, 512, cookie=8))
    assert [r.cookie for r in reqs] == [7, 8]


def test_block_status_chunks() -> None:
    conn = connect(contexts=("base:allocation", "x-cdp:dirty"))
    dev = conn.device
    assert dev is not None
    dev.write(8192, b"d" * 4096, False)
    run(conn, req(Cmd.BLOCK_STATUS, 0, 16384, cookie=9))
    (c1, c2) = chunks(conn.data_to_send())
    assert (c1[0], c1[1], c1[2]) == (0, ReplyType.BLOCK_STATUS, 9)
    assert (c2[0], c2[1]) == (ReplyFlag.DONE, ReplyType.BLOCK_STATUS)
    hz = StateFlag.HOLE | StateFlag.ZERO
    assert c1[3] == U32.pack(1) + b"".join(
        BLOCK_DESCRIPTOR.pack(n, f) for n, f in [(8192, hz), (4096, 0), (4096, hz)]
    )
    assert c2[3] == U32.pack(2) + BLOCK_DESCRIPTOR.pack(16384, 0)
    # REQ_ONE: exactly one descriptor per context, not longer than the request
    run(conn, req(Cmd.BLOCK_STATUS, 0, 1000, CmdFlag.REQ_ONE, cookie=10))
    (c1, c2) = chunks(conn.data_to_send())
    assert c1[3] == U32.pack(1) + BLOCK_DESCRIPTOR.pack(1000, hz)
    assert c2[3] == U32.pack(2) + BLOCK_DESCRIPTOR.pack(1000, 0)


def test_block_status_clips_device_extents() -> None:
    conn = connect(contexts=("base:allocation",))
    (r,) = feed(conn, req(Cmd.BLOCK_STATUS, 0, 4096, cookie=1))
    assert isinstance(r, Request)
    conn.reply_block_status(r, [(1, [(0, 1), (1024, 0), (1 << 40, 3), (512, 0)])])
    ((_, _, _, payload),) = chunks(conn.data_to_send())
    assert payload == U32.pack(1) + BLOCK_DESCRIPTOR.pack(1024, 0) + BLOCK_DESCRIPTOR.pack(3072, 3)
    conn.reply_block_status(r, [(1, [])])
    ((_, typ, _, _),) = chunks(conn.data_to_send())
    assert typ == ReplyType.ERROR


def test_byte_by_byte_equals_whole() -> None:
    transcript = (
        FLAGS
        + opt(Opt.STRUCTURED_REPLY)
        + meta(Opt.SET_META_CONTEXT, "disk", "base:allocation")
        + go("disk", Info.BLOCK_SIZE)
        + req(Cmd.WRITE, 0, 100, cookie=1)
        + b"q" * 100
        + req(Cmd.READ, 0, 100, cookie=2)
        + req(Cmd.BLOCK_STATUS, 0, 8192, cookie=3)
        + req(Cmd.DISC)
    )

    def drive(pieces: list[bytes]) -> tuple[list[str], bytes]:
        conn = ServerConnection(provider())
        names, out = [], b""
        for p in pieces:
            conn.receive_data(p)
            while (ev := conn.next_event()) is not NEED_DATA:
                names.append(type(ev).__name__)
                if isinstance(ev, Request):
                    dev = conn.device
                    assert dev is not None
                    if ev.cmd == Cmd.WRITE:
                        assert ev.data is not None
                        dev.write(ev.offset, ev.data, False)
                        conn.reply_ok(ev)
                    elif ev.cmd == Cmd.READ:
                        conn.reply_read(ev, dev.read(ev.offset, ev.length))  # type: ignore[arg-type]
                    else:
                        conn.reply_block_status(
                            ev, [(1, dev.block_status("base:allocation", ev.offset, ev.length))]
                        )  # type: ignore[arg-type,list-item]
            out += conn.data_to_send()
        return names, out

    whole = drive([transcript])
    bytewise = drive([transcript[i : i + 1] for i in range(len(transcript))])
    assert whole == bytewise
    assert whole[0] == ["Ready", "Request", "Request", "Request", "Closed"]


def _socket_feed(conn: ServerConnection, data: bytes, step: int) -> list[object]:
    """Deliver *data* as a BufferedProtocol would: recv_into the buffer the core offers,
    at most *step* bytes at a time."""
    out: list[object] = []
    while data:
        buf = conn.recv_buffer()
        n = min(len(buf), step, len(data))
        buf[:n] = data[:n]
        conn.recv_done(n)
        data = data[n:]
        out += events(conn)
    return out


@pytest.mark.parametrize("via", ["receive_data", "recv_buffer"])
@pytest.mark.parametrize("step", [1000, 65536, 300_000])
def test_large_writes_arriving_in_pieces_keep_payload_and_order(via: str, step: int) -> None:
    """1 MiB and 100 KiB WRITEs (received into their own buffers) between small requests,
    delivered in arbitrary pieces either way: every request comes out whole, in order,
    with the bytes sent."""
    import random

    rnd = random.Random(step)
    big, mid = rnd.randbytes(1 << 20), rnd.randbytes(100_000)
    stream = (req(Cmd.WRITE, 0, 100, cookie=1) + b"a" * 100
              + req(Cmd.WRITE, 0, len(big), cookie=2) + big
              + req(Cmd.READ, 0, 512, cookie=3)
              + req(Cmd.WRITE, 4096, len(mid), cookie=4) + mid
              + req(Cmd.WRITE, 0, len(big), cookie=5) + big
              + req(Cmd.FLUSH, cookie=6))
    conn = connect()
    if via == "receive_data":
        evs: list[object] = []
        for k in range(0, len(stream), step):
            evs += feed(conn, stream[k : k + step])
    else:
        evs = _socket_feed(conn, stream, step)
    got = [(e.cookie, e.cmd, e.data) for e in evs if isinstance(e, Request)]
    assert [(c, cmd) for c, cmd, _ in got] == [
        (1, Cmd.WRITE), (2, Cmd.WRITE), (3, Cmd.READ), (4, Cmd.WRITE), (5, Cmd.WRITE),
        (6, Cmd.FLUSH)]
    assert [d for _, _, d in got] == [b"a" * 100, big, None, mid, big, None]


def test_eof_in_the_middle_of_a_large_payload_is_fatal() -> None:
    conn = connect()
    _socket_feed(conn, req(Cmd.WRITE, 0, 1 << 20) + bytes(5000), 4096)
    conn.receive_data(b"")
    with pytest.raises(ProtocolError, match="middle of a message"):
        conn.next_event()


def test_large_write_past_the_end_is_refused_after_its_payload_and_the_stream_goes_on() -> None:
    conn = connect(structured=False)
    evs = _socket_feed(conn, req(Cmd.WRITE, SIZE - 4096, 1 << 17, cookie=7) + bytes(1 << 17)
                       + req(Cmd.READ, 0, 512, cookie=8), 8192)
    assert [e.cookie for e in evs if isinstance(e, Request)] == [8]
    err = struct.unpack(">IIQ", conn.data_to_send()[:16])
    assert err[1] == NbdErrno.ENOSPC and err[2] == 7
