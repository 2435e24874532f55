"""Primary volumes for proxy mode: a local file / block device, or an NBD export.

Both offer the same blocking interface, called from the proxy's worker threads:
``size``, ``min_block`` (the alignment requests need: 1 for a file, the server's
advertised minimum block size for NBD), ``pread(offset, length)``, ``pwrite(data, offset)``,
``zero(offset, length)``, ``flush()`` (everything completed so far durable), ``close()``.
Failures raise OSError (errno EIO for anything the server reports). A file primary also
has ``pwritev`` (one system call for writes that continue each other) and
``pread_cached`` (a read the page cache can answer at once, for the event loop).

An NBD primary (``nbd://HOST[:PORT]/EXPORT`` or ``nbd+unix:///EXPORT?socket=PATH``) uses
:class:`cdp.targets.nbd.client.NbdClient` connections from a small pool, one per worker at a time.
A server that does not advertise multi-conn consistency gets a single connection, so a
FLUSH covers every completed write.
"""

from __future__ import annotations

import errno
import os
import queue
import threading

from cdp.errors import NotFound, UsageError
from cdp.targets.nbd.client import NbdClient, NbdClientError

TF_CAN_MULTI_CONN = 1 << 8
_ZEROS = bytes(1 << 20)
_IOV_MAX = 1024  # Linux UIO_MAXIOV
_NOWAIT = getattr(os, "RWF_NOWAIT", 0)


def is_nbd_uri(s: str) -> bool:
    return s.startswith(("nbd://", "nbd+unix://"))


def open_primary(spec: str, *, connections: int = 4) -> FilePrimary | NbdPrimary:
    """Open a primary named by a path or an NBD URI (raises NotFound / UsageError)."""
    if is_nbd_uri(spec):
        return NbdPrimary(spec, connections=connections)
    return FilePrimary(spec)


class FilePrimary:
    """A regular file or a block device, opened O_RDWR."""

    kind = "file"
    #: buffered I/O: the page cache takes any offset and length, even on a block device
    min_block = 1

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._fd = os.open(path, os.O_RDWR | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            raise NotFound(f"primary {path} not found") from None
        except IsADirectoryError:
            raise UsageError(f"primary {path} is a directory") from None
        except PermissionError as e:
            raise UsageError(f"primary {path}: {e.strerror}") from None
        self.size = os.lseek(self._fd, 0, os.SEEK_END)
        self._nowait = _NOWAIT

    def fileno(self) -> int:
        return self._fd

    def pread_cached(self, offset: int, length: int) -> bytearray | None:
        """The bytes if the page cache holds all of them, else None: one
        ``preadv2(RWF_NOWAIT)``, which never waits for the disk (it may still take a
        page lock briefly). None as well where the kernel or file system lacks it."""
        if not self._nowait:
            return None
        buf = bytearray(length)
        try:
            n = os.preadv(self._fd, [buf], offset, self._nowait)
        except BlockingIOError:
            return None
        except OSError as e:
            if e.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self._nowait = 0  # not here: always the worker threads
            return None
        return buf if n == length else None

    def pread(self, offset: int, length: int) -> bytes:
        out = os.pread(self._fd, length, offset)
        if len(out) == length:
            return out
        parts = [out]
        got = len(out)
        while got < length:
            b = os.pread(self._fd, length - got, offset + got)
            if not b:
                raise OSError(errno.EIO, f"short read from the primary at {offset + got}")
            parts.append(b)
            got += len(b)
        return b"".join(parts)

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        mv = memoryview(data)
        done = 0
        while done < len(mv):
            n = os.pwrite(self._fd, mv[done:], offset + done)
            if n <= 0:
                raise OSError(errno.EIO, f"short write to the primary at {offset + done}")
            done += n

    def pwritev(self, buffers: list[bytes | bytearray | memoryview], offset: int) -> None:
        """Write *buffers* back to back from *offset* (at most 1024 per system call)."""
        pos = offset
        for i in range(0, len(buffers), _IOV_MAX):
            part = buffers[i : i + _IOV_MAX]
            want = sum(len(b) for b in part)
            n = os.pwritev(self._fd, part, pos)
            if n < want:  # short: finish piece by piece
                skip = n
                for b in part:
                    if skip >= len(b):
                        skip -= len(b)
                        continue
                    self.pwrite(memoryview(b)[skip:], pos + n)
                    n += len(b) - skip
                    skip = 0
            pos += want

    def zero(self, offset: int, length: int) -> None:
        pos = offset
        end = offset + length
        while pos < end:
            n = min(len(_ZEROS), end - pos)
            self.pwrite(memoryview(_ZEROS)[:n], pos)
            pos += n

    def flush(self) -> None:
        os.fdatasync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class NbdPrimary:
    """An NBD export through a pool of blocking connections (thread-safe)."""

    kind = "nbd"

    def __init__(self, uri: str, *, connections: int = 4) -> None:
        self.name = uri
        self._uri = uri
        first = self._connect()
        if first.read_only:
            first.close()
            raise UsageError(f"primary {uri} is read-only")
        self.size = first.size
        self.min_block = max(1, first.min_block)
        self.multi_conn = bool(first.flags & TF_CAN_MULTI_CONN)
        self._max = max(1, connections) if self.multi_conn else 1
        self._pool: queue.LifoQueue[NbdClient] = queue.LifoQueue()
        self._pool.put(first)
        self._count = 1
        self._lock = threading.Lock()
        self._closed = False

    def _connect(self) -> NbdClient:
        try:
            return NbdClient.connect(self._uri, timeout=60.0, window=1)
        except NbdClientError as e:
            raise OSError(errno.EIO, str(e)) from None

    def _get(self) -> NbdClient:
        while True:
            try:
                return self._pool.get_nowait()
            except queue.Empty:
                pass
            with self._lock:
                grow = self._count < self._max
                if grow:
                    self._count += 1
            if grow:
                try:
                    return self._connect()
                except BaseException:
                    with self._lock:
                        self._count -= 1
                    raise
            try:
                return self._pool.get(timeout=0.5)
            except queue.Empty:
                continue  # a dropped connection frees a slot: look again

    def _run(self, fn: str, *args: object) -> object:
        c = self._get()
        try:
            r = getattr(c, fn)(*args)
            if fn in ("pwrite", "zero"):
                c.drain()
        except NbdClientError as e:
            if "failed command" in str(e):  # the server answered with an error
                self._pool.put(c)
                raise OSError(errno.EIO, f"primary {self.name}: {e}") from None
            self._drop(c)
            raise OSError(errno.EIO, f"primary {self.name}: {e}") from None
        except BaseException:
            self._drop(c)
            raise
        self._pool.put(c)
        return r

    def _drop(self, c: NbdClient) -> None:
        try:
            c.sock.close()
        except OSError:
            pass
        with self._lock:
            self._count -= 1  # the next _get reconnects

    def pread(self, offset: int, length: int) -> bytes:
        r = self._run("pread", offset, length)
        assert isinstance(r, bytes)
        return r

    def pwrite(self, data: bytes | bytearray | memoryview, offset: int) -> None:
        self._run("pwrite", data, offset)

    def zero(self, offset: int, length: int) -> None:
        self._run("zero", offset, length)

    def flush(self) -> None:
        self._run("flush")

    def close(self) -> None:
        self._closed = True
        while True:
            try:
                c = self._pool.get_nowait()
            except queue.Empty:
                break
            try:
                c.close()
            except (NbdClientError, OSError):
                pass
