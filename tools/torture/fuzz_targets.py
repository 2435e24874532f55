"""What each fuzzer feeds, and which errors it may see.

One function per target takes arbitrary bytes, drives the parser the way the product
does, and swallows only the package's own error for that parser; anything else escapes
and is a finding. The hypothesis tests in ``tests/property`` and the coverage-guided
runner (``tools.torture.fuzz``) share these drivers. Seeds: ``tests/fuzz_corpus/<target>``
(regenerate the generated ones with ``python -m tools.torture.fuzz --write-seeds``).

Stream targets (``nbd``, ``iscsi``) read their first byte as the feeding mode: whole,
byte by byte, or pieces of a size the second byte gives - so one input is tried the way
a slow client would send it, too.
"""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path

from cdp.errors import CdpError, ConfigError, Corruption, PointError, ProtocolError

CORPUS = Path(__file__).resolve().parents[2] / "tests" / "fuzz_corpus"


def seeds(kind: str) -> list[bytes]:
    """The seed files of one target, in name order (empty if it has none)."""
    d = CORPUS / kind
    return [p.read_bytes() for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []


def split(data: bytes) -> list[bytes]:
    """Cut a stream input into pieces by its mode byte (see the module docstring)."""
    if len(data) < 2:
        return [data]
    mode, body = data[0] % 3, data[2:]
    if mode == 0:
        return [body]
    step = 1 if mode == 1 else data[1] % 61 + 1
    return [body[i : i + step] for i in range(0, len(body), step)]


# ------------------------------------------------------------------------------ NBD

NBD_SIZE = 1 << 16


def nbd_drive(pieces: list[bytes]) -> None:
    """Feed *pieces* to an NBD server connection, answering requests like cdpd does;
    only ProtocolError may escape the core (it is swallowed here)."""
    from cdp.targets.nbd.core import NEED_DATA, Request, ServerConnection
    from cdp.targets.nbd.proto import Cmd
    from cdp.targets.testing.memdev import MemoryProvider

    p = MemoryProvider()
    p.add("disk", NBD_SIZE, extra_contexts=["x-cdp:a"])
    p.add("ro", NBD_SIZE, read_only=True)
    conn = ServerConnection(p)
    conn.initial_bytes()
    try:
        for piece in [*pieces, b""]:
            conn.receive_data(piece)
            while (ev := conn.next_event()) is not NEED_DATA:
                if isinstance(ev, Request):
                    dev = conn.device
                    assert dev is not None
                    if ev.cmd == Cmd.READ:
                        conn.reply_read(ev, dev.read(ev.offset, ev.length))  # type: ignore[arg-type]
                    elif ev.cmd == Cmd.BLOCK_STATUS:
                        res = [(cid, dev.block_status(n, ev.offset, ev.length))
                               for cid, n in conn.contexts]
                        conn.reply_block_status(ev, res)  # type: ignore[arg-type]
                    else:
                        conn.reply_ok(ev)
                if piece == b"" and not isinstance(ev, Request):
                    break
            conn.data_to_send()
    except ProtocolError:
        pass


def nbd_messages() -> list[bytes]:
    """A valid client session, message by message: every option and command."""
    from cdp.targets.nbd.proto import Cmd, CmdFlag, Info, Opt
    from cdp.targets.testing.nbd_wire import FLAGS, go, meta, opt, req

    return [
        FLAGS,
        opt(Opt.STRUCTURED_REPLY),
        opt(Opt.LIST),
        meta(Opt.LIST_META_CONTEXT, "disk", "x-cdp:"),
        meta(Opt.SET_META_CONTEXT, "disk", "base:allocation", "x-cdp:a"),
        go("disk", Info.BLOCK_SIZE, Info.NAME, option=Opt.INFO),
        go("disk", Info.BLOCK_SIZE, Info.DESCRIPTION),
        req(Cmd.WRITE, 0, 512, CmdFlag.FUA, 1) + b"w" * 512,
        req(Cmd.READ, 0, 512, 0, 2),
        req(Cmd.BLOCK_STATUS, 0, 4096, CmdFlag.REQ_ONE, 3),
        req(Cmd.WRITE_ZEROES, 512, 512, CmdFlag.NO_HOLE, 4),
        req(Cmd.TRIM, 0, 1024, 0, 5),
        req(Cmd.FLUSH, 0, 0, 0, 6),
        req(Cmd.CACHE, 0, 4096, 0, 7),
        req(Cmd.DISC),
    ]


# ---------------------------------------------------------------------------- iSCSI

ISCSI_SIZE = 1 << 16


def iscsi_portal() -> object:
    """A portal with a writable LUN and a CHAP-protected read-only one."""
    from cdp.targets.iscsi.core import Portal
    from cdp.targets.testing.memdev import MemoryProvider

    p = MemoryProvider()
    p.add("vol0", ISCSI_SIZE)
    p.add("vol0@@5", ISCSI_SIZE, read_only=True)
    return Portal(p, {"vol0@@5": {"user": "u", "secret": "0123456789ab"}})


def iscsi_drive(pieces: list[bytes]) -> None:
    """Feed *pieces* as an initiator's byte stream; commands run like the server runs
    them; only the iSCSI ProtocolError may escape the core (swallowed here)."""
    from cdp.targets.testing.iscsi_wire import Initiator

    ini = Initiator(iscsi_portal())  # type: ignore[arg-type]
    try:
        for piece in pieces:
            ini.feed(piece)
            if ini.closed:
                break
    except ProtocolError:
        pass


def iscsi_transcript() -> list[bytes]:
    """A valid session as raw PDUs: login, commands of every kind, logout."""
    from cdp.targets.iscsi.pdu import new_pdu
    from cdp.targets.testing.iscsi_wire import Initiator

    ini = Initiator(iscsi_portal())  # type: ignore[arg-type]
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


def pdu_read(data: bytes) -> None:
    """Raw PDU framing: the first byte picks header/data digests."""
    from cdp.targets.iscsi.pdu import PduReader

    r = PduReader(4096)
    if data:
        r.header_digest, r.data_digest = bool(data[0] & 1), bool(data[0] & 2)
    try:
        r.feed(data[1:])
        while r.next() is not None:
            pass
    except ProtocolError:
        pass


# ----------------------------------------------------------------------------- NTFS


def mft_parse(data: bytes) -> None:
    """One MFT record, a chunk of records and the data as a runlist: parsing reports
    damage (``damaged`` / Corruption), nothing else."""
    from cdp.ntfs.record import FileRecord, parse_chunk
    from cdp.ntfs.runlist import decode_runs

    r = FileRecord.from_bytes(data[:1024].ljust(1024, b"\0"), 66)
    if r.damaged is not None and not isinstance(r.damaged, str):
        raise AssertionError(f"damaged is {r.damaged!r}")
    for x in parse_chunk(data * 2, 0, 1024, 512, include_free=True):
        if x.damaged is not None and not isinstance(x.damaged, str):
            raise AssertionError(f"damaged is {x.damaged!r}")
    try:
        for run in decode_runs(data[:64], max_lcn=1 << 20):
            if run.length <= 0 or (run.lcn is not None and not 0 <= run.lcn < 1 << 20):
                raise AssertionError(f"bad run {run}")
    except Corruption:
        pass


def boot_parse(data: bytes) -> None:
    """An NTFS boot sector: parsed or Corruption."""
    from cdp.ntfs.boot import BootSector

    try:
        BootSector.from_bytes(data[:512])
    except Corruption:
        pass


# ------------------------------------------------------------------- files on disk


def journal_read_all(seg: bytes) -> None:
    """Open a journal directory holding *seg* as its one segment, read every record it
    admits, then append and sync: only CdpError may escape."""
    from cdp.journal import CrashSimFS, Journal
    from cdp.journal.segment import scan_segment

    fs = CrashSimFS()
    fs.makedirs("/j")
    fd = fs.open_append("/j/00000000000000000001.seg")
    fs.write(fd, seg)
    fs.fdatasync(fd)
    fs.close(fd)
    fs.fsync_dir("/j")
    try:
        scan_segment(fs, "/j", 1, deep=True)
    except CdpError:
        pass
    try:
        j = Journal.open("/j", fs=fs)
    except CdpError:
        return
    try:
        for rec in j.scan(1):
            if rec.kind in (1, 6) and rec.length:
                j.read_slice(rec.seq, rec.loc, 0, rec.length)
    except CdpError:
        pass
    try:  # the recovered journal keeps working
        j.append_write(0, b"x" * 100)
        j.sync()
    except CdpError:
        pass
    finally:
        j.close()


def map_decode(raw: bytes) -> None:
    from mapengine.errors import MapError
    from mapengine.storage import decode_map

    try:
        decode_map(raw, "fuzz.map")
    except MapError:
        pass


def manifest_decode(raw: bytes) -> None:
    from mapengine.errors import MapError
    from mapengine.storage import decode_manifest

    try:
        decode_manifest(raw, "MANIFEST")
    except MapError:
        pass


def config_parse(raw: bytes) -> None:
    """TOML text through the config loader's two steps: only TOMLDecodeError (which
    ``load_config`` turns into ConfigError) and ConfigError."""
    from cdp.config import parse_config

    try:
        doc = tomllib.loads(raw.decode("utf-8", errors="replace"))
    except tomllib.TOMLDecodeError:
        return
    try:
        parse_config(doc)
    except ConfigError:
        pass


def point_parse(raw: bytes) -> None:
    from cdp.points import parse_point

    try:
        parse_point(raw.decode("utf-8", errors="replace"))
    except PointError:
        pass


def selftest(data: bytes) -> None:
    """A planted bug the runner must find (its own test): a foreign exception for any
    input starting with a byte above 0x7f."""
    if data[:1] and data[0] > 0x7F:
        raise ValueError("planted finding")


#: target name -> the function that takes one input (raises only on a finding)
TARGETS: dict[str, Callable[[bytes], None]] = {
    "nbd": lambda data: nbd_drive(split(data)),
    "iscsi": lambda data: iscsi_drive(split(data)),
    "pdu": pdu_read,
    "mft": mft_parse,
    "boot": boot_parse,
    "journal": journal_read_all,
    "map": map_decode,
    "manifest": manifest_decode,
    "config": config_parse,
    "point": point_parse,
}
#: not a parser: checks that the runner reports findings (``python -m tools.torture``
#: leaves it out unless named)
TARGETS_SELFTEST = {"selftest": selftest}


def preload() -> None:
    """Import every module the drivers use (the fuzz runner does it inside atheris's
    instrumentation, so their code reports coverage)."""
    import importlib

    for m in ("cdp.targets.testing.memdev", "cdp.targets.nbd.core", "cdp.targets.nbd.proto",
              "cdp.targets.testing.nbd_wire", "cdp.targets.iscsi.core",
              "cdp.targets.iscsi.pdu", "cdp.targets.iscsi.login", "cdp.targets.iscsi.scsi",
              "cdp.targets.iscsi.sbc", "cdp.targets.iscsi.spc", "cdp.targets.iscsi.pr",
              "cdp.targets.testing.iscsi_wire", "cdp.ntfs",
              "cdp.ntfs.runlist", "cdp.ntfs.boot", "cdp.journal", "cdp.journal.segment",
              "mapengine.storage", "cdp.config", "cdp.points"):
        importlib.import_module(m)


def generated_seeds() -> dict[str, list[bytes]]:
    """The seeds built from code (the protocol sessions, an MFT record, a boot sector),
    as ``--write-seeds`` stores them."""
    nbd = b"".join(nbd_messages())
    isc = b"".join(iscsi_transcript())
    pdus = iscsi_transcript()
    return {
        "nbd": [bytes([0, 0]) + nbd, bytes([1, 0]) + nbd, bytes([2, 7]) + nbd],
        "iscsi": [bytes([0, 0]) + isc, bytes([2, 13]) + isc],
        "pdu": [bytes([0]) + p for p in pdus[:4]] + [bytes([0]) + b"".join(pdus[2:6])],
    }
