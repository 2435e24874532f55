"""Replication between real cdpds on loopback under faults (docs/REPLICATION.md):
several targets per volume with status, metrics and roles; either side killed -9 and
restarted; the link stalled, cut, dropped mid-frame and down (tests/tcp_fault_proxy.py
between source and target); the target SIGSTOPped; the source killed -9 with records in
flight; wrong and missing secrets. After each fault: caught up, identical over NBD
(qemu-img compare at the head and at every marker) and ``verify`` clean on both sides.
The daemons come from the ``repl`` fixture (tests/integration/replication_env.py).
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import struct
import time

from cdp.replication.protocol import MAGIC
from tests.conftest import require_tool
from tests.integration.replication_env import (
    ReplEnv,
    api,
    caught_up,
    identical,
    metrics,
    start_all,
    status,
    wait_state,
    writes,
)
from tests.tcp_fault_proxy import TcpFaultProxy
from tools.harness import run


def test_two_targets_status_metrics_roles_and_kill9(repl: ReplEnv) -> None:
    """One volume to two targets: status (--to, --json), metrics, the status line and
    roles; the target killed -9 and the source killed -9 resume by themselves."""
    require_tool("qemu-io", "qemu-img")
    src = repl.source()
    (t1, to1), (t2, to2) = repl.target("t1"), repl.target("t2")
    start_all(src, t1, t2)
    rng = random.Random(20)
    writes(src.uri(), rng, 40)
    api(src, "snapshot", volumes=["vol0"], label="one")
    src.cdpctl("replicate", "start", "-V", "vol0", "--to", to1, "--as", "rep0")
    api(src, "replicate_start", volume="vol0", to=to2, **{"as": "rep0"})
    writes(src.uri(), rng, 40)
    for to in (to1, to2):
        st = caught_up(src, to)
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
    m = metrics(src)
    assert f'cdp_replication_lag_seconds{{volume="vol0",target="{to1}"}} 0.0' in m
    assert f'cdp_replication_state{{volume="vol0",target="{to2}",state="streaming"}} 1.0' in m \
        or f'cdp_replication_state{{volume="vol0",target="{to2}",state="catching-up"}} 1.0' in m
    assert "cdp_replication_sent_bytes_total{" in m
    line = src.cdpctl("status", "-V", "vol0").stdout
    assert f"replication:   -> {to1} as rep0" in line and f"-> {to2} as rep0" in line
    roles = {v["volume"]: v for v in api(t1, "volume_list")}
    assert roles["rep0"]["role"] == "replica" and roles["rep0"]["source"]
    assert roles["vol0"]["role"] == "primary"
    assert "replica" in t1.cdpctl("volume", "list").stdout
    assert "role:          replica of" in t1.cdpctl("status", "-V", "rep0").stdout
    assert {v["volume"]: v for v in api(src, "volume_list")}["vol0"]["role"] == "primary"
    for t in (t1, t2):
        identical(src, t)

    # the target killed -9: the source goes disconnected, then resumes by itself
    t1.kill9()
    writes(src.uri(), rng, 30)
    api(src, "snapshot", volumes=["vol0"], label="two")
    st = wait_state(src, to1, ("disconnected",))
    assert st["lag_records"] and st["lag_seconds"] > 0
    t1.start(120)
    for to, t in ((to1, t1), (to2, t2)):
        caught_up(src, to)
        identical(src, t)

    # the source killed -9: both streams resume at its restart, acked_seq kept
    writes(src.uri(), rng, 30)
    src.kill9()
    src.start(120)
    assert status(src, to1)["acked_seq"]
    writes(src.uri(), rng, 20)
    api(src, "snapshot", volumes=["vol0"], label="three")
    for to, t in ((to1, t1), (to2, t2)):
        caught_up(src, to)
        assert identical(src, t) == 3
    # stop one, the other keeps streaming
    assert src.cdpctl_json("replicate", "stop", "-V", "vol0", "--to", to2)["state"] == "stopped"
    assert status(src, to2)["state"] == "stopped"
    writes(src.uri(), rng, 10)
    caught_up(src, to1)
    for d in (src, t1, t2):
        assert d.proc is not None and d.proc.poll() is None


def test_link_faults_through_a_proxy(repl: ReplEnv) -> None:
    """The link stalled, cut, dropped mid-frame and down; the target SIGSTOPped; the
    source killed -9 with records in flight: caught up and identical after each."""
    require_tool("qemu-io", "qemu-img")
    src = repl.source()
    tgt, direct = repl.target()
    port = int(direct.rsplit(":", 1)[1])
    start_all(src, tgt)
    rng = random.Random(21)
    marks = 0

    def marker() -> None:
        nonlocal marks
        marks += 1
        api(src, "snapshot", volumes=["vol0"], label=f"m{marks}")

    try:
        with TcpFaultProxy("127.0.0.1", port) as proxy:
            to = f"127.0.0.1:{proxy.port}"
            writes(src.uri(), rng, 30)
            marker()
            src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
            caught_up(src, to)

            # stalled: lag grows and is reported; released: caught up
            proxy.set_stall(True)
            writes(src.uri(), rng, 30)
            marker()
            time.sleep(1.5)
            st = status(src, to)
            assert st["lag_records"] and st["lag_seconds"] >= 1.0, st
            proxy.set_stall(False)
            caught_up(src, to)
            assert identical(src, tgt) == marks

            # cut while streaming, and dropped in the middle of a frame
            for fault in ("cut", "mid-frame"):
                if fault == "mid-frame":
                    proxy.cut_after(300_000)
                writes(src.uri(), rng, 30, (1 << 20,))
                if fault == "cut":
                    proxy.cut()
                marker()
                caught_up(src, to)
                assert identical(src, tgt) == marks

            # the link down for a while: disconnected, then back
            proxy.set_down(True)
            writes(src.uri(), rng, 20)
            marker()
            wait_state(src, to, ("disconnected",))
            tried = proxy.connections
            deadline = time.monotonic() + 60
            while proxy.connections == tried:  # a retry met the down link: down a while
                assert time.monotonic() < deadline
                time.sleep(0.1)
            proxy.set_down(False)
            caught_up(src, to, timeout=180)
            assert identical(src, tgt) == marks

            # the target SIGSTOPped and continued
            assert tgt.proc is not None
            os.kill(tgt.proc.pid, signal.SIGSTOP)
            try:
                writes(src.uri(), rng, 30)
                marker()
                time.sleep(1.0)
                assert status(src, to)["lag_records"]
            finally:
                os.kill(tgt.proc.pid, signal.SIGCONT)
            caught_up(src, to)
            assert identical(src, tgt) == marks

            # the source killed -9 with records in flight (held in the stalled link)
            proxy.set_stall(True)
            writes(src.uri(), rng, 30)
            marker()
            time.sleep(0.5)
            src.kill9()
            proxy.set_stall(False)
            proxy.cut()
            src.start(120)
            writes(src.uri(), rng, 10)
            marker()
            caught_up(src, to)
            assert identical(src, tgt) == marks
            assert proxy.connections >= 6
        for d in (src, tgt):
            assert d.proc is not None and d.proc.poll() is None
    finally:
        src.stop()
        tgt.stop()


def test_auth_refused_and_logged_daemon_lives(repl: ReplEnv) -> None:
    """A source with the wrong secret is refused (state refused, logged on both sides);
    a peer that sends HELLO and never proves the secret, a bare magic followed by
    garbage, and a huge pre-auth frame are dropped; nothing is stored, the target lives."""
    require_tool("qemu-io")
    src = repl.source(secret=repl.secret_file("wrong", b"not-the-same-secret-0123"))
    tgt, to = repl.target()
    port = int(to.rsplit(":", 1)[1])
    start_all(src, tgt)
    try:
        writes(src.uri(), random.Random(3), 5)
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        st = wait_state(src, to, ("refused",))
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
        assert "rep0" not in {v["volume"] for v in api(tgt, "volume_list")}
        assert not (tgt.store / "volumes" / "rep0").exists()
        assert "refused" in src.logs()
        assert tgt.proc is not None and tgt.proc.poll() is None
        # the source's refusal survives its restart in status (and it retries, refused again)
        src.stop()
        src.start(120)
        st = wait_state(src, to, ("refused",))
        assert "auth" in str(st["refused"])
        assert json.loads((src.store / "volumes" / "vol0" / "replication.json").read_text())[
            "targets"][0]["refused"]
    finally:
        src.stop()
        tgt.stop()


def test_target_away_longer_than_retention_gets_the_changes(repl: ReplEnv) -> None:
    """The target is stopped while the source's retention expires the history it
    lacks: catch-up falls back to what changed (status and log say so), the replica
    equals the source at the head and at the kept marker of the gap, a point of the gap
    cannot be read there (expired, as at the source), verify clean on both."""
    require_tool("qemu-io", "qemu-img")
    src = repl.source()
    tgt, to = repl.target()
    start_all(src, tgt)
    try:
        rng = random.Random(31)
        src.cdpctl("retention", "set", "-V", "vol0", "all 2s")
        writes(src.uri(), rng, 30)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "base", "--keep", "forever")
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        after = int(caught_up(src, to)["acked_seq"])
        tgt.stop()
        hot = (4096,)  # many overwrites of a few blocks: much history, few changes
        for _ in range(4):
            writes(src.uri(), random.Random(1), 100, hot)
        src.cdpctl("snapshot", "-V", "vol0", "--label", "mid", "--keep", "forever")
        for _ in range(4):
            writes(src.uri(), random.Random(2), 100, hot)
        time.sleep(2.5)
        writes(src.uri(), rng, 10)
        src.cdpctl("gc", "-V", "vol0", "--now")
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(f"vol0@{after + 1}"),
                src.uri("vol0"), check=False)
        assert r.returncode != 0  # expired at the source
        sent = int(status(src, to)["sent_bytes"])
        tgt.start(120)
        st = caught_up(src, to)
        assert "fallback: points @" in src.logs()
        for p in ("vol0@mid", "vol0@base", "vol0"):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(p),
                tgt.uri(p.replace("vol0", "rep0")))
        r = run("qemu-img", "compare", "-f", "raw", "-F", "raw", tgt.uri(f"rep0@{after + 1}"),
                tgt.uri("rep0"), check=False)
        assert r.returncode != 0  # the gap: expired at the target too
        assert int(st["sent_bytes"]) - sent < 800 * 4096, st  # the changes, not 800 writes
        for d in (src, tgt):
            assert api(d, "verify", volume=None)["ok"] is True
    finally:
        src.stop()
        tgt.stop()
