"""Exceptions map to NBD wire errors in one place."""

from __future__ import annotations

import errno
import logging

import pytest

from cdp import errors
from cdp.targets.errors import nbd_errno
from cdp.targets.nbd.proto import NbdErrno


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
        (NotImplementedError(), NbdErrno.ENOTSUP),
        (MemoryError(), NbdErrno.ENOMEM),
    ],
)
def test_mapping(exc: BaseException, want: NbdErrno) -> None:
    assert nbd_errno(exc) is want


def test_unexpected_exception_is_eio_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="cdp.nbd"):
        assert nbd_errno(KeyError("bug")) is NbdErrno.EIO
    assert "bug" in caplog.text


def test_every_cdp_error_has_a_wire_code() -> None:
    for cls in errors.CdpError.__subclasses__():
        assert nbd_errno(cls("x")) in NbdErrno
