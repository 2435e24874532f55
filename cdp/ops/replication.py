"""Replication operations: ``replicate_start`` / ``replicate_stop`` / ``replicate_status``
(cdpctl replicate) and :func:`resume_replication`, which cdpd runs at start.

A volume's outgoing streams are its persistent configuration, ``replication.json`` in
the volume directory (docs/FORMATS.md): ``start`` adds or restarts an entry, ``stop``
marks it stopped; cdpd restarts every running entry when it starts, and each stream
resumes from the seq the target reports. The shared secret is ``[replication]
secret_file``, the same file the target side uses.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path
from typing import Any

from cdp.config import read_secret
from cdp.errors import Corruption, NotFound, UsageError
from cdp.fsutil import write_file_atomic
from cdp.points import point_arg
from cdp.progress import Progress
from cdp.replication.role import load_role
from cdp.replication.source import ReplicationSource, sources_of, status_row
from cdp.replication.target import failover as _failover
from cdp.replication.tls import client_context
from cdp.store import Store
from cdp.units import parse_hostport, parse_size
from cdp.volume import Volume

log = logging.getLogger("cdp.replication")

TARGETS_FILE = "replication.json"
TARGETS_FORMAT = 1
DEFAULT_PORT = 7420


#: one lock per replication.json: its read-modify-writes (start, stop on the loop; a
#: stream's acked-seq save in a worker thread) never interleave, so none undoes another
_LOCKS: dict[Path, threading.Lock] = {}
_LOCKS_LOCK = threading.Lock()


def targets_lock(vol: Volume) -> threading.Lock:
    """The lock around read-modify-writes of ``vol``'s ``replication.json``."""
    path = vol.path / TARGETS_FILE
    with _LOCKS_LOCK:
        lock = _LOCKS.get(path)
        if lock is None:
            lock = _LOCKS[path] = threading.Lock()
        return lock


def load_targets(vol: Volume) -> list[dict[str, Any]]:
    """The entries of the volume's ``replication.json`` ([] when absent)."""
    path = vol.path / TARGETS_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return []
    except ValueError as e:
        raise Corruption(f"{path}: not valid JSON: {e}") from None
    if not isinstance(doc, dict) or doc.get("format") != TARGETS_FORMAT:
        raise Corruption(f"{path}: unsupported format")
    targets = doc.get("targets")
    if not isinstance(targets, list) or not all(isinstance(t, dict) for t in targets):
        raise Corruption(f"{path}: malformed targets list")
    return targets


def save_targets(vol: Volume, targets: list[dict[str, Any]]) -> None:
    doc = {"format": TARGETS_FORMAT, "targets": targets}
    write_file_atomic(vol.path / TARGETS_FILE, (json.dumps(doc, indent=1) + "\n").encode())


def _persist(src: ReplicationSource) -> None:
    """Save ``src``'s acknowledged seq and refusal in its ``replication.json`` entry.
    Any thread (the stream calls it from a worker thread): under :func:`targets_lock`."""
    with targets_lock(src.vol):
        targets = load_targets(src.vol)
        for t in targets:
            if t["to"] == src.target:
                t["acked_seq"] = src.acked_seq
                t["refused"] = None if src.refused is None else ": ".join(src.refused)
                t["epoch_seen"] = max(int(t.get("epoch_seen", 1)), src.epoch_seen)
                save_targets(src.vol, targets)
                return


def _source(store: Store, vol: Volume, entry: dict[str, Any]) -> ReplicationSource:
    """The attached source for ``entry["to"]``, attached now if it is new."""
    for s in sources_of(vol):
        if s.target == entry["to"]:
            s.as_name = entry["as"]
            s.rate = int(entry.get("rate", 0))
            return s
    host, port = parse_hostport(entry["to"], "--to", DEFAULT_PORT)
    role = load_role(vol)
    if role.role == "replica":
        raise UsageError(f"volume {vol.name} is a replica; `cdpctl failover` it first")
    src = ReplicationSource(vol, host, port, read_secret(store.settings.replication.secret_file),
                            as_name=entry["as"], name=str(store.path),
                            lineage=role.lineage, epoch=role.epoch,
                            fork_seq=role.epochs[-1][1] - 1 if role.epoch > 1 else 0,
                            epochs=role.epochs,
                            rate=int(entry.get("rate", 0)),
                            tls=client_context(store.settings.replication),
                            ship_window=store.settings.replication.ship_window)
    src.acked_seq = int(entry.get("acked_seq", 0))
    src.persist = _persist
    vol.attach(src)
    return src


