"""Client-side NBD message builders and reply parsers, for tests, fuzzers and probes."""

from __future__ import annotations

import socket
import struct

from cdp.targets.nbd.proto import (
    OPTION_HEADER,
    OPTION_REPLY,
    REQUEST,
    SIMPLE_REPLY,
    STRUCTURED_REPLY,
    ClientFlag,
    Magic,
    Opt,
)

FLAGS = struct.pack(">I", ClientFlag.C_FIXED_NEWSTYLE | ClientFlag.C_NO_ZEROES)


def opt(option: int, data: bytes = b"") -> bytes:
    return OPTION_HEADER.pack(Magic.IHAVEOPT, option, len(data)) + data


def s32(s: str) -> bytes:
    b = s.encode()
    return struct.pack(">I", len(b)) + b


def go(name: str, *infos: int, option: int = Opt.GO) -> bytes:
    body = s32(name) + struct.pack(">H", len(infos)) + b"".join(struct.pack(">H", i) for i in infos)
    return opt(option, body)


def meta(option: int, name: str, *queries: str) -> bytes:
    return opt(option, s32(name) + struct.pack(">I", len(queries)) + b"".join(map(s32, queries)))


def req(cmd: int, offset: int = 0, length: int = 0, flags: int = 0, cookie: int = 1) -> bytes:
    return REQUEST.pack(Magic.REQUEST, flags, cmd, cookie, offset, length)


def option_replies(data: bytes) -> list[tuple[int, int, bytes]]:
    """Split option replies: (option, reply type, data)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, o, rep, n = OPTION_REPLY.unpack_from(data, pos)
        assert magic == Magic.OPT_REPLY
        pos += OPTION_REPLY.size
        out.append((o, rep, data[pos : pos + n]))
        pos += n
    assert pos == len(data)
    return out


def simple(data: bytes, pos: int = 0) -> tuple[int, int]:
    """(error, cookie) of a simple reply at pos."""
    magic, err, cookie = SIMPLE_REPLY.unpack_from(data, pos)
    assert magic == Magic.SIMPLE_REPLY
    return err, cookie


def chunks(data: bytes) -> list[tuple[int, int, int, bytes]]:
    """Split structured reply chunks: (flags, type, cookie, payload)."""
    out = []
    pos = 0
    while pos < len(data):
        magic, flags, typ, cookie, n = STRUCTURED_REPLY.unpack_from(data, pos)
        assert magic == Magic.STRUCTURED_REPLY, hex(magic)
        pos += STRUCTURED_REPLY.size
        out.append((flags, typ, cookie, data[pos : pos + n]))
        pos += n
    assert pos == len(data)
    return out


def recv_exact(s: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from blocking socket ``s``; AssertionError if it closes first."""
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = s.recv_into(view[got:])
        assert k, f"connection closed after {got} of {n} bytes"
        got += k
    return bytes(buf)
