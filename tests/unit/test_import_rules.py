"""Architectural layers, enforced: the import-linter contracts of pyproject.toml (layers
with the volume at the core and the store as composition root, no cycles, pure
mapengine, NBD and iSCSI apart); protocol cores never do I/O; only cdp/journal touches
segment files."""

from __future__ import annotations

import ast
import subprocess
import sys
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


def test_import_contracts() -> None:
    """The layering, the acyclic packages, NBD/iSCSI independence and pure mapengine are
    import-linter contracts in pyproject.toml (also run by ``make lint``); this runs the
    same check so the quick test loop catches a broken layer too."""
    tool = Path(sys.executable).with_name("lint-imports")
    r = subprocess.run([str(tool), "--no-cache", "--config", str(ROOT / "pyproject.toml")],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
