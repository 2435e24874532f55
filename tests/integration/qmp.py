"""A small synchronous QMP client for the VM tests: JSON lines over QEMU's unix socket.

Written here rather than taken from PyPI: ``qemu.qmp`` (the QEMU project's library) is
asyncio-only and still 0.0.x; the tests need four things (the greeting and
``qmp_capabilities``, ``execute``, events kept while waiting for a reply, and waiting
for an event), which fit in a page. Not thread-safe: one test thread drives it.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any


class QmpError(Exception):
    """QEMU answered a command with an error (``.cls``: its class, e.g. GenericError)."""

    def __init__(self, command: str, error: dict[str, Any]) -> None:
        self.cls = str(error.get("class", ""))
        super().__init__(f"{command}: {self.cls}: {error.get('desc', '')}")


class Qmp:
    """One QMP connection; :meth:`connect` waits for the socket and negotiates."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self._buf = b""
        #: events received and not yet taken by :meth:`wait_event`, oldest first
        self.events: list[dict[str, Any]] = []
        self._id = 0

    @classmethod
    def connect(cls, path: str, timeout: float = 30.0) -> Qmp:
        deadline = time.monotonic() + timeout
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        q = cls(s)
        greeting = q._recv(timeout)
        assert "QMP" in greeting, greeting
        q.execute("qmp_capabilities")
        return q

    def _recv(self, timeout: float) -> dict[str, Any]:
        """The next message (reply or event)."""
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no message from QEMU")
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(1 << 16)
            except TimeoutError:
                raise TimeoutError(f"no message from QEMU in {timeout:.0f}s") from None
            if not chunk:
                raise ConnectionError("QEMU closed the QMP socket")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def execute(self, command: str, timeout: float = 120.0, **arguments: Any) -> Any:
        """Run a command and return its ``return`` value; QmpError on ``error``. Events
        arriving meanwhile are kept in :attr:`events`."""
        self._id += 1
        msg: dict[str, Any] = {"execute": command, "id": self._id}
        if arguments:
            msg["arguments"] = arguments
        self.sock.sendall(json.dumps(msg).encode() + b"\n")
        while True:
            try:
                r = self._recv(timeout)
            except TimeoutError as e:
                raise TimeoutError(f"{command} {arguments}: {e}") from None
            if "event" in r:
                self.events.append(r)
            elif r.get("id") == self._id:
                if "error" in r:
                    raise QmpError(command, r["error"])
                return r.get("return")

    def hmp(self, command_line: str) -> str:
        """An HMP command through ``human-monitor-command``; returns its output. It
        returns only when the command has finished (for ``qemu-io``: the I/O done)."""
        out = self.execute("human-monitor-command", **{"command-line": command_line})
        return str(out)

    def wait_event(self, name: str, timeout: float = 120.0, **data: Any) -> dict[str, Any]:
        """The first event ``name`` whose data contains ``data`` (taken from
        :attr:`events`, or waited for)."""
        deadline = time.monotonic() + timeout
        while True:
            for i, ev in enumerate(self.events):
                d = ev.get("data", {})
                if ev["event"] == name and all(d.get(k) == v for k, v in data.items()):
                    del self.events[i]
                    return ev
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no {name} {data} event; got {[e['event'] for e in self.events]}")
            try:
                msg = self._recv(left)
            except TimeoutError:
                raise TimeoutError(f"no {name} {data} event in {timeout:.0f}s; "
                                   f"got {[e['event'] for e in self.events]}") from None
            if "event" in msg:
                self.events.append(msg)

    def close(self) -> None:
        self.sock.close()
