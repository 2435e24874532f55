"""The ransomware sentinel's block evidence: signals on random data, text, zeros and
compressible pages; the detector's buckets, baseline, burst and dismissal; and the
service on a real volume: benign workloads (photos into free space, an archive over an
archive, database-like page overwrites) raise nothing, encrypting documents in place
raises an alert whose clean point is the last write before the attack."""

from __future__ import annotations

import asyncio
import random
import time
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

from cdp.config import JournalSettings, MapSettings, SentinelSettings, Settings, parse_config
from cdp.errors import ConfigError, NotFound, UsageError
from cdp.retention.service import attach_retention, retention_of
from cdp.sentinel import service
from cdp.sentinel.detector import Detector
from cdp.sentinel.service import CHECK_CPU_BURST, Sentinel, attach_sentinel
from cdp.sentinel.signals import (
    SAMPLE,
    Verdict,
    entropy_batch,
    entropy_bits,
    high_entropy,
    overwrite_verdict,
)
from cdp.volume import Volume

WORDS = ["invoice", "quarterly", "report", "customer", "balance", "payment", "meeting", "notes",
         "project", "schedule", "budget", "contract", "delivery", "the", "and", "of", "to",
         "in", "for", "with", "on"]


def text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += (" ".join(rng.choice(WORDS) for _ in range(12)) + ".\n").encode()
    return bytes(out[:n])


def archive(rng: random.Random, n: int) -> bytes:
    """Compressed data (a zip, a photo): high entropy, not random."""
    out = bytearray()
    while len(out) < n:
        out += zlib.compress(text(rng, 1 << 16) + rng.randbytes(1 << 14), 9)
    return bytes(out[:n])


def page(rng: random.Random) -> bytes:
    """A database page: rows of small numbers and text, compressible."""
    rows = b"".join(rng.randrange(1000).to_bytes(4, "little") + text(rng, 60) for _ in range(64))
    return rows[:4096].ljust(4096, b"\0")


# ---------------------------------------------------------------------- signals

def test_entropy_of_kinds() -> None:
    rng = random.Random(1)
    assert entropy_bits(rng.randbytes(SAMPLE)) > 7.3
    assert entropy_bits(archive(rng, SAMPLE)) > 7.0
    assert entropy_bits(text(rng, SAMPLE)) < 5.0
    assert entropy_bits(bytes(SAMPLE)) == 0.0
    assert entropy_bits(page(rng)[:SAMPLE]) < 6.0
    assert entropy_bits(b"") == 0.0


def test_entropy_batch_matches_single() -> None:
    rng = random.Random(2)
    samples = [rng.randbytes(SAMPLE), text(rng, SAMPLE), bytes(SAMPLE), b"", text(rng, 100),
               archive(rng, SAMPLE)]
    got = entropy_batch(samples)
    for s, h in zip(samples, got, strict=True):
        assert h == pytest.approx(entropy_bits(s), abs=1e-9)
    assert len(entropy_batch([])) == 0


def test_entropy_batch_of_several_groups_matches_single() -> None:
    """More samples than one ``bincount`` group (32): every group, a short one last, and
    short or empty samples between full ones."""
    rng = random.Random(5)
    samples: list[bytes] = []
    for i in range(71):
        kind = i % 5
        samples.append(rng.randbytes(SAMPLE) if kind == 0 else text(rng, SAMPLE) if kind == 1
                       else bytes(SAMPLE) if kind == 2 else archive(rng, SAMPLE) if kind == 3
                       else text(rng, i))
    got = entropy_batch(samples)
    assert len(got) == len(samples)
    for s, h in zip(samples, got, strict=True):
        assert h == pytest.approx(entropy_bits(s), abs=1e-9)


def test_high_entropy_uses_lz4_probe_first() -> None:
    assert not high_entropy(0.5, 7.9)  # lz4 compressed it: low, whatever the sample says
    assert high_entropy(1.0, 7.5)
    assert high_entropy(-1.0, 7.5)  # no probe ran: the sample decides
    assert not high_entropy(-1.0, 4.5)
    assert not high_entropy(1.0, 6.5, threshold=7.0)


