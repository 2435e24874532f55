from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cdp.errors import ExitStatus, UsageError
from cdp.points import PointKind, parse_point, split_export_name


@pytest.mark.parametrize(
    ("text", "kind", "value"),
    [
        ("@123456", PointKind.SEQ, 123456),
        ("marker17", PointKind.MARKER, 17),
        ("now", PointKind.NOW, 0),
        ("origin", PointKind.ORIGIN, 0),
        ("-10m", PointKind.RELATIVE, 600.0),
        ("-30s", PointKind.RELATIVE, 30.0),
        ("before-upgrade", PointKind.LABEL, "before-upgrade"),
        ("2024-05-01T10:00:00Z", PointKind.TIME,
         int(datetime(2024, 5, 1, 10, tzinfo=UTC).timestamp()) * 10**9),
    ],
)
def test_parse(text: str, kind: PointKind, value: object) -> None:
    p = parse_point(text)
    assert p.kind is kind and p.value == value


def test_local_time_when_no_offset() -> None:
    p = parse_point("2024-05-01T10:00")
    assert p.value == int(datetime(2024, 5, 1, 10).astimezone().timestamp()) * 10**9


@pytest.mark.parametrize("bad", ["", "  ", "2024-13-45T99:00", "2024-13-45", "@abc", "-10parsecs"])
def test_bad_points(bad: str) -> None:
    """Malformed (or empty) text is a usage error, exit 2 (issue 28 item 9), not an
    unknown point."""
    with pytest.raises(UsageError) as e:
        parse_point(bad)
    assert e.value.exit_status is ExitStatus.USAGE


def test_export_names() -> None:
    assert split_export_name("vol0") == ("vol0", None)
    assert split_export_name("vol0@marker3") == ("vol0", "marker3")
    assert split_export_name("vol0@@123") == ("vol0", "@123")
