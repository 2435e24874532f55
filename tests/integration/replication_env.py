"""Real cdpds on loopback for the replication tests (docs/REPLICATION.md): the shared
secret, sources and targets made on request and started together, all stopped at the
end (the ``repl`` fixture in ``tests/integration/conftest.py``), and the checks the
tests share: writes through qemu-io, status, caught up, identical over NBD.

Polling and checks talk to cdpd's admin socket from the test process (:func:`api`, the
same operations and JSON ``cdpctl --json`` prints): a ``cdpctl`` process costs its
interpreter start and imports, 5-15 s each when the machine is loaded. The tests still
run ``cdpctl`` where its own output or exit status is what they check.
"""

from __future__ import annotations

import os
import random
import socket
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from cdp.admin import AdminClient
from cdp.config import SOCKET_NAME
from tools.harness import Cdpd, run

SIZE = 64 << 20
SECRET = b"integration-secret-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_all(*daemons: Cdpd, timeout: float = 120.0) -> None:
    """Start several cdpds at once (each start waits for its ports: seconds at load,
    hence the longer timeout: they share the CPU while they start)."""
    errors: list[BaseException] = []

    def one(d: Cdpd) -> None:
        try:
            d.start(timeout)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=one, args=(d,)) for d in daemons]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


class ReplEnv:
    """The cdpds of one replication test under ``tmp``: :meth:`source` and
    :meth:`target` make them (not started; :func:`start_all`), :meth:`close` stops
    whichever still run."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.daemons: list[Cdpd] = []
        self.secret = self.secret_file()

    def secret_file(self, name: str = "secret", value: bytes = SECRET) -> Path:
        p = self.tmp / name
        p.write_bytes(value + b"\n")
        os.chmod(p, 0o600)
        return p

    def _cdpd(self, name: str, config: str) -> Cdpd:
        (self.tmp / name).mkdir(exist_ok=True)
        d = Cdpd(self.tmp / name, size="64MiB", extra_config=config)
        self.daemons.append(d)
        return d

    def source(self, name: str = "s", *, secret: Path | None = None, extra: str = "") -> Cdpd:
        """A cdpd that may replicate out (``[replication] secret_file``)."""
        return self._cdpd(name, f'\n[replication]\nsecret_file = "{secret or self.secret}"\n'
                          + extra)

    def target(self, name: str = "t", *, port: int | None = None, secret: Path | None = None,
               extra: str = "") -> tuple[Cdpd, str]:
        """A cdpd listening for replication; (it, its HOST:PORT)."""
        to = f"127.0.0.1:{port or free_port()}"
        d = self._cdpd(name, f'\n[replication]\nlisten = "{to}"\n'
                       f'secret_file = "{secret or self.secret}"\n' + extra)
        return d, to

    def close(self) -> None:
        for d in self.daemons:
            if d.proc is not None and d.proc.poll() is None:
                d.stop()


def api(d: Cdpd, op: str, **args: Any) -> Any:
    """Run admin operation ``op`` in cdpd ``d`` (what ``cdpctl`` sends); its result."""
    client = AdminClient(d.store / SOCKET_NAME)
    try:
        return client.call(op, args)
    finally:
        client.close()


def writes(uri: str, rng: random.Random, n: int,
           sizes: tuple[int, ...] = (4096, 65536, 1 << 20)) -> None:
    """``n`` pattern writes of the given sizes at random 4 KiB-aligned offsets, in one
    qemu-io run."""
    cmds: list[str] = []
    for _ in range(n):
        ln = rng.choice(sizes)
        off = rng.randrange(0, SIZE - ln) & ~4095
        cmds += ["-c", f"write -P {rng.randrange(1, 256)} {off} {ln}"]
    run("qemu-io", "-f", "raw", *cmds, uri)


def status(src: Cdpd, to: str, vol: str = "vol0") -> dict[str, object]:
    rows = api(src, "replicate_status", volume=vol, to=to)
    assert len(rows) == 1 and rows[0]["target"] == to, rows
    return dict(rows[0])


def caught_up(src: Cdpd, to: str, timeout: float = 120, vol: str = "vol0") -> dict[str, object]:
    """Wait until the target acknowledged the source's head; the status row then."""
    deadline = time.monotonic() + timeout
    while True:
        st = status(src, to, vol)
        if st["state"] in ("streaming", "catching-up") and st["lag_records"] == 0:
            assert st["lag_seconds"] == 0
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.2)


def wait_state(src: Cdpd, to: str, states: tuple[str, ...], timeout: float = 60
               ) -> dict[str, object]:
    deadline = time.monotonic() + timeout
    while True:
        st = status(src, to)
        if st["state"] in states:
            return st
        assert time.monotonic() < deadline, st
        time.sleep(0.1)


def identical(src: Cdpd, tgt: Cdpd, rep: str = "rep0", *, verify: bool = True) -> int:
    """qemu-img compare at the head and at every marker; ``verify`` clean on both; the
    number of markers compared."""
    marks = api(src, "markers", volume="vol0")
    assert [m["seq"] for m in api(tgt, "markers", volume=rep)] == [m["seq"] for m in marks]
    for m in marks:
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri(f"vol0@{m['name']}"),
            tgt.uri(f"{rep}@{m['name']}"))
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", src.uri("vol0"), tgt.uri(rep))
    if verify:
        for d in (src, tgt):
            assert api(d, "verify", volume=None)["ok"] is True
    return len(marks)


def metrics(d: Cdpd) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{d.metrics_port}/metrics", timeout=10) as r:
        return str(r.read().decode())
