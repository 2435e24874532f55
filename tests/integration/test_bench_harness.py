"""The benchmark harness works end to end (`python -m tools.bench --quick`): every suite
runs against its peer and lands in REPORT.md and results.json. No threshold is asserted
here: speed is measured by `make bench`, not by the test suite."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tools.bench.__main__ import SUITES


@pytest.mark.slow
@pytest.mark.timeout(900)  # every suite, quick: ~3 min on 2 busy cores
def test_quick_benchmark_run_writes_the_report(tmp_path: Path) -> None:
    require_tool("fio", "nbdkit", "tgtd", "iscsi-perf", "qemu-img", "mkntfs", "fls", "mkfs.ext4",
                 "fuse2fs")
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, "-m", "tools.bench", "--quick", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert set(results["suites"]) == set(SUITES)
    for suite, rows in results["suites"].items():
        assert isinstance(rows, list) and rows, f"{suite}: {rows}"
    summary = results["summary"]
    report = (out / "REPORT.md").read_text()
    assert "## Goals" in report
    judged = [row for rows in summary.values() for row in rows if row["verdict"] != "-"]
    # every goal of the table that has a workload in quick mode is judged
    assert len(judged) >= 12, judged
    for row in judged:
        assert row["verdict"] in ("pass", "short") and f"| {row['workload']} |" in report
