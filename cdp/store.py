"""The store: a directory holding every protected volume, the lock and the admin socket.

Layout (see docs/FORMATS.md, "Store layout")::

    STORE/store.json          format, uuid, creation time
    STORE/lock                flock()ed by the process that owns the store (cdpd)
    STORE/cdpd.sock           admin API of the running daemon (mode 0600)
    STORE/volumes/NAME/       one protected volume (volume.json, markers.json,
                              journal/, maps/)
    STORE/deleted/NAME.UUID/  a deleted volume whose files are still being removed

The store is the composition root: it picks a volume's kind by volume.json "mode"
(:func:`volume_kind`) and attaches the per-volume services (retention, the file
catalog, the sentinel) through :meth:`cdp.volume.Volume.attach` (:func:`open_volume`,
:func:`attach_services`). Nothing below it knows the kinds or the services.

Restart time (issue 27): a kind or service that not every store uses is imported when a
volume uses it: the proxy kind (~0.05 s of imports) when a proxy volume opens, the S3
tier (boto3, ~0.2 s) when ``[tier] url`` is set. The services every volume has
(retention, the catalog, the sentinel) attach at open, before cdpd serves, so they see
every write; their heavy parts (the catalog's parsers and database, the sentinel's file
evidence) load at their first use. ``Store.open(..., hold_catalog=True)`` also leaves
the catalogs' catch-up (which opens each catalog database) to
:meth:`Store.release_catalogs`, which cdpd calls once NBD listens.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

from cdp.catalog.service import attach_catalog, service_for
from cdp.config import SOCKET_NAME, VOLUME_NAME, Settings, VolumeSpec
from cdp.errors import Corruption, NotFound, StoreLocked, UsageError
from cdp.fsutil import write_file_atomic
from cdp.retention.service import attach_retention
from cdp.sentinel.service import attach_sentinel
from cdp.volume import Volume, read_meta

log = logging.getLogger("cdp.store")

STORE_FORMAT = 1  # store.json "format"

#: the values of volume.json "mode" ("mirror" when absent), see :func:`volume_kind`
VOLUME_MODES = ("mirror", "proxy")


def volume_kind(mode: str) -> type[Volume] | None:
    """The volume kind of volume.json "mode" *mode*, None for an unknown one. The
    proxy kind's modules are imported by its first use (module docstring)."""
    if mode == "mirror":
        return Volume
    if mode == "proxy":
        from cdp.proxy.volume import ProxyVolume

        return ProxyVolume
    return None


def attach_services(vol: Volume, *, hold_catalog: bool = False) -> None:
    """Attach the services of a served volume: retention (store cap, expired points,
    gc), then the file catalog (a background MFT diff at every marker; with
    *hold_catalog* it queues markers until :meth:`CatalogService.catch_up`), then the
    ransomware sentinel unless ``[sentinel] enabled = false``, then the S3 tier when
    ``[tier] url`` is set (its modules are imported only then)."""
    attach_retention(vol)
    catalog = attach_catalog(vol, hold=hold_catalog)
    if vol.settings.sentinel.enabled:
        attach_sentinel(vol).use_catalog(catalog)
    if vol.settings.tier.enabled:
        from cdp.tier.service import attach_tier

        attach_tier(vol)


def open_volume(vdir: Path, settings: Settings, *, hold_catalog: bool = False) -> Volume:
    """Open the volume in *vdir* as its kind (volume.json "mode") with its services
    attached (:func:`attach_services`). Corruption for an unknown mode or damaged
    files; NotFound if none."""
    mode = read_meta(vdir).get("mode", "mirror")
    cls = volume_kind(mode)
    if cls is None:
        raise Corruption(f"{vdir / 'volume.json'}: unknown mode {mode!r}")
    vol = cls.open(vdir, settings)
    try:
        attach_services(vol, hold_catalog=hold_catalog)
    except BaseException:
        vol.close()
        raise
    return vol


