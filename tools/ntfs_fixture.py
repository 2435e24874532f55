"""Build small real NTFS images for tests and benchmarks: ``mkntfs`` formats a sparse
file, ``ntfs-3g`` (FUSE) mounts it, real file operations populate it.

    python -m tools.ntfs_fixture OUT.img [--size 64MiB] [--files N]

Also used as a library: :func:`make_image`, :func:`mounted`, :func:`fls_entries`.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

from tools.fusemount import foreground_mount


def mkntfs(path: Path | str, size: int | None = None, *, label: str = "cdp") -> None:
    """Format *path* (a file or a block-like file, grown sparse to *size*) as NTFS."""
    p = Path(path)
    if size is not None:
        with open(p, "ab") as f:
            f.truncate(size)
    subprocess.run(
        ["mkntfs", "-F", "-Q", "-q", "-L", label, str(p)],
        check=True, capture_output=True, timeout=120,
    )


@contextlib.contextmanager
def mounted(image: Path | str, options: str = "") -> Iterator[Path]:
    """Mount *image* with ntfs-3g on a temporary directory; the block ends once ntfs-3g
    has exited (:func:`tools.fusemount.foreground_mount`: it writes its last metadata
    after umount returns)."""
    opts = ",".join(o for o in ("no_detach", options) if o)
    with foreground_mount(["ntfs-3g", "-o", opts, str(image)], "cdp-ntfs-") as mnt:
        yield mnt


def make_image(path: Path | str, size: int, populate: Callable[[Path], None] | None = None) -> Path:
    """A fresh NTFS image at *path*; *populate(mountpoint)* makes the files."""
    p = Path(path)
    p.unlink(missing_ok=True)
    mkntfs(p, size)
    if populate is not None:
        with mounted(p) as mnt:
            populate(mnt)
    return p


def set_ads(path: Path, stream: str, data: bytes) -> None:
    """Write an alternate data stream (ntfs-3g's default ``streams_interface=xattr``
    maps the ``user.NAME`` extended attribute to the stream NAME)."""
    os.setxattr(path, f"user.{stream}", data)


_FLS_LINE = re.compile(r"^(?P<type>\S+)\s+(?P<del>\*\s+)?(?P<inode>[\d-]+)(?P<re>\(realloc\))?:\t(?P<path>.*)$")


def ils_allocated(image: Path | str, offset_sectors: int = 0) -> dict[int, int]:
    """``ils -a``: the allocated MFT records of *image* and their sizes."""
    cmd = ["ils", "-a"] + (["-o", str(offset_sectors)] if offset_sectors else [])
    out = subprocess.run([*cmd, str(image)], check=True, capture_output=True, text=True,
                         timeout=600).stdout
    sizes: dict[int, int] = {}
    for line in out.splitlines():
        f = line.split("|")
        if len(f) == 11 and f[0].isdigit() and f[1] == "a":
            sizes[int(f[0])] = int(f[10])
    return sizes


def fls_entries(image: Path | str, offset_sectors: int = 0) -> list[dict[str, object]]:
    """``fls -r -p`` on *image*: dicts with type ("r"/"d"), record, path, deleted,
    stream (for ``file:stream`` entries). The $OrphanFiles tree is left out. Names
    whose record ``ils -a`` says is free count as deleted (fls lists stale index keys
    left in directory index nodes as allocated)."""
    allocated = ils_allocated(image, offset_sectors)
    cmd = ["fls", "-r", "-p"]
    if offset_sectors:
        cmd += ["-o", str(offset_sectors)]
    out = subprocess.run([*cmd, str(image)], check=True, capture_output=True, text=True,
                         timeout=600, errors="replace").stdout
    rows: list[dict[str, object]] = []
    for line in out.splitlines():
        m = _FLS_LINE.match(line)
        if not m:
            continue
        path = m["path"]
        if path.startswith("$OrphanFiles"):
            continue
        typ = m["type"].split("/")[-1]
        inode = m["inode"].split("-")
        rows.append({
            "type": typ, "record": int(inode[0]), "path": path, "stream": None,
            "attr": int(inode[1]) if len(inode) > 1 else 0,
            "deleted": bool(m["del"]) or bool(m["re"]) or int(inode[0]) not in allocated,
        })
    # "file:stream" lines of the same record as "file" are named streams, not names
    known = {(r["path"], r["record"]) for r in rows}
    for r in rows:
        path = str(r["path"])
        name = path.rsplit("/", 1)[-1]
        if ":" in name:
            head, stream = path.rsplit(":", 1)
            if (head, r["record"]) in known:
                r["path"], r["stream"] = head, stream
    return rows


def populate_many(mnt: Path, files: int, per_dir: int = 1000) -> None:
    """*files* small files in directories of *per_dir* (fast: one open/close each)."""
    for i in range(files):
        d = mnt / f"d{i // per_dir:04d}"
        if i % per_dir == 0:
            d.mkdir(exist_ok=True)
        fd = os.open(d / f"f{i:07d}.txt", os.O_WRONLY | os.O_CREAT, 0o644)
        if i % 3 == 0:
            os.write(fd, b"x" * (i % 700))
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", default=str(64 << 20), help="bytes")
    ap.add_argument("--files", type=int, default=100)
    a = ap.parse_args()
    make_image(a.out, int(a.size), lambda m: populate_many(m, a.files))
    print(a.out)


if __name__ == "__main__":
    main()
