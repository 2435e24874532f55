"""asyncio NBD server: a thin pump around the sans-I/O core.

Design notes
------------
- One :class:`asyncio.BufferedProtocol` per connection (no streams: the socket reads
  into the buffer the core offers, a large WRITE payload's own buffer included, so its
  bytes are copied once; replies leave with one ``transport.writelines`` per batch). Use uvloop
  for speed (cdpd runs under uvloop; tests get it from
  :func:`cdp.targets.testing.thread.new_event_loop`).
- Requests go to the :class:`~cdp.targets.blockdev.BlockDevice` the core opened. A method
  that returns its result directly is answered at once without creating a task (the
  fast path); one that returns a future gets a done callback, any other awaitable runs
  as a task, and the reply goes out when it completes, possibly out of order (NBD
  replies carry the request cookie). Replies of requests completed in one loop turn
  leave together at its end (one ``writelines``, a ``call_soon`` per turn, not per
  reply): the proxy completes a batch of writes at once, and a send per reply was a
  fifth of the loop's time (issue 23).
- The write-completion hook (:mod:`cdp.targets.completion`, issue 23): a device may
  return a :class:`~cdp.targets.completion.Completion` instead (the proxy's writes).
  It gets a plain callback that queues the reply at once; completions finished in one
  :class:`~cdp.targets.completion.batch` (the proxy's writer hands back a batch of
  host writes with one loop wake-up) send their replies when the batch ends, in the
  same turn: no future, no handle per write, no second turn.
- Every exception from a device becomes a wire error through
  :func:`cdp.targets.nbd.errors.nbd_errno`; the connection keeps going. Only a protocol
  violation (bad magic, garbage handshake) ends a connection, after sending whatever
  replies were already queued.
- Flow control keeps receiving while replies drain (issue 28's "mutual standoff"): a
  client that pipelines small READs and reads replies only between sends cannot send
  while we do not read, so it does not read either; stopping *both* directions when the
  write buffer fills made each side wait for the other until the client's timeout
  (seconds per stall). Three rules instead:

  - one turn of the pump takes requests until the replies it produced reach
    ``turn_bytes`` (256 KiB; a READ costs its length), then yields to the loop
    (``call_soon``) so the socket is read and written between turns;
  - *processing* (not reading) stops while the transport's write buffer is above
    ``write_high`` or ``max_inflight`` requests run as tasks, and restarts at half of
    ``write_high``, well before the buffer is empty, so the pipe stays full;
  - *reading* stops only when the received-but-unparsed requests (``conn.backlog``)
    exceed ``read_high`` (1 MiB) and restarts 64 KiB below it (the replies of that
    step fit in the write buffer; at half, 16 MiB of replies to 1 KiB READs would
    not). Memory per connection is
    thus bounded by bytes in flight: ``read_high`` + one receive buffer of requests,
    ``write_high`` + one turn of replies, and the payloads of running tasks.

  The turn budget matters as much as the reading: a turn of 256 KiB of 1 KiB READs
  (8,192 requests) took over a second on a loaded machine before the first reply left.
  Measured with :mod:`cdp.targets.testing.nbd_standoff` (1 KiB READs, 64 MiB read back,
  load average 9 on 2 cores): before, 6-8 gaps over 0.5 s (the longest 1.4-1.7 s) in
  7-10 s; after, none (the longest 0.19 s) in 6.1 s. ``nbdkit file``: 3.5 s, 0.05 s.
- No reply sender thread (issue 23): replies of a turn leave through
  ``transport.writelines`` on the loop. A sender thread per connection (a queue and
  ``sendmsg`` on a ``dup`` of the socket) was built and measured slower at normal
  priority on 2 cores (nbd_bench quick, 3 pairs of 3 s, 2026-12-08): 4 KiB random reads
  x1 0.62-0.77 of ``nbdkit file`` against 0.95-1.01, x4 0.71-0.77 against 0.61-1.14,
  nbd-fragread-4k 0.66 against 0.94. Waking the sender and passing the GIL between the
  threads cost the loop about what the send did (docs/ARCHITECTURE.md).
- ``close()`` drains: stop accepting, stop reading, answer requests that were received
  but not started with ESHUTDOWN (as the spec suggests), let running ones finish, then
  close each connection. ``wait_closed()`` returns when every connection is gone.
"""

