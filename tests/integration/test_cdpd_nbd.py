"""cdpd + cdpctl with real NBD clients on loopback: markers, point-in-time images and
exports, rewind, durability across kill -9, bad input."""

from __future__ import annotations

import json
import os
import random
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

from cdp.targets.testing.nbd_wire import recv_exact
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal
from tools.harness import Cdpd, run

MiB = 1 << 20
SIZE = 256 * MiB


def qemu_io(uri: str, *cmds: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    """Run qemu-io commands; point-in-time exports (``vol@POINT``) are opened read-only."""
    args = ["qemu-io", "-f", "raw"] + (["-r"] if "@" in uri.rsplit("/", 1)[1] else [])
    for c in cmds:
        args += ["-c", c]
    return run(*args, uri, check=check)


def apply_pattern(model: bytearray, off: int, length: int, pattern: int) -> None:
    model[off : off + length] = bytes([pattern]) * length


def test_markers_images_and_pit_exports(cdpd: Cdpd, tmp_path: Path) -> None:
    require_tool("qemu-io", "qemu-img")
    model = bytearray(SIZE)
    rng = random.Random(7)
    images: list[tuple[str, bytes]] = []
    for step in range(4):
        cmds = []
        for _ in range(6):
            off = rng.randrange(0, SIZE // 512 - 256) * 512
            ln = rng.choice([512, 4096, 65536, 512 * 100])
            pat = rng.randrange(1, 256)
            cmds.append(f"write -P {pat} {off} {ln}")
            apply_pattern(model, off, ln, pat)
        if step == 2:  # a zeroed range too
            cmds.append(f"write -z {4 * MiB} {MiB}")
            model[4 * MiB : 5 * MiB] = bytes(MiB)
        qemu_io(cdpd.uri(), *cmds)
        marker = cdpd.cdpctl("snapshot", "--label", f"step{step}").stdout.strip()
        assert marker == f"marker{step + 1}"
        images.append((marker, bytes(model)))

    # more writes after the last marker must not show in the markers' views
    qemu_io(cdpd.uri(), f"write -P 0xEE 0 {MiB}")
    for marker, expect in images:
        out = tmp_path / f"{marker}.img"
        cdpd.cdpctl("image", "--at", marker, "-o", str(out))
        assert out.stat().st_size == SIZE
        assert_bytes_equal(out.read_bytes(), expect, f"image at {marker} differs from the replayed writes")
        ref = tmp_path / f"{marker}.ref"
        ref.write_bytes(expect)
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", cdpd.uri(f"vol0@{marker}"), str(ref))
    # a label is a point too
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", cdpd.uri("vol0@step1"), str(tmp_path / "marker2.ref"))
    markers = cdpd.cdpctl_json("markers")
    assert [m["name"] for m in markers] == ["marker1", "marker2", "marker3", "marker4"]
    assert [m["label"] for m in markers] == ["step0", "step1", "step2", "step3"]

    # point-in-time exports are read-only: qemu refuses to open them for writing
    r = run("qemu-io", "-f", "raw", "-c", "write -P 1 0 512", cdpd.uri("vol0@marker1"), check=False)
    assert r.returncode != 0 or b"failed" in r.stdout + r.stderr
    assert b"ermission" in r.stdout + r.stderr or b"read-only" in (r.stdout + r.stderr).lower()


def test_nbdinfo_sizes_capabilities_and_map(cdpd: Cdpd) -> None:
    require_tool("nbdinfo", "qemu-io")
    qemu_io(cdpd.uri(), f"write -P 0x55 {MiB} {MiB}", f"write -P 0x66 {8 * MiB} 4096")
    info = json.loads(run("nbdinfo", "--json", cdpd.uri()).stdout)
    exp = info["exports"][0]
    assert exp["export-size"] == SIZE
    assert exp["can_flush"] and exp["can_fua"] and exp["can_trim"] and exp["can_zero"]
    assert exp["can_multi_conn"] and not exp["is_read_only"]
    assert exp["block_size_minimum"] == 1 and exp["block_size_preferred"] == 4096
    assert exp["block_size_maximum"] == 64 * MiB
    m = json.loads(run("nbdinfo", "--map", "--json", cdpd.uri()).stdout)
    data = [(e["offset"], e["length"]) for e in m if e["type"] & 1 == 0]
    assert data == [(MiB, MiB), (8 * MiB, 4096)]
    cdpd.cdpctl("snapshot")
    pit = json.loads(run("nbdinfo", "--json", cdpd.uri("vol0@marker1")).stdout)["exports"][0]
    assert pit["is_read_only"]
    listing = run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{cdpd.nbd_port}").stdout
    names = [e["export-name"] for e in json.loads(listing)["exports"]]
    assert "vol0" in names and "vol0@marker1" in names


def test_nbdinfo_lists_the_changed_contexts(cdpd: Cdpd) -> None:
    """A client that asks for every context (the empty NBD_OPT_LIST_META_CONTEXT query,
    as nbdinfo does) sees ``x-cdp:changed:markerN`` per marker and the namespace entry,
    on the live export and on point-in-time ones, in ``--json`` and ``--list``."""
    require_tool("nbdinfo", "qemu-io")
    for i in range(3):
        qemu_io(cdpd.uri(), f"write -P {i + 1} {i * MiB} 4096")
        cdpd.cdpctl("snapshot")
    changed = [f"x-cdp:changed:marker{i}" for i in (1, 2, 3)] + ["x-cdp:changed:"]
    for export in ("vol0", "vol0@marker3", "vol0@marker1"):
        exp = json.loads(run("nbdinfo", "--json", cdpd.uri(export)).stdout)["exports"][0]
        assert exp["contexts"] == ["base:allocation", *changed], export
    listing = json.loads(run("nbdinfo", "--list", "--json", f"nbd://127.0.0.1:{cdpd.nbd_port}").stdout)
    by_name = {e["export-name"]: e["contexts"] for e in listing["exports"]}
    assert set(by_name) == {"vol0", "vol0@marker1", "vol0@marker2", "vol0@marker3"}
    assert all(c == ["base:allocation", *changed] for c in by_name.values()), by_name
    # a listed context answers when selected: marker2 -> marker3 changed the third MiB
    m = json.loads(run("nbdinfo", "--json", "--map=x-cdp:changed:marker2",
                       cdpd.uri("vol0@marker3")).stdout)  # fmt: skip
    assert [(e["offset"], e["length"]) for e in m if e["type"] == 1] == [(2 * MiB, 4096)]


def test_nbdcopy_in_and_out(cdpd: Cdpd, tmp_path: Path) -> None:
    require_tool("nbdcopy")
    src = tmp_path / "src.img"
    src.write_bytes(os.urandom(SIZE))
    run("nbdcopy", str(src), cdpd.uri())
    out = tmp_path / "out.img"
    run("nbdcopy", cdpd.uri(), str(out))
    assert_bytes_equal(out.read_bytes(), src.read_bytes())


@pytest.mark.parametrize("conns", [1, 4])
def test_fio_verify(cdpd: Cdpd, conns: int) -> None:
    require_tool("fio")
    run(
        "fio", "--name=v", "--ioengine=nbd", f"--uri={cdpd.uri()}", "--rw=randwrite",
        "--bs=4k", "--iodepth=32", f"--numjobs={conns}", "--size=32m",
        "--offset_increment=32m", "--verify=crc32c", "--verify_state_save=0", "--verify_fatal=1", "--do_verify=1",
        "--group_reporting",
    )


def test_rewind_and_rewind_the_rewind(cdpd: Cdpd) -> None:
    require_tool("qemu-io")
    qemu_io(cdpd.uri(), "write -P 0x11 0 64k")
    cdpd.cdpctl("snapshot", "--label", "ones")
    qemu_io(cdpd.uri(), "write -P 0x22 0 64k")
    qemu_io(cdpd.uri(), "read -P 0x22 0 64k")
    seq_before = cdpd.cdpctl_json("status")["last_seq"]
    r = cdpd.cdpctl_json("rewind", "--to", "ones")
    qemu_io(cdpd.uri(), "read -P 0x11 0 64k")
    # rewind the rewind: back to the point just before it
    cdpd.cdpctl("rewind", "--to", f"@{seq_before}")
    qemu_io(cdpd.uri(), "read -P 0x22 0 64k")
    # and again to the first rewind's target, then write on top
    cdpd.cdpctl("rewind", "--to", f"@{r['target_seq']}")
    qemu_io(cdpd.uri(), "write -P 0x33 4k 4k")
    qemu_io(cdpd.uri(), "read -P 0x11 0 4k", "read -P 0x33 4k 4k", "read -P 0x11 8k 56k")
    # history is never lost: the 0x22 state is still readable at its seq
    qemu_io(cdpd.uri(f"vol0@@{seq_before}"), "read -P 0x22 0 64k")


def test_kill9_after_flush_keeps_every_flushed_byte(tmp_path: Path) -> None:
    require_tool("qemu-io")
    d = Cdpd(tmp_path).start()
    try:
        rng = random.Random(3)
        cmds = []
        model = bytearray(SIZE)
        for _ in range(200):
            off = rng.randrange(0, SIZE // 4096) * 4096
            pat = rng.randrange(1, 256)
            cmds.append(f"write -P {pat} {off} 4096")
            apply_pattern(model, off, 4096, pat)
        cmds.append("flush")
        qemu_io(d.uri(), *cmds)
        d.kill9()
        d.start()
        img = tmp_path / "after.img"
        d.cdpctl("image", "-o", str(img))
        assert_bytes_equal(img.read_bytes(), bytes(model))
        assert d.cdpctl("verify").returncode == 0
    finally:
        if d.proc is not None:
            d.stop()


def _random_writes(rng: random.Random, model: bytearray, n: int) -> list[str]:
    cmds = []
    for _ in range(n):
        off = rng.randrange(0, SIZE // 4096) * 4096
        pat = rng.randrange(1, 256)
        cmds.append(f"write -P {pat} {off} 4096")
        apply_pattern(model, off, 4096, pat)
    return [*cmds, "flush"]


def _open_segment(d: Cdpd) -> Path:
    return max((d.store / "volumes" / "vol0" / "journal").glob("*.seg"))


def test_restart_after_clean_stop_then_kill9_keeps_every_flushed_byte(tmp_path: Path) -> None:
    """A clean stop leaves the open segment's index (``.closed``) and the next start
    takes it instead of scanning; a kill -9 after that start (flushed writes since)
    must still scan, and keep every flushed byte."""
    require_tool("qemu-io")
    d = Cdpd(tmp_path).start()
    try:
        rng = random.Random(5)
        model = bytearray(SIZE)
        qemu_io(d.uri(), *_random_writes(rng, model, 100))
        assert d.stop() == 0
        seg = _open_segment(d)
        assert seg.with_suffix(".closed").exists()
        d.start()
        assert not seg.with_suffix(".closed").exists()  # taken, and gone
        qemu_io(d.uri(), *_random_writes(rng, model, 100))
        d.kill9()
        d.start()
        img = tmp_path / "after.img"
        d.cdpctl("image", "-o", str(img))
        assert_bytes_equal(img.read_bytes(), bytes(model))
        assert d.cdpctl("verify").returncode == 0
    finally:
        if d.proc is not None:
            d.stop()


def test_garbage_appended_after_a_clean_stop_is_cut_off_at_start(tmp_path: Path) -> None:
    """After a clean stop, bytes appended to the open segment (here garbage) no longer
    match what the stop recorded: the start scans, cuts them off, says so, and serves
    every flushed byte."""
    require_tool("qemu-io")
    d = Cdpd(tmp_path).start()
    try:
        rng = random.Random(6)
        model = bytearray(SIZE)
        qemu_io(d.uri(), *_random_writes(rng, model, 50))
        assert d.stop() == 0
        with open(_open_segment(d), "ab") as f:
            f.write(b"\xde\xad\xbe\xef" * 1000)
        d.start()
        assert "dropped_bytes=4000" in d.logs()
        qemu_io(d.uri(), *_random_writes(rng, model, 50))
        assert d.stop() == 0
        d.start()
        img = tmp_path / "after.img"
        d.cdpctl("image", "-o", str(img))
        assert_bytes_equal(img.read_bytes(), bytes(model))
        assert d.cdpctl("verify").returncode == 0
    finally:
        if d.proc is not None:
            d.stop()


def _nbd_handshake(port: int, name: bytes) -> socket.socket:
    """Minimal fixed-newstyle client: NBD_OPT_EXPORT_NAME, returns the socket in transmission."""
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    hdr = recv_exact(s, 18)
    assert hdr[:8] == b"NBDMAGIC"
    s.sendall(struct.pack(">I", 1 | 2))  # fixed newstyle, no zeroes
    s.sendall(b"IHAVEOPT" + struct.pack(">II", 1, len(name)) + name)
    recv_exact(s, 10)  # size + flags
    return s


def _request(s: socket.socket, cmd: int, offset: int, length: int, flags: int = 0, data: bytes = b"") -> int:
    s.sendall(struct.pack(">IHHQQI", 0x25609513, flags, cmd, 42, offset, length) + data)
    magic, err, cookie = struct.unpack(">IIQ", recv_exact(s, 16))
    assert magic == 0x67446698 and cookie == 42
    return int(err)


def test_bad_input_gets_spec_errors_and_server_keeps_serving(cdpd: Cdpd) -> None:
    require_tool("qemu-io")
    EINVAL, EPERM, ENOSPC = 22, 1, 28
    # garbage handshake: that connection is dropped
    g = socket.create_connection(("127.0.0.1", cdpd.nbd_port), timeout=10)
    recv_exact(g, 18)
    g.sendall(b"\xff" * 64)
    g.settimeout(10)
    try:
        while g.recv(4096):
            pass
    except OSError:
        pass
    g.close()
    s = _nbd_handshake(cdpd.nbd_port, b"vol0")
    assert _request(s, 0, SIZE - 512, 4096) == EINVAL  # read past the end
    assert _request(s, 1, SIZE, 512, data=b"x" * 512) == ENOSPC  # write past the end (spec: SHOULD ENOSPC)
    assert _request(s, 0, 0, 512, flags=0x8000) == EINVAL  # unknown flag
    assert _request(s, 99, 0, 512) == EINVAL  # unknown command: the connection goes on
    assert _request(s, 0, 0, 512) == 0
    recv_exact(s, 512)
    # absurd length read: refused, connection still usable
    assert _request(s, 0, 0, 0x7FFFFFFF) == EINVAL
    assert _request(s, 0, 0, 512) == 0
    recv_exact(s, 512)
    # bad request magic ends only this connection
    s.sendall(b"\x00" * 28)
    s.settimeout(10)
    try:
        assert s.recv(4096) == b""
    except OSError:
        pass
    s.close()
    # write to a point-in-time export: EPERM
    cdpd.cdpctl("snapshot")
    p = _nbd_handshake(cdpd.nbd_port, b"vol0@marker1")
    assert _request(p, 1, 0, 512, data=b"y" * 512) == EPERM
    p.close()
    # unknown export: qemu-io fails with the server's message; the server lives on
    r = qemu_io(cdpd.uri("nosuchvol"), "read 0 512", check=False)
    assert r.returncode != 0
    r = qemu_io(cdpd.uri("vol0@marker99"), "read 0 512", check=False)
    assert r.returncode != 0
    qemu_io(cdpd.uri(), "write -P 7 0 4k", "read -P 7 0 4k")


def test_second_daemon_refuses_the_same_store(cdpd: Cdpd, tmp_path: Path) -> None:
    second = Cdpd(tmp_path)  # same store, same config
    with pytest.raises(RuntimeError, match="in use by another process"):
        second.start(timeout=20)


def test_offline_commands_on_a_stopped_store(cdpd: Cdpd, tmp_path: Path) -> None:
    require_tool("qemu-io")
    qemu_io(cdpd.uri(), "write -P 0x42 0 1M")
    cdpd.cdpctl("snapshot", "--label", "offline")
    assert cdpd.stop() == 0
    st = cdpd.cdpctl_json("status")
    assert st["markers"] == 1 and st["last_seq"] >= 2
    assert cdpd.cdpctl_json("markers")[0]["label"] == "offline"
    img = tmp_path / "off.img"
    cdpd.cdpctl("image", "--at", "offline", "-o", str(img))
    with open(img, "rb") as f:
        assert_bytes_equal(f.read(MiB), b"\x42" * MiB)
    v = cdpd.cdpctl_json("verify")
    assert v["ok"] is True
    # writing commands need the daemon: one clear line, documented exit status
    r = cdpd.cdpctl("snapshot", check=False)
    assert r.returncode == 8 and "not running" in r.stderr


def test_relative_points_written_after_a_space(cdpd: Cdpd, tmp_path: Path) -> None:
    """``--at -Ns`` / ``--to -Ns`` as the help writes them (argparse alone would take
    ``-Ns`` for an option and stop with "expected one argument").

    cdpd resolves ``-Ns`` against its own clock when the command reaches it, which on a
    loaded machine may be seconds after the test chose N. So the test aims at the middle
    of a 6 s gap between two writes and brackets the moment of each command (before and
    after it): when the bracket, moved back N seconds, falls clear of the second write
    (the usual case) the point must be exactly the first write; when it straddles the
    second write either may be right; and the data must always be that of the seq the
    point resolved to."""
    require_tool("qemu-io")
    qemu_io(cdpd.uri(), "write -P 0x11 0 64k")
    first = cdpd.cdpctl_json("status")["last_seq"]
    t1 = time.time()
    time.sleep(6)
    before = time.time()
    qemu_io(cdpd.uri(), "write -P 0x22 0 64k")
    after = time.time()
    second = cdpd.cdpctl_json("status")["last_seq"]
    assert second == first + 1
    pattern = {first: 0x11, second: 0x22}

    def relative(cmd: str, option: str, *rest: str) -> dict:
        t0 = time.time()
        n = round(t0 - (t1 + before) / 2)
        out = cdpd.cdpctl_json(cmd, option, f"-{n}s", *rest)
        t_end = time.time()
        seq = out["seq"] if cmd == "image" else out["target_seq"]
        if t_end - n < before:
            allowed = {first}
        elif t0 - n >= after:
            allowed = {second}
        else:
            allowed = {first, second}
        assert seq in allowed, (cmd, n, seq, first, second, t0, t_end, before, after)
        return out

    img = tmp_path / "before.img"
    seq = relative("image", "--at", "-o", str(img))["seq"]
    assert_bytes_equal(img.read_bytes()[: 64 << 10], bytes([pattern[seq]]) * (64 << 10))
    target = relative("rewind", "--to")["target_seq"]
    qemu_io(cdpd.uri(), f"read -P {pattern[target]:#x} 0 64k")
    r = cdpd.cdpctl("rewind", "--to", "-100d", check=False)
    assert r.returncode == 3 and "before the first write" in r.stderr, r.stderr


def test_cli_errors_are_one_clear_line(cdpd: Cdpd) -> None:
    cases = [
        (["image", "--at", "marker9", "-o", "/tmp/x.img"], 3, "no marker9"),
        (["image", "--at", "@999999", "-o", "/tmp/x.img"], 3, "after now"),
        (["status", "-V", "nope"], 3, "no volume 'nope'"),
        (["rewind", "--to", "2001-01-01T00:00"], 3, "before the first write"),
        (["volume", "create", "v2", "--size", "12 parsecs"], 2, "cannot parse size"),
        # the output of image: a missing directory, stdout, a device (each was an
        # "internal error: [Errno 2]" or a file named "-" in the working directory)
        (["image", "-o", "/nonexistent/dir/x.img"], 3, "/nonexistent/dir does not exist"),
        (["image", "-o", "-"], 2, "image writes a file (-o FILE)"),
        (["image", "-o", "/dev/null"], 2, "/dev/null: not a regular file"),
    ]
    for args, status, text in cases:
        r = cdpd.cdpctl(*args, check=False)
        assert r.returncode == status, (args, r.returncode, r.stderr)
        assert text in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_pause_holds_writes_and_multi_volume_snapshot(cdpd: Cdpd) -> None:
    require_tool("qemu-io")
    cdpd.cdpctl("volume", "create", "vol1", "--size", "64MiB")
    cdpd.cdpctl("pause", "-V", "vol0")
    writer = subprocess.Popen(
        ["qemu-io", "-f", "raw", "-c", "write -P 9 0 4k", cdpd.uri()],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    time.sleep(1.0)
    assert writer.poll() is None, "a write completed while the volume was paused"
    cdpd.cdpctl("resume", "-V", "vol0")
    assert writer.wait(30) == 0
    rows = cdpd.cdpctl_json("snapshot", "-V", "vol0", "-V", "vol1", "--label", "both")
    assert {r["volume"] for r in rows} == {"vol0", "vol1"}
    qemu_io(cdpd.uri("vol0@both"), "read -P 9 0 4k")


def test_volume_from_qcow2_image(cdpd: Cdpd, tmp_path: Path) -> None:
    require_tool("qemu-img", "qemu-io")
    raw = tmp_path / "seed.raw"
    with open(raw, "wb") as f:
        f.truncate(32 * MiB)
        f.seek(3 * MiB)
        f.write(b"\xab" * MiB)
    qcow = tmp_path / "seed.qcow2"
    run("qemu-img", "convert", "-O", "qcow2", str(raw), str(qcow))
    r = cdpd.cdpctl_json("volume", "create", "seeded", "--from-image", str(qcow))
    assert r["size"] == 32 * MiB and r["initial_copy_bytes"] == MiB
    run("qemu-img", "compare", "-f", "raw", "-F", "raw", cdpd.uri("seeded"), str(raw))


def test_metrics_endpoint(cdpd: Cdpd) -> None:
    require_tool("qemu-io")
    qemu_io(cdpd.uri(), "write -P 1 0 64k", "flush")
    body = urllib.request.urlopen(f"http://127.0.0.1:{cdpd.metrics_port}/metrics", timeout=10).read().decode()
    line = next(x for x in body.splitlines() if x.startswith('cdp_written_bytes_total{volume="vol0"}'))
    assert float(line.split()[-1]) == 65536
    assert 'cdp_flushes_total{volume="vol0"}' in body
    # the first seal of the write (the harness seals every 2 s) trims the allocator
    # (cdp.memtrim): the daemon counts it
    deadline = time.monotonic() + 60
    while True:
        body = urllib.request.urlopen(f"http://127.0.0.1:{cdpd.metrics_port}/metrics",
                                      timeout=10).read().decode()
        trims = next(float(x.split()[-1]) for x in body.splitlines()
                     if x.startswith("cdp_malloc_trims_total"))
        if trims >= 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert trims >= 1
    assert "cdp_malloc_trim_seconds_total" in body


def test_sigterm_stops_cleanly(cdpd: Cdpd) -> None:
    assert cdpd.stop() == 0
    assert "stopped cleanly" in cdpd.logs()
    assert not (cdpd.store / "cdpd.sock").exists()
