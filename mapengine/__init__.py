"""Block-ordered delta maps over a time-ordered journal (pure data structures and files).

Never imports :mod:`cdp`; the journal location of an extent is an opaque integer here.
Single-threaded: the caller serialises every call on one :class:`MapHistory`.
"""

from .core import (
    HOLE_LOC,
    ZERO_LOC,
    Columns,
    DeltaMap,
    Extent,
    MergeResult,
    build_l0,
    differing,
    flatten,
    merge,
    overlay,
)
from .epoch import MergePolicy
from .errors import MapCorruption, MapError, MapExpired, MapUsageError
from .history import MapHistory
from .retain import RetainJob, RetainResult

__all__ = [
    "HOLE_LOC",
    "ZERO_LOC",
    "Columns",
    "DeltaMap",
    "Extent",
    "MapCorruption",
    "MapError",
    "MapExpired",
    "MapHistory",
    "MapUsageError",
    "MergePolicy",
    "MergeResult",
    "RetainJob",
    "RetainResult",
    "build_l0",
    "differing",
    "flatten",
    "merge",
    "overlay",
]
