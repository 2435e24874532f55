"""Exceptions to wire error codes, in exactly one place (like nbdkit's ``nbd_errno()``)."""

from __future__ import annotations

import errno
import logging

from cdp.errors import CdpError
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
