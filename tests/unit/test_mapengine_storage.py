"""Map files and manifest: crash at every write step, corruption, golden bytes."""

from __future__ import annotations

import os
import random
import threading
from pathlib import Path

import pytest

from mapengine import Columns, DeltaMap, MapCorruption, MapHistory, MergePolicy
from mapengine.storage import (
    MANIFEST,
    FileOps,
    decode_manifest,
    encode_manifest,
    encode_map,
)
from tests.property.test_mapengine_model import Model, check_changed, check_resolve, feed

SIZE = 64
POLICY = MergePolicy(fanout=2, l0_max_writes=3, full_every=4)


class Crash(Exception):
    pass


class FaultFS(FileOps):
    """Raises :class:`Crash` at the ``at``-th hook call (counting from 0)."""

    def __init__(self, at: int) -> None:
        self.at = at
        self.calls = 0
        self.points: list[tuple[str, str]] = []

    def hook(self, point: str, name: str) -> None:
        self.points.append((point, name))
        self.calls += 1
        if self.calls - 1 == self.at:
            raise Crash(f"{point} {name}")


def _script(seed: int) -> Model:
    rnd = random.Random(seed)
    m = Model(SIZE)
    for i in range(40):
        seq = i + 1
        r = rnd.random()
        if r < 0.7:
            a = rnd.randrange(SIZE)
            m.write(seq, a, min(SIZE, a + rnd.randint(1, 20)), 100 * seq)
        elif r < 0.8:
            a = rnd.randrange(SIZE)
            m.zero(seq, a, min(SIZE, a + rnd.randint(1, 20)))
        elif r < 0.9 and i > 5:
            m.rewind(seq, rnd.randrange(m.last))
        else:
            m.note(seq)
    return m


def _drive(h: MapHistory, m: Model, rnd: random.Random) -> None:
    for rec in m.records:
        feed(h, rec)
        if h.seal_due or rnd.random() < 0.1:
            h.seal()
    h.seal()


def _verify_reopen(d: Path, m: Model) -> None:
    h = MapHistory.open(d, policy=POLICY)
    named = set(os.listdir(d))
    assert not any(n.endswith(".tmp") for n in named)
    for rec in m.records:
        if rec[1] > h.sealed_seq:
            feed(h, rec)
    h._check()
    for x in range(m.last + 1):
        check_resolve(h, m, x, 0, SIZE)
    check_changed(h, m, 0, m.last, 0, SIZE)
    h.seal()
    h.close()
    # and once more, fully sealed
    h = MapHistory.open(d, policy=POLICY)
    assert h.sealed_seq == m.last
    for x in range(0, m.last + 1, 3):
        check_resolve(h, m, x, 0, SIZE)
    h.close()


@pytest.mark.parametrize("seed", [1, 2])
def test_crash_at_every_write_step(tmp_path: Path, seed: int) -> None:
    m = _script(seed)
    total = FaultFS(-1)
    h = MapHistory.open(tmp_path / "ref", policy=POLICY, fs=total)
    _drive(h, m, random.Random(seed))
    n = total.calls
    h.close()  # writes the head (maps/HEAD): the steps after n
    closing = total.calls - n
    assert n > 50 and closing > 0
    kinds = {p for p, _ in total.points}
    assert kinds == {"open", "write", "fsync", "rename", "dirsync", "done"}
    for at in range(n):
        d = tmp_path / f"c{at}"
        fs = FaultFS(at)
        h = MapHistory.open(d, policy=POLICY, fs=fs)
        with pytest.raises(Crash):
            _drive(h, m, random.Random(seed))
        # the object is abandoned (the process "died"); reopen from disk and replay
        _verify_reopen(d, m)
    for at in range(n, n + closing):  # a crash while a clean close writes the head
        d = tmp_path / f"c{at}"
        h = MapHistory.open(d, policy=POLICY, fs=FaultFS(at))
        _drive(h, m, random.Random(seed))
        with pytest.raises(Crash):
            h.close()
        _verify_reopen(d, m)


