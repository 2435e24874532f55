"""Property tests of the journal: round trips and power loss, against a simple model."""

from __future__ import annotations

import asyncio
import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import Corruption
from cdp.journal import CrashSimFS, Journal, ManualClock, RecordKind, verify_journal
from tests.helpers import assert_bytes_equal

D = "/p/journal"
T0 = 1_700_000_000_000_000_000

# an op: (kind, size, compressible, seed)
ops_st = st.lists(
    st.tuples(
        st.sampled_from(["write", "init", "zero", "marker", "rewind", "error"]),
        st.one_of(st.integers(0, 6000), st.sampled_from([65536, 65537, 150_000])),
        st.booleans(),
        st.integers(0, 2**32 - 1),
    ),
    min_size=1,
    max_size=60,
)


def _payload(size: int, compressible: bool, seed: int) -> bytes:
    rng = random.Random(seed)
    if compressible:
        return (rng.randbytes(16) * (size // 16 + 1))[:size]
    return rng.randbytes(size)


def _apply(j: Journal, op: tuple[str, int, bool, int]) -> tuple[int, int, tuple[object, ...]]:
    kind, size, comp, seed = op
    if kind in ("write", "init"):
        data = _payload(size, comp, seed)
        seq, loc = j.append_write(seed, data, init=kind == "init")
        return seq, loc, (RecordKind.INIT if kind == "init" else RecordKind.WRITE, seed, data)
    if kind == "zero":
        seq, loc = j.append_zero(seed, size)
        return seq, loc, (RecordKind.ZERO, seed, size)
    if kind == "marker":
        label = f"m{seed}-" + "é" * (size % 40)
        seq, loc = j.append_marker(seed, label)
        return seq, loc, (RecordKind.MARKER, seed, label)
    if kind == "rewind":
        target = seed % (j.last_seq + 1)
        seq, loc = j.append_rewind(target)
        return seq, loc, (RecordKind.REWIND, target)
    seq, loc = j.append_error(seed, seed * 2, size, f"failed {seed}")
    return seq, loc, (RecordKind.ERROR, seed, seed * 2, size, f"failed {seed}")


def _view(r: object) -> tuple[object, ...]:
    from cdp.journal import Record

    assert isinstance(r, Record)
    if r.kind in (RecordKind.WRITE, RecordKind.INIT):
        return (r.kind, r.offset, r.payload)
    if r.kind == RecordKind.ZERO:
        return (r.kind, r.offset, r.length)
    if r.kind == RecordKind.MARKER:
        return (r.kind, r.marker_id, r.label)
    if r.kind == RecordKind.REWIND:
        return (r.kind, r.target_seq)
    return (r.kind, r.error_code, r.offset, r.length, r.message)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=ops_st, seg_kib=st.sampled_from([4, 8, 64]), reopen_every=st.integers(5, 40))
def test_round_trip_with_reopen(
    ops: list[tuple[str, int, bool, int]], seg_kib: int, reopen_every: int
) -> None:
    fs = CrashSimFS()
    seg = seg_kib << 10
    j = Journal.open(D, segment_bytes=seg, fs=fs, clock=ManualClock(T0, tick=3))
    model: list[tuple[int, int, tuple[object, ...]]] = []
    for i, op in enumerate(ops):
        model.append(_apply(j, op))
        if i % reopen_every == reopen_every - 1:
            j.close()
            j = Journal.open(D, segment_bytes=seg, fs=fs, clock=ManualClock(T0, tick=3))
    for seq, loc, want in model:
        assert _view(j.read_record(seq, loc)) == want
    assert [(r.seq, r.loc) for r in j.scan()] == [(s, loc) for s, loc, _ in model]
    j.close()
    j = Journal.open(D, segment_bytes=seg, fs=fs)
    assert j.recovery.ok and j.recovery.dropped_bytes == 0
    assert [_view(r) for r in j.scan()] == [w for _s, _l, w in model]
    st_ = j.stats()
    assert st_.records == len(model)
    j.close()
    rep = verify_journal(D, fs=fs)
    assert rep.ok and rep.records == len(model)


crash_ops = st.lists(
    st.one_of(
        st.tuples(st.just("append"), st.one_of(st.integers(1, 3000), st.just(70_000)),
                  st.booleans(), st.integers(0, 2**20)),
        st.tuples(st.just("commit"), st.integers(1, 8), st.booleans(), st.integers(0, 0)),
        st.tuples(st.just("crash"), st.integers(0, 0), st.booleans(), st.integers(0, 0)),
    ),
    min_size=1,
    max_size=80,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=crash_ops, seed=st.integers(0, 1000))
def test_power_loss_keeps_every_committed_record(
    ops: list[tuple[str, int, bool, int]], seed: int
) -> None:
    fs = CrashSimFS(seed=seed)
    seg = 8192

    def reopen() -> Journal:
        return Journal.open(D, segment_bytes=seg, fs=fs, buffer_bytes=4096)

    j = reopen()
    model: list[bytes] = []  # payload of seq i+1
    committed = 0

    async def commit_many(n: int) -> None:
        # n concurrent committers with appends interleaved: all share syncs
        async def one(k: int) -> None:
            seq, _ = j.append_write(k, _payload(200 + k, False, seed + k))
            model.append(_payload(200 + k, False, seed + k))
            assert seq == len(model)
            await j.commit()

        await asyncio.gather(*(one(k) for k in range(n)))

    for kind, size, flag, s in ops:
        if kind == "append":
            data = _payload(size, flag, s)
            seq, _ = j.append_write(s, data)
            model.append(data)
            assert seq == len(model)
        elif kind == "commit":
            if flag:
                asyncio.run(commit_many(size))
            else:
                j.sync()
            committed = len(model)
            assert j.durable_seq == committed
        else:
            fs.crash(torn=flag)
            j = reopen()
            assert j.last_seq >= committed, (j.last_seq, committed, j.recovery)
            assert j.recovery.ok
            assert [r.payload for r in j.scan()] == model[: j.last_seq]
            del model[j.last_seq :]
            committed = j.last_seq
    fs.crash(torn=True)
    j = reopen()
    assert j.last_seq >= committed and j.recovery.ok
    assert [r.payload for r in j.scan()] == model[: j.last_seq]
    j.close()
    assert verify_journal(D, fs=fs).ok


def _built_journal() -> tuple[dict[str, bytes], list[tuple[int, int, bytes]]]:
    fs = CrashSimFS()
    j = Journal.open(D, segment_bytes=4096, fs=fs, clock=ManualClock(T0, tick=7))
    rng = random.Random(11)
    recs = []
    for i in range(40):
        data = _payload(rng.randint(1, 900), i % 3 == 0, i)
        seq, loc = j.append_write(i * 4096, data)
        recs.append((seq, loc, data))
    j.close()
    files = {n: bytes(fs.raw(f"{D}/{n}")) for n in fs.listdir(D)}
    return files, recs


_BUILT = _built_journal()


@settings(max_examples=150, deadline=None)
@given(pick=st.integers(0, 2**31), bit=st.integers(0, 7))
def test_any_bit_flip_is_found_where_it_is(pick: int, bit: int) -> None:
    files, recs = _BUILT
    segs = sorted(n for n in files if n.endswith(".seg"))
    last_seq, last_loc, _ = recs[-1]
    # every byte of every segment except the journal's very last record (a flip there
    # is indistinguishable from a torn write and is dropped, as FORMATS.md says)
    choices = [(n, i) for n in segs for i in range(len(files[n]))
               if not (n == segs[-1] and i >= last_loc)]
    name, pos = choices[pick % len(choices)]
    fs = CrashSimFS()
    fs.makedirs(D)
    for n, data in files.items():
        fd = fs.open_append(f"{D}/{n}")
        fs.write(fd, data)
        fs.close(fd)
    fs.raw(f"{D}/{name}")[pos] ^= 1 << bit

    rep = verify_journal(D, fs=fs)
    assert not rep.ok
    first = int(name[:20])
    later = [int(n[:20]) for n in segs if int(n[:20]) > first]
    end = min(later) if later else len(recs) + 1
    if pos < 32:
        want = (name, 0)  # the segment header
    else:
        want = (name, max(loc for seq, loc, _ in recs if first <= seq < end and loc <= pos))
    assert (rep.problems[0].segment, rep.problems[0].offset) == want

    j = Journal.open(D, segment_bytes=4096, fs=fs)
    assert j.last_seq == last_seq and j.recovery.dropped_bytes == 0
    bad = 0
    for seq, loc, data in recs:
        try:
            assert j.read_payload(seq, loc) == data
        except Corruption:
            bad += 1
    assert bad <= 1
    j.close()


# ------------------------------------------------------------------ slices of chunked records

_CH = 64 << 10


def _chunky(size: int, seed: int) -> bytes:
    """Payload whose 4 KiB blocks are randomly zeros, a repeated pattern or random."""
    rng = random.Random(seed)
    out = []
    for _ in range(size // 4096 + 1):
        k = rng.randrange(3)
        out.append(bytes(4096) if k == 0 else rng.randbytes(16) * 256 if k == 1
                   else rng.randbytes(4096))
    return b"".join(out)[:size]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    sizes=st.lists(st.sampled_from([1, 300, _CH - 1, _CH, _CH + 1, 2 * _CH + 7, 300_000,
                                    1 << 20]), min_size=1, max_size=4),
    seed=st.integers(0, 2**32 - 1),
    probes=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 3 * _CH)), min_size=1,
                    max_size=12),
    sync=st.booleans(),
    cached=st.booleans(),
)
def test_read_slice_matches_payload(
    sizes: list[int], seed: int, probes: list[tuple[float, int]], sync: bool, cached: bool
) -> None:
    fs = CrashSimFS()
    j = Journal.open(D, fs=fs, clock=ManualClock(T0, tick=1))
    recs = []
    for k, n in enumerate(sizes):
        data = _chunky(n, seed + k)
        recs.append((*j.append_write(k << 30, data), data))
    if sync:
        j.sync()
    cache: dict[tuple[int, int], bytes] | None = {} if cached else None

    class _C:
        def get(self, key: tuple[int, int]) -> bytes | None:
            assert cache is not None
            return cache.get(key)

        def put(self, key: tuple[int, int], data: bytes) -> None:
            assert cache is not None
            assert len(data) == min(_CH, len(recs[key[0] - 1][2]) - key[1] * _CH)
            cache[key] = data

    c = _C() if cached else None
    for i, (frac, length) in enumerate(probes):
        seq, loc, data = recs[i % len(recs)]
        poff = int(frac * len(data))
        length = min(length, len(data) - poff)
        assert_bytes_equal(j.read_slice(seq, loc, poff, length, cache=c), data[poff : poff + length])
    for seq, loc, data in recs:
        assert_bytes_equal(j.read_payload(seq, loc), data)
    j.close()
    assert verify_journal(D, fs=fs).ok


