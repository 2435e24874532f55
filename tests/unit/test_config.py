"""The documented config file, its defaults and its error messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from cdp.config import REPO_CONFIG, Settings, load_config, parse_config
from cdp.errors import ConfigError


def test_documented_file_equals_builtin_defaults() -> None:
    s = load_config(REPO_CONFIG)
    d = Settings()
    assert (s.store, s.journal, s.maps, s.read, s.nbd, s.metrics, s.iscsi, s.volumes) == (
        d.store, d.journal, d.maps, d.read, d.nbd, d.metrics, d.iscsi, d.volumes
    )
    assert (s.iscsi.host, s.iscsi.port, s.iscsi.enabled) == ("127.0.0.1", 3260, True)
    assert s.volumes[0].name == "vol0" and s.volumes[0].size == 10 << 30
    assert (s.nbd.host, s.nbd.port) == ("127.0.0.1", 10809)


@pytest.mark.parametrize(
    ("doc", "key"),
    [
        ({"journal": {"sync": "sometimes"}}, "journal.sync"),
        ({"journal": {"segment_bytes": "lots"}}, "journal.segment_bytes"),
        ({"journal": {"colour": 1}}, "journal.colour"),
        ({"maps": {"fanout": 1}}, "maps.fanout"),
        ({"maps": {"seal_interval": "5 parsecs"}}, "maps.seal_interval"),
        ({"nbd": {"listen": "127.0.0.1:99999"}}, "nbd.listen"),
        ({"nbd": {"enabled": "yes"}}, "nbd.enabled"),
        ({"volume": [{"name": "Bad Name", "size": "1GiB"}]}, "volume[0].name"),
        ({"volume": [{"name": "v", "size": "1000"}]}, "volume[0].size"),
        ({"volume": [{"name": "v", "size": 512}, {"name": "v", "size": 512}]}, "volume[1].name"),
        ({"bogus": {}}, "bogus"),
        ({"iscsi": {"listen": "nowhere:x"}}, "iscsi.listen"),
        ({"iscsi": {"chap": {"vol0": {"user": "u"}}}}, "iscsi.chap.vol0"),
        ({"iscsi": {"chap": {"vol0": {"user": "u", "secret": "short"}}}}, "iscsi.chap.vol0.secret"),
        ({"iscsi": {"chap": {"vol0": {"user": "u", "secret": "s" * 12, "pin": 1}}}}, "iscsi.chap.vol0.pin"),
    ],
)
def test_bad_values_name_the_key(doc: dict, key: str) -> None:
    with pytest.raises(ConfigError) as ei:
        parse_config(doc)
    assert str(ei.value).startswith(key), str(ei.value)


def test_missing_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[journal\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_gc_interval_zero_as_the_config_file_writes_it(tmp_path: Path) -> None:
    """config/cdp.toml and docs/RETENTION.md: gc_interval = "0" means only gc --now."""
    f = tmp_path / "cdp.toml"
    f.write_text('[retention]\ngc_interval = "0"\n[[volume]]\nname = "v"\nsize = "1MiB"\n'
                 '[volume.retention]\ngc_interval = "0s"\n')
    s = load_config(f)
    assert s.retention.gc_interval == 0 and s.retention_for("v").gc_interval == 0
    for bad in ('"10"', '"-0"', '"0x"'):  # other numbers still need a unit
        f.write_text(f"[retention]\ngc_interval = {bad}\n")
        with pytest.raises(ConfigError, match=r"retention\.gc_interval"):
            load_config(f)


def test_iscsi_chap() -> None:
    s = parse_config(
        {"iscsi": {"chap": {"vol0": {"user": "u", "secret": "s" * 12,
                                     "mutual_user": "t", "mutual_secret": "m" * 12}}}}
    )
    key, chap = s.iscsi.chap[0]
    assert key == "vol0" and chap.user == "u" and chap.mutual_secret == "m" * 12


def test_overrides() -> None:
    s = Settings().with_overrides(store="/tmp/x", nbd="127.0.0.1:0")
    assert s.store == Path("/tmp/x") and s.nbd.port == 0


def test_replication_listener_and_secret_file(tmp_path: Path) -> None:
    import os

    secret = tmp_path / "secret"
    secret.write_bytes(b"0123456789abcdef0123\n")
    os.chmod(secret, 0o600)
    s = parse_config({"replication": {"listen": "127.0.0.1:7500", "secret_file": str(secret)}})
    assert s.replication.listen.enabled and s.replication.listen.port == 7500
    assert s.replication.create
    assert not Settings().replication.listen.enabled
    with pytest.raises(ConfigError, match="secret_file: needed"):
        parse_config({"replication": {"listen": "127.0.0.1:7500"}})
    os.chmod(secret, 0o640)
    with pytest.raises(ConfigError, match="group or others"):
        parse_config({"replication": {"listen": "127.0.0.1:7500", "secret_file": str(secret)}})
    os.chmod(secret, 0o604)
    with pytest.raises(ConfigError, match="group or others"):
        parse_config({"replication": {"listen": "127.0.0.1:7500", "secret_file": str(secret)}})
    secret.write_bytes(b"short")
    os.chmod(secret, 0o600)
    with pytest.raises(ConfigError, match="shorter than 16"):
        parse_config({"replication": {"listen": "127.0.0.1:7500", "secret_file": str(secret)}})
    with pytest.raises(ConfigError, match="replication"):
        parse_config({"replication": {"bogus": 1}})


@pytest.mark.parametrize("section", ["store", "journal", "maps", "read", "nbd", "metrics", "iscsi",
                                     "retention", "volume"])
def test_unknown_key_lists_exactly_the_keys_the_schema_takes(section: str) -> None:
    """Issue 28 item 10: the "known keys" of an error are the schema's (they once
    omitted [nbd]'s tls keys). Every listed key is accepted (no "unknown key" for it),
    and the listed [nbd] keys include the TLS ones."""
    def doc(table: dict[str, object]) -> dict[str, object]:
        if section == "volume":
            return {"volume": [{"name": "v", "size": "1MiB", **table}]}
        return {section: table}

    with pytest.raises(ConfigError) as e:
        parse_config(doc({"bogus": 1}))
    msg = str(e.value)
    assert "unknown key (known keys: " in msg, msg
    keys = msg.split("known keys: ", 1)[1].rstrip(")").split(", ")
    for k in keys:
        try:
            parse_config(doc({k: "x"}))
        except ConfigError as err:
            assert "unknown key" not in str(err), (k, str(err))
    if section == "nbd":
        assert {"enabled", "listen", "tls", "tls_cert", "tls_key"} <= set(keys), keys


def test_tier_section(tmp_path: Path) -> None:
    assert not Settings().tier.enabled
    s = parse_config({"tier": {"url": "s3://b/p", "endpoint": "http://127.0.0.1:7480",
                               "upload_after": "5m", "local_cache_bytes": "2GiB",
                               "object_lock_days": 30, "rate": "10MiB",
                               "credentials_file": "/etc/cdp/s3"}})
    t = s.tier
    assert t.enabled and t.url == "s3://b/p" and t.upload_after == 300.0
    assert (t.local_cache_bytes, t.object_lock_days, t.rate) == (2 << 30, 30, 10 << 20)
    assert t.credentials_file == Path("/etc/cdp/s3")
    with pytest.raises(ConfigError, match=r"tier\.url: needed"):
        parse_config({"tier": {"endpoint": "http://x"}})
    with pytest.raises(ConfigError, match=r"tier\.url: expected s3://BUCKET/PREFIX"):
        parse_config({"tier": {"url": "http://b/p"}})
    with pytest.raises(ConfigError, match=r"tier\.object_lock_days"):
        parse_config({"tier": {"url": "s3://b", "object_lock_days": -1}})
    with pytest.raises(ConfigError, match=r"tier\.nope: unknown key"):
        parse_config({"tier": {"url": "s3://b", "nope": 1}})


def test_replication_tls_settings_go_together(tmp_path: Path) -> None:
    from cdp.replication.tls import client_context, server_context

    s = parse_config({"replication": {"tls_cert": "c.pem", "tls_key": "k.pem", "tls_ca": "ca.pem"}})
    assert (s.replication.tls_cert, s.replication.tls_key, s.replication.tls_ca) == (
        "c.pem", "k.pem", "ca.pem")
    assert server_context(Settings().replication) is None
    assert client_context(Settings().replication) is None
    with pytest.raises(ConfigError, match="go together"):
        parse_config({"replication": {"tls_cert": "c.pem", "tls_key": "k.pem"}})
    missing = parse_config({"replication": {"tls_cert": str(tmp_path / "c"), "tls_key": str(tmp_path / "k"),
                                            "tls_ca": str(tmp_path / "ca")}})
    with pytest.raises(ConfigError, match="tls"):
        server_context(missing.replication)
