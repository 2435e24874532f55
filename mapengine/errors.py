"""Errors raised on purpose by :mod:`mapengine`.

Every class inherits :class:`MapError` and also the builtin that fits, so callers that
do not know this package can still catch ``OSError`` / ``ValueError``.
"""

from __future__ import annotations

__all__ = ["MapCorruption", "MapError", "MapExpired", "MapUsageError"]


class MapError(Exception):
    """Base class of every error the map engine raises on purpose."""


class MapCorruption(MapError, OSError):
    """A map file or the manifest failed a checksum or structural check.

    ``path`` names the offending file; it is also part of the message.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[type[MapCorruption], tuple[str, str]]:
        return (type(self), (self.path, self.reason))


class MapUsageError(MapError, ValueError):
    """The caller broke the contract: non-increasing seq, bad range, seq beyond the end."""


class MapExpired(MapUsageError):
    """The point was given up by :meth:`~mapengine.history.MapHistory.retain`: the maps
    no longer hold its exact state (only retained points and points at or after the
    ``keep_after`` cutoff resolve)."""