def _drive_deferred(h: MapHistory, m: Model, rnd: random.Random) -> None:
    """As :func:`_drive`, most seals deferred (the volume's live seals), some not (a
    rewind, a blocking seal), so both kinds of commit interleave."""
    for rec in m.records:
        feed(h, rec)
        if h.seal_due or rnd.random() < 0.1:
            h.seal(defer=rnd.random() < 0.8)
            if rnd.random() < 0.3:
                h.flush()
    h.seal(defer=True)
    h.flush()


@pytest.mark.parametrize("seed", [1, 2])
def test_crash_at_every_step_of_deferred_seals(tmp_path: Path, seed: int) -> None:
    """A crash (an exception at any step, in the caller's thread or the writer's) of
    deferred seals, or of the clean close after them, leaves a directory that opens,
    replays and resolves every point."""
    m = _script(seed)
    total = FaultFS(-1)
    h = MapHistory.open(tmp_path / "ref", policy=POLICY, fs=total)
    _drive_deferred(h, m, random.Random(seed))
    n = total.calls
    h.close()  # writes the head (maps/HEAD): the steps after n
    closing = total.calls - n
    assert n > 50 and closing > 0
    reached = 0
    for at in range(n):
        d = tmp_path / f"c{at}"
        fs = FaultFS(at)
        h = MapHistory.open(d, policy=POLICY, fs=fs)
        try:
            # the crash surfaces where it happened (caller's thread), or as the
            # history's refusal once the writer thread's job failed
            _drive_deferred(h, m, random.Random(seed))
        except (Crash, ValueError):
            reached += 1
        else:
            # the number of steps depends on the writer thread's timing (a queued job
            # writes one manifest for a backlog), so a run may end before step ``at``
            assert fs.calls <= at
        # the process "died" here: its writer thread stops too (a job already queued
        # runs to its end or to the crash; a crash inside one is another ``at``)
        pending = h._store.pending
        if pending is not None:
            pending.exception()
        _verify_reopen(d, m)
    assert reached > 50
    for k in range(closing):  # a crash while a clean close writes the head
        d = tmp_path / f"close{k}"
        fs = FaultFS(-1)
        h = MapHistory.open(d, policy=POLICY, fs=fs)
        _drive_deferred(h, m, random.Random(seed))
        fs.at = fs.calls + k
        with pytest.raises(Crash):
            h.close()
        _verify_reopen(d, m)


class DurableFS(FileOps):
    """Follows what a power loss would keep: a map file is durable once its ``done``
    hook came after its fsync (``write_atomic``; ``sync_files``: fsync, then the
    directory's ``done``). At every rename of the manifest it reads the new one (the
    temp file, complete by then) and records the map files it names that are not
    durable yet."""

    def __init__(self, d: Path) -> None:
        self.d = d
        self.synced: set[str] = set()  # fsynced, directory not yet
        self.durable: set[str] = set()
        self.manifests = 0
        self.violations: list[tuple[int, set[str]]] = []

    def hook(self, point: str, name: str) -> None:
        if point == "fsync":
            self.synced.add(name)
        elif point == "done":
            for n in name.split(","):
                if n in self.synced:
                    self.durable.add(n)
            self.synced -= set(name.split(","))
        elif point == "rename" and name == MANIFEST:
            body = decode_manifest((self.d / (MANIFEST + ".tmp")).read_bytes(), "tmp")
            named = {row[0] for row in body["maps"]}
            self.manifests += 1
            if named - self.durable:
                self.violations.append((int(body["gen"]), named - self.durable))


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_deferred_manifest_names_only_durable_files(tmp_path: Path, seed: int) -> None:
    """The ordering deferred seals keep: a manifest is renamed into place only after
    every map file it names was fsynced and its directory fsynced; the history then
    reopens with every point."""
    m = _script(seed)
    fs = DurableFS(tmp_path)
    h = MapHistory.open(tmp_path, policy=POLICY, fs=fs)
    _drive_deferred(h, m, random.Random(seed))
    assert h.pending is None
    h.close()
    assert fs.manifests > 5  # a backlog of deferred seals writes one manifest
    assert fs.violations == []
    _verify_reopen(tmp_path, m)


