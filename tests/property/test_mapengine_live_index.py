"""Property test of the head read path (live-window bucket index, single-entry fast path)
against the per-byte model, over a large address space.

The model works in units; unit ``u`` is volume bytes ``[u·K, (u+1)·K)`` for a scale ``K``
chosen so that entries land in many buckets and on several index levels. Partial seals
(``seal(upto)``), which shift the live window, are mixed in.
"""

from __future__ import annotations

import random
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapengine import Extent, MapHistory, MergePolicy

from .test_mapengine_model import Model, assert_extents

SIZE = 64

op = st.one_of(
    st.tuples(st.just("W"), st.integers(0, SIZE - 1), st.integers(1, 3)),
    st.tuples(st.just("W"), st.integers(0, SIZE - 1), st.integers(1, SIZE)),
    st.tuples(st.just("Z"), st.integers(0, SIZE - 1), st.integers(1, 20)),
    st.tuples(st.just("N"), st.just(0), st.just(0)),
    st.tuples(st.just("R"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("S"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("C"), st.integers(0, 1000), st.just(0)),
)

scales = st.sampled_from([1, 4096, 3 << 14, 1 << 18, 5 << 20, 1 << 30, 7 << 36])
policies = st.sampled_from(
    [
        MergePolicy(fanout=2, l0_max_writes=8, full_every=4),
        MergePolicy(fanout=3, l0_max_writes=40, full_every=9),
        MergePolicy(fanout=2, l0_max_writes=200, full_every=0),
    ]
)


def _units(got: list[Extent], k: int) -> list[Extent]:
    out = []
    for e in got:
        assert e.start % k == 0 and e.end % k == 0 and e.poff % k == 0, e
        out.append(Extent(e.start // k, e.end // k, e.seq, e.loc, e.poff // k))
    return out


def _check(h: MapHistory, m: Model, k: int, x: int, a: int, b: int) -> None:
    got = h.resolve(x, a * k, b * k)
    assert_extents(_units(got, k), m.state(x), a, b)
    if x == h.last_seq and a < b:
        # resolve_head: None, or exactly the one extent resolve gives
        e = h.resolve_head(a * k, b * k)
        assert e is None or [e] == got, (e, got)


@settings(
    max_examples=600,
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(
    ops=st.lists(op, max_size=120),
    k=scales,
    policy=policies,
    seed=st.integers(0, 2**32),
    on_disk=st.booleans(),
)
def test_head_reads_against_model(
    ops: list[tuple[str, int, int]], k: int, policy: MergePolicy, seed: int, on_disk: bool
) -> None:
    rnd = random.Random(seed)
    m = Model(SIZE)
    with tempfile.TemporaryDirectory() as d:
        h = MapHistory.open(d if on_disk else None, policy=policy)
        seq = 0
        for kind, p1, p2 in ops:
            seq += 1
            if kind in "WZ":
                a, b = p1, min(SIZE, p1 + p2)
                if kind == "W":
                    m.write(seq, a, b, 1000 * seq)
                    due = h.add_write(seq, a * k, b * k, 1000 * seq)
                else:
                    m.zero(seq, a, b)
                    due = h.add_zero(seq, a * k, b * k)
                if due:
                    h.seal()
            elif kind == "N":
                m.note(seq)
                h.note_seq(seq)
            elif kind == "R":
                target = p1 * m.last // 1000
                m.rewind(seq, target)
                h.add_rewind(seq, target)
            elif kind == "S":
                seq -= 1
                lo = h.sealed_seq
                h.seal(lo + p1 * (h.last_seq - lo) // 1000)
            else:
                seq -= 1
                # small ranges at the head (the fast path), then anything anywhere
                for _ in range(4):
                    a = rnd.randrange(SIZE)
                    _check(h, m, k, m.last, a, min(SIZE, a + rnd.choice((1, 1, 2, 5))))
                a = rnd.randrange(SIZE)
                _check(h, m, k, m.last, a, rnd.randint(a, SIZE))
                _check(h, m, k, p1 * m.last // 1000, a, rnd.randint(a, SIZE))
                h._check(deep=False)
        for a in range(SIZE):
            _check(h, m, k, m.last, a, a + 1)
        _check(h, m, k, m.last, 0, SIZE)
        h._check(deep=True)
        h.close()
