"""cdpctl: drive the cdp appliance.

One module per command in this package; each registers its parser. Commands talk to the
running cdpd through its admin socket; read-only ones (status, markers, image, verify,
volume list) also work on a stopped store.
"""

from __future__ import annotations

import argparse
import re
import sys

from cdp import __version__
from cdp.cli import (
    alerts,
    apply,
    changed,
    diff,
    export,
    files,
    find,
    gc,
    image,
    pause,
    replicate,
    restore,
    retention,
    rewind,
    snapshot,
    status,
    store,
    tier,
    verify,
    versions,
    volume,
    web,
)
from cdp.cli.common import Context
from cdp.errors import EXIT_CODES, CdpError

COMMANDS = (volume, status, snapshot, rewind, pause, image, verify, files, versions, find, restore, diff,
            changed, export, apply, retention, gc, replicate, alerts, tier, store, web)


def build_parser() -> argparse.ArgumentParser:
    epilog = "points: markerN | marker label | @SEQ | ISO-8601 time (local when no offset) | -10m | now\n"
    epilog += "exit status:\n" + "\n".join(f"  {k}  {v}" for k, v in EXIT_CODES.items())
    p = argparse.ArgumentParser(
        prog="cdpctl",
        description="Control the cdp appliance: volumes, markers, rewind, point-in-time images.",
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--config", help="config file (default: $CDP_CONFIG or config/cdp.toml)")
    p.add_argument("--store", help="store directory (default: $CDP_STORE or store.path)")
    p.add_argument("--version", action="version", version=f"cdpctl {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        mod.register(sub)
    return p


#: options whose value is a point: ``--to -10m`` is that relative point, not an option
POINT_OPTIONS = frozenset({"--at", "--to", "--from"})
_RELATIVE = re.compile(r"-\d")


def join_relative_points(argv: list[str]) -> list[str]:
    """``--at -10m`` -> ``--at=-10m``: argparse reads a value that starts with ``-``
    as an option (and then says "expected one argument"), so a relative point written
    the way the help writes it is joined to its option first."""
    out: list[str] = []
    it = iter(argv)
    for a in it:
        if a in POINT_OPTIONS:
            nxt = next(it, None)
            if nxt is not None and _RELATIVE.match(nxt):
                out.append(f"{a}={nxt}")
                continue
            out.append(a)
            if nxt is not None:
                out.append(nxt)
            continue
        if a == "--":
            out.append(a)
            out.extend(it)
            break
        out.append(a)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(join_relative_points(sys.argv[1:] if argv is None else argv))
    try:
        ctx = Context(args)
        return int(args.func(ctx, args))
    except CdpError as e:
        print(f"cdpctl: {e}", file=sys.stderr)
        return e.exit_status
    except KeyboardInterrupt:
        print("cdpctl: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except PermissionError as e:  # another user's store: one line, not a traceback
        print(f"cdpctl: {e.filename or 'store'}: permission denied (run as the store's owner)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
