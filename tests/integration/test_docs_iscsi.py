"""docs/ISCSI.md's examples run as written (issue 28, item 15): the Python program, the
configuration tables, the naming table and the shell commands (against a real cdpd; the
only change is the port, cdpd's test instance listens on a free one)."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

from cdp.config import load_config
from cdp.targets.iscsi.naming import export_name, target_name
from tests.conftest import require_tool
from tools.harness import Cdpd

DOC = Path(__file__).resolve().parents[2] / "docs" / "ISCSI.md"


def _blocks(lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```", DOC.read_text(), re.S | re.M)


def test_python_example_runs(tmp_path: Path) -> None:
    (code,) = _blocks("python")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                       cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    port, conns, sessions = r.stdout.split()
    assert int(port) > 0 and (conns, sessions) == ("0", "0")


def test_configuration_example_loads(tmp_path: Path) -> None:
    (toml,) = _blocks("toml")
    conf = tmp_path / "cdp.toml"
    conf.write_text(toml)
    s = load_config(conf).iscsi
    assert (s.host, s.port, s.nop_interval) == ("127.0.0.1", 3260, 30.0)
    ((key, chap),) = s.chap
    assert key == "vol0" and chap.user == "initiator-user" and chap.mutual_user == "target-user"


def test_naming_table_is_the_mapping() -> None:
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]+)` \|", DOC.read_text(), re.M)
    assert len(rows) == 5
    for export, iqn in rows:
        assert target_name(export) == iqn and export_name(iqn) == export


def test_shell_examples_run_against_cdpd(tmp_path: Path) -> None:
    require_tool("iscsi-ls", "iscsi-inq", "iscsi-readcapacity16", "qemu-img")
    (sh,) = _blocks("sh")
    d = Cdpd(tmp_path).start()
    try:
        cdpctl = f"{shlex.quote(sys.executable)} -m cdp.cli.main --config {shlex.quote(str(d.config))}"
        outs = []
        for line in sh.strip().splitlines():
            cmd = line.replace("127.0.0.1:3260", f"127.0.0.1:{d.iscsi_port}")
            cmd = re.sub(r"^cdpctl\b", cdpctl, cmd)
            r = subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=120,
                               cwd=tmp_path)
            assert r.returncode == 0, f"{line}: exit {r.returncode}\n{r.stdout}{r.stderr}"
            outs.append(r.stdout)
        assert "iqn.2026-11.io.cdp:vol0" in outs[0]
        assert outs[2].strip() == outs[5].strip() == str(256 << 20)
        assert "virtual size: 256 MiB" in outs[3]
    finally:
        d.stop()
