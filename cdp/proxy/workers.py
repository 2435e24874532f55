"""How a proxy volume reaches its primary without blocking the event loop: worker
threads with batched hand-off (:class:`Workers`) and the queue of in-flight primary
operations that orders overlapping ones (:class:`Ranges`)."""

from __future__ import annotations

import asyncio
import threading
from collections import deque
from collections.abc import Callable
from typing import Any


class Workers:
    """Worker threads for primary I/O with batched hand-off both ways: a worker takes
    every queued call at once and hands the results back with one loop wake-up, so a
    deep queue of small writes costs few thread switches (the event loop never blocks
    on the primary)."""

    def __init__(self, n: int, name: str) -> None:
        self._q: deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any]]] = deque()
        self._cv = threading.Condition()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
        self._done_lock = threading.Lock()
        self._wake = False
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cv:
            self._q.append((fn, args, fut))
            self._cv.notify()
        return fut

    def _run(self) -> None:
        while True:
            with self._cv:
                while not self._q and not self._stop:
                    self._cv.wait()
                if not self._q:
                    return
                batch = [self._q.popleft() for _ in range(min(len(self._q), 16))]
            out: list[tuple[asyncio.Future[Any], Any, BaseException | None]] = []
            for fn, args, fut in batch:
                try:
                    out.append((fut, fn(*args), None))
                except BaseException as e:  # handed to the awaiting coroutine
                    out.append((fut, None, e))
            with self._done_lock:
                self._done.extend(out)
                wake = not self._wake
                self._wake = True
            if wake and self._loop is not None:
                try:
                    self._loop.call_soon_threadsafe(self._deliver)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits any more

    def _deliver(self) -> None:
        with self._done_lock:
            done, self._done = self._done, []
            self._wake = False
        for fut, res, exc in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(exc)
            else:
                fut.set_result(res)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class RangeOp:
    __slots__ = ("barrier", "done", "end", "start")

    def __init__(self, start: int, end: int, done: asyncio.Future[None], barrier: bool) -> None:
        self.start = start
        self.end = end
        self.done = done
        self.barrier = barrier


class Ranges:
    """In-flight primary operations. A new one waits for every earlier one it overlaps;
    a *barrier* also holds back writes that have not been journalled yet."""

    def __init__(self) -> None:
        self.ops: list[RangeOp] = []

    def add(self, start: int, end: int, barrier: bool) -> tuple[RangeOp, list[asyncio.Future[None]]]:
        preds = [o.done for o in self.ops if o.start < end and start < o.end]
        op = RangeOp(start, end, asyncio.get_running_loop().create_future(), barrier)
        self.ops.append(op)
        return op, preds

    def barriers(self, start: int, end: int) -> list[asyncio.Future[None]]:
        return [o.done for o in self.ops if o.barrier and o.start < end and start < o.end]

    def finish(self, op: RangeOp) -> None:
        self.ops.remove(op)
        if not op.done.done():
            op.done.set_result(None)

