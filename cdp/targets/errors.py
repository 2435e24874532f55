"""Exceptions to wire error codes, in exactly one place per protocol (like nbdkit's
``nbd_errno()``): :func:`nbd_errno` for NBD, :func:`scsi_sense` for iSCSI."""

from __future__ import annotations

import errno
import logging

from cdp.errors import CdpError, Corruption, OutOfRange, ReadOnly, StoreFull
from cdp.targets.iscsi.sense import Asc, Sense, SenseKey
from cdp.targets.nbd.proto import NbdErrno

log = logging.getLogger("cdp.nbd")

#: host errno -> NBD error; anything not listed becomes EIO
_ERRNO_TO_NBD: dict[int, NbdErrno] = {
    errno.EPERM: NbdErrno.EPERM,
    errno.EACCES: NbdErrno.EPERM,
    errno.EROFS: NbdErrno.EPERM,
    errno.EIO: NbdErrno.EIO,
    errno.ENOMEM: NbdErrno.ENOMEM,
    errno.EINVAL: NbdErrno.EINVAL,
    errno.ENOSPC: NbdErrno.ENOSPC,
    errno.EDQUOT: NbdErrno.ENOSPC,
    errno.EFBIG: NbdErrno.ENOSPC,
    errno.EOVERFLOW: NbdErrno.EOVERFLOW,
    errno.ENOTSUP: NbdErrno.ENOTSUP,
    errno.EOPNOTSUPP: NbdErrno.ENOTSUP,
    errno.ESHUTDOWN: NbdErrno.ESHUTDOWN,
}


def nbd_errno(exc: BaseException) -> NbdErrno:
    """The NBD error a failed request reports for ``exc``.

    CdpError subclasses carry ``.errno`` (ReadOnly -> EPERM, StoreFull -> ENOSPC,
    OutOfRange/UsageError/PointError -> EINVAL, Corruption -> EIO). OSError maps by its
    errno; NotImplementedError (e.g. a fast zero that is not fast) -> ENOTSUP;
    MemoryError -> ENOMEM. Anything else is unexpected: logged with its traceback, EIO.
    """
    if isinstance(exc, CdpError):
        return _ERRNO_TO_NBD.get(exc.errno, NbdErrno.EIO)
    if isinstance(exc, OSError):
        if exc.errno is None:
            log.error("I/O error without errno: %r", exc)
        return _ERRNO_TO_NBD.get(exc.errno or errno.EIO, NbdErrno.EIO)
    if isinstance(exc, NotImplementedError):
        return NbdErrno.ENOTSUP
    if isinstance(exc, MemoryError):
        return NbdErrno.ENOMEM
    log.error("unexpected error in a request: %r", exc, exc_info=exc)
    return NbdErrno.EIO


def scsi_sense(exc: BaseException) -> Sense:
    """The SCSI sense a failed command reports for ``exc`` (the iSCSI target's one map).

    ReadOnly -> DATA PROTECT / WRITE PROTECTED; OutOfRange -> ILLEGAL REQUEST / LBA OUT OF
    RANGE; Corruption -> MEDIUM ERROR / UNRECOVERED READ ERROR; StoreFull -> DATA PROTECT /
    SPACE ALLOCATION FAILED WRITE PROTECT; other CdpErrors and OSErrors go by errno
    (EPERM/EROFS like ReadOnly, ENOSPC like StoreFull, EINVAL like OutOfRange); anything
    else -> HARDWARE ERROR / INTERNAL TARGET FAILURE (logged with its traceback when it is
    not an OSError or CdpError).
    """
    if isinstance(exc, ReadOnly):
        return Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    if isinstance(exc, OutOfRange):
        return Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
    if isinstance(exc, Corruption):
        return Sense(SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)
    if isinstance(exc, StoreFull):
        return Sense(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
    if isinstance(exc, (CdpError, OSError)):
        code = exc.errno
        if code in (errno.EPERM, errno.EACCES, errno.EROFS):
            return Sense(SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
        if code in (errno.ENOSPC, errno.EDQUOT):
            return Sense(SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT)
        if code == errno.EINVAL and isinstance(exc, CdpError):
            return Sense(SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE)
        return Sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
    log.error("unexpected error in a SCSI command: %r", exc, exc_info=exc)
    return Sense(SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE)
