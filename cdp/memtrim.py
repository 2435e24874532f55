"""Give the allocator's free pages back to the system after seals (issue 27).

Design notes
------------
* A long-running cdpd frees large numpy arrays at every seal (the window's sort
  columns, the head tiers a splice replaces: the big head splice allocates a new head
  of 40 bytes per mapped extent every 64 windows). glibc serves arrays under its
  dynamic mmap threshold (which rises to 32 MiB after the first large free) from the
  heap, and a freed chunk that is not at the heap's top stays resident: up to ~140 MiB
  above the caches' accounted bytes after millions of writes (issue 27's probes).
* A fixed ``MALLOC_MMAP_THRESHOLD_`` (256 KiB, 1 MiB) took that away but cost ~15 %
  more CPU (every large array a fresh mmap, its pages faulted in again). Instead
  :func:`after_seal` calls glibc's ``malloc_trim(0)`` (it ``madvise``\\ s the free
  pages of every arena back, wherever they are in the heap) after a seal, at most once
  per :data:`interval` seconds process-wide, so a cdpd of 64 volumes trims as often as
  one of one volume.
* Cost: one walk of the arenas' free chunks, 13-17 ms on average while ingesting
  (``scale_bench --rss-ingest``: 0.43 s in 32 trims over 7.5M writes, 0.6 % of the
  process's CPU), on the caller's thread: the event loop, which a seal already holds
  for longer. ``calls`` and ``seconds`` count it (metrics ``cdp_malloc_trims_total``,
  ``cdp_malloc_trim_seconds_total``). Without glibc (musl, macOS) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
from collections.abc import Callable

#: seconds between two trims at least (0: never trim)
interval = 10.0
#: trims done, and the seconds they took
calls = 0
seconds = 0.0
_last = float("-inf")


def _load() -> Callable[[int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        fn = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_size_t]
    fn.restype = ctypes.c_int
    return fn


_trim = _load()


def available() -> bool:
    """True when the C library has ``malloc_trim`` (glibc)."""
    return _trim is not None


def trim() -> float:
    """``malloc_trim(0)`` now; returns the seconds it took (0.0 without glibc)."""
    global calls, seconds
    if _trim is None:
        return 0.0
    t0 = time.perf_counter()
    _trim(0)
    dt = time.perf_counter() - t0
    calls += 1
    seconds += dt
    return dt


def after_seal(now: float | None = None) -> bool:
    """A seal freed its temporaries: trim when :data:`interval` seconds have passed
    since the last trim. Returns whether it trimmed. O(1) when it does not."""
    global _last
    if interval <= 0 or _trim is None:
        return False
    now = time.monotonic() if now is None else now
    if now - _last < interval:
        return False
    _last = now
    trim()
    return True
