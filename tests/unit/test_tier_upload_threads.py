"""The tier's upload threads run nicer than cdpd (``UPLOAD_NICE``), and the threads they
start inherit it: on a core the event loop needs, uploads take the loop's idle time."""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

from cdp.tier.service import _UPLOADER, UPLOAD_NICE


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


def test_upload_threads_and_their_part_threads_are_niced() -> None:
    mine = _nice()
    want = min(19, mine + UPLOAD_NICE)

    def in_upload_thread() -> tuple[int, int]:
        with ThreadPoolExecutor(1) as parts:  # as put_multipart starts its part threads
            return _nice(), parts.submit(_nice).result()

    assert _UPLOADER.submit(in_upload_thread).result(timeout=10) == (want, want)
    assert _nice() == mine  # the caller's own priority is untouched
