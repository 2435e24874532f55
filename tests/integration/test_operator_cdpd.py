"""cdpd's first minutes (issue 28 items 1 and 2): a relative --store is resolved once
against the directory cdpd was started from; nothing is created before every listener
is bound; a bind error names the listener's option and address."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools.harness import Cdpd


def _cdpd(cwd: Path, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "cdp.daemon", *args], capture_output=True,
                          text=True, cwd=cwd, timeout=timeout)


@pytest.mark.parametrize("option", ["--nbd", "--iscsi", "--metrics", "--http"])
def test_port_in_use_names_the_option_and_creates_nothing(tmp_path: Path, option: str) -> None:
    busy = socket.create_server(("127.0.0.1", 0))
    try:
        addr = f"127.0.0.1:{busy.getsockname()[1]}"
        ports = {"--nbd": "127.0.0.1:0", "--iscsi": "127.0.0.1:0", "--metrics": "127.0.0.1:0",
                 "--http": "127.0.0.1:0"}
        ports[option] = addr
        args = [a for o, v in ports.items() for a in (o, v)]
        conf = tmp_path / "conf"
        conf.mkdir()
        config = Cdpd(conf).config
        run = tmp_path / "run"
        run.mkdir()
        r = _cdpd(run, "--config", str(config), "--store", "rel/store", *args)
    finally:
        busy.close()
    assert r.returncode != 0
    assert option in r.stderr and addr in r.stderr and "in use" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr, r.stderr
    assert list(run.iterdir()) == [] and not (conf / "store").exists()  # no stray store


def test_relative_store_is_resolved_once_and_named_absolute(tmp_path: Path) -> None:
    d = Cdpd(tmp_path)  # its config; the store given relative on the command line
    work = tmp_path / "work"
    work.mkdir()
    p = subprocess.Popen([sys.executable, "-m", "cdp.daemon", "--config", str(d.config),
                          "--store", "mystore", "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0",
                          "--metrics", "127.0.0.1:0", "--http", "127.0.0.1:0"],
                         cwd=work, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 60
        while not (work / "mystore" / "cdpd.json").exists():
            assert p.poll() is None and time.monotonic() < deadline, "cdpd did not start"
            time.sleep(0.05)
    finally:
        p.terminate()
        out, _ = p.communicate(60)
    assert f"store {work / 'mystore'}," in out, out
    assert not d.store.exists() and sorted(x.name for x in work.iterdir()) == ["mystore"]
    # cdpctl's hint names a command line that serves the same store from anywhere
    r = subprocess.run([sys.executable, "-m", "cdp.cli.main", "--config", str(d.config),
                        "--store", "mystore", "snapshot"], capture_output=True, text=True, cwd=work)
    assert r.returncode == 8, r.stderr
    assert f"--store {work / 'mystore'}`" in r.stderr and f"--config {d.config}" in r.stderr, r.stderr


def test_a_store_deeper_than_a_socket_address_is_served(tmp_path: Path) -> None:
    """A store path longer than a unix socket address (108 bytes) still gets its admin
    socket, and cdpctl reaches it (not "AF_UNIX path too long")."""
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    d = Cdpd(deep)
    assert len(str(d.store / "cdpd.sock")) > 108
    d.start()
    try:
        d.cdpctl("snapshot", "--label", "deep")
        assert [m["label"] for m in d.cdpctl_json("markers")] == ["deep"]
    finally:
        assert d.stop() == 0
