"""NBD as its peers expect (issue 28): a refused export is logged by cdpd with its name
and reason, and the reason reaches the client as the NBD error string (nbdinfo,
qemu-img)."""

from __future__ import annotations

import os
import socket
import struct
import subprocess
import time
from pathlib import Path

from cdp.targets.nbd.client import NbdClient
from cdp.targets.nbd.proto import Opt
from cdp.targets.testing.nbd_wire import opt
from tests.conftest import require_tool
from tools.harness import Cdpd, run

#: every point older than a second expires at the next gc
_SHORT_RETENTION = """
[volume.retention]
tiers = ["all 1s"]
gc_interval = 0
compact_below = 0.9
compact_rate = "0"
"""


def test_refused_point_in_time_exports_are_logged_and_explained(tmp_path: Path) -> None:
    require_tool("nbdinfo", "qemu-img")
    d = Cdpd(tmp_path, size="16MiB", segment_bytes="1MiB", l0_max_writes=64,
             extra_config=_SHORT_RETENTION).start()
    try:
        with NbdClient.connect(d.uri()) as c:
            for i in range(64):
                c.pwrite(bytes([i + 1]) * 4096, i * 4096)
            c.flush()
        old = d.cdpctl_json("status")["last_seq"]
        time.sleep(1.5)
        with NbdClient.connect(d.uri()) as c:
            for i in range(64):
                c.pwrite(bytes([i + 2]) * 4096, i * 4096)
            c.flush()
        time.sleep(1.5)
        d.cdpctl("gc", "--now", "--json")
        cases = {  # export name -> what its reason says
            f"vol0@@{old}": "expired",
            "vol0@marker9": "marker9",
            "vol0@2024-13-45": "2024-13-45",
        }
        env = {**os.environ, "LIBNBD_DEBUG": "1"}  # libnbd prints the server's message
        for name, why in cases.items():
            r = subprocess.run(["nbdinfo", d.uri(name)], capture_output=True, env=env, timeout=60)
            assert r.returncode != 0, name
            msgs = [ln for ln in r.stderr.decode().splitlines() if "server error message" in ln]
            assert msgs and why in msgs[-1], (name, r.stderr.decode()[-2000:])
            reason = msgs[-1].split("server error message: ", 1)[1]
            r = run("qemu-img", "info", d.uri(name), check=False)
            assert r.returncode != 0
            assert f"server reported: {reason}" in r.stderr.decode(), r.stderr
            logged = [ln for ln in d.logs().splitlines() if f"export {name!r} refused" in ln]
            assert logged and reason in logged[-1], (name, d.logs()[-3000:])
        # the old-style handshake has no error reply: the reason is in the log only
        assert _export_name_reply(d.nbd_port, "vol0@marker9") == b""
        logged = [ln for ln in d.logs().splitlines() if "export 'vol0@marker9' refused" in ln]
        assert len(logged) >= 3, logged
    finally:
        d.stop()


def _export_name_reply(port: int, name: str) -> bytes:
    """Send NBD_OPT_EXPORT_NAME; what the server sends before it closes (nothing, for a
    refused export: that option has no error reply)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        f = s.makefile("rb")
        f.read(18)
        n = name.encode()
        s.sendall(struct.pack(">I", 3) + opt(Opt.EXPORT_NAME, n))
        return f.read()
