"""What every cdpctl command shares: finding the store, talking to the daemon (or
opening a stopped store), printing tables or JSON, progress bars, and errors."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cdp.admin import AdminClient
from cdp.config import SOCKET_NAME, load_config
from cdp.errors import DaemonUnavailable, UsageError
from cdp.units import format_time


class Context:
    """How a command reaches the store: through the running daemon when there is one,
    otherwise (read-only commands only) by opening the store directly."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.json = bool(getattr(args, "json", False))
        settings = load_config(args.config).with_overrides(
            store=args.store or os.environ.get("CDP_STORE")
        )
        self.settings = settings
        self.store_path = settings.store.resolve()

    def start_hint(self) -> str:
        """The cdpd command line that serves this store: the config and the absolute
        store path as this cdpctl found them, so it works from any directory."""
        conf = f" --config {os.path.abspath(self.args.config)}" if self.args.config else ""
        return f"cdpd{conf} --store {self.store_path}"

    @property
    def socket_path(self) -> Path:
        return self.store_path / SOCKET_NAME

    def daemon(self) -> AdminClient | None:
        try:
            return AdminClient(self.socket_path)
        except DaemonUnavailable:
            return None

    def call(self, op: str, args: dict[str, Any], *, progress: bool = False) -> Any:
        """Run *op* in the daemon, or offline on a stopped store for read-only ops."""
        bar = ProgressBar() if progress and sys.stderr.isatty() and not self.json else None
        cb = bar.update if bar else None
        client = self.daemon()
        try:
            if client is not None:
                try:
                    return client.call(op, args, cb)
                finally:
                    client.close()
            # a stopped store only: the whole store stack is imported here, not by every
            # cdpctl (most commands talk to the daemon and need none of it)
            from cdp.ops import OFFLINE_OPS, run_op
            from cdp.store import Store

            if op not in OFFLINE_OPS:
                raise DaemonUnavailable(
                    f"cdpd is not running on store {self.store_path}; "
                    f"'{op.replace('_', ' ')}' needs it (start it with `{self.start_hint()}`)"
                )
            store = Store.open(self.settings, create=False)
            try:
                return asyncio.run(run_op(store, op, args, cb))
            finally:
                store.close()
        finally:
            if bar:
                bar.finish()


def add_common(p: argparse.ArgumentParser, *, json_flag: bool = True, volume: bool = True) -> None:
    if volume:
        p.add_argument("-V", "--volume", help="volume name (may be omitted with one volume)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def emit_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    """A plain aligned text table."""
    cells = [[str(h) for h in headers]] + [["" if c is None else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


def fmt_time(ns: int | None) -> str:
    """A time in a table: ``2026-12-06 10:00:00.123`` (local), ``-`` for none."""
    return format_time(ns, millis=True) if ns else "-"


class ProgressBar:
    """A one-line progress bar on stderr (only used when stderr is a terminal)."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.shown = False

    def update(self, done: int, total: int, what: str) -> None:
        frac = done / total if total else 1.0
        width = 30
        fill = int(frac * width)
        rate = done / max(time.monotonic() - self.t0, 1e-6) / 2**20
        sys.stderr.write(f"\r{what:<14} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}%  {rate:8.1f} MiB/s")
        sys.stderr.flush()
        self.shown = True

    def finish(self) -> None:
        if self.shown:
            sys.stderr.write("\n")


Handler = Callable[[Context, argparse.Namespace], int]


def volumes_arg(args: argparse.Namespace) -> list[str] | None:
    v = getattr(args, "volume", None)
    if v is None:
        return None
    return v if isinstance(v, list) else [v]


def need(value: Any, flag: str) -> Any:
    if value is None:
        raise UsageError(f"missing {flag}")
    return value
