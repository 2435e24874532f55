"""Offline store verification: reads every journal record and the volume metadata of a
stopped store without changing anything (no recovery, no truncation)."""

from __future__ import annotations

import json
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
    problems.extend(problem_dict(p) for p in rep.problems)
    last = getattr(rep, "last_seq", None)
    if last is not None:
        for m in markers:
            if m.get("seq", 0) > last:
                problems.append(
                    {"file": str(mpath), "reason": f"marker{m.get('id')} at @{m.get('seq')} is past the journal end @{last}"}
                )
    return {
        "volume": name,
        "ok": not problems,
        "records": rep.records,
        "bytes": rep.bytes,
        "markers": len(markers),
        "problems": problems,
    }


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
