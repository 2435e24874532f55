"""The system tools each benchmark suite drives, checked before any suite runs.

The tool -> Debian package table and the files without a binary (qemu's iscsi://
driver, package qemu-block-extra) are read from ``tools/install-system-deps.sh``, the
script ``make sysdeps`` runs, so the two cannot drift: a machine where it has not run gets
one message naming what is missing and what to install, never a traceback from inside a
suite's warm-up.
"""

from __future__ import annotations

import contextlib
import glob
import platform
import re
import shutil
from collections.abc import Callable, Iterable
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "install-system-deps.sh"

#: what stands for qemu's iscsi:// block driver in :data:`SUITE_TOOLS` (a file, no binary)
QEMU_ISCSI = "qemu iscsi:// driver"
#: tools the suites run that the script's table does not list (same packages)
_MORE = {"iscsi-perf": "libiscsi-bin", "tgtadm": "tgt", QEMU_ISCSI: "qemu-block-extra"}

#: suite -> the system tools it runs (suites not listed need none)
SUITE_TOOLS: dict[str, tuple[str, ...]] = {
    "nbd": ("fio", "nbdkit", "qemu-img"),
    "nbd-proto": ("fio", "nbdkit"),
    "proxy": ("fio", "nbdkit"),
    "sentinel": ("fio",),
    "iscsi": ("qemu-img", "tgtd", "tgtadm", "iscsi-perf", QEMU_ISCSI),
    "mft": ("mkntfs", "ntfs-3g", "fls"),
    "ext4": ("mkfs.ext4", "fuse2fs", "fls"),
}


def script_packages(text: str | None = None) -> dict[str, str]:
    """tool -> package, from the ``PKG`` table of install-system-deps.sh."""
    text = SCRIPT.read_text() if text is None else text
    return dict(re.findall(r"\[([^\]\s]+)\]=(\S+)", text))


def script_extra_files(text: str | None = None) -> list[str]:
    """The files the script checks for qemu-block-extra (``EXTRA_FILES``)."""
    text = SCRIPT.read_text() if text is None else text
    m = re.search(r"^EXTRA_FILES=\(([^)]*)\)", text, re.M)
    return m.group(1).split() if m else []


def _qemu_iscsi_present(exists: Callable[[str], bool]) -> bool:
    if any(exists(f) for f in script_extra_files()):
        return True
    if platform.machine() != "x86_64":  # the script checks the x86_64 path only
        return bool(glob.glob("/usr/lib/*/qemu/block-iscsi.so"))
    return False


def missing(suites: Iterable[str], *, which: Callable[[str], str | None] = shutil.which,
            exists: Callable[[str], bool] = lambda p: Path(p).exists()) -> dict[str, str]:
    """The tools the *suites* need that this machine lacks: tool -> package."""
    pkgs = {**script_packages(), **_MORE}
    out: dict[str, str] = {}
    for s in suites:
        for tool in SUITE_TOOLS.get(s, ()):
            present = _qemu_iscsi_present(exists) if tool == QEMU_ISCSI else which(tool) is not None
            if not present:
                out[tool] = pkgs.get(tool, "?")
    return out


def advice(lacking: dict[str, str]) -> str:
    """What to tell the user: the missing tools and the commands that install them."""
    pkgs = " ".join(sorted(set(lacking.values())))
    lines = [f"missing system tools: {', '.join(sorted(lacking))}",
             "install them with `make sysdeps` (tools/install-system-deps.sh), or:",
             f"    sudo apt-get install {pkgs}",
             "or name only the suites you can run (python -m tools.bench journal mapengine)"]
    return "\n".join(lines)


def fs_type(path: Path) -> str:
    """The type of the file system holding ``path`` (``/proc/mounts``: the longest mount
    point that is a prefix of it), "?" when unknown."""
    best, kind = "", "?"
    real = str(path.resolve())
    with contextlib.suppress(OSError), open("/proc/mounts") as f:
        for line in f:
            parts = line.split()
            if len(parts) > 2:
                mnt = parts[1]
                if (real == mnt or real.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, parts[2]
    return kind
