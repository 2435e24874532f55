"""[[volume]] keys of proxy mode: validation names the key; defaults; the CLI flags."""

from __future__ import annotations

import pytest

from cdp.config import VolumeSpec, parse_config
from cdp.errors import ConfigError


def test_proxy_volume_keys_and_defaults() -> None:
    s = parse_config({"volume": [
        {"name": "p", "mode": "proxy", "primary": "/dev/sdb"},
        {"name": "q", "mode": "proxy", "primary": "nbd://h/x", "size": "1GiB", "ack": "both",
         "drl_region": "4MiB", "initial_copy": False, "copy_rate": "100MiB"},
        {"name": "m", "size": "1GiB", "mode": "mirror"},
    ]})
    p, q, m = s.volumes
    assert p == VolumeSpec("p", 0, "proxy", "/dev/sdb")
    assert (p.ack, p.drl_region, p.initial_copy, p.copy_rate) == ("primary", 1 << 20, True, 0)
    assert q == VolumeSpec("q", 1 << 30, "proxy", "nbd://h/x", "both", 4 << 20, False, 100 << 20)
    assert m.mode == "mirror" and m.primary == ""


@pytest.mark.parametrize(
    ("vol", "key"),
    [
        ({"name": "p", "mode": "proxy"}, "volume[0].primary"),
        ({"name": "p", "mode": "splitter", "primary": "/x"}, "volume[0].mode"),
        ({"name": "p", "mode": "proxy", "primary": "/x", "ack": "journal"}, "volume[0].ack"),
        ({"name": "p", "mode": "proxy", "primary": "/x", "drl_region": "3MiB"}, "volume[0].drl_region"),
        ({"name": "p", "mode": "proxy", "primary": "/x", "drl_region": "1KiB"}, "volume[0].drl_region"),
        ({"name": "p", "mode": "proxy", "primary": "/x", "initial_copy": "yes"}, "volume[0].initial_copy"),
        ({"name": "p", "mode": "proxy", "primary": ""}, "volume[0].primary"),
        ({"name": "p", "size": "1GiB", "primary": "/x"}, "volume[0].primary"),
        ({"name": "p", "size": "1GiB", "ack": "both"}, "volume[0].ack"),
        ({"name": "p"}, "volume[0]"),
    ],
)
def test_bad_proxy_keys_name_the_key(vol: dict, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config({"volume": [vol]})
    assert str(ei.value).startswith(key), str(ei.value)


def test_cli_flags_parse() -> None:
    from cdp.cli.main import build_parser

    a = build_parser().parse_args(
        ["volume", "create", "db", "--mode", "proxy", "--primary", "/dev/sdb", "--ack", "both",
         "--no-initial-copy", "--drl-region", "4MiB"]
    )
    assert (a.mode, a.primary, a.ack, a.initial_copy, a.drl_region) == ("proxy", "/dev/sdb", "both", False, "4MiB")
