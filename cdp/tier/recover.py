"""Disaster recovery: a new store built from the bucket alone (docs/TIER.md, "Recovery").

    report = recover_store(s3, "s3://bucket/prefix", Path("/new/store"), progress)

For each volume under ``PREFIX/volumes/`` the newest generation manifest that parses
and checks is taken; every object it names is downloaded in 8 MiB ranged GETs, its
size and sha256 compared with the manifest's before it is used, and put in place:
segments through :func:`cdp.journal.install_segment`, then ``volume.json``,
``markers.json`` (already filtered to the generation's ``last_seq``) and the catalog
snapshot when every marker it knows is in the generation. ``store.json`` (a new store
uuid) is written last, so a directory without it is an unfinished recovery that
``cdpd`` refuses to treat as a store. Maps are not copied: ``cdpd --store DIR`` replays
the journal into new maps at its first open (the journal is the source of truth;
docs/ARCHITECTURE.md).

Blocking (network and disk): run it in a thread or from cdpctl. Cost: one listing, one
manifest GET per volume, then the bytes of the newest generation once: one GET per
8 MiB, :data:`GETS` at once; each byte received, written and hashed once, never read
back; one fsync per object and per directory.

Design notes
------------
- **Parts, not objects, are the unit of work.** Every object to download (volume by
  volume: its segments in seq order, then its state files) is cut into 8 MiB parts,
  and :data:`GETS` ranged GETs run at once over that one list, in order, as
  s3transfer does within one download. The store sees the same number of requests in
  flight however many segments there are and whatever their size. (Measured before,
  2026-12-07: four segments at once, each one GET after the other, then every
  segment's fsync at the end with nothing left to overlap it: 0.58 of plain boto3's
  ``download_file`` on the split rig, 0.65-0.79 at nice 19 on a loaded machine, about
  1.9 s of the 3.8 s spent in fsync for 315 MiB.)
- **One pass over the bytes.** A part is written where it belongs (``os.pwrite`` into
  the object's temporary file) by the thread that received it, then hashed in order:
  the thread whose part is next for the object's sha256 hashes it and every part
  already waiting after it (one thread per object at a time; sha256 and pwrite run
  without the GIL). A part that arrives early waits in memory; at most :data:`WINDOW`
  parts are received-but-not-hashed or in flight (``WINDOW`` x 8 MiB of memory).
- **Writeback starts as parts land.** After each part's write, the journal's
  ``start_writeback`` (``sync_file_range(SYNC_FILE_RANGE_WRITE)``: queue the range for
  the device, do not wait) on its range; so the object's one fsync, once it is whole
  and checked, waits for little, and the disk writes overlap the downloads instead of
  following them (measured at nice 19: the fsyncs' summed wait 1.1-2.0 s -> 0.4-1.0 s
  per 315 MiB).
- **A partial recovery never looks complete.** Objects land in ``.recover-*.tmp`` files
  and are renamed into place only after their size and sha256 checked; on any failure
  the parts in flight are cancelled or waited for, every temporary file is removed and
  the error raised; ``store.json`` is written only after every object is in place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from cdp.errors import Corruption, NotFound, OutOfRange, UsageError
from cdp.fsutil import write_file_atomic
from cdp.journal import OsFileLayer, install_segment
from cdp.tier.manifest import Manifest
from cdp.tier.s3 import DEFAULT_PART, S3, parse_s3_url
from cdp.tier.service import CATALOG_FILE, list_volumes, newest_manifest

#: (done bytes, total bytes, what): called from the recovering threads, one at a time
Progress = Callable[[int, int, str], None]
STORE_FORMAT = 1  # cdp.store's store.json "format" (not imported: the store sits above)
#: bytes per ranged GET (the last part of an object may be shorter)
PART = DEFAULT_PART
#: ranged GETs in flight at once, over all the objects being recovered
GETS = 8
#: parts in flight or received but not yet hashed (memory: that many parts)
WINDOW = GETS + 4
STATE_FILES = ("volume.json", "markers.json", CATALOG_FILE)
_FS = OsFileLayer()  # start_writeback only


@dataclass
class RecoverReport:
    store: str
    volumes: dict[str, dict[str, Any]] = field(default_factory=dict)
    bytes: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"store": self.store, "volumes": self.volumes, "bytes": self.bytes,
                "seconds": round(self.seconds, 3)}


class _Download:
    """One object being downloaded into its temporary file *tmp* and hashed in order;
    *place* puts the checked file where it belongs (it fsyncs it)."""

    def __init__(self, bucket: str, key: str, size: int, sha256: str, tmp: Path,
                 place: Callable[[Path], None]) -> None:
        self.bucket, self.key, self.size, self.sha256 = bucket, key, size, sha256
        self.tmp, self.place = tmp, place
        self.fd = -1  # opened when its first part is asked for (see open)
        self.hash = hashlib.sha256()
        self.lock = threading.Lock()
        self.hashed = 0  # bytes hashed so far: the offset of the next part in line
        self.waiting: dict[int, bytes] = {}  # offset -> part received ahead of its turn
        self.hashing = False  # a thread is hashing this object's parts
        self.done = False  # checked and in place: its temporary file is gone

    def where(self) -> str:
        return f"s3://{self.bucket}/{self.key}"

    def open(self) -> None:
        """Create the temporary file (the object's first part is about to be asked for:
        only the objects in the window hold a descriptor)."""
        self.fd = os.open(self.tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class _Recovery:
    """The part pipeline of one :func:`recover_store` (see the design notes)."""

    def __init__(self, s3: S3, total: int, progress: Progress | None) -> None:
        self.s3 = s3
        self.total = total
        self.progress = progress
        self.done_bytes = 0
        self.lock = threading.Lock()
        self.slots = threading.Semaphore(WINDOW)
        self.failed = threading.Event()
        self.downloads: list[_Download] = []

    def tick(self, n: int) -> None:
        with self.lock:
            self.done_bytes += n
            if self.progress:
                self.progress(self.done_bytes, self.total, "recovering")

    def run(self, objects: list[_Download]) -> None:
        """Download, check and place every object; the first failure raised, after every
        part in flight ended and every temporary file is removed."""
        futures: list[Future[None]] = []
        try:
            with ThreadPoolExecutor(GETS, thread_name_prefix="cdp-recover") as pool:
                try:
                    self._submit(pool, objects, futures)
                except BaseException:
                    self.failed.set()
                    raise
                finally:
                    if self.failed.is_set():
                        for f in futures:
                            f.cancel()
            for f in futures:
                exc = None if f.cancelled() else f.exception()
                if exc is not None and not isinstance(exc, _Stopped):
                    raise exc
        finally:
            for d in self.downloads:
                d.close()
                if not d.done:
                    with contextlib.suppress(OSError):
                        d.tmp.unlink()

    def _submit(self, pool: ThreadPoolExecutor, objects: list[_Download],
                futures: list[Future[None]]) -> None:
        """Every part of every object to *pool*, in order, at most :data:`WINDOW` not
        yet hashed; stops at the first failure."""
        for d in objects:
            self.downloads.append(d)
            d.open()
            if d.size == 0:
                self._finish(d)
                continue
            for off in range(0, d.size, PART):
                while not self.slots.acquire(timeout=0.2):
                    if self.failed.is_set():
                        return
                if self.failed.is_set():
                    return
                futures.append(pool.submit(self._part, d, off, min(PART, d.size - off)))

    def _part(self, d: _Download, off: int, length: int) -> None:
        """GET one part, write it in place, and hash it (and the parts waiting after it)
        if it is next in line."""
        handed = False  # once _hash has the part, the slot is released when it is hashed
        try:
            if self.failed.is_set():
                raise _Stopped()
            try:
                data = self.s3.get_range(d.bucket, d.key, off, length)
            except OutOfRange:
                data = b""
            if len(data) != length:
                raise Corruption(f"{d.where()}: {len(data)} bytes at offset {off}, the "
                                 f"manifest says {d.size} bytes in all (an object of another size)")
            view = memoryview(data)
            at = 0
            while at < length:
                at += os.pwrite(d.fd, view[at:], off + at)
            _FS.start_writeback(d.fd, off, length)
            self.tick(length)
            handed = True
            self._hash(d, off, data)
        except BaseException:
            self.failed.set()
            if not handed:
                self.slots.release()
            raise

    def _hash(self, d: _Download, off: int, data: bytes) -> None:
        with d.lock:
            d.waiting[off] = data
            if d.hashing:
                return  # the thread hashing this object will take it
            d.hashing = True
        while True:
            with d.lock:
                part = d.waiting.pop(d.hashed, None)
                if part is None:
                    d.hashing = False
                    return
            d.hash.update(part)
            self.slots.release()
            with d.lock:
                d.hashed += len(part)
                whole = d.hashed == d.size
            if whole:
                self._finish(d)
                return

    def _finish(self, d: _Download) -> None:
        """Check the whole object against the manifest, then put it in place."""
        got = d.hash.hexdigest()
        d.close()
        if got != d.sha256:
            raise Corruption(f"{d.where()}: {d.size} bytes with sha256 {got[:16]}…, "
                             f"the manifest says {d.sha256[:16]}…")
        d.place(d.tmp)
        d.done = True


class _Stopped(Exception):
    """A part not fetched because another one failed first."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _place_state(dest: Path) -> Callable[[Path], None]:
    def place(tmp: Path) -> None:
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, dest)

    return place


