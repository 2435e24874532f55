"""Property tests of MapHistory.retain against a replay model.

Random histories (writes, zeroes, rewinds, seals at random places) and random retained
sets: every retained point (and every point at or after ``keep_after``) resolves exactly
as before, expired points are refused, and the dropped fragments are exactly the journal
bytes no longer referenced: disjoint from what retained points reference, and together
with ``live_fragments()`` they make up every byte ever written.
"""

from __future__ import annotations

import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapengine import MapExpired, MapHistory, MergePolicy
from mapengine.core import ZERO_LOC

V = 48  # volume size in units (one unit = one byte here)

op = st.one_of(
    st.tuples(st.just("w"), st.integers(0, V - 1), st.integers(1, 16)),
    st.tuples(st.just("z"), st.integers(0, V - 1), st.integers(1, 16)),
    st.tuples(st.just("s"), st.just(0), st.just(0)),
    st.tuples(st.just("r"), st.integers(0, 10_000), st.just(0)),
    st.tuples(st.just("m"), st.just(0), st.just(0)),
)


def _run(ops: list[tuple[str, int, int]], h: MapHistory) -> list[list[tuple[int, int, int]]]:
    """Feed ops; return the model state after every seq (index = seq)."""
    state: list[list[tuple[int, int, int]]] = [[(0, -2, 0)] * V]
    seq = 0
    for kind, a, n in ops:
        cur = list(state[-1])
        if kind == "s":
            h.seal()
            continue
        seq += 1
        if kind == "w":
            b = min(V, a + n)
            h.add_write(seq, a, b, loc=seq * 1000)
            for i in range(a, b):
                cur[i] = (seq, seq * 1000, i - a)
        elif kind == "z":
            b = min(V, a + n)
            h.add_zero(seq, a, b)
            for i in range(a, b):
                cur[i] = (seq, ZERO_LOC, 0)
        elif kind == "r":
            tgt = a % seq
            h.add_rewind(seq, tgt)
            cur = list(state[tgt])
        else:
            h.note_seq(seq)
        state.append(cur)
    return state


def _units(h: MapHistory, p: int) -> list[tuple[int, int, int]]:
    out: list[tuple[int, int, int]] = []
    for e in h.resolve(p, 0, V):
        for i in range(e.start, e.end):
            if e.loc == -2:
                out.append((0, -2, 0))
            elif e.loc == ZERO_LOC:
                out.append((e.seq, ZERO_LOC, 0))
            else:
                out.append((e.seq, e.loc, e.poff + i - e.start))
    return out


def _refs(state: list[tuple[int, int, int]]) -> set[tuple[int, int]]:
    return {(q, po) for q, lc, po in state if lc >= 0}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=st.lists(op, min_size=1, max_size=70),
    picks=st.lists(st.integers(0, 10_000), max_size=12),
    cut=st.integers(0, 10_000),
    again=st.booleans(),
    on_disk=st.booleans(),
)
def test_retain_against_model(
    ops: list[tuple[str, int, int]], picks: list[int], cut: int, again: bool, on_disk: bool
) -> None:
    with tempfile.TemporaryDirectory() as d:
        pol = MergePolicy(fanout=2, l0_max_writes=4, full_every=4)
        h = MapHistory.open(d if on_disk else None, policy=pol)
        state = _run(ops, h)
        last = len(state) - 1
        if last == 0:
            return
        written: set[tuple[int, int]] = set()
        for q in range(1, last + 1):
            for s2, lc, po in state[q]:
                if s2 == q and lc >= 0:
                    written.add((s2, po))
        dropped: set[tuple[int, int]] = set()
        keep: set[int] = set()
        rounds = [(picks, cut)]
        if again:
            rounds.append((picks[::2], cut + 3))
        for pts, c in rounds:
            ka = c % (last + 1)
            pts = [p % (last + 1) for p in pts]
            pts = [p for p in pts if h.resolvable(p)]
            res = h.retain(pts, ka)
            h._check()
            ka = res.keep_after
            keep = set(res.retained) | set(range(ka, last + 1)) | {0}
            assert set(pts) - {0} <= set(res.retained) | set(range(ka, last + 1))
            for p in range(last + 1):
                if p in keep:
                    assert _units(h, p) == state[p], p
                    assert h.resolvable(p)
                else:
                    assert not h.resolvable(p)
                    try:
                        h.resolve(p, 0, V)
                    except MapExpired:
                        pass
                    else:
                        raise AssertionError(f"expired point {p} resolved")
            refs: set[tuple[int, int]] = set()
            for p in keep:
                refs |= _refs(state[p])
            now_dropped: set[tuple[int, int]] = set()
            for q, lc, po, ln in zip(res.dropped_seq.tolist(), res.dropped_loc.tolist(),
                                     res.dropped_poff.tolist(), res.dropped_len.tolist(),
                                     strict=True):
                assert lc == q * 1000
                for i in range(po, po + ln):
                    now_dropped.add((q, i))
            assert not (now_dropped & refs), "a retained point's bytes were dropped"
            assert not (now_dropped & dropped), "a fragment was dropped twice"
            dropped |= now_dropped
            live: set[tuple[int, int]] = set()
            for c in h.live_fragments():
                for s_, e_, q, po in zip(c.start.tolist(), c.end.tolist(), c.seq.tolist(),
                                         c.poff.tolist(), strict=True):
                    for i in range(e_ - s_):
                        live.add((q, po + i))
            assert refs <= live
            assert live | dropped == written
            assert not (live & dropped)
            if ka == last:
                assert live == refs, "retain up to the head must leave exactly the referenced bytes"
        if on_disk:
            h.close()
            h2 = MapHistory.open(d, policy=pol)
            for p in sorted(keep):
                assert _units(h2, p) == state[p]
            assert h2.retained == h.retained and h2.keep_after == h.keep_after
            h2._check()
            h2.close()
