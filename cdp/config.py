"""Typed settings loaded from ``config/cdp.toml``.

The defaults here and the documented file ``config/cdp.toml`` are the same (a test
checks it). Unknown keys and bad values raise :class:`ConfigError` naming the key
(``journal.sync: expected one of 'flush', 'always', got 'sometimes'``).
"""

from __future__ import annotations

import os
import re
import ssl
import sys
import tomllib
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cdp.errors import ConfigError, UsageError
from cdp.units import parse_duration, parse_hostport, parse_size

#: volume names are used in paths and NBD/iSCSI export names
#: the admin socket in the store directory (cdpctl finds the daemon by it)
SOCKET_NAME = "cdpd.sock"

VOLUME_NAME = re.compile(r"^[a-z0-9][a-z0-9_.-]{0,63}$")

REPO_CONFIG = Path(__file__).resolve().parent.parent / "config" / "cdp.toml"


@dataclass(frozen=True)
class JournalSettings:
    segment_bytes: int = 256 << 20
    sync: str = "flush"
    #: records after which a segment is sealed too (bounds the scan at open)
    segment_records: int = 65536


@dataclass(frozen=True)
class MapSettings:
    l0_max_writes: int = 8192
    seal_interval: float = 5.0
    fanout: int = 8
    full_every: int = 64
    cache_bytes: int = 256 << 20


@dataclass(frozen=True)
class ReadSettings:
    payload_cache_bytes: int = 64 << 20
    view_cache_bytes: int = 64 << 20


@dataclass(frozen=True)
class Listener:
    enabled: bool
    host: str
    port: int

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class NbdClientAccess:
    """One ``[[nbd.client]]`` row: a client certificate ``subject`` (RFC 4514, as
    written) or a pre-shared key ``user``, and the volumes (or "*") it may read and
    write, or only read."""

    subject: str
    read_write: tuple[str, ...] = ()
    read_only: tuple[str, ...] = ()
    user: str = ""


@dataclass(frozen=True)
class NbdTls:
    """``[nbd] tls``: "off" (STARTTLS refused), "on" (offered), "require" (nothing but
    STARTTLS and ABORT before TLS); ``tls_cert`` / ``tls_key``: PEM files.
    ``tls_verify_peer``: clients need a certificate signed by ``tls_ca`` (PEM);
    ``clients``: the ``[[nbd.client]]`` access rows (none: every verified client may
    use every volume). ``tls_psk``: a pre-shared key file (``user:hexkey`` lines, as
    ``nbdkit --tls-psk``) instead of certificates; ``psk`` holds its keys."""

    mode: str = "off"
    cert: str = ""
    key: str = ""
    ca: str = ""
    verify_peer: bool = False
    clients: tuple[NbdClientAccess, ...] = ()
    psk_file: str = ""
    psk: tuple[tuple[str, bytes], ...] = ()


@dataclass(frozen=True)
class HttpSettings:
    """``[http]``: the web console and REST API (docs/WEB.md). On by default, on
    loopback; TLS when both ``tls_cert`` and ``tls_key`` are set."""

    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 9810
    tls_cert: str = ""
    tls_key: str = ""

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


@dataclass(frozen=True)
class ChapSettings:
    user: str
    secret: str
    mutual_user: str = ""
    mutual_secret: str = ""


@dataclass(frozen=True)
class IscsiSettings:
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = 3260
    #: seconds between NOP-In pings to idle initiators (0: off)
    nop_interval: float = 30.0
    #: CHAP per target: key = target IQN, volume or export name, "*" or "discovery"
    chap: tuple[tuple[str, ChapSettings], ...] = ()

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Tier:
    """One retention tier: keep ``every`` (0 = every write, else the last point of each
    interval of that many seconds) for ``span`` seconds; ``text`` as written."""

    every: float
    span: float
    text: str