def _plan_volume(bucket: str, m: Manifest, vdir: Path,
                 tick: Callable[[int], None]) -> tuple[list[_Download], dict[str, Any]]:
    """The downloads that recover volume *m* into *vdir* (made here, with its journal
    directory), and its line of the report."""
    if m.state_named("volume.json") is None:
        raise Corruption(f"s3://{bucket}: generation {m.generation} of {m.volume} has no volume.json")
    jdir = vdir / "journal"
    jdir.mkdir(parents=True)
    out: list[_Download] = []
    for seg in m.segments:
        out.append(_Download(bucket, seg.key, seg.size, seg.sha256,
                             jdir / f".recover-{seg.first_seq:020d}.tmp",
                             partial(_install, jdir, seg.first_seq)))
    catalog = False
    for st in m.state:
        if st.name not in STATE_FILES:
            continue
        if st.name == CATALOG_FILE and st.through_seq > m.last_seq:
            tick(st.size)  # knows markers past the generation: the catalog catches up instead
            continue
        out.append(_Download(bucket, st.key, st.size, st.sha256, vdir / f".{st.name}.tmp",
                             _place_state(vdir / st.name)))
        catalog = catalog or st.name == CATALOG_FILE
    return out, {"generation": m.generation, "last_seq": m.last_seq,
                 "segments": len(m.segments), "catalog": catalog}


