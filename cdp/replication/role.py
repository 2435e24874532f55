"""A volume's role in a replication chain: ``replica.json`` (docs/FORMATS.md), read and
written here. A module of its own, apart from :mod:`cdp.replication.target` (the stream
pump, its protocol and TLS), so that the exports, which ask every live export's role,
import none of that before cdpd's NBD listener (issue 27, restart time)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from cdp.errors import Corruption
from cdp.fsutil import write_file_atomic

if TYPE_CHECKING:
    from cdp.volume import Volume

ROLE_FILE = "replica.json"
ROLE_FORMAT = 1


@dataclass
class Role:
    """A volume's place in a replication chain (``replica.json``, format 1)."""

    role: str  # "replica" | "primary"
    lineage: str
    epoch: int
    source: str = ""
    #: [epoch, first local seq, source offset] per epoch (docs/REPLICATION.md)
    epochs: list[list[int]] = field(default_factory=list)
    #: [sender marker id, local marker id] of markers renumbered at a failback
    marker_ids: list[list[int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.epochs:
            self.epochs = [[self.epoch, 1, 0]]


def load_role(vol: Volume) -> Role:
    """The volume's role; a volume without ``replica.json`` is a primary of epoch 1
    whose lineage is its own uuid."""
    path = vol.path / ROLE_FILE
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return Role("primary", vol.uuid, 1)
    except ValueError as e:
        raise Corruption(f"{path}: not valid JSON: {e}") from None
    try:
        if doc["format"] != ROLE_FORMAT:
            raise Corruption(f"{path}: unsupported format {doc['format']!r}")
        return Role(str(doc["role"]), str(doc["lineage"]), int(doc["epoch"]),
                    str(doc.get("source", "")),
                    [[int(x) for x in e] for e in doc.get("epochs") or []],
                    [[int(x) for x in e] for e in doc.get("marker_ids") or []])
    except (KeyError, TypeError, ValueError) as e:
        raise Corruption(f"{path}: malformed role file: {e}") from None


def save_role(path: Path, role: Role) -> None:
    doc = {"format": ROLE_FORMAT, **asdict(role)}
    write_file_atomic(path / ROLE_FILE, (json.dumps(doc, indent=1) + "\n").encode())
