"""An NBD server for tests that runs the requests in flight in reverse order.

The NBD protocol lets a server run the requests it has received in any order and reply
in any order; ``nbdkit memory`` does so on parallel threads, but only now and then.
This server does it every time: it reads requests as long as the client keeps sending,
and runs them, newest first, only when the client goes quiet (it waits for a reply) or
sends FLUSH or DISC. A client that pipelines overlapping writes without waiting sees
them land in the wrong order here, deterministically.

It reuses the sans-I/O core (:class:`cdp.targets.nbd.core.ServerConnection`) over a
blocking socket on a thread per connection, listens on 127.0.0.1 port 0 and reports
the port it got (:attr:`ReorderServer.port`). ``batches`` records how many requests each
run held, so a test can check that a client kept its pipeline full.
"""

from __future__ import annotations

import select
import socket
import threading
from types import TracebackType

from cdp.errors import NotFound
from cdp.targets.nbd.core import NEED_DATA, Closed, Request, ServerConnection
from cdp.targets.nbd.proto import BASE_ALLOCATION, Cmd


class RamDisk:
    """The smallest :class:`cdp.targets.blockdev.BlockDevice`: a bytearray."""

    read_only = False
    can_multi_conn = False

    def __init__(self, size: int) -> None:
        self.size = size
        self.data = bytearray(size)

    def read(self, offset: int, length: int) -> bytes:
        return bytes(self.data[offset : offset + length])

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        self.data[offset : offset + len(data)] = data

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool) -> None:
        self.data[offset : offset + length] = bytes(length)

    def trim(self, offset: int, length: int, fua: bool) -> None:
        self.write_zeroes(offset, length, fua, True, False)

    def flush(self) -> None:
        return None

    def cache(self, offset: int, length: int) -> None:
        return None

    def meta_contexts(self) -> list[str]:
        return [BASE_ALLOCATION]

    def block_status(self, context: str, offset: int, length: int) -> list[tuple[int, int]]:
        return [(length, 0)]

    def close(self) -> None:
        return None


class _Provider:
    def __init__(self, disk: RamDisk) -> None:
        self.disk = disk

    def list_exports(self) -> list[tuple[str, str]]:
        return [("", "reorder")]

    def open_export(self, name: str) -> RamDisk:
        if name:
            raise NotFound(f"no export {name!r}")
        return self.disk


class ReorderServer:
    """``with ReorderServer(size) as s: NbdClient.connect(s.uri())``. ``quiet``: how long
    the client must stay silent before the held requests run."""

    def __init__(self, size: int, *, quiet: float = 0.02) -> None:
        self.disk = RamDisk(size)
        self.quiet = quiet
        self.batches: list[int] = []
        self.errors: list[BaseException] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="reorder-accept", daemon=True)

    def uri(self) -> str:
        return f"nbd://127.0.0.1:{self.port}/"

    def __enter__(self) -> ReorderServer:
        self._accepter.start()
        return self

    def __exit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def close(self) -> None:
        """Stop accepting, wait for the connection threads; re-raise a server error."""
        self._stop.set()
        self._listener.close()
        self._accepter.join(10)
        for t in self._threads:
            t.join(10)
        if self.errors:
            raise self.errors[0]

    def _accept(self) -> None:
        while not self._stop.is_set():
            ready, _, _ = select.select([self._listener], [], [], 0.05)
            if not ready:
                continue
            try:
                sock, _ = self._listener.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(sock,), name="reorder-conn", daemon=True)
            self._threads.append(t)
            t.start()

    def _serve(self, sock: socket.socket) -> None:
        try:
            with sock:
                self._pump(sock)
        except BaseException as e:  # reported by close()
            self.errors.append(e)

    def _run(self, conn: ServerConnection, held: list[Request]) -> None:
        """Run the held requests newest first, replying to each as it completes."""
        if not held:
            return
        self.batches.append(len(held))
        disk = self.disk
        for req in reversed(held):
            if req.cmd == Cmd.READ:
                conn.reply_read(req, disk.read(req.offset, req.length))
                continue
            if req.cmd == Cmd.WRITE:
                assert req.data is not None
                disk.write(req.offset, req.data, False)
            elif req.cmd in (Cmd.WRITE_ZEROES, Cmd.TRIM):
                disk.write_zeroes(req.offset, req.length, False, True, False)
            conn.reply_ok(req)
        held.clear()

    def _pump(self, sock: socket.socket) -> None:
        conn = ServerConnection(_Provider(self.disk))
        sock.sendall(conn.initial_bytes())
        held: list[Request] = []
        while not self._stop.is_set():
            ready, _, _ = select.select([sock], [], [], self.quiet if held else 0.1)
            if not ready:
                self._run(conn, held)  # the client went quiet: it waits for a reply
                sock.sendall(conn.data_to_send())
                continue
            data = sock.recv(1 << 20)
            conn.receive_data(data)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    if ev.cmd == Cmd.FLUSH:
                        self._run(conn, held)
                        conn.reply_ok(ev)
                    else:
                        held.append(ev)
                elif isinstance(ev, Closed):
                    self._run(conn, held)
                    sock.sendall(conn.data_to_send())
                    return
            sock.sendall(conn.data_to_send())