def parse_tier(v: Any, key: str) -> Tier:
    """``"all 48h"``, ``"1h 14d"`` (or ``all:48h``): (keep, for)."""
    if not isinstance(v, str):
        raise ConfigError(f"{key}: expected a tier like 'all 48h' or '1h 14d', got {v!r}")
    parts = v.replace(":", " ").split()
    if len(parts) == 3 and parts[1] == "for":
        parts = [parts[0], parts[2]]
    if len(parts) != 2:
        raise ConfigError(f"{key}: expected KEEP FOR like 'all 48h' or '1h 14d', got {v!r}")
    keep, span = parts
    every = 0.0 if keep == "all" else _duration(keep, key)
    if keep != "all" and every <= 0:
        raise ConfigError(f"{key}: granularity must be positive, got {keep!r}")
    sp = _duration(span, key)
    if sp <= 0:
        raise ConfigError(f"{key}: tier length must be positive, got {span!r}")
    return Tier(every, sp, f"{keep} {span}")


def parse_tiers(v: Any, key: str) -> tuple[Tier, ...]:
    """A list of tiers, newest first: "all" only first, granularities never finer with age."""
    if not isinstance(v, list | tuple):
        raise ConfigError(f"{key}: expected a list of tiers like ['all 48h', '1h 14d']")
    tiers = tuple(parse_tier(t, f"{key}[{i}]") for i, t in enumerate(v))
    for i, t in enumerate(tiers):
        if t.every == 0 and i:
            raise ConfigError(f"{key}[{i}]: 'all' can only be the first (newest) tier")
        if i and tiers[i - 1].every and t.every < tiers[i - 1].every:
            raise ConfigError(f"{key}[{i}]: tiers must not get finer with age")
    return tiers


DEFAULT_TIERS = (Tier(0.0, 48 * 3600.0, "all 48h"), Tier(3600.0, 14 * 86400.0, "1h 14d"),
                 Tier(86400.0, 90 * 86400.0, "1d 90d"))


@dataclass(frozen=True)
class RetentionSettings:
    #: consecutive age bands, newest first (docs/RETENTION.md)
    tiers: tuple[Tier, ...] = DEFAULT_TIERS
    #: journal + map bytes of one volume before on_full applies (0: no cap)
    max_store_bytes: int = 0
    #: "expire": expire the oldest history early (loudly); "refuse": ENOSPC to the host
    on_full: str = "expire"
    #: seconds between scheduled gc runs in cdpd (0: only `cdpctl gc --now`)
    gc_interval: float = 600.0
    #: sealed segments whose live fraction is below this are compacted
    compact_below: float = 0.8
    #: budget of compaction while the volume is busy: segment bytes per second (0:
    #: unthrottled)
    compact_rate: int = 64 << 20
    #: host write bytes/s above which the volume is busy; below, compaction runs
    #: unthrottled (0: always at compact_rate)
    compact_busy_writes: int = 16 << 20