from __future__ import annotations

import asyncio
import errno
import functools
import logging
import ssl
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, cast

from cdp.errors import ProtocolError
from cdp.targets.blockdev import BlockDevice, ExportProvider
from cdp.targets.completion import Completion, at_batch_end
from cdp.targets.nbd.access import ClientExports, ClientRule, subject_text
from cdp.targets.nbd.core import (
    NEED_DATA,
    Closed,
    Ready,
    Refused,
    Request,
    ServerConnection,
    StartTls,
)
from cdp.targets.nbd.errors import nbd_errno
from cdp.targets.nbd.proto import Cmd, CmdFlag, NbdErrno

log = logging.getLogger("cdp.nbd")

_READ = int(Cmd.READ)
_WRITE = int(Cmd.WRITE)
_FLUSH = int(Cmd.FLUSH)
_TRIM = int(Cmd.TRIM)
_CACHE = int(Cmd.CACHE)
_WRITE_ZEROES = int(Cmd.WRITE_ZEROES)
_BLOCK_STATUS = int(Cmd.BLOCK_STATUS)
_FUA = int(CmdFlag.FUA)
_NO_HOLE = int(CmdFlag.NO_HOLE)
_FAST_ZERO = int(CmdFlag.FAST_ZERO)
_BYTES = (bytes, bytearray, memoryview)
#: what a request costs a turn besides its length: about one reply header
_REPLY_COST = 32


