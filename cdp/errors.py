"""The one exception hierarchy of cdp.

Every error the package raises on purpose is a :class:`CdpError`. Subclasses also inherit
the builtin that fits, so callers that only know Python still catch them sensibly
(``except FileNotFoundError`` catches :class:`NotFound`). Wire codes (NBD errno, SCSI
sense) and CLI exit statuses are derived from these classes in exactly one place each:
:func:`cdp.targets.nbd.errors.nbd_errno`, :func:`cdp.targets.iscsi.sense.scsi_sense` and
:class:`ExitStatus` below.
"""

from __future__ import annotations

import errno as _errno
from enum import IntEnum


class ExitStatus(IntEnum):
    """Every exit status of cdpctl and cdpd: the one definition. ``cdpctl --help`` prints
    this table (:data:`EXIT_CODES`), each :class:`CdpError` subclass names its member, and
    ``tests/integration/test_operator.py`` drives every member at least once."""

    OK = 0
    ERROR = 1
    USAGE = 2
    NOT_FOUND = 3
    READ_ONLY = 4
    STORE_FULL = 5
    CORRUPTION = 6
    LOCKED = 7
    NO_DAEMON = 8

    @property
    def meaning(self) -> str:
        """The line ``cdpctl --help`` prints for this status."""
        return _MEANING[self]


_MEANING: dict[ExitStatus, str] = {
    ExitStatus.OK: "success",
    ExitStatus.ERROR: "error (see message)",
    ExitStatus.USAGE: "bad usage, configuration or argument (a malformed point or time too)",
    ExitStatus.NOT_FOUND: "unknown volume, point, marker or path",
    ExitStatus.READ_ONLY: "read-only: a point-in-time view, or an output path that cannot be written",
    ExitStatus.STORE_FULL: "store full",
    ExitStatus.CORRUPTION: "corruption found",
    ExitStatus.LOCKED: "store locked by another process (a running cdpd)",
    ExitStatus.NO_DAEMON: "daemon not reachable (not running, or this user is not the store's owner)",
}

#: exit statuses as ``cdpctl --help`` prints them (number -> meaning), from :class:`ExitStatus`
EXIT_CODES: dict[int, str] = {int(s): s.meaning for s in ExitStatus}


class CdpError(Exception):
    """Base of every error cdp raises on purpose."""

    #: errno a block protocol reports for this error (EIO unless a subclass says otherwise)
    errno: int = _errno.EIO
    #: exit status of cdpctl/cdpd when this error ends the command
    exit_status: ExitStatus = ExitStatus.ERROR


class ConfigError(CdpError, ValueError):
    """A configuration file or option is invalid; the message names the key."""

    errno = _errno.EINVAL
    exit_status = ExitStatus.USAGE


class UsageError(CdpError, ValueError):
    """A command line or API request is malformed (bad size, bad flag, ...)."""

    errno = _errno.EINVAL
    exit_status = ExitStatus.USAGE


class NotFound(CdpError, FileNotFoundError):
    """A volume, point, marker, file or export does not exist."""

    errno = _errno.ENOENT
    exit_status = ExitStatus.NOT_FOUND


class PointError(CdpError, LookupError):
    """A point in time cannot be resolved (before the first write, after now, expired)."""

    errno = _errno.EINVAL
    exit_status = ExitStatus.NOT_FOUND


class MalformedPoint(PointError, UsageError):
    """Point text that does not parse (``--at 2024-13-45``, ``--to ''``): a usage error
    (exit 2), and still a PointError for callers that catch point errors."""

    exit_status = ExitStatus.USAGE


class OutOfRange(CdpError, ValueError):
    """A request addresses bytes outside the volume."""

    errno = _errno.EINVAL
    exit_status = ExitStatus.USAGE


class ReadOnly(CdpError, PermissionError):
    """A write to a read-only view (a point-in-time export)."""

    errno = _errno.EPERM
    exit_status = ExitStatus.READ_ONLY


class CannotWrite(CdpError, PermissionError):
    """An output path (an image, a restored file) exists as a directory but cannot be
    written there; the message gives the operating system's reason."""

    errno = _errno.EACCES
    exit_status = ExitStatus.READ_ONLY


class StoreFull(CdpError, OSError):
    """The store cannot take more data (disk full or store cap with on_full=refuse)."""

    errno = _errno.ENOSPC
    exit_status = ExitStatus.STORE_FULL


class Corruption(CdpError, OSError):
    """Stored bytes fail their checksum or structure check; the message says where."""

    errno = _errno.EIO
    exit_status = ExitStatus.CORRUPTION


class StoreLocked(CdpError, BlockingIOError):
    """Another process holds the store (a second cdpd on the same store)."""

    errno = _errno.EBUSY
    exit_status = ExitStatus.LOCKED


class DaemonUnavailable(CdpError, ConnectionError):
    """cdpctl needs the running daemon and cannot reach it."""

    errno = _errno.ECONNREFUSED
    exit_status = ExitStatus.NO_DAEMON


class RemoteUnreachable(CdpError, ConnectionError):
    """An object store (the tier's S3 endpoint) cannot be reached or keeps failing:
    connection refused or cut, timeout, 5xx, after the client's retries. Worth retrying
    later; the message names the endpoint, bucket and key."""

    errno = _errno.EIO


class RemoteRefused(CdpError, PermissionError):
    """An object store refuses a request (wrong credentials, access denied, a request it
    rejects): retrying will not help until the configuration changes. The message names
    the endpoint, bucket and key, and the store's error code."""

    errno = _errno.EIO


class ProtocolError(CdpError):
    """A peer sent bytes that violate the wire protocol (NBD, iSCSI).

    Protocol cores raise only this for bad peer input; the server turns it into the
    reply/close the protocol prescribes.
    """

    errno = _errno.EINVAL


class Interrupted(CdpError):
    """Long work (a gc's compaction) stopped early because cdpd is stopping; what it
    had done is discarded or complete, never half applied."""
