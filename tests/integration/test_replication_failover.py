"""Failover between two real cdpds (docs/REPLICATION.md "Failover"): a replica refuses
markers and rewinds of its own; ``cdpctl failover --at POINT`` makes it a writable
primary of the next epoch at that point; the old source's stream is refused from then
on (also after its restart), records its new epoch, and none of its later writes
lands on the new primary.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.conftest import require_tool
from tests.integration.test_replication_faults import (
    _caught_up,
    _free_port,
    _secret,
    _source,
    _status,
    _target,
    _wait_state,
    _writes,
)
from tools.harness import run


def test_failover_fences_the_old_source(tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img")
    secret = _secret(tmp_path)
    port = _free_port()
    to = f"127.0.0.1:{port}"
    a, b = _source(tmp_path, secret), _target(tmp_path, "b", secret, port)
    a.start()
    b.start()
    try:
        rng = random.Random(30)
        _writes(a.uri(), rng, 40)
        a.cdpctl("snapshot", "-V", "vol0", "--label", "one")
        a.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        _writes(a.uri(), rng, 40)
        a.cdpctl("snapshot", "-V", "vol0", "--label", "two")
        _caught_up(a, to)
        # a replica takes no marker, rewind or outgoing stream of its own
        for cmd in (("snapshot", "-V", "rep0"), ("rewind", "-V", "rep0", "--to", "one"),
                    ("replicate", "start", "-V", "rep0", "--to", "127.0.0.1:1")):
            r = b.cdpctl(*cmd, check=False)
            assert r.returncode != 0 and ("replica" in r.stderr), (cmd, r.stderr)
        applied = int(_status(a, to)["acked_seq"])

        out = b.cdpctl_json("failover", "-V", "rep0", "--at", "one")
        assert out["role"] == "primary" and out["epoch"] == 2 and out["applied_seq"] == applied
        assert out["rewind_seq"] == applied + 1
        role = json.loads((b.store / "volumes" / "rep0" / "replica.json").read_text())
        assert role["role"] == "primary" and role["epoch"] == 2
        assert role["epochs"][-1] == [2, applied + 1, 0]
        assert {v["volume"]: v for v in b.cdpctl_json("volume", "list")}["rep0"]["role"] == "primary"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", a.uri("vol0@one"), b.uri("rep0"))
        # the old source is fenced: refused (epoch), its new epoch recorded
        st = _wait_state(a, to, ("refused",))
        assert "epoch" in str(st["refused"])
        _writes(a.uri(), rng, 20)
        entry = json.loads((a.store / "volumes" / "vol0" / "replication.json").read_text())["targets"][0]
        assert entry["epoch_seen"] == 2 and "epoch" in entry["refused"]
        # the new primary takes writes and markers; the old source's writes never land
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", b.uri("rep0"))
        b.cdpctl("snapshot", "-V", "rep0", "--label", "after")
        last_b = b.cdpctl_json("status", "-V", "rep0")["last_seq"]
        a.stop()
        a.start()  # resumes the entry: refused again, by epoch
        st = _wait_state(a, to, ("refused",))
        assert "epoch" in str(st["refused"])
        _writes(a.uri(), rng, 10)
        time.sleep(1.0)
        assert b.cdpctl_json("status", "-V", "rep0")["last_seq"] == last_b
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", b.uri("rep0"))
        assert b"Pattern verification failed" not in r.stdout
        assert "failed over" in b.logs()
        for d in (a, b):
            assert d.cdpctl_json("verify")["ok"] is True
            assert d.proc is not None and d.proc.poll() is None
    finally:
        a.stop()
        b.stop()
