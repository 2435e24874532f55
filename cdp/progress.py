"""The progress callback of long operations (cdpctl ops, gc, the proxy's initial copy
and rewind): ``progress(done, total, what)``, called on the event loop; the admin API
streams it to cdpctl's progress bar."""

from __future__ import annotations

from collections.abc import Callable

Progress = Callable[[int, int, str], None]


def no_progress(done: int, total: int, what: str) -> None:
    """A :data:`Progress` that reports nothing."""
    return None
