"""Prometheus metrics (text exposition format) on a small loopback HTTP listener."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from cdp import memtrim
from cdp.replication.source import STATES, sources_of
from cdp.retention.service import retention_of
from cdp.sentinel.service import sentinel_of
from cdp.store import Store
from cdp.tier.service import tier_of


def render(store: Store, extra: Callable[[], dict[str, float]] | None = None) -> str:
    """The metrics page. Cost: O(volumes)."""
    lines: list[str] = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[dict[str, str], float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            lines.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")

    vols = sorted(store.volumes.values(), key=lambda v: v.name)

    def per(fn: Callable[[Any], float]) -> list[tuple[dict[str, str], float]]:
        return [({"volume": v.name}, float(fn(v))) for v in vols]

    def stat(v: Any, key: str) -> float:
        return float(getattr(v.journal.stats(), key))

    metric("cdp_writes_total", "counter", "Write and zero requests journalled since start.", per(lambda v: v.writes))
    metric("cdp_written_bytes_total", "counter", "Bytes written by hosts since start.", per(lambda v: v.bytes_written))
    metric("cdp_reads_total", "counter", "Read requests since start.", per(lambda v: v.reads))
    metric("cdp_read_bytes_total", "counter", "Bytes read since start.", per(lambda v: v.bytes_read))
    metric("cdp_flushes_total", "counter", "Durability waits (FLUSH/FUA) completed.", per(lambda v: v.flushes))
    metric("cdp_flush_seconds_total", "counter", "Time spent waiting for durability.", per(lambda v: v.flush_seconds))
    metric("cdp_journal_bytes", "gauge", "Bytes stored in the journal.", per(lambda v: stat(v, "file_bytes")))
    metric("cdp_live_bytes", "gauge", "Payload bytes written to the volume (uncompressed).", per(lambda v: stat(v, "raw_bytes")))
    metric("cdp_journal_records", "gauge", "Records in the journal.", per(lambda v: stat(v, "records")))
    metric("cdp_last_seq", "gauge", "Newest sequence number.", per(lambda v: v.head_seq))
    metric("cdp_markers", "gauge", "Markers of the volume.", per(lambda v: len(v.markers)))
    metric("cdp_connections", "gauge", "Open target connections to the volume.", per(lambda v: v.connections))
    metric("cdp_paused", "gauge", "1 while the volume's writes are held.", per(lambda v: v.paused))
    metric("cdp_store_over_cap", "gauge", "1 while the volume's store is at its max_store_bytes cap.", per(lambda v: retention_of(v).over_cap))
    metric("cdp_retention_expired_points_total", "counter", "Points given up by retention since start.", per(lambda v: retention_of(v).expired_total))
    metric("cdp_gc_reclaimed_bytes_total", "counter", "Store bytes given back by gc since start.", per(lambda v: retention_of(v).reclaimed_total))
    metric("cdp_retention_keep_after_seq", "gauge", "Every point at or after this seq is recoverable.", per(lambda v: v.maps.keep_after))
    tv = [(v, t) for v in vols if (t := tier_of(v)) is not None]  # docs/TIER.md
    if tv:
        def tper(fn: Callable[[Any], float]) -> list[tuple[dict[str, str], float]]:
            return [({"volume": v.name}, float(fn(t))) for v, t in tv]

        ts = {v.name: t.status() for v, t in tv}
        metric("cdp_tier_generation", "gauge", "Newest tier generation uploaded.", tper(lambda t: ts[t.vol.name]["generation"]))
        metric("cdp_tier_uploaded_segments", "gauge", "Segments in the newest tier generation.", tper(lambda t: ts[t.vol.name]["uploaded_segments"]))
        metric("cdp_tier_uploaded_bytes", "gauge", "Bytes of segments in the newest tier generation.", tper(lambda t: ts[t.vol.name]["uploaded_bytes"]))
        metric("cdp_tier_pending_segments", "gauge", "Sealed segments not uploaded yet.", tper(lambda t: ts[t.vol.name]["pending_segments"]))
        metric("cdp_tier_oldest_pending_age_seconds", "gauge", "Age of the oldest segment waiting for upload.", tper(lambda t: ts[t.vol.name]["oldest_pending_age_seconds"]))
        metric("cdp_tier_sent_bytes_total", "counter", "Segment bytes sent to the bucket since start.", tper(lambda t: t.sent_bytes))
        metric("cdp_tier_failures_total", "counter", "Upload batches that failed since start.", tper(lambda t: t.failures))
        metric("cdp_tier_up", "gauge", "0 while the bucket is unreachable or refuses us.", tper(lambda t: t.state not in ("unreachable", "refused")))
    sv = [(v, s) for v in vols if (s := sentinel_of(v)) is not None]  # docs/SENTINEL.md
    if sv:
        def sper(fn: Callable[[Any], float]) -> list[tuple[dict[str, str], float]]:
            return [({"volume": v.name}, float(fn(s))) for v, s in sv]

        metric("cdp_sentinel_alerts_total", "counter", "Ransomware sentinel alerts raised since start.", sper(lambda s: s.alerts_total))
        metric("cdp_sentinel_active_alerts", "gauge", "Sentinel alerts not dismissed.", sper(lambda s: s.status()["active_alerts"]))
        metric("cdp_sentinel_suspect_writes_total", "counter", "Checked writes of high-entropy bytes over low-entropy data.", sper(lambda s: s.suspect_writes))
        metric("cdp_sentinel_checked_writes_total", "counter", "High-entropy writes whose overwritten bytes were read.", sper(lambda s: s.checked_writes))
        metric("cdp_sentinel_high_entropy_bytes_total", "counter", "Bytes written with high entropy (rate: the entropy rate).", sper(lambda s: s.high_entropy_bytes))
        metric("cdp_sentinel_threshold", "gauge", "Suspect share of written bytes that alerts.", sper(lambda s: s.det.threshold()))
    px = [v for v in vols if v.mode == "proxy"]  # proxy mode (docs/PROXY.md)
    if px:
        def pper(fn: Callable[[Any], float]) -> list[tuple[dict[str, str], float]]:
            return [({"volume": v.name}, float(fn(v))) for v in px]

        metric("cdp_proxy_degraded", "gauge", "1 while the journal owes a catch-up from the primary.", pper(lambda v: v.degraded is not None))
        metric("cdp_proxy_dirty_regions", "gauge", "Dirty regions in the DRL.", pper(lambda v: v.drl.dirty_count))
        metric("cdp_proxy_primary_errors_total", "counter", "Failed primary I/O since start.", pper(lambda v: v.primary_errors))
        metric("cdp_proxy_journal_errors_total", "counter", "Failed journal writes since start.", pper(lambda v: v.journal_errors))
    rs = [(v, s.status()) for v in vols for s in sources_of(v)]  # docs/REPLICATION.md
    if rs:
        def rper(key: str) -> list[tuple[dict[str, str], float]]:
            return [({"volume": v.name, "target": r["target"]}, float(r[key])) for v, r in rs]

        metric("cdp_replication_lag_seconds", "gauge", "Age of the oldest write the target has not acknowledged as durable.", rper("lag_seconds"))
        metric("cdp_replication_lag_records", "gauge", "Records the target has not acknowledged.", rper("lag_records"))
        metric("cdp_replication_acked_seq", "gauge", "Newest seq the target acknowledged as durable.", rper("acked_seq"))
        metric("cdp_replication_sent_bytes_total", "counter", "Stored record bytes sent to the target since start.", rper("sent_bytes"))
        metric("cdp_replication_state", "gauge", "1 for the stream's current state.",
               [({"volume": v.name, "target": r["target"], "state": st}, float(r["state"] == st))
                for v, r in rs for st in STATES])
    metric("cdp_malloc_trims_total", "counter", "Allocator trims after seals (cdp.memtrim) since start.",
           [({}, float(memtrim.calls))])
    metric("cdp_malloc_trim_seconds_total", "counter", "Time the allocator trims took.",
           [({}, memtrim.seconds)])
    if extra:
        for k, val in extra().items():
            metric(k, "gauge", k.replace("_", " ") + ".", [({}, val)])
    return "\n".join(lines) + "\n"


class MetricsServer:
    def __init__(self, store: Store, host: str, port: int, extra: Callable[[], dict[str, float]] | None = None) -> None:
        self.store = store
        self.host = host
        self.port = port
        self.extra = extra
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            first = head.split(b"\r\n", 1)[0].split()
            if len(first) >= 2 and first[0] == b"GET" and first[1].split(b"?")[0] == b"/metrics":
                body = render(self.store, self.extra).encode()
                status, ctype = b"200 OK", b"text/plain; version=0.0.4"
            else:
                body, status, ctype = b"not found: try /metrics\n", b"404 Not Found", b"text/plain"
            writer.write(
                b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype
                + b"\r\nContent-Length: " + str(len(body)).encode()
                + b"\r\nConnection: close\r\n\r\n" + body
            )
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()
