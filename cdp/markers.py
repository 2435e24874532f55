"""Markers: named points of a volume, and their file ``markers.json``.

A marker is a MARKER record in the journal (the source of truth) plus a line in
``VOLUME/markers.json`` (format in docs/FORMATS.md ("Store layout")); a marker whose
line was lost is re-listed from its record when the volume is replayed.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from cdp.errors import Corruption
from cdp.fsutil import write_file_atomic

MARKERS_FORMAT = 1  # markers.json "format"


@dataclass(frozen=True)
class Marker:
    id: int
    seq: int
    time_ns: int
    label: str

    @property
    def name(self) -> str:
        return f"marker{self.id}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["name"] = self.name
        return d


def load_markers(path: Path) -> tuple[list[Marker], int]:
    """(markers, next id) from *path*; a missing file is no markers. Corruption if the
    file is not a markers document of a known format."""
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return [], 1
    except ValueError as e:
        raise Corruption(f"{path}: not valid JSON: {e}") from None
    try:
        if doc["format"] != MARKERS_FORMAT:
            raise Corruption(f"{path}: unsupported format {doc['format']!r}")
        markers = [Marker(**m) for m in doc["markers"]]
        return markers, int(doc["next_id"])
    except (KeyError, TypeError) as e:
        raise Corruption(f"{path}: malformed markers file: {e}") from None


def save_markers(path: Path, markers: list[Marker], next_id: int) -> None:
    """Write *path* atomically (see :func:`cdp.fsutil.write_file_atomic`)."""
    doc = {
        "format": MARKERS_FORMAT,
        "next_id": next_id,
        "markers": [asdict(m) for m in markers],
    }
    write_file_atomic(path, json.dumps(doc, indent=1).encode() + b"\n")