def _install(jdir: Path, first_seq: int, tmp: Path) -> None:
    install_segment(jdir, first_seq, tmp)  # header checked, fsync, rename, directory fsync


def recover_store(s3: S3, url: str, dest: Path, progress: Progress | None = None) -> RecoverReport:
    """Build a new store in *dest* (absent or empty) from the newest complete
    generation of every volume under *url* (see the module notes). NotFound when the
    bucket holds none; UsageError when *dest* is not empty; Corruption for an object
    whose size or sha256 is not the manifest's, naming its key."""
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
    report = RecoverReport(str(dest))
    rec = _Recovery(s3, total, progress)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "volumes").mkdir(exist_ok=True)
    objects: list[_Download] = []
    for m in manifests:
        got, report.volumes[m.volume] = _plan_volume(bucket, m, dest / "volumes" / m.volume,
                                                     rec.tick)
        objects += got
    rec.run(objects)
    for m in manifests:
        _fsync_dir(dest / "volumes" / m.volume)
    _fsync_dir(dest / "volumes")
    meta = {"format": STORE_FORMAT, "uuid": str(uuid.uuid4()), "created_ns": time.time_ns()}
    write_file_atomic(dest / "store.json", json.dumps(meta, indent=2).encode() + b"\n")
    report.bytes = rec.done_bytes
    report.seconds = time.monotonic() - t0
    return report
