"""Failover and failback between two real cdpds (docs/REPLICATION.md "Failover and
failback"): a replica refuses markers and rewinds of its own; ``cdpctl failover --at
POINT`` makes it a writable primary of the next epoch at that point; the old source's
stream is refused from then on (also after its restart), records its new epoch, and
none of its later writes lands on the new primary. Then ``replicate start`` from the
new primary to the old source fails back: the old source rewinds to the newest common
point, receives only what changed since (bytes bounded by the changes), becomes a
replica identical to the new primary, and its divergent point stays readable.
"""

from __future__ import annotations

import json
import random
import time
from pathlib import Path

from tests.conftest import require_tool
from tests.integration.replication_env import (
    ReplEnv,
    api,
    caught_up,
    start_all,
    status,
    wait_state,
    writes,
)
from tools.harness import run


def test_failover_fences_the_old_source(repl: ReplEnv, tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img")
    (a, back), (b, to) = repl.target("a"), repl.target("b")
    start_all(a, b)
    try:
        rng = random.Random(30)
        writes(a.uri(), rng, 40)
        api(a, "snapshot", volumes=["vol0"], label="one")
        a.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        writes(a.uri(), rng, 40)
        api(a, "snapshot", volumes=["vol0"], label="two")
        caught_up(a, to)
        # a replica takes no marker, rewind or outgoing stream of its own
        for cmd in (("snapshot", "-V", "rep0"), ("rewind", "-V", "rep0", "--to", "one"),
                    ("replicate", "start", "-V", "rep0", "--to", "127.0.0.1:1")):
            r = b.cdpctl(*cmd, check=False)
            assert r.returncode != 0 and ("replica" in r.stderr), (cmd, r.stderr)
        applied = int(status(a, to)["acked_seq"])

        out = b.cdpctl_json("failover", "-V", "rep0", "--at", "one")
        assert out["role"] == "primary" and out["epoch"] == 2 and out["applied_seq"] == applied
        assert out["rewind_seq"] == applied + 1
        role = json.loads((b.store / "volumes" / "rep0" / "replica.json").read_text())
        assert role["role"] == "primary" and role["epoch"] == 2
        assert role["epochs"][-1] == [2, applied + 1, 0]
        assert {v["volume"]: v for v in api(b, "volume_list")}["rep0"]["role"] == "primary"
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", a.uri("vol0@one"), b.uri("rep0"))
        # the old source is fenced: refused (epoch), its new epoch recorded
        st = wait_state(a, to, ("refused",))
        assert "epoch" in str(st["refused"])
        writes(a.uri(), rng, 20)
        entry = json.loads((a.store / "volumes" / "vol0" / "replication.json").read_text())["targets"][0]
        assert entry["epoch_seen"] == 2 and "epoch" in entry["refused"]
        # the new primary takes writes and markers; the old source's writes never land
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x77 0 64k", b.uri("rep0"))
        api(b, "snapshot", volumes=["rep0"], label="after")
        last_b = api(b, "status", volumes=["rep0"])[0]["last_seq"]
        a.stop()
        a.start(120)  # resumes the entry: refused again, by epoch
        st = wait_state(a, to, ("refused",))
        assert "epoch" in str(st["refused"])
        writes(a.uri(), rng, 10)
        time.sleep(1.0)
        assert api(b, "status", volumes=["rep0"])[0]["last_seq"] == last_b
        r = run("qemu-io", "-f", "raw", "-c", "read -P 0x77 0 64k", b.uri("rep0"))
        assert b"Pattern verification failed" not in r.stdout
        assert "failed over" in b.logs()
        for d in (a, b):
            assert api(d, "verify", volume=None)["ok"] is True
            assert d.proc is not None and d.proc.poll() is None

        # failback: the new primary streams to the old source, which keeps its
        # divergent point (with a marker whose id the new primary also used)
        api(a, "snapshot", volumes=["vol0"], label="adiv")
        div = tmp_path / "adiv.raw"
        run("qemu-img", "convert", "-f", "raw", "-O", "raw", a.uri("vol0@adiv"), str(div))
        a_last = api(a, "status", volumes=["vol0"])[0]["last_seq"]
        b.cdpctl("replicate", "start", "-V", "rep0", "--to", back, "--as", "vol0")
        st = caught_up(b, back, vol="rep0")
        # only what changed since the common point crossed the wire: the rewind, one
        # 64 KiB write and a marker, not the ~15 MiB the volume holds
        assert 0 < int(st["sent_bytes"]) < (1 << 20), st
        role = json.loads((a.store / "volumes" / "vol0" / "replica.json").read_text())
        assert role["role"] == "replica" and role["epoch"] == 2
        epoch, first, d = role["epochs"][-1]
        assert epoch == 2 and first == a_last + 2 and d == a_last + 1 - applied
        assert role["marker_ids"], role  # B's marker "after" took an id A had used
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", b.uri("rep0"), a.uri("vol0"))
        for m in ("one", "two", "after"):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", b.uri(f"rep0@{m}"),
                a.uri(f"vol0@{m}"))
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", str(div), a.uri("vol0@adiv"))
        assert {v["volume"]: v for v in api(a, "volume_list")}["vol0"]["role"] == "replica"
        # the stream goes on, and resumes after the old source restarts
        run("qemu-io", "-f", "raw", "-c", "write -P 0x78 1M 64k", b.uri("rep0"))
        api(b, "snapshot", volumes=["rep0"], label="later")
        a.stop()
        a.start(120)
        caught_up(b, back, vol="rep0")
        for x, y in (("rep0", "vol0"), ("rep0@later", "vol0@later")):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", b.uri(x), a.uri(y))
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", a.uri("vol0"), check=False)
        assert r.returncode != 0  # a replica again: read-only to hosts
        for d in (a, b):
            assert api(d, "verify", volume=None)["ok"] is True
    finally:
        a.stop()
        b.stop()
