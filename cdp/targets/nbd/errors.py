"""Exceptions to NBD wire errors, in exactly one place (nbdkit's ``nbd_errno()``).

Design notes
------------
- The map takes the request's flags, as nbdkit's ``nbd_errno(error, flags)`` does: the
  NBD spec allows ``NBD_ENOTSUP`` only as the answer to a WRITE_ZEROES with
  ``NBD_CMD_FLAG_FAST_ZERO`` (the client then writes the zeroes itself). Without the
  flag, ENOTSUP can still reach us: the journal and the DRL pass the store's file
  system errors through as OSError (a FLUSH's ``fdatasync`` or ``fsync`` on a
  directory may fail with EOPNOTSUPP on some file systems), and a NotImplementedError
  from a device is a bug. Those become EIO, like any other failure the client did
  not cause (nbdkit answers EINVAL there, its default; ours is EIO).
- A primary's errors (proxy mode) never get here raw: the proxy reports them as
  :class:`~cdp.errors.Corruption` (EIO).
"""

from __future__ import annotations

import errno
import logging

from cdp.errors import CdpError
from cdp.targets.nbd.proto import CmdFlag, NbdErrno

log = logging.getLogger("cdp.nbd")

_FAST_ZERO = int(CmdFlag.FAST_ZERO)

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


def nbd_errno(exc: BaseException, flags: int) -> NbdErrno:
    """The NBD error a failed request with command ``flags`` reports for ``exc``.

    CdpError subclasses carry ``.errno`` (ReadOnly -> EPERM, StoreFull -> ENOSPC,
    OutOfRange/UsageError/PointError -> EINVAL, Corruption -> EIO). OSError maps by its
    errno; MemoryError -> ENOMEM. NotImplementedError (a fast zero that is not fast) and
    ENOTSUP/EOPNOTSUPP -> ENOTSUP when ``flags`` has FAST_ZERO, else EIO. Anything else
    is unexpected: logged with its traceback, EIO.
    """
    if isinstance(exc, CdpError):
        err = _ERRNO_TO_NBD.get(exc.errno, NbdErrno.EIO)
    elif isinstance(exc, OSError):
        if exc.errno is None:
            log.error("I/O error without errno: %r", exc)
        err = _ERRNO_TO_NBD.get(exc.errno or errno.EIO, NbdErrno.EIO)
    elif isinstance(exc, NotImplementedError) and flags & _FAST_ZERO:
        return NbdErrno.ENOTSUP
    elif isinstance(exc, MemoryError):
        return NbdErrno.ENOMEM
    else:
        log.error("unexpected error in a request: %r", exc, exc_info=exc)
        return NbdErrno.EIO
    if err is NbdErrno.ENOTSUP and not flags & _FAST_ZERO:
        return NbdErrno.EIO
    return err
