"""The operator's first hour (issue 28): what cdpctl and cdpd print and the status they
exit with, against a real cdpd. Every exit status ``cdpctl --help`` documents is driven
here at least once, with its number and its message."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

from cdp.cli.main import build_parser
from cdp.errors import EXIT_CODES, ExitStatus
from tests.conftest import require_tool
from tools.harness import Cdpd, run

CAPPED = """
[retention]
max_store_bytes = "1MiB"
on_full = "refuse"
"""


def _status(d: Cdpd, *args: str) -> tuple[int, str]:
    r = d.cdpctl(*args, check=False)
    return r.returncode, r.stderr + r.stdout


def test_help_prints_the_one_table() -> None:
    epilog = build_parser().epilog or ""
    for s in ExitStatus:
        assert f"  {int(s)}  {s.meaning}" in epilog
    assert {int(s): s.meaning for s in ExitStatus} == EXIT_CODES


def test_every_documented_exit_status(tmp_path: Path) -> None:
    require_tool("qemu-io")
    seen: dict[int, str] = {}

    def expect(status: ExitStatus, words: list[str], *args: str) -> None:
        code, out = _status(d, *args)
        assert code == status, f"cdpctl {' '.join(args)}: exit {code}, wanted {int(status)}:\n{out}"
        for w in words:
            assert w in out, f"cdpctl {' '.join(args)}: {w!r} not in:\n{out}"
        seen[int(status)] = out

    d = Cdpd(tmp_path, extra_config=CAPPED).start()
    try:
        noise = tmp_path / "noise"
        noise.write_bytes(os.urandom(4 << 20))  # incompressible: the journal grows past the cap
        run("qemu-io", "-f", "raw", "-c", f"write -s {noise} 0 4M", d.uri())
        expect(ExitStatus.OK, ["vol0"], "status")
        diff = tmp_path / "all.cdpdiff"
        expect(ExitStatus.OK, [], "export", "--from", "origin", "-o", str(diff))
        expect(ExitStatus.ERROR, ["cannot connect"], "apply", str(diff), "--to", "nbd://127.0.0.1:1/vol0")
        expect(ExitStatus.USAGE, ["cannot parse time", "2024-13-45"],
               "image", "--at", "2024-13-45", "-o", str(tmp_path / "x.img"))
        expect(ExitStatus.USAGE, ["empty point"], "image", "--at", "", "-o", str(tmp_path / "x.img"))
        expect(ExitStatus.NOT_FOUND, ["nope"], "image", "-V", "nope", "-o", str(tmp_path / "x.img"))
        expect(ExitStatus.NOT_FOUND, ["does not exist"], "image", "-o", str(tmp_path / "no" / "x.img"))
        code, out = _status(d, "image", "-o", "/proc/x.img")
        assert code == ExitStatus.READ_ONLY and "/proc" in out and "does not exist" not in out, out
        seen[int(ExitStatus.READ_ONLY)] = out
        deadline = time.monotonic() + 30
        while not d.cdpctl_json("retention", "show")["over_cap"]:
            assert time.monotonic() < deadline, "the store never went over its 1 MiB cap"
            time.sleep(0.2)
        expect(ExitStatus.STORE_FULL, ["no space left"], "apply", str(diff), "--to", d.uri())
        expect(ExitStatus.LOCKED, ["stopped store", str(d.store)], "verify", "--repair")
    finally:
        d.stop()
    expect(ExitStatus.NO_DAEMON, ["not running"], "snapshot")
    seg = max((p for p in (d.store / "volumes" / "vol0" / "journal").iterdir() if p.is_file()),
              key=lambda p: p.stat().st_size)
    raw = bytearray(seg.read_bytes())
    raw[200] ^= 0xFF
    seg.write_bytes(bytes(raw))
    expect(ExitStatus.CORRUPTION, ["DAMAGED"], "verify")
    assert sorted(seen) == sorted(EXIT_CODES), json.dumps(seen, indent=1)


def test_small_promises(cdpd: Cdpd) -> None:
    """Issue 28 item 3 (a mirror volume refuses proxy options) and item 14: rewind to the live state says so and writes nothing; rewind
    --json carries the undo handle; an empty point is refused; the point text is printed
    once; resume of a running volume says so; keeps that ran out are not shown; a keep
    can be released."""
    require_tool("qemu-io")
    # item 3: a mirror volume refuses proxy options, naming them
    for opts, flag in ((["--primary", str(cdpd.tmp / "p.img"), "--ack", "both"], "--primary"),
                       (["--ack", "both"], "--ack"), (["--no-initial-copy"], "--no-initial-copy"),
                       (["--drl-region", "1MiB"], "--drl-region"), (["--copy-rate", "1MiB"], "--copy-rate")):
        r = cdpd.cdpctl("volume", "create", "v2", "--size", "1MiB", "--mode", "mirror", *opts, check=False)
        assert r.returncode == 2 and f"{flag}: only with --mode proxy" in r.stderr, (opts, r.stderr)
    assert [v["volume"] for v in cdpd.cdpctl_json("volume", "list")] == ["vol0"]

    run("qemu-io", "-f", "raw", "-c", "write -P 1 0 64k", cdpd.uri())
    assert cdpd.cdpctl_json("snapshot")["name"] == "marker1"
    run("qemu-io", "-f", "raw", "-c", "write -P 2 0 64k", cdpd.uri())
    head = cdpd.cdpctl_json("volume", "list")[0]["last_seq"]

    r = cdpd.cdpctl("rewind", "--to", "now")
    assert "nothing to rewind" in r.stdout, r.stdout
    assert cdpd.cdpctl_json("volume", "list")[0]["last_seq"] == head  # nothing written
    r = cdpd.cdpctl("rewind", "--to", "", check=False)
    assert r.returncode == 2 and "empty point" in r.stderr, r.stderr
    j = cdpd.cdpctl_json("rewind", "--to", "marker1")
    assert j["changed"] and j["undo"] == f"@{j['rewind_seq'] - 1}", j
    out = cdpd.cdpctl("rewind", "--to", j["undo"]).stdout
    assert out.count(j["undo"]) == 1, out  # "rewound to @N (@N)" no more
    assert f"rewound to {j['undo']};" in out, out

    r = cdpd.cdpctl("resume")
    assert "was not paused" in r.stdout, r.stdout
    cdpd.cdpctl("pause")
    assert cdpd.cdpctl("resume").stdout.strip() == "vol0: resumed"

    # a keep that runs out is not shown: 20 s leaves room for two cdpctl starts on a
    # loaded machine (a 5 s keep had run out before `show` ran at load 10)
    t0 = time.time()
    until = cdpd.cdpctl_json("retention", "keep", "marker1", "--keep", "20s")["keep_until_ns"]
    kept = cdpd.cdpctl_json("retention", "show")["kept_markers"]
    if time.time() < until / 1e9:
        assert kept == {"1": until}, kept
    else:  # both commands took longer than the keep: it must be gone
        assert kept == {}, (kept, time.time() - t0)
    time.sleep(max(0.0, until / 1e9 - time.time()) + 0.5)
    assert cdpd.cdpctl_json("retention", "show")["kept_markers"] == {}
    cdpd.cdpctl("retention", "keep", "marker1", "--keep", "forever")
    assert cdpd.cdpctl_json("retention", "show")["kept_markers"] == {"1": -1}
    out = cdpd.cdpctl("retention", "keep", "marker1", "--keep", "none").stdout
    assert "released" in out, out
    assert cdpd.cdpctl_json("retention", "show")["kept_markers"] == {}
    m = cdpd.cdpctl_json("markers")
    assert m[0]["keep_until_ns"] is None, m


def _cdpctl_bytes(d: Cdpd, *args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([sys.executable, "-m", "cdp.cli.main", "--config", str(d.config), *args],
                          capture_output=True, cwd=d.tmp, timeout=300)


def test_export_dry_run_needs_no_output_and_dash_is_only_the_stream(cdpd: Cdpd, tmp_path: Path) -> None:
    """Issue 28 item 11."""
    require_tool("qemu-io")
    run("qemu-io", "-f", "raw", "-c", "write -P 5 0 256k", cdpd.uri())
    r = cdpd.cdpctl("export", "--from", "origin", "--dry-run")
    assert "would copy 256 KiB" in r.stdout, r.stdout
    j = cdpd.cdpctl_json("export", "--from", "origin", "--dry-run")
    assert j["dry_run"] and j["output"] is None and j["format"] == "cdpdiff", j
    j = cdpd.cdpctl_json("export", "--from", "origin", "--dry-run", "-o", "x.qcow2")
    assert j["format"] == "qcow2" and not (cdpd.tmp / "x.qcow2").exists(), j
    r2 = _cdpctl_bytes(cdpd, "export", "--from", "origin", "--dry-run", "-o", "-")
    assert r2.returncode == 0 and b"would copy" in r2.stdout, r2  # no stream: the report
    j = json.loads(_cdpctl_bytes(cdpd, "export", "--from", "origin", "--dry-run", "-o", "-", "--json").stdout)
    assert j["output"] == "-", j  # not a temporary path

    cdpd.cdpctl("export", "--from", "origin", "--to", "@1", "-o", str(tmp_path / "f.cdpdiff"))
    for extra in ([], ["--json"]):
        r2 = _cdpctl_bytes(cdpd, "export", "--from", "origin", "--to", "@1", "-o", "-", *extra)
        assert r2.returncode == 0, r2.stderr
        assert r2.stdout == (tmp_path / "f.cdpdiff").read_bytes()  # the stream and nothing else
        assert b"copied as cdpdiff" in r2.stderr or b'"format": "cdpdiff"' in r2.stderr, r2.stderr


def test_status_range_after_gc_is_what_reads_accept(tmp_path: Path) -> None:
    """Issue 28 item 8: after gc expired the oldest points, `status` shows the oldest
    point a read accepts, not the journal's first record."""
    require_tool("qemu-io")
    d = Cdpd(tmp_path, extra_config='[retention]\ntiers = ["all 2s"]\ngc_interval = "0"\n').start()
    try:
        for i in range(4):
            run("qemu-io", "-f", "raw", "-c", f"write -P {i + 1} {i * 65536} 64k", d.uri())
        time.sleep(3)
        run("qemu-io", "-f", "raw", "-c", "write -P 9 1M 64k", d.uri())
        d.cdpctl("gc", "--now")
        st = d.cdpctl_json("status")
        first = st["first_seq"]
        assert first > 1, st
        d.cdpctl("image", "--at", f"@{first}", "-o", str(tmp_path / "a.img"))
        r = d.cdpctl("image", "--at", f"@{first - 1}", "-o", str(tmp_path / "b.img"), check=False)
        assert r.returncode == 3 and "expired" in r.stderr, r.stderr
        assert f"recoverable:   @{first} " in d.cdpctl("status").stdout
    finally:
        d.stop()
