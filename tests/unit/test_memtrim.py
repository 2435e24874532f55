"""cdp.memtrim: the allocator's free pages go back to the system after seals, at most
once per ``interval`` seconds per process."""

from __future__ import annotations

import pytest

from cdp import memtrim


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memtrim, "_last", float("-inf"))
    monkeypatch.setattr(memtrim, "interval", 10.0)


@pytest.mark.skipif(not memtrim.available(), reason="not glibc")
def test_after_seal_trims_at_most_once_per_interval(fresh: None) -> None:
    calls = memtrim.calls
    assert memtrim.after_seal(100.0)
    assert memtrim.calls == calls + 1 and memtrim.seconds > 0
    assert not memtrim.after_seal(105.0)  # 5 s later: too soon
    assert not memtrim.after_seal(109.9)
    assert memtrim.after_seal(110.0)
    assert memtrim.calls == calls + 2


def test_interval_zero_never_trims(fresh: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(memtrim, "interval", 0.0)
    calls = memtrim.calls
    assert not memtrim.after_seal(1e9)
    assert memtrim.calls == calls


@pytest.mark.skipif(not memtrim.available(), reason="not glibc")
def test_trim_gives_freed_heap_pages_back() -> None:
    """Memory freed in the middle of the heap is resident until a trim: what a long-
    running cdpd kept after each seal's large temporaries (issue 27)."""
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    # many 64 KiB blocks (under the mmap threshold: heap chunks), every other one freed
    # and a last one kept at the top, so the heap cannot shrink from its end
    blocks = [bytearray(64 << 10) for _ in range(2048)]
    keep = blocks[1::2]
    del blocks
    top = bytearray(64 << 10)
    before = rss_kib()
    memtrim.trim()
    after = rss_kib()
    assert before - after > 32 << 10, (before, after)  # > 32 MiB of the 64 freed
    del keep, top