def test_deferred_seal_is_readable_before_it_is_durable(tmp_path: Path) -> None:
    """A deferred seal's maps answer at once, while the writer thread still holds the
    fsyncs; the manifest on disk is the previous one until then."""
    gate = threading.Event()

    class Held(FileOps):
        def hook(self, point: str, name: str) -> None:
            if point == "fsync" and threading.current_thread() is not threading.main_thread():
                assert gate.wait(30)

    h = MapHistory.open(tmp_path, policy=POLICY, fs=Held())
    for s in range(1, 8):
        h.add_write(s, s, s + 3, s)
    h.seal(defer=True)
    pending = h.pending
    assert pending is not None and not pending.done()
    assert not (tmp_path / MANIFEST).exists()  # nothing durable named yet
    assert [tuple(e)[:3] for e in h.resolve(7, 7, 10)] == [(7, 10, 7)]
    assert h.changed(0, 7) == [(1, 10)]
    gate.set()
    h.flush()
    assert h.pending is None
    assert decode_manifest((tmp_path / MANIFEST).read_bytes(), "m")["sealed_seq"] == 7
    h.close()


def test_failed_deferred_write_makes_history_unusable(tmp_path: Path) -> None:
    class Fails(FileOps):
        def hook(self, point: str, name: str) -> None:
            if point == "fsync":
                raise OSError(5, "EIO")

    h = MapHistory.open(tmp_path, policy=POLICY, fs=Fails())
    h.add_write(1, 0, 10, 5)
    h.seal(defer=True)
    with pytest.raises(OSError):
        h.flush()
    with pytest.raises(ValueError, match="reopen"):
        h.add_write(2, 0, 10, 5)


def test_failed_write_makes_history_unusable(tmp_path: Path) -> None:
    h = MapHistory.open(tmp_path, policy=POLICY, fs=FaultFS(0))
    h.add_write(1, 0, 10, 5)
    with pytest.raises(Crash):
        h.seal()
    with pytest.raises(ValueError, match="reopen"):
        h.add_write(2, 0, 10, 5)


def test_garbage_files_deleted_on_open(tmp_path: Path) -> None:
    h = MapHistory.open(tmp_path, policy=POLICY)
    for s in range(1, 8):
        h.add_write(s, s, s + 3, s)
    h.seal()
    h.close()
    (tmp_path / "L0-00000000000000000100-00000000000000000200.map").write_bytes(b"junk")
    (tmp_path / "MANIFEST.tmp").write_bytes(b"junk")
    (tmp_path / "notes.txt").write_text("not ours")
    h = MapHistory.open(tmp_path, policy=POLICY)
    names = sorted(os.listdir(tmp_path))
    assert "notes.txt" in names
    assert not any(n.endswith(".tmp") or "00000000000000000100" in n for n in names)
    assert h.sealed_seq == 7
    h.close()


def _history(d: Path) -> list[str]:
    h = MapHistory.open(d, policy=POLICY)
    for s in range(1, 20):
        h.add_write(s, (s * 7) % 50, (s * 7) % 50 + 9, 1000 + s)
        if h.seal_due:
            h.seal()
    h.seal()
    h.close()
    return sorted(n for n in os.listdir(d) if n.endswith(".map"))


def _flip(p: Path, off: int) -> None:
    b = bytearray(p.read_bytes())
    b[off] ^= 0x40
    p.write_bytes(bytes(b))


def _use(d: Path) -> None:
    h = MapHistory.open(d, policy=POLICY)
    for x in range(h.last_seq + 1):
        h.resolve(x, 0, SIZE)
        h.changed(0, x)
    h._check()
    h.close()


@pytest.mark.parametrize("where", ["header", "block", "index", "truncate"])
def test_map_file_corruption_names_file(tmp_path: Path, where: str) -> None:
    maps = _history(tmp_path)
    victim = tmp_path / maps[0]
    size = victim.stat().st_size
    if where == "header":
        _flip(victim, 20)
    elif where == "block":
        _flip(victim, 70)
    elif where == "index":
        _flip(victim, size - 3)
    else:
        victim.write_bytes(victim.read_bytes()[:-5])
    with pytest.raises(MapCorruption) as ei:
        _use(tmp_path)
    assert maps[0] in str(ei.value)
    assert isinstance(ei.value, OSError)
    assert ei.value.path.endswith(maps[0])