def _built_chunked() -> tuple[bytes, list[tuple[int, int, bytes]]]:
    fs = CrashSimFS()
    j = Journal.open(D, fs=fs, clock=ManualClock(T0, tick=7))
    recs = []
    for i, n in enumerate((3 * _CH + 99, 1000, 2 * _CH + 1, 70_000)):
        data = _chunky(n, 100 + i)
        recs.append((*j.append_write(i << 20, data), data))
    j.close()
    return bytes(fs.raw(f"{D}/00000000000000000001.seg")), recs


_CHUNKED = _built_chunked()


@settings(max_examples=150, deadline=None)
@given(pick=st.integers(0, 2**31), bit=st.integers(0, 7))
def test_any_bit_flip_in_a_chunked_record_is_found_at_its_record(pick: int, bit: int) -> None:
    """A flip anywhere before the last record is reported at its record (and chunk); a
    slice fails exactly when it needs the damaged chunk or the damaged header/table."""
    import struct

    seg, recs = _CHUNKED
    last_loc = recs[-1][1]
    pos = 32 + pick % (last_loc - 32)
    raw = bytearray(seg)
    raw[pos] ^= 1 << bit
    fs = CrashSimFS()
    fs.makedirs(D)
    fd = fs.open_append(f"{D}/00000000000000000001.seg")
    fs.write(fd, bytes(raw))
    fs.close(fd)
    seq, loc, data = max((r for r in recs if r[1] <= pos), key=lambda r: r[1])
    rep = verify_journal(D, fs=fs)
    assert [(p.offset, p.seq) for p in rep.problems] == [(loc, seq)]
    chunk = None  # the damaged chunk, if the flip is in a chunk of a chunked record
    if len(data) > _CH:
        n = (len(data) + _CH - 1) // _CH
        start = loc + 48 + (12 + 64 if seg[loc + 8] >= 3 else 12) * n  # v3: granule table
        for i in range(n):
            slen = struct.unpack_from("<I", seg, loc + 48 + 12 * i)[0]
            if start <= pos < start + slen:
                chunk = i
            start += slen
        if chunk is not None:
            assert rep.problems[0].reason == f"bad checksum in chunk {chunk}"
    j = Journal.open(D, fs=fs)
    assert j.recovery.dropped_bytes == 0
    for s, lc, d in recs:
        for i in range((len(d) + _CH - 1) // _CH):
            lo, hi = i * _CH, min(len(d), (i + 1) * _CH)
            if s == seq and (chunk is None or chunk == i):
                with pytest.raises(Corruption):
                    j.read_slice(s, lc, lo, hi - lo)
            else:
                assert_bytes_equal(j.read_slice(s, lc, lo, hi - lo), d[lo:hi])
    j.close()
