"""The history-length scale bench (`python -m tools.bench scale`, issue 27) runs end to
end at a small point: history generated through the real write path, cdpd restarted
cleanly and after kill -9, reads of the live volume and a past point over NBD, the rows
and the plot written, and the store verifies. No timing is asserted: the curves come
from `python -m tools.bench scale` (1M and 10M writes), which takes far longer than a
test may. The point here is 50k writes, not 1M: 1M writes take ~90 s of ingest alone on
2 busy cores, before the three cdpd starts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import require_tool
from tools.bench import scale_bench
from tools.bench.__main__ import OPT_IN, SUITES


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_scale_bench_small_point(tmp_path: Path) -> None:
    require_tool("fio")
    assert "scale" in OPT_IN and "scale" not in SUITES  # long: only when named
    out = tmp_path / "out"
    rows = scale_bench.run(quick=True, out=out, writes=[50_000], scratch=tmp_path)
    assert [r["writes"] for r in rows] == [50_000]
    row = rows[0]
    assert row["verify_ok"] is True
    for key in ("rss_mib", "rss_start_mib", "restart_clean_s", "restart_kill9_s",
                "open_clean_s", "open_kill9_s", "read_live_p50_us", "read_past_p50_us",
                "past_region_ms", "changed_s", "changed_cli_s", "disk_mib", "segments",
                "nbd_clean_s", "nbd_kill9_s", "pieces_s", "read_past_warm_p50_us",
                "read_live_warm_p50_us"):
        assert isinstance(row[key], (int, float)) and row[key] >= 0, (key, row)
    assert row["disk_read_p50_us"] is None or row["disk_read_p50_us"] > 0
    for key in ("past_cached_pct", "live_cached_pct", "warm_cached_pct"):  # None without fincore
        assert row[key] is None or 0 <= row[key] <= 100, (key, row)
    # the whole hot area was written, and changed over the whole history says so
    assert row["changed_bytes_gib"] == pytest.approx(row["hot_gib"], abs=0.01)
    assert row["changed_ranges"] == 1
    assert json.loads((out / "scale.json").read_text())[0]["writes"] == 50_000
    assert (out / "scale.png").stat().st_size > 0


@pytest.mark.timeout(600)
def test_scale_bench_keeps_and_reuses_a_store(tmp_path: Path) -> None:
    """--store: a history built with --build-only is extended by a later run, checkpoints
    below what it holds are skipped, and one equal to it is measured as it is."""
    require_tool("fio")
    store = tmp_path / "hist"
    assert scale_bench.run(writes=[3_000], hot=1 << 20, store=store, build_only=True) == []
    state = json.loads((store / "scale-state.json").read_text())
    assert state == {"writes": 3_000, "hot": 1 << 20}
    assert scale_bench.run(writes=[2_000, 5_000], hot=1 << 30, store=store,
                           build_only=True) == []
    # the hot size is the store's, not the new argument's
    assert json.loads((store / "scale-state.json").read_text()) == {"writes": 5_000,
                                                                    "hot": 1 << 20}
    g = scale_bench.inproc(store / "cdp.toml")
    assert g["changed_ranges"] == 1 and g["pieces"] >= 1


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_rss_ingest_small(tmp_path: Path) -> None:
    """``--rss-ingest``: one process ingests into a fresh store without a restart; a row
    per stretch with its RSS and the allocator trims after seals (cdp.memtrim), the
    store removed after. Memory is not asserted (the curve is the bench's)."""
    from cdp import memtrim

    rows = scale_bench.rss_ingest(tmp_path, 60_000, 64 << 20, 20_000)
    assert [r["writes"] for r in rows] == [20_000, 40_000, 60_000]
    assert all(r["rss_mib"] > 0 and r["disk_mib"] > 0 for r in rows)
    if memtrim.available():
        assert rows[-1]["trims"] >= 1
    off = scale_bench.rss_ingest(tmp_path, 20_000, 64 << 20, 20_000, trim=False)
    assert off[0]["trims"] == rows[-1]["trims"]  # none more with the trims off
    assert memtrim.interval > 0  # restored
    assert not list(tmp_path.glob("cdp-scale-rss-*")), "the stores are removed"
