"""cdpd: the appliance service (foreground).

    cdpd [--config FILE] [--store DIR] [--nbd HOST:PORT] [--iscsi HOST:PORT | --no-iscsi]
         [--metrics HOST:PORT | --no-metrics] [--http HOST:PORT | --no-http]

Opens (or creates) the store and its volumes, serves NBD and iSCSI, the admin API (a unix socket in
the store, mode 0600), Prometheus metrics and the web console + REST API (docs/WEB.md). SIGTERM/SIGINT: stop accepting, drain
in-flight requests, seal the maps, sync the journal, exit 0.

Design notes: a relative store path is made absolute once, against the directory cdpd was
started from, and every message names that absolute path. Before anything is created,
every listener's address is checked by binding it (:func:`check_listeners`), so a port in
use fails with the option to change (``--nbd``, ``--iscsi``, ``--metrics``, ``--http``) and leaves no
empty store behind; the real bind after the store opened reports the same way (a port
taken in between still fails cleanly, but after the store was opened).

Exit status: 0 after a clean stop; 2 bad configuration or arguments; 6 corruption that
prevents opening; 7 the store is locked by another cdpd; 1 other errors.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING

from cdp import __version__
from cdp.admin import AdminServer
from cdp.config import VOLUME_NAME, Settings, VolumeSpec, load_config
from cdp.errors import CdpError
from cdp.exports import StoreExports
from cdp.fsutil import write_file_atomic
from cdp.retention.service import retention_of
from cdp.store import Store
from cdp.targets.nbd.access import nbd_client_rules
from cdp.targets.nbd.server import NbdServer, serve_nbd
from cdp.volume import SealPacer, Volume

# What only the listeners after NBD need is imported where they start, once NBD serves
# (issue 27, restart time): iSCSI (~0.1 s of imports), metrics, the replication
# listener, the ops behind resume_replication, the web console (aiohttp, ~0.3 s); the
# S3 tier (boto3, ~0.2 s) only when [tier] is on. The store opens with the catalogs
# held (their catch-up opens each catalog database) and releases them once NBD serves.
if TYPE_CHECKING:
    from cdp.metrics import MetricsServer
    from cdp.replication.protocol import OpenRequest
    from cdp.replication.target import Listener as ReplicationListener
    from cdp.targets.iscsi.server import IscsiServer
    from cdp.web.server import WebServer

#: written once the listeners are up, removed at a clean stop
RUNFILE = "cdpd.json"

log = logging.getLogger("cdp.daemon")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="cdpd",
        description="cdp appliance service: journals every write of the protected volumes "
        "and serves them (live and at any point in time) over NBD and iSCSI.",
        epilog="exit status: 0 clean stop, 1 error, 2 bad configuration or arguments, "
        "6 corruption prevents opening, 7 store locked by another cdpd",
    )
    p.add_argument("--config", help="config file (default: $CDP_CONFIG or config/cdp.toml)")
    p.add_argument("--store", help="store directory (default: $CDP_STORE or store.path)")
    p.add_argument("--nbd", metavar="HOST:PORT", help="NBD listener (default 127.0.0.1:10809)")
    p.add_argument("--iscsi", metavar="HOST:PORT", help="iSCSI listener (default 127.0.0.1:3260)")
    p.add_argument("--no-iscsi", action="store_true", help="do not serve iSCSI")
    p.add_argument("--metrics", metavar="HOST:PORT", help="metrics listener (default 127.0.0.1:9809)")
    p.add_argument("--no-metrics", action="store_true", help="do not serve metrics")
    p.add_argument("--http", metavar="HOST:PORT",
                   help="web console and REST API listener (default 127.0.0.1:9810)")
    p.add_argument("--no-http", action="store_true", help="do not serve the web console and API")
    p.add_argument("--log-level", default=os.environ.get("CDP_LOG_LEVEL", "info"))
    p.add_argument("--version", action="version", version=f"cdpd {__version__}")
    return p


def listeners(s: Settings) -> list[tuple[str, str, int]]:
    """The enabled listeners: (the option that sets it, host, port)."""
    out = []
    if s.nbd.enabled:
        out.append(("--nbd", s.nbd.host, s.nbd.port))
    if s.iscsi.enabled:
        out.append(("--iscsi", s.iscsi.host, s.iscsi.port))
    if s.metrics.enabled:
        out.append(("--metrics", s.metrics.host, s.metrics.port))
    if s.http.enabled:
        out.append(("--http", s.http.host, s.http.port))
    return out


def bind_error(option: str, host: str, port: int, exc: OSError) -> CdpError:
    """The error for a listener that cannot bind: names the option and the address."""
    off = {"--iscsi": " or --no-iscsi", "--metrics": " or --no-metrics",
           "--http": " or --no-http"}.get(option, "")
    return CdpError(f"cannot listen on {host}:{port} ({option}): {exc.strerror or exc}; "
                    f"choose another address with {option} HOST:PORT{off}, or stop what uses it")


def check_listeners(s: Settings) -> None:
    """Bind (and release) every enabled listener's address, as asyncio's server will
    (SO_REUSEADDR), so a port in use is reported before the store is created or opened.
    Port 0 (any free port) needs no check. Raises :func:`bind_error`'s CdpError."""
    for option, host, port in listeners(s):
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
            for family, stype, proto, _name, addr in infos:
                with socket.socket(family, stype, proto) as sk:
                    sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                    if family == socket.AF_INET6:
                        sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                    sk.bind(addr)
        except OSError as e:
            raise bind_error(option, host, port, e) from None


