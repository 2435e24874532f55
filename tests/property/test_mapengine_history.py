"""Property tests: MapHistory against a per-byte model, over random histories.

Histories mix writes, zeroes, markers, chained rewinds, seals and reopens; at random
points and ranges ``resolve`` must equal the model and ``changed`` must cover every byte
that differs while staying inside the bytes written between the points. Runs replay
exactly (``derandomize=True``).
"""

from __future__ import annotations

import random
import tempfile
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mapengine import MapHistory, MergePolicy
from tests.property.test_mapengine_model import Model, check_changed, check_resolve, feed

SIZE = 96

op = st.one_of(
    st.tuples(st.just("W"), st.integers(0, SIZE - 1), st.integers(1, 40)),
    st.tuples(st.just("W"), st.integers(0, SIZE - 1), st.integers(1, 4)),
    st.tuples(st.just("Z"), st.integers(0, SIZE - 1), st.integers(1, 30)),
    st.tuples(st.just("N"), st.just(0), st.just(0)),
    st.tuples(st.just("R"), st.integers(0, 1000), st.just(0)),
    st.tuples(st.just("S"), st.just(0), st.just(0)),
    st.tuples(st.just("O"), st.just(0), st.just(0)),
    st.tuples(st.just("C"), st.integers(0, 1000), st.integers(0, 1000)),
)

policies = st.sampled_from(
    [
        MergePolicy(fanout=2, l0_max_writes=2, full_every=0),
        MergePolicy(fanout=2, l0_max_writes=3, full_every=4),
        MergePolicy(fanout=3, l0_max_writes=2, full_every=9),
        MergePolicy(fanout=2, l0_max_writes=1, full_every=3),
        MergePolicy(fanout=4, l0_max_writes=5, full_every=16),
        MergePolicy(fanout=2, l0_max_writes=4, full_every=8),
    ]
)


def run_history(
    ops: list[tuple[str, int, int]], policy: MergePolicy, seed: int, directory: str | None
) -> None:
    rnd = random.Random(seed)
    m = Model(SIZE)
    h = MapHistory.open(directory, policy=policy)
    seq = 0

    def check_point(x: int) -> None:
        a = rnd.randrange(SIZE)
        b = rnd.randint(a, SIZE)
        check_resolve(h, m, x, 0, SIZE)
        check_resolve(h, m, x, a, b)

    for kind, p1, p2 in ops:
        sealed = h.sealed_seq
        seq += rnd.choice((1, 1, 1, 2, 5))
        if kind == "W":
            a, b = p1, min(SIZE, p1 + p2)
            m.write(seq, a, b, 1000 * seq)
            due = h.add_write(seq, a, b, 1000 * seq)
            if due:
                h.seal()
        elif kind == "Z":
            a, b = p1, min(SIZE, p1 + p2)
            m.zero(seq, a, b)
            if h.add_zero(seq, a, b):
                h.seal()
        elif kind == "N":
            m.note(seq)
            h.note_seq(seq)
        elif kind == "R":
            target = p1 * m.last // 1000
            m.rewind(seq, target)
            h.add_rewind(seq, target)
        elif kind == "S":
            h.seal()
        elif kind == "O":
            if directory is not None:
                h.close()
                h = MapHistory.open(directory, policy=policy)
                for rec in m.records:
                    if rec[1] > h.sealed_seq:
                        feed(h, rec)
        else:
            x, y = p1 * m.last // 1000, p2 * m.last // 1000
            check_point(x)
            a = rnd.randrange(SIZE)
            check_changed(h, m, x, y, a, rnd.randint(a, SIZE))
        # the deep check (every map loaded, the head rebuilt from them) after every op
        # that can change the maps: a seal, a rewind, a reopen; the others change only
        # the live window, which the shallow check covers (half the run time before)
        h._check(deep=kind in "SRO" or h.sealed_seq != sealed)
    # final sweep: every point, plus random diffs
    for x in range(m.last + 1):
        check_point(x)
    pts = list(range(m.last + 1))
    for _ in range(12):
        x, y = rnd.choice(pts), rnd.choice(pts)
        check_changed(h, m, x, y, 0, SIZE)
        a = rnd.randrange(SIZE)
        check_changed(h, m, x, y, a, rnd.randint(a, SIZE))
    h.seal()
    h._check(deep=True)
    for _ in range(8):
        check_point(rnd.choice(pts))
    h.close()


COMMON: dict[str, Any] = dict(
    derandomize=True,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


@settings(max_examples=3000, **COMMON)
@given(ops=st.lists(op, max_size=60), policy=policies, seed=st.integers(0, 2**32))
def test_memory_histories(ops: list[tuple[str, int, int]], policy: MergePolicy, seed: int) -> None:
    run_history(ops, policy, seed, None)


@settings(max_examples=400, **COMMON)
@given(ops=st.lists(op, min_size=30, max_size=120), policy=policies, seed=st.integers(0, 2**32))
def test_long_memory_histories(
    ops: list[tuple[str, int, int]], policy: MergePolicy, seed: int
) -> None:
    run_history(ops, policy, seed, None)


@settings(max_examples=600, **COMMON)
@given(ops=st.lists(op, max_size=60), policy=policies, seed=st.integers(0, 2**32))
def test_persistent_histories(
    ops: list[tuple[str, int, int]], policy: MergePolicy, seed: int
) -> None:
    with tempfile.TemporaryDirectory() as d:
        run_history(ops, policy, seed, d)


def test_rewind_chain_example() -> None:
    """Rewind, write, rewind to before the first rewind, rewind past an earlier rewind."""
    ops = [
        ("W", 0, 40),
        ("W", 10, 10),
        ("S", 0, 0),
        ("W", 50, 20),
        ("R", 300, 0),
        ("W", 5, 3),
        ("R", 100, 0),
        ("W", 60, 5),
        ("R", 800, 0),
        ("W", 0, 2),
        ("C", 1000, 0),
        ("C", 500, 900),
    ]
    with tempfile.TemporaryDirectory() as d:
        for directory in (None, d):
            run_history(ops, MergePolicy(fanout=2, l0_max_writes=1, full_every=4), 7, directory)
