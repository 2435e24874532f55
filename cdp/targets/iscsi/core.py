"""Sans-I/O iSCSI target (RFC 7143): bytes in, events out; completions in, bytes out.

Design notes
------------
- h11 style. One :class:`Portal` holds what all connections share (the export provider,
  CHAP settings, sessions, per-export SCSI state). Per TCP connection make a
  :class:`Connection`; feed socket bytes to :meth:`Connection.receive_data`, which
  returns events: :class:`ScsiCommand` (a command with all of its Data-Out, for the
  caller to run with ``event.task.lu.execute(event.task.request)``, answered with
  :meth:`Connection.complete`) and :class:`Closed` (login failed, logout done, session
  reinstated: send what is queued, then close). Send :meth:`Connection.data_to_send`
  after every call.
- Login PDUs (stages, Continue, ISID, responses), discovery (SendTargets), NOP, Text,
  Logout, Task Management, R2T / Data-Out reassembly, Data-In segmentation with
  phase-collapsed status, residuals and the CmdSN window are all handled here. The keys
  of a login (initiator and target, operational negotiation, CHAP one-way and mutual)
  are answered by :class:`~cdp.targets.iscsi.login.Login`; the moves stay here. The
  only device I/O happens in the caller.
- Connection states live in :data:`TRANSITIONS`; a move not in it goes to ERROR (the
  CHAP exchange has its own table, :data:`~cdp.targets.iscsi.login.AUTH_TRANSITIONS`). Peer
  bytes either parse or raise :class:`~cdp.targets.iscsi.pdu.IscsiProtocolError` (a
  :class:`cdp.errors.ProtocolError`; fuzz tested). Recoverable faults are answered in
  place with the RFC's Reject (data digest error, unsupported opcode, SNACK at
  ErrorRecoveryLevel 0, a login PDU in full feature phase, bad Data-Out sequence);
  framing faults (header digest, oversized data segment after a Reject) close it,
  as RFC 7143 allows at ErrorRecoveryLevel 0.
- CmdSN: non-immediate commands outside [ExpCmdSN, MaxCmdSN] are silently ignored
  (§4.2.2.1); the window is :data:`QUEUE_DEPTH` commands. One connection per session
  (MaxConnections=1); a new login with the same initiator, ISID and target reinstates
  the session (the old connection is closed through ``Portal.on_kill``).
- Writes: immediate data and unsolicited Data-Out up to FirstBurstLength, then R2Ts of
  MaxBurstLength, MaxOutstandingR2T at a time. A Data-Out with a wrong DataSN,
  offset or Target Transfer Tag is rejected and dropped; the command then waits for
  the initiator's timeout and ABORT TASK (ERL 0 has no retransmission).
- Hot path: one ``struct.unpack_from`` per command header, Data-In headers packed with
  one ``struct.pack``; a READ's data goes out in MaxRecvDataSegmentLength pieces with
  the status in the last one.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum, auto
from typing import Final

from cdp.targets.blockdev import ExportProvider
from cdp.targets.iscsi import naming
from cdp.targets.iscsi.command import BLOCK, ScsiRequest, ScsiResult
from cdp.targets.iscsi.login import (
    FULL_FEATURE,
    OPERATIONAL,
    OUR_MRDSL,
    SECURITY,
    ChapConfig,
    Login,
    Params,
    parse_number,
)
from cdp.targets.iscsi.pdu import (
    BHS_LEN,
    F_CONTINUE,
    F_FINAL,
    F_OVERFLOW,
    F_READ,
    F_STATUS,
    F_TRANSIT,
    F_UNDERFLOW,
    F_WRITE,
    RESERVED_TAG,
    IscsiProtocolError,
    LoginStatus,
    Op,
    Pdu,
    PduReader,
    RejectReason,
    TmfFunction,
    TmfResponse,
    build_text,
    decode_lun,
    new_pdu,
    pad4,
    parse_text,
)
from cdp.targets.iscsi.pdu import digest_bytes as _digest
from cdp.targets.iscsi.pr import LuState
from cdp.targets.iscsi.sbc import MAX_XFER_BLOCKS
from cdp.targets.iscsi.scsi import LogicalUnit
from cdp.targets.iscsi.sense import Status, illegal

QUEUE_DEPTH: Final = 128
#: the data-out a command may announce (EDTL) beyond the LUN's capacity: COMPARE AND
#: WRITE's maximum (twice the Block Limits transfer) plus a parameter list. Initiators
#: do send writes larger than the advertised maximum transfer (libiscsi does), so the
#: bound is the LUN; memory follows the data that actually arrives.
MAX_WRITE_EDTL: Final = 2 * MAX_XFER_BLOCKS * BLOCK + (1 << 16)
LOGIN_MAX_DATA: Final = 65536

_CMD_HDR = struct.Struct(">BBBBIQIIII16s")
_DATA_IN = struct.Struct(">BBBBIQIIIIIIII")
_RSP = struct.Struct(">BBBBIQIIIIIIII")


# --- states ---------------------------------------------------------------------------------
class State(Enum):
    FREE = auto()  # nothing received yet
    SECURITY = auto()
    OPERATIONAL = auto()
    FULL = auto()  # full feature phase
    CLOSED = auto()  # login failed, logged out, killed, connection lost
    ERROR = auto()  # protocol violation


class Ev(Enum):
    START_SECURITY = auto()
    START_OPERATIONAL = auto()
    TO_OPERATIONAL = auto()
    TO_FULL = auto()
    LOGIN_FAILED = auto()
    LOGOUT = auto()
    KILL = auto()
    LOST = auto()


#: every state change of a connection; anything else -> ERROR
TRANSITIONS: Final[dict[tuple[State, Ev], State]] = {
    (State.FREE, Ev.START_SECURITY): State.SECURITY,
    (State.FREE, Ev.START_OPERATIONAL): State.OPERATIONAL,
    (State.FREE, Ev.LOGIN_FAILED): State.CLOSED,
    (State.FREE, Ev.LOST): State.CLOSED,
    (State.SECURITY, Ev.TO_OPERATIONAL): State.OPERATIONAL,
    (State.SECURITY, Ev.TO_FULL): State.FULL,
    (State.SECURITY, Ev.LOGIN_FAILED): State.CLOSED,
    (State.SECURITY, Ev.LOST): State.CLOSED,
    (State.OPERATIONAL, Ev.TO_FULL): State.FULL,
    (State.OPERATIONAL, Ev.LOGIN_FAILED): State.CLOSED,
    (State.OPERATIONAL, Ev.LOST): State.CLOSED,
    (State.FULL, Ev.LOGOUT): State.CLOSED,
    (State.FULL, Ev.KILL): State.CLOSED,
    (State.FULL, Ev.LOST): State.CLOSED,
    (State.CLOSED, Ev.LOST): State.CLOSED,
    (State.CLOSED, Ev.KILL): State.CLOSED,
    (State.ERROR, Ev.LOST): State.ERROR,
    (State.ERROR, Ev.KILL): State.ERROR,
}


# --- events -----------------------------------------------------------------------------------
@dataclass(slots=True)
class ScsiCommand:
    """Run ``task.request`` on ``task.lu`` (None: no such LUN, use ``scsi.no_lun``) and
    answer with ``Connection.complete(task, result)``."""

    task: Task


@dataclass(slots=True)
class Closed:
    """Send what is queued, then close the connection."""

    reason: str


Event = ScsiCommand | Closed


# --- sessions and tasks -----------------------------------------------------------------------
def _sn_lt(a: int, b: int) -> bool:
    """RFC 1982 serial number a < b (32 bits)."""
    return a != b and ((b - a) & 0xFFFFFFFF) < 0x80000000


class Session:
    """One iSCSI session (one connection: MaxConnections=1)."""

    def __init__(self, portal: Portal, tsih: int, isid: bytes, initiator: str, kind: str,
                 target: str, lu: LogicalUnit | None) -> None:
        self.portal = portal
        self.tsih = tsih
        self.isid = isid
        self.initiator = initiator
        self.kind = kind
        self.target = target
        self.lu = lu
        self.nexus = f"{initiator},i,0x{isid.hex()}"
        self.exp_cmdsn = 0
        self.connection: Connection | None = None
        self.ended = False

    @property
    def max_cmdsn(self) -> int:
        return (self.exp_cmdsn + QUEUE_DEPTH - 1) & 0xFFFFFFFF

    def end(self) -> None:
        """Session over (logout, connection loss, reinstatement): release nexus state."""
        if self.ended:
            return
        self.ended = True
        self.portal.sessions.pop(self.tsih, None)
        if self.lu is not None:
            self.lu.state.release_nexus(self.nexus)
            try:
                self.lu.device.close()
            except Exception:  # a close that fails must not take the target down
                pass


class Portal:
    """What every connection shares: exports, CHAP, sessions and per-export SCSI state.

    ``targets`` maps a target IQN, an export name or a volume name (covering its
    point-in-time views), ``"*"`` (every target) or ``"discovery"`` (discovery sessions)
    to CHAP settings (:class:`ChapConfig` or a mapping with ``user``, ``secret`` and
    optionally ``mutual_user``, ``mutual_secret``).
    """

    def __init__(
        self,
        provider: ExportProvider,
        targets: Mapping[str, ChapConfig | Mapping[str, str]] | None = None,
        *,
        address: str = "127.0.0.1:3260",
        tpgt: int = 1,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.provider = provider
        self.chap = {k.lower(): ChapConfig.from_mapping(v) for k, v in (targets or {}).items()}
        self.address = address
        self.tpgt = tpgt
        self.random = random
        self.sessions: dict[int, Session] = {}
        self.lu_states: dict[str, LuState] = {}
        self.next_tsih = 1
        self.next_ttt = 1
        #: called with a connection the core wants closed (session reinstatement)
        self.on_kill: Callable[[Connection], None] | None = None

    def chap_for(self, iqn: str, export: str | None) -> ChapConfig | None:
        """CHAP settings of a target (``export`` None: the discovery session)."""
        chap = self.chap
        if export is None:
            return chap.get("discovery")
        vol = export.partition("@")[0]
        for key in (iqn.lower(), export.lower(), vol.lower(), "*"):
            if key in chap:
                return chap[key]
        return None

    def exports(self) -> list[str]:
        return [name for name, _ in self.provider.list_exports() if name]

    def alloc_tsih(self) -> int:
        while True:
            t = self.next_tsih
            self.next_tsih = self.next_tsih % 0xFFFF + 1
            if t not in self.sessions:
                return t

    def alloc_ttt(self) -> int:
        t = self.next_ttt
        self.next_ttt = self.next_ttt % 0xFFFFFFFE + 1
        return t


class Task:
    """One SCSI command from arrival to response."""

    __slots__ = ("aborted", "buf", "bursts", "cmdsn", "dispatched", "edtl", "itt", "lu",
                 "lun", "lun_raw", "next_r2t", "r2tsn", "read", "received", "request",
                 "unsol_datasn", "unsol_end", "write")

    def __init__(self, itt: int, lun_raw: int, cdb: bytes, edtl: int, read: bool,
                 write: bool, cmdsn: int, lu: LogicalUnit | None, nexus: str) -> None:
        self.itt = itt
        self.lun_raw = lun_raw
        self.lun = decode_lun(lun_raw)
        self.edtl = edtl
        self.read = read
        self.write = write
        self.cmdsn = cmdsn
        self.lu = lu
        self.request = ScsiRequest(cdb, b"", edtl, nexus, read, write)
        self.buf: bytearray | None = None
        self.received = 0
        self.unsol_end = 0
        self.unsol_datasn = 0
        self.next_r2t = 0
        self.r2tsn = 0
        self.bursts: dict[int, list[int]] = {}  # ttt -> [offset, length, next_datasn, got]
        self.dispatched = False
        self.aborted = False


@dataclass(slots=True)
class _PendingTmf:
    itt: int
    waiting: set[int] = field(default_factory=set)
    response: int = TmfResponse.COMPLETE


# --- the connection -------------------------------------------------------------------------
class Connection:
    """One TCP connection's protocol state (login, then full feature phase)."""

    def __init__(self, portal: Portal, peer: str = "") -> None:
        self.portal = portal
        self.peer = peer
        #: "host:port" this connection reached us on, for SendTargets
        self.address = portal.address
        self.state = State.FREE
        self.reader = PduReader(LOGIN_MAX_DATA)
        self.login = Login(portal)
        self.params: Params = self.login.params
        self.session: Session | None = None
        self.statsn = 0
        self.tasks: dict[int, Task] = {}
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._hd = False
        self._dd = False
        self._login_text = b""  # a login request's data across Continue PDUs
        # full feature
        self._text_parts: list[bytes] = []
        self._text_ttt = RESERVED_TAG
        self._text_in = b""
        self._tmfs: list[_PendingTmf] = []
        self._done_itts: dict[int, None] = {}  # recently answered tasks, for ABORT TASK
        self.ping_ttt: int | None = None

    # --- public API -----------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.state in (State.CLOSED, State.ERROR)

    def receive_data(self, data: bytes | bytearray | memoryview) -> list[Event]:
        """Feed peer bytes; returns the events they complete. Raises IscsiProtocolError
        (after queuing any Reject) when the connection must close."""
        if self.state is State.ERROR:
            raise IscsiProtocolError("connection already failed")
        if self.state is State.CLOSED:
            return []
        reader = self.reader
        reader.feed(data)
        while not self.closed:
            try:
                pdu = reader.next()
                if pdu is None:
                    break
                self._dispatch(pdu)
            except IscsiProtocolError as e:
                if e.reject is not None and self.state is State.FULL:
                    self._reject(e.reject, e.pdu)
                    continue
                if e.pdu and self.state is State.FULL:
                    self._reject(RejectReason.PROTOCOL_ERROR, e.pdu)
                self.state = State.ERROR
                self._abort_all()
                self._end_session()
                raise
        events, self._events = self._events, []
        return events

    def data_to_send(self) -> list[bytes]:
        """Queued output pieces (for ``writelines``); clears the queue."""
        out, self._out = self._out, []
        return out

    def connection_lost(self) -> None:
        """The transport is gone: the session ends (nexus loss)."""
        self._move(Ev.LOST)
        self._abort_all()
        self._end_session()
        if self.login.device is not None:
            self._close_device()

    def kill(self) -> None:
        """Close this connection from our side (session reinstated elsewhere)."""
        self._move(Ev.KILL)
        self._abort_all()
        self._end_session()
        self._events.append(Closed("session reinstated"))

    def ping(self) -> None:
        """Queue a target NOP-In ping (answered by the initiator's NOP-Out)."""
        if self.state is not State.FULL or self.ping_ttt is not None:
            return
        ttt = self.portal.alloc_ttt()
        self.ping_ttt = ttt
        p = new_pdu(Op.NOP_IN, F_FINAL, RESERVED_TAG)
        p.set(20, 4, ttt)
        self._stamp(p, advance=False)
        self._send(p)

    def complete(self, task: Task, result: ScsiResult) -> None:
        """Answer a :class:`ScsiCommand` (Data-In and/or SCSI Response)."""
        if self.tasks.get(task.itt) is task:
            del self.tasks[task.itt]
        done = self._done_itts
        done[task.itt] = None
        if len(done) > 256:
            del done[next(iter(done))]
        if task.aborted or self.closed:
            self._tmf_task_gone(task.itt)
            return
        session = self.session
        assert session is not None
        edtl = task.edtl
        data = result.data
        status = result.status
        # residuals
        if result.spdtl is not None:
            natural = result.spdtl
        elif task.read or data:
            natural = len(data)
        else:
            natural = edtl
        flags = 0
        residual = 0
        if natural > edtl:
            flags, residual = F_OVERFLOW, natural - edtl
        elif natural < edtl and (task.read or result.spdtl is not None):
            flags, residual = F_UNDERFLOW, edtl - natural
        send = data if task.read else b""
        if len(send) > edtl:
            send = send[:edtl]
        exp, mx = session.exp_cmdsn, session.max_cmdsn
        if send:
            mrdsl = self.params.peer_mrdsl
            n = len(send)
            collapse = status == 0 and not result.sense
            pos = 0
            datasn = 0
            lun = task.lun_raw
            itt = task.itt
            mv = memoryview(send)
            while pos < n:
                chunk = min(mrdsl, n - pos)
                last = pos + chunk >= n
                f = 0
                st = 0
                sn = 0
                if last:
                    f = F_FINAL
                    if collapse:
                        f |= F_STATUS | flags
                        st = status
                        sn = self.statsn
                        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
                hdr = _DATA_IN.pack(
                    0x25, f, 0, st, chunk, lun, itt, RESERVED_TAG, sn, exp, mx, datasn, pos,
                    residual if (last and collapse) else 0,
                )
                self._emit(hdr, mv[pos : pos + chunk])
                pos += chunk
                datasn += 1
            if collapse:
                return
            expdatasn = datasn
        else:
            expdatasn = 0
        self._scsi_response(task.itt, status, result.sense, flags, residual, expdatasn)

    # --- output helpers --------------------------------------------------------------------
    def _emit(self, hdr: bytes, data: bytes | memoryview = b"") -> None:
        """Queue a 48-byte header (DataSegmentLength already set) and its data."""
        out = self._out
        if self._hd:
            out.append(hdr)
            out.append(_digest(hdr))
        else:
            out.append(hdr)
        n = len(data)
        if n:
            pad = pad4(n)
            if self._dd:
                padded = bytes(data) + b"\0" * pad
                out.append(padded)
                out.append(_digest(padded))
            else:
                out.append(data)  # type: ignore[arg-type]
                if pad:
                    out.append(b"\0" * pad)

    def _send(self, p: Pdu) -> None:
        self._out.append(p.encode(self._hd, self._dd))

    def _stamp(self, p: Pdu, advance: bool = True) -> None:
        """StatSN, ExpCmdSN, MaxCmdSN into a response header."""
        p.set(24, 4, self.statsn)
        if advance:
            self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        s = self.session
        if s is not None:
            p.set(28, 4, s.exp_cmdsn)
            p.set(32, 4, s.max_cmdsn)

    def _scsi_response(self, itt: int, status: int, sense: bytes, flags: int, residual: int,
                       expdatasn: int) -> None:
        s = self.session
        assert s is not None
        data = (len(sense).to_bytes(2, "big") + sense) if sense else b""
        sn = self.statsn
        self.statsn = (sn + 1) & 0xFFFFFFFF
        hdr = _RSP.pack(0x21, F_FINAL | flags, 0, status, len(data), 0, itt, 0, sn,
                        s.exp_cmdsn, s.max_cmdsn, expdatasn, 0, residual)
        self._emit(hdr, data)

    def _reject(self, reason: int, bhs: bytes | bytearray) -> None:
        p = new_pdu(Op.REJECT, F_FINAL, RESERVED_TAG, bytes(bhs[:BHS_LEN]))
        p.bhs[2] = reason
        self._stamp(p)
        self._send(p)

    def _move(self, ev: Ev) -> None:
        self.state = TRANSITIONS.get((self.state, ev), State.ERROR)

    # --- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, pdu: Pdu) -> None:
        op = pdu.opcode
        if self.state is not State.FULL:
            if op != Op.LOGIN_REQ:
                raise IscsiProtocolError(f"opcode {op:#x} before login completed")
            self._on_login(pdu)
            return
        if op == Op.SCSI_CMD:
            self._on_scsi_cmd(pdu)
        elif op == Op.DATA_OUT:
            self._on_data_out(pdu)
        elif op == Op.NOP_OUT:
            self._on_nop_out(pdu)
        elif op == Op.TASK_MGMT_REQ:
            self._on_tmf(pdu)
        elif op == Op.TEXT_REQ:
            self._on_text(pdu)
        elif op == Op.LOGOUT_REQ:
            self._on_logout(pdu)
        elif op == Op.SNACK:
            self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)  # ERL 0: no SNACK
        elif op == Op.LOGIN_REQ or op & 0x20:
            self._reject(RejectReason.PROTOCOL_ERROR, pdu.bhs)
        else:
            self._reject(RejectReason.COMMAND_NOT_SUPPORTED, pdu.bhs)

    def _accept_cmdsn(self, pdu: Pdu) -> bool:
        """CmdSN window check (§4.2.2.1); advances ExpCmdSN for accepted commands."""
        if pdu.immediate:
            return True
        s = self.session
        assert s is not None
        cmdsn = pdu.u32(24)
        if _sn_lt(cmdsn, s.exp_cmdsn) or _sn_lt(s.max_cmdsn, cmdsn):
            return False
        s.exp_cmdsn = (cmdsn + 1) & 0xFFFFFFFF
        return True

    # --- SCSI commands ---------------------------------------------------------------------------
    def _on_scsi_cmd(self, pdu: Pdu) -> None:
        (_, flags, _, _, _, lun_raw, itt, edtl, cmdsn, _, cdb) = _CMD_HDR.unpack_from(pdu.bhs)
        if not self._accept_cmdsn(pdu):
            return
        if pdu.ahs:
            cdb = self._extended_cdb(pdu, cdb)
        if itt in self.tasks or itt == RESERVED_TAG:
            self._reject(RejectReason.TASK_IN_PROGRESS if itt != RESERVED_TAG
                         else RejectReason.INVALID_PDU_FIELD, pdu.bhs)
            return
        s = self.session
        assert s is not None
        read = bool(flags & F_READ)
        write = bool(flags & F_WRITE)
        lun = decode_lun(lun_raw)
        lu = s.lu if lun == 0 else None
        task = Task(itt, lun_raw, bytes(cdb), edtl, read, write, cmdsn, lu, s.nexus)
        self.tasks[itt] = task
        imm = pdu.data
        if not imm and not (write and edtl):
            self._run(task)
            return
        p = self.params
        if len(imm) > edtl or len(imm) > p.first_burst or (not p.immediate_data and imm):
            del self.tasks[itt]
            raise IscsiProtocolError("immediate data beyond EDTL or FirstBurstLength",
                                     RejectReason.PROTOCOL_ERROR, bytes(pdu.bhs))
        if edtl > MAX_WRITE_EDTL + (lu.blocks * BLOCK if lu else 0):
            # more than the LUN holds: no command can carry it, so never buffer it
            del self.tasks[itt]
            sense = illegal(field=0).sense
            self._scsi_response(itt, Status.CHECK_CONDITION,
                                sense.descriptor() if lu and lu.state.d_sense else sense.fixed(),
                                0, 0, 0)
            return
        # grows with the data that arrives (never sized by the initiator's EDTL alone)
        task.buf = bytearray(imm)
        task.received = len(imm)
        if not p.initial_r2t and not (flags & F_FINAL):
            task.unsol_end = min(p.first_burst, edtl)
        else:
            task.unsol_end = len(imm)
        task.next_r2t = task.unsol_end
        if task.received >= edtl:
            self._run(task)
            return
        self._issue_r2ts(task)

    def _extended_cdb(self, pdu: Pdu, cdb: bytes) -> bytes:
        ahs = pdu.ahs
        if len(ahs) >= 4 and ahs[2] == 1:  # extended CDB AHS
            ln = int.from_bytes(ahs[0:2], "big") - 1
            return cdb + ahs[4 : 4 + ln]
        return cdb

    def _run(self, task: Task) -> None:
        if task.buf is not None:
            if len(task.buf) < task.edtl:
                task.buf.extend(bytes(task.edtl - len(task.buf)))
            task.request.data = bytes(task.buf)
            task.buf = None
        task.dispatched = True
        self._events.append(ScsiCommand(task))

    def _issue_r2ts(self, task: Task) -> None:
        p = self.params
        s = self.session
        assert s is not None
        while len(task.bursts) < p.max_r2t and task.next_r2t < task.edtl:
            length = min(p.max_burst, task.edtl - task.next_r2t)
            ttt = self.portal.alloc_ttt()
            task.bursts[ttt] = [task.next_r2t, length, 0, 0]
            r = new_pdu(Op.R2T, F_FINAL, task.itt)
            r.set(8, 8, task.lun_raw)
            r.set(20, 4, ttt)
            self._stamp(r, advance=False)
            r.set(36, 4, task.r2tsn)
            r.set(40, 4, task.next_r2t)
            r.set(44, 4, length)
            task.r2tsn += 1
            task.next_r2t += length
            self._send(r)

    def _on_data_out(self, pdu: Pdu) -> None:
        bhs = pdu.bhs
        itt = pdu.itt
        task = self.tasks.get(itt)
        if task is None or task.buf is None:
            return  # aborted or unknown task: data is discarded
        ttt = pdu.u32(20)
        datasn = pdu.u32(36)
        offset = pdu.u32(40)
        data = pdu.data
        end = offset + len(data)
        if ttt == RESERVED_TAG:
            if datasn != task.unsol_datasn or end > task.unsol_end:
                raise IscsiProtocolError("bad unsolicited Data-Out",
                                         RejectReason.PROTOCOL_ERROR, bytes(bhs))
            task.unsol_datasn += 1
        else:
            burst = task.bursts.get(ttt)
            if burst is None:
                raise IscsiProtocolError("Data-Out for an unknown transfer tag",
                                         RejectReason.INVALID_PDU_FIELD, bytes(bhs))
            b_off, b_len, b_sn, _ = burst
            if datasn != b_sn or offset < b_off or end > b_off + b_len:
                raise IscsiProtocolError("Data-Out out of sequence (DataSN/offset)",
                                         RejectReason.PROTOCOL_ERROR, bytes(bhs))
            burst[2] += 1
            burst[3] += len(data)
            if pdu.final:
                del task.bursts[ttt]
        buf = task.buf
        if offset > len(buf):  # a later burst first: zeros until the gap is filled
            buf.extend(bytes(offset - len(buf)))
        buf[offset:end] = data
        task.received += len(data)
        if task.received >= task.edtl and not task.bursts:
            self._run(task)
        elif (ttt != RESERVED_TAG and pdu.final) or (ttt == RESERVED_TAG and pdu.final):
            self._issue_r2ts(task)

    # --- NOP / Text / Logout ------------------------------------------------------------------
    def _on_nop_out(self, pdu: Pdu) -> None:
        itt = pdu.itt
        if itt == RESERVED_TAG:
            if pdu.u32(20) == self.ping_ttt:
                self.ping_ttt = None
            return
        if not self._accept_cmdsn(pdu):
            return
        r = new_pdu(Op.NOP_IN, F_FINAL, itt, pdu.data)
        r.set(8, 8, pdu.lun_raw)
        r.set(20, 4, RESERVED_TAG)
        self._stamp(r)
        self._send(r)

    def _on_text(self, pdu: Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        ttt = pdu.u32(20)
        if ttt != RESERVED_TAG and ttt == self._text_ttt and self._text_parts:
            self._send_text_part(pdu.itt)
            return
        self._text_in += pdu.data
        if pdu.flags & F_CONTINUE:
            self._text_ttt = self.portal.alloc_ttt()
            self._text_parts = [b""]
            self._send_text_part(pdu.itt, keep_ttt=True)
            return
        text, self._text_in = self._text_in, b""
        out: list[tuple[str, str]] = []
        for key, value in parse_text(text):
            if key == "SendTargets":
                out.extend(self._send_targets(value))
            elif key == "MaxRecvDataSegmentLength":
                self.params.peer_mrdsl = parse_number(value, 512, 0xFFFFFF)
            else:
                out.append((key, "NotUnderstood"))
        body = build_text(out)
        size = self.params.peer_mrdsl
        self._text_parts = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
        self._text_ttt = self.portal.alloc_ttt() if len(self._text_parts) > 1 else RESERVED_TAG
        self._send_text_part(pdu.itt)

    def _send_text_part(self, itt: int, keep_ttt: bool = False) -> None:
        part = self._text_parts.pop(0)
        more = bool(self._text_parts) or keep_ttt
        r = new_pdu(Op.TEXT_RSP, F_CONTINUE if more else F_FINAL, itt, part)
        r.set(20, 4, self._text_ttt if more else RESERVED_TAG)
        if not more:
            self._text_ttt = RESERVED_TAG
        if keep_ttt:
            self._text_parts = []
        self._stamp(r)
        self._send(r)

    def _send_targets(self, which: str) -> list[tuple[str, str]]:
        s = self.session
        assert s is not None
        if which == "All":
            if s.kind != "Discovery":
                names = [s.target]
            else:
                names = [naming.target_name(e) for e in self.portal.exports()]
        elif which == "":
            names = [s.target] if s.kind == "Normal" else []
        else:
            exp = naming.export_name(which)
            names = [which] if exp is not None and exp in self.portal.exports() else []
        out: list[tuple[str, str]] = []
        for n in names:
            out.append(("TargetName", n))
            out.append(("TargetAddress", f"{self.address},{self.portal.tpgt}"))
        return out

    def _on_logout(self, pdu: Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        reason = pdu.flags & 0x7F
        response = 0
        if reason == 2:
            response = 2  # connection recovery is not supported (ERL 0)
        r = new_pdu(Op.LOGOUT_RSP, F_FINAL, pdu.itt)
        r.bhs[2] = response
        self._stamp(r)
        self._send(r)
        if response == 0:
            self._move(Ev.LOGOUT)
            self._abort_all()
            self._end_session()
            self._events.append(Closed("logout"))

    # --- task management ------------------------------------------------------------------------
    def _on_tmf(self, pdu: Pdu) -> None:
        if not self._accept_cmdsn(pdu):
            return
        s = self.session
        assert s is not None
        func = pdu.flags & 0x7F
        lun = decode_lun(pdu.lun_raw)
        tmf = _PendingTmf(pdu.itt)
        has_lun = lun == 0 and s.lu is not None
        if func == TmfFunction.ABORT_TASK:
            rtt = pdu.u32(20)
            task = self.tasks.get(rtt)
            if task is None:
                # already answered -> "task does not exist"; never received but its
                # CmdSN is in the window and before ours -> "function complete" (§11.5.1)
                ref = pdu.u32(32)
                in_window = _sn_lt(ref, pdu.u32(24)) and not _sn_lt(ref, s.exp_cmdsn - QUEUE_DEPTH)
                lost = in_window and rtt not in self._done_itts
                tmf.response = TmfResponse.COMPLETE if lost else TmfResponse.NO_TASK
            else:
                self._abort(task, tmf)
        elif func in (TmfFunction.ABORT_TASK_SET, TmfFunction.CLEAR_TASK_SET,
                      TmfFunction.LOGICAL_UNIT_RESET):
            if not has_lun:
                tmf.response = TmfResponse.NO_LUN
            else:
                for task in list(self.tasks.values()):
                    if task.lun == lun:
                        self._abort(task, tmf)
                if func == TmfFunction.LOGICAL_UNIT_RESET and s.lu is not None:
                    s.lu.state.reset()
        elif func in (TmfFunction.TARGET_WARM_RESET, TmfFunction.TARGET_COLD_RESET):
            for task in list(self.tasks.values()):
                self._abort(task, tmf)
            if s.lu is not None:
                s.lu.state.reset()
        elif func == TmfFunction.TASK_REASSIGN:
            tmf.response = TmfResponse.NO_REASSIGN
        else:
            tmf.response = TmfResponse.NOT_SUPPORTED
        if tmf.waiting:
            self._tmfs.append(tmf)
        else:
            self._tmf_response(tmf)
        if func == TmfFunction.TARGET_COLD_RESET and tmf.response == TmfResponse.COMPLETE:
            self._move(Ev.KILL)
            self._abort_all()
            self._end_session()
            self._events.append(Closed("target cold reset"))

    def _abort(self, task: Task, tmf: _PendingTmf) -> None:
        task.aborted = True
        if task.dispatched:
            tmf.waiting.add(task.itt)
        else:
            self.tasks.pop(task.itt, None)

    def _tmf_task_gone(self, itt: int) -> None:
        for tmf in list(self._tmfs):
            tmf.waiting.discard(itt)
            if not tmf.waiting:
                self._tmfs.remove(tmf)
                if not self.closed:
                    self._tmf_response(tmf)

    def _tmf_response(self, tmf: _PendingTmf) -> None:
        r = new_pdu(Op.TASK_MGMT_RSP, F_FINAL, tmf.itt)
        r.bhs[2] = tmf.response
        self._stamp(r)
        self._send(r)

    def _abort_all(self) -> None:
        for task in self.tasks.values():
            task.aborted = True
        self.tasks.clear()

    def _end_session(self) -> None:
        s = self.session
        if s is not None:
            s.end()
            self.login.device = None

    def _close_device(self) -> None:
        dev, self.login.device = self.login.device, None
        if dev is not None:
            try:
                dev.close()
            except Exception:
                pass

    # --- login ------------------------------------------------------------------------------------
    def _on_login(self, pdu: Pdu) -> None:
        """One login request PDU: stage and ISID checks, Continue, then the keys
        (answered by :class:`~cdp.targets.iscsi.login.Login`) and the state moves."""
        login = self.login
        flags = pdu.flags
        transit = bool(flags & F_TRANSIT)
        cont = bool(flags & F_CONTINUE)
        csg = (flags >> 2) & 3
        nsg = flags & 3
        first = self.state is State.FREE
        if first:
            login.isid = bytes(pdu.bhs[8:14])
            login.tsih = pdu.u16(14)
            self.statsn = pdu.u32(28)
            if pdu.bhs[3] > 0:  # version-min must be 0
                self._login_fail(pdu, LoginStatus.UNSUPPORTED_VERSION)
                return
            if csg not in (SECURITY, OPERATIONAL):
                self._login_fail(pdu, LoginStatus.INITIATOR_ERROR)
                return
            self._move(Ev.START_SECURITY if csg == SECURITY else Ev.START_OPERATIONAL)
        stage = SECURITY if self.state is State.SECURITY else OPERATIONAL
        if (transit and cont) or csg != stage or (transit and nsg not in (OPERATIONAL, FULL_FEATURE)) \
                or (transit and nsg <= csg):
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR)
            return
        if bytes(pdu.bhs[8:14]) != login.isid:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR)
            return
        self._login_text += pdu.data
        if len(self._login_text) > LOGIN_MAX_DATA:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR)
            return
        if cont:
            self._login_response(pdu, False, stage, stage, b"")
            return
        text, self._login_text = self._login_text, b""
        try:
            pairs = parse_text(text)
        except IscsiProtocolError:
            self._login_fail(pdu, LoginStatus.INITIATOR_ERROR)
            return
        status, reply = login.request(pairs, stage, transit)
        if status is not LoginStatus.SUCCESS:
            self._login_fail(pdu, status, reply)
            return
        can_transit = transit and (stage != SECURITY or login.auth.done)
        if can_transit and nsg == FULL_FEATURE:
            status = self._start_session(pdu)
            if status is not LoginStatus.SUCCESS:
                self._login_fail(pdu, status)
                return
        self._login_response(pdu, can_transit, stage, nsg if can_transit else stage,
                             build_text(reply))
        if can_transit:
            if nsg == FULL_FEATURE:
                self._move(Ev.TO_FULL)
                self._hd, self._dd = login.digests
                self.params.header_digest, self.params.data_digest = login.digests
                self.reader.header_digest, self.reader.data_digest = login.digests
                self.reader.max_data = OUR_MRDSL
            else:
                self._move(Ev.TO_OPERATIONAL)

    def _login_response(self, pdu: Pdu, transit: bool, csg: int, nsg: int, data: bytes,
                        status: int = 0) -> None:
        r = new_pdu(Op.LOGIN_RSP, (F_TRANSIT if transit else 0) | (csg << 2) | (nsg if transit else 0),
                    pdu.itt, data)
        r.bhs[8:14] = self.login.isid or pdu.bhs[8:14]
        s = self.session
        tsih = s.tsih if s is not None and transit and nsg == FULL_FEATURE else self.login.tsih
        r.set(14, 2, tsih)
        r.set(24, 4, self.statsn)
        self.statsn = (self.statsn + 1) & 0xFFFFFFFF
        cmdsn = pdu.u32(24)
        r.set(28, 4, cmdsn)
        r.set(32, 4, (cmdsn + QUEUE_DEPTH - 1) & 0xFFFFFFFF)
        r.bhs[36] = status >> 8
        r.bhs[37] = status & 0xFF
        self._send(r)

    def _login_fail(self, pdu: Pdu, status: LoginStatus,
                    reply: list[tuple[str, str]] | None = None) -> None:
        flags = pdu.flags
        csg = (flags >> 2) & 3
        self._login_response(pdu, False, csg if csg in (0, 1) else 0, 0,
                             build_text(reply or []), int(status))
        self._move(Ev.LOGIN_FAILED)
        self._close_device()
        self._events.append(Closed(f"login failed: {status.name}"))

    def _start_session(self, pdu: Pdu) -> LoginStatus:
        portal = self.portal
        login = self.login
        lu: LogicalUnit | None = None
        if login.kind == "Normal":
            if login.export is None or login.device is None:
                return LoginStatus.MISSING_PARAMETER  # no target was named and opened
            state = portal.lu_states.setdefault(login.export, LuState())
            lu = LogicalUnit(login.device, state, name=login.export, serial=_serial(login.export),
                             target_iqn=login.target)
        # session reinstatement: same initiator port and target
        for old in list(portal.sessions.values()):
            if (old.initiator == login.initiator and old.isid == login.isid
                    and old.target == login.target and old.kind == login.kind):
                conn = old.connection
                old.end()
                if conn is not None and conn is not self:
                    conn.kill()
                    if portal.on_kill is not None:
                        portal.on_kill(conn)
        s = Session(portal, portal.alloc_tsih(), login.isid, login.initiator, login.kind,
                    login.target, lu)
        s.exp_cmdsn = pdu.u32(24)
        s.connection = self
        portal.sessions[s.tsih] = s
        self.session = s
        login.device = None  # the session owns it now
        return LoginStatus.SUCCESS


def _serial(export: str) -> str:
    return hashlib.sha1(export.encode()).hexdigest()[:16]
