"""Run a real cdpd (a subprocess) on a scratch store, and cdpctl against it; start any
other server on a port of its own.

Shared by the integration tests and the benchmarks.

Ports: a server under test binds port 0 and the port it got is read back, never "find a
free port, release it, start the server on it": between the release and the server's
bind another server of the suite can take the port, and the readiness probe then
succeeds against the wrong server. cdpd writes its bound addresses to
``STORE/cdpd.json``; for other servers (nbdkit, tgtd), which do not print the port they
got, :func:`listening_port` asks the kernel which TCP port the child process listens on.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TEST_CONFIG = """
[store]
path = "{store}"
[journal]
segment_bytes = "{segment_bytes}"
sync = "{sync}"
[maps]
l0_max_writes = {l0_max_writes}
seal_interval = "2s"
fanout = 4
full_every = 8
[[volume]]
name = "vol0"
size = "{size}"
"""


class Cdpd:
    """A cdpd process on ``store`` with NBD, iSCSI, metrics and HTTP on ephemeral
    loopback ports."""

    def __init__(
        self,
        tmp: Path,
        *,
        size: str = "256MiB",
        sync: str = "flush",
        segment_bytes: str = "8MiB",
        l0_max_writes: int = 256,
        extra_config: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.tmp = tmp
        #: environment variables set for cdpd on top of this process's
        self.env = env or {}
        self.store = tmp / "store"
        self.config = tmp / "cdp.toml"
        self.config.write_text(
            TEST_CONFIG.format(
                store=self.store, size=size, sync=sync, segment_bytes=segment_bytes,
                l0_max_writes=l0_max_writes,
            )
            + extra_config
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = tmp / "cdpd.log"
        self.nbd_port = 0
        self.metrics_port = 0
        self.iscsi_port = 0
        self.http_url = ""  # http://127.0.0.1:PORT (the web console and API)

    def start(self, timeout: float = 30.0) -> Cdpd:
        runfile = self.store / "cdpd.json"
        runfile.unlink(missing_ok=True)
        with open(self.log, "ab") as logf:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cdp.daemon", "--config", str(self.config),
                 "--nbd", "127.0.0.1:0", "--iscsi", "127.0.0.1:0", "--metrics", "127.0.0.1:0",
                 "--http", "127.0.0.1:0"],
                stdout=logf, stderr=subprocess.STDOUT, cwd=self.tmp,
                env={**os.environ, **self.env} if self.env else None,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"cdpd exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                info = json.loads(runfile.read_text())
                if info["pid"] == self.proc.pid:
                    self.nbd_port = int(info["nbd"].rsplit(":", 1)[1])
                    self.metrics_port = int(info["metrics"].rsplit(":", 1)[1])
                    self.iscsi_port = int(info["iscsi"].rsplit(":", 1)[1])
                    self.http_url = info.get("http") or ""
                    return self
            except (FileNotFoundError, ValueError, KeyError):
                pass
            time.sleep(0.05)
        # a cdpd left starting would serve on, unowned, after the test: stop it here
        self.proc.kill()
        self.proc.wait()
        raise RuntimeError(f"cdpd did not start in {timeout}s (killed it):\n"
                           f"{self.log.read_text()}")

    def uri(self, export: str = "vol0") -> str:
        return f"nbd://127.0.0.1:{self.nbd_port}/{export}"

    def iscsi_uri(self, export: str = "vol0", lun: int = 0) -> str:
        from cdp.targets.iscsi.naming import target_name

        return f"iscsi://127.0.0.1:{self.iscsi_port}/{target_name(export)}/{lun}"

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(30)
        self.proc = None

    def cdpctl(self, *args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(
            [sys.executable, "-m", "cdp.cli.main", "--config", str(self.config), *args],
            capture_output=True, text=True, cwd=self.tmp, timeout=timeout,
        )
        if check and r.returncode != 0:
            raise AssertionError(f"cdpctl {' '.join(args)} failed ({r.returncode}):\n{r.stderr}{r.stdout}")
        return r

    def cdpctl_json(self, *args: str) -> Any:
        return json.loads(self.cdpctl(*args, "--json").stdout)

    def logs(self) -> str:
        return self.log.read_text() if self.log.exists() else ""


def rss_bytes(pid: int) -> int:
    """Resident set size of running process ``pid`` (from /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            link = os.readlink(f"{fd_dir}/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _listening_ports(pid: int) -> list[int]:
    """TCP ports a process listens on: its socket inodes (``/proc/PID/fd``) matched
    against the LISTEN rows of ``/proc/PID/net/tcp`` and ``tcp6``. Linux only."""
    try:
        inodes = _socket_inodes(pid)
    except OSError:
        return []
    ports = []
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as f:
                rows = f.read().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            cols = row.split()
            # sl local_address rem_address st ... inode (column 9); st 0A = LISTEN
            if len(cols) > 9 and cols[3] == "0A" and cols[9] in inodes:
                ports.append(int(cols[1].rsplit(":", 1)[1], 16))
    return sorted(set(ports))


def listening_port(proc: subprocess.Popen[Any], what: str, timeout: float = 20.0) -> int:
    """Wait until the child ``proc`` listens on a TCP port and return it. Start the
    server on port 0: the port comes from the kernel's socket table for that process,
    so it is the one the server got and cannot be another server's. RuntimeError if the
    process exits first or does not listen within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode} before listening")
        ports = _listening_ports(proc.pid)
        if ports:
            return ports[0]
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what} did not listen within {timeout:g}s")
        time.sleep(0.02)


@contextlib.contextmanager
def refused_port() -> Iterator[int]:
    """A loopback TCP port that refuses connections for as long as the block runs: we
    hold it bound and never listen, so no other server can take it meanwhile."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])


def run(*cmd: str, check: bool = True, timeout: float = 300, input: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(list(cmd), capture_output=True, timeout=timeout, input=input)
    if check and r.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr.decode(errors='replace')}{r.stdout.decode(errors='replace')[-2000:]}"
        )
    return r
