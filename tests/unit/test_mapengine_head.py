"""A clean close keeps the head (``maps/HEAD``, FORMATS.md "HEAD") and the next open
reads it instead of rebuilding it from the maps, only when it is whole and tagged with
exactly the manifest it was built from; it is removed at open, read or not."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np

from mapengine import MapHistory, MergePolicy
from mapengine.core import Columns
from mapengine.epoch import flat_upto
from mapengine.storage import HEAD, decode_head, encode_head

POLICY = MergePolicy(fanout=2, l0_max_writes=8, full_every=4)

# two entries: [0, 4096) -> seq 11 at loc 7, [4096, 8192) zeros from seq 12
GOLDEN_HEAD = bytes.fromhex(
    "4344504845414400" "01000000" "00000000"  # magic "CDPHEAD\0", version 1, reserved
    "0500000000000000" "1400000000000000"     # manifest gen 5, sealed_seq 20
    "0200000000000000" "b0d5ba1e" "d906016f"   # count 2, body crc32, header crc32
    "0000000000000000" "0010000000000000"     # starts
    "0010000000000000" "0020000000000000"     # ends
    "0b00000000000000" "0c00000000000000"     # seqs
    "0700000000000000" "ffffffffffffffff"     # locs (-1: zero)
    "0000000000000000" "0000000000000000"     # poffs
)


def _cols(*rows: tuple[int, ...]) -> Columns:
    return Columns(*(np.array(c, dtype=np.int64) for c in zip(*rows, strict=True)))


def test_golden_head() -> None:
    c = _cols((0, 4096, 11, 7, 0), (4096, 8192, 12, -1, 0))
    assert encode_head(5, 20, c) == GOLDEN_HEAD
    got = decode_head(GOLDEN_HEAD, 5, 20)
    assert got is not None and all(np.array_equal(a, b) for a, b in zip(got, c, strict=True))
    assert decode_head(GOLDEN_HEAD, 6, 20) is None and decode_head(GOLDEN_HEAD, 5, 21) is None
    for i in range(len(GOLDEN_HEAD)):
        bad = bytearray(GOLDEN_HEAD)
        bad[i] ^= 0x10
        assert decode_head(bytes(bad), 5, 20) is None, i


def _history(path: Path, writes: int, seed: int = 1, h: MapHistory | None = None,
             first_seq: int = 1) -> MapHistory:
    h = h or MapHistory.open(path, policy=POLICY)
    rng = random.Random(seed)
    for s in range(first_seq, first_seq + writes):
        a = rng.randrange(0, 256) * 512
        if h.add_write(s, a, a + rng.choice((512, 1024, 4096)), s * 10):
            h.seal()
    h.seal()
    return h


def _rebuilt(h: MapHistory) -> Columns:
    ep = h._epochs[-1]
    return flat_upto(ep, len(ep.windows), h._f, h._maxk)


def _same(a: Columns, b: Columns) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))


def test_clean_close_keeps_the_head_and_open_takes_it(tmp_path: Path) -> None:
    h = _history(tmp_path, 300)
    h.add_rewind(301, 120)
    _history(tmp_path, 50, seed=2, h=h, first_seq=302)
    assert h._recent.n and h._head.n  # both tiers go into HEAD
    h.close()
    assert (tmp_path / HEAD).exists()
    h = MapHistory.open(tmp_path, policy=POLICY)
    assert not (tmp_path / HEAD).exists()  # taken, and gone
    assert h._recent.n == 0 and _same(h._head, _rebuilt(h))
    h._check()
    expect = [tuple(e) for e in h.resolve(351, 0, 256 * 512)]
    h.close()
    h = MapHistory.open(tmp_path, policy=POLICY)
    assert [tuple(e) for e in h.resolve(351, 0, 256 * 512)] == expect
    h.close()


def test_a_head_of_other_maps_is_not_taken(tmp_path: Path) -> None:
    """A HEAD tagged with an older manifest (a crash after a reopen that sealed more: no
    clean close rewrote it) or damaged is removed and the head rebuilt."""
    h = _history(tmp_path, 200)
    h.close()
    stale = (tmp_path / HEAD).read_bytes()
    h = MapHistory.open(tmp_path, policy=POLICY)
    _history(tmp_path, 40, seed=3, h=h, first_seq=201)
    h._store.close()  # a crash: no clean close, no HEAD
    assert not (tmp_path / HEAD).exists()
    (tmp_path / HEAD).write_bytes(stale)
    h = MapHistory.open(tmp_path, policy=POLICY)
    assert not (tmp_path / HEAD).exists() and _same(h._head, _rebuilt(h))
    h._check()
    h.close()
    data = bytearray((tmp_path / HEAD).read_bytes())
    data[100] ^= 1
    (tmp_path / HEAD).write_bytes(bytes(data))
    h = MapHistory.open(tmp_path, policy=POLICY)
    assert not (tmp_path / HEAD).exists() and _same(h._head, _rebuilt(h))
    h._check()
    h.close()


def test_unsealed_writes_keep_no_head(tmp_path: Path) -> None:
    h = _history(tmp_path, 100)
    h.add_write(101, 0, 512, 1010)
    h.close()  # the unsealed write is replayed from the journal at the next open
    assert not (tmp_path / HEAD).exists()
