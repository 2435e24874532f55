"""Exceptions map to NBD wire errors in one place, given the request's flags."""

from __future__ import annotations

import errno
import logging

import pytest

from cdp import errors
from cdp.targets.nbd.errors import nbd_errno
from cdp.targets.nbd.proto import CmdFlag, NbdErrno


@pytest.mark.parametrize(
    ("exc", "want"),
    [
        (errors.ReadOnly("ro"), NbdErrno.EPERM),
        (errors.StoreFull("full"), NbdErrno.ENOSPC),
        (errors.OutOfRange("far"), NbdErrno.EINVAL),
        (errors.PointError("gone"), NbdErrno.EINVAL),
        (errors.UsageError("bad"), NbdErrno.EINVAL),
        (errors.Corruption("crc"), NbdErrno.EIO),
        (errors.NotFound("x"), NbdErrno.EIO),
        (errors.StoreLocked("x"), NbdErrno.EIO),
        (OSError(errno.EDQUOT, "quota"), NbdErrno.ENOSPC),
        (OSError(errno.EROFS, "rofs"), NbdErrno.EPERM),
        (OSError(errno.EIO, "io"), NbdErrno.EIO),
        (MemoryError(), NbdErrno.ENOMEM),
    ],
)
def test_mapping(exc: BaseException, want: NbdErrno) -> None:
    assert nbd_errno(exc, 0) is want
    assert nbd_errno(exc, CmdFlag.FUA) is want


def test_unexpected_exception_is_eio_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="cdp.nbd"):
        assert nbd_errno(KeyError("bug"), 0) is NbdErrno.EIO
    assert "bug" in caplog.text


def test_every_cdp_error_has_a_wire_code() -> None:
    for cls in errors.CdpError.__subclasses__():
        assert nbd_errno(cls("x"), 0) in NbdErrno


_FAST = CmdFlag.FAST_ZERO | CmdFlag.NO_HOLE


@pytest.mark.parametrize(
    "exc",
    [NotImplementedError(), OSError(errno.ENOTSUP, "no"), OSError(errno.EOPNOTSUPP, "no")],
)
def test_enotsup_only_answers_a_fast_zero(exc: BaseException) -> None:
    """The NBD spec allows ENOTSUP only for WRITE_ZEROES with FAST_ZERO (nbdkit's
    ``nbd_errno(error, flags)``); any other request that meets it gets EIO."""
    assert nbd_errno(exc, _FAST) is NbdErrno.ENOTSUP
    assert nbd_errno(exc, 0) is NbdErrno.EIO
    assert nbd_errno(exc, CmdFlag.FUA | CmdFlag.NO_HOLE) is NbdErrno.EIO


def test_not_implemented_outside_a_fast_zero_is_a_logged_bug(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.ERROR, logger="cdp.nbd"):
        assert nbd_errno(NotImplementedError("no trim here"), 0) is NbdErrno.EIO
    assert "no trim here" in caplog.text


def test_fast_zero_does_not_change_other_errors() -> None:
    assert nbd_errno(errors.StoreFull("full"), _FAST) is NbdErrno.ENOSPC
    assert nbd_errno(errors.ReadOnly("ro"), _FAST) is NbdErrno.EPERM
    assert nbd_errno(OSError(errno.EIO, "io"), _FAST) is NbdErrno.EIO
