"""seal(upto): only entries with seq <= upto are sealed; newer ones stay live, resolve
is unchanged, and a reopen + replay of seqs after sealed_seq rebuilds the same state."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mapengine import MapHistory, MapUsageError, MergePolicy


def _feed(h: MapHistory, ops: list[tuple[int, int, int, int]]) -> None:
    for seq, a, b, loc in ops:
        if loc < 0:
            h.add_zero(seq, a, b)
        else:
            h.add_write(seq, a, b, loc)


def _ops(rng: random.Random, n: int) -> list[tuple[int, int, int, int]]:
    out = []
    for seq in range(1, n + 1):
        a = rng.randrange(0, 1 << 16)
        b = a + rng.randrange(1, 4096)
        out.append((seq, a, b, -1 if rng.random() < 0.1 else seq * 10))
    return out


@pytest.mark.parametrize("seed", range(6))
def test_partial_seals_match_full_seals(tmp_path: Path, seed: int) -> None:
    rng = random.Random(seed)
    ops = _ops(rng, 600)
    pol = MergePolicy(fanout=2, l0_max_writes=64, full_every=4)
    ref = MapHistory.open(None, pol)
    part = MapHistory.open(tmp_path / "m", pol)
    for i, op in enumerate(ops):
        _feed(ref, [op])
        _feed(part, [op])
        if rng.random() < 0.05:
            ref.seal()
        if rng.random() < 0.05:
            upto = rng.randrange(part.sealed_seq, part.last_seq + 1)
            part.seal(upto)
            assert part.sealed_seq == upto
            part._check(deep=True)
        if i % 97 == 0:
            for _ in range(5):
                s = rng.randrange(0, op[0] + 1)
                a = rng.randrange(0, 1 << 16)
                assert part.resolve(s, a, a + 8192) == ref.resolve(s, a, a + 8192)
    sealed = part.sealed_seq
    part.close()
    again = MapHistory.open(tmp_path / "m", pol)
    assert again.sealed_seq == sealed
    _feed(again, [op for op in ops if op[0] > sealed])
    for _ in range(50):
        s = rng.randrange(0, len(ops) + 1)
        a = rng.randrange(0, 1 << 16)
        assert again.resolve(s, a, a + 8192) == ref.resolve(s, a, a + 8192)
    again.close()


def test_seal_upto_bounds() -> None:
    h = MapHistory.open(None, MergePolicy(l0_max_writes=16))
    h.add_write(1, 0, 10, 5)
    h.add_write(2, 5, 20, 6)
    h.seal(1)
    assert h.sealed_seq == 1 and h.last_seq == 2
    with pytest.raises(MapUsageError):
        h.seal(0)
    with pytest.raises(MapUsageError):
        MapHistory.open(None).seal(3)
