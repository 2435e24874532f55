"""An NBD export as a local file, through nbdfuse (the rig of the file-system tests)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def nbdfuse_file(uri: str, mnt: Path) -> Iterator[Path]:
    """Serve *uri* as the file ``mnt/disk`` (nbdfuse; *mnt* is created) until the block
    ends, then unmount. Waits up to 30 s for nbdfuse to serve (its pid file)."""
    mnt.mkdir()
    pidfile = mnt.parent / f"{mnt.name}.pid"
    proc = subprocess.Popen(["nbdfuse", "-P", str(pidfile), str(mnt / "disk"), uri],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while not (pidfile.exists() and pidfile.read_text().strip()):
        assert proc.poll() is None or proc.returncode == 0, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, "nbdfuse did not start"
        time.sleep(0.05)
    try:
        yield mnt / "disk"
    finally:
        subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
