"""Golden documents for the store metadata files (docs/FORMATS.md ("Store layout"))."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cdp.config import Settings
from cdp.errors import Corruption
from cdp.markers import MARKERS_FORMAT, Marker, load_markers
from cdp.store import STORE_FORMAT, Store
from cdp.volume import VOLUME_FORMAT, Volume

GOLDEN_MARKERS = """{"format": 1, "next_id": 4,
 "markers": [{"id": 1, "seq": 57, "time_ns": 1732240000123456789, "label": "before-upgrade"},
             {"id": 3, "seq": 90, "time_ns": 1732240001000000000, "label": ""}]}"""


def test_format_numbers_never_change() -> None:
    assert (STORE_FORMAT, VOLUME_FORMAT, MARKERS_FORMAT) == (1, 1, 1)


def test_golden_markers_document(tmp_path: Path) -> None:
    p = tmp_path / "markers.json"
    p.write_text(GOLDEN_MARKERS)
    markers, next_id = load_markers(p)
    assert next_id == 4
    assert markers == [
        Marker(1, 57, 1732240000123456789, "before-upgrade"),
        Marker(3, 90, 1732240001000000000, ""),
    ]


def test_written_files_have_the_documented_keys(tmp_path: Path) -> None:
    import asyncio
    from dataclasses import replace

    s = replace(Settings(), store=tmp_path / "store")
    st = Store.open(s)
    vol = st.volumes["vol0"]

    async def snap() -> None:
        vol.write(0, b"x" * 512)
        await vol.snapshot("golden")

    asyncio.run(snap())
    st.close()
    store_doc = json.loads((tmp_path / "store" / "store.json").read_text())
    assert set(store_doc) == {"format", "uuid", "created_ns"} and store_doc["format"] == 1
    vdoc = json.loads((tmp_path / "store" / "volumes" / "vol0" / "volume.json").read_text())
    assert {"format", "name", "size", "uuid", "created_ns"} <= set(vdoc)
    mdoc = json.loads((tmp_path / "store" / "volumes" / "vol0" / "markers.json").read_text())
    assert set(mdoc) == {"format", "next_id", "markers"}
    assert set(mdoc["markers"][0]) == {"id", "seq", "time_ns", "label"}
    assert mdoc["markers"][0]["label"] == "golden" and mdoc["next_id"] == 2


@pytest.mark.parametrize("doc", ['{"format": 2, "next_id": 1, "markers": []}', "{not json", '{"format": 1}'])
def test_unknown_or_malformed_markers_are_corruption(tmp_path: Path, doc: str) -> None:
    p = tmp_path / "markers.json"
    p.write_text(doc)
    with pytest.raises(Corruption):
        load_markers(p)


def test_volume_refuses_unknown_format(tmp_path: Path) -> None:
    d = tmp_path / "v"
    d.mkdir()
    (d / "volume.json").write_text('{"format": 99, "name": "v", "size": 512}')
    with pytest.raises(Corruption, match="unsupported format 99"):
        Volume.open(d, Settings())
