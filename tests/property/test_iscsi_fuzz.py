"""Whatever bytes an initiator sends, the iSCSI core parses them or raises its
ProtocolError (IscsiProtocolError) - never anything else. Inputs are fed whole and
byte by byte; commands the core emits are run like the server runs them."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ProtocolError
from cdp.targets.iscsi.pdu import PduReader
from cdp.targets.testing.iscsi_wire import Initiator
from tools.torture.fuzz_targets import iscsi_drive, iscsi_portal, iscsi_transcript

TRANSCRIPT = iscsi_transcript()
WHOLE = b"".join(TRANSCRIPT)
_drive = iscsi_drive


def test_valid_transcript_runs_cleanly() -> None:
    ini = Initiator(iscsi_portal())  # type: ignore[arg-type]
    ini.feed(WHOLE)
    assert ini.closed  # logged out at the end, nothing raised
    assert not ini.portal.sessions


@settings(max_examples=150, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _drive([data])
    _drive([data[i : i + 1] for i in range(len(data))])


@settings(max_examples=200, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(WHOLE) - 1), st.integers(0, 255)), max_size=8),
       st.integers(0, len(WHOLE)))
def test_mutated_transcript(flips: list[tuple[int, int]], cut: int) -> None:
    data = bytearray(WHOLE)
    for pos, val in flips:
        data[pos] = val
    data = data[:cut] if cut else data
    _drive([bytes(data)])


@settings(max_examples=40, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.tuples(st.integers(0, len(WHOLE) - 1), st.integers(0, 255)), max_size=4))
def test_mutated_transcript_byte_by_byte(flips: list[tuple[int, int]]) -> None:
    data = bytearray(WHOLE)
    for pos, val in flips:
        data[pos] = val
    _drive([bytes(data[i : i + 1]) for i in range(len(data))])


@settings(max_examples=100, suppress_health_check=[HealthCheck.too_slow], deadline=None)
@given(st.lists(st.sampled_from(range(len(TRANSCRIPT))), max_size=12), st.binary(max_size=64))
def test_shuffled_pdus(order: list[int], tail: bytes) -> None:
    _drive([TRANSCRIPT[i] for i in order] + [tail])


@settings(max_examples=150, deadline=None)
@given(st.binary(min_size=48, max_size=200), st.booleans(), st.booleans())
def test_pdu_reader_only_raises_protocol_error(data: bytes, hd: bool, dd: bool) -> None:
    r = PduReader(4096)
    r.header_digest, r.data_digest = hd, dd
    try:
        r.feed(data)
        while r.next() is not None:
            pass
    except ProtocolError:
        pass