def _fraction(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
        raise ConfigError(f"{key}: expected a number from 0 to 1, got {v!r}")
    return float(v)


def _retention(raw: Any, name: str, base: RetentionSettings) -> RetentionSettings:
    schema: dict[str, Callable[[Any, str], Any]] = {
        "tiers": parse_tiers, "max_store_bytes": _size(0),
        "on_full": _choice("expire", "refuse"), "gc_interval": _duration,
        "compact_below": _fraction, "compact_rate": _size(0),
        "compact_busy_writes": _size(0),
    }
    return replace(base, **_table(raw, name, schema))


@dataclass(frozen=True)
class SentinelSettings:
    """[sentinel]: the ransomware sentinel of every volume (docs/SENTINEL.md)."""

    enabled: bool = True
    #: seconds per time bucket of the detector
    bucket_seconds: float = 10.0
    #: seconds of history the learned baseline (max share per bucket) covers
    baseline_window: float = 7 * 86400.0
    #: floor of the threshold: share of written bytes that are suspect
    min_share: float = 0.2
    #: added to the learned maximum share
    margin: float = 0.1
    #: estimated suspect bytes a bucket needs before it can alert
    min_suspect_bytes: int = 1 << 20
    #: bits per byte (of a 512-byte sample) at or above which bytes are high entropy
    entropy_bits: float = 7.0
    #: reads of overwritten bytes per second (the rest are extrapolated)
    checks_per_second: int = 20
    #: shell command run on an alert, the alert JSON on stdin ("": none)
    on_alert: str = ""
    #: files turned from low to high entropy that alert on their own (file evidence)
    min_files: int = 10
    #: directories with new ransom notes that add 0.5 to the file score
    note_dirs: int = 3
    #: ransom-note file names (case-insensitive globs)
    ransom_notes: tuple[str, ...] = ("readme*.txt", "how_to_decrypt*", "how_to_recover*",
                                     "*decrypt*instructions*", "*restore*files*.txt",
                                     "!readme*", "_readme*", "recovery*.txt", "*ransom*")
    #: suspect files accumulate over this window (slow attacks)
    slow_window: float = 3600.0


def _bits(v: Any, key: str) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not 0 < v <= 8:
        raise ConfigError(f"{key}: expected bits per byte above 0 and at most 8, got {v!r}")
    return float(v)


def _sentinel(raw: Any) -> SentinelSettings:
    schema: dict[str, Callable[[Any, str], Any]] = {
        "enabled": _bool, "bucket_seconds": _duration, "baseline_window": _duration,
        "min_share": _fraction, "margin": _fraction, "min_suspect_bytes": _size(0),
        "entropy_bits": _bits, "checks_per_second": _int(1, 1_000_000),
        "on_alert": lambda v, k: v if isinstance(v, str) else _str(v, k),
        "min_files": _int(1, 1_000_000), "note_dirs": _int(0, 1_000_000),
        "ransom_notes": _str_list, "slow_window": _duration,
    }
    t = _table(raw, "sentinel", schema)
    if "bucket_seconds" in t and t["bucket_seconds"] <= 0:
        raise ConfigError(f"sentinel.bucket_seconds: must be positive, got {raw['bucket_seconds']!r}")
    s = replace(SentinelSettings(), **t)
    if s.baseline_window < s.bucket_seconds:
        raise ConfigError("sentinel.baseline_window: must be at least one bucket_seconds")
    return s


@dataclass(frozen=True)
class VolumeSpec:
    name: str
    size: int
    #: "mirror" (the host mirrors writes to us) or "proxy" (we own the primary too)
    mode: str = "mirror"
    #: proxy mode: the primary volume (file, block device or nbd:// URL)
    primary: str = ""
    #: proxy mode: acknowledge when the "primary" write completed, or "both" sides
    ack: str = "primary"
    drl_region: int = 1 << 20
    initial_copy: bool = True
    #: proxy mode: initial copy throttle, bytes/s (0: unthrottled)
    copy_rate: int = 0
    #: this volume's retention ([volume.retention] over [retention]); None: the global one
    retention: RetentionSettings | None = None


@dataclass(frozen=True)
class ReplicationSettings:
    """``[replication]``: accept replication streams (docs/REPLICATION.md); off by default."""

    listen: Listener = field(default_factory=lambda: Listener(False, "127.0.0.1", 7420))
    #: file holding the shared secret (at least 16 bytes; refused if group/other can read it)
    secret_file: str = ""
    #: create the replica volume on the first stream naming an unknown volume
    create: bool = True
    #: TLS for both directions when all three are set (PEM files; docs/REPLICATION.md):
    #: this appliance's certificate and key, and the CA that signed its peers'
    tls_cert: str = ""
    tls_key: str = ""
    tls_ca: str = ""
    #: bytes of each replicated volume's newest stored records kept in memory, which its
    #: streams ship without reading the journal back (0: read everything back)
    ship_window: int = 64 << 20


def read_secret(path: str, key: str = "replication.secret_file") -> bytes:
    """The shared secret in *path* (surrounding whitespace stripped). ConfigError if it
    is missing, readable by group or others, or shorter than 16 bytes."""
    if not path:
        raise ConfigError(f"{key}: needed to accept or send replication streams")
    try:
        st = os.stat(path)
        if st.st_mode & 0o044:
            raise ConfigError(f"{key}: {path} can be read by group or others (chmod 600 it)")
        secret = Path(path).read_bytes().strip()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path!r}: {e.strerror}") from None
    if len(secret) < 16:
        raise ConfigError(f"{key}: the secret in {path} is shorter than 16 bytes")
    return secret


