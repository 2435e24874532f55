"""Whatever bytes a client sends, the NBD core parses them or raises ProtocolError."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ProtocolError
from cdp.targets.memdev import MemoryProvider
from cdp.targets.nbd.core import NEED_DATA, Request, ServerConnection
from cdp.targets.nbd.proto import Cmd, CmdFlag, Info, Opt
from cdp.targets.nbd.testwire import FLAGS, go, meta, opt, req

SIZE = 1 << 16


def _provider() -> MemoryProvider:
    p = MemoryProvider()
    p.add("disk", SIZE, extra_contexts=["x-cdp:a"])
    p.add("ro", SIZE, read_only=True)
    return p


VALID = [
    FLAGS,
    opt(Opt.STRUCTURED_REPLY),
    opt(Opt.LIST),
    meta(Opt.LIST_META_CONTEXT, "disk", "x-cdp:"),
    meta(Opt.SET_META_CONTEXT, "disk", "base:allocation", "x-cdp:a"),
    go("disk", Info.BLOCK_SIZE, Info.NAME, option=Opt.INFO),
    go("disk", Info.BLOCK_SIZE, Info.DESCRIPTION),
    req(Cmd.WRITE, 0, 512, CmdFlag.FUA, 1) + b"w" * 512,
    req(Cmd.READ, 0, 512, 0, 2),
    req(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE, 3),
    req(Cmd.WRITE_ZEROES, 512, 512, CmdFlag.NO_HOLE, 4),
    req(Cmd.TRIM, 0, 1024, 0, 5),
    req(Cmd.FLUSH, 0, 0, 0, 6),
    req(Cmd.CACHE, 0, 4096, 0, 7),
    req(Cmd.DISC),
]
TRANSCRIPT = b"".join(VALID)


def _drive(pieces: list[bytes]) -> None:
    """Feed pieces, answering requests like the server; only ProtocolError may escape."""
    conn = ServerConnection(_provider())
    conn.initial_bytes()
    try:
        for p in [*pieces, b""]:
            conn.receive_data(p)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    dev = conn.device
                    assert dev is not None
                    if ev.cmd == Cmd.READ:
                        conn.reply_read(ev, dev.read(ev.offset, ev.length))  # type: ignore[arg-type]
                    elif ev.cmd == Cmd.BLOCK_STATUS:
                        res = [
                            (cid, dev.block_status(n, ev.offset, ev.length))
                            for cid, n in conn.contexts
                        ]
                        conn.reply_block_status(ev, res)  # type: ignore[arg-type]
                    else:
                        conn.reply_ok(ev)
                if p == b"" and ev is not NEED_DATA and not isinstance(ev, Request):
                    break
            conn.data_to_send()
    except ProtocolError:
        pass


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _drive([data])
    _drive([data[i : i + 1] for i in range(len(data))])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_valid_handshake(data: bytes) -> None:
    head = FLAGS + opt(Opt.STRUCTURED_REPLY) + go("disk")
    _drive([head + data])
    _drive([head, *(data[i : i + 1] for i in range(len(data)))])


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(TRANSCRIPT) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 64),
)
def test_mutated_transcript(mutations: list[tuple[int, int]], step: int) -> None:
    data = bytearray(TRANSCRIPT)
    for pos, value in mutations:
        data[pos] = value
    _drive([bytes(data)])
    _drive([bytes(data[i : i + step]) for i in range(0, len(data), step)])


@FUZZ
@given(st.lists(st.sampled_from(VALID), max_size=12), st.integers(0, 2000))
def test_shuffled_valid_messages_truncated(parts: list[bytes], cut: int) -> None:
    data = b"".join(parts)[: cut or None]
    _drive([data])
    _drive([data[i : i + 1] for i in range(len(data))])
