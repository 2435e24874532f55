"""A small blocking NBD client: fixed newstyle handshake, NBD_OPT_GO, then READ, WRITE,
WRITE_ZEROES, FLUSH and DISC with simple replies, pipelined.

Enough to push changed blocks into any NBD server (cdpd, nbdkit, qemu-nbd). URIs::

    nbd://HOST[:PORT]/EXPORT           (port 10809 by default)
    nbd+unix:///EXPORT?socket=PATH

Not thread-safe: one thread drives a client. Writes are pipelined up to ``window``
requests in flight; :meth:`flush` (and :meth:`close`) wait for every reply, so errors
surface there at the latest (raised as :class:`NbdClientError` with the server's errno).
"""

from __future__ import annotations

import errno as _errno
import socket
import struct
import urllib.parse
from dataclasses import dataclass

from cdp.errors import CdpError, ExitStatus, ReadOnly, StoreFull, UsageError

NBDMAGIC = 0x4E42444D41474943  # "NBDMAGIC"
IHAVEOPT = 0x49484156454F5054  # "IHAVEOPT"
REPLY_MAGIC = 0x3E889045565A9
REQUEST_MAGIC = 0x25609513
SIMPLE_REPLY_MAGIC = 0x67446698

FLAG_FIXED_NEWSTYLE = 1
FLAG_NO_ZEROES = 2
OPT_EXPORT_NAME = 1
OPT_GO = 7
REP_ACK = 1
REP_INFO = 3
REP_ERR_UNSUP = (1 << 31) + 1
INFO_EXPORT = 0
INFO_BLOCK_SIZE = 3

TF_READ_ONLY = 1 << 1
TF_SEND_FLUSH = 1 << 2
TF_SEND_WRITE_ZEROES = 1 << 6

CMD_READ = 0
CMD_WRITE = 1
CMD_DISC = 2
CMD_FLUSH = 3
CMD_WRITE_ZEROES = 6

_REQ = struct.Struct(">IHHQQI")
_REPLY = struct.Struct(">IIQ")
_OPT_REPLY = struct.Struct(">QIII")

DEFAULT_PORT = 10809


class NbdClientError(CdpError):
    """The NBD server refused or failed something (or the connection broke)."""

    exit_status = ExitStatus.ERROR


class NbdNoSpace(NbdClientError, StoreFull):
    """The NBD server answered ENOSPC (its store is full): exit 5, as ``cdpctl --help`` says."""

    exit_status = ExitStatus.STORE_FULL


class NbdReadOnly(NbdClientError, ReadOnly):
    """The NBD server answered EPERM (a read-only export): exit 4."""

    exit_status = ExitStatus.READ_ONLY


def _server_error(cmd: int, err: int) -> NbdClientError:
    """The error for an NBD reply with error ``err``: ENOSPC and EPERM keep the exit
    status their meaning has (5, 4); anything else is exit 1. Each names the errno."""
    what = f"NBD server failed command {cmd} (errno {err}"
    if err == _errno.ENOSPC:
        return NbdNoSpace(f"{what}: no space left on the target)")
    if err == _errno.EPERM:
        return NbdReadOnly(f"{what}: the export is read-only)")
    return NbdClientError(f"{what})")


@dataclass(frozen=True)
class Target:
    host: str | None
    port: int
    socket_path: str | None
    export: str


def parse_uri(uri: str) -> Target:
    """``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``."""
    u = urllib.parse.urlsplit(uri)
    export = urllib.parse.unquote(u.path[1:] if u.path.startswith("/") else u.path)
    if u.scheme == "nbd":
        if not u.hostname:
            raise UsageError(f"{uri}: no host (nbd://HOST[:PORT]/EXPORT)")
        return Target(u.hostname, u.port or DEFAULT_PORT, None, export)
    if u.scheme == "nbd+unix":
        q = urllib.parse.parse_qs(u.query)
        if "socket" not in q:
            raise UsageError(f"{uri}: nbd+unix needs ?socket=PATH")
        return Target(None, 0, q["socket"][0], export)
    raise UsageError(f"{uri}: not an nbd:// or nbd+unix:// URI")