class Daemon:
    """The running service; :meth:`run` returns when stopped."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store: Store | None = None
        self._stop = asyncio.Event()
        self.nbd_port: int | None = None
        self.iscsi_port: int | None = None
        self.replication_port: int | None = None
        self.web: WebServer | None = None
        self.started = time.time()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        s = self.settings
        check_listeners(s)  # before the store is created or opened
        t_open = time.monotonic()
        store = Store.open(s, hold_catalog=True)
        self.store = store
        log.info("store opened in %.3f s", time.monotonic() - t_open)
        for v in store.volumes.values():
            log.info(
                "volume %s: %d bytes, last seq %d, %d markers%s",
                v.name, v.size, v.head_seq, len(v.markers),
                f", replayed {v.replayed} records" if v.replayed else "",
            )
            rec = v.journal.recovery
            if getattr(rec, "dropped_records", 0) or getattr(rec, "dropped_bytes", 0):
                log.warning("volume %s: journal recovery: %s", v.name, rec)
        admin = AdminServer(store)
        nbd = None
        iscsi: IscsiServer | None = None
        repl: ReplicationListener | None = None
        metrics = None
        try:
            if s.tier.enabled:  # docs/TIER.md: a bucket without object lock ends cdpd here
                from cdp.tier.service import check_tier

                await asyncio.to_thread(check_tier, s.tier)
            await admin.start()
            if s.nbd.enabled:
                try:
                    nbd = await serve_nbd(StoreExports(store), s.nbd.host, s.nbd.port,
                                          tls=s.nbd_tls.mode, tls_cert=s.nbd_tls.cert,
                                          tls_key=s.nbd_tls.key, tls_ca=s.nbd_tls.ca,
                                          tls_verify_peer=s.nbd_tls.verify_peer,
                                          clients=nbd_client_rules(s.nbd_tls.clients),
                                          psk=dict(s.nbd_tls.psk) or None)
                except OSError as e:
                    raise bind_error("--nbd", s.nbd.host, s.nbd.port, e) from None
                self.nbd_port = nbd.port
                log.info("NBD on %s:%d", s.nbd.host, nbd.port)
            store.release_catalogs()
            if s.iscsi.enabled:
                from cdp.targets.iscsi.server import serve_iscsi

                try:
                    iscsi = await serve_iscsi(
                        StoreExports(store), s.iscsi.host, s.iscsi.port,
                        targets={k: asdict(c) for k, c in s.iscsi.chap},
                        nop_interval=s.iscsi.nop_interval,
                    )
                except OSError as e:
                    raise bind_error("--iscsi", s.iscsi.host, s.iscsi.port, e) from None
                self.iscsi_port = iscsi.port
                log.info("iSCSI on %s:%d", s.iscsi.host, iscsi.port)
            if s.replication.listen.enabled:
                from cdp.config import read_secret
                from cdp.replication.target import listen as listen_replication
                from cdp.replication.tls import server_context

                lst = s.replication.listen
                tls = server_context(s.replication)
                repl, self.replication_port = await listen_replication(
                    lst.host, lst.port, read_secret(s.replication.secret_file),
                    self._replica_lookup(store), tls=tls)
                log.info("replication streams on %s:%d%s", lst.host, self.replication_port,
                         " (TLS)" if tls else "")
            if s.metrics.enabled:
                from cdp.metrics import MetricsServer

                metrics = MetricsServer(store, s.metrics.host, s.metrics.port, self._extra_metrics(nbd))
                try:
                    await metrics.start()
                except OSError as e:
                    metrics = None
                    raise bind_error("--metrics", s.metrics.host, s.metrics.port, e) from None
                log.info("metrics on http://%s:%d/metrics", s.metrics.host, metrics.port)
            if s.http.enabled:
                # aiohttp (~0.3 s of imports) loads here, once NBD is already serving
                from cdp.web.server import WebServer

                web = WebServer(store, s.http)
                try:
                    await web.start()
                except OSError as e:
                    raise bind_error("--http", s.http.host, s.http.port, e) from None
                self.web = web
                log.info("web console on %s://%s:%d/ (`cdpctl web` prints its URL)",
                         web.scheme, s.http.host, web.port)
            from cdp.ops.replication import resume_replication

            n = resume_replication(store)
            if n:
                log.info("replication: resumed %d outgoing stream(s)", n)
            if s.tier.enabled:
                from cdp.tier.service import start_tiers

                n = start_tiers(store.volumes.values())
                log.info("tier: uploading %d volume(s) to %s", n, s.tier.url)
            self._write_runfile(store, nbd, metrics)
            log.info("cdpd %s ready: store %s, admin socket %s", __version__, store.path, admin.path)
            ticker = asyncio.create_task(self._tick())
            await self._stop.wait()
            ticker.cancel()
            log.info("stopping: draining connections")
        finally:
            if nbd is not None:
                nbd.close()
                try:
                    await asyncio.wait_for(nbd.wait_closed(), 30)
                except TimeoutError:  # a client that reads no replies holds its connection
                    nbd.abort()
                except Exception:
                    pass
            if iscsi is not None:
                iscsi.close()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(iscsi.wait_closed(), 30)
            if repl is not None:
                repl.close()  # each stream's appended records commit before the store closes
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(repl.wait_closed(), 30)
            if metrics is not None:
                await metrics.close()
            if self.web is not None:
                await self.web.close()
            await admin.close()
            (store.path / RUNFILE).unlink(missing_ok=True)
            store.close()
            log.info("stopped cleanly: maps sealed, journal synced")

    def _write_runfile(self, store: Store, nbd: NbdServer | None, metrics: MetricsServer | None) -> None:
        """STORE/cdpd.json: pid and the bound addresses (useful with port 0)."""
        s = self.settings
        info = {
            "pid": os.getpid(),
            "version": __version__,
            "nbd": f"{s.nbd.host}:{self.nbd_port}" if nbd is not None else None,
            "iscsi": f"{s.iscsi.host}:{self.iscsi_port}" if self.iscsi_port is not None else None,
            "metrics": f"{s.metrics.host}:{metrics.port}" if metrics is not None else None,
            "replication": (f"{s.replication.listen.host}:{self.replication_port}"
                            if self.replication_port is not None else None),
            "http": (f"{self.web.scheme}://{s.http.host}:{self.web.port}"
                     if self.web is not None else None),
            "admin_socket": str(store.socket_path),
            "started": self.started,
        }
        write_file_atomic(store.path / RUNFILE, json.dumps(info, indent=2).encode() + b"\n")

    def _replica_lookup(self, store: Store) -> Callable[[OpenRequest], Volume | None]:
        """The replica volume a stream names; created (thin, the source's size) on the
        first stream when ``[replication] create`` is on."""
        create = self.settings.replication.create

        def lookup(req: OpenRequest) -> Volume | None:
            v = store.volumes.get(req.volume)
            if v is None and create and VOLUME_NAME.match(req.volume):
                log.info("replication: creating replica volume %s (%d bytes)", req.volume, req.size)
                v = store.create_volume(VolumeSpec(req.volume, req.size))
            return v

        return lookup

    def _extra_metrics(self, nbd: NbdServer | None) -> Callable[[], dict[str, float]]:
        def extra() -> dict[str, float]:
            d = {"cdp_uptime_seconds": time.time() - self.started}
            if nbd is not None:
                d["cdp_nbd_connections"] = float(nbd.connections)
            return d

        return extra

    async def _tick(self) -> None:
        assert self.store is not None
        pacer = SealPacer()  # time-based seals share a budget of loop time
        while True:
            await asyncio.sleep(1.0)
            vols = list(self.store.volumes.values())
            timed = {id(v) for v in pacer.due(vols)}
            for v in vols:
                try:
                    v.tick(seal=id(v) in timed)
                except Exception:
                    log.exception("volume %s: periodic seal failed", v.name)
                try:
                    retention_of(v).tick()  # scheduled gc, store cap (cdp.retention)
                except Exception:
                    log.exception("volume %s: retention tick failed", v.name)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(logging, str(args.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        settings = load_config(args.config).with_overrides(
            store=args.store or os.environ.get("CDP_STORE"),
            nbd=args.nbd,
            metrics=args.metrics,
            iscsi=args.iscsi,
            http=args.http,
        )
        if args.no_metrics:
            settings = replace(settings, metrics=replace(settings.metrics, enabled=False))
        if args.no_http:
            settings = replace(settings, http=replace(settings.http, enabled=False))
        if args.no_iscsi:
            settings = replace(settings, iscsi=replace(settings.iscsi, enabled=False))
        # resolved once, against the directory cdpd was started from
        settings = replace(settings, store=Path(os.path.abspath(settings.store)))
    except CdpError as e:
        print(f"cdpd: {e}", file=sys.stderr)
        return e.exit_status
    daemon = Daemon(settings)

    async def runner() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, daemon.request_stop)
        await daemon.run()

    try:
        import uvloop

        uvloop.run(runner())
    except CdpError as e:
        print(f"cdpd: {e}", file=sys.stderr)
        return e.exit_status
    except OSError as e:
        print(f"cdpd: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
