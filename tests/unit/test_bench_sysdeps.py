"""`python -m tools.bench` checks the system tools its suites drive before it runs any
(issue 28, item 15): one message naming what is missing and how to install it, no
traceback. The tool table comes from tools/install-system-deps.sh itself."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tools.bench.__main__ import SUITES
from tools.bench.sysdeps import (
    QEMU_ISCSI,
    SUITE_TOOLS,
    missing,
    script_extra_files,
    script_packages,
)


def test_the_table_is_read_from_the_install_script() -> None:
    pkgs = script_packages()
    assert pkgs["tgtd"] == "tgt" and pkgs["nbdkit"] == "nbdkit" and pkgs["fls"] == "sleuthkit"
    assert script_extra_files() == ["/usr/lib/x86_64-linux-gnu/qemu/block-iscsi.so"]
    assert set(SUITE_TOOLS) <= set(SUITES)


def test_every_tool_a_suite_needs_has_a_package() -> None:
    lacking = missing(SUITES, which=lambda _t: None, exists=lambda _p: False)
    assert "?" not in lacking.values(), lacking
    assert lacking[QEMU_ISCSI] == "qemu-block-extra" and lacking["tgtd"] == "tgt"
    assert missing(["journal", "mapengine"], which=lambda _t: None, exists=lambda _p: False) == {}


def test_missing_tools_are_named_without_a_traceback(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=str(tmp_path))  # no system tool on PATH
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--out", str(tmp_path / "out"), "iscsi"],
        capture_output=True, text=True, env=env, timeout=120,
        cwd=Path(__file__).resolve().parents[2],
    )
    assert r.returncode == 1
    assert "Traceback" not in r.stderr + r.stdout
    assert "missing system tools:" in r.stderr and "tgtd" in r.stderr and "iscsi-perf" in r.stderr
    assert "make sysdeps" in r.stderr and "apt-get install" in r.stderr and "libiscsi-bin" in r.stderr
    assert not (tmp_path / "out").exists()  # nothing ran