def test_overwrite_verdict() -> None:
    rng = random.Random(3)
    assert overwrite_verdict(text(rng, SAMPLE)) is Verdict.SUSPECT  # encryption over a document
    assert overwrite_verdict(bytes(SAMPLE)) is Verdict.BENIGN  # free space
    assert overwrite_verdict(archive(rng, SAMPLE)) is Verdict.BENIGN  # archive over archive
    assert overwrite_verdict(rng.randbytes(SAMPLE)) is Verdict.BENIGN  # already encrypted
    assert overwrite_verdict(page(rng)[:SAMPLE]) is Verdict.SUSPECT


# ---------------------------------------------------------------------- detector

S = SentinelSettings(bucket_seconds=10.0, min_suspect_bytes=1 << 20)
SEC = 10**9


def test_detector_fires_on_a_burst_and_names_its_first_write() -> None:
    d = Detector(S)
    t = 1000 * SEC
    for i in range(100):  # benign: 100 x 64 KiB of text
        d.written(t + i, 1 << 16, False)
    fire = None
    for i in range(40):  # 40 x 64 KiB encrypted over text
        seq = 200 + i
        d.written(t + 1000 + i, 1 << 16, True)
        fire = fire or d.checked(seq, t + 1000 + i, 1 << 16, True)
    assert fire is not None and fire.first_seq == 200
    assert fire.score >= 1.0 and fire.evidence["suspect_writes_checked"] >= 8
    # the same burst alerts once
    d.written(t + 2000, 1 << 16, True)
    assert d.checked(300, t + 2000, 1 << 16, True) is None


