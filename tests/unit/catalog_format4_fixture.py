"""A real format 4 catalog and what every query answered on it (the fixture of
``test_catalog_format5.py``; uses only the API formats 4 and 5 share).

``catalog_format4.sql`` (a ``sqlite3`` dump) and ``catalog_format4.json`` (the answers)
were written by :func:`main` run with the format 4 code (commit d659e7f)::

    PYTHONPATH=<that tree> python tests/unit/catalog_format4_fixture.py

They are pinned: never regenerate them with a newer format.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

from cdp.catalog.db import Catalog
from cdp.catalog.indexer import Computed, View, persist
from cdp.catalog.model import Entry
from cdp.catalog.rules import Plan, Resolver, plan_steps
from cdp.ntfs.attribute import DataStream, FileName
from cdp.ntfs.record import FileRecord

HERE = Path(__file__).parent
FORMAT4_SQL = HERE / "catalog_format4.sql"
FORMAT4_ANSWERS = HERE / "catalog_format4.json"
ROOT = 5


def _rec(number: int, parent: int, name: str, *, is_dir: bool = False, size: int = 3,
         mtime: int = 0, seq: int = 1, resident: bool = True, streams: int = 0,
         extra_names: tuple[tuple[int, str], ...] = ()) -> FileRecord:
    r = FileRecord(number, seq, 1 | (2 if is_dir else 0))
    r.names = [FileName(parent, 0, 1, name, is_dir, size)]
    r.names += [FileName(p, 0, 1, n, is_dir, size) for p, n in extra_names]
    base = 130_000_000_000_000_000 + number * 10_000_000
    r.times = (base, base + mtime, base + (mtime if number % 3 else 7), 0 if number % 5 == 0 else base + 9)
    if is_dir:
        r.data = None
    elif resident:
        r.data = DataStream("", True, size, (size + 7) & ~7, 0, content=b"x" * min(size, 40))
    else:
        r.data = DataStream("", False, size, (size + 4095) & ~4095, 0x8000 if number % 2 else 0,
                            fragments=[(0, bytes([0x31, 0x08]) + (number * 8).to_bytes(3, "little")
                                        + b"\x00")])
    r.streams = [DataStream(f"s{i}", True, i + 1, i + 1, 0, content=b"y") for i in range(streams)]
    return r


def _generation(v: int) -> dict[int, FileRecord]:
    """The MFT at marker *v*: directories, files in them; from marker to marker files
    are modified, deleted, added, renamed, a directory moves and a record is reused."""
    out: dict[int, FileRecord] = {}
    out[64] = _rec(64, ROOT, "Docs", is_dir=True)
    out[65] = _rec(65, ROOT, "Moved" if v >= 3 else "Projects", is_dir=True)
    out[66] = _rec(66, 65, "Sub", is_dir=True)
    out[67] = _rec(67, 64, "Empty", is_dir=True)
    for i in range(40):
        num = 100 + i
        if v >= 2 and i % 9 == 0:
            out[num] = FileRecord(num, 1, 0)  # deleted at marker 2: the record not in use
            continue
        parent = (64, 65, 66)[i % 3]
        name = f"{'Q3' if i % 4 == 0 else 'file'}-{i:03d}.{('txt', 'DOCX', 'bin')[i % 3]}"
        if v >= 4 and i == 5:
            name = "renamed.txt"
        mtime = v if i % 2 == 0 else 0  # half modified at every marker
        size = (5 << 30) + i if i == 7 else 3 + i + (v if i % 2 == 0 else 0)
        out[num] = _rec(num, parent, name, size=size, mtime=mtime, resident=i % 4 != 1,
                        streams=1 if i == 11 else 0,
                        extra_names=((64, f"link-{i:03d}.txt"),) if i == 13 else ())
    if v >= 2:
        for i in range(6):
            out[200 + i] = _rec(200 + i, 64, f"new-{v}-{i}.Txt", size=10 + i, mtime=v)
    if v >= 3:
        out[109] = _rec(109, 66, "reused.txt", seq=2, size=99, mtime=v)  # record 109 reused
    return out


async def index(cat: Catalog, v: int, gen: int | None = None) -> None:
    """Catalog marker *v* of :func:`_generation` (*gen*, default *v*) as the indexer does."""
    new = _generation(v if gen is None else gen)
    base = cat.last_version()
    backup_ns = 1_700_000_000 * 10**9 + v * 3600 * 10**9
    if base is None:
        plan = Plan("", records=len(new))
        steps = plan_steps(plan, new, {}, Resolver("", new), backup_ns)
    else:
        bv = base.version
        old = cat.visible("", set(new) | set(cat.all_visible("", bv)), bv)
        plan = Plan("", records=len(new))
        steps = plan_steps(plan, new, old, Resolver("", new, lambda r: cat.dir_info("", r, bv)),
                           backup_ns, lambda d: cat.subtree(d, bv))
    for _ in steps:
        pass
    c = Computed("full" if base is None else "diff", parts=[{"name": "", "fs": "ntfs"}],
                 plans=[plan], parsed=len(new), changed_records=len(new))
    await persist(cat, c, v, v * 100, backup_ns)


def _full(e: Entry) -> list[Any]:
    return [e.id, *[v.hex() if isinstance(v, bytes) else v for v in e.values()]]


def _listed(e: Entry) -> list[Any]:
    return [e.id, *e.to_dict().values()]


def answers(cat: Catalog, versions: int) -> dict[str, Any]:
    """What every read query of :class:`Catalog` (and a :class:`View` between markers)
    answers on *cat*, as JSON."""
    out: dict[str, Any] = {"versions": [v.to_dict() for v in cat.versions()]}
    for v in range(1, versions + 1):
        every = cat.subtree("/", v)
        dirs = sorted({e.dir for e in every} | {e.path for e in every if e.is_dir})
        out[f"subtree {v}"] = [_full(e) for e in every]
        if v in (1, versions):
            out[f"subtree-list {v}"] = [_listed(e) for e in cat.subtree("/", v, full=False)]
            out[f"all_visible {v}"] = {str(r): [_full(e) for e in es]
                                       for r, es in sorted(cat.all_visible("", v).items())}
        # (a subtree's order is the query plan's: by id here)
        out[f"subtree /Docs {v}"] = sorted(_full(e) for e in cat.subtree("/Docs", v))
        out[f"visible {v}"] = {str(r): [_full(e) for e in es]
                               for r, es in sorted(cat.visible("", range(60, 210, 3), v).items())}
        out[f"dirs {v}"] = sorted(_full(e) for e in cat.dirs("", v))
        out[f"dir_info {v}"] = [cat.dir_info("", r, v) for r in (5, 64, 65, 66, 67, 100)]
        for d in dirs:
            out[f"list_dir {d} {v}"] = [_listed(e) for e in cat.list_dir(d, v)]
            out[f"names_in {d} {v}"] = sorted(cat.names_in("", d, v))
        for e in every[v::3]:
            got = cat.at_path(e.dir, e.name.upper(), v)
            out[f"at_path {e.path.upper()} {v}"] = None if got is None else got.id
        out[f"damaged {v}"] = cat.damaged(v)
    paths = sorted({(e.dir, e.name) for e in cat.subtree("/", 0)}
                   | {(e.dir, e.name) for v in range(1, versions + 1) for e in cat.subtree("/", v)})
    for d, n in paths:
        out[f"history {d} {n}"] = [e.id for e in cat.history(d, n)]
    out["history case"] = [_full(e) for e in cat.history("/DOCS", "Q3-000.TXT")]
    # every row whole once; the other answers by id (and order)
    out["glob *"] = [_full(e) for e in cat.glob("*", on_path=False)]
    for pat in ("q3*", "*.docx", "*-01?.*", "file-0[0-2]*", "[nr]*"):
        out[f"glob {pat}"] = [e.id for e in cat.glob(pat, on_path=False)]
    for pat in ("/docs/*", "*/sub/*.bin", "/moved*"):
        out[f"glob path {pat}"] = [e.id for e in cat.glob(pat, on_path=True)]
    for a in range(0, versions + 1):
        for b in range(a, versions + 1):
            out[f"changed_between {a} {b}"] = sorted(cat.changed_between(a, b))
    view = View(cat, versions)  # the newest marker as cdpctl files --at reads it
    out["view /Docs"] = [_listed(e) for e in view.list_dir("/Docs")]
    return json.loads(json.dumps(out))


VERSIONS = 4


def main() -> int:
    """Write the pinned format 4 catalog and its answers (run with the format 4 code)."""
    import tempfile

    from cdp.catalog.db import CATALOG_FORMAT
    if CATALOG_FORMAT != 4:
        raise SystemExit("run this with the format 4 code (PYTHONPATH=<tree at d659e7f>)")
    with tempfile.TemporaryDirectory() as t:
        cat = Catalog(Path(t) / "catalog.sqlite")
        for v in range(1, VERSIONS + 1):
            asyncio.run(index(cat, v))
        got = answers(cat, VERSIONS)
        FORMAT4_ANSWERS.write_text("{\n" + ",\n".join(
            f"{json.dumps(k)}: {json.dumps(got[k], separators=(',', ':'))}" for k in sorted(got))
            + "\n}\n")
        cat.close()
        db = sqlite3.connect(Path(t) / "catalog.sqlite")
        FORMAT4_SQL.write_text("\n".join(db.iterdump()) + "\n")
        db.close()
    return 0




def load_format4(path: Path) -> None:
    """The pinned format 4 catalog at *path*."""
    db = sqlite3.connect(path)
    db.executescript(FORMAT4_SQL.read_text())
    db.close()


if __name__ == "__main__":
    sys.exit(main())
