"""The injectable file and clock layer of the journal.

All segment and index file access goes through a :class:`FileLayer`; all time through a
:class:`Clock`. :class:`OsFileLayer` is the real thing. :class:`CrashSimFS` keeps files in
memory, remembers what was made durable (``fdatasync`` for file contents, ``fsync_dir``
for names) and on :meth:`CrashSimFS.crash` forgets everything else, like a power loss.
:class:`ManualClock` lets tests move time, backwards too.

Handles are small ints in both implementations. Every method may raise ``OSError``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import random
import threading
import time
from collections.abc import Callable, Sequence

#: what write() accepts
Buffer = bytes | bytearray | memoryview

#: iovecs per writev call (POSIX guarantees at least 16; Linux allows 1024)

def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range(2) (Linux), or None."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    fn.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    fn.restype = ctypes.c_int
    return fn


_sync_file_range = _libc_sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2
_IOV_MAX = max(16, min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 16, 1024))


class Clock:
    """Wall clock in nanoseconds since the epoch."""

    def time_ns(self) -> int:
        """Current wall-clock time (may step backwards; the journal copes)."""
        return time.time_ns()


class ManualClock(Clock):
    """A clock tests set by hand; ``tick`` ns are added after every reading."""

    def __init__(self, start_ns: int = 1_700_000_000_000_000_000, tick: int = 0) -> None:
        self.now = start_ns
        self.tick = tick

    def time_ns(self) -> int:
        t = self.now
        self.now += self.tick
        return t

    def set(self, ns: int) -> None:
        """Jump to ``ns`` (earlier or later)."""
        self.now = ns

    def advance(self, ns: int) -> None:
        """Move by ``ns`` (negative moves back)."""
        self.now += ns


class FileLayer:
    """What the journal needs from a file system. Paths are ``str``; handles are ints."""

    #: number of fdatasync calls made (tests and benchmarks read it)
    fdatasync_count: int = 0

    def open_append(self, path: str) -> int:
        """Open ``path`` for appending, creating it if missing."""
        raise NotImplementedError

    def open_read(self, path: str) -> int:
        """Open an existing file for positional reads."""
        raise NotImplementedError

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        """Up to ``size`` bytes at ``offset`` (fewer at end of file)."""
        raise NotImplementedError

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        """Fill ``buf`` from ``offset``; the bytes read (fewer at end of file). This
        default copies a :meth:`pread`; the OS layer reads into ``buf`` directly."""
        data = self.pread(fd, len(buf), offset)
        buf[: len(data)] = data
        return len(data)

    def write(self, fd: int, data: Buffer) -> None:
        """Append all of ``data`` or raise (a prefix may have reached the file)."""
        raise NotImplementedError

    def writev(self, fd: int, parts: Sequence[Buffer]) -> None:
        """Append all parts in order, or raise (a prefix may have reached the file)."""
        for p in parts:
            self.write(fd, p)

    def open_write(self, path: str) -> int:
        """Open ``path`` for positional writes (:meth:`pwrite`), creating it if missing."""
        raise NotImplementedError

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        """Write all of ``data`` at ``offset`` (over old bytes, or growing the file), or
        raise (a prefix may have reached the file). Needs a handle of :meth:`open_write`."""
        raise NotImplementedError

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> None:
        """Write all parts in order from ``offset``, or raise (as :meth:`pwrite`)."""
        for p in parts:
            self.pwrite(fd, p, offset)
            offset += memoryview(p).nbytes

    def fdatasync(self, fd: int) -> None:
        """Make the file's contents durable."""
        raise NotImplementedError

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """Advise: start writing ``[offset, offset+length)`` of the file to the device
        now, without waiting for it (durability still needs :meth:`fdatasync`)."""

    def truncate(self, fd: int, size: int) -> None:
        """Cut the file to ``size`` bytes (not durable until fdatasync)."""
        raise NotImplementedError

    def close(self, fd: int) -> None:
        """Release a handle."""
        raise NotImplementedError

    def listdir(self, directory: str) -> list[str]:
        """Names in ``directory``."""
        raise NotImplementedError

    def rename(self, src: str, dst: str) -> None:
        """Atomically replace ``dst`` by ``src`` (durable after fsync_dir)."""
        raise NotImplementedError

    def unlink(self, path: str) -> None:
        """Remove a name (durable after fsync_dir)."""
        raise NotImplementedError

    def fsync_dir(self, directory: str) -> None:
        """Make creations, renames and removals in ``directory`` durable."""
        raise NotImplementedError

    def size(self, path: str) -> int:
        """Current size of ``path``; FileNotFoundError if it does not exist."""
        raise NotImplementedError

    def makedirs(self, directory: str) -> None:
        """Create ``directory`` and its parents if missing."""
        raise NotImplementedError


