"""The one exception hierarchy of cdp.

Every error the package raises on purpose is a :class:`CdpError`. Subclasses also inherit
the builtin that fits, so callers that only know Python still catch them sensibly
(``except FileNotFoundError`` catches :class:`NotFound`). Wire codes (NBD errno, SCSI
sense) and CLI exit statuses are derived from these classes in exactly one place each:
:func:`cdp.targets.nbd.errors.nbd_errno`, :func:`cdp.targets.iscsi.sense.scsi_sense` and
:data:`EXIT_CODES` below.
"""

from __future__ import annotations

import errno as _errno


class CdpError(Exception):
    """Base of every error cdp raises on purpose."""

    #: errno a block protocol reports for this error (EIO unless a subclass says otherwise)
    errno: int = _errno.EIO
    #: exit status of cdpctl/cdpd when this error ends the command
    exit_status: int = 1


class ConfigError(CdpError, ValueError):
    """A configuration file or option is invalid; the message names the key."""

    errno = _errno.EINVAL
    exit_status = 2


class UsageError(CdpError, ValueError):
    """A command line or API request is malformed (bad size, bad flag, ...)."""

    errno = _errno.EINVAL
    exit_status = 2


class NotFound(CdpError, FileNotFoundError):
    """A volume, point, marker, file or export does not exist."""

    errno = _errno.ENOENT
    exit_status = 3


class PointError(CdpError, LookupError):
    """A point in time cannot be resolved (before the first write, after now, expired)."""

    errno = _errno.EINVAL
    exit_status = 3


class OutOfRange(CdpError, ValueError):
    """A request addresses bytes outside the volume."""

    errno = _errno.EINVAL
    exit_status = 2


class ReadOnly(CdpError, PermissionError):
    """A write to a read-only view (a point-in-time export)."""

    errno = _errno.EPERM
    exit_status = 4


class StoreFull(CdpError, OSError):
    """The store cannot take more data (disk full or store cap with on_full=refuse)."""

    errno = _errno.ENOSPC
    exit_status = 5


class Corruption(CdpError, OSError):
    """Stored bytes fail their checksum or structure check; the message says where."""

    errno = _errno.EIO
    exit_status = 6


class StoreLocked(CdpError, BlockingIOError):
    """Another process holds the store (a second cdpd on the same store)."""

    errno = _errno.EBUSY
    exit_status = 7


class DaemonUnavailable(CdpError, ConnectionError):
    """cdpctl needs the running daemon and cannot reach it."""

    errno = _errno.ECONNREFUSED
    exit_status = 8


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


#: exit statuses, documented in ``cdpctl --help`` (0 = success)
EXIT_CODES: dict[int, str] = {
    0: "success",
    1: "error (see message)",
    2: "bad usage, configuration or argument",
    3: "unknown volume, point, marker or path",
    4: "read-only view",
    5: "store full",
    6: "corruption found",
    7: "store locked by another process",
    8: "daemon not reachable (not running, or this user is not the store's owner)",
}