class _NbdProtocol(asyncio.BufferedProtocol):
    """One client connection."""

    def __init__(self, server: NbdServer) -> None:
        self.server = server
        self.conn = ServerConnection(server.provider, server.tls)
        self.transport: asyncio.Transport | None = None
        self.device: BlockDevice | None = None
        self.contexts: list[tuple[int, str]] = []
        self.peer: Any = None
        self.psk_user = ""  # the PSK user this client proved the key of (tls_psk)
        self.inflight = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.read_paused = False  # the transport's reading is paused (backlog, drain)
        self.write_paused = False  # write buffer above write_high: no processing
        self.upgrading = False  # TLS handshake running: received bytes are not parsed
        self.turn_scheduled = False
        self.send_scheduled = False  # replies of completed requests go out this turn
        self.closing = False  # no more parsing: DISC, EOF, violation or drain
        self.draining = False
        self.lost = False

    # --- asyncio callbacks -----------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        t = cast(asyncio.Transport, transport)  # uvloop's is not a subclass of it
        self.transport = t
        self.peer = t.get_extra_info("peername")
        self._set_write_limits(t)
        self.server._conns.add(self)
        t.write(self.conn.initial_bytes())

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.conn.recv_buffer()

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self.conn.recv_done(nbytes)
        except ProtocolError as exc:
            self._violation(exc)
            return
        if not self.upgrading:
            self._pump()

    def eof_received(self) -> bool:
        try:
            self.conn.receive_data(b"")
        except ProtocolError as exc:
            self._violation(exc)
            return False
        self._pump()
        return True  # we close the transport ourselves once replies are out

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.closing = True
        self.server._conns.discard(self)
        if self.inflight == 0:
            self._release()
        self.server._connection_gone()

    def pause_writing(self) -> None:
        self.write_paused = True  # processing stops; reading goes on (module notes)

    def resume_writing(self) -> None:
        self.write_paused = False
        if not self.lost and not self.upgrading:
            self._pump()

    # --- the pump ----------------------------------------------------------------

    def _pump(self) -> None:
        """One turn: turn buffered bytes into events and run them until a limit (module
        notes), send the replies, then stop or restart reading by the backlog."""
        conn = self.conn
        limit = self.server.max_inflight
        budget = self.server.turn_bytes
        try:
            while not self.closing:
                if self.inflight >= limit or self.write_paused:
                    break
                if budget <= 0 and not self.draining:
                    self._schedule_turn()
                    break
                ev = conn.next_event()
                if type(ev) is Request:
                    budget -= ev.length + _REPLY_COST
                    if self.draining:
                        conn.reply_error(ev, NbdErrno.ESHUTDOWN, "server is shutting down")
                    else:
                        self._dispatch(ev)
                elif ev is NEED_DATA:
                    break
                elif type(ev) is Ready:
                    self._ready(ev)
                elif type(ev) is Refused:
                    log.warning("%s: export %r refused: %s", self.peer, ev.name, ev.reason)
                elif type(ev) is Closed:
                    self._closed(ev)
                elif type(ev) is StartTls:
                    self._flush()  # the ACK goes out in plaintext
                    self._start_tls()
                    return
        except ProtocolError as exc:
            self._violation(exc)
            return
        self._flush()
        if self.closing:
            if self.inflight == 0:
                self._close_transport()
            return
        self._check_reading()

    def _schedule_turn(self) -> None:
        if not self.turn_scheduled:
            self.turn_scheduled = True
            asyncio.get_running_loop().call_soon(self._turn)

    def _turn(self) -> None:
        self.turn_scheduled = False
        if not self.lost and not self.upgrading:
            self._pump()

    def _check_reading(self) -> None:
        """Stop reading above ``read_high`` of unparsed requests; restart 1/16 below."""
        if self.lost or self.transport is None or self.draining:
            return
        backlog = self.conn.backlog
        high = self.server.read_high
        if not self.read_paused:
            if backlog > high:
                self.read_paused = True
                self.transport.pause_reading()
        elif backlog <= high - high // 16:
            # restart after a small step, not at half: the replies of half the backlog
            # (16 MiB for 1 KiB READs) would not fit under write_high, and a client
            # that cannot send does not read them (the standoff again)
            self.read_paused = False
            self.transport.resume_reading()

    def _start_tls(self) -> None:
        """Upgrade the transport in place (NBD_OPT_STARTTLS); reading resumes under TLS."""
        assert self.transport is not None and self.server.tls != "off"
        self.upgrading = True
        self.server._tls_tasks.add(asyncio.get_running_loop().create_task(self._upgrade()))

    def _psk_user(self, user: str) -> None:
        """The PSK handshake found ``user``'s key (called by the context's callback)."""
        self.psk_user = user

    async def _upgrade(self) -> None:
        assert self.transport is not None
        server = self.server
        self.psk_user = ""
        try:
            t = await asyncio.get_running_loop().start_tls(
                self.transport, self, server.context_for(self._psk_user), server_side=True,
                ssl_handshake_timeout=30)
        except (TimeoutError, OSError, ssl.SSLError, ConnectionError) as exc:
            if server.psk is not None:
                log.warning("%s: client refused (unknown PSK user or wrong key%s): TLS "
                            "handshake failed: %s", self.peer,
                            f", user {self.psk_user!r}" if self.psk_user else "", exc)
            elif server.verify_peer:  # no certificate, or one we do not trust
                log.warning("%s: client refused (no verified certificate): TLS handshake "
                            "failed: %s", self.peer, exc)
            else:
                log.warning("%s: TLS handshake failed: %s", self.peer, exc)
            if self.transport is not None:
                self.transport.abort()
            return
        finally:
            server._tls_tasks.discard(asyncio.current_task())
        if t is None:  # the peer went away during the handshake
            return
        self.transport = t
        self._set_write_limits(t)
        self.conn.tls_started()
        self.upgrading = False
        if server.psk is not None:
            self.conn.provider = ClientExports(server.provider, self.psk_user, server.clients)
            log.info("%s: TLS established, PSK user %r", self.peer, self.psk_user)
        elif server.verify_peer:
            identity = subject_text(t.get_extra_info("peercert"))
            self.conn.provider = ClientExports(server.provider, identity, server.clients)
            log.info("%s: TLS established, client %r", self.peer, identity)
        else:
            log.info("%s: TLS established", self.peer)
        self._pump()

    def _ready(self, ev: Ready) -> None:
        self.device = ev.device
        self.contexts = ev.contexts
        log.info(
            "%s: export %r size=%d flags=%#x structured=%s contexts=%s",
            self.peer,
            ev.name,
            ev.device.size,
            ev.flags,
            ev.structured,
            [name for _, name in ev.contexts],
        )
        if self.draining:
            self.closing = True

    def _closed(self, ev: Closed) -> None:
        self.closing = True
        if ev.reason == "refused":
            log.warning("%s: %s", self.peer, ev.message)
        elif ev.reason == "abort":
            log.info("%s: client aborted the handshake", self.peer)

    def _dispatch(self, req: Request) -> None:
        """Run one request: reply now (fast path) or start a task."""
        dev = self.device
        assert dev is not None
        cmd = req.cmd
        res: Any
        try:
            if cmd == _READ:
                res = dev.read(req.offset, req.length)
                if type(res) is bytes or isinstance(res, _BYTES):
                    self.conn.reply_read(req, res)
                    return
            elif cmd == _WRITE:
                assert req.data is not None
                res = dev.write(req.offset, req.data, bool(req.flags & _FUA))
            elif cmd == _FLUSH:
                res = dev.flush()
            elif cmd == _TRIM:
                res = dev.trim(req.offset, req.length, bool(req.flags & _FUA))
            elif cmd == _WRITE_ZEROES:
                f = req.flags
                res = dev.write_zeroes(
                    req.offset, req.length, bool(f & _FUA), not f & _NO_HOLE, bool(f & _FAST_ZERO)
                )
            elif cmd == _CACHE:
                res = dev.cache(req.offset, req.length)
            elif cmd == _BLOCK_STATUS:
                res = self._block_status(dev, req)
                if res is None:
                    return
            else:  # the core only emits the commands above
                raise AssertionError(f"unexpected command {cmd}")
        except Exception as exc:
            self.conn.reply_error(req, nbd_errno(exc, req.flags), str(exc))
            return
        if res is None:
            self.conn.reply_ok(req)
            return
        self._start_task(req, res)

    def _block_status(self, dev: BlockDevice, req: Request) -> Awaitable[Any] | None:
        """Answer BLOCK_STATUS now when every context answers synchronously."""
        results: list[tuple[int, Any]] = []
        pending = False
        for cid, name in self.contexts:
            r = dev.block_status(name, req.offset, req.length)
            pending = pending or not isinstance(r, list)
            results.append((cid, r))
        if not pending:
            self.conn.reply_block_status(req, results)
            return None
        return self._gather_status(results)

    @staticmethod
    async def _gather_status(results: list[tuple[int, Any]]) -> list[tuple[int, Any]]:
        out = []
        for cid, r in results:
            out.append((cid, r if isinstance(r, list) else await r))
        return out

    def _start_task(self, req: Request, aw: Awaitable[Any]) -> None:
        """Reply to *req* when *aw* completes: a completion gets a plain callback (the
        proxy's writes, finished in batches), a future a done callback (no task),
        anything else runs as a task."""
        self.inflight += 1
        if isinstance(aw, Completion):  # the write-completion hook: a plain callback
            aw.on_done(self._completed, req)
            return
        if isinstance(aw, asyncio.Future):
            aw.add_done_callback(functools.partial(self._future_done, req))
            return
        task = asyncio.get_running_loop().create_task(self._finish(req, aw))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def _completed(self, req: Request, exc: BaseException | None) -> None:
        """A :class:`~cdp.targets.completion.Completion`'s callback: queue the reply
        now; a batch of them is sent at the batch's end (module notes)."""
        if exc is not None and not isinstance(exc, Exception):
            exc = ConnectionAbortedError(errno.ECONNABORTED, "request cancelled")
        self._reply(req, None, exc)

    def _future_done(self, req: Request, fut: asyncio.Future[Any]) -> None:
        if fut.cancelled():
            self._reply(req, None, ConnectionAbortedError(errno.ECONNABORTED, "request cancelled"))
        else:
            exc = fut.exception()
            self._reply(req, None if exc is not None else fut.result(), exc)

    async def _finish(self, req: Request, aw: Awaitable[Any]) -> None:
        try:
            res = await aw
        except Exception as exc:
            self._reply(req, None, exc)
        else:
            self._reply(req, res, None)

    def _reply(self, req: Request, res: Any, exc: BaseException | None) -> None:
        """Queue the reply of a request that ran asynchronously; it is sent at the end
        of the loop turn with the other replies ready by then (one ``writelines``)."""
        conn = self.conn
        if exc is not None:
            conn.reply_error(req, nbd_errno(exc, req.flags), str(exc))
        else:
            cmd = req.cmd
            if cmd == _READ:
                conn.reply_read(req, res)
            elif cmd == _BLOCK_STATUS:
                conn.reply_block_status(req, res)
            else:
                conn.reply_ok(req)
        self.inflight -= 1
        if self.lost:
            conn.pieces_to_send()  # nobody to send to
            if self.inflight == 0:
                self._release()
            return
        if self.closing:
            self._flush()
            if self.inflight == 0:
                self._close_transport()
        elif not self.send_scheduled:
            self.send_scheduled = True
            at_batch_end(self._send_replies)  # outside a completion batch: call_soon

    def _send_replies(self) -> None:
        """End of a turn that completed requests: send their replies at once, and take
        the requests the in-flight limit held back."""
        self.send_scheduled = False
        if self.lost:
            return
        if self.closing:
            self._flush()
        elif self.conn.backlog and not self.write_paused and not self.upgrading:
            self._pump()  # sends the replies; takes the requests the limit held back
        else:
            self._flush()

    # --- helpers -----------------------------------------------------------------

    def _flush(self) -> None:
        if self.conn.has_output and self.transport is not None and not self.lost:
            self.transport.writelines(self.conn.pieces_to_send())

    def _set_write_limits(self, t: asyncio.Transport) -> None:
        high = self.server.write_high
        t.set_write_buffer_limits(high=high, low=high // 2)

    def _pause_reading(self) -> None:
        if not self.read_paused and self.transport is not None and not self.lost:
            self.read_paused = True
            self.transport.pause_reading()

    def _violation(self, exc: ProtocolError) -> None:
        log.warning("%s: protocol error, closing: %s", self.peer, exc)
        self.closing = True
        self._flush()
        if self.transport is not None:
            self.transport.close()

    def _close_transport(self) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.close()

    def _release(self) -> None:
        dev, self.device = self.device, None
        if dev is not None:
            try:
                dev.close()
            except Exception as exc:
                log.error("%s: closing the export failed: %r", self.peer, exc)

    def drain(self) -> None:
        """Stop reading; answer buffered requests ESHUTDOWN; close when idle."""
        if self.draining or self.lost:
            return
        self.draining = True
        self._pause_reading()
        if self.device is None:
            self.closing = True
        self._pump()
        self.closing = True
        if self.inflight == 0:
            self._close_transport()


def psk_context(keys: Mapping[str, bytes], found: Callable[[str], None]) -> ssl.SSLContext:
    """A server context that accepts TLS 1.2 and 1.3 clients proving one of ``keys``
    (PSK user -> key) and calls ``found(user)`` when the client names a known user; an
    unknown user gets no key and the handshake fails. Needs Python 3.13's ``ssl``.
    One context per connection, so ``found`` knows which connection it serves (the
    callback sees only the user); cost: about a millisecond per handshake."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_ciphers("PSK")  # TLS 1.2's PSK suites; TLS 1.3 uses the key with its own

    def key_for(user: str | None) -> bytes:
        key = keys.get(user or "")
        if key is None:
            log.warning("TLS PSK: unknown user %r", user)
            return b""
        found(user or "")
        return key

    getattr(ctx, "set_psk_server_callback")(key_for)  # noqa: B009 (3.13; mypy targets 3.11)
    return ctx


class NbdServer:
    """A listening NBD server; see :func:`serve_nbd`."""

    def __init__(self, provider: ExportProvider, max_inflight: int, write_high: int,
                 tls: str = "off", ssl_context: ssl.SSLContext | None = None, *,
                 read_high: int = 1 << 20, turn_bytes: int = 256 << 10,
                 clients: tuple[ClientRule, ...] = (),
                 psk: Mapping[str, bytes] | None = None) -> None:
        self.provider = provider
        #: client certificates are required (and named in every refusal)
        self.verify_peer = ssl_context is not None and ssl_context.verify_mode == ssl.CERT_REQUIRED
        self.clients = clients
        #: PSK user -> key (``tls_psk``): clients prove a key instead of a certificate
        self.psk = dict(psk) if psk else None
        self.tls = tls if ssl_context is not None or self.psk else "off"
        self.ssl_context = ssl_context
        self._tls_tasks: set[asyncio.Task[None]] = set()
        self.max_inflight = max_inflight
        self.write_high = write_high
        self.read_high = read_high
        self.turn_bytes = turn_bytes
        self._server: asyncio.Server | None = None
        self._conns: set[_NbdProtocol] = set()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False

    @property
    def port(self) -> int:
        """The bound TCP port (useful with port 0)."""
        assert self._server is not None
        return int(self._server.sockets[0].getsockname()[1])

    @property
    def connections(self) -> int:
        """Open client connections (for metrics)."""
        return len(self._conns)

    def _factory(self) -> _NbdProtocol:
        self._idle.clear()
        return _NbdProtocol(self)

    def _connection_gone(self) -> None:
        if not self._conns:
            self._idle.set()

    def close(self) -> None:
        """Stop accepting and drain every connection (see the module notes)."""
        if self._closed:
            return
        self._closed = True
        if self._server is not None:
            self._server.close()
        for c in list(self._conns):
            c.drain()
        if not self._conns:
            self._idle.set()

    def context_for(self, psk_found: Callable[[str], None]) -> ssl.SSLContext:
        """The TLS context for one connection's STARTTLS: the server's, or with
        pre-shared keys a fresh one that reports the user to ``psk_found``."""
        if self.psk is not None:
            return psk_context(self.psk, psk_found)
        assert self.ssl_context is not None
        return self.ssl_context

    async def wait_closed(self) -> None:
        """Wait until the listener and every connection are closed."""
        if self._server is not None:
            await self._server.wait_closed()
        await self._idle.wait()

    def abort(self) -> None:
        """End every connection now, unsent replies dropped (after a drain that timed
        out: a client that reads no replies holds its connection open)."""
        for c in list(self._conns):
            if c.transport is not None:
                c.transport.abort()


async def serve_nbd(
    provider: ExportProvider,
    host: str = "127.0.0.1",
    port: int = 10809,
    *,
    max_inflight: int = 128,
    write_high: int = 8 << 20,
    tls: str = "off",
    tls_cert: str = "",
    tls_key: str = "",
    tls_ca: str = "",
    tls_verify_peer: bool = False,
    clients: tuple[ClientRule, ...] = (),
    psk: Mapping[str, bytes] | None = None,
) -> NbdServer:
    """Listen for NBD clients on ``host:port`` (0: any free port, see ``.port``).
    ``tls`` "on"/"require" with a PEM ``tls_cert`` and ``tls_key``: NBD_OPT_STARTTLS.
    ``tls_verify_peer``: a client certificate signed by ``tls_ca`` is required, and
    ``clients`` (if any) say which volumes each subject may use
    (:mod:`cdp.targets.nbd.access`). ``psk`` (user -> key) instead of a certificate:
    clients prove a pre-shared key, and ``clients`` name PSK users."""
    ctx = None
    if tls != "off" and not psk:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.load_cert_chain(tls_cert, tls_key)
        if tls_verify_peer:
            if tls != "require":
                raise ValueError('tls_verify_peer needs tls="require"')
            ctx.load_verify_locations(cafile=tls_ca)
            ctx.verify_mode = ssl.CERT_REQUIRED
    server = NbdServer(provider, max_inflight, write_high, tls, ctx, clients=clients, psk=psk)
    factory: Callable[[], _NbdProtocol] = server._factory
    loop = asyncio.get_running_loop()
    server._server = await loop.create_server(factory, host, port, reuse_address=True)
    log.info("NBD server listening on %s:%d", host, server.port)
    return server
