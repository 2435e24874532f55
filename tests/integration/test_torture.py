"""The torture rigs in short (docs/TORTURE.md): kill -9 during writes, markers, rewinds,
catalog diffs and map merges; power loss at every flush point of recorded histories.
Nothing acknowledged before a completed flush may be lost."""

from __future__ import annotations

import asyncio
import random
from pathlib import Path

from tests.conftest import require_tool
from tools.torture.killloop import KillLoop
from tools.torture.model import BLOCK, content
from tools.torture.powerloss import (
    Capture,
    _capture_dir,
    _capture_fs,
    _check_capture,
    _settings,
    open_volume,
    run_powerloss,
)


def test_kill9_loop(tmp_path: Path) -> None:
    require_tool("fio", "mkntfs", "ntfs-3g")
    kl = KillLoop(tmp_path, seed=11, size_mib=32, log=lambda m: None)
    t = kl.run(10)
    assert t.kills == 10
    assert t.blocks_checked > 1000
    assert t.problems == []
    assert t.lost == 0


def test_power_loss_at_every_flush_point() -> None:
    r = run_powerloss(2, seed=5, steps=200, log=lambda m: None)
    assert r["crashes"] > 50
    assert r["problems"] == []
    assert r["lost"] == 0


def test_power_loss_after_a_seal_between_flushes(tmp_path: Path) -> None:
    """Regression: a seal between two flushes wrote map files naming journal records
    that were not durable yet; after a power loss the volume refused every new write
    (MapUsageError: seq not after last seq) and its maps pointed past the journal."""
    from cdp.journal import CrashSimFS
    from mapengine.storage import FileOps
    from tools.torture.model import Model

    async def go() -> dict[str, object]:
        vdir = tmp_path / "vol"
        vdir.mkdir()
        (vdir / "volume.json").write_text(
            '{"format": 1, "name": "pl", "size": 1048576, "uuid": "0", "created_ns": 0}')
        settings = _settings(vdir)
        fs = CrashSimFS()
        vol = open_volume(vdir, fs, FileOps(), settings)
        vol.write(0, content(0, 1), False)
        await vol.flush()
        for i in range(1, 5):
            vol.write(i * BLOCK, content(i, 1 + i), False)
        vol.seal()  # no flush since the writes: only block 0 is promised
        m = Model(256)
        m.durable[0] = 1
        m.pending = {i: {1 + i} for i in range(1, 5)}
        cap = Capture("seal", _capture_fs(fs, random.Random(1), False), _capture_dir(vdir, {}),
                      m.durable, m.pending, {}, 1)
        vol.close()
        res: dict[str, object] = {"writes_checked": 0, "markers_checked": 0, "lost": 0, "problems": []}
        await _check_capture(vdir, cap, settings, 256, res)
        return res

    res = asyncio.run(go())
    assert res["problems"] == [] and res["lost"] == 0


def test_coverage_guided_fuzzers_run_clean(tmp_path: Path) -> None:
    """Every fuzz target runs a few seconds under atheris (coverage-guided, inputs from
    tests/fuzz_corpus): inputs execute, coverage grows, nothing escapes."""
    from tools.torture.fuzz import run_fuzz
    from tools.torture.fuzz_targets import TARGETS

    r = run_fuzz(3, list(TARGETS), tmp_path, log=lambda m: None, jobs=2)
    assert r["problems"] == []
    assert r["findings"] == 0
    for row in r["targets"]:
        assert row["executions"] > 50, row
        assert row["coverage"] and row["coverage"] > 5, row  # 0 when not instrumented


def test_fuzz_runner_reports_a_finding(tmp_path: Path) -> None:
    """The runner is not blind: a target that raises a foreign exception is a finding
    whose input is kept."""
    from tools.torture import fuzz_targets
    from tools.torture.fuzz import fuzz_one

    assert "selftest" not in fuzz_targets.TARGETS
    r = fuzz_one("selftest", 20, tmp_path, log=lambda m: None)
    assert r["findings"], r
    assert "planted" in r.get("error", ""), r
