"""The interface block targets (NBD and iSCSI) use to reach storage.

A :class:`BlockDevice` is one opened export. Each I/O method returns its result directly
(the fast path: the target replies at once, no task is created) or an awaitable (the
target runs it as a task, so replies may complete out of order). Errors are raised as
:class:`cdp.errors.CdpError` subclasses; each target maps them to wire codes in one place:
:func:`cdp.targets.nbd.errors.nbd_errno` (NBD) and
:func:`cdp.targets.iscsi.sense.scsi_sense` (iSCSI).

A device may also offer three optional members, each declared as its own protocol below
(the NBD core checks for them with ``isinstance``):

- :class:`HasDescription`: ``description: str``, shown by ``nbdinfo``
  (NBD_INFO_DESCRIPTION); without it, the provider's listing gives the description;
- :class:`MatchesMetaContexts`: ``match_meta_contexts(query, listing)``, for metadata
  contexts whose names are computed rather than listed (``x-cdp:changed:@123``).
  Without it, a query selects the names in :meth:`BlockDevice.meta_contexts` equal to
  it, and when listing, a query ending in ``:`` (``x-cdp:``) lists every name starting
  with it;
- :class:`HasBlockSize`: ``min_block_size: int``, the alignment the device needs of
  every offset and length. Without it a device is byte addressed (1), which NBD
  advertises; iSCSI always uses 512-byte logical blocks.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, runtime_checkable


@runtime_checkable
class BlockDevice(Protocol):
    """One opened export: fixed size, byte addressed."""

    size: int
    read_only: bool
    #: True when flush/FUA on one connection is visible on every connection to the export
    can_multi_conn: bool

    def read(self, offset: int, length: int) -> bytes | Awaitable[bytes]:
        """Return exactly ``length`` bytes at ``offset``."""
        ...

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> Awaitable[None] | None:
        """Write ``data`` at ``offset``; durable before returning when ``fua``."""
        ...

    def flush(self) -> Awaitable[None] | None:
        """Make every write completed so far durable."""
        ...

    def trim(self, offset: int, length: int, fua: bool) -> Awaitable[None] | None:
        """Discard a range (a hint; the contents become unspecified)."""
        ...

    def write_zeroes(
        self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool
    ) -> Awaitable[None] | None:
        """Make a range read as zeroes. ``may_trim``: a hole is acceptable. ``fast``: raise
        NotImplementedError at once unless this is faster than writing zeroes."""
        ...

    def cache(self, offset: int, length: int) -> Awaitable[None] | None:
        """Prefetch a range (a hint)."""
        ...

    def meta_contexts(self) -> list[str]:
        """Metadata contexts this export offers, e.g. ``["base:allocation"]``: what an
        empty NBD_OPT_LIST_META_CONTEXT query lists. A name ending in ``:`` is a
        wildcard a client may list further but never selects."""
        ...

    def block_status(
        self, context: str, offset: int, length: int
    ) -> list[tuple[int, int]] | Awaitable[list[tuple[int, int]]]:
        """Consecutive ``(length, flags)`` runs from ``offset`` describing ``context``.

        The runs may cover less than ``length`` (at least one byte) or more."""
        ...

    def close(self) -> None:
        """Release the export (the connection that opened it is gone)."""
        ...


@runtime_checkable
class HasDescription(Protocol):
    """Optional member of a :class:`BlockDevice`: a human-readable description."""

    description: str


@runtime_checkable
class HasBlockSize(Protocol):
    """Optional member of a :class:`BlockDevice`: the alignment it needs."""

    #: a power of 2 from 1 to 64 KiB; every request's offset and length are multiples
    min_block_size: int


@runtime_checkable
class MatchesMetaContexts(Protocol):
    """Optional member of a :class:`BlockDevice`: metadata contexts matched by rule."""

    def match_meta_contexts(self, query: str, listing: bool) -> list[str]:
        """Context names ``query`` selects (``listing`` False: NBD_OPT_SET_META_CONTEXT)
        or lists (``listing`` True: NBD_OPT_LIST_META_CONTEXT); ``[]`` when none."""
        ...


@runtime_checkable
class ExportProvider(Protocol):
    """Names the exports and opens them."""

    def list_exports(self) -> list[tuple[str, str]]:
        """``(name, description)`` of every export a client may list."""
        ...

    def open_export(self, name: str) -> BlockDevice:
        """Open an export; raises CdpError subclasses (NotFound, PointError, ...)."""
        ...
