"""cdpctl apply: apply a .cdpdiff stream to a raw image (or an NBD export)."""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any, BinaryIO

from cdp.backup.cdpdiff import KIND_ZERO, Reader
from cdp.backup.sinks import FileSink, NbdSink, Sink
from cdp.cli.common import Context, emit_json
from cdp.units import format_size


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("apply", help="apply a .cdpdiff stream (FILE or -) to a raw image or nbd:// URI")
    p.add_argument("diff", metavar="DIFF", help="the .cdpdiff file, or - for stdin")
    p.add_argument("--to", required=True, metavar="IMAGE", help="raw image / block device / nbd://HOST:PORT/EXPORT")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def apply_stream(f: BinaryIO, target: str, *, verify_first: bool) -> dict[str, Any]:
    """Apply the stream in ``f`` to ``target``. With ``verify_first`` (a seekable file)
    the whole stream is checked before anything is written; otherwise records are
    applied as they arrive and a bad checksum is reported at the end (Corruption).
    Cost: one pass (two with verify_first) over the stream, one SHA-256 per pass."""
    t0 = time.perf_counter()
    if verify_first:
        for _ in Reader(f).records():
            pass
        f.seek(0)
    rd = Reader(f)
    h = rd.header
    sink: Sink = (NbdSink(target, h.volume_size) if target.startswith("nbd")
                  else FileSink(target, h.volume_size))
    try:
        for rec in rd.records():
            if rec.kind == KIND_ZERO:
                sink.zero(rec.offset, rec.length)
            else:
                assert rec.data is not None
                sink.write(rec.offset, rec.data)
        sink.finish()
    finally:
        sink.close()
    assert rd.totals is not None
    return {
        "target": target,
        **h.to_dict(),
        "records": rd.totals.records,
        "data_bytes": rd.totals.data_bytes,
        "zero_bytes": rd.totals.zero_bytes,
        "seconds": round(time.perf_counter() - t0, 3),
    }


def run(ctx: Context, args: argparse.Namespace) -> int:
    if args.diff == "-":
        r = apply_stream(sys.stdin.buffer, args.to, verify_first=False)
    else:
        with open(args.diff, "rb", buffering=1 << 20) as f:
            r = apply_stream(f, args.to, verify_first=True)
    if args.json:
        emit_json(r)
    else:
        print(f"{r['target']}: applied {r['volume']} {r['from_point']} -> {r['to_point']}: "
              f"{r['records']} records, {format_size(r['data_bytes'])} data, "
              f"{format_size(r['zero_bytes'])} zeroes in {r['seconds']} s")
    return 0