def _replication(raw: Any) -> ReplicationSettings:
    d = ReplicationSettings()
    t = _table(raw, "replication", {"listen": _str, "secret_file": _str, "create": _bool,
                                    "tls_cert": _str, "tls_key": _str, "tls_ca": _str,
                                    "ship_window": _size(0)})
    lst = d.listen
    if "listen" in t:
        lst = _listener(t["listen"], "replication.listen", d.listen.port, True)
    rs = ReplicationSettings(lst, t.get("secret_file", ""), t.get("create", d.create),
                             t.get("tls_cert", ""), t.get("tls_key", ""), t.get("tls_ca", ""),
                             t.get("ship_window", d.ship_window))
    tls = [k for k in ("tls_cert", "tls_key", "tls_ca") if t.get(k)]
    if tls and len(tls) != 3:
        raise ConfigError("replication: tls_cert, tls_key and tls_ca go together "
                          f"(only {', '.join(tls)} set)")
    if lst.enabled:
        read_secret(rs.secret_file)
    return rs


@dataclass(frozen=True)
class TierSettings:
    """``[tier]``: sealed history tiered to S3 object storage (docs/TIER.md); off when absent."""

    #: ``s3://BUCKET/PREFIX`` ("" = off)
    url: str = ""
    #: S3 endpoint URL (None: the SDK's default, AWS)
    endpoint: str | None = None
    region: str | None = None
    #: AWS-style credentials file (None: the SDK's chain); refused if group/other can read it
    credentials_file: Path | None = None
    #: age of a sealed segment before it goes up (seconds)
    upload_after: float = 0.0
    #: bytes of tiered history that may stay on local disk
    local_cache_bytes: int = 1 << 30
    #: COMPLIANCE retention of every object, in days (0: none)
    object_lock_days: int = 0
    #: upload bytes/s (0: no limit)
    rate: int = 0

    @property
    def enabled(self) -> bool:
        return bool(self.url)


def _tier(raw: Any) -> TierSettings:
    schema: dict[str, Callable[[Any, str], Any]] = {
        "url": _str, "endpoint": _str, "region": _str, "credentials_file": _str,
        "upload_after": _duration, "local_cache_bytes": _size(0),
        "object_lock_days": _int(0, 36500), "rate": _size(0),
    }
    t = _table(raw, "tier", schema)
    if not t:
        return TierSettings()
    if "url" not in t:
        raise ConfigError("tier.url: needed (s3://BUCKET/PREFIX)")
    if not t["url"].startswith("s3://") or len(t["url"]) <= 5 or t["url"][5] == "/":
        raise ConfigError(f"tier.url: expected s3://BUCKET/PREFIX, got {t['url']!r}")
    if "credentials_file" in t:
        t["credentials_file"] = Path(t["credentials_file"])
    return TierSettings(**t)


@dataclass(frozen=True)
class Settings:
    store: Path = Path("store")
    journal: JournalSettings = field(default_factory=JournalSettings)
    maps: MapSettings = field(default_factory=MapSettings)
    read: ReadSettings = field(default_factory=ReadSettings)
    nbd: Listener = field(default_factory=lambda: Listener(True, "127.0.0.1", 10809))
    metrics: Listener = field(default_factory=lambda: Listener(True, "127.0.0.1", 9809))
    iscsi: IscsiSettings = field(default_factory=IscsiSettings)
    volumes: tuple[VolumeSpec, ...] = (VolumeSpec("vol0", 10 << 30),)
    nbd_tls: NbdTls = field(default_factory=NbdTls)
    source: str = "built-in defaults"
    retention: RetentionSettings = field(default_factory=RetentionSettings)
    replication: ReplicationSettings = field(default_factory=ReplicationSettings)
    sentinel: SentinelSettings = field(default_factory=SentinelSettings)
    tier: TierSettings = field(default_factory=TierSettings)
    http: HttpSettings = field(default_factory=HttpSettings)

    def retention_for(self, volume: str) -> RetentionSettings:
        """The volume's configured retention (its [volume.retention] or [retention])."""
        for v in self.volumes:
            if v.name == volume and v.retention is not None:
                return v.retention
        return self.retention

    def with_overrides(
        self,
        *,
        store: str | None = None,
        nbd: str | None = None,
        metrics: str | None = None,
        iscsi: str | None = None,
        http: str | None = None,
    ) -> Settings:
        """Apply command-line / environment overrides (``--store``, ``--nbd``, ...)."""
        s = self
        if store:
            s = replace(s, store=Path(store))
        if nbd:
            s = replace(s, nbd=_listener(nbd, "--nbd", 10809, True))
        if metrics:
            s = replace(s, metrics=_listener(metrics, "--metrics", 9809, True))
        if iscsi:
            lst = _listener(iscsi, "--iscsi", 3260, True)
            s = replace(s, iscsi=replace(s.iscsi, enabled=True, host=lst.host, port=lst.port))
        if http:
            lst = _listener(http, "--http", 9810, True)
            s = replace(s, http=replace(s.http, enabled=True, host=lst.host, port=lst.port))
        return s


