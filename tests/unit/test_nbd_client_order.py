"""The NBD client's ordering guarantee (cdp/targets/nbd/client.py), against a server that
runs the requests in flight newest first (tests/reorder_server.py): overlapping
write / zero / write patterns and reads land as issued, disjoint requests stay
pipelined at the full window; and the in-flight rule against a brute-force model."""

from __future__ import annotations

import random

from cdp.targets.nbd.client import NbdClient
from tests.helpers import assert_bytes_equal
from tests.reorder_server import ReorderServer

KiB = 1 << 10
SIZE = 1 << 20


def test_overlapping_writes_zeroes_and_reads_land_in_order() -> None:
    rng = random.Random(7)
    model = bytearray(SIZE)
    with ReorderServer(SIZE) as srv, NbdClient.connect(srv.uri(), window=8) as c:
        for rnd in range(24):
            base = rng.randrange(0, SIZE - 256 * KiB)
            a = rng.randbytes(rng.randrange(1, 128 * KiB))
            c.pwrite(a, base)
            model[base : base + len(a)] = a
            zoff = base + rng.randrange(0, len(a))  # starts inside A
            zlen = rng.randrange(1, 64 * KiB)
            c.zero(zoff, zlen)
            model[zoff : zoff + zlen] = bytes(zlen)
            boff = zoff + rng.randrange(0, zlen)  # starts inside the zeroed range
            b = rng.randbytes(rng.randrange(1, 64 * KiB))
            c.pwrite(b, boff)
            model[boff : boff + len(b)] = b
            elsewhere = (base + 512 * KiB) % (SIZE - 4 * KiB)  # a disjoint write in between
            c.pwrite(b"e" * 4 * KiB, elsewhere)
            model[elsewhere : elsewhere + 4 * KiB] = b"e" * 4 * KiB
            if rnd % 3 == 0:  # a read that overlaps what is still in flight
                got = c.pread(base, boff + len(b) - base)
                assert_bytes_equal(got, model[base : boff + len(b)], f"round {rnd}: read-back")
        c.flush()
        assert_bytes_equal(c.pread(0, SIZE), model, "whole export after flush")
    assert_bytes_equal(srv.disk.data, model, "server's disk")


def test_disjoint_requests_stay_pipelined_at_full_window() -> None:
    with ReorderServer(SIZE) as srv, NbdClient.connect(srv.uri(), window=8) as c:
        for i in range(64):
            c.pwrite(bytes([i]) * 4 * KiB, i * 8 * KiB)
        c.flush()
        assert max(srv.batches) == 8, srv.batches
        # reads of disjoint ranges do not wait for the writes before them
        c.pwrite(b"w" * 4 * KiB, 0)
        assert c.pread(4 * KiB, 4 * KiB) == bytes(4 * KiB)
        assert srv.batches[-1] == 2, srv.batches
        c.flush()
        assert c.pread(0, 4 * KiB) == b"w" * 4 * KiB


def test_a_write_does_not_pass_an_earlier_overlapping_read() -> None:
    with ReorderServer(SIZE) as srv, NbdClient.connect(srv.uri(), window=8) as c:
        c.pwrite(b"a" * 4 * KiB, 0)
        c.flush()
        cookie = c._request(0, 0, 4 * KiB)  # a READ in flight (pread would wait for it)
        c._reads[cookie] = None
        c.pwrite(b"b" * 4 * KiB, 2 * KiB)  # overlaps it: sent only after its reply
        while c._reads[cookie] is None:
            c._reply()
        assert c._reads.pop(cookie) == b"a" * 4 * KiB
        c.flush()
        assert c.pread(0, 6 * KiB) == b"a" * 2 * KiB + b"b" * 4 * KiB


def test_in_flight_rule_matches_a_brute_force_model() -> None:
    from cdp.targets.nbd.client import _MUTATING, InFlight

    rng = random.Random(3)
    f = InFlight()
    live: dict[int, tuple[int, int, int]] = {}
    for cookie in range(20000):
        if live and (len(live) >= 12 or rng.random() < 0.45):
            gone = rng.choice(list(live))
            assert f.pop(gone) == live.pop(gone)
        cmd = rng.choice((0, 0, 1, 4, 6))  # READ, WRITE, TRIM, WRITE_ZEROES
        start = rng.randrange(0, 1000)
        end = start + rng.randrange(1, 60)
        want = any(
            s < end and start < e and (cmd in _MUTATING or c in _MUTATING)
            for c, s, e in live.values()
        )
        assert f.blocks(cmd, start, end) == want, (cmd, start, end, live)
        if not want:  # the client sends only what is not blocked
            f.add(cookie, cmd, start, end)
            live[cookie] = (cmd, start, end)
            f._check()