@pytest.mark.parametrize("off", [0, 9, 14, 25, -1])
def test_manifest_corruption_names_file(tmp_path: Path, off: int) -> None:
    _history(tmp_path)
    p = tmp_path / MANIFEST
    _flip(p, off if off >= 0 else p.stat().st_size - 1)
    with pytest.raises(MapCorruption, match="MANIFEST"):
        MapHistory.open(tmp_path, policy=POLICY)


def test_missing_map_file_is_corruption(tmp_path: Path) -> None:
    maps = _history(tmp_path)
    (tmp_path / maps[-1]).unlink()
    with pytest.raises(MapCorruption, match=maps[-1]):
        MapHistory.open(tmp_path, policy=POLICY)


def test_corruption_with_fixed_up_checksum_is_still_caught(tmp_path: Path) -> None:
    """A block whose crc32 was recomputed but whose payload is not msgpack+lz4."""
    import struct
    import zlib

    import msgpack

    maps = _history(tmp_path)
    p = tmp_path / maps[0]
    raw = bytearray(p.read_bytes())
    ioff, ilen = struct.unpack_from("<QI", raw, 48)[0], struct.unpack_from("<I", raw, 44)[0]
    idx = msgpack.unpackb(bytes(raw[ioff : ioff + ilen]))
    boff = struct.unpack_from("<q", idx[2], 0)[0]
    blen = struct.unpack_from("<q", idx[3], 0)[0]
    raw[boff : boff + blen] = b"\x00" * blen
    crcs = bytearray(idx[5])
    struct.pack_into("<q", crcs, 0, zlib.crc32(b"\x00" * blen))
    idx[5] = bytes(crcs)
    newidx = msgpack.packb(idx)
    assert len(newidx) == ilen
    raw[ioff : ioff + ilen] = newidx
    struct.pack_into("<I", raw, 60, zlib.crc32(newidx))
    p.write_bytes(bytes(raw))
    with pytest.raises(MapCorruption, match=maps[0]):
        _use(tmp_path)


# Golden bytes: these pin the file formats of docs/FORMATS.md ("Delta maps"). If one changes,
# the format changed: bump the version and keep reading the old one.


def _golden_map() -> bytes:
    cols = Columns.from_lists(
        [0, 4096, 12288], [4096, 8192, 16384], [11, 12, 20], [7, -1, 9], [0, 0, 512]
    )
    return encode_map(DeltaMap(10, 20, cols, flat=True), "L", 1)


def test_golden_map_file() -> None:
    data = _golden_map()
    assert data.hex() == GOLDEN_MAP_HEX


def test_commit_writes_encode_manifest_bytes(tmp_path: Path) -> None:
    """DirStore.commit reuses packed rows; its bytes stay those of encode_manifest."""
    h = MapHistory.open(tmp_path, policy=MergePolicy(fanout=2, l0_max_writes=3, full_every=4))
    path = tmp_path / MANIFEST
    checked = 0
    for s in range(1, 60):
        if h.add_write(2 * s, (s * 7 % 13) * 512, (s * 7 % 13) * 512 + 1024, s):
            h.seal()
        if s == 30:
            h.add_rewind(61, 18)
        if s in (20, 45):
            h.retain([10, 18], 2 * s - 6)
        if path.exists():
            raw = path.read_bytes()
            assert encode_manifest(decode_manifest(raw, str(path))) == raw
            checked += 1
    assert checked > 40
    h.close()


def test_golden_manifest() -> None:
    body = {
        "gen": 3,
        "sealed_seq": 20,
        "fanout": 8,
        "full_every": 64,
        "epochs": [[0, -1]],
        "maps": [
            ["L1-00000000000000000011-00000000000000000020.map", "L", 1, 0, 0, 10, 20, 3, 170]
        ],
    }
    assert encode_manifest(body).hex() == GOLDEN_MANIFEST_HEX


GOLDEN_MAP_HEX = (
    "4344504d4150000101000101000100000a0000000000000014000000000000000300000000000000"
    "010000003d0000008700000000000000c27fab848f7faad384000000549603c41800010013100900"
    "1220080025c41812000b080032c4180b230023000c08001314080033c418070a0013ff0100130910"
    "00076800040200700200000000000096c4080000000000000000c4080040000000000000c4084000"
    "000000000000c4084700000000000000c4080300000000000000c408d3d4fed400000000"
)
GOLDEN_MANIFEST_HEX = (
    "4344504d414e494601000000740000005c571e1b86a367656e03aa7365616c65645f73657114a666"
    "616e6f757408aa66756c6c5f657665727940a665706f636873919200ffa46d6170739199d9304c31"
    "2d30303030303030303030303030303030303031312d303030303030303030303030303030303030"
    "32302e6d6170a14c0100000a1403ccaa"
)


