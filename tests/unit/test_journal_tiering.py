"""The journal's side of the S3 tier: sealed durable segments listed and read as stored
from any thread, and a downloaded segment installed into a fresh journal directory."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cdp.errors import Corruption, NotFound
from cdp.journal import Journal, install_segment


def test_sealed_segments_open_and_install(tmp_path: Path) -> None:
    j = Journal.open(str(tmp_path / "j"), segment_bytes=1 << 20)
    for i in range(40):
        j.append_write(i * 65536, os.urandom(65536))
    assert len(j.segments()) >= 3
    assert j.sealed_segments() == []  # sealed but not durable yet
    j.sync()
    sealed = j.sealed_segments()
    assert sealed and all(s.sealed for s in sealed) and len(sealed) == len(j.segments()) - 1
    first = sealed[0]
    with j.open_sealed(first.first_seq) as f:
        assert (f.first_seq, f.last_seq, f.size) == (first.first_seq, first.last_seq, first.bytes)
        data = f.pread(0, f.size)
        whole = f.read_all()  # read straight into one buffer: what a single PUT sends
        assert isinstance(whole, bytearray) and whole == data
        f.size += 1  # a file shorter than it should be is not sent short
        with pytest.raises(Corruption, match="expected"):
            f.read_all()
        f.size -= 1
    with pytest.raises(NotFound):
        j.open_sealed(j.segments()[-1].first_seq)  # the open one
    last = j.last_seq
    records = [(r.seq, r.payload) for r in j.scan()]
    j.close()

    # a journal rebuilt from the sealed files alone (what disaster recovery does)
    dest = tmp_path / "rec"
    for s in sealed:
        tmp = tmp_path / f"dl-{s.first_seq}"
        shutil.copy(tmp_path / "j" / s.name, tmp)
        assert install_segment(dest, s.first_seq, tmp) == s.name
    assert (dest / first.name).read_bytes() == data
    r = Journal.open(str(dest), segment_bytes=1 << 20)
    assert r.last_seq == sealed[-1].last_seq < last
    assert [(x.seq, x.payload) for x in r.scan()] == records[: r.last_seq]
    r.close()

    bad = tmp_path / "bad"
    bad.write_bytes(data)
    with pytest.raises(Corruption, match="first seq"):
        install_segment(tmp_path / "x", first.first_seq + 1, bad)


def test_appended_bytes_counts_the_payloads_since_open(tmp_path: Path) -> None:
    """What the tier reads (from its upload thread) to tell a busy volume."""
    j = Journal.open(str(tmp_path / "j"), segment_bytes=1 << 20)
    assert j.appended_bytes == 0
    for i in range(40):
        j.append_write(i * 65536, os.urandom(65536))
    assert j.appended_bytes == 40 * 65536  # across seals, before any sync
    j.close()
