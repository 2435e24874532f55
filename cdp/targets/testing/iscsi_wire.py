"""A minimal in-process iSCSI initiator that drives a :class:`Connection` without
sockets (unit tests, fuzzing). SCSI commands run synchronously: the devices used with
it (``MemoryDevice``) never suspend."""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Awaitable, Iterable
from dataclasses import dataclass
from typing import Any

from cdp.targets.iscsi.command import ScsiResult
from cdp.targets.iscsi.core import Closed, Connection, Portal, ScsiCommand
from cdp.targets.iscsi.pdu import (
    F_CONTINUE,
    F_FINAL,
    F_IMMEDIATE,
    F_READ,
    F_TRANSIT,
    F_WRITE,
    RESERVED_TAG,
    Op,
    Pdu,
    PduReader,
    build_text,
    decode_binary,
    encode_binary,
    new_pdu,
    parse_text,
)
from cdp.targets.iscsi.scsi import no_lun


def run_sync(aw: Awaitable[Any]) -> Any:
    """Result of an awaitable that completes without suspending."""

    async def _wrap() -> Any:
        return await aw

    coro = _wrap()
    try:
        coro.send(None)
    except StopIteration as e:
        return e.value
    coro.close()
    raise RuntimeError("awaitable suspended")


@dataclass
class ScsiReply:
    status: int
    data: bytes
    sense: bytes
    flags: int
    residual: int
    pdus: list[Pdu]


