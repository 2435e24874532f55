"""A pipelining NBD client of the shape simple C clients have, for tests and benchmarks.

It sends small READs as fast as it can and reads replies only between sends: before
each send it waits (``select()`` for write, 1 s timeout) until the socket takes more,
and after each send it reads whatever replies have arrived, without blocking. Against a
server that stops reading requests while its replies back up, both sides wait for each
other until the timeout (issue 28, "mutual standoff under pipelining"). It records the
gaps between replies, so a test can say "no gap over 0.5 s" without timing the run.
"""

from __future__ import annotations

import select
import socket
import struct
import time
from dataclasses import dataclass

from cdp.targets.nbd.proto import EXPORT_NAME_REPLY, SIMPLE_REPLY, Cmd, Magic, Opt
from cdp.targets.testing.nbd_wire import opt, req

_SIMPLE_MAGIC = int(Magic.SIMPLE_REPLY)


@dataclass
class StandoffResult:
    """What one run saw: replies, seconds, the longest gap between two replies (or
    before the first), how many gaps were over 0.5 s, how many select() calls for
    write timed out, and the longest one waited."""

    replies: int
    seconds: float
    max_gap: float
    gaps_over_half_second: int
    write_timeouts: int
    max_write_wait: float

    @property
    def mb_per_s(self) -> float:
        return 0.0 if not self.seconds else self.replies * 1024 / self.seconds / 1e6


def _recv_exact(s: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = s.recv(n - len(out))
        if not chunk:
            raise ConnectionError("server closed the connection during the handshake")
        out += chunk
    return out


def read_back(host: str, port: int, export: str, total: int, *, request: int = 1024,
              select_timeout: float = 1.0, recv_bytes: int = 256 << 10) -> StandoffResult:
    """READ ``total`` bytes of ``export`` (from offset 0) in ``request``-byte READs,
    pipelined as described in the module docstring. Uses the old NBD_OPT_EXPORT_NAME
    handshake and simple replies. Raises ConnectionError / AssertionError on a protocol
    surprise (an error reply included)."""
    n = total // request
    rsize = SIMPLE_REPLY.size + request
    s = socket.create_connection((host, port), timeout=30)
    try:
        _recv_exact(s, 18)
        s.sendall(struct.pack(">I", 3) + opt(Opt.EXPORT_NAME, export.encode()))
        _recv_exact(s, EXPORT_NAME_REPLY.size)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        read_cmd = int(Cmd.READ)
        sent = 0
        pending = b""  # a request the socket took only part of
        buf = bytearray()
        done = 0
        t0 = last = time.monotonic()
        max_gap = 0.0
        over = 0
        timeouts = 0
        max_wait = 0.0
        unpack = SIMPLE_REPLY.unpack_from
        while done < n:
            if sent < n or pending:
                ts = time.monotonic()
                _, w, _ = select.select([], [s], [], select_timeout)
                max_wait = max(max_wait, time.monotonic() - ts)
                if w:
                    if not pending:
                        pending = req(read_cmd, sent * request, request, cookie=sent)
                        sent += 1
                    try:
                        k = s.send(pending)
                    except BlockingIOError:
                        k = 0
                    pending = pending[k:]
                else:
                    timeouts += 1
            else:
                select.select([s], [], [], select_timeout)
            try:
                chunk = s.recv(recv_bytes)
            except BlockingIOError:
                continue
            if not chunk:
                raise ConnectionError(f"server closed the connection after {done} replies")
            buf += chunk
            k = len(buf) // rsize
            if not k:
                continue
            for i in range(k):
                magic, err, cookie = unpack(buf, i * rsize)
                if magic != _SIMPLE_MAGIC or err:
                    raise AssertionError(f"reply {done + i}: magic {magic:#x} error {err} "
                                         f"cookie {cookie}")
            del buf[: k * rsize]
            done += k
            now = time.monotonic()
            gap = now - last
            last = now
            max_gap = max(max_gap, gap)
            over += gap > 0.5
        return StandoffResult(n, time.monotonic() - t0, max_gap, over, timeouts, max_wait)
    finally:
        s.close()