def _bounded_script(seed: int, size: int, n: int) -> Model:
    rnd = random.Random(seed)
    m = Model(size)
    for seq in range(1, n + 1):
        a = rnd.randrange(0, size, 8)
        m.write(seq, a, min(size, a + 8 * rnd.randint(1, 4)), 1000 * seq)
    return m


@pytest.mark.parametrize("seed", [1, 2])
def test_indexes_and_filters_live_in_the_bounded_cache(tmp_path: Path, seed: int) -> None:
    """Issue 27: a map's block index and offset filter are entries of the one LRU bounded
    by ``cache_bytes`` (with the decoded blocks), not kept for every map ever used; an
    evicted index is read again from the file, an evicted filter is not needed."""
    size = 4096
    m = _bounded_script(seed, size, 600)
    policy = MergePolicy(fanout=2, l0_max_writes=8, full_every=8)
    limit = 16 << 10
    for reopen in (False, True):
        h = MapHistory.open(tmp_path, policy=policy, cache_bytes=limit)
        if not reopen:
            for rec in m.records:
                if feed_due(h, rec):
                    h.seal()
            h.seal()
        cache = h._store.cache  # type: ignore[attr-defined]
        rnd = random.Random(seed)
        for _ in range(300):
            x = rnd.randint(0, m.last)
            a = rnd.randrange(size)
            check_resolve(h, m, x, a, min(size, a + rnd.randint(1, 64)))
            assert cache.bytes <= limit or len(cache._d) == 1
            assert cache.meta_bytes == sum(cache._meta.values())
        files = list(h._store.files.values())  # type: ignore[attr-defined]
        assert any(f._idx is None for f in files) and any(f._idx is not None for f in files)
        for f in files:  # whatever a map holds is in the cache's account, and only that
            assert (f._idx is not None) == ((f.path, -1) in cache._meta)
            assert (f._filt is not None) == ((f.path, -2) in cache._meta)
        check_changed(h, m, 0, m.last, 0, size)
        h._check()
        h.close()


def feed_due(h: MapHistory, rec: tuple[str, int, int, int, int]) -> bool:
    kind, seq, a, b, c = rec
    assert kind == "W"
    return h.add_write(seq, a, b, c)


def test_filter_lookup_does_not_copy_the_filter(tmp_path: Path) -> None:
    """A small lookup searches a map's offset filter (uint32 when its granules fit) with
    a key of the filter's own dtype: with a Python int key numpy cast the whole filter
    to int64 first, 8 bytes per range for every lookup (~35 µs at 100k ranges, and the
    core's cache with it; the sentinel's checks of overwritten bytes paid it per map)."""
    import tracemalloc

    import numpy as np

    n = 40_000  # disjoint 4 KiB writes, 8 KiB apart: one filter range each
    h = MapHistory.open(tmp_path, policy=MergePolicy(fanout=4, l0_max_writes=n + 1,
                                                       full_every=64))
    for i in range(n):
        h.add_write(i + 1, i * 8192, i * 8192 + 4096, 1000 * (i + 1))
    h.seal()
    files = [f for f in h._store.files.values()  # type: ignore[attr-defined]
             if f._filt is not None and f._filt[1].shape[0] >= n]
    assert files and files[0]._filt[1].dtype == np.uint32
    f = files[0]
    tracemalloc.start()
    try:
        for i in range(0, n, n // 8):  # ruled out by the filter (a gap) and inside a write
            assert f.query(i * 8192 + 4096, i * 8192 + 4608).n == 0
            assert f.query(i * 8192, i * 8192 + 512).n == 1
        assert f.query(1 << 44, (1 << 44) + 512).n == 0  # past every uint32 granule
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 4 * n, peak  # the int64 copy alone was 8 * n bytes
    h.close()
