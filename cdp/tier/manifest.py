"""The tier's generation manifest (docs/FORMATS.md, "Tier generation manifest"), and
the object keys under a volume's prefix (docs/TIER.md, "Object layout").

    PREFIX/volumes/NAME/segments/<first_seq:020d>-<sha256[:16]>    a sealed segment as stored
    PREFIX/volumes/NAME/state/<gen:012d>/<file>                      volume.json, markers.json, catalog.sqlite
    PREFIX/volumes/NAME/generations/<gen:012d>.json                  the generation manifest

Every key is written once: a segment's key carries its content hash (a compaction's
rewrite of the same first seq gets a new key), state files sit under their generation,
and generation numbers only grow. A manifest is cumulative: the newest complete one alone
names every object of the volume's uploaded history.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

from cdp.errors import Corruption

MANIFEST_FORMAT = 1
MANIFEST_KIND = "cdp-tier-generation"
GEN_DIGITS = 12


def volume_prefix(prefix: str, volume: str) -> str:
    """``PREFIX/volumes/NAME/`` (no leading slash; PREFIX may be empty)."""
    return f"{prefix}volumes/{volume}/"


def segment_key(prefix: str, volume: str, first_seq: int, sha256: str) -> str:
    return f"{volume_prefix(prefix, volume)}segments/{first_seq:020d}-{sha256[:16]}"


def state_key(prefix: str, volume: str, gen: int, name: str) -> str:
    return f"{volume_prefix(prefix, volume)}state/{gen:0{GEN_DIGITS}d}/{name}"


def generations_prefix(prefix: str, volume: str) -> str:
    return f"{volume_prefix(prefix, volume)}generations/"


def generation_key(prefix: str, volume: str, gen: int) -> str:
    return f"{generations_prefix(prefix, volume)}{gen:0{GEN_DIGITS}d}.json"


def generation_of(key: str) -> int | None:
    """The generation number of a manifest key, None for any other key."""
    tail = key.rsplit("/", 1)[-1]
    if not tail.endswith(".json") or len(tail) != GEN_DIGITS + 5 or not tail[:GEN_DIGITS].isdigit():
        return None
    return int(tail[:GEN_DIGITS])


@dataclass(frozen=True)
class SegmentObject:
    """A sealed segment in the bucket: records ``first_seq..last_seq``."""

    key: str
    first_seq: int
    last_seq: int
    records: int
    size: int
    sha256: str
    compacted: bool = False


@dataclass(frozen=True)
class StateObject:
    """A small state file of the volume as of one generation (``name``: its file name
    in the volume directory). ``through_seq``: the newest seq it may refer to."""

    name: str
    key: str
    size: int
    sha256: str
    through_seq: int = 0


@dataclass
class Manifest:
    """One generation of one volume: every object its uploaded history needs."""

    generation: int
    volume: str
    volume_uuid: str
    size: int
    #: every record with seq <= last_seq is in ``segments``
    last_seq: int
    created_ns: int
    store_uuid: str = ""
    segments: list[SegmentObject] = field(default_factory=list)
    state: list[StateObject] = field(default_factory=list)

    def objects(self) -> list[tuple[str, int, str]]:
        """(key, size, sha256) of every object named."""
        return ([(s.key, s.size, s.sha256) for s in self.segments]
                + [(s.key, s.size, s.sha256) for s in self.state])

    def state_named(self, name: str) -> StateObject | None:
        for s in self.state:
            if s.name == name:
                return s
        return None

    def encode(self) -> bytes:
        """The manifest's bytes: canonical JSON (sorted keys) plus ``body_sha256``, the
        sha256 of the same JSON without that field."""
        doc: dict[str, Any] = {"format": MANIFEST_FORMAT, "kind": MANIFEST_KIND, **asdict(self)}
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        doc["body_sha256"] = hashlib.sha256(body).hexdigest()
        return json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n"

    @classmethod
    def decode(cls, data: bytes, where: str) -> Manifest:
        """Parse and check a manifest (format, kind, body_sha256, seq ranges contiguous
        from the first segment). Corruption naming *where* otherwise."""
        try:
            doc = json.loads(data)
        except ValueError as e:
            raise Corruption(f"{where}: tier manifest is not JSON: {e}") from None
        if not isinstance(doc, dict) or doc.get("kind") != MANIFEST_KIND:
            raise Corruption(f"{where}: not a cdp tier manifest")
        if doc.get("format") != MANIFEST_FORMAT:
            raise Corruption(f"{where}: unsupported tier manifest format {doc.get('format')!r}")
        want = doc.pop("body_sha256", None)
        body = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        if want != hashlib.sha256(body).hexdigest():
            raise Corruption(f"{where}: tier manifest checksum mismatch")
        try:
            m = cls(
                generation=int(doc["generation"]), volume=str(doc["volume"]),
                volume_uuid=str(doc["volume_uuid"]), size=int(doc["size"]),
                last_seq=int(doc["last_seq"]), created_ns=int(doc["created_ns"]),
                store_uuid=str(doc.get("store_uuid", "")),
                segments=[SegmentObject(**s) for s in doc["segments"]],
                state=[StateObject(**s) for s in doc["state"]],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise Corruption(f"{where}: malformed tier manifest: {e}") from None
        nxt = m.segments[0].first_seq if m.segments else 1
        for s in m.segments:
            if s.first_seq != nxt or s.last_seq < s.first_seq - 1:
                raise Corruption(f"{where}: segment {s.key} does not follow seq {nxt - 1}")
            nxt = s.last_seq + 1
        if m.segments and m.last_seq != nxt - 1:
            raise Corruption(f"{where}: last_seq {m.last_seq} but segments end at {nxt - 1}")
        return m