class NbdClient:
    """One connection to one export. Use :meth:`connect`."""

    def __init__(self, sock: socket.socket, export: str, window: int = 16) -> None:
        self.sock = sock
        self.export = export
        self.window = window
        self.size = 0
        self.flags = 0
        self.min_block = 1
        self.max_payload = 32 << 20
        self._cookie = 0
        self._inflight: dict[int, tuple[int, int]] = {}  # cookie -> (cmd, length)
        self._closed = False

    # ------------------------------------------------------------------ handshake

    @classmethod
    def connect(cls, uri: str, *, timeout: float = 60.0, window: int = 16) -> NbdClient:
        t = parse_uri(uri)
        try:
            if t.socket_path is not None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(timeout)
                sock.connect(t.socket_path)
            else:
                assert t.host is not None
                sock = socket.create_connection((t.host, t.port), timeout=timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:
            raise NbdClientError(f"{uri}: cannot connect: {e}") from None
        c = cls(sock, t.export, window)
        try:
            c._handshake()
        except BaseException:
            sock.close()
            raise
        return c

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            try:
                b = self.sock.recv(n - len(buf))
            except OSError as e:
                raise NbdClientError(f"NBD connection failed: {e}") from None
            if not b:
                raise NbdClientError("NBD server closed the connection")
            buf += b
        return bytes(buf)

    def _send(self, *parts: bytes | memoryview) -> None:
        try:
            for p in parts:
                self.sock.sendall(p)
        except OSError as e:
            raise NbdClientError(f"NBD connection failed: {e}") from None

    def _handshake(self) -> None:
        magic, opt_magic, hflags = struct.unpack(">QQH", self._recv(18))
        if magic != NBDMAGIC or opt_magic != IHAVEOPT:
            raise NbdClientError("not a newstyle NBD server")
        if not hflags & FLAG_FIXED_NEWSTYLE:
            raise NbdClientError("NBD server does not do fixed newstyle negotiation")
        cflags = FLAG_FIXED_NEWSTYLE | (hflags & FLAG_NO_ZEROES)
        self._send(struct.pack(">I", cflags))
        name = self.export.encode()
        data = struct.pack(">I", len(name)) + name + struct.pack(">HH", 1, INFO_BLOCK_SIZE)
        self._send(struct.pack(">QII", IHAVEOPT, OPT_GO, len(data)), data)
        while True:
            magic, opt, rtype, length = _OPT_REPLY.unpack(self._recv(_OPT_REPLY.size))
            body = self._recv(length) if length else b""
            if magic != REPLY_MAGIC or opt != OPT_GO:
                raise NbdClientError("bad option reply from the NBD server")
            if rtype == REP_ACK:
                break
            if rtype == REP_INFO and len(body) >= 2:
                (itype,) = struct.unpack(">H", body[:2])
                if itype == INFO_EXPORT and len(body) >= 12:
                    self.size, self.flags = struct.unpack(">QH", body[2:12])
                elif itype == INFO_BLOCK_SIZE and len(body) >= 14:
                    self.min_block, _pref, self.max_payload = struct.unpack(">III", body[2:14])
                continue
            if rtype == REP_ERR_UNSUP:  # an old server: fall back to NBD_OPT_EXPORT_NAME
                self._send(struct.pack(">QII", IHAVEOPT, OPT_EXPORT_NAME, len(name)), name)
                self.size, self.flags = struct.unpack(">QH", self._recv(10))
                if not hflags & FLAG_NO_ZEROES:
                    self._recv(124)
                break
            if rtype & (1 << 31):
                msg = body.decode(errors="replace")
                raise NbdClientError(f"NBD server refused export {self.export!r}: {msg or hex(rtype)}")

    # ------------------------------------------------------------------ transmission

    @property
    def read_only(self) -> bool:
        return bool(self.flags & TF_READ_ONLY)

    def _request(self, cmd: int, offset: int, length: int, payload: bytes | memoryview | None = None) -> int:
        while len(self._inflight) >= self.window:
            self._reply()
        self._cookie += 1
        c = self._cookie
        hdr = _REQ.pack(REQUEST_MAGIC, 0, cmd, c, offset, length)
        if payload is not None:
            self._send(hdr, payload)
        else:
            self._send(hdr)
        self._inflight[c] = (cmd, length)
        return c

    def _reply(self) -> tuple[int, bytes | None]:
        magic, err, cookie = _REPLY.unpack(self._recv(_REPLY.size))
        if magic != SIMPLE_REPLY_MAGIC:
            raise NbdClientError(f"bad reply magic {magic:#x} from the NBD server")
        req = self._inflight.pop(cookie, None)
        if req is None:
            raise NbdClientError(f"NBD server replied to an unknown request {cookie}")
        cmd, length = req
        if err:
            raise _server_error(cmd, err)
        data = self._recv(length) if cmd == CMD_READ else None
        return cookie, data

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise UsageError(f"[{offset}, {offset + length}) is outside the NBD export (size {self.size})")

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        """Queue a write (split at the server's maximum payload)."""
        self._check(offset, len(data))
        view = memoryview(data)
        step = max(self.min_block, min(self.max_payload, 8 << 20))
        step -= step % self.min_block or 0
        for i in range(0, len(view), step):
            part = view[i : i + step]
            self._request(CMD_WRITE, offset + i, len(part), part)

    def zero(self, offset: int, length: int) -> None:
        """Queue zeroing (WRITE_ZEROES, or writes of zeroes when the server lacks it)."""
        self._check(offset, length)
        if self.flags & TF_SEND_WRITE_ZEROES:
            step = 1 << 30
            for i in range(0, length, step):
                self._request(CMD_WRITE_ZEROES, offset + i, min(step, length - i))
            return
        z = bytes(min(length, 4 << 20))
        for i in range(0, length, len(z)):
            n = min(len(z), length - i)
            self.pwrite(memoryview(z)[:n], offset + i)

    def pread(self, offset: int, length: int) -> bytes:
        """Read (waits for every earlier request first)."""
        self._check(offset, length)
        self.drain()
        out = []
        step = min(self.max_payload, 8 << 20)
        for i in range(0, length, step):
            c = self._request(CMD_READ, offset + i, min(step, length - i))
            got_cookie, data = self._reply()
            assert got_cookie == c and data is not None
            out.append(data)
        return b"".join(out)

    def drain(self) -> None:
        """Wait for every reply (raises the first error)."""
        while self._inflight:
            self._reply()

    def flush(self) -> None:
        """Wait for every write, then FLUSH (when the server offers it)."""
        self.drain()
        if self.flags & TF_SEND_FLUSH:
            self._request(CMD_FLUSH, 0, 0)
            self.drain()

    def close(self) -> None:
        """Wait for replies, send DISC, close. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self.drain()
            self._send(_REQ.pack(REQUEST_MAGIC, 0, CMD_DISC, 0, 0, 0))
        finally:
            self.sock.close()

    def __enter__(self) -> NbdClient:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._closed = True
            self.sock.close()
