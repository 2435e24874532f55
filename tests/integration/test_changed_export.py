"""Changed blocks and differential backups through a real cdpd and real clients: random
histories written with qemu-io, then for random pairs of points (A, B):
image(A) + export(A -> B) == image(B) via qcow2 (qemu-img check/convert/rebase/compare),
via the cdpdiff stream (cdpctl apply, from a file and from stdin), via --to-nbd into a
second cdpd and into nbdkit file; ``nbdinfo --map=x-cdp:changed:A`` matches
``cdpctl changed --json``; zeroed/trimmed ranges travel as zeroes, not data."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from cdp.backup.cdpdiff import KIND_DATA, KIND_ZERO, Reader
from tests.conftest import require_tool
from tests.helpers import assert_bytes_equal
from tools.harness import Cdpd, listening_port, run

MiB = 1 << 20
SIZE = 64 * MiB


def qemu_io(uri: str, *cmds: str) -> None:
    args = ["qemu-io", "-f", "raw"]
    for c in cmds:
        args += ["-c", c]
    run(*args, uri)


def cdpctl_bytes(d: Cdpd, *args: str, input: bytes | None = None, check: bool = True) -> subprocess.CompletedProcess[bytes]:
    r = subprocess.run(
        [sys.executable, "-m", "cdp.cli.main", "--config", str(d.config), *args],
        capture_output=True, cwd=d.tmp, timeout=300, input=input,
    )
    if check and r.returncode != 0:
        raise AssertionError(f"cdpctl {' '.join(args)} failed ({r.returncode}): {r.stderr.decode()}")
    return r


@pytest.fixture(scope="module")
def history(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cdpd, dict[str, bytes], Path]]:
    """cdpd with markers marker1..marker5 after random qemu-io writes (data, write -z,
    discard); the expected image at each point ('origin' too)."""
    require_tool("qemu-io", "qemu-img", "nbdinfo", "nbdkit", "nbdcopy")
    tmp = tmp_path_factory.mktemp("changed")
    (tmp / "a").mkdir()
    d = Cdpd(tmp / "a", size="64MiB").start()
    rng = random.Random(8)
    model = bytearray(SIZE)
    images = {"origin": bytes(SIZE)}
    try:
        for step in range(5):
            cmds = []
            for _ in range(12):
                off = rng.randrange(0, SIZE // 4096 - 512) * 4096
                ln = rng.choice([4096, 65536, 192 * 1024, MiB + 4096])
                if off + ln > 38 * MiB and off < 44 * MiB:  # [40, 42) MiB is scripted below
                    off = (off + 6 * MiB) % (SIZE - 2 * MiB)
                    if off + ln > 38 * MiB and off < 44 * MiB:
                        continue
                r = rng.random()
                if r < 0.15 and step:
                    cmds.append(f"write -z {off} {ln}")
                    model[off : off + ln] = bytes(ln)
                elif r < 0.25 and step:
                    cmds.append(f"discard {off} {ln}")
                    model[off : off + ln] = bytes(ln)
                else:
                    pat = rng.randrange(1, 256)
                    cmds.append(f"write -P {pat} {off} {ln}")
                    model[off : off + ln] = bytes([pat]) * ln
            if step == 2:  # data at marker3, zeroed by marker4
                cmds.append(f"write -P 0x5a {40 * MiB} {2 * MiB}")
                model[40 * MiB : 42 * MiB] = b"\x5a" * (2 * MiB)
            if step == 3:
                cmds.append(f"write -z {40 * MiB} {2 * MiB}")
                model[40 * MiB : 42 * MiB] = bytes(2 * MiB)
            qemu_io(d.uri(), *cmds)
            name = d.cdpctl("snapshot").stdout.strip()
            images[name] = bytes(model)
        for name, img in images.items():
            (tmp / f"{name}.img").write_bytes(img)
        yield d, images, tmp
    finally:
        if d.proc is not None:
            d.stop()


PAIRS = [("marker1", "marker3"), ("origin", "marker4"), ("marker2", "marker5"), ("marker5", "marker2"),
         ("marker3", "marker4")]


def _copy_of(tmp: Path, point: str, name: str) -> Path:
    p = tmp / name
    shutil.copyfile(tmp / f"{point}.img", p)
    return p


@pytest.mark.parametrize(("a", "b"), PAIRS)
def test_qcow2_overlay_rebuilds_b(history: tuple[Cdpd, dict[str, bytes], Path], a: str, b: str) -> None:
    d, _images, tmp = history
    out = tmp / f"{a}-{b}.qcow2"
    cdpctl_bytes(d, "export", "--from", a, "--to", b, "-o", str(out), "--backing", f"{a}.img")
    info = json.loads(run("qemu-img", "info", "--output=json", str(out)).stdout)
    assert info["format"] == "qcow2" and info["virtual-size"] == SIZE
    assert info["format-specific"]["data"]["compat"] == "1.1"  # qcow2 v3
    assert info["backing-filename"] == f"{a}.img"
    run("qemu-img", "check", str(out))
    run("qemu-img", "compare", str(out), str(tmp / f"{b}.img"))
    flat = tmp / f"{a}-{b}.flat"
    run("qemu-img", "convert", "-O", "raw", str(out), str(flat))
    assert flat.read_bytes() == (tmp / f"{b}.img").read_bytes()
    # without a backing name, rebase -u attaches image(A) afterwards
    bare = tmp / f"{a}-{b}-bare.qcow2"
    cdpctl_bytes(d, "export", "--from", a, "--to", b, "-o", str(bare), "--backing", "")
    run("qemu-img", "rebase", "-u", "-b", f"{a}.img", "-F", "raw", str(bare))
    run("qemu-img", "compare", str(bare), str(tmp / f"{b}.img"))
    run("qemu-img", "check", str(bare))


@pytest.mark.parametrize(("a", "b"), PAIRS[:3])
def test_stream_apply_rebuilds_b(history: tuple[Cdpd, dict[str, bytes], Path], a: str, b: str) -> None:
    d, images, tmp = history
    stream = cdpctl_bytes(d, "export", "--from", a, "--to", b, "-o", "-").stdout
    f = tmp / f"{a}-{b}.cdpdiff"
    f.write_bytes(stream)
    # from a file
    target = _copy_of(tmp, a, f"apply-{a}-{b}.img")
    cdpctl_bytes(d, "apply", str(f), "--to", str(target))
    assert_bytes_equal(target.read_bytes(), images[b])
    # from stdin
    target2 = _copy_of(tmp, a, f"apply2-{a}-{b}.img")
    cdpctl_bytes(d, "apply", "-", "--to", str(target2), input=stream)
    assert_bytes_equal(target2.read_bytes(), images[b])
    # the same bytes as a .cdpdiff file written by the daemon
    f2 = tmp / f"{a}-{b}-2.cdpdiff"
    cdpctl_bytes(d, "export", "--from", a, "--to", b, "-o", str(f2))
    with open(f2, "rb") as fh:
        rd = Reader(fh)
        recs = [(r.kind, r.offset, r.length) for r in rd.records()]
    with open(f, "rb") as fh:
        assert [(r.kind, r.offset, r.length) for r in Reader(fh).records()] == recs


def test_zeroes_travel_as_zeroes(history: tuple[Cdpd, dict[str, bytes], Path]) -> None:
    """marker3 -> marker4 zeroes [40, 42) MiB (written then write -z): a qcow2 zero
    cluster range and ZERO stream records, no data."""
    d, _images, tmp = history
    out = tmp / "z.qcow2"
    cdpctl_bytes(d, "export", "--from", "marker3", "--to", "marker4", "-o", str(out), "--backing", "marker3.img")
    m = json.loads(run("qemu-img", "map", "--output=json", str(out)).stdout)
    zone = [e for e in m if e["start"] < 42 * MiB and e["start"] + e["length"] > 40 * MiB]
    assert zone and all(e["zero"] and not e["data"] and e["depth"] == 0 for e in zone), zone
    assert sum(e["length"] for e in zone) >= 2 * MiB
    stream = cdpctl_bytes(d, "export", "--from", "marker3", "--to", "marker4", "-o", "-").stdout
    (tmp / "z.cdpdiff").write_bytes(stream)
    with open(tmp / "z.cdpdiff", "rb") as fh:
        recs = list(Reader(fh).records())
    covering = [r for r in recs if r.offset < 42 * MiB and r.offset + r.length > 40 * MiB]
    assert covering and all(r.kind == KIND_ZERO and r.data is None for r in covering)
    assert any(r.kind == KIND_DATA for r in recs)
    # the qcow2 file holds no data for the zeroed range: far smaller than the data
    ch = json.loads(cdpctl_bytes(d, "changed", "--from", "marker3", "--to", "marker4", "--json").stdout)
    assert ch["zero_bytes"] >= 2 * MiB
    assert out.stat().st_size < ch["data_bytes"] + 2 * MiB


@pytest.mark.parametrize(("a", "b"), [("marker1", "marker4"), ("marker4", "marker2"), ("origin", "marker5")])
def test_nbdinfo_map_matches_changed(history: tuple[Cdpd, dict[str, bytes], Path], a: str, b: str) -> None:
    d, images, _tmp = history
    ch = json.loads(cdpctl_bytes(d, "changed", "--from", a, "--to", b, "--json").stdout)
    m = json.loads(run("nbdinfo", "--json", f"--map=x-cdp:changed:{a}", d.uri(f"vol0@{b}")).stdout)
    got = [(e["offset"], e["length"]) for e in m if e["type"] & 1]
    assert got == [(r["offset"], r["length"]) for r in ch["ranges"]]
    assert sum(e["length"] for e in m) == SIZE
    # every byte that differs is inside a changed range; outside, A and B agree
    ia, ib = images[a], images[b]
    mask = bytearray(SIZE)
    for off, ln in got:
        mask[off : off + ln] = b"\x01" * ln
    for off in range(0, SIZE, 4096):
        if not mask[off]:
            assert ia[off : off + 4096] == ib[off : off + 4096]
    assert ch["changed_bytes"] == sum(ln for _, ln in got)


def test_live_export_context_and_listing(history: tuple[Cdpd, dict[str, bytes], Path]) -> None:
    d, _images, _tmp = history
    m = json.loads(run("nbdinfo", "--json", "--map=x-cdp:changed:marker5", d.uri("vol0")).stdout)
    assert [e for e in m if e["type"] & 1] == []  # nothing written after marker5 yet
    listing = run("nbdinfo", "--list", "--content", "--json", d.uri("vol0")).stdout
    assert json.loads(listing)["exports"]
    # an unknown point selects no context: nbdinfo says the server lacks it
    r = run("nbdinfo", "--map=x-cdp:changed:marker99", d.uri("vol0"), check=False)
    assert r.returncode != 0


def test_push_to_second_cdpd_and_nbdkit(history: tuple[Cdpd, dict[str, bytes], Path]) -> None:
    d, images, tmp = history
    (tmp / "b").mkdir(exist_ok=True)
    replica = Cdpd(tmp / "b", size="64MiB").start()
    try:
        run("nbdcopy", str(tmp / "marker2.img"), replica.uri())
        cdpctl_bytes(d, "export", "--from", "marker2", "--to", "marker5", "--to-nbd", replica.uri())
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", replica.uri(), str(tmp / "marker5.img"))
        # and back: the replica goes to marker1 with the reverse diff
        cdpctl_bytes(d, "export", "--from", "marker5", "--to", "marker1", "--to-nbd", replica.uri())
        run("qemu-img", "compare", "-f", "raw", "-F", "raw", replica.uri(), str(tmp / "marker1.img"))
    finally:
        replica.stop()
    target = _copy_of(tmp, "marker1", "nbdkit-target.img")
    proc = subprocess.Popen(["nbdkit", "-f", "--exit-with-parent", "-i", "127.0.0.1", "-p", "0",
                             "file", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        port = listening_port(proc, "nbdkit")
        cdpctl_bytes(d, "export", "--from", "marker1", "--to", "marker4", "--to-nbd", f"nbd://127.0.0.1:{port}/")
    finally:
        proc.terminate()
        proc.wait(10)
    assert_bytes_equal(target.read_bytes(), images["marker4"])


def test_dry_run_errors_and_offline(history: tuple[Cdpd, dict[str, bytes], Path]) -> None:
    d, images, tmp = history
    r = json.loads(cdpctl_bytes(d, "export", "--from", "marker1", "--to", "marker3", "-o",
                                str(tmp / "never.qcow2"), "--dry-run", "--json").stdout)
    assert r["dry_run"] and r["copy_bytes"] >= r["data_bytes"] > 0 and not (tmp / "never.qcow2").exists()
    text = cdpctl_bytes(d, "export", "--from", "marker1", "--to", "marker3", "-o", "-", "--dry-run").stdout
    assert b"would copy" in text
    # apply refuses a diff for another size, and a damaged stream (exit 6)
    stream = cdpctl_bytes(d, "export", "--from", "marker1", "--to", "marker3", "-o", "-").stdout
    small = tmp / "small.img"
    small.write_bytes(bytes(MiB))
    (tmp / "x.cdpdiff").write_bytes(stream)
    r2 = cdpctl_bytes(d, "apply", str(tmp / "x.cdpdiff"), "--to", str(small), check=False)
    assert r2.returncode == 2 and b"bytes" in r2.stderr
    bad = bytearray(stream)
    bad[len(bad) // 2] ^= 0x40
    (tmp / "bad.cdpdiff").write_bytes(bad)
    target = _copy_of(tmp, "marker1", "bad-target.img")
    r3 = cdpctl_bytes(d, "apply", str(tmp / "bad.cdpdiff"), "--to", str(target), check=False)
    assert r3.returncode == 6 and b"checksum" in r3.stderr
    assert target.read_bytes() == images["marker1"]  # verified before anything was written
    r4 = cdpctl_bytes(d, "export", "--from", "marker77", "-o", str(tmp / "n.qcow2"), check=False)
    assert r4.returncode == 3
    # offline: the daemon is stopped, the store is read directly
    d.stop()
    try:
        out = tmp / "offline.qcow2"
        cdpctl_bytes(d, "export", "--from", "marker2", "--to", "marker4", "-o", str(out), "--backing", "marker2.img")
        run("qemu-img", "compare", str(out), str(tmp / "marker4.img"))
        ch = json.loads(cdpctl_bytes(d, "changed", "--from", "origin", "--to", "marker1", "--json").stdout)
        assert ch["data_bytes"] == ch["changed_bytes"] > 0
    finally:
        d.start()
