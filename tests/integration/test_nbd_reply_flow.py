"""cdpd's reply flow control (issue 23) as a user would notice it: a client that stops
reading replies costs cdpd a bounded amount of memory and nobody else's service, gets
every reply right when it reads again, and one that disconnects with replies queued (or
a cdpd stopped while a client reads nothing) frees what it held."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from cdp.targets.nbd.proto import Cmd, Magic, Opt
from cdp.targets.testing.nbd_wire import FLAGS, opt, recv_exact, req, simple
from tools.harness import Cdpd, rss_bytes

MiB = 1 << 20
READ = 64 << 10
#: 64 KiB READs: 512 MiB of replies from 224 KiB of requests (all of it under cdpd's
#: 1 MiB read backlog, so cdpd receives every request whether or not it answers)
REQS = 8192
#: the data the READs cover (random: stored raw, so every reply is a fresh buffer)
SPAN = 32 * MiB
#: what cdpd may grow by while a client reads nothing: the bound is the 8 MiB
#: ``write_high`` of queued replies plus a 256 KiB turn and the 1 MiB backlog; without
#: it the whole 512 MiB would be queued
GROWTH_LIMIT = 128 * MiB


def _cpu_ticks(pid: int) -> int:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(f[11]) + int(f[12])


def _sockets(pid: int) -> int:
    n = 0
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            n += os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:")
        except OSError:
            pass
    return n


def _until(cond: Callable[[], bool], what: str, limit: float = 120.0) -> None:
    """Wait for *cond* (a deadline only against a hang, never a measured time)."""
    deadline = time.monotonic() + limit
    while not cond():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.2)


def _settled(pid: int) -> None:
    """Wait until cdpd has stopped working (no CPU for a second): it has answered all
    it will answer while the client reads nothing."""
    last = [-1]

    def idle() -> bool:
        t = _cpu_ticks(pid)
        quiet = t == last[0]
        last[0] = t
        return quiet

    _until(lambda: idle() or bool(time.sleep(0.8)), "cdpd settles")


def _fill(cdpd: Cdpd) -> bytes:
    data = os.urandom(SPAN)
    with NbdClient.connect(cdpd.uri()) as c:
        for off in range(0, SPAN, MiB):
            c.pwrite(data[off : off + MiB], off)
        c.flush()
    return data


def _stuck_client(cdpd: Cdpd) -> socket.socket:
    """A client that sends REQS READs and reads no reply (a small receive buffer)."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    s.settimeout(120)
    s.connect(("127.0.0.1", cdpd.nbd_port))
    recv_exact(s, 18)
    s.sendall(FLAGS + opt(Opt.EXPORT_NAME, b"vol0"))
    recv_exact(s, 10)  # size and flags (FLAGS asks for no zero padding)
    s.sendall(b"".join(req(Cmd.READ, i * READ % SPAN, READ, cookie=i) for i in range(REQS)))
    return s


def _served(cdpd: Cdpd, data: bytes) -> None:
    with NbdClient.connect(cdpd.uri()) as c:
        assert c.pread(12345, 4096) == data[12345 : 12345 + 4096]


def test_client_that_stops_reading_replies(cdpd: Cdpd) -> None:
    """512 MiB of replies asked and none read: cdpd grows by at most the bound, serves
    another client meanwhile, and when the client reads again every reply is right."""
    assert cdpd.proc is not None
    pid = cdpd.proc.pid
    data = _fill(cdpd)
    rss0 = rss_bytes(pid)
    with _stuck_client(cdpd) as s:
        _settled(pid)
        grown = rss_bytes(pid) - rss0
        assert grown < GROWTH_LIMIT, f"cdpd grew by {grown / MiB:.0f} MiB"
        _served(cdpd, data)
        for _ in range(REQS):
            magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
            assert (magic, err) == (Magic.SIMPLE_REPLY, 0)
            off = cookie * READ % SPAN
            assert recv_exact(s, READ) == data[off : off + READ], f"reply {cookie}"
        s.sendall(req(Cmd.FLUSH, cookie=REQS))
        assert simple(recv_exact(s, 16)) == (0, REQS)
        s.sendall(req(Cmd.DISC))
    assert cdpd.stop() == 0
    assert "stopped cleanly: maps sealed, journal synced" in cdpd.log.read_text()


def test_disconnect_with_replies_queued(cdpd: Cdpd) -> None:
    """A client that reads nothing and then resets the connection: cdpd's memory stays
    bounded while it waits, it lets go of the connection (no socket left behind),
    serves the next client, and a SIGTERM with yet another such
    client connected still ends in a clean stop."""
    assert cdpd.proc is not None
    pid = cdpd.proc.pid
    data = _fill(cdpd)
    _served(cdpd, data)
    _settled(pid)  # the last client's connection is closed
    socks0 = _sockets(pid)
    rss0 = rss_bytes(pid)
    s = _stuck_client(cdpd)
    _settled(pid)
    grown = rss_bytes(pid) - rss0
    assert grown < GROWTH_LIMIT, f"cdpd grew by {grown / MiB:.0f} MiB"
    assert _sockets(pid) > socks0
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()  # RST, with megabytes of replies queued in cdpd
    _until(lambda: _sockets(pid) <= socks0, "cdpd lets go of the reset connection")
    _served(cdpd, data)
    with _stuck_client(cdpd):
        _settled(pid)
        assert cdpd.stop(timeout=120) == 0  # the drain waits 30 s, then aborts the client
    assert "stopped cleanly: maps sealed, journal synced" in cdpd.log.read_text()
