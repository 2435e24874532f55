"""cdpd imports only what it needs before NBD listens (issue 27, restart time): the
iSCSI target, metrics, the web console (aiohttp), the replication listener's TLS and
the ops load where their listeners start, after NBD serves."""

from __future__ import annotations

import subprocess
import sys

LATER = ("cdp.targets.iscsi.server", "cdp.metrics", "cdp.web.server", "aiohttp",
         "cdp.ops", "cdp.replication.tls")


def test_daemon_defers_what_comes_after_nbd() -> None:
    code = ("import sys, cdp.daemon; "
            f"print(' '.join(m for m in {LATER!r} if m in sys.modules))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.split() == []
