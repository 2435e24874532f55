"""The ransomware sentinel against a real cdpd over NBD, on a raw volume (no file
system, block evidence alone): benign writes (text, zeros, a big random "photo" into
free space) raise nothing; encrypting the text regions in place raises an alert within
seconds whose clean point image equals the volume before the attack, and
`cdpctl rewind --to clean-before-alert1` restores it. An already-encrypted volume
(random bytes everywhere, rewritten) and a database-like workload (random 4 KiB
overwrites of compressible pages) raise nothing, though the sentinel checks them."""

from __future__ import annotations

import json
import random
import re
import time
import urllib.request
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from tools.harness import Cdpd

SIZE = 64 << 20
REGION = 64 << 10
DOCS = 40  # text regions at [0, 2.5 MiB)
CFG = """
[sentinel]
bucket_seconds = "2s"
on_alert = "cat > {hook}"
"""
WORDS = [b"invoice", b"report", b"customer", b"balance", b"meeting", b"the", b"and", b"of"]


def _text(rng: random.Random, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        out += b" ".join(rng.choice(WORDS) for _ in range(10)) + b".\n"
    return bytes(out[:n])


def _alerts(d: Cdpd) -> list[dict]:  # type: ignore[type-arg]
    return list(d.cdpctl_json("alerts", "--json"))


def _metrics(d: Cdpd) -> dict[str, float]:
    """The sentinel's metrics of vol0, by name."""
    body = urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics",
                                  timeout=10).read().decode()
    return {m[1]: float(m[2]) for m in
            re.finditer(r'^(cdp_sentinel_\w+)\{volume="vol0"\} (\S+)$', body, re.M)}


def test_raw_volume_attack_alert_clean_point_rewind(tmp_path: Path) -> None:
    hook = tmp_path / "hook.json"
    d = Cdpd(tmp_path, size="64MiB", extra_config=CFG.format(hook=hook)).start()
    try:
        rng = random.Random(21)
        with NbdClient.connect(d.uri()) as c:
            for i in range(DOCS):
                c.pwrite(_text(rng, REGION), i * REGION)
            c.pwrite(bytes(1 << 20), 4 << 20)  # zeros
            c.flush()
            time.sleep(2.5)
            for i in range(16):  # a 16 MiB photo into free space, 1 MiB writes
                c.pwrite(rng.randbytes(1 << 20), (16 << 20) + (i << 20))
            c.flush()
            time.sleep(3.0)
            assert _alerts(d) == []
            before = c.pread(0, SIZE)
            time.sleep(2.5)  # a quiet bucket
            t_attack = time.monotonic()
            for i in range(DOCS):  # encrypt in place
                old = c.pread(i * REGION, REGION)
                key = rng.randbytes(REGION)
                c.pwrite(bytes(a ^ b for a, b in zip(old, key, strict=True)), i * REGION)
            c.flush()
        alerts: list[dict] = []  # type: ignore[type-arg]
        while time.monotonic() - t_attack < 20 and not alerts:
            alerts = _alerts(d)
            time.sleep(0.2)
        latency = time.monotonic() - t_attack
        assert len(alerts) == 1, d.logs()
        a = alerts[0]
        print(f"sentinel: alert {latency:.1f} s after the attack's first write "
              f"(incl. cdpctl polling); first @{a['first_seq']}, score {a['score']}")
        # the latency goal (<= 10 s) is a row of tools/bench/sentinel_bench.py
        # (--detection), not an assertion here: the suite asserts no timings
        assert [x["id"] for x in d.cdpctl_json("alerts", "-V", "vol0")] == ["alert1"]
        assert set(a) == {"id", "volume", "state", "first_seq", "first_time", "detected_time",
                          "clean_point", "score", "evidence", "files"}
        assert a["id"] == "alert1" and a["volume"] == "vol0" and a["state"] == "active"
        assert a["clean_point"] == "clean-before-alert1" and a["files"] == []
        assert a["first_time"] <= a["detected_time"] and a["score"] >= 1
        assert "ransomware sentinel alert1" in d.logs()
        deadline = time.monotonic() + 10
        while not (hook.exists() and hook.stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert json.loads(hook.read_text())["id"] == "alert1"
        m = _metrics(d)
        assert m["cdp_sentinel_alerts_total"] == 1 and m["cdp_sentinel_active_alerts"] == 1
        # suspect writes (the detector's floor is 8 checked ones) and the entropy rate's
        # counter: at least the 16 MiB photo and the 2.5 MiB of ciphertext
        assert m["cdp_sentinel_suspect_writes_total"] >= 8
        assert m["cdp_sentinel_checked_writes_total"] >= m["cdp_sentinel_suspect_writes_total"]
        assert m["cdp_sentinel_high_entropy_bytes_total"] >= 16 << 20
        # the clean point is the last write before the attack: exactly the volume before it
        img = tmp_path / "clean.img"
        d.cdpctl("image", "--at", "clean-before-alert1", "-o", str(img))
        assert img.read_bytes() == before
        d.cdpctl("rewind", "--to", "clean-before-alert1")
        with NbdClient.connect(d.uri()) as c:
            assert c.pread(0, SIZE) == before
        r = d.cdpctl_json("alerts", "dismiss", "alert1", "--json")
        assert r["state"] == "dismissed" and r["threshold"] > 0.2
        assert [x["state"] for x in _alerts(d)] == ["dismissed"]
    finally:
        d.stop()


def _page(rng: random.Random) -> bytes:
    """A database page: rows of small numbers and text, compressible."""
    rows = b"".join(rng.randrange(1000).to_bytes(4, "little") + _text(rng, 60) for _ in range(64))
    return rows[:4096].ljust(4096, b"\0")


def test_already_encrypted_volume_and_database_raise_nothing(tmp_path: Path) -> None:
    d = Cdpd(tmp_path, size="64MiB", extra_config=CFG.format(hook=tmp_path / "hook.json")).start()
    try:
        rng = random.Random(22)
        db = 48 << 20  # a database file's pages at [48, 64 MiB)
        with NbdClient.connect(d.uri()) as c:
            for i in range(48):  # an encrypted container: random bytes everywhere
                c.pwrite(rng.randbytes(1 << 20), i << 20)
            for i in range(4096):  # the database, then its pages rewritten at random
                c.pwrite(_page(rng), db + i * 4096)
            c.flush()
            time.sleep(2.5)  # a quiet bucket, and a seal: the container is in the maps
            for _ in range(8):
                for _ in range(256):  # the container in use: random blocks rewritten
                    n = rng.choice((4096, 65536))
                    c.pwrite(rng.randbytes(n), rng.randrange((48 << 20) // n) * n)
                for _ in range(256):
                    c.pwrite(_page(rng), db + rng.randrange(4096) * 4096)
                c.flush()
                time.sleep(0.5)
        deadline = time.monotonic() + 30  # the checks of the rewrites wait for a seal
        m = _metrics(d)
        while m["cdp_sentinel_checked_writes_total"] < 8 and time.monotonic() < deadline:
            time.sleep(0.2)
            m = _metrics(d)
        # as many checked writes as an alert needs (the detector's floor), none suspect
        assert m["cdp_sentinel_checked_writes_total"] >= 8, (m, d.logs())
        assert m["cdp_sentinel_high_entropy_bytes_total"] >= 16 << 20
        assert m["cdp_sentinel_suspect_writes_total"] == 0, m
        assert _alerts(d) == [] and m["cdp_sentinel_alerts_total"] == 0
    finally:
        d.stop()
