"""cdpd imports only what it needs before NBD listens (issue 27, restart time): the
iSCSI target, metrics, the web console (aiohttp), the replication listener's TLS and
the ops load where their listeners start, after NBD serves; the store imports a kind or
service only when a volume uses it (the proxy kind, the S3 tier with boto3), and the
always-on services their heavy parts only when they work (the catalog's database and
parsers, the sentinel's file evidence); the exports read a replica's role without the
replication pump."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

LATER = ("cdp.targets.iscsi.server", "cdp.metrics", "cdp.web.server", "aiohttp",
         "cdp.ops", "cdp.replication.tls")
#: what a store of mirror volumes with the default settings never needs to serve NBD
UNUSED = ("cdp.tier.service", "botocore", "boto3", "cdp.proxy.volume",
          "cdp.catalog.db", "cdp.catalog.indexer", "sqlite3", "cdp.sentinel.files",
          "cdp.ext4", "cdp.ntfs", "cdp.replication.target", "cdp.replication.protocol")


def _loaded_after(code: str, names: tuple[str, ...]) -> list[str]:
    probe = f"import sys; {code}; print(' '.join(m for m in {names!r} if m in sys.modules))"
    r = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                       check=True)
    return r.stdout.split()


def test_daemon_defers_what_comes_after_nbd() -> None:
    assert _loaded_after("import cdp.daemon", LATER) == []


def test_daemon_imports_no_service_a_default_store_does_not_use() -> None:
    assert _loaded_after("import cdp.daemon", UNUSED) == []


def test_store_open_imports_no_service_a_default_store_does_not_use(tmp_path: Path) -> None:
    """Opening a store of one mirror volume with a write and a marker (retention,
    catalog and sentinel attached, the catalog held as cdpd holds it), on a running
    loop as in cdpd, loads none of them either."""
    code = (
        "import asyncio; from pathlib import Path; "
        "from cdp.config import Settings, VolumeSpec; from cdp.store import Store\n"
        "async def main():\n"
        f"    s = Settings(store=Path({str(tmp_path)!r}), volumes=(VolumeSpec('vol0', 1 << 30),))\n"
        "    st = Store.open(s, hold_catalog=True)\n"
        "    v = st.volumes['vol0']\n"
        "    await (v.write(0, b'x' * 4096, fua=True) or asyncio.sleep(0))\n"
        "    await v.snapshot('m1')\n"
        "    st.close()\n"
        "    st = Store.open(s, hold_catalog=True)\n"
        "    assert len(st.volumes['vol0'].services) == 3\n"
        "    st.close()\n"
        "asyncio.run(main())"
    )
    assert _loaded_after(code, UNUSED) == []
