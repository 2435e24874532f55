"""Architectural layers, enforced: mapengine never imports cdp; protocol cores never do
I/O; only cdp/journal touches segment files; the volume is the core and the store the
composition root."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _py_files(*parts: str) -> list[Path]:
    return sorted((ROOT.joinpath(*parts)).rglob("*.py"))


def test_mapengine_never_imports_cdp() -> None:
    files = _py_files("mapengine")
    assert files, "mapengine package not found"
    for f in files:
        bad = {m for m in _imports(f) if m == "cdp" or m.startswith("cdp.")}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


#: the sans-I/O protocol modules under cdp/targets (bytes and commands in, events out)
_CORE_NAMES = {"core.py", "proto.py", "errors.py", "pdu.py", "login.py", "sense.py",
               "command.py", "scsi.py", "sbc.py", "spc.py", "pr.py", "naming.py"}


def test_protocol_cores_do_no_io() -> None:
    cores = [
        p
        for p in _py_files("cdp", "targets")
        if p.name in _CORE_NAMES or p.parent.name == "core"
    ]
    assert cores, "no protocol core found"
    forbidden = {"asyncio", "socket", "selectors", "uvloop", "ssl"}
    for f in cores:
        bad = {m for m in _imports(f) if m.split(".")[0] in forbidden}
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"


def test_only_journal_touches_segment_files() -> None:
    journal = ROOT / "cdp" / "journal"
    for f in _py_files("cdp") + _py_files("mapengine"):
        if journal in f.parents:
            continue
        text = f.read_text()
        assert ".seg\"" not in text and ".seg'" not in text, (
            f"{f.relative_to(ROOT)} names segment files; only cdp/journal may"
        )


def _under(names: set[str], *packages: str) -> set[str]:
    return {m for m in names if any(m == p or m.startswith(p + ".") for p in packages)}


def test_volume_is_the_core_and_the_store_composes() -> None:
    """docs/ARCHITECTURE.md ("Services"): cdp.volume imports no volume kind, service or
    store; the kinds and services (proxy, retention, the catalog service) import no
    store. Any import counts, also one inside a function."""
    bad = _under(_imports(ROOT / "cdp" / "volume.py"),
                 "cdp.store", "cdp.proxy", "cdp.retention", "cdp.catalog", "cdp.ops")
    assert not bad, f"cdp/volume.py imports {sorted(bad)}"
    below_store = [*_py_files("cdp", "proxy"), ROOT / "cdp" / "retention" / "policy.py",
                   ROOT / "cdp" / "retention" / "service.py", ROOT / "cdp" / "catalog" / "service.py"]
    for f in below_store:
        bad = _under(_imports(f), "cdp.store", "cdp.ops", "cdp.admin", "cdp.daemon")
        assert not bad, f"{f.relative_to(ROOT)} imports {sorted(bad)}"
