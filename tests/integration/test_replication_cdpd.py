"""A real cdpd accepting replication streams ([replication] listen): a source volume
(in this process, shipped by ReplicationSource over loopback) arrives as a replica that
qemu-img finds identical over NBD at the marker and at the head; garbage and a wrong
secret on the port are refused and the daemon lives on.

Then two cdpds: `cdpctl replicate start`, a restart of the source, stop.
"""

from __future__ import annotations

import asyncio
import random
import socket
from pathlib import Path

from cdp.config import Settings
from cdp.replication.source import ReplicationSource
from cdp.volume import Volume
from tests.conftest import require_tool
from tests.integration.replication_env import (
    SECRET,
    SIZE,
    ReplEnv,
    api,
    caught_up,
    start_all,
    writes,
)
from tools.harness import run


def test_replica_in_cdpd_identical_over_nbd(repl: ReplEnv, tmp_path: Path) -> None:
    require_tool("qemu-img")
    target, to = repl.target()
    port = int(to.rsplit(":", 1)[1])
    target.start(120)
    try:
        # garbage on the port: refused, the daemon lives on
        with socket.create_connection(("127.0.0.1", port)) as c:
            c.sendall(b"GET / HTTP/1.0\r\n\r\n" * 10)
            c.settimeout(5)
            try:
                while c.recv(4096):
                    pass
            except OSError:
                pass

        async def main() -> None:
            s = Settings(store=tmp_path / "src-store")
            vol = Volume.create(tmp_path / "src", "rep0", SIZE, s)
            try:
                bad = ReplicationSource(vol, "127.0.0.1", port, b"wrong-secret-0123456789")
                bad.start()
                for _ in range(500):
                    if bad.state == "refused":
                        break
                    await asyncio.sleep(0.01)
                assert bad.refused is not None and bad.refused[0] == "auth"
                rng = random.Random(11)
                for _ in range(300):
                    ln = rng.choice((4096, 65536, 1 << 20))
                    off = rng.randrange(0, SIZE - ln) & ~4095
                    r = vol.write(off, rng.randbytes(ln))
                    if r is not None:
                        await r
                m = await vol.snapshot("half")
                (tmp_path / "marker.raw").write_bytes(vol.read(0, SIZE, m.seq))
                rep = ReplicationSource(vol, "127.0.0.1", port, SECRET)
                vol.attach(rep)
                rep.start()
                for _ in range(200):  # more writes while streaming
                    off = rng.randrange(0, SIZE - 8192) & ~511
                    r = vol.write(off, rng.randbytes(8192))
                    if r is not None:
                        await r
                await vol.flush()
                await rep.wait_acked(vol.journal.last_seq, timeout=120)
                assert rep.status()["lag_records"] == 0
                (tmp_path / "head.raw").write_bytes(vol.read(0, SIZE))
                rep.stop()
            finally:
                vol.close()

        asyncio.run(main())
        for export, ref in (("rep0@marker1", "marker.raw"), ("rep0@half", "marker.raw"),
                            ("rep0", "head.raw")):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", target.uri(export),
                str(tmp_path / ref))
        assert target.proc is not None and target.proc.poll() is None
        log = target.log.read_text()
        assert "failed authentication" in log and "bad magic" in log
    finally:
        target.stop()


def test_two_cdpds_replicate_start_restart_stop(repl: ReplEnv) -> None:
    require_tool("qemu-io", "qemu-img")
    src = repl.source()
    tgt, to = repl.target()
    start_all(src, tgt)
    try:
        rng = random.Random(5)
        writes(src.uri(), rng, 60)
        api(src, "snapshot", volumes=["vol0"], label="one")
        src.cdpctl("replicate", "start", "-V", "vol0", "--to", to, "--as", "rep0")
        writes(src.uri(), rng, 60)  # while streaming
        st = caught_up(src, to)
        assert st["acked_seq"] and st["sent_bytes"]
        for a, b in (("vol0@one", "rep0@one"), ("vol0", "rep0")):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(a), tgt.uri(b))
        # the source restarts: replication resumes by itself from replication.json
        src.stop()
        src.start(120)
        writes(src.uri(), rng, 40)
        api(src, "snapshot", volumes=["vol0"], label="two")
        caught_up(src, to)
        for a, b in (("vol0@one", "rep0@one"), ("vol0@two", "rep0@two"), ("vol0", "rep0")):
            run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(a), tgt.uri(b))
        # a replica's live export is read-only to hosts: a write there is refused and
        # the replica still equals its source
        r = run("qemu-io", "-f", "raw", "-c", "write -P 0x5a 0 4k", tgt.uri("rep0"), check=False)
        assert r.returncode != 0, r.stdout
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri("vol0"), tgt.uri("rep0"))
        out = src.cdpctl_json("replicate", "stop", "-V", "vol0")
        assert out["state"] == "stopped"
        assert src.cdpctl_json("replicate", "status")[0]["state"] == "stopped"
        assert "resumed 1 outgoing stream" in src.logs()
    finally:
        src.stop()
        tgt.stop()
