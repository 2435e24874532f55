"""The daemon's admin API: newline-delimited JSON over a unix socket in the store.

Request (one line)::

    {"op": "snapshot", "args": {"volumes": ["vol0"], "label": "before-upgrade"}}

Replies (one line each): zero or more progress lines, then exactly one final line::

    {"progress": {"done": 1048576, "total": 10737418240, "what": "image"}}
    {"ok": true, "result": ...}
    {"ok": false, "error": {"type": "NotFound", "message": "...", "exit_status": 3}}

The socket is created with mode 0600 (only the store's owner may drive the daemon), and
the server also checks the peer's uid (SO_PEERCRED) and refuses other users.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import socket
import struct
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cdp.errors import CdpError, DaemonUnavailable, ExitStatus, ProtocolError

if TYPE_CHECKING:  # the server side; cdpctl imports this module for AdminClient only
    from cdp.store import Store

log = logging.getLogger("cdp.admin")

MAX_REQUEST = 1 << 20


def _error_dict(e: BaseException) -> dict[str, Any]:
    if isinstance(e, CdpError):
        return {"type": type(e).__name__, "message": str(e), "exit_status": e.exit_status}
    return {"type": type(e).__name__, "message": f"internal error: {e}", "exit_status": ExitStatus.ERROR}


class AdminServer:
    """Serves :mod:`cdp.ops` over the store's unix socket."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.path = store.socket_path
        self._server: asyncio.AbstractServer | None = None
        self._handlers: set[asyncio.Task[Any]] = set()

    async def start(self) -> None:
        self.path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)
        try:
            with _short_path(self.path) as where:
                sock.bind(where)
            self._server = await asyncio.start_unix_server(
                self._handle, sock=sock, limit=MAX_REQUEST
            )
        except BaseException:
            sock.close()
            raise
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def close(self) -> None:
        """Stop listening and end the running requests (each client is told that cdpd
        stopped), before the caller closes the store."""
        if self._server is not None:
            self._server.close()
            for t in self._handlers:
                t.cancel()
            if self._handlers:
                await asyncio.wait(list(self._handlers), timeout=30)
            await self._server.wait_closed()
            self._server = None
        self.path.unlink(missing_ok=True)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._handlers.add(task)
        try:
            sock = writer.get_extra_info("socket")
            if sock is not None:
                creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
                _pid, uid, _gid = struct.unpack("3i", creds)
                if uid not in (0, os.getuid()):
                    writer.write(_line({"ok": False, "error": {"type": "PermissionError", "message": "not the store's owner", "exit_status": ExitStatus.ERROR}}))
                    await writer.drain()
                    return
            while True:
                try:
                    raw = await reader.readline()
                except (asyncio.LimitOverrunError, ValueError):
                    writer.write(_line({"ok": False, "error": _error_dict(ProtocolError("request too long"))}))
                    break
                if not raw:
                    break
                await self._one(raw, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            # cdpd is stopping: the client was told (see _one); end without the
            # traceback asyncio's stream callback logs for a cancelled handler
            pass
        finally:
            writer.close()
            if task is not None:
                self._handlers.discard(task)

    async def _one(self, raw: bytes, writer: asyncio.StreamWriter) -> None:
        try:
            req = json.loads(raw)
            if not isinstance(req, dict) or not isinstance(req.get("op"), str):
                raise ProtocolError("request must be a JSON object with an 'op'")
            args = req.get("args") or {}
            if not isinstance(args, dict):
                raise ProtocolError("'args' must be an object")
        except (ValueError, ProtocolError) as e:
            writer.write(_line({"ok": False, "error": _error_dict(ProtocolError(str(e)))}))
            await writer.drain()
            return

        def progress(done: int, total: int, what: str) -> None:
            writer.write(_line({"progress": {"done": done, "total": total, "what": what}}))

        try:
            from cdp.ops import (
                run_op,  # the server side only (cdpctl imports this module for AdminClient)
            )

            result = await run_op(self.store, req["op"], args, progress)
            writer.write(_line({"ok": True, "result": result}))
        except asyncio.CancelledError:
            stopped = DaemonUnavailable(
                f"cdpd stopped while {req['op']} ran; it did not finish (nothing acknowledged "
                "is lost: run it again once cdpd is back)")
            writer.write(_line({"ok": False, "error": _error_dict(stopped)}))
            raise
        except Exception as e:
            if not isinstance(e, CdpError):
                log.exception("admin op %s failed", req["op"])
            writer.write(_line({"ok": False, "error": _error_dict(e)}))
        await writer.drain()


def _line(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode() + b"\n"


#: sun_path's size on Linux, its terminating NUL included
_SUN_PATH = 108


@contextlib.contextmanager
def _short_path(path: Path) -> Iterator[str]:
    """*path* as a socket address: itself when it fits ``sun_path``, else the same file
    reached through ``/proc/self/fd`` and a descriptor of its directory, open for the
    block (Linux), so that a store may live at any depth."""
    if len(os.fsencode(path)) < _SUN_PATH:
        yield str(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


class AdminClient:
    """Blocking client used by cdpctl."""

    def __init__(self, path: Path) -> None:
        self.path = path
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with _short_path(path) as where:
                s.connect(where)
        except (FileNotFoundError, ConnectionRefusedError) as e:
            s.close()
            raise DaemonUnavailable(f"cdpd is not running on this store ({path}: {e.strerror})") from None
        except PermissionError:
            s.close()
            raise DaemonUnavailable(
                f"{path}: permission denied (only the store's owner may drive cdpd)") from None
        self._sock = s
        self._file = s.makefile("rb")

    def call(
        self, op: str, args: dict[str, Any], progress: Callable[[int, int, str], None] | None = None
    ) -> Any:
        """Run *op* in the daemon; re-raises the daemon's error as the same CdpError class."""
        try:
            self._sock.sendall(_line({"op": op, "args": args}))
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused us before reading: its reason is waiting below
        while True:
            try:
                raw = self._file.readline()
            except ConnectionResetError:
                raw = b""
            if not raw:
                raise DaemonUnavailable("cdpd closed the admin connection")
            msg = json.loads(raw)
            if "progress" in msg:
                if progress:
                    p = msg["progress"]
                    progress(p["done"], p["total"], p["what"])
                continue
            if msg.get("ok"):
                return msg.get("result")
            raise remote_error(msg.get("error") or {})

    def close(self) -> None:
        self._file.close()
        self._sock.close()


def remote_error(err: dict[str, Any]) -> CdpError:
    """Rebuild the daemon's error as the matching local CdpError subclass."""
    import cdp.errors as errors

    cls = getattr(errors, str(err.get("type")), None)
    if err.get("type") == "PermissionError":  # refused peer (SO_PEERCRED)
        cls = DaemonUnavailable
    if not (isinstance(cls, type) and issubclass(cls, CdpError)):
        cls = CdpError
    e = cls(err.get("message", "unknown error"))
    return e
