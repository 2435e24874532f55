"""Build small real ext2/ext3/ext4 images for tests and benchmarks: ``mkfs -d DIR``
populates a file system from a directory without mounting; ``e2fsck -fD`` then indexes
every directory of more than one block (htree), which ``mkfs -d`` does not do.

    python -m tools.ext4_fixture OUT.img [--size 64MiB] [--files N] [-O FEATURES]

Also used as a library: :func:`mkfs`, :func:`populate_sample`, :func:`fls_entries`,
:func:`mounted` (fuse2fs).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from tools.fusemount import foreground_mount
from tools.ntfs_fixture import populate_many

#: the long target of the slow symlink in :func:`populate_sample` (> 60 bytes)
SLOW_TARGET = "target/" + "t" * 90
#: the fragmented file: one 1 KiB piece every FRAG_STRIDE bytes (a hole between each)
FRAG_PIECES = 600
FRAG_STRIDE = 8192


def mkfs(path: Path | str, size: int, src: Path | None = None, *, kind: str = "ext4",
         options: list[str] | None = None, index_dirs: bool = True) -> Path:
    """Format *path* (a sparse file of *size* bytes) as *kind* ("ext2", "ext3", "ext4")
    with extra mke2fs *options*, populated from *src*; with *index_dirs*, ``e2fsck
    -fyD`` builds the htree indexes of directories larger than one block."""
    p = Path(path)
    p.unlink(missing_ok=True)
    with open(p, "wb") as f:
        f.truncate(size)
    cmd = [f"mkfs.{kind}", "-q", "-F", *(options or [])]
    if src is not None:
        cmd += ["-d", str(src)]
    subprocess.run([*cmd, str(p)], check=True, capture_output=True, timeout=300)
    if index_dirs:
        r = subprocess.run(["e2fsck", "-fyD", str(p)], capture_output=True, timeout=300)
        if r.returncode not in (0, 1):  # 1: "file system was modified" (the indexes)
            raise RuntimeError(f"e2fsck -fyD failed ({r.returncode}): {r.stdout[-2000:]!r}")
    return p


def populate_sample(src: Path, *, big_dir: int = 2000) -> None:
    """The sample tree the tests compare against: small and empty files, nested
    directories, a *big_dir*-entry directory (htree once indexed), hard links, fast and
    slow symlinks, sparse files, a file fragmented into :data:`FRAG_PIECES` extents
    (an extent tree of depth > 0), non-ASCII names."""
    src.mkdir(parents=True, exist_ok=True)
    (src / "hello.txt").write_bytes(b"hello, ext4\n")
    (src / "empty").write_bytes(b"")
    (src / "tiny").write_bytes(b"x" * 50)  # inline with inline_data
    (src / "medium").write_bytes(bytes(range(256)) * 3)  # i_block + system.data, or a block
    (src / "large.bin").write_bytes(os.urandom(300_000))
    d = src / "a" / "b" / "c"
    d.mkdir(parents=True)
    (d / "deep.txt").write_text("deep\n")
    (src / "a" / "unicodé ñame ☃.txt").write_text("snow\n")
    (src / "a" / "with space").write_text("space\n")
    big = src / "big"
    big.mkdir()
    for i in range(big_dir):
        (big / f"entry-{i:05d}-{'n' * (i % 40)}").write_bytes(b"%d\n" % i if i % 7 == 0 else b"")
    os.link(src / "hello.txt", src / "a" / "hardlink.txt")
    os.link(src / "hello.txt", big / "zz-hardlink")
    os.symlink("hello.txt", src / "fast-link")
    os.symlink(SLOW_TARGET, src / "slow-link")
    os.symlink("/nonexistent/dangling", src / "a" / "dangling")
    with open(src / "sparse.bin", "wb") as f:  # hole, data, hole, data, trailing hole
        f.seek(1 << 20)
        f.write(b"A" * 5000)
        f.seek(3 << 20)
        f.write(b"B" * 100)
        f.truncate(5 << 20)
    with open(src / "fragmented.bin", "wb") as f:
        for i in range(FRAG_PIECES):
            f.seek(i * FRAG_STRIDE)
            f.write(bytes([i % 251 + 1]) * 1024)
    (src / "emptydir").mkdir()


_FLS_LINE = re.compile(r"^(?P<type>\S+)\s+(?P<del>\*\s+)?(?P<inode>\d+)(?P<re>\(realloc\))?:\t(?P<path>.*)$")


def fls_entries(image: Path | str, offset_sectors: int = 0) -> list[tuple[str, int, str]]:
    """``fls -r -p`` of an ext image: allocated ``(path, inode, type)`` with type as fls
    prints it ("r/r", "d/d", "l/l"...), the ``$OrphanFiles`` tree and deleted names left
    out. Paths start with "/"."""
    cmd = ["fls", "-r", "-p"] + (["-o", str(offset_sectors)] if offset_sectors else [])
    out = subprocess.run([*cmd, str(image)], check=True, capture_output=True, timeout=600).stdout
    rows = []
    for raw in out.splitlines():
        line = raw.decode("utf-8", "surrogateescape")
        m = _FLS_LINE.match(line)
        if not m or m["del"] or m["re"] or m["path"].startswith("$OrphanFiles"):
            continue
        rows.append(("/" + m["path"], int(m["inode"]), m["type"]))
    return rows


def icat(image: Path | str, inode: int, offset_sectors: int = 0) -> bytes:
    """``icat``: the content of *inode* as The Sleuth Kit reads it."""
    cmd = ["icat"] + (["-o", str(offset_sectors)] if offset_sectors else [])
    return subprocess.run([*cmd, str(image), str(inode)], check=True, capture_output=True,
                          timeout=120).stdout


def istat_size(image: Path | str, inode: int) -> int:
    """The size ``istat`` reports for *inode*."""
    out = subprocess.run(["istat", str(image), str(inode)], check=True, capture_output=True,
                         text=True, timeout=60).stdout
    m = re.search(r"^size: (\d+)$", out, re.M)
    if not m:
        raise ValueError(f"istat {inode}: no size line")
    return int(m[1])


def debugfs(image: Path | str, *requests: str) -> str:
    """Run debugfs requests read-write on *image*; returns its output."""
    r = subprocess.run(["debugfs", "-w", "-f", "-", str(image)], input="\n".join(requests) + "\n",
                       capture_output=True, text=True, timeout=120, check=True)
    return r.stdout + r.stderr


@contextlib.contextmanager
def mounted(image: Path | str, *options: str) -> Iterator[Path]:
    """Mount *image* with fuse2fs (read-write unless *options* say ``ro``; fakeroot) on a
    temporary directory; the block ends once fuse2fs has exited
    (:func:`tools.fusemount.foreground_mount`: it writes the superblock after umount)."""
    with foreground_mount(["fuse2fs", "-f", "-o", ",".join(("fakeroot", *options)),
                           str(image)], "cdp-ext4-") as mnt:
        yield mnt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--size", default=str(64 << 20), help="bytes")
    ap.add_argument("--files", type=int, default=0, help="N small files (default: the sample tree)")
    ap.add_argument("-O", dest="features", default="", help="mke2fs -O features")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "src"
        if a.files:
            src.mkdir()
            populate_many(src, a.files)
        else:
            populate_sample(src)
        mkfs(a.out, int(a.size), src, options=["-O", a.features] if a.features else [])
    print(a.out)


if __name__ == "__main__":
    main()
