"""Several positioned writes for one release of the GIL: glibc's ``lio_listio`` with
``LIO_WAIT`` through ctypes (libc only: no C extension, nothing to build).

Design notes
------------
* **Why** (issue 23, measured with ``tools/bench/proxy_inproc.py``): the primary's
  writer thread made one ``os.pwrite`` per random host write, and each gives up the
  GIL and takes it back. Through NBD the event loop holds the GIL most of the time,
  so those hand-overs became futex wake-ups and context switches on both threads
  (about 0.8 futex calls per write). One ``lio_listio`` call hands glibc the whole
  batch: its helper thread runs the ``pwrite``s without the GIL, the writer takes the
  GIL back once.
* **Order.** Only writes that do not overlap each other go into one call (the caller
  checks), so their order does not matter; overlapping writes keep going one after the
  other, in queue order.
* **Cost.** The requests live in one preallocated array; per write the Python side
  packs four fields (``struct.pack_into``; a ``bytes`` payload's address is CPython's
  object address plus its header) and reads two back, about a microsecond.
* **Errors and short writes** are read per request (the fields glibc's ``aio_error`` /
  ``aio_return`` read);
  the caller redoes such a write with a plain ``pwrite`` to get its exception or to
  finish it. Where glibc's AIO is missing (another libc, another layout) ``available``
  is False and the caller writes one by one as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import platform
import struct
import sys
from collections.abc import Sequence

LIO_WRITE = 1
LIO_WAIT = 0
SIGEV_NONE = 1
#: requests per call: glibc takes any number; more only costs a longer array
MAX_REQUESTS = 1024


class Aiocb(ctypes.Structure):
    """glibc's ``struct aiocb`` on 64-bit Linux (``<aio.h>``: 168 bytes)."""

    _fields_ = [
        ("aio_fildes", ctypes.c_int),
        ("aio_lio_opcode", ctypes.c_int),
        ("aio_reqprio", ctypes.c_int),
        ("aio_buf", ctypes.c_void_p),
        ("aio_nbytes", ctypes.c_size_t),
        ("sigev_value", ctypes.c_void_p),
        ("sigev_signo", ctypes.c_int),
        ("sigev_notify", ctypes.c_int),
        ("_sigev_rest", ctypes.c_byte * 48),
        ("_next_prio", ctypes.c_void_p),
        ("_abs_prio", ctypes.c_int),
        ("_policy", ctypes.c_int),
        ("_error_code", ctypes.c_int),
        ("_return_value", ctypes.c_ssize_t),
        ("aio_offset", ctypes.c_int64),
        ("_reserved", ctypes.c_byte * 32),
    ]


def _load() -> ctypes.CDLL | None:
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc" or ctypes.sizeof(ctypes.c_void_p) != 8:
        return None
    if ctypes.sizeof(Aiocb) != 168:  # pragma: no cover - the layout above is glibc's on 64 bits
        return None
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        nogil = ctypes.CDLL(name, use_errno=True)  # lio_listio: the GIL is released
        lio = nogil.lio_listio
        suspend = nogil.aio_suspend
    except (OSError, AttributeError):  # pragma: no cover - glibc < 2.34 keeps them in librt
        return None
    lio.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    lio.restype = ctypes.c_int
    suspend.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
    suspend.restype = ctypes.c_int
    return nogil


_LIBS = _load()
available = _LIBS is not None and sys.implementation.name == "cpython"
# where the fields the Python side fills or reads lie in each request (the layout above;
# the error and result fields are what aio_error / aio_return read in glibc)
_SIZE = ctypes.sizeof(Aiocb)
_BUF_AT = Aiocb.aio_buf.offset  # aio_buf, aio_nbytes
_OFFSET_AT = Aiocb.aio_offset.offset
_ERROR_AT = Aiocb._error_code.offset  # __error_code, (pad), __return_value
#: our mark in the error field before the call: glibc sets EINPROGRESS when it queues a
#: request, so a request still marked was never queued (and never runs)
_UNQUEUED = 0x7FFF_FFFF
_PUT = struct.Struct("=QQ")
_OFF = struct.Struct("=q")
_RES = struct.Struct("=i4xq")
#: CPython: where a bytes object's data begins (the object's header size)
_BYTES_DATA = sys.getsizeof(b"") - 1
assert Aiocb._return_value.offset == _ERROR_AT + 8 and Aiocb.aio_nbytes.offset == _BUF_AT + 8


class WriteList:
    """A reusable array of requests for one file descriptor (one per writer thread:
    not thread-safe). :meth:`write` costs one system-call round trip through glibc's
    helper thread for the whole list, plus about a microsecond of Python per write."""

    def __init__(self, fd: int) -> None:
        if _LIBS is None:
            raise OSError(errno.ENOSYS, "lio_listio is not available here")
        self._fd = fd
        self._cbs = (Aiocb * MAX_REQUESTS)()
        self._ptrs = (ctypes.c_void_p * MAX_REQUESTS)()
        base = ctypes.addressof(self._cbs)
        size = ctypes.sizeof(Aiocb)
        for i in range(MAX_REQUESTS):
            cb = self._cbs[i]
            cb.aio_fildes = fd
            cb.aio_lio_opcode = LIO_WRITE
            cb.sigev_notify = SIGEV_NONE
            self._ptrs[i] = base + i * size
        self._lio = _LIBS.lio_listio
        self._suspend = _LIBS.aio_suspend
        self._mem = memoryview(self._cbs).cast("B")

    def write(self, items: Sequence[tuple[bytes | bytearray, int]]) -> list[int]:
        """Write each ``(data, offset)`` of *items* (at most MAX_REQUESTS, none
        overlapping another) and wait for all of them. Returns per item 0 (written
        whole) or an errno; ``-1``: written short (the caller finishes it)."""
        n = len(items)
        mem = self._mem
        put = _PUT.pack_into
        keep: list[object] = []  # views of bytearrays: alive until the call returns
        at = 0
        for data, offset in items:
            if type(data) is bytes:
                addr = id(data) + _BYTES_DATA  # CPython: the bytes object's own buffer
            else:
                view = (ctypes.c_char * len(data)).from_buffer(data)
                keep.append(view)
                addr = ctypes.addressof(view)
            put(mem, at + _BUF_AT, addr, len(data))
            _OFF.pack_into(mem, at + _OFFSET_AT, offset)
            _RES.pack_into(mem, at + _ERROR_AT, _UNQUEUED, -1)
            at += _SIZE
        rc = self._lio(LIO_WAIT, self._ptrs, n, None)
        failed = ctypes.get_errno() or errno.EIO if rc else 0
        out = [0] * n
        at = 0
        get = _RES.unpack_from
        for i in range(n):
            e, r = get(mem, at + _ERROR_AT)
            while e == errno.EINPROGRESS:  # queued, and a signal ended the wait early
                self._suspend(ctypes.byref(self._ptrs, i * ctypes.sizeof(ctypes.c_void_p)), 1, None)
                e, r = get(mem, at + _ERROR_AT)
            if e == _UNQUEUED:  # glibc could not queue it (EAGAIN, ...): it never ran
                out[i] = failed or errno.EIO
            elif e:
                out[i] = e
            elif r != len(items[i][0]):
                out[i] = -1
            at += _SIZE
        del keep
        return out


def disjoint(spans: Sequence[tuple[int, int]]) -> bool:
    """True when no two ``(offset, length)`` spans overlap: O(n log n)."""
    s = sorted(spans)
    end = -1
    for off, ln in s:
        if off < end:
            return False
        end = off + ln
    return True


__all__ = ["MAX_REQUESTS", "WriteList", "available", "disjoint"]
