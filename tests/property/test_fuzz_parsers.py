"""Hostile input for the parsers that had no fuzzer yet: journal segments, map files and
the manifest, the config loader and the point parser. Whatever the bytes, only the
package's own errors escape (Corruption / MapError / ConfigError / PointError).
Seeds: tests/fuzz_corpus/ (valid files of every format), mutated by hypothesis with
bit flips, overwrites, truncations and splices; segments are also fed as every prefix
(a torn tail at each byte)."""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdp.config import parse_config
from cdp.errors import ConfigError, PointError
from cdp.points import parse_point
from tools.torture.fuzz_targets import (
    config_parse,
    journal_read_all,
    manifest_decode,
    map_decode,
    seeds,
)

EXAMPLES = int(os.environ.get("CDP_FUZZ_EXAMPLES", "150"))
FUZZ = settings(max_examples=EXAMPLES, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


_seeds = seeds


@st.composite
def mutated(draw: st.DrawFn, kind: str) -> bytes:
    b = bytearray(draw(st.sampled_from(_seeds(kind))))
    for _ in range(draw(st.integers(0, 6))):
        op = draw(st.integers(0, 4))
        if not b:
            break
        i = draw(st.integers(0, len(b) - 1))
        if op == 0:
            b[i] ^= 1 << draw(st.integers(0, 7))
        elif op == 1:
            b[i : i + 8] = draw(st.binary(min_size=1, max_size=8))
        elif op == 2:
            del b[i:]
        elif op == 3:
            b[i:i] = draw(st.binary(max_size=64))
        else:  # interesting integers where lengths and counts live
            v = draw(st.sampled_from([0, 1, 0x7F, 0xFF, 0xFFFF, 0x7FFFFFFF, 0xFFFFFFFF]))
            b[i : i + 4] = v.to_bytes(4, "little")
    return bytes(b)


# ---------------------------------------------------------------------------- journal


_journal_read_all = journal_read_all


@FUZZ
@given(mutated("journal"))
def test_journal_reader_only_raises_cdp_errors(seg: bytes) -> None:
    _journal_read_all(seg)


def test_journal_reader_every_prefix() -> None:
    seg = _seeds("journal")[0]
    for n in list(range(0, 200)) + list(range(200, len(seg), 97)):
        _journal_read_all(seg[:n])


# ---------------------------------------------------------------------------- maps


@FUZZ
@given(mutated("map"))
def test_map_reader_only_raises_map_errors(raw: bytes) -> None:
    map_decode(raw)


@FUZZ
@given(mutated("manifest"))
def test_manifest_reader_only_raises_map_errors(raw: bytes) -> None:
    manifest_decode(raw)


# ---------------------------------------------------------------------------- config

_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(-(1 << 70), 1 << 70),
                     st.floats(allow_nan=True), st.text(max_size=20),
                     st.sampled_from(["1GiB", "0", "-1", "8MiB", "5s", "500ms", "flush",
                                      "always", "127.0.0.1:0", "[::1]:1", "vol0", "proxy",
                                      "on", "require", "off", "1e9", "1 TiB", "x:y:z"]))
_KEYS = st.sampled_from(["store", "journal", "maps", "read", "nbd", "metrics", "iscsi",
                         "volume", "path", "segment_bytes", "sync", "l0_max_writes",
                         "seal_interval", "fanout", "full_every", "cache_bytes", "listen",
                         "enabled", "tls", "tls_cert", "tls_key", "chap", "name", "size",
                         "mode", "primary", "user", "secret", "nop_interval", "bogus"])
_DOCS = st.recursive(_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_KEYS, inner, max_size=5)), max_leaves=20)


@FUZZ
@given(st.dictionaries(_KEYS, _DOCS, max_size=6))
def test_config_documents_only_raise_config_error(doc: dict[str, Any]) -> None:
    try:
        parse_config(doc)
    except ConfigError:
        pass


@FUZZ
@given(mutated("config"))
def test_config_text_only_raises_config_error(raw: bytes) -> None:
    config_parse(raw)


# ---------------------------------------------------------------------------- points

_POINT_SEEDS = _seeds("point")[0].decode().split()


@FUZZ
@given(st.one_of(st.text(max_size=40),
                 st.builds(lambda s, t: s + t, st.sampled_from(_POINT_SEEDS), st.text(max_size=8)),
                 st.builds(lambda t, s: t + s, st.text(max_size=8), st.sampled_from(_POINT_SEEDS))))
def test_point_parser_only_raises_point_error(text: str) -> None:
    try:
        parse_point(text)
    except PointError:
        pass
