"""Store verification: every journal record, the volume metadata, the map files and
their manifest (every checksum, through mapengine's own decoder, then the invariants of
the map history they make up), and the file catalog (SQLite ``PRAGMA integrity_check``
plus its versions against the markers).

Offline (a stopped store) nothing is changed (no recovery, no truncation). The daemon's
``verify`` op reuses :func:`verify_maps` and :func:`verify_catalog`. :func:`repair`
(``cdpctl verify --repair``, stopped store only) rebuilds what is derived from the
journal and says what it could not rebuild.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Any

from cdp.errors import NotFound
from cdp.journal import verify_journal


def problem_dict(p: Any) -> dict[str, Any]:
    if isinstance(p, dict):
        return dict(p)
    if hasattr(p, "to_dict"):
        return dict(p.to_dict())
    if is_dataclass(p) and not isinstance(p, type):
        return asdict(p)
    return {"reason": str(p)}


def verify_volume_dir(vdir: Path) -> dict[str, Any]:
    """Verify one volume directory. Cost: reads every journal byte once."""
    problems: list[dict[str, Any]] = []
    name = vdir.name
    try:
        meta = json.loads((vdir / "volume.json").read_text())
        name = meta.get("name", name)
    except (OSError, ValueError) as e:
        problems.append({"file": str(vdir / "volume.json"), "reason": f"unreadable: {e}"})
    markers: list[dict[str, Any]] = []
    mpath = vdir / "markers.json"
    if mpath.exists():
        try:
            markers = list(json.loads(mpath.read_text())["markers"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            problems.append({"file": str(mpath), "reason": f"unreadable: {e}"})
    rep = verify_journal(vdir / "journal")
    problems.extend(dict(problem_dict(p), what="journal") for p in rep.problems)
    last = getattr(rep, "last_seq", None)
    if last is None:
        last = rep.records  # seqs are dense from 1 (no compaction of the head yet)
    for m in markers:
        if m.get("seq", 0) > last:
            problems.append(
                {"what": "markers", "file": str(mpath),
                 "reason": f"marker{m.get('id')} at @{m.get('seq')} is past the journal end @{last}"}
            )
    for p in problems:
        if p.get("file") == str(mpath):
            p.setdefault("what", "markers")
    nmaps, map_problems = verify_maps(vdir / "maps", last)
    problems.extend(map_problems)
    ncat, cat_problems = verify_catalog(
        vdir / CATALOG_FILE, {int(m.get("id", -1)): int(m.get("seq", -1)) for m in markers})
    problems.extend(cat_problems)
    return {
        "volume": name,
        "ok": not problems,
        "records": rep.records,
        "bytes": rep.bytes,
        "markers": len(markers),
        "maps": nmaps,
        "catalog_versions": ncat,
        "problems": problems,
    }


def verify_maps(mdir: Path, journal_last: int | None) -> tuple[int, list[dict[str, Any]]]:
    """Check the manifest and every map file it names (size, header, index and block
    checksums, entry count), that no map covers seqs past the journal's end, and, when
    every file is sound, the invariants of the history (:func:`map_invariants`).
    Returns (maps checked, problems). Cost: reads every map byte twice (decodes them
    twice) and builds the head once, as opening the volume does."""
    from mapengine.errors import MapError
    from mapengine.storage import MANIFEST, decode_manifest, decode_map

    problems: list[dict[str, Any]] = []
    mpath = mdir / MANIFEST
    if not mpath.exists():
        stray = sorted(p.name for p in mdir.glob("*.map")) if mdir.is_dir() else []
        if stray:
            problems.append({"what": "maps", "file": str(mpath),
                             "reason": f"missing, but {len(stray)} map files exist"})
        return 0, problems
    try:
        body = decode_manifest(mpath.read_bytes(), str(mpath))
    except (OSError, MapError) as e:
        return 0, [{"what": "maps", "file": str(mpath), "reason": str(e)}]
    sealed = body.get("sealed_seq")
    if journal_last is not None and isinstance(sealed, int) and sealed > journal_last:
        problems.append({"what": "maps", "file": str(mpath),
                         "reason": f"maps sealed up to @{sealed} but the journal ends at @{journal_last}"})
    n = 0
    files_ok = True
    for row in body.get("maps", []):
        try:
            name, size = str(row[0]), int(row[-1])
        except (TypeError, ValueError, IndexError):
            problems.append({"what": "maps", "file": str(mpath), "reason": f"bad manifest row {row!r}"})
            files_ok = False
            continue
        p = mdir / name
        n += 1
        try:
            raw = p.read_bytes()
        except OSError as e:
            problems.append({"what": "maps", "file": str(p), "reason": f"named by the manifest but unreadable: {e.strerror}"})
            files_ok = False
            continue
        if len(raw) != size:
            problems.append({"what": "maps", "file": str(p), "reason": f"size {len(raw)} != manifest {size}"})
            files_ok = False
            continue
        try:
            m = decode_map(raw, str(p))
        except MapError as e:
            problems.append({"what": "maps", "file": str(p), "reason": str(e)})
            files_ok = False
            continue
        except Exception as e:  # a decoder surprise on damaged bytes is damage too
            problems.append({"what": "maps", "file": str(p), "reason": f"undecodable: {type(e).__name__}: {e}"})
            files_ok = False
            continue
        if journal_last is not None and m.hi > journal_last:
            problems.append({"what": "maps", "file": str(p),
                             "reason": f"covers seqs up to @{m.hi} past the journal end @{journal_last}"})
    if files_ok:
        problems.extend(map_invariants(mdir))
    return n, problems


def map_invariants(mdir: Path) -> list[dict[str, Any]]:
    """The broken invariants of the map history in ``mdir`` (``MapHistory.check`` on a
    read-only open: windows contiguous, levels and full maps covering exactly their
    windows, every map's entries sorted and inside its window, ...), as problems of
    ``what = "maps"`` naming the manifest. Creates, deletes and changes nothing.
    Cost: loads every map once and builds the head (O(H log H) for H head entries)."""
    from mapengine import MapHistory
    from mapengine.storage import MANIFEST

    mpath = str(mdir / MANIFEST)
    try:
        h = MapHistory.open(mdir, cache_bytes=16 << 20, readonly=True)
    except Exception as e:  # a manifest that does not make a history is damage
        return [{"what": "maps", "file": mpath,
                 "reason": f"cannot open the map history: {type(e).__name__}: {e}"}]
    try:
        found = h.check(deep=True, head=False)
    except Exception as e:
        found = [f"check failed: {type(e).__name__}: {e}"]
    finally:
        h.close()
    return [{"what": "maps", "file": mpath, "reason": f"invariant: {p}"} for p in found]


CATALOG_FILE = "catalog.sqlite"


def verify_catalog(path: Path, markers: dict[int, int]) -> tuple[int, list[dict[str, Any]]]:
    """SQLite ``PRAGMA integrity_check`` of a volume's catalog, and every catalogued
    version a marker at the same seq. Returns (versions, problems); no file is fine."""
    if not path.exists():
        return 0, []
    problems: list[dict[str, Any]] = []
    try:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    except sqlite3.Error as e:
        return 0, [{"what": "catalog", "file": str(path), "reason": f"cannot open: {e}"}]
    try:
        rows = [r[0] for r in conn.execute("PRAGMA integrity_check").fetchall()]
        if rows != ["ok"]:
            problems.append({"what": "catalog", "file": str(path),
                             "reason": "integrity_check: " + "; ".join(map(str, rows[:5]))})
        versions = conn.execute("SELECT version, seq FROM versions").fetchall()
        for ver, seq in versions:
            if markers.get(int(ver)) != int(seq):
                problems.append({"what": "catalog", "file": str(path),
                                 "reason": f"version marker{ver} at @{seq} has no such marker"})
        return len(versions), problems
    except sqlite3.Error as e:
        problems.append({"what": "catalog", "file": str(path), "reason": f"unreadable: {e}"})
        return 0, problems
    finally:
        conn.close()


def verify_store_offline(store: Path, volume: str | None = None) -> dict[str, Any]:
    vroot = store / "volumes"
    if not vroot.is_dir():
        raise NotFound(f"no cdp store at {store}")
    dirs = sorted(d for d in vroot.iterdir() if d.is_dir())
    if volume is not None:
        dirs = [d for d in dirs if d.name == volume]
        if not dirs:
            raise NotFound(f"no volume {volume!r} in {store}")
    results = [verify_volume_dir(d) for d in dirs]
    return {"ok": all(r["ok"] for r in results), "volumes": results}


# ---------------------------------------------------------------------------- repair


def repair(settings: Any, volume: str | None = None) -> dict[str, Any]:
    """Rebuild what is derived from the journal, on a stopped store: damaged maps (the
    maps directory is moved aside and the journal replayed into new maps), a damaged
    markers file (rebuilt from the MARKER records during that replay) and a damaged
    catalog (moved aside and re-indexed at every marker). Journal damage cannot be
    rebuilt: it stays reported (reads touching it fail with EIO). Returns the actions,
    what could not be done, and the verification afterwards."""
    import asyncio

    from cdp.store import Store, _take_lock

    store_path = Path(settings.store).resolve()
    before = verify_store_offline(store_path, volume)
    actions: list[str] = []
    failed: list[str] = []
    if before["ok"]:
        return {"ok": True, "actions": [], "not_repaired": [], "verify": before}
    lock = _take_lock(store_path)  # StoreLocked while cdpd runs
    import os

    os.close(lock)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    moved: list[tuple[Path, Path]] = []
    for v in before["volumes"]:
        kinds = {p.get("what") for p in v["problems"]}
        vdir = store_path / "volumes" / v["volume"]
        if kinds & {"maps", "markers"}:
            for src in (vdir / "maps", vdir / "markers.json") if "markers" in kinds else (vdir / "maps",):
                if src.exists():
                    dst = src.with_name(f"{src.name}.damaged-{stamp}")
                    src.rename(dst)
                    moved.append((src, dst))
                    actions.append(f"{v['volume']}: moved {src.name} aside to {dst.name}")
        if "catalog" in kinds:
            for suffix in ("", "-wal", "-shm"):
                src = vdir / (CATALOG_FILE + suffix)
                if src.exists():
                    dst = src.with_name(f"{src.name}.damaged-{stamp}")
                    src.rename(dst)
                    actions.append(f"{v['volume']}: moved {src.name} aside to {dst.name}")
        if "journal" in kinds:
            failed.append(f"{v['volume']}: journal damage cannot be rebuilt (the data is not "
                          "stored anywhere else); reads touching it fail with EIO")

    async def reopen() -> None:
        from cdp.catalog.service import service_for

        store = Store.open(settings, create=False)
        try:
            for vol in store.volumes.values():
                if vol.replayed:
                    actions.append(f"{vol.name}: replayed {vol.replayed} journal records into the maps")
                svc = service_for(vol)
                await svc.idle()
        finally:
            store.close()

    try:
        asyncio.run(reopen())
    except Exception as e:
        failed.append(f"could not reopen the store to rebuild: {type(e).__name__}: {e}")
        for src, dst in moved:  # put back what could not be rebuilt
            if not src.exists():
                dst.rename(src)
                actions.append(f"put {dst.name} back")
    after = verify_store_offline(store_path, volume)
    for v in after["volumes"]:
        for p in v["problems"]:
            if p.get("what") != "journal":
                failed.append(f"{v['volume']}: still damaged: {p.get('file', '')} {p.get('reason', '')}")
    return {"ok": after["ok"], "actions": actions, "not_repaired": failed, "verify": after}
