"""Replication between real cdpds on loopback under faults (docs/REPLICATION.md):
several targets per volume with status, metrics and roles; either side killed -9 and
restarted; the link stalled, cut, dropped mid-frame and down (tests/tcp_fault_proxy.py
between source and target); the target SIGSTOPped; the source killed -9 with records in
flight; wrong and missing secrets. After each fault: caught up, identical over NBD
(qemu-img compare at the head and at every marker) and ``verify`` clean on both sides.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import time
import urllib.request
from pathlib import Path

from cdp.replication.protocol import MAGIC
from tests.conftest import require_tool
from tests.tcp_fault_proxy import TcpFaultProxy
from tools.harness import Cdpd, run

SIZE = 64 << 20
SECRET = b"integration-secret-0123456789"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _secret(tmp: Path, name: str = "secret", value: bytes = SECRET) -> Path:
    p = tmp / name
    p.write_bytes(value + b"\n")
    os.chmod(p, 0o600)
    return p


def _source(tmp: Path, secret: Path) -> Cdpd:
    (tmp / "s").mkdir(exist_ok=True)
    return Cdpd(tmp / "s", size="64MiB", extra_config=f'\n[replication]\nsecret_file = "{secret}"\n')


def _target(tmp: Path, name: str, secret: Path, port: int) -> Cdpd:
    (tmp / name).mkdir(exist_ok=True)
    return Cdpd(tmp / name, size="64MiB", extra_config=(
        f'\n[replication]\nlisten = "127.0.0.1:{port}"\nsecret_file = "{secret}"\n'))


def _writes(uri: str, rng: random.Random, n: int, sizes: tuple[int, ...] = (4096, 65536, 1 << 20)) -> None:
    cmds: list[str] = []
    for _ in range(n):
        ln = rng.choice(sizes)
        off = rng.randrange(0, SIZE - ln) & ~4095
        cmds += ["-c", f"write -P {rng.randrange(1, 256)} {off} {ln}"]
    run("qemu-io", "-f", "raw", *cmds, uri)


def _status(src: Cdpd, to: str, vol: str = "vol0") -> dict[str, object]:
    rows = src.cdpctl_json("replicate", "status", "-V", vol, "--to", to)
    assert len(rows) == 1 and rows[0]["target"] == to, rows
    return dict(rows[0])


def _caught_up(src: Cdpd, to: str, timeout: float = 120, vol: str = "vol0") -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(src, to, vol)
        if st["state"] in ("streaming", "catching-up") and st["lag_records"] == 0:
            assert st["lag_seconds"] == 0
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def _wait_state(src: Cdpd, to: str, states: tuple[str, ...], timeout: float = 60) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = _status(src, to)
        if st["state"] in states:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def _identical(src: Cdpd, tgt: Cdpd, rep: str = "rep0") -> int:
    """qemu-img compare at the head and at every marker; verify clean on both; the
    number of markers compared."""
    marks = src.cdpctl_json("markers", "-V", "vol0")
    assert [m["seq"] for m in tgt.cdpctl_json("markers", "-V", rep)] == [m["seq"] for m in marks]
    for m in marks:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(f"vol0@{m['name']}"),
            tgt.uri(f"{rep}@{m['name']}"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri("vol0"), tgt.uri(rep))
    for d in (src, tgt):
        assert d.cdpctl_json("verify")["ok"] is True
    return len(marks)


def _metrics(d: Cdpd) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode())


def test_two_targets_status_metrics_roles_and_kill9(tmp_path: Path) -> None:
    """One volume to two targets: status (--to, --json), metrics, the status line and
    roles; the target killed -9 and the source killed -9 resume by themselves."""
    require_tool("qemu-io", "qemu-img")
    secret = _secret(tmp_path)
    p1, p2 = _free_port(), _free_port()
    to1, to2 = f"127.0.0.1:{p1}", f"127.0.0.1:{p2}"
    src, t1, t2 = _source(tmp_path, secret), _target(tmp_path, "t1", secret, p1), \
        _target(tmp_path, "t2", secret, p2)
    for d in (src, t1, t2):
        d.start()
    try:
        rng = random.Random(20)
        _writes(src.uri(), rng, 40)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "one")
        for to in (to1, to2):
            src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        _writes(src.uri(), rng, 40)
        for to in (to1, to2):
            st = _caught_up(src, to)
            assert set(st) >= {"volume", "target", "state", "lag_seconds", "lag_records",
                               "acked_seq", "sent_bytes"}
            assert st["volume"] == "vol0" and st["acked_seq"] and st["sent_bytes"]
        rows = src.cdpctl_json("replicate", "status")
        assert sorted(r["target"] for r in rows) == sorted([to1, to2])
        # two targets: stop needs --to
        r = src.cdpctl("replicate", "stop", "-V", "vol0", check=False)
        assert r.returncode != 0 and "--to" in r.stderr
        text = src.cdpctl("replicate", "status").stdout
        assert to1 in text and to2 in text and "lag_seconds" in text
        m = _metrics(src)
        assert f'cdp_replication_lag_seconds{{volume="vol0",target="{to1}"}} 0.0' in m
        assert f'cdp_replication_state{{volume="vol0",target="{to2}",state="streaming"}} 1.0' in m \
            or f'cdp_replication_state{{volume="vol0",target="{to2}",state="catching-up"}} 1.0' in m
        assert "cdp_replication_sent_bytes_total{" in m
        status = src.cdpctl("status", "-V", "vol0").stdout
        assert f"replication:   -> {to1} as rep0" in status and f"-> {to2} as rep0" in status
        roles = {v["volume"]: v for v in t1.cdpctl_json("volume", "list")}
        assert roles["rep0"]["role"] == "replica" and roles["rep0"]["source"]
        assert roles["vol0"]["role"] == "primary"
        assert "replica" in t1.cdpctl("volume", "list").stdout
        assert "role:          replica of" in t1.cdpctl("status", "-V", "rep0").stdout
        assert {v["volume"]: v for v in src.cdpctl_json("volume", "list")}["vol0"]["role"] == "primary"
        for t in (t1, t2):
            _identical(src, t)

        # the target killed -9: the source goes disconnected, then resumes by itself
        t1.kill9()
        _writes(src.uri(), rng, 30)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "two")
        st = _wait_state(src, to1, ("disconnected",))
        assert st["lag_records"] and st["lag_seconds"] > 0
        t1.start()
        for to, t in ((to1, t1), (to2, t2)):
            _caught_up(src, to)
            _identical(src, t)

        # the source killed -9: both streams resume at its restart, acked_seq kept
        _writes(src.uri(), rng, 30)
        src.kill9()
        src.start()
        assert _status(src, to1)["acked_seq"]
        _writes(src.uri(), rng, 20)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "three")
        for to, t in ((to1, t1), (to2, t2)):
            _caught_up(src, to)
            assert _identical(src, t) == 3
        # stop one, the other keeps streaming
        assert src.cdpctl_json("replicate", "stop", "-V", "vol0", "--to", to2)["state"] == "stopped"
        assert _status(src, to2)["state"] == "stopped"
        _writes(src.uri(), rng, 10)
        _caught_up(src, to1)
        for d in (src, t1, t2):
            assert d.proc is not None and d.proc.poll() is None
    finally:
        for d in (src, t1, t2):
            if d.proc is not None:
                d.stop()


def test_link_faults_through_a_proxy(tmp_path: Path) -> None:
    """The link stalled, cut, dropped mid-frame and down; the target SIGSTOPped; the
    source killed -9 with records in flight: caught up and identical after each."""
    require_tool("qemu-io", "qemu-img")
    secret = _secret(tmp_path)
    port = _free_port()
    src, tgt = _source(tmp_path, secret), _target(tmp_path, "t", secret, port)
    src.start()
    tgt.start()
    rng = random.Random(21)
    marks = 0

    def marker() -> None:
        nonlocal marks
        marks += 1
        src.cdpctl("snapshot", "-V", "vol0", "--label", f"m{marks}")

    try:
        with TcpFaultProxy("127.0.0.1", port) as proxy:
            to = f"127.0.0.1:{proxy.port}"
            _writes(src.uri(), rng, 30)
            marker()
            src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
            _caught_up(src, to)

            # stalled: lag grows and is reported; released: caught up
            proxy.set_stall(True)
            _writes(src.uri(), rng, 30)
            marker()
            time.sleep(1.5)
            st = _status(src, to)
            assert st["lag_records"] and st["lag_seconds"] >= 1.0, st
            proxy.set_stall(False)
            _caught_up(src, to)
            assert _identical(src, tgt) == marks

            # cut while streaming, and dropped in the middle of a frame
            for fault in ("cut", "mid-frame"):
                if fault == "mid-frame":
                    proxy.cut_after(300_000)
                _writes(src.uri(), rng, 30, (1 << 20,))
                if fault == "cut":
                    proxy.cut()
                marker()
                _caught_up(src, to)
                assert _identical(src, tgt) == marks

            # the link down for a while: disconnected, then back
            proxy.set_down(True)
            _writes(src.uri(), rng, 20)
            marker()
            _wait_state(src, to, ("disconnected",))
            proxy.set_down(False)
            _caught_up(src, to, timeout=180)
            assert _identical(src, tgt) == marks

            # the target SIGSTOPped and continued
            assert tgt.proc is not None
            os.kill(tgt.proc.pid, signal.SIGSTOP)
            try:
                _writes(src.uri(), rng, 30)
                marker()
                time.sleep(1.0)
                assert _status(src, to)["lag_records"]
            finally:
                os.kill(tgt.proc.pid, signal.SIGCONT)
            _caught_up(src, to)
            assert _identical(src, tgt) == marks

            # the source killed -9 with records in flight (held in the stalled link)
            proxy.set_stall(True)
            _writes(src.uri(), rng, 30)
            marker()
            time.sleep(0.5)
            src.kill9()
            proxy.set_stall(False)
            proxy.cut()
            src.start()
            _writes(src.uri(), rng, 10)
            marker()
            _caught_up(src, to)
            assert _identical(src, tgt) == marks
            assert proxy.connections >= 6
        for d in (src, tgt):
            assert d.proc is not None and d.proc.poll() is None
    finally:
        src.stop()
        tgt.stop()


def test_auth_refused_and_logged_daemon_lives(tmp_path: Path) -> None:
    """A source with the wrong secret is refused (state refused, logged on both sides);
    a peer that sends HELLO and never proves the secret, a bare magic followed by
    garbage, and a huge pre-auth frame are dropped; nothing is stored, the target lives."""
    require_tool("qemu-io")
    port = _free_port()
    src = _source(tmp_path, _secret(tmp_path, "wrong", b"not-the-same-secret-0123"))
    tgt = _target(tmp_path, "t", _secret(tmp_path), port)
    src.start()
    tgt.start()
    try:
        to = f"127.0.0.1:{port}"
        _writes(src.uri(), random.Random(3), 5)
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        st = _wait_state(src, to, ("refused",))
        assert st["refused"] and "auth" in str(st["refused"])
        # a peer without the secret: magic + a HELLO, then silence and close
        hello = bytes([0x95, 1, 1, 1, 0xC4, 32]) + b"\0" * 32 + b"\xa1x"  # [HELLO, 1, 1, nonce, "x"]
        for payload in (MAGIC + struct.pack("<I", len(hello)) + hello,
                        MAGIC + b"\xff" * 64,
                        MAGIC + struct.pack("<I", 1 << 30)):
            with socket.create_connection(("127.0.0.1", port)) as c:
                c.sendall(payload)
                c.settimeout(2)
                try:
                    while c.recv(4096):
                        pass
                except OSError:
                    pass
        log = tgt.logs()
        assert "failed authentication" in log
        assert "rep0" not in {v["volume"] for v in tgt.cdpctl_json("volume", "list")}
        assert not (tgt.store / "volumes" / "rep0").exists()
        assert "refused" in src.logs()
        assert tgt.proc is not None and tgt.proc.poll() is None
        # the source's refusal survives its restart in status (and it retries, refused again)
        src.stop()
        src.start()
        st = _wait_state(src, to, ("refused",))
        assert "auth" in str(st["refused"])
        assert json.loads((src.store / "volumes" / "vol0" / "replication.json").read_text())[
            "targets"][0]["refused"]
    finally:
        src.stop()
        tgt.stop()


def test_target_away_longer_than_retention_gets_the_changes(tmp_path: Path) -> None:
    """The target is stopped while the source's retention expires the history it
    lacks: catch-up falls back to what changed (status and log say so), the replica
    equals the source at the head and at the kept marker of the gap, a point of the gap
    cannot be read there (expired, as at the source), verify clean on both."""
    require_tool("qemu-io", "qemu-img")
    secret = _secret(tmp_path)
    port = _free_port()
    to = f"127.0.0.1:{port}"
    src, tgt = _source(tmp_path, secret), _target(tmp_path, "t", secret, port)
    src.start()
    tgt.start()
    try:
        rng = random.Random(31)
        src.cdpctl("retention", "set", "-V", "vol0", "all 2s")
        _writes(src.uri(), rng, 30)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "base", "--keep", "forever")
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        after = int(_caught_up(src, to)["acked_seq"])
        tgt.stop()
        hot = (4096,)  # many overwrites of a few blocks: much history, few changes
        for _ in range(4):
            _writes(src.uri(), random.Random(1), 100, hot)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "mid", "--keep", "forever")
        for _ in range(4):
            _writes(src.uri(), random.Random(2), 100, hot)
        time.sleep(2.5)
        _writes(src.uri(), rng, 10)
        src.cdpctl("gc", "-V", "vol0", "--now")
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(f"vol0@{after + 1}"),
                src.uri("vol0"), check=False)
        assert r.returncode != 0  # expired at the source
        sent = int(_status(src, to)["sent_bytes"])
        tgt.start()
        st = _caught_up(src, to)
        assert "fallback: points @" in src.logs()
        for p in ("vol0@mid", "vol0@base", "vol0"):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(p),
                tgt.uri(p.replace("vol0", "rep0")))
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.uri(f"rep0@{after + 1}"),
                tgt.uri("rep0"), check=False)
        assert r.returncode != 0  # the gap: expired at the target too
        assert int(st["sent_bytes"]) - sent < 800 * 4096, st  # the changes, not 800 writes
        for d in (src, tgt):
            assert d.cdpctl_json("verify")["ok"] is True
    finally:
        src.stop()
        tgt.stop()