def _listener(value: str, what: str, default_port: int, enabled: bool) -> Listener:
    try:
        host, port = parse_hostport(value, what, default_port)
    except UsageError as e:
        raise ConfigError(str(e)) from None
    return Listener(enabled, host, port)


# ---------------------------------------------------------------------------------------
# validation helpers: each takes (value, key) and returns the typed value or raises


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    def check(v: Any, key: str) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            raise ConfigError(f"{key}: expected an integer from {lo} to {hi}, got {v!r}")
        return v

    return check


def _size(lo: int) -> Callable[[Any, str], int]:
    def check(v: Any, key: str) -> int:
        try:
            n = parse_size(v, key)
        except UsageError as e:
            raise ConfigError(str(e)) from None
        if n < lo:
            raise ConfigError(f"{key}: must be at least {lo} bytes, got {v!r}")
        return n

    return check


def _duration(v: Any, key: str) -> float:
    try:
        return parse_duration(v, key)
    except UsageError as e:
        raise ConfigError(str(e)) from None


def _choice(*choices: str) -> Callable[[Any, str], str]:
    def check(v: Any, key: str) -> str:
        if v not in choices:
            opts = ", ".join(repr(c) for c in choices)
            raise ConfigError(f"{key}: expected one of {opts}, got {v!r}")
        return str(v)

    return check


