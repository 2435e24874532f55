"""Where changed extents go: a raw image file (or block device), an NBD server, or a
``.cdpdiff`` stream. All blocking; the export runs them in a worker thread."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import stat
from typing import Any, Protocol

from cdp.backup import cdpdiff
from cdp.errors import UsageError
from cdp.targets.nbd.client import NbdClient

FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02

_libc: ctypes.CDLL | None = None


def _fallocate() -> Any:
    """libc's fallocate(2) (ctypes; Python's os module has no hole punching)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        _libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    return _libc.fallocate


class Sink(Protocol):
    grain: int  # writes must start and end on multiples of this (or at the end)

    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def zero(self, offset: int, length: int) -> None: ...
    def finish(self) -> None: ...
    def close(self) -> None: ...


def write_all(fd: int, data: bytes | memoryview) -> None:
    """os.write until everything is written (pipes take partial writes)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


class FileSink:
    """A raw image file or block device of exactly ``size`` bytes. Zeroes punch holes
    in regular files (falling back to writing zeroes)."""

    grain = 1

    def __init__(self, path: str, size: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR)
        st = os.fstat(self.fd)
        actual = st.st_size if stat.S_ISREG(st.st_mode) else os.lseek(self.fd, 0, os.SEEK_END)
        if actual != size:
            os.close(self.fd)
            raise UsageError(f"{path} is {actual} bytes; the diff is for a {size}-byte volume")
        self._regular = stat.S_ISREG(st.st_mode)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self.fd, view, offset)
            view = view[n:]
            offset += n

    def zero(self, offset: int, length: int) -> None:
        if self._regular:
            r = _fallocate()(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)
            if r == 0:
                return
            if ctypes.get_errno() not in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                raise OSError(ctypes.get_errno(), f"fallocate on {self.path}")
        z = bytes(min(length, 4 << 20))
        for i in range(0, length, len(z)):
            self.write(offset + i, memoryview(z)[: min(len(z), length - i)])

    def finish(self) -> None:
        os.fsync(self.fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class NbdSink:
    """An NBD export of exactly ``size`` bytes (``nbd://HOST:PORT/EXPORT``)."""

    def __init__(self, uri: str, size: int) -> None:
        self.client = NbdClient.connect(uri)
        if self.client.read_only:
            self.client.close()
            raise UsageError(f"{uri} is read-only")
        if self.client.size != size:
            self.client.close()
            raise UsageError(f"{uri} is {self.client.size} bytes; the volume is {size}")
        self.grain = max(1, self.client.min_block)

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.client.pwrite(data, offset)

    def zero(self, offset: int, length: int) -> None:
        self.client.zero(offset, length)

    def finish(self) -> None:
        self.client.flush()

    def close(self) -> None:
        self.client.close()


class StreamSink:
    """A ``.cdpdiff`` stream written to a file descriptor (a file, a pipe, stdout)."""

    grain = 1

    def __init__(self, fd: int, header: cdpdiff.Header, *, close_fd: bool = True) -> None:
        self.fd = fd
        self.close_fd = close_fd
        self._buf: list[bytes | memoryview] = []
        self._n = 0
        self.writer = cdpdiff.Writer(self._out, header)

    def _out(self, b: bytes | memoryview) -> None:
        self._buf.append(b)
        self._n += len(b)
        if self._n >= 4 << 20:
            self._flush_buf()

    def _flush_buf(self) -> None:
        if self._buf:
            write_all(self.fd, self._buf[0] if len(self._buf) == 1 else b"".join(self._buf))
            self._buf, self._n = [], 0

    def write(self, offset: int, data: bytes | memoryview) -> None:
        self.writer.data(offset, data)

    def zero(self, offset: int, length: int) -> None:
        self.writer.zero(offset, length)

    def finish(self) -> None:
        self.writer.end()
        self._flush_buf()
        try:
            os.fsync(self.fd)
        except OSError:
            pass  # pipes cannot be synced

    def close(self) -> None:
        if self.close_fd and self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
