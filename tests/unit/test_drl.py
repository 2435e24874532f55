"""The dirty region log file: create/open round trips, page-granular writes, damaged
headers (everything dirty), bad sizes."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cdp.errors import Corruption, UsageError
from cdp.proxy.drl import PAGE, DirtyRegionLog, read_drl


def test_round_trip_bits_and_header_fields(tmp_path: Path) -> None:
    p = tmp_path / "drl"
    d = DirtyRegionLog.create(p, 10 * (1 << 30) + 512, 1 << 20)
    assert d.regions == 10 * 1024 + 1 and d.dirty_count == 0 and d.copy_next == 0
    assert list(d.regions_of(0, 1)) == [0]
    assert list(d.regions_of((1 << 20) - 1, 2)) == [0, 1]
    assert list(d.regions_of(5, 0)) == []
    assert d.region_range(d.regions - 1) == (10 << 30, (10 << 30) + 512)
    assert d.mark([3, 40000 % d.regions, 3]) == [3, 40000 % d.regions]
    d.set_copy_next(77)
    d.set_rewind_from(1234)
    pages = d.pending_pages()
    assert pages[0][0] == 0 and all(len(b) == PAGE for _, b in pages)
    d.write(pages)
    assert d.pending_pages() == []
    d.close()
    info = read_drl(p)
    assert info["dirty"] == sorted([3, 40000 % (10 * 1024 + 1)])
    assert (info["copy_next"], info["rewind_from"], info["header_damaged"]) == (77, 1234, False)
    d = DirtyRegionLog.open(p)
    assert d.clear([3, 5]) == 1
    d.sync()
    d.close()
    assert read_drl(p)["dirty"] == [40000 % (10 * 1024 + 1)]


def test_only_changed_pages_are_written(tmp_path: Path) -> None:
    d = DirtyRegionLog.create(tmp_path / "drl", 1 << 40, 1 << 20)  # 1M regions, 32 pages
    d.mark([0, 1, (1 << 15) + 1])
    pages = d.pending_pages()
    assert [off for off, _ in pages] == [PAGE, 2 * PAGE]
    d.write(pages)
    d.close()


def test_damaged_header_means_everything_dirty_and_copy_restarts(tmp_path: Path) -> None:
    p = tmp_path / "drl"
    d = DirtyRegionLog.create(p, 64 << 20, 1 << 20, copy_next=64)
    d.close()
    fd = os.open(p, os.O_RDWR)
    os.pwrite(fd, b"\xff", 100)  # inside the header page, outside the fields
    os.close(fd)
    d = DirtyRegionLog.open(p)
    assert d.header_damaged and d.dirty_count == 64 and d.copy_next == 0
    d.sync()  # rewritten with a good CRC
    d.close()
    assert read_drl(p)["header_damaged"] is False


def test_not_a_drl_and_bad_region_sizes(tmp_path: Path) -> None:
    p = tmp_path / "drl"
    p.write_bytes(b"garbage" * 1000)
    with pytest.raises(Corruption):
        DirtyRegionLog.open(p)
    for bad in (1000, 3 << 20, 2048, 2 << 30):
        with pytest.raises(UsageError):
            DirtyRegionLog.create(tmp_path / "x", 1 << 30, bad)