def _bool(v: Any, key: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{key}: expected true or false, got {v!r}")
    return v


def _region(v: Any, key: str) -> int:
    n = _size(4096)(v, key)
    if n & (n - 1) or n > 1 << 30:
        raise ConfigError(f"{key}: must be a power of two from 4KiB to 1GiB, got {v!r}")
    return n


def _str(v: Any, key: str) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{key}: expected a non-empty string, got {v!r}")
    return v


def _table(raw: dict[str, Any], name: str, schema: dict[str, Callable[[Any, str], Any]]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ConfigError(f"{name}: expected a table, got {raw!r}")
    unknown = sorted(set(raw) - set(schema))
    if unknown:
        raise ConfigError(
            f"{name}.{unknown[0]}: unknown key (known keys: {', '.join(sorted(schema))})"
        )
    return {k: schema[k](v, f"{name}.{k}") for k, v in raw.items()}


_SECTIONS = {"store", "journal", "maps", "read", "nbd", "metrics", "iscsi", "volume", "retention",
             "replication", "sentinel", "tier", "http"}


def _iscsi(raw: Any) -> IscsiSettings:
    d = IscsiSettings()
    t = _table(
        raw, "iscsi",
        {"enabled": _bool, "listen": _str, "nop_interval": _duration, "chap": lambda v, k: v},
    )
    host, port = d.host, d.port
    if "listen" in t:
        lst = _listener(t["listen"], "iscsi.listen", 3260, True)
        host, port = lst.host, lst.port
    chap: list[tuple[str, ChapSettings]] = []
    raw_chap = t.get("chap", {})
    if not isinstance(raw_chap, dict):
        raise ConfigError("iscsi.chap: expected tables like [iscsi.chap.vol0]")
    for key, entry in raw_chap.items():
        name = f"iscsi.chap.{key}"
        c = _table(
            entry, name,
            {"user": _str, "secret": _str, "mutual_user": _str, "mutual_secret": _str},
        )
        if "user" not in c or "secret" not in c:
            raise ConfigError(f"{name}: needs both user and secret")
        if ("mutual_user" in c) != ("mutual_secret" in c):
            raise ConfigError(f"{name}: mutual CHAP needs both mutual_user and mutual_secret")
        if len(c["secret"]) < 12:
            raise ConfigError(f"{name}.secret: CHAP secrets must be at least 12 characters")
        chap.append((str(key), ChapSettings(**c)))
    return IscsiSettings(
        enabled=t.get("enabled", d.enabled), host=host, port=port,
        nop_interval=t.get("nop_interval", d.nop_interval), chap=tuple(chap),
    )


def parse_config(data: dict[str, Any], source: str = "<config>") -> Settings:
    """Validate a decoded TOML document and return :class:`Settings`."""
    unknown = sorted(set(data) - _SECTIONS)
    if unknown:
        raise ConfigError(f"{unknown[0]}: unknown section (known: {', '.join(sorted(_SECTIONS))})")
    d = Settings()
    store = _table(data.get("store", {}), "store", {"path": _str})
    j = _table(
        data.get("journal", {}),
        "journal",
        {"segment_bytes": _size(1 << 20), "sync": _choice("flush", "always"),
         "segment_records": _int(1024, 1 << 30)},
    )
    m = _table(
        data.get("maps", {}),
        "maps",
        {
            "l0_max_writes": _int(16, 10_000_000),
            "seal_interval": _duration,
            "fanout": _int(2, 1024),
            "full_every": _int(1, 1_000_000),
            "cache_bytes": _size(1 << 20),
        },
    )
    r = _table(data.get("read", {}), "read", {"payload_cache_bytes": _size(0), "view_cache_bytes": _size(0)})
    listeners = {}
    tls = NbdTls()
    for name, default in (("nbd", d.nbd), ("metrics", d.metrics)):
        # one schema per section: its "known keys" in an error are exactly what it takes
        schema = {**_LISTENER, **(_NBD_TLS if name == "nbd" else {})}
        t = _table(data.get(name, {}), name, schema)
        if name == "nbd":
            tls = _nbd_tls({k: t.pop(k) for k in _NBD_TLS if k in t})
        lst = default
        if "listen" in t:
            lst = _listener(t["listen"], f"{name}.listen", default.port, default.enabled)
        if "enabled" in t:
            lst = replace(lst, enabled=t["enabled"])
        listeners[name] = lst
    glob_ret = _retention(data.get("retention", {}), "retention", RetentionSettings())
    raw_vols = data.get("volume", [{"name": v.name, "size": v.size} for v in d.volumes])
    if not isinstance(raw_vols, list):
        raise ConfigError("volume: expected an array of tables ([[volume]])")
    vols = []
    seen = set()
    for i, rv in enumerate(raw_vols):
        t = _table(rv, f"volume[{i}]", {
            "name": _str, "size": _size(512), "mode": _choice("mirror", "proxy"),
            "primary": _str, "ack": _choice("primary", "both"), "drl_region": _region,
            "initial_copy": _bool, "copy_rate": _size(0), "retention": lambda v, k: v,
        })
        if "retention" in t:
            t["retention"] = _retention(t["retention"], f"volume[{i}].retention", glob_ret)
        proxy = t.get("mode") == "proxy"
        if proxy and "primary" not in t:
            raise ConfigError(f"volume[{i}].primary: mode = \"proxy\" needs a primary (file, device or nbd:// URL)")
        if not proxy:
            for k in ("primary", "ack", "drl_region", "initial_copy", "copy_rate"):
                if k in t:
                    raise ConfigError(f"volume[{i}].{k}: only with mode = \"proxy\"")
        if "name" not in t or ("size" not in t and not proxy):
            raise ConfigError(f"volume[{i}]: needs both name and size")
        t.setdefault("size", 0)  # proxy: the primary's size
        if not VOLUME_NAME.match(t["name"]):
            raise ConfigError(
                f"volume[{i}].name: {t['name']!r} is not a valid volume name "
                "(lowercase letters, digits, '_', '.', '-'; at most 64)"
            )
        if t["name"] in seen:
            raise ConfigError(f"volume[{i}].name: duplicate volume {t['name']!r}")
        if t["size"] % 512:  # (0 = the primary's size, proxy mode)
            raise ConfigError(f"volume[{i}].size: must be a multiple of 512, got {t['size']}")
        seen.add(t["name"])
        vols.append(VolumeSpec(**t))
    return Settings(
        store=Path(store.get("path", str(d.store))),
        journal=replace(d.journal, **j),
        maps=replace(d.maps, **m),
        read=replace(d.read, **r),
        nbd=listeners["nbd"],
        metrics=listeners["metrics"],
        iscsi=_iscsi(data.get("iscsi", {})),
        volumes=tuple(vols),
        source=source,
        retention=glob_ret,
        sentinel=_sentinel(data.get("sentinel", {})),
        nbd_tls=tls,
        replication=_replication(data.get("replication", {})),
        tier=_tier(data.get("tier", {})),
        http=_http(data.get("http", {})),
    )


def _http(raw: Any) -> HttpSettings:
    """``[http]``: listen, enabled, tls_cert + tls_key (both or neither, readable)."""
    d = HttpSettings()
    t = _table(raw, "http", {"enabled": _bool, "listen": _str, "tls_cert": _str, "tls_key": _str})
    host, port = d.host, d.port
    if "listen" in t:
        lst = _listener(t["listen"], "http.listen", 9810, True)
        host, port = lst.host, lst.port
    cert, key = t.get("tls_cert", ""), t.get("tls_key", "")
    if bool(cert) != bool(key):
        raise ConfigError("http.tls_cert, http.tls_key: TLS needs both (or neither)")
    for k, path in (("tls_cert", cert), ("tls_key", key)):
        if path and not os.access(path, os.R_OK):
            raise ConfigError(f"http.{k}: cannot read {path!r}")
    return HttpSettings(t.get("enabled", d.enabled), host, port, cert, key)


#: the keys of a listener section (``[nbd]``, ``[metrics]``)
_LISTENER: dict[str, Callable[[Any, str], Any]] = {"enabled": _bool, "listen": _str}
#: ``[nbd]``'s TLS keys, validated by :func:`_table` with the listener's
_NBD_TLS: dict[str, Callable[[Any, str], Any]] = {
    "tls": _choice("off", "on", "require"), "tls_cert": _str, "tls_key": _str,
    "tls_ca": _str, "tls_verify_peer": _bool, "tls_psk": _str,
    "client": lambda v, k: _nbd_clients(v, k)}


def _nbd_clients(raw: Any, name: str) -> tuple[NbdClientAccess, ...]:
    """``[[nbd.client]]``: each row a ``subject`` (ATTR=value parts, commas between) or
    a PSK ``user``, and lists of volume names (or "*") ``read_write`` / ``read_only``."""
    if not isinstance(raw, list):
        raise ConfigError(f"{name}: expected an array of tables ([[nbd.client]])")
    rows = []
    for i, r in enumerate(raw):
        what = f"{name}[{i}]"
        t = _table(r, what, {"subject": _str, "user": _str, "read_write": _str_list,
                             "read_only": _str_list})
        subject, user = t.get("subject", ""), t.get("user", "")
        if subject and user:
            raise ConfigError(f"{what}: give a certificate subject or a PSK user, not both")
        if not user and (not subject or any("=" not in part for part in subject.split(","))):
            raise ConfigError(f"{what}.subject: expected a certificate subject such as "
                              f"\"CN=backup01,O=Example\" (or a PSK user), got {subject!r}")
        rows.append(NbdClientAccess(subject, t.get("read_write", ()), t.get("read_only", ()),
                                    user))
    return tuple(rows)


def _str_list(v: Any, key: str) -> tuple[str, ...]:
    if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
        raise ConfigError(f"{key}: expected a list of strings, got {v!r}")
    return tuple(v)


def psk_supported() -> bool:
    """Whether this Python's ``ssl`` can serve TLS pre-shared keys (3.13 and newer)."""
    return bool(getattr(ssl, "HAS_PSK", False)) and hasattr(ssl.SSLContext,
                                                            "set_psk_server_callback")


def read_psk_file(path: str, key: str = "nbd.tls_psk") -> tuple[tuple[str, bytes], ...]:
    """The ``(user, key)`` pairs of a PSK file: ``user:hexkey`` lines, as ``psktool``
    writes and ``nbdkit --tls-psk`` reads (blank lines and ``#`` comments skipped).
    ConfigError if it is missing, readable by group or others, empty, or malformed."""
    try:
        if os.stat(path).st_mode & 0o044:
            raise ConfigError(f"{key}: {path} can be read by group or others (chmod 600 it)")
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"{key}: cannot read {path!r}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{key}: {path} is not a text file of user:hexkey lines") from None
    pairs: dict[str, bytes] = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, hexkey = line.rpartition(":")
        try:
            psk = bytes.fromhex(hexkey)
        except ValueError:
            psk = b""
        if not sep or not user or not psk:
            raise ConfigError(f"{key}: {path} line {n}: expected user:hexkey")
        if user in pairs:
            raise ConfigError(f"{key}: {path} line {n}: user {user!r} appears twice")
        pairs[user] = psk
    if not pairs:
        raise ConfigError(f"{key}: {path} holds no user:hexkey line")
    return tuple(pairs.items())


def _nbd_tls(t: dict[str, Any]) -> NbdTls:
    """``[nbd]``'s TLS keys (already validated): a mode other than "off" needs both
    files, readable, or a PSK file."""
    tls = NbdTls(t.get("tls", "off"), t.get("tls_cert", ""), t.get("tls_key", ""),
                 t.get("tls_ca", ""), t.get("tls_verify_peer", False), t.get("client", ()),
                 t.get("tls_psk", ""))
    if tls.psk_file:
        return _nbd_psk(tls)
    if any(c.user for c in tls.clients):
        raise ConfigError("nbd.client: a row with user = ... needs tls_psk (a pre-shared "
                          "key file)")
    if tls.mode != "off":
        for key, path in (("tls_cert", tls.cert), ("tls_key", tls.key)):
            if not path:
                raise ConfigError(f"nbd.{key}: needed with tls = {tls.mode!r}")
            if not os.access(path, os.R_OK):
                raise ConfigError(f"nbd.{key}: cannot read {path!r}")
    if tls.verify_peer:
        if tls.mode != "require":  # else a plaintext client would bypass the check
            raise ConfigError('nbd.tls_verify_peer: needs tls = "require"')
        if not tls.ca:
            raise ConfigError("nbd.tls_ca: needed with tls_verify_peer = true")
        if not os.access(tls.ca, os.R_OK):
            raise ConfigError(f"nbd.tls_ca: cannot read {tls.ca!r}")
    elif tls.clients:
        raise ConfigError("nbd.client: needs tls_verify_peer = true (clients are named by "
                          "their certificate)")
    return tls


def _nbd_psk(tls: NbdTls) -> NbdTls:
    """``[nbd] tls_psk``: pre-shared keys instead of certificates (as nbdkit, one or
    the other); ``[[nbd.client]]`` rows then name PSK users and need tls = "require"."""
    if tls.mode == "off":
        raise ConfigError('nbd.tls_psk: needs tls = "on" or "require"')
    for k, v in (("tls_cert", tls.cert), ("tls_key", tls.key), ("tls_ca", tls.ca),
                 ("tls_verify_peer", tls.verify_peer)):
        if v:
            raise ConfigError(f"nbd.{k}: not used with tls_psk (clients prove a pre-shared "
                              f"key, not a certificate): set one or the other")
    if tls.clients:
        if tls.mode != "require":  # else a plaintext client would bypass the check
            raise ConfigError('nbd.client: PSK users need tls = "require"')
        for i, c in enumerate(tls.clients):
            if not c.user:
                raise ConfigError(f"nbd.client[{i}]: with tls_psk a row names a PSK user "
                                  f"(user = ...), not a certificate subject")
    if not psk_supported():
        raise ConfigError(f"nbd.tls_psk: this Python ({sys.version.split()[0]}) has no TLS "
                          f"pre-shared keys in its ssl module; run cdpd on Python 3.13 or "
                          f"newer (docs/NBD.md)")
    return replace(tls, psk=read_psk_file(tls.psk_file))


def load_config(path: str | os.PathLike[str] | None = None) -> Settings:
    """Load settings from *path*, ``$CDP_CONFIG``, the repository's ``config/cdp.toml``,
    or the built-in defaults, in that order of preference."""
    chosen = path or os.environ.get("CDP_CONFIG")
    if chosen is None:
        if not REPO_CONFIG.exists():
            return Settings()
        chosen = REPO_CONFIG
    p = Path(chosen)
    try:
        data = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"config file {p} not found") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    return parse_config(data, str(p))