def _entry(targets: list[dict[str, Any]], to: str | None) -> dict[str, Any]:
    if to is None:
        if len(targets) == 1:
            return targets[0]
        raise UsageError("the volume replicates to several targets; name one with --to"
                         if targets else "the volume does not replicate anywhere")
    for t in targets:
        if t["to"] == to:
            return t
    raise NotFound(f"the volume does not replicate to {to}")


def _norm(to: str) -> str:
    host, port = parse_hostport(to, "--to", DEFAULT_PORT)
    return f"{host}:{port}"


async def replicate_start(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    vol = store.volume(args.get("volume"))
    to = _norm(str(args.get("to") or ""))
    with targets_lock(vol):  # no await inside: a stream's save may wait a moment
        targets = load_targets(vol)
        entry = next((t for t in targets if t["to"] == to), None)
        if entry is None:
            entry = {"to": to, "as": args.get("as") or vol.name, "rate": 0, "running": True,
                     "acked_seq": 0, "epoch_seen": 1, "refused": None}
            targets.append(entry)
        if args.get("as"):
            entry["as"] = args["as"]
        if args.get("rate") is not None:
            entry["rate"] = parse_size(str(args["rate"]))
        entry["running"] = True
        src = _source(store, vol, entry)
        save_targets(vol, targets)
    src.start()
    return src.status()


async def replicate_stop(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    vol = store.volume(args.get("volume"))
    with targets_lock(vol):
        targets = load_targets(vol)
        entry = _entry(targets, _norm(args["to"]) if args.get("to") else None)
        entry["running"] = False
        out: dict[str, Any] = {"volume": vol.name, "target": entry["to"], "state": "stopped"}
        for s in sources_of(vol):
            if s.target == entry["to"]:
                s.stop()
                entry["acked_seq"] = s.acked_seq
                out = s.status()
        save_targets(vol, targets)
    return out


async def replicate_status(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    names = [args["volume"]] if args.get("volume") else sorted(store.volumes)
    rows = []
    for n in names:
        rows += [r for r in status_rows(store.volume(n))
                 if not args.get("to") or r["target"] == _norm(args["to"])]
    return rows


def status_rows(vol: Volume) -> list[dict[str, Any]]:
    """One ``replicate status`` row per target of ``vol`` (a target without a running
    stream, e.g. offline or stopped, from ``replication.json``). Cost: O(targets)."""
    live = {s.target: s for s in sources_of(vol)}
    rows = []
    for t in load_targets(vol):
        s = live.get(t["to"])
        rows.append(s.status() if s is not None else status_row(
            vol, t["to"], t["as"], "refused" if t.get("running") and t.get("refused") else "stopped",
            int(t.get("acked_seq", 0)), 0, t.get("refused")))
    return rows


async def failover(store: Store, args: dict[str, Any], progress: Progress) -> Any:
    """``cdpctl failover``: the replica becomes a writable primary of the next epoch, at
    its newest replicated point or, with ``at``, at that point (a REWIND appended as the
    first record of the new epoch). The old source's stream is refused from then on."""
    vol = store.volume(args.get("volume"))
    at = vol.resolve_point(point_arg(args, "at")) if args.get("at") else None
    applied = vol.journal.last_seq
    role = await _failover(vol)
    rewind_seq = None
    if at is not None and at != vol.head_seq:
        rewind_seq = await vol.rewind(at)
    return {"volume": vol.name, "role": role.role, "epoch": role.epoch, "applied_seq": applied,
            "rewind_seq": rewind_seq, "at_seq": vol.head_seq if at is None else at,
            "lineage": role.lineage}


def resume_replication(store: Store) -> int:
    """Start every running entry of every volume's ``replication.json`` (cdpd start);
    how many. A volume whose entries cannot start is logged and skipped."""
    n = 0
    for vol in store.volumes.values():
        try:
            for t in load_targets(vol):
                if t.get("running"):
                    _source(store, vol, t).start()
                    n += 1
        except Exception as e:  # one volume's bad file must not stop the daemon
            log.error("volume %s: cannot resume replication: %s", vol.name, e)
    return n


OPS: dict[str, Any] = {
    "replicate_start": replicate_start,
    "replicate_stop": replicate_stop,
    "replicate_status": replicate_status,
    "failover": failover,
}