class Store:
    """An opened store and its volumes. Holds the store lock until :meth:`close`."""

    def __init__(self, path: Path, settings: Settings, lock_fd: int) -> None:
        self.path = path
        self.settings = settings
        self._lock_fd = lock_fd
        self.volumes: dict[str, Volume] = {}
        #: volumes that could not be opened because a store file is damaged: name ->
        #: the error. They are not served (the others are) until ``cdpctl verify --repair``.
        self.damaged: dict[str, str] = {}

    @property
    def socket_path(self) -> Path:
        return self.path / SOCKET_NAME

    @classmethod
    def open(cls, settings: Settings, *, create: bool = True,
             hold_catalog: bool = False) -> Store:
        """Open (or create) the store at ``settings.store``, take its lock, open every
        volume (running journal recovery) and create configured volumes that are missing.
        A volume whose files are damaged (Corruption) is left closed and listed in
        :attr:`damaged`; the other volumes open and are served. *hold_catalog*: the
        catalogs catalog nothing until :meth:`release_catalogs` (cdpd: once NBD serves).

        Raises StoreLocked if another process holds the store.
        """
        path = settings.store.resolve()
        meta_path = path / "store.json"
        if not meta_path.exists():
            if not create:
                raise NotFound(f"no cdp store at {path} (start cdpd to create one)")
            path.mkdir(parents=True, exist_ok=True)
            (path / "volumes").mkdir(exist_ok=True)
            meta = {"format": STORE_FORMAT, "uuid": str(uuid.uuid4()), "created_ns": time.time_ns()}
            write_file_atomic(meta_path, json.dumps(meta, indent=2).encode() + b"\n")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise Corruption(f"{meta_path}: not valid JSON: {e}") from None
        if meta.get("format") != STORE_FORMAT:
            raise Corruption(f"{meta_path}: unsupported store format {meta.get('format')!r}")
        lock_fd = _take_lock(path)
        store = cls(path, settings, lock_fd)
        try:
            store.purge_deleted()  # what a crash left of a volume delete
            for vdir in sorted((path / "volumes").iterdir()):
                if (vdir / "volume.json").exists():
                    try:
                        v = open_volume(vdir, settings, hold_catalog=hold_catalog)
                    except Corruption as e:
                        store.damaged[vdir.name] = str(e)
                        log.error("volume %s is damaged and not served: %s (stop cdpd and "
                                  "run `cdpctl verify --repair`)", vdir.name, e)
                        continue
                    store.volumes[v.name] = v
            if create:
                for spec in settings.volumes:
                    if spec.name not in store.volumes and spec.name not in store.damaged:
                        store.create_volume(spec, hold_catalog=hold_catalog)
        except BaseException:
            store.close()
            raise
        return store

    def release_catalogs(self) -> None:
        """End the hold of ``Store.open(..., hold_catalog=True)``: each volume's catalog
        queues the markers it has not catalogued and starts (on the running loop). A
        failure is logged, as at attach. Cost: one catalog database open per volume."""
        for v in self.volumes.values():
            try:
                service_for(v).catch_up()
            except Exception:
                log.exception("volume %s: file catalog catch-up failed", v.name)

    def create_volume(self, spec: VolumeSpec, *, hold_catalog: bool = False) -> Volume:
        """Create the volume *spec* describes, of its kind (``spec.mode``): a thin
        mirror volume (all zeros), or a proxy volume over ``spec.primary`` (its initial
        copy starts once an event loop runs it). Serves it with its services attached
        (*hold_catalog*: see :meth:`open`)."""
        name = spec.name
        if not VOLUME_NAME.match(name):
            raise UsageError(
                f"{name!r} is not a valid volume name (lowercase letters, digits, '_', '.', "
                "'-'; at most 64; no '@')"
            )
        if name in self.volumes or name in self.damaged:
            raise UsageError(f"volume {name!r} already exists")
        path = self.path / "volumes" / name
        v: Volume
        if spec.mode == "proxy":
            from cdp.proxy.volume import ProxyVolume

            v = ProxyVolume.create(
                path, name, spec.size, self.settings, primary=spec.primary, ack=spec.ack,
                drl_region=spec.drl_region, initial_copy=spec.initial_copy,
                copy_rate=spec.copy_rate,
            )
        elif spec.mode == "mirror":
            v = Volume.create(path, name, spec.size, self.settings)
        else:
            raise UsageError(f"unknown volume mode {spec.mode!r} (mirror or proxy)")
        try:
            attach_services(v, hold_catalog=hold_catalog)
        except BaseException:
            v.close()
            raise
        self.volumes[name] = v
        return v

    def delete_volume(self, name: str) -> Path:
        """Stop serving volume *name* (damaged ones too), close it and move its directory
        to ``STORE/deleted/NAME.UUID`` (one rename: the name is free at once, a crash
        leaves no half volume). Returns that directory; :meth:`purge_deleted` removes it.
        The caller checks what may refuse a delete (connections, kept markers)."""
        vol = self.volumes.get(name)
        if vol is None and name not in self.damaged:
            self.volume(name)  # NotFound naming the known volumes
        src = self.path / "volumes" / name
        dst = self.path / "deleted" / f"{name}.{uuid.uuid4().hex}"
        dst.parent.mkdir(exist_ok=True)
        if vol is not None:
            del self.volumes[name]
            vol.close()
        self.damaged.pop(name, None)
        os.rename(src, dst)
        fd = os.open(self.path / "volumes", os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        log.info("volume %s deleted (files moved to %s)", name, dst)
        return dst

    def purge_deleted(self) -> int:
        """Remove the directories of deleted volumes (``STORE/deleted``); returns the
        bytes freed. Cost: one unlink per file."""
        freed = 0
        root = self.path / "deleted"
        if not root.is_dir():
            return 0
        for d in sorted(root.iterdir()):
            for f in d.rglob("*"):
                try:
                    if f.is_file() and not f.is_symlink():
                        freed += f.stat().st_blocks * 512
                except OSError:
                    pass
            shutil.rmtree(d, ignore_errors=True)
        return freed

    def volume(self, name: str | None) -> Volume:
        """The named volume; with None, the only volume (error if there are several)."""
        if name is None:
            if len(self.volumes) == 1:
                return next(iter(self.volumes.values()))
            if not self.volumes:
                raise NotFound("the store has no volumes (cdpctl volume create NAME --size SIZE)")
            raise UsageError(
                "the store has several volumes; choose one with -V "
                f"({', '.join(sorted(self.volumes))})"
            )
        try:
            return self.volumes[name]
        except KeyError:
            if name in self.damaged:
                raise Corruption(
                    f"volume {name!r} is damaged and not served: {self.damaged[name]} "
                    "(stop cdpd and run `cdpctl verify --repair`)") from None
            known = ", ".join(sorted(self.volumes)) or "none"
            raise NotFound(f"no volume {name!r} (volumes: {known})") from None

    def info(self) -> dict[str, Any]:
        return {"store": str(self.path), "volumes": sorted(self.volumes),
                "damaged": dict(sorted(self.damaged.items()))}

    def close(self) -> None:
        """Close every volume (seal + sync) and release the lock."""
        errors: list[BaseException] = []
        for v in self.volumes.values():
            try:
                v.close()
            except Exception as e:  # close the others anyway
                errors.append(e)
        self.volumes.clear()
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        if errors:
            raise errors[0]


def _take_lock(path: Path) -> int:
    fd = os.open(path / "lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreLocked(
            f"store {path} is in use by another process (pid {holder}); "
            "stop that cdpd first or use cdpctl, which talks to it"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