class OsFileLayer(FileLayer):
    """The real file system (POSIX calls, no Python file objects)."""

    def __init__(self) -> None:
        self.fdatasync_count = 0

    def open_append(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)

    def open_read(self, path: str) -> int:
        return os.open(path, os.O_RDONLY | os.O_CLOEXEC)

    def open_write(self, path: str) -> int:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        return os.pread(fd, size, offset)

    def pread_into(self, fd: int, buf: bytearray | memoryview, offset: int) -> int:
        mv = memoryview(buf)
        done = 0
        while done < len(mv):  # preadv may return short (signals); 0 at end of file
            n = os.preadv(fd, [mv[done:]], offset + done)
            if n == 0:
                break
            done += n
        return done

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        mv = memoryview(data).cast("B")
        n = os.pwrite(fd, mv, offset)
        while n < len(mv):  # short writes happen near ENOSPC and on signals
            mv, offset = mv[n:], offset + n
            n = os.pwrite(fd, mv, offset)

    def pwritev(self, fd: int, parts: Sequence[Buffer], offset: int) -> None:
        if len(parts) > _IOV_MAX:  # a large chunked record: several calls
            for k in range(0, len(parts), _IOV_MAX):
                chunk = parts[k : k + _IOV_MAX]
                self.pwritev(fd, chunk, offset)
                offset += sum(memoryview(p).nbytes for p in chunk)
            return
        total = sum(memoryview(p).nbytes for p in parts)
        n = os.pwritev(fd, parts, offset)
        if n < total:  # finish the rest piece by piece
            done = 0
            for p in parts:
                mv = memoryview(p).cast("B")
                if done + mv.nbytes > n:
                    skip = max(0, n - done)
                    self.pwrite(fd, mv[skip:], offset + done + skip)
                done += mv.nbytes

    def write(self, fd: int, data: Buffer) -> None:
        mv = memoryview(data)
        n = os.write(fd, mv)
        while n < len(mv):  # short writes happen near ENOSPC and on signals
            mv = mv[n:]
            n = os.write(fd, mv)

    def writev(self, fd: int, parts: Sequence[Buffer]) -> None:
        if len(parts) > _IOV_MAX:  # a large chunked record: several calls
            for k in range(0, len(parts), _IOV_MAX):
                self.writev(fd, parts[k : k + _IOV_MAX])
            return
        total = sum(memoryview(p).nbytes for p in parts)
        n = os.writev(fd, parts)
        if n < total:  # finish the rest piece by piece
            done = 0
            for p in parts:
                mv = memoryview(p)
                if done + mv.nbytes <= n:
                    done += mv.nbytes
                    continue
                self.write(fd, mv[max(0, n - done) :])
                done += mv.nbytes

    def fdatasync(self, fd: int) -> None:
        self.fdatasync_count += 1
        os.fdatasync(fd)

    def start_writeback(self, fd: int, offset: int, length: int) -> None:
        """sync_file_range(SYNC_FILE_RANGE_WRITE) where libc has it; errors ignored
        (advice only). Queues the writeback and returns without waiting for it."""
        if _sync_file_range is not None:
            _sync_file_range(fd, offset, length, _SYNC_FILE_RANGE_WRITE)

    def truncate(self, fd: int, size: int) -> None:
        os.ftruncate(fd, size)

    def close(self, fd: int) -> None:
        os.close(fd)

    def listdir(self, directory: str) -> list[str]:
        return os.listdir(directory)

    def rename(self, src: str, dst: str) -> None:
        os.rename(src, dst)

    def unlink(self, path: str) -> None:
        os.unlink(path)

    def fsync_dir(self, directory: str) -> None:
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def size(self, path: str) -> int:
        return os.stat(path).st_size

    def makedirs(self, directory: str) -> None:
        os.makedirs(directory, exist_ok=True)


