"""How a proxy volume reaches its primary without blocking the event loop: worker
threads with batched hand-off (:class:`Workers`), the one writer thread of a file
primary (:class:`Writer`), and the queue of in-flight primary operations that orders
overlapping ones (:class:`Ranges`).

Design notes
------------
* **One writer thread, one hand-off per loop turn** (issue 23). A host write to a
  file primary is queued on the loop; the first write of a turn schedules the hand-off
  (``call_soon``), which gives the thread every write of the turn at once. The thread
  runs batches in the order they were handed off and, inside a batch, writes in queue
  order, so writes reach the primary in journal order without any per-write ordering
  work; writes that continue each other are one ``pwritev``, and a batch whose writes
  overlap nothing else in it is one ``lio_listio`` (:mod:`cdp.proxy.lio`). The
  results of a batch go back with one loop wake-up. Before: a coroutine per write, a future per range-queue
  entry, and a hand-off per write to a pool of four threads, whose ordering of
  overlapping writes needed the range queue's predecessors.
* The range queue still holds every write in flight, because barriers (initial copy,
  catch-up, rewind) wait for the writes they overlap; its futures are made only when
  someone waits, and a write looks for barriers only when there are any.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

T = TypeVar("T")
ErrMap = Callable[[BaseException], BaseException]


class Workers:
    """Worker threads for primary I/O with batched hand-off both ways: a worker takes
    every queued call at once and hands the results back with one loop wake-up, so a
    deep queue of small writes costs few thread switches (the event loop never blocks
    on the primary)."""

    def __init__(self, n: int, name: str) -> None:
        self._q: deque[tuple[Callable[..., Any], tuple[Any, ...], asyncio.Future[Any], ErrMap | None]] = deque()
        self._cv = threading.Condition()
        self._done: list[tuple[asyncio.Future[Any], Any, BaseException | None, ErrMap | None]] = []
        self._done_lock = threading.Lock()
        self._wake = False
        self._stop = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._threads = [threading.Thread(target=self._run, name=f"{name}-{i}", daemon=True) for i in range(n)]
        for t in self._threads:
            t.start()

    def submit(self, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        return self.submit_mapped(None, fn, *args)

    def submit_mapped(self, errmap: ErrMap | None, fn: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
        """As :meth:`submit`; an exception *fn* raises goes through *errmap* on the loop."""
        loop = asyncio.get_running_loop()
        self._loop = loop
        fut: asyncio.Future[Any] = loop.create_future()
        with self._cv:
            self._q.append((fn, args, fut, errmap))
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
            out: list[tuple[asyncio.Future[Any], Any, BaseException | None, ErrMap | None]] = []
            for fn, args, fut, errmap in batch:
                try:
                    out.append((fut, fn(*args), None, None))
                except BaseException as e:  # handed to the awaiting coroutine
                    out.append((fut, None, e, errmap))
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
        for fut, res, exc, errmap in done:
            if fut.cancelled():
                continue
            if exc is not None:
                fut.set_exception(errmap(exc) if errmap is not None else exc)
            else:
                fut.set_result(res)

    def shutdown(self) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        for t in self._threads:
            t.join()


class Writer(Generic[T]):
    """One long-lived thread that runs *run(batch)* for the items queued on the event
    loop, one hand-off per loop turn (see the module notes). *run* returns one result
    per item (it must not raise); *deliver(batch, results)* gets them back on the loop,
    one call per batch, in hand-off order. Cost per item on the loop: a list append;
    per turn: a ``call_soon`` and one put on a ``queue.SimpleQueue`` (C, no Python-level
    condition variable on either side)."""

    def __init__(self, name: str, run: Callable[[list[T]], Sequence[Any]],
                 deliver: Callable[[list[T], Sequence[Any]], None]) -> None:
        self._run_batch = run
        self._deliver = deliver
        self._turn: list[T] = []
        self._q: queue.SimpleQueue[list[T] | None] = queue.SimpleQueue()  # None: stop
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def submit(self, item: T) -> bool:
        """Queue *item* (on the loop thread); it is handed off at the end of this turn.
        True when it is the turn's first item."""
        turn = self._turn
        turn.append(item)
        if len(turn) == 1:
            loop = self._loop = asyncio.get_running_loop()
            loop.call_soon(self._hand_off)
            return True
        return False

    def _hand_off(self) -> None:
        batch, self._turn = self._turn, []
        if batch:
            self._q.put(batch)

    def _run(self) -> None:
        q = self._q
        stop = False
        while not stop:
            batch = q.get()
            if batch is None:
                return
            while True:  # everything handed off meanwhile: one bigger batch
                try:
                    more = q.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    stop = True
                    break
                batch += more
            results = self._run_batch(batch)
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._deliver, batch, results)
                except RuntimeError:
                    pass  # the loop is closed: nobody waits any more

    def shutdown(self) -> None:
        """Run what was handed off, then stop the thread (items of an unfinished turn
        are handed off first when called on the loop's thread)."""
        self._hand_off()
        self._q.put(None)
        self._thread.join()


class RangeOp:
    __slots__ = ("barrier", "done", "end", "start")

    def __init__(self, start: int, end: int, barrier: bool) -> None:
        self.start = start
        self.end = end
        self.done: asyncio.Future[None] | None = None  # made when someone waits
        self.barrier = barrier

    def waiter(self) -> asyncio.Future[None]:
        if self.done is None:
            self.done = asyncio.get_running_loop().create_future()
        return self.done


class Ranges:
    """In-flight primary operations. A new one waits for every earlier one it overlaps;
    a *barrier* also holds back writes that have not been journalled yet. O(in flight)
    per look-up (a scan), O(1) to add or finish."""

    def __init__(self) -> None:
        self.ops: dict[RangeOp, None] = {}  # insertion-ordered
        self._barriers = 0

    def add(self, start: int, end: int, barrier: bool, preds: bool = True,
            ) -> tuple[RangeOp, list[asyncio.Future[None]]]:
        """Register an operation; with *preds*, also the futures of the earlier ones it
        overlaps (without: the caller orders itself, e.g. through the one writer)."""
        waits = [o.waiter() for o in self.ops if o.start < end and start < o.end] if preds else []
        op = RangeOp(start, end, barrier)
        self.ops[op] = None
        if barrier:
            self._barriers += 1
        return op, waits

    def barriers(self, start: int, end: int) -> list[asyncio.Future[None]]:
        if not self._barriers:
            return []
        return [o.waiter() for o in self.ops if o.barrier and o.start < end and start < o.end]

    def finish(self, op: RangeOp) -> None:
        del self.ops[op]
        if op.barrier:
            self._barriers -= 1
        if op.done is not None and not op.done.done():
            op.done.set_result(None)

