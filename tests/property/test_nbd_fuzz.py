"""Whatever bytes a client sends, the NBD core parses them or raises ProtocolError."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.targets.nbd.proto import Opt
from cdp.targets.testing.nbd_wire import FLAGS, go, opt
from tools.torture.fuzz_targets import nbd_drive, nbd_messages

VALID = nbd_messages()
TRANSCRIPT = b"".join(VALID)
_drive = nbd_drive


FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=600))
def test_random_bytes(data: bytes) -> None:
    _drive([data])
    _drive([data[i : i + 1] for i in range(len(data))])


@FUZZ
@given(st.binary(max_size=400))
def test_random_bytes_after_valid_handshake(data: bytes) -> None:
    head = FLAGS + opt(Opt.STRUCTURED_REPLY) + go("disk")
    _drive([head + data])
    _drive([head, *(data[i : i + 1] for i in range(len(data)))])


@FUZZ
@given(
    st.lists(
        st.tuples(st.integers(0, len(TRANSCRIPT) - 1), st.integers(0, 255)),
        min_size=1,
        max_size=8,
    ),
    st.integers(1, 64),
)
def test_mutated_transcript(mutations: list[tuple[int, int]], step: int) -> None:
    data = bytearray(TRANSCRIPT)
    for pos, value in mutations:
        data[pos] = value
    _drive([bytes(data)])
    _drive([bytes(data[i : i + step]) for i in range(0, len(data), step)])


@FUZZ
@given(st.lists(st.sampled_from(VALID), max_size=12), st.integers(0, 2000))
def test_shuffled_valid_messages_truncated(parts: list[bytes], cut: int) -> None:
    data = b"".join(parts)[: cut or None]
    _drive([data])
    _drive([data[i : i + 1] for i in range(len(data))])
