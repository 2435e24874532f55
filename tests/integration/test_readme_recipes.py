"""The NTFS recipe (issue 28, item 7) runs as written: the fenced block between
``<!-- recipe:ntfs -->`` markers in docs/FILES.md (the README carries the same block) is
run by bash against a real cdpd. Two things change: the NBD port, because the test's
cdpd listens on a free one, and HOME, a temporary directory. ``cdpctl`` is the installed
entry point, which finds the store through ``CDP_STORE``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.conftest import require_tool
from tools.harness import Cdpd

ROOT = Path(__file__).resolve().parents[2]


def recipe(doc: Path, name: str) -> str:
    """The shell block between ``<!-- recipe:NAME -->`` and ``<!-- /recipe:NAME -->``."""
    m = re.search(rf"<!-- recipe:{name} -->\n```sh\n(.*?)```\n<!-- /recipe:{name} -->",
                  doc.read_text(), re.S)
    assert m, f"{doc}: no recipe {name!r}"
    return m.group(1)


def test_readme_carries_the_same_recipe() -> None:
    assert recipe(ROOT / "README.md", "ntfs") == recipe(ROOT / "docs" / "FILES.md", "ntfs")


def test_ntfs_recipe_runs_as_written(tmp_path: Path) -> None:
    require_tool("nbdfuse", "mkntfs", "ntfs-3g", "fusermount3")
    script = recipe(ROOT / "docs" / "FILES.md", "ntfs")
    home = tmp_path / "home"
    home.mkdir()
    d = Cdpd(tmp_path).start()
    bindir = Path(sys.executable).parent
    env = dict(os.environ, HOME=str(home), CDP_STORE=str(d.store),
               PATH=f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}")
    try:
        r = subprocess.run(["bash", "-euo", "pipefail", "-c",
                            script.replace("127.0.0.1:10809", f"127.0.0.1:{d.nbd_port}")],
                           cwd=home, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "hello.txt" in r.stdout, r.stdout
        assert (home / "hello.txt").read_text() == "hello from NTFS\n"
        assert [v["volume"] for v in d.cdpctl_json("volume", "list")] == ["ntfs0", "vol0"]
    finally:
        for mnt in (home / "cdp-ntfs", home / "cdp-disk"):  # after a failure midway
            subprocess.run(["fusermount3", "-u", str(mnt)], capture_output=True, check=False)
        d.stop()
