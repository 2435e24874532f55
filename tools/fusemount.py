"""A FUSE file system mounted for the length of a ``with`` block, its daemon in the
foreground, so the block ends only when the daemon has exited.

fuse2fs and ntfs-3g write their last metadata (superblock, $MFT mirror, journal) and
flush the image when they close the file system, which happens after ``umount``
returns: a tool run on the image right after a daemonized mount (e2fsck, a snapshot of
the volume under it, another mount) would race with those writes. Waiting for the
daemon's exit is waiting for its last write."""

from __future__ import annotations

import contextlib
import os
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def foreground_mount(argv: list[str], prefix: str) -> Iterator[Path]:
    """Run ``argv + [MOUNTPOINT]`` (a FUSE daemon told to stay in the foreground) on a new
    temporary directory named ``prefix…``; yield it once mounted (RuntimeError with the
    daemon's stderr if it exits or 60 s pass first). On exit: sync, umount (retried
    while busy) and wait for the daemon to exit."""
    mnt = Path(tempfile.mkdtemp(prefix=prefix))
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen([*argv, str(mnt)], stdout=subprocess.DEVNULL, stderr=err)
        deadline = time.monotonic() + 60
        while not os.path.ismount(mnt):
            if proc.poll() is not None or time.monotonic() > deadline:
                if proc.poll() is None:
                    proc.kill()
                proc.wait()
                err.seek(0)
                os.rmdir(mnt)
                raise RuntimeError(f"{' '.join(argv)} {mnt} exited with {proc.returncode}: "
                                   f"{err.read().decode(errors='replace').strip()[-2000:]}")
            time.sleep(0.02)
        try:
            yield mnt
        finally:
            subprocess.run(["sync", "-f", str(mnt)], capture_output=True, check=False)
            for attempt in range(50):
                r = subprocess.run(["umount", str(mnt)], capture_output=True, check=False)
                if r.returncode == 0:
                    break
                time.sleep(0.1 * (attempt + 1))
            proc.wait(120)  # the file system closed: its last writes are in the image
            with contextlib.suppress(OSError):
                mnt.rmdir()
