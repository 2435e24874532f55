"""A torture writer: one NBD connection writing its own blocks of a volume, recording
which writes a completed FLUSH covered (see :mod:`tools.torture.model`)."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable

from cdp.targets.nbd.client import NbdClient
from tools.torture.model import BLOCK, Model, content


class Gate:
    """Lets the controller quiesce every writer (each flushes, then waits)."""

    def __init__(self, writers: int) -> None:
        self.writers = writers
        self._cond = threading.Condition()
        self._hold = False
        self._held = 0
        self.stop = threading.Event()

    def writer_check(self, flush: Callable[[], None]) -> None:
        with self._cond:
            if not self._hold:
                return
        flush()
        with self._cond:
            self._held += 1
            self._cond.notify_all()
            while self._hold and not self.stop.is_set():
                self._cond.wait(0.1)
            self._held -= 1

    def quiesce(self, alive: Callable[[], int], timeout: float = 30.0) -> bool:
        """Hold every live writer after its flush; False if they did not get there."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._hold = True
            while self._held < alive() and not self.stop.is_set():
                if time.monotonic() > deadline:
                    return False
                self._cond.wait(0.05)  # a writer may end (killed daemon) without notifying
            return not self.stop.is_set()

    def release(self) -> None:
        with self._cond:
            self._hold = False
            self._cond.notify_all()

    def halt(self) -> None:
        self.stop.set()
        with self._cond:
            self._hold = False
            self._cond.notify_all()


class Writer(threading.Thread):
    """Random writes (1..16 blocks, some write-zeroes) into ``blocks``, a FLUSH every few
    writes. Ends quietly when the connection breaks (the daemon was killed)."""

    def __init__(self, uri: str, model: Model, blocks: range, gate: Gate, seed: int) -> None:
        super().__init__(daemon=True)
        self.uri = uri
        self.model = model
        self.blocks = blocks
        self.gate = gate
        self.rng = random.Random(seed)
        self.writes = 0
        self.flushes = 0
        self.error: BaseException | None = None
        self.connected = threading.Event()
        self._since: list[tuple[int, int]] = []

    def _flush(self, c: NbdClient) -> None:
        c.flush()
        self.model.flushed(self._since)
        self._since = []
        self.flushes += 1

    def run(self) -> None:
        rng = self.rng
        try:
            c = NbdClient.connect(self.uri, timeout=30, window=8)
        except Exception as e:  # daemon already gone
            self.error = e
            self.connected.set()
            return
        self.connected.set()
        try:
            lo, hi = self.blocks.start, self.blocks.stop
            while not self.gate.stop.is_set():
                self.gate.writer_check(lambda: self._flush(c))
                if self.gate.stop.is_set():
                    break
                n = min(rng.choice((1, 1, 2, 4, 8, 16)), hi - lo)
                b0 = rng.randrange(lo, hi - n + 1)
                gen = 0 if rng.random() < 0.05 else self.model.next_gen()
                for b in range(b0, b0 + n):
                    self.model.issued(b, gen)
                    self._since.append((b, gen))
                if gen == 0:
                    c.zero(b0 * BLOCK, n * BLOCK)
                else:
                    c.pwrite(b"".join(content(b, gen) for b in range(b0, b0 + n)), b0 * BLOCK)
                self.writes += 1
                if rng.random() < 0.08:
                    self._flush(c)
        except Exception as e:  # the kill: the connection breaks
            self.error = e
        finally:
            try:
                c.sock.close()
            except OSError:
                pass
