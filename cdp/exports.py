"""Block devices over volumes, and the export names targets (NBD, later iSCSI) see.

Export names: ``VOLUME`` is the live, writable volume; ``VOLUME@POINT`` a read-only view
of it at POINT (``vol0@marker17``, ``vol0@before-upgrade``, ``vol0@@123456``,
``vol0@2024-05-01T10:00:00``). A point given as a time or a relative time is resolved
once, when the export is opened: the view does not move while a client reads it.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TYPE_CHECKING

from cdp.errors import ReadOnly
from cdp.points import split_export_name

if TYPE_CHECKING:
    from cdp.store import Store
    from cdp.volume import Volume

BASE_ALLOCATION = "base:allocation"


class VolumeDevice:
    """The live volume as a writable block device."""

    read_only = False
    can_multi_conn = True  # one journal: a flush on any connection covers every write

    def __init__(self, volume: Volume) -> None:
        self.volume = volume
        self.size = volume.size
        self.description = f"cdp volume {volume.name} (live)"
        volume.connections += 1
        self._closed = False

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length)

    def write(self, offset: int, data: bytes, fua: bool) -> Awaitable[None] | None:
        return self.volume.write(offset, data, fua)

    def flush(self) -> Awaitable[None]:
        return self.volume.flush()

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        return self.volume.zero(offset, length, fua)

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> Awaitable[None] | None:
        # zeroing is always metadata here (a ZERO record), so FAST_ZERO is honoured
        return self.volume.zero(offset, length, fua)

    def cache(self, offset: int, length: int) -> None:
        return None

    def meta_contexts(self) -> list[str]:
        return [BASE_ALLOCATION]

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        # answer at most 64 MiB per request: clients ask again for the rest
        return self.volume.block_status(offset, min(length, 64 << 20))

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self.volume.connections -= 1


class PointInTimeDevice(VolumeDevice):
    """A read-only view of a volume at a fixed seq."""

    read_only = True

    def __init__(self, volume: Volume, seq: int, point: str) -> None:
        super().__init__(volume)
        self.seq = seq
        self.description = f"cdp volume {volume.name} at {point} (@{seq}, read-only)"

    def read(self, offset: int, length: int) -> bytes:
        return self.volume.read(offset, length, self.seq)

    def write(self, offset: int, data: bytes, fua: bool) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def flush(self) -> None:  # type: ignore[override]
        return None

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> None:
        raise ReadOnly(f"{self.description}: writes are refused")

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        return self.volume.block_status(offset, min(length, 64 << 20), self.seq)


class StoreExports:
    """The :class:`~cdp.targets.blockdev.ExportProvider` of a store."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def list_exports(self) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        for name in sorted(self.store.volumes):
            v = self.store.volumes[name]
            out.append((name, f"cdp volume {name} (live, {v.size} bytes)"))
            for m in v.markers:
                label = f" {m.label!r}" if m.label else ""
                out.append((f"{name}@{m.name}", f"read-only view at {m.name}{label} (@{m.seq})"))
        return out

    def open_export(self, name: str) -> VolumeDevice:
        vol_name, point = split_export_name(name)
        if not name:
            vol_name = None  # type: ignore[assignment]  # default export: the only volume
        vol = self.store.volume(vol_name)
        if point is None:
            return VolumeDevice(vol)
        seq = vol.resolve_point(point)
        return PointInTimeDevice(vol, seq, point)
