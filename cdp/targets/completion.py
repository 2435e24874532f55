"""The write-completion hook: a device finishes requests from plain callbacks.

A :class:`~cdp.targets.blockdev.BlockDevice` method may return a :class:`Completion`
instead of a future. It is an awaitable like any other, so a caller that just awaits it
needs to know nothing; the NBD server instead registers one plain callback per request
(:meth:`Completion.on_done`), and the device calls :meth:`Completion.finish` from
wherever its result arrives. The callback runs at once, inside ``finish``.

A device that completes several requests at once (the proxy's writer thread hands back
a batch of host writes with one loop wake-up) does it inside :func:`batch`: a consumer
that wants to act once per batch, not once per request (the NBD server: send the
batch's replies with one ``writelines``), asks for it with :func:`at_batch_end`.

Design notes
------------
- Why (issue 23): a future per host write cost its creation, a done-callback
  registration, a loop handle per ``set_result`` (futures run their callbacks in the
  next loop turn, one handle each) and the server's callback asking the future for its
  state three times; the replies then left one more turn later. With the hook a batch
  of writes completes, queues its replies and sends them in the one turn the writer's
  wake-up runs.
- One consumer per completion: one callback, or awaiters (a future is made for them
  only when someone awaits; several awaiters share it). A callback registered after
  the end runs at once. Callbacks must not raise: an exception is logged through the
  loop's exception handler and the other completions of the batch go on.
- ``finish`` and the callbacks run on the event loop's thread (batches are per
  thread, so loops in other threads never see them); nothing blocks. Cost per request: one slot object, one call.
- A completion finished with an exception that is not an ``Exception`` (a
  ``CancelledError``) cancels its awaiters; the callback gets it as it is.
- Batches nest: only the outermost one runs the functions asked for at its end, in
  the order they were asked for, once each (the caller keeps its own "already asked"
  flag). Outside a batch, :func:`at_batch_end` falls back to ``loop.call_soon``.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Generator
from typing import Any

#: a completion's callback: ``fn(arg, exc)``, *exc* None on success
DoneCallback = Callable[[Any, BaseException | None], None]



class _Batches(threading.local):
    """Per thread (each event loop has its own): the functions for the end of the
    running batch, None outside one."""

    end: list[Callable[[], None]] | None = None


_state = _Batches()


class Completion:
    """One request's result, delivered to one plain callback or to awaiters. O(1)."""

    __slots__ = ("_arg", "_cb", "_exc", "_fut", "done")

    def __init__(self) -> None:
        self.done = False
        self._exc: BaseException | None = None
        self._cb: DoneCallback | None = None
        self._arg: Any = None
        self._fut: asyncio.Future[None] | None = None

    def on_done(self, cb: DoneCallback, arg: Any) -> None:
        """Call ``cb(arg, exc)`` when finished (at once if already); one per completion."""
        if self.done:
            cb(arg, self._exc)
            return
        assert self._cb is None, "a completion has one callback"
        self._cb = cb
        self._arg = arg

    def finish(self, exc: BaseException | None = None) -> None:
        """Deliver the result (*exc* None: success) to the callback, at once, and to
        the awaiters; later calls do nothing. Call on the loop's thread."""
        if self.done:
            return
        self.done = True
        self._exc = exc
        cb = self._cb
        if cb is not None:
            self._cb = None
            arg, self._arg = self._arg, None
            try:
                cb(arg, exc)
            except Exception as e:  # a consumer's bug must not stop the rest of a batch
                asyncio.get_running_loop().call_exception_handler(
                    {"message": "completion callback failed", "exception": e})
        fut = self._fut
        if fut is not None and not fut.done():
            if exc is None:
                fut.set_result(None)
            elif isinstance(exc, Exception):
                fut.set_exception(exc)
            else:
                fut.cancel()

    def __await__(self) -> Generator[Any, None, None]:
        if not self.done:
            fut = self._fut
            if fut is None:
                fut = self._fut = asyncio.get_running_loop().create_future()
            yield from fut.__await__()
            return
        if self._exc is not None:
            raise self._exc


class batch:  # a class, used as ``with batch():``
    """Completions finished inside run the functions asked for with
    :func:`at_batch_end` once, when the outermost batch ends (also on an exception)."""

    __slots__ = ("_outer",)

    def __enter__(self) -> None:
        st = _state
        self._outer = st.end is None
        if self._outer:
            st.end = []

    def __exit__(self, *exc: object) -> None:
        if not self._outer:
            return
        st = _state
        while st.end:  # a function may finish more completions, asking for more
            todo, st.end = st.end, []
            for fn in todo:
                try:
                    fn()
                except Exception as e:
                    asyncio.get_running_loop().call_exception_handler(
                        {"message": "completion batch end failed", "exception": e})
        st.end = None


def at_batch_end(fn: Callable[[], None]) -> None:
    """Run *fn* when the running :class:`batch` ends, or in the next loop turn
    (``call_soon``) when none runs. Each call runs it once more: callers keep a flag."""
    end = _state.end
    if end is not None:
        end.append(fn)
    else:
        asyncio.get_running_loop().call_soon(fn)


__all__ = ["Completion", "DoneCallback", "at_batch_end", "batch"]
