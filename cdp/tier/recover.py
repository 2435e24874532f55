"""Disaster recovery: a new store built from the bucket alone (docs/TIER.md, "Recovery").

    report = recover_store(s3, "s3://bucket/prefix", Path("/new/store"), progress)

For each volume under ``PREFIX/volumes/`` the newest generation manifest that parses
and checks is taken; every object it names is downloaded in 8 MiB ranged GETs, its
sha256 compared with the manifest's before it is used, and put in place (up to four segments at once): segments
through :func:`cdp.journal.install_segment`, then ``volume.json``, ``markers.json``
(already filtered to the generation's ``last_seq``) and the catalog snapshot when every
marker it knows is in the generation. ``store.json`` (a new store uuid) is written last,
so a directory without it is an unfinished recovery that ``cdpd`` refuses to treat as a
store. Maps are not copied: ``cdpd --store DIR`` replays the journal into new maps at
its first open (the journal is the source of truth; docs/ARCHITECTURE.md).

Blocking (network and disk): run it in a thread or from cdpctl. Cost: one listing, one
manifest GET per volume, then the bytes of the newest generation once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cdp.errors import Corruption, NotFound, UsageError
from cdp.fsutil import write_file_atomic
from cdp.journal import install_segment
from cdp.tier.manifest import Manifest, SegmentObject
from cdp.tier.s3 import DEFAULT_PART, S3, parse_s3_url
from cdp.tier.service import CATALOG_FILE, list_volumes, newest_manifest

#: (done bytes, total bytes, what): called from the recovering thread
Progress = Callable[[int, int, str], None]
STORE_FORMAT = 1  # cdp.store's store.json "format" (not imported: the store sits above)
#: segments downloaded at once (each in 8 MiB ranged GETs, one stream per segment)
DOWNLOADS = 4


@dataclass
class RecoverReport:
    store: str
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "volumes": self.volumes, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


def fetch_checked(s3: S3, bucket: str, key: str, size: int, sha256: str, dest: Path,
                  tick: Callable[[int], None] | None = None) -> None:
    """Download ``s3://bucket/key`` to *dest* in ranged GETs, checking its size and
    sha256 against the manifest's; Corruption (and no *dest*) on a mismatch."""
    h = hashlib.sha256()
    got = 0
    try:
        with open(dest, "wb") as f:
            while got < size:
                data = s3.get_range(bucket, key, got, min(DEFAULT_PART, size - got))
                if not data:
                    break
                h.update(data)
                f.write(data)
                got += len(data)
                if tick:
                    tick(len(data))
            f.flush()
            os.fsync(f.fileno())
        if got != size or h.hexdigest() != sha256:
            raise Corruption(f"s3://{bucket}/{key}: {got} bytes with sha256 {h.hexdigest()[:16]}…, "
                             f"the manifest says {size} bytes, {sha256[:16]}…")
    except BaseException:
        with contextlib.suppress(OSError):
            dest.unlink()
        raise


def recover_store(s3: S3, url: str, dest: Path, progress: Progress | None = None) -> RecoverReport:
    """Build a new store in *dest* (absent or empty) from the newest complete
    generation of every volume under *url*, :data:`DOWNLOADS` segments at once. NotFound when the bucket holds none;
    UsageError when *dest* is not empty; Corruption for an object that fails its sha256."""
    t0 = time.monotonic()
    bucket, prefix = parse_s3_url(url)
    dest = dest.resolve()
    if dest.exists() and any(dest.iterdir()):
        raise UsageError(f"{dest} is not empty: recover into a new directory")
    names = list_volumes(s3, bucket, prefix)
    manifests = [m for n in names if (m := newest_manifest(s3, bucket, prefix, n)) is not None]
    if not manifests:
        raise NotFound(f"{url}: no cdp tier generation found (at {s3.endpoint})")
    total = sum(size for m in manifests for _k, size, _s in m.objects())
    done = 0
    report = RecoverReport(str(dest))

    lock = threading.Lock()

    def tick(n: int) -> None:
        nonlocal done
        with lock:
            done += n
            if progress:
                progress(done, total, "recovering")

    dest.mkdir(parents=True, exist_ok=True)
    (dest / "volumes").mkdir(exist_ok=True)
    for m in manifests:
        report.volumes[m.volume] = _recover_volume(s3, bucket, m, dest / "volumes" / m.volume, tick)
    meta = {"format": STORE_FORMAT, "uuid": str(uuid.uuid4()), "created_ns": time.time_ns()}
    write_file_atomic(dest / "store.json", json.dumps(meta, indent=2).encode() + b"\n")
    report.bytes = done
    report.seconds = time.monotonic() - t0
    return report


def _recover_volume(s3: S3, bucket: str, m: Manifest, vdir: Path,
                    tick: Callable[[int], None]) -> dict[str, Any]:
    jdir = vdir / "journal"
    jdir.mkdir(parents=True)

    def one(seg: SegmentObject) -> None:
        fd, name = tempfile.mkstemp(prefix=".recover-", suffix=".tmp", dir=jdir)
        os.close(fd)
        fetch_checked(s3, bucket, seg.key, seg.size, seg.sha256, Path(name), tick)
        install_segment(jdir, seg.first_seq, Path(name))

    with ThreadPoolExecutor(DOWNLOADS) as ex:
        for f in [ex.submit(one, seg) for seg in m.segments]:
            f.result()  # the first failure is raised (the others finish or fail first)
    catalog = False
    for st in m.state:
        if st.name not in ("volume.json", "markers.json", CATALOG_FILE):
            continue
        if st.name == CATALOG_FILE and st.through_seq > m.last_seq:
            tick(st.size)  # knows markers past the generation: the catalog catches up instead
            continue
        part = vdir / f".{st.name}.tmp"
        fetch_checked(s3, bucket, st.key, st.size, st.sha256, part, tick)
        os.rename(part, vdir / st.name)
        catalog = catalog or st.name == CATALOG_FILE
    dfd = os.open(vdir, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    if not (vdir / "volume.json").exists():
        raise Corruption(f"s3://{bucket}: generation {m.generation} of {m.volume} has no volume.json")
    return {"generation": m.generation, "last_seq": m.last_seq, "segments": len(m.segments),
            "catalog": catalog}
