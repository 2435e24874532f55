"""tools.bench.tier_bench's rig helpers (no RGW needed): the core split and the file
system a directory lives on (what the ``--control-store`` rows and notes name)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.bench.tier_bench import fs_type, split_cores


def test_split_cores_halves_rounding_up_for_cdp() -> None:
    sp = split_cores({0, 1, 2})
    assert sp is not None and (sp.cdp, sp.rgw) == ((0, 1), (2,))
    assert split_cores({3}) is None
    assert "cdp {0}, RGW daemons {1}" in split_cores({0, 1}).note()  # type: ignore[union-attr]


def test_fs_type_names_the_longest_mount(tmp_path: Path) -> None:
    assert fs_type(Path("/proc/self")) == "proc"
    assert fs_type(tmp_path) != "?"
    if not Path("/dev/shm").is_dir() or fs_type(Path("/dev/shm")) != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    assert fs_type(Path("/dev/shm")) == "tmpfs"
