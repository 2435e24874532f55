"""The volume's sampled-write seam (``VolumeService.on_sample``): one WRITE record in N
goes to the samplers, N being what they returned (the smallest of several); every
WRITE's bytes are counted in ``Volume.write_record_bytes``, INIT and ZERO records are
not, and records applied from a replication stream are counted but never sampled."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from pathlib import Path

from cdp.config import MapSettings, Settings
from cdp.volume import Volume, VolumeService

SIZE = 4 << 20


def settings(tmp: Path) -> Settings:
    return replace(Settings(), store=tmp / "store", maps=replace(MapSettings(), l0_max_writes=16))


class _Sampler(VolumeService):
    def __init__(self, stride: int) -> None:
        self.stride = stride
        self.seen: list[tuple[int, int, int, bytes]] = []

    def on_sample(self, vol: Volume, seq: int, offset: int, length: int,
                  payload: bytes | bytearray | memoryview) -> int:
        self.seen.append((seq, offset, length, bytes(payload)))
        return self.stride


async def _w(vol: Volume, off: int, data: bytes) -> None:
    r = vol.write(off, data)
    if r is not None:
        await r


def test_one_write_in_stride_is_sampled_and_every_write_counted(tmp_path: Path) -> None:
    async def main() -> None:
        vol = Volume.create(tmp_path / "v", "v", SIZE, settings(tmp_path))
        await _w(vol, 0, b"a" * 512)  # no sampler yet: not counted
        assert vol.write_record_bytes == 0
        s = _Sampler(3)
        vol.attach(s)
        rng = random.Random(3)
        seqs, total = [], 0
        for i in range(10):
            data = rng.randbytes(rng.choice((512, 4096, 70_000)))
            await _w(vol, i * 4096, data)
            seqs.append((vol.journal.last_seq, i * 4096, len(data), data))
            total += len(data)
            if i == 4:  # neither a trim nor an INIT record is a sampled or counted WRITE
                vol.zero(0, 4096)
                vol._record_write(8192, b"i" * 4096, init=True)
        assert s.seen == [seqs[i] for i in (0, 3, 6, 9)]
        assert vol.write_record_bytes == total
        # a second sampler: the next WRITE goes to both, then the smaller stride wins
        t = _Sampler(2)
        vol.attach(t)
        for i in range(5):
            await _w(vol, i * 512, bytes([i]) * 512)
        assert [x[3][0] for x in t.seen] == [0, 2, 4]
        assert [x[3][0] for x in s.seen[4:]] == [0, 2, 4]
        assert vol.write_record_bytes == total + 5 * 512
        vol.close()

    asyncio.run(main())


def test_replicated_writes_are_counted_not_sampled(tmp_path: Path) -> None:
    async def main() -> None:
        s = settings(tmp_path)
        src = Volume.create(tmp_path / "src", "src", SIZE, s)
        dst = Volume.create(tmp_path / "dst", "dst", SIZE, s)
        smp = _Sampler(1)
        dst.attach(smp)
        rng = random.Random(5)
        total = 0
        for i in range(20):
            data = rng.randbytes(rng.choice((512, 4096)))
            await _w(src, i * 4096, data)
            total += len(data)
        src.zero(0, 8192)
        await src.snapshot("m")
        await dst.apply_stored(list(src.journal.scan_stored(1)))
        assert dst.journal.last_seq == src.journal.last_seq
        assert dst.write_record_bytes == total and smp.seen == []
        src.close()
        dst.close()

    asyncio.run(main())
