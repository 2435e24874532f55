"""Whatever bytes an initiator sends, the iSCSI core parses them or raises its
ProtocolError (IscsiProtocolError) - never anything else. Inputs are fed whole and
byte by byte; commands the core emits are run like the server runs them."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.errors import ProtocolError
from cdp.targets.iscsi.core import Portal
from cdp.targets.iscsi.pdu import PduReader, new_pdu
from cdp.targets.iscsi.testwire import Initiator
from cdp.targets.memdev import MemoryProvider

SIZE = 1 << 16


def _portal() -> Portal:
    p = MemoryProvider()
    p.add("vol0", SIZE)
    p.add("vol0@@5", SIZE, read_only=True)
    return Portal(p, {"vol0@@5": {"user": "u", "secret": "0123456789ab"}})


def _transcript() -> list[bytes]:
    """A valid session, as raw PDUs: login, commands of every kind, logout."""
    ini = Initiator(_portal())
    pdus = [
        ini.login_pdu(0, 1, True, [("InitiatorName", "iqn.2026-11.test:f"),
                                   ("TargetName", "iqn.2026-11.io.cdp:vol0"),
                                   ("AuthMethod", "None")]),
        ini.login_pdu(1, 3, True, [("HeaderDigest", "None"), ("InitialR2T", "No"),
                                   ("MaxRecvDataSegmentLength", "8192")]),
    ]
    out = [p.encode() for p in pdus]

    def cmd(cdb: bytes, data: bytes = b"", edtl: int = 0, flags: int = 0x81) -> bytes:
        p = ini._cmd(0x01, flags, data=data)
        p.set(20, 4, edtl)
        p.bhs[32:48] = cdb.ljust(16, b"\0")
        return p.encode()

    out.append(cmd(bytes([0x12, 0, 0, 0, 96, 0]), edtl=96, flags=0xC1))
    out.append(cmd(bytes([0x2A, 0, 0, 0, 0, 0, 0, 0, 1, 0]), b"w" * 512, 512, 0xA1))
    out.append(cmd(bytes([0x2A, 0, 0, 0, 0, 2, 0, 0, 2, 0]), b"v" * 512, 1024, 0x21))
    d = new_pdu(0x05, 0x80, ini.itt, b"u" * 512)
    d.set(20, 4, 0xFFFFFFFF)
    d.set(40, 4, 512)
    out.append(d.encode())
    out.append(cmd(bytes([0x28, 0, 0, 0, 0, 0, 0, 0, 2, 0]), edtl=1024, flags=0xC1))
    out.append(cmd(bytes([0x9E, 0x12]) + bytes(8) + (64).to_bytes(4, "big"), edtl=64,
                   flags=0xC1))
    nop = ini._cmd(0x00, 0x80, immediate=True, data=b"hello")
    nop.set(20, 4, 0xFFFFFFFF)
    out.append(nop.encode())
    text = ini._cmd(0x04, 0x80, data=b"SendTargets=All\0")
    text.set(20, 4, 0xFFFFFFFF)
    out.append(text.encode())
    out.append(ini._cmd(0x02, 0x80 | 5, immediate=True).encode())
    out.append(ini._cmd(0x06, 0x80, immediate=True).encode())
    return out


TRANSCRIPT = _transcript()
WHOLE = b"".join(TRANSCRIPT)


def _drive(pieces: list[bytes]) -> None:
    ini = Initiator(_portal())
    try:
        for piece in pieces:
            ini.feed(piece)
            if ini.closed:
                break
    except ProtocolError:
        pass


def test_valid_transcript_runs_cleanly() -> None:
    ini = Initiator(_portal())
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