def test_detector_quiet_on_benign_high_entropy() -> None:
    d = Detector(S)
    t = 1000 * SEC
    for i in range(200):  # photos into free space, archives over archives
        d.written(t + i * SEC // 10, 1 << 20, True)
        assert d.checked(i + 1, t + i * SEC // 10, 1 << 20, False) is None
    assert d.baseline() == 0.0 and d.threshold() == pytest.approx(S.min_share)


def test_detector_small_suspect_share_learns_and_sample_extrapolates() -> None:
    d = Detector(S)
    t = 1000 * SEC
    # each bucket: 10 MiB written, 1 MiB high entropy of which 1 in 4 checked (all suspect):
    # estimated suspect share 10 % < 20 % floor: no alert, but the baseline learns it
    for b in range(5):
        base = t + b * 10 * SEC
        d.written(base, 9 << 20, False)
        for i in range(16):
            d.written(base + i, 1 << 16, True)
            if i % 4 == 0:
                assert d.checked(b * 100 + i, base + i, 1 << 16, True) is None
    assert d.baseline() == pytest.approx(0.1, abs=0.01)
    assert d.threshold() == pytest.approx(0.2, abs=0.01)  # max(0.2, 0.1 + 0.1)


def test_detector_dismiss_raises_threshold() -> None:
    d = Detector(S)
    d.dismissed(0.6)
    assert d.threshold() == pytest.approx(0.7)
    t = 1000 * SEC
    d.written(t, 2 << 20, False)
    for i in range(40):  # share 40/72 = 0.56: below the raised threshold
        d.written(t + i, 1 << 16, True)
        assert d.checked(i + 1, t + i, 1 << 16, True) is None


def test_detector_new_burst_after_quiet_bucket() -> None:
    d = Detector(S)
    t = 1000 * SEC
    fires = []
    for start in (t, t + 60 * SEC):
        for i in range(20):
            d.written(start + i, 1 << 17, True)
            f = d.checked(int(start // SEC) + i, start + i, 1 << 17, True)
            if f:
                fires.append(f.first_seq)
    assert fires == [1000, 1060]


# ---------------------------------------------------------------------- config

def test_sentinel_config(tmp_path: Path) -> None:
    s = parse_config({})
    assert s.sentinel.enabled and s.sentinel.bucket_seconds == 10.0
    s = parse_config({"sentinel": {"enabled": False, "bucket_seconds": "2s",
                                   "baseline_window": "1d", "min_share": 0.3,
                                   "min_suspect_bytes": "4MiB", "entropy_bits": 7.2,
                                   "checks_per_second": 100, "on_alert": "logger x"}})
    assert not s.sentinel.enabled and s.sentinel.bucket_seconds == 2.0
    assert s.sentinel.baseline_window == 86400.0 and s.sentinel.min_suspect_bytes == 4 << 20
    assert s.sentinel.on_alert == "logger x"
    s = parse_config({"sentinel": {"margin": 0.05, "min_files": 4, "note_dirs": 2,
                                   "ransom_notes": ["*.hta"], "slow_window": "30m"}})
    assert s.sentinel.margin == 0.05 and s.sentinel.min_files == 4 and s.sentinel.note_dirs == 2
    assert tuple(s.sentinel.ransom_notes) == ("*.hta",) and s.sentinel.slow_window == 1800.0
    for bad, msg in (({"enabled": "yes"}, "sentinel.enabled"),
                     ({"min_share": 1.5}, "sentinel.min_share"),
                     ({"entropy_bits": 9}, "sentinel.entropy_bits"),
                     ({"checks_per_second": 0}, "sentinel.checks_per_second"),
                     ({"bucket_seconds": "0s"}, "sentinel.bucket_seconds"),
                     ({"baseline_window": "1s"}, "sentinel.baseline_window"),
                     ({"margin": 2}, "sentinel.margin"),
                     ({"min_files": 0}, "sentinel.min_files"),
                     ({"ransom_notes": "readme.txt"}, "sentinel.ransom_notes"),
                     ({"nope": 1}, "sentinel.nope")):
        with pytest.raises(ConfigError, match=msg):
            parse_config({"sentinel": bad})


# ---------------------------------------------------------------------- service on a volume

MiB = 1 << 20
SIZE = 64 * MiB
REGION = 1 << 16


def _settings(tmp: Path) -> Settings:
    return replace(
        Settings(), store=tmp / "store",
        journal=replace(JournalSettings(), segment_bytes=4 << 20),
        maps=replace(MapSettings(), l0_max_writes=256),
        sentinel=replace(SentinelSettings(), bucket_seconds=1.0, checks_per_second=100),
    )


def _open(tmp: Path) -> tuple[Volume, Sentinel]:
    vol = Volume.create(tmp / "v", "v", SIZE, _settings(tmp))
    attach_retention(vol)
    return vol, attach_sentinel(vol)


def _xor(a: bytes, b: bytes) -> bytes:
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).to_bytes(len(a), "little")


async def _w(vol: Volume, off: int, data: bytes) -> None:
    r = vol.write(off, data)
    if r is not None:
        await r


async def _drain(vol: Volume, sen: Sentinel) -> None:
    """Seal (the sentinel reads overwritten bytes of sealed writes only), then process."""
    vol.seal()
    await sen.process()
    await sen._check_sealed()


async def _next_bucket(vol: Volume, sen: Sentinel) -> None:
    await _drain(vol, sen)
    await asyncio.sleep(2.05 * sen.s.bucket_seconds)  # a quiet bucket: a new burst


async def _benign(vol: Volume, sen: Sentinel, rng: random.Random) -> None:
    for i in range(48):  # documents: 48 x 64 KiB of text in [0, 3 MiB)
        await _w(vol, i * REGION, text(rng, REGION))
    for _ in range(128):  # a database: random 4 KiB page overwrites of compressible pages
        await _w(vol, 8 * MiB + rng.randrange(256) * 4096, page(rng))
    await _drain(vol, sen)
    await _w(vol, 16 * MiB, archive(rng, 4 * MiB))  # a photo / archive into free space
    await _next_bucket(vol, sen)
    await _w(vol, 16 * MiB, archive(rng, 4 * MiB))  # replaced by a newer archive
    await _w(vol, 24 * MiB, rng.randbytes(8 * MiB))  # an encrypted container, new
    await _next_bucket(vol, sen)
    await _w(vol, 24 * MiB, rng.randbytes(8 * MiB))  # ... rewritten
    await _drain(vol, sen)


def test_service_benign_then_encrypt_in_place(tmp_path: Path) -> None:
    async def main() -> None:
        vol, sen = _open(tmp_path)
        rng = random.Random(5)
        await _benign(vol, sen, rng)
        assert sen.alert_list() == [], sen.alert_list()
        assert sen.checked_writes > 0 and sen.suspect_writes == 0
        await _next_bucket(vol, sen)
        before = vol.read(0, 48 * REGION)
        clean_seq = vol.head_seq
        # encrypt the documents in place, one region at a time; the ciphertext is made
        # first so that the writes land in one burst (one bucket) on a loaded machine too
        attack = [_xor(vol.read(i * REGION, REGION), rng.randbytes(REGION)) for i in range(48)]
        for i, data in enumerate(attack):
            await _w(vol, i * REGION, data)
        await _drain(vol, sen)
        alerts = sen.alert_list()
        assert len(alerts) == 1, alerts
        a = alerts[0]
        assert a["id"] == "alert1" and a["state"] == "active" and a["files"] == []
        assert a["first_seq"] == clean_seq + 1 and a["clean_seq"] == clean_seq
        assert a["clean_point"] == "clean-before-alert1"
        seq = vol.resolve_point("clean-before-alert1")
        assert seq == clean_seq and vol.read(0, 48 * REGION, seq) == before
        pts, keep_after = retention_of(vol).plan()
        assert clean_seq in pts or clean_seq >= keep_after  # kept (or in the all-tier)
        assert list(sen.held_points(vol)) == [clean_seq]
        with pytest.raises(NotFound):
            vol.resolve_point("clean-before-alert2")
        # dismiss: released, threshold raised, the state survives a reopen
        r = sen.dismiss("1")
        assert r["state"] == "dismissed" and r["threshold"] > 0.2
        assert list(sen.held_points(vol)) == []
        with pytest.raises(UsageError):
            sen.dismiss("alert1")
        with pytest.raises(NotFound):
            sen.dismiss("alert9")
        vol.close()
        vol2 = Volume.open(tmp_path / "v", _settings(tmp_path))
        sen2 = attach_sentinel(vol2)
        assert [x["state"] for x in sen2.alert_list()] == ["dismissed"]
        assert sen2.det.threshold() == pytest.approx(r["threshold"])
        assert vol2.resolve_point("clean-before-alert1") == clean_seq
        vol2.close()

    asyncio.run(main())


def test_service_on_sample_hot_path_is_cheap(tmp_path: Path) -> None:
    """on_sample copies a sample and appends: a few µs per write even on a busy machine."""
    async def main() -> None:
        vol, sen = _open(tmp_path)
        data = random.Random(6).randbytes(4096)
        n = 2000
        t0 = time.perf_counter()
        for i in range(n):
            assert sen.on_sample(vol, i + 1, i * 4096, 4096, data) == 1
        per = (time.perf_counter() - t0) / n
        assert len(sen._pending) == n
        print(f"on_sample: {per * 1e6:.2f} µs per write")
        sen._pending.clear()
        vol.close()

    asyncio.run(main())


def test_service_walks_back_to_the_first_unsampled_attack_write(tmp_path: Path) -> None:
    """Under load one write in ``stride`` is sampled: the alert still names the first
    attack write, found by reading the journal back."""
    async def main() -> None:
        vol, sen = _open(tmp_path)
        rng = random.Random(8)
        for i in range(768):  # 3 MiB of documents in 4 KiB pages
            await _w(vol, i * 4096, text(rng, 4096))
        await _next_bucket(vol, sen)
        sen._stride = vol._sample_in = 64  # as under 64 x more writes per batch
        clean_seq = vol.head_seq
        attack = [_xor(vol.read(i * 4096, 4096), rng.randbytes(4096)) for i in range(768)]
        for i, data in enumerate(attack):  # one burst, as above
            await _w(vol, i * 4096, data)
        await _drain(vol, sen)
        alerts = sen.alert_list()
        assert len(alerts) == 1, alerts
        assert alerts[0]["first_seq"] == clean_seq + 1, (alerts[0]["first_seq"], clean_seq)
        vol.close()

    asyncio.run(main())


def test_service_checks_stay_within_their_cpu_budget(tmp_path: Path) -> None:
    """Checks of overwritten bytes are bounded by CPU time too (``CHECK_CPU``): with a
    measured cost per check, a batch queues only what the budget left pays for."""
    async def main() -> None:
        vol, sen = _open(tmp_path)
        rng = random.Random(9)
        for i in range(40):  # high-entropy writes, all sampled (stride 1)
            await _w(vol, i * 4096, rng.randbytes(4096))
        sen._check_cost, sen._cpu = 0.001, 0.0035  # 1 ms a check, 3.5 ms left
        sen._refill = time.monotonic()  # and nothing earned since
        await sen.process()  # not sealed: the chosen checks stay queued
        assert len(sen._to_check) == 3
        assert sen._cpu <= CHECK_CPU_BURST
        vol.seal()
        await sen._check_sealed()  # run, and their CPU time charged
        assert not sen._to_check and sen.checked_writes == 3 and sen.check_cpu > 0
        assert sen._check_cost > 0 and sen.batches == 1
        vol.close()

    asyncio.run(main())


def test_service_burst_after_a_quiet_spell_gets_the_checks_it_earned(tmp_path: Path) -> None:
    """The budgets refill for the time since the last batch before a batch chooses its
    checks: an attack that fits in one batch after a quiet spell is checked on the whole
    ``checks_per_second``, not on the few tokens the batch before it left (which missed
    the raw-volume attack of tests/integration/test_sentinel_cdpd.py at 2 batches a
    second: 4 checks, under the detector's floor of 8 suspect writes)."""
    async def main() -> None:
        vol, sen = _open(tmp_path)
        rng = random.Random(10)
        cps = sen.s.checks_per_second
        assert cps >= 40
        for i in range(40):  # high-entropy writes, all sampled (stride 1), one batch
            await _w(vol, i * 4096, rng.randbytes(4096))
        sen._tokens, sen._refill = 4.0, time.monotonic() - 2.0  # 2 s quiet after a batch
        await sen.process()  # not sealed: the chosen checks stay queued
        assert len(sen._to_check) == 40  # all of them (4 before the fix)
        assert sen._tokens == cps - 40  # refilled to the cap, then spent
        vol.close()

    asyncio.run(main())


def test_busy_sentinels_of_one_process_share_the_full_rates(tmp_path: Path) -> None:
    """Up to ``SHARED_FREE`` busy sentinels run at the full rates; with more (64 volumes
    written at once, issue 27) each gets ``SHARED_FREE / busy`` of them: its budgets
    refill that much slower, so together they cost what ``SHARED_FREE`` did. A sentinel
    stops counting ``BUSY_FOR`` s after its last batch, and at close."""
    saved = dict(service._busy)
    service._busy.clear()
    try:
        now = time.monotonic()
        assert service.share(now) == 1.0
        for k in range(service.SHARED_FREE):
            service._busy[-1 - k] = now
        assert service.share(now) == 1.0
        for k in range(service.SHARED_FREE, 64):
            service._busy[-1 - k] = now
        assert service.share(now) == service.SHARED_FREE / 64

        async def main() -> None:
            vol, sen = _open(tmp_path)
            rng = random.Random(11)
            cps = sen.s.checks_per_second
            for i in range(40):  # high-entropy writes, all sampled (stride 1), one batch
                await _w(vol, i * 4096, rng.randbytes(4096))
            sen._tokens, sen._refill = 0.0, time.monotonic() - 1.0  # 1 s since the last batch
            sen._check_cost, sen._cpu = 0.0, 0.0
            await sen.process()
            assert id(sen) in service._busy
            # 1 s of the rate at a 65th share, not of the full rate (which would queue
            # min(cps, 40) checks)
            earned = cps * service.SHARED_FREE / 65
            assert len(sen._to_check) <= earned + 1 < min(cps, 40)
            vol.close()
            assert id(sen) not in service._busy

        asyncio.run(main())
        # stale entries leave after BUSY_FOR
        assert service.share(now + service.BUSY_FOR + 1) == 1.0
    finally:
        service._busy.clear()
        service._busy.update(saved)
