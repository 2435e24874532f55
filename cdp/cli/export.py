"""cdpctl export: what changed between two points, as a qcow2 overlay, a cdpdiff stream
(a file or stdout), or pushed into an NBD server."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import threading
from typing import Any

from cdp.cli.common import Context, add_common
from cdp.errors import UsageError
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "export",
        help="differential backup A -> B: qcow2 overlay, .cdpdiff stream (- for stdout) or --to-nbd",
    )
    add_common(p)
    p.add_argument("--from", dest="from_", required=True, metavar="A",
                   help="the point the receiver has ('origin': a full copy)")
    p.add_argument("--to", default="now", metavar="B", help="default: now")
    p.add_argument("-o", "--output", metavar="FILE",
                   help="FILE.qcow2, FILE.cdpdiff, or - (the stream on stdout, and nothing else "
                   "there: the summary and --json go to stderr); not needed with --dry-run")
    p.add_argument("--format", choices=["qcow2", "cdpdiff"], help="default: from the file name")
    p.add_argument("--backing", metavar="NAME",
                   help="qcow2 backing file name (default: VOL@A.img; '' for none)")
    p.add_argument("--backing-format", default="raw", metavar="FMT", help="qcow2 backing format (default raw)")
    p.add_argument("--cluster-size", default="64K", metavar="SIZE", help="qcow2 cluster size (default 64K)")
    p.add_argument("--to-nbd", metavar="URI", help="write the changes into nbd://HOST:PORT/EXPORT")
    p.add_argument("--dry-run", action="store_true", help="print what would be copied, copy nothing")
    p.set_defaults(func=run)


def _cluster_bits(text: str) -> int:
    from cdp.units import parse_size

    n = parse_size(text, "--cluster-size")
    if n <= 0 or n & (n - 1):
        raise UsageError(f"--cluster-size must be a power of two, got {text}")
    return n.bit_length() - 1


def run(ctx: Context, args: argparse.Namespace) -> int:
    out = args.output
    call: dict[str, Any] = {
        "volume": args.volume, "from": args.from_, "to": args.to, "format": args.format,
        "backing": args.backing, "backing_format": args.backing_format,
        "cluster_bits": _cluster_bits(args.cluster_size), "to_nbd": args.to_nbd,
        "dry_run": args.dry_run,
    }
    if out == "-" and not args.dry_run:
        r = _to_stdout(ctx, call)
    else:
        if out is not None and out != "-":
            out = os.path.abspath(out)
        # a dry run writes nothing: it needs no output (-o - or none: a cdpdiff stream)
        call["output"] = None if out == "-" else out
        r = ctx.call("export_diff", call, progress=True)
        if out == "-":
            r["output"] = "-"
    # -o -: stdout carries the stream and nothing else; what we say goes to stderr (a dry
    # run writes no stream: its report is its output, on stdout)
    msg = sys.stderr if out == "-" and not args.dry_run else sys.stdout
    if ctx.json:
        json.dump(r, msg, indent=2)
        msg.write("\n")
        return 0
    what = (f"{r['volume']} {r['from']} (@{r['from_seq']}) -> {r['to']} (@{r['to_seq']}): "
            f"{format_size(r['changed_bytes'])} changed ({format_size(r['data_bytes'])} data, "
            f"{format_size(r['zero_bytes'])} zeroes)")
    if r.get("dry_run"):
        est = f"; would copy {format_size(r['copy_bytes'])}"
        if r["format"] == "qcow2":
            est += f" in {r['data_clusters']} clusters, file {format_size(r['file_bytes'])}"
        print(what + est, file=msg)
    else:
        print(f"{r['output']}: {what}, {format_size(r['copy_bytes'])} copied as {r['format']} "
              f"in {r['seconds']} s", file=msg)
    return 0


def _to_stdout(ctx: Context, call: dict[str, Any]) -> Any:
    """The op writes the stream into a FIFO (the daemon cannot reach our stdout); a
    thread copies it to stdout."""
    call["format"] = call["format"] or "cdpdiff"
    if call["format"] != "cdpdiff":
        raise UsageError("-o - streams the cdpdiff format only")
    d = tempfile.mkdtemp(prefix="cdpctl-export-")
    fifo = os.path.join(d, "stream")
    os.mkfifo(fifo, 0o600)
    call["output"] = fifo
    err: list[BaseException] = []
    opened = threading.Event()

    def copy() -> None:
        try:
            fd = os.open(fifo, os.O_RDONLY)
            opened.set()
            try:
                out = sys.stdout.buffer
                while True:
                    b = os.read(fd, 1 << 20)
                    if not b:
                        break
                    out.write(b)
                out.flush()
            finally:
                os.close(fd)
        except BaseException as e:  # reported after the op
            err.append(e)

    t = threading.Thread(target=copy, daemon=True)
    t.start()
    try:
        return ctx.call("export_diff", call, progress=True)
    finally:
        if not opened.is_set():  # the op failed before opening the FIFO: unblock the reader
            try:
                os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        t.join()
        shutil.rmtree(d, ignore_errors=True)
        if err:
            raise err[0]
