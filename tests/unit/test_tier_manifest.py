"""The tier's generation manifest (docs/FORMATS.md, "Tier generation manifest"): golden
bytes, round trip, the checks a reader makes, and the key layout (docs/TIER.md)."""

from __future__ import annotations

import hashlib
import json

import pytest

from cdp.errors import Corruption
from cdp.tier.manifest import (
    Manifest,
    SegmentObject,
    StateObject,
    generation_key,
    generation_of,
    segment_key,
    state_key,
)

SHA_A, SHA_C = "ab" * 32, "cd" * 32


def example() -> Manifest:
    return Manifest(
        generation=2, volume="vol0", volume_uuid="u-1", size=1 << 20, last_seq=9, created_ns=5,
        store_uuid="s-1",
        segments=[SegmentObject(segment_key("p/", "vol0", 1, SHA_A), 1, 9, 9, 4096, SHA_A)],
        state=[StateObject("markers.json", state_key("p/", "vol0", 2, "markers.json"), 40, SHA_C, 9)],
    )


#: pins format 1; change only with a new format number and FORMATS.md
GOLDEN_BODY_SHA256 = "1ad39e6279bf53e80dbb52ca2541676666ecd622eeccdcb81d79fefca82fd41c"


def test_golden() -> None:
    data = example().encode()
    doc = json.loads(data)
    assert doc["body_sha256"] == GOLDEN_BODY_SHA256
    assert list(doc) == sorted(doc)
    assert doc["format"] == 1 and doc["kind"] == "cdp-tier-generation"
    assert doc["segments"][0]["key"] == "p/volumes/vol0/segments/00000000000000000001-abababababababab"
    assert doc["state"][0]["key"] == "p/volumes/vol0/state/000000000002/markers.json"
    body = {k: v for k, v in doc.items() if k != "body_sha256"}
    compact = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(compact).hexdigest() == GOLDEN_BODY_SHA256
    assert data.endswith(b"}\n")


def test_roundtrip_and_refusals() -> None:
    m = example()
    assert Manifest.decode(m.encode(), "x") == m
    doc = json.loads(m.encode())
    for change, msg in (({"format": 2}, "format"), ({"kind": "other"}, "not a cdp tier"),
                        ({"last_seq": 10}, "checksum")):
        bad = json.dumps({**doc, **change}).encode()
        with pytest.raises(Corruption, match=msg):
            Manifest.decode(bad, "x")
    with pytest.raises(Corruption, match="not JSON"):
        Manifest.decode(b"{", "x")
    gap = Manifest(**{**m.__dict__, "segments": [
        SegmentObject("k1", 1, 9, 9, 1, SHA_A), SegmentObject("k2", 11, 12, 2, 1, SHA_A)],
        "last_seq": 12})
    with pytest.raises(Corruption, match="does not follow"):
        Manifest.decode(gap.encode(), "x")


def test_keys() -> None:
    assert generation_key("", "v", 7) == "volumes/v/generations/000000000007.json"
    assert generation_of(generation_key("a/b/", "v", 7)) == 7
    assert generation_of("volumes/v/generations/x.json") is None
    assert generation_of("volumes/v/segments/00000000000000000001-ab") is None