class Initiator:
    """Builds initiator PDUs, feeds them to a Connection and parses the replies."""

    def __init__(self, portal: Portal, name: str = "iqn.2026-11.test:initiator",
                 isid: bytes = b"\x80\x12\x34\x56\x78\x01") -> None:
        self.portal = portal
        self.conn = Connection(portal, "test")
        self.name = name
        self.isid = isid
        self.cmdsn = 1
        self.itt = 0x10
        self.expstatsn = 0
        self.reader = PduReader(1 << 24)
        self.closed = False
        self.header_digest = False
        self.data_digest = False
        self.tsih = 0

    # --- plumbing ---------------------------------------------------------------------
    def next_itt(self) -> int:
        self.itt += 1
        return self.itt

    def feed(self, raw: bytes) -> list[Pdu]:
        """Send raw bytes; run any commands; return every PDU the target sent."""
        events = self.conn.receive_data(raw)
        self._run(events)
        return self.collect()

    def _run(self, events: Iterable[object]) -> None:
        for ev in events:
            if isinstance(ev, ScsiCommand):
                task = ev.task
                lu = task.lu
                res: ScsiResult | Awaitable[ScsiResult] = (
                    lu.execute(task.request) if lu is not None else no_lun(task.request)
                )
                if inspect.isawaitable(res):
                    res = run_sync(res)
                assert isinstance(res, ScsiResult)
                self.conn.complete(task, res)
            elif isinstance(ev, Closed):
                self.closed = True

    def collect(self) -> list[Pdu]:
        out = b"".join(bytes(x) for x in self.conn.data_to_send())
        self.reader.feed(out)
        pdus = []
        while True:
            p = self.reader.next()
            if p is None:
                break
            pdus.append(p)
            stat = p.opcode not in (Op.DATA_IN, Op.R2T) or p.flags & 0x01
            if stat and (p.opcode != Op.NOP_IN or p.itt != RESERVED_TAG):
                self.expstatsn = (p.u32(24) + 1) & 0xFFFFFFFF
        return pdus

    def send(self, p: Pdu) -> list[Pdu]:
        return self.feed(p.encode(self.header_digest, self.data_digest))

    def _cmd(self, op: int, flags: int, immediate: bool = False, data: bytes = b"",
             advance: bool = True) -> Pdu:
        p = new_pdu(op | (F_IMMEDIATE if immediate else 0), flags, self.next_itt(), data)
        p.set(24, 4, self.cmdsn)
        p.set(28, 4, self.expstatsn)
        if advance and not immediate:
            self.cmdsn = (self.cmdsn + 1) & 0xFFFFFFFF
        return p

    # --- login -----------------------------------------------------------------------------
    def login_pdu(self, csg: int, nsg: int, transit: bool, keys: list[tuple[str, str]],
                  cont: bool = False) -> Pdu:
        flags = (F_TRANSIT if transit else 0) | (F_CONTINUE if cont else 0) | (csg << 2)
        flags |= nsg if transit else 0
        p = new_pdu(Op.LOGIN_REQ | F_IMMEDIATE, flags, self.itt, build_text(keys))
        p.bhs[8:14] = self.isid
        p.set(14, 2, self.tsih)
        p.set(20, 2, 1)
        p.set(24, 4, self.cmdsn)
        p.set(28, 4, self.expstatsn)
        return p

    def login(self, target: str | None = "iqn.2026-11.io.cdp:vol0", *,
              chap: tuple[str, str] | None = None,
              mutual: tuple[str, str] | None = None,
              operational: list[tuple[str, str]] | None = None) -> Pdu:
        """Full login to full feature phase; returns the last Login Response."""
        first = [("InitiatorName", self.name)]
        if target is None:
            first.append(("SessionType", "Discovery"))
        else:
            first += [("TargetName", target), ("SessionType", "Normal")]
        rsp: Pdu
        if chap is None:
            rsp = self._login_step(0, 1, True, [*first, ("AuthMethod", "None")])
        else:
            rsp = self._login_step(0, 1, False, [*first, ("AuthMethod", "CHAP,None")])
            if self.status(rsp):
                return rsp
            rsp = self._login_step(0, 1, False, [("CHAP_A", "5")])
            if self.status(rsp):
                return rsp
            keys = dict(parse_text(rsp.data))
            ident = int(keys["CHAP_I"])
            challenge = decode_binary(keys["CHAP_C"])
            answer = hashlib.md5(bytes([ident]) + chap[1].encode() + challenge).digest()
            step = [("CHAP_N", chap[0]), ("CHAP_R", encode_binary(answer))]
            my_challenge = bytes(range(100, 116))
            if mutual is not None:
                step += [("CHAP_I", "7"), ("CHAP_C", encode_binary(my_challenge))]
            rsp = self._login_step(0, 1, True, step)
            if self.status(rsp):
                return rsp
            if mutual is not None:
                keys = dict(parse_text(rsp.data))
                want = hashlib.md5(bytes([7]) + mutual[1].encode() + my_challenge).digest()
                if keys.get("CHAP_N") != mutual[0] or decode_binary(keys["CHAP_R"]) != want:
                    raise AssertionError("target failed mutual CHAP")
        if self.status(rsp):
            return rsp
        ops = operational if operational is not None else [
            ("HeaderDigest", "None"), ("DataDigest", "None"),
            ("MaxRecvDataSegmentLength", "262144"), ("InitialR2T", "No"),
            ("ImmediateData", "Yes"), ("MaxBurstLength", "262144"),
            ("FirstBurstLength", "65536"), ("MaxOutstandingR2T", "1"),
            ("ErrorRecoveryLevel", "0"),
        ]
        if target is None and operational is None:
            ops = [kv for kv in ops if kv[0] in ("HeaderDigest", "DataDigest",
                                                 "MaxRecvDataSegmentLength")]
        rsp = self._login_step(1, 3, True, ops)
        if not self.status(rsp):
            self.tsih = rsp.u16(14)
            keys = dict(parse_text(rsp.data))
            self.header_digest = keys.get("HeaderDigest") == "CRC32C"
            self.data_digest = keys.get("DataDigest") == "CRC32C"
            self.reader.header_digest = self.header_digest
            self.reader.data_digest = self.data_digest
        return rsp

    def _login_step(self, csg: int, nsg: int, transit: bool,
                    keys: list[tuple[str, str]]) -> Pdu:
        pdus = self.send(self.login_pdu(csg, nsg, transit, keys))
        assert len(pdus) == 1 and pdus[0].opcode == Op.LOGIN_RSP, pdus
        return pdus[0]

    @staticmethod
    def status(login_rsp: Pdu) -> int:
        return (login_rsp.bhs[36] << 8) | login_rsp.bhs[37]

    # --- full feature phase ----------------------------------------------------------------
    def scsi(self, cdb: bytes, data: bytes = b"", *, edtl: int | None = None,
             read: bool | None = None, write: bool | None = None, lun: int = 0,
             immediate_len: int | None = None) -> ScsiReply:
        """One SCSI command with its data (immediate data, then R2T/Data-Out)."""
        if edtl is None:
            edtl = len(data) if data else 0
        write = bool(data) if write is None else write
        read = (not write) if read is None else read
        cdb16 = cdb.ljust(16, b"\0")
        imm = data[: immediate_len if immediate_len is not None else 65536]
        flags = F_FINAL | (F_READ if read else 0) | (F_WRITE if write else 0) | 0x01
        p = self._cmd(Op.SCSI_CMD, flags, data=imm)
        p.set(8, 8, lun << 48)
        p.set(20, 4, edtl)
        p.bhs[32:48] = cdb16
        itt = p.itt
        pdus = self.send(p)
        all_pdus = list(pdus)
        while True:
            r2ts = [x for x in pdus if x.opcode == Op.R2T and x.itt == itt]
            if not r2ts:
                break
            pdus = []
            for r2t in r2ts:
                off, ln, ttt = r2t.u32(40), r2t.u32(44), r2t.u32(20)
                d = new_pdu(Op.DATA_OUT, F_FINAL, itt, data[off : off + ln])
                d.set(8, 8, lun << 48)
                d.set(20, 4, ttt)
                d.set(28, 4, self.expstatsn)
                d.set(40, 4, off)
                pdus += self.send(d)
            all_pdus += pdus
        return self.reply(itt, all_pdus)

    @staticmethod
    def reply(itt: int, pdus: list[Pdu]) -> ScsiReply:
        data = b""
        status, sense, flags, residual = -1, b"", 0, 0
        for x in pdus:
            if x.itt != itt:
                continue
            if x.opcode == Op.DATA_IN:
                data += x.data
                if x.flags & 0x01:
                    status, flags, residual = x.bhs[3], x.flags, x.u32(44)
            elif x.opcode == Op.SCSI_RSP:
                status, flags, residual = x.bhs[3], x.flags, x.u32(44)
                if x.data:
                    n = int.from_bytes(x.data[:2], "big")
                    sense = x.data[2 : 2 + n]
        return ScsiReply(status, data, sense, flags, residual, pdus)

    def nop(self, data: bytes = b"", immediate: bool = True) -> list[Pdu]:
        p = self._cmd(Op.NOP_OUT, F_FINAL, immediate=immediate, data=data)
        p.set(20, 4, RESERVED_TAG)
        return self.send(p)

    def text(self, keys: list[tuple[str, str]]) -> list[Pdu]:
        p = self._cmd(Op.TEXT_REQ, F_FINAL, data=build_text(keys))
        p.set(20, 4, RESERVED_TAG)
        return self.send(p)

    def tmf(self, function: int, rtt: int = RESERVED_TAG, lun: int = 0,
            refcmdsn: int = 0) -> list[Pdu]:
        p = self._cmd(Op.TASK_MGMT_REQ, F_FINAL | function, immediate=True)
        p.set(8, 8, lun << 48)
        p.set(20, 4, rtt)
        p.set(32, 4, refcmdsn)
        return self.send(p)

    def logout(self, reason: int = 0) -> list[Pdu]:
        p = self._cmd(Op.LOGOUT_REQ, F_FINAL | reason, immediate=True)
        p.set(20, 2, 1)
        return self.send(p)