class _Inode:
    __slots__ = ("data", "durable")

    def __init__(self) -> None:
        self.data = bytearray()
        self.durable = b""


class CrashSimFS(FileLayer):
    """In-memory file system that can lose power.

    File contents become durable at ``fdatasync``; names (creation, rename, unlink) at
    ``fsync_dir`` of their directory. :meth:`crash` drops everything else; with
    ``torn=True`` a random prefix of each file's unsynced appended bytes survives, as a
    disk that wrote part of its cache would leave it. ``capacity`` (total bytes) makes
    writes fail with ENOSPC after writing what fits. Thread-safe (one lock).
    """

    def __init__(self, capacity: int | None = None, seed: int = 0) -> None:
        self.fdatasync_count = 0
        self.capacity = capacity
        self.rng = random.Random(seed)
        self._lock = threading.Lock()
        self._names: dict[str, _Inode] = {}
        self._durable_names: dict[str, _Inode] = {}
        self._dirs: set[str] = set()
        self._fds: dict[int, _Inode] = {}
        self._next_fd = 1000
        #: set to an errno to make the next fdatasync calls fail with it
        self.fail_fdatasync: int | None = None

    # -- helpers -------------------------------------------------------------------------

    @staticmethod
    def _norm(path: str) -> str:
        return os.path.normpath(path)

    def _used(self) -> int:
        return sum(len(i.data) for i in set(self._names.values()) | set(self._fds.values()))

    def _fd(self, fd: int) -> _Inode:
        try:
            return self._fds[fd]
        except KeyError:
            raise OSError(errno.EBADF, "bad file descriptor") from None

    def _new_fd(self, inode: _Inode) -> int:
        self._next_fd += 1
        self._fds[self._next_fd] = inode
        return self._next_fd

    # -- FileLayer -----------------------------------------------------------------------

    def open_append(self, path: str) -> int:
        p = self._norm(path)
        with self._lock:
            if os.path.dirname(p) not in self._dirs:
                raise FileNotFoundError(errno.ENOENT, "no such directory", path)
            inode = self._names.get(p)
            if inode is None:
                inode = self._names[p] = _Inode()
            return self._new_fd(inode)

    def open_read(self, path: str) -> int:
        p = self._norm(path)
        with self._lock:
            inode = self._names.get(p)
            if inode is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            return self._new_fd(inode)

    def pread(self, fd: int, size: int, offset: int) -> bytes:
        with self._lock:
            return bytes(self._fd(fd).data[offset : offset + size])

    def write(self, fd: int, data: Buffer) -> None:
        b = bytes(data)
        with self._lock:
            inode = self._fd(fd)
            if self.capacity is not None:
                room = self.capacity - self._used()
                if len(b) > room:
                    inode.data += b[: max(room, 0)]
                    raise OSError(errno.ENOSPC, "No space left on device")
            inode.data += b

    def open_write(self, path: str) -> int:
        return self.open_append(path)  # handles are not positioned here

    def pwrite(self, fd: int, data: Buffer, offset: int) -> None:
        b = bytes(data)
        with self._lock:
            inode = self._fd(fd)
            d = inode.data
            if offset > len(d):
                d += bytes(offset - len(d))
            grow = offset + len(b) - len(d)
            if self.capacity is not None and grow > 0:
                room = self.capacity - self._used()
                if grow > room:
                    fit = len(d) - offset + max(room, 0)
                    d[offset : offset + fit] = b[:fit]
                    raise OSError(errno.ENOSPC, "No space left on device")
            d[offset : offset + len(b)] = b

    def fdatasync(self, fd: int) -> None:
        with self._lock:
            self.fdatasync_count += 1
            if self.fail_fdatasync is not None:
                raise OSError(self.fail_fdatasync, os.strerror(self.fail_fdatasync))
            inode = self._fd(fd)
            inode.durable = bytes(inode.data)

    def truncate(self, fd: int, size: int) -> None:
        with self._lock:
            inode = self._fd(fd)
            if size < len(inode.data):
                del inode.data[size:]
            else:
                inode.data += bytes(size - len(inode.data))

    def close(self, fd: int) -> None:
        with self._lock:
            self._fds.pop(fd, None)

    def listdir(self, directory: str) -> list[str]:
        d = self._norm(directory)
        with self._lock:
            if d not in self._dirs:
                raise FileNotFoundError(errno.ENOENT, "no such directory", directory)
            return [os.path.basename(p) for p in self._names if os.path.dirname(p) == d]

    def rename(self, src: str, dst: str) -> None:
        s, d = self._norm(src), self._norm(dst)
        with self._lock:
            if s not in self._names:
                raise FileNotFoundError(errno.ENOENT, "no such file", src)
            self._names[d] = self._names.pop(s)

    def unlink(self, path: str) -> None:
        p = self._norm(path)
        with self._lock:
            if self._names.pop(p, None) is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)

    def fsync_dir(self, directory: str) -> None:
        d = self._norm(directory)
        with self._lock:
            for p in [p for p in self._durable_names if os.path.dirname(p) == d]:
                del self._durable_names[p]
            for p, inode in self._names.items():
                if os.path.dirname(p) == d:
                    self._durable_names[p] = inode

    def size(self, path: str) -> int:
        p = self._norm(path)
        with self._lock:
            inode = self._names.get(p)
            if inode is None:
                raise FileNotFoundError(errno.ENOENT, "no such file", path)
            return len(inode.data)

    def makedirs(self, directory: str) -> None:
        d = self._norm(directory)
        with self._lock:
            while d and d not in self._dirs:
                self._dirs.add(d)  # directories themselves are taken as durable
                parent = os.path.dirname(d)
                if parent == d:
                    break
                d = parent

    # -- test controls -------------------------------------------------------------------

    def crash(self, torn: bool = False) -> None:
        """Power loss: keep only durable names and contents (plus torn tails if asked).

        With ``torn``, of the bytes written since the last fdatasync (appended, or
        written over durable ones) a random prefix survives, the rest is as it was
        durable. All open handles become invalid.
        """
        with self._lock:
            self._fds.clear()
            self._names = dict(self._durable_names)
            for inode in set(self._names.values()):
                old, new = inode.durable, bytes(inode.data)
                keep = old
                if torn and new[: len(old)] == old:  # appended only
                    tail = new[len(old) :]
                    if tail:
                        keep = old + tail[: self.rng.randint(0, len(tail))]
                elif torn and len(new) >= len(old):  # written over durable bytes
                    cut = self.rng.randint(_first_difference(old, new), len(new))
                    keep = new[:cut] + old[cut:]
                inode.data = bytearray(keep)

    def raw(self, path: str) -> bytearray:
        """The live contents of ``path`` (tests edit it to flip bits or truncate)."""
        with self._lock:
            return self._names[self._norm(path)].data

    def exists(self, path: str) -> bool:
        """Whether ``path`` currently has a name."""
        with self._lock:
            return self._norm(path) in self._names


def _first_difference(a: bytes, b: bytes) -> int:
    """Index of the first byte where ``a`` and ``b`` differ (the shorter length if one is
    a prefix of the other)."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo
