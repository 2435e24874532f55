"""The scale-wide bench's catalog generator (tools/bench/scale_wide_bench.py) builds the
catalog it claims through the catalog's own update path: every file has one version per
marker, listings, histories and globs see them. Small size; no timing asserted."""

from __future__ import annotations

from pathlib import Path

from cdp.catalog.db import Catalog
from cdp.catalog.indexer import View
from tools.bench.scale_wide_bench import build_catalog, file_dir, file_name, query_catalog


def test_generated_catalog_holds_one_version_per_file_and_marker(tmp_path: Path) -> None:
    files, markers = 250, 3
    path = tmp_path / "catalog.sqlite"
    build_catalog(path, files, markers)
    cat = Catalog(path, readonly=True)
    try:
        assert [v.version for v in cat.versions()] == [1, 2, 3]
        assert [v.kind for v in cat.versions()] == ["full", "diff", "diff"]
        assert cat.versions()[1].stats["modified"] == files
        d, name = file_dir(123)[1], file_name(123)
        hist = cat.history(d, name)
        assert [(e.start, e.end, e.ref) for e in hist] == [(1, 2, 2), (2, 3, 3), (3, 0, 3)]
        assert len({e.size for e in hist}) > 1 or len({e.mtime for e in hist}) == 3
        listing = View(cat, 2).list_dir(d)
        assert len(listing) == 100 and all(e.start == 2 for e in listing)
        assert {e.name for e in View(cat, 1).list_dir("/data00")} == {"proj00000", "proj00001", "proj00002"}
        assert len(list(cat.glob(f"*_{123:06d}.*", on_path=False))) == markers
        n_files = cat.reader.execute("SELECT count(*) FROM entries WHERE is_dir = 0").fetchone()[0]
        assert n_files == files * markers
    finally:
        cat.close()
    q = query_catalog(path, files, markers, 3)
    assert q["files"]["rows"] == 100 or q["files"]["rows"] == 50  # the last directory holds 50
    assert q["versions"]["rows"] == markers
    assert q["find_any"]["rows"] == markers
