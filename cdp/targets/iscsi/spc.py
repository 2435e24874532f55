"""SPC-4 primary commands: TEST UNIT READY, REQUEST SENSE, INQUIRY and its VPD pages,
MODE SENSE / MODE SELECT, START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL, REPORT LUNS and
REPORT SUPPORTED OPERATION CODES.

:class:`PrimaryCommands` is the part of :class:`~cdp.targets.iscsi.scsi.LogicalUnit`
that runs these commands; :func:`report_luns` also answers for a LUN that does not exist.
"""

from __future__ import annotations

from cdp.targets.iscsi.command import (
    BLOCK,
    COMPARE_AND_WRITE,
    GOOD,
    INQUIRY,
    MAINTENANCE_IN,
    MI_REPORT_OPCODES,
    MODE_SELECT6,
    MODE_SELECT10,
    MODE_SENSE6,
    MODE_SENSE10,
    ORWRITE16,
    PR_IN,
    PR_OUT,
    PREFETCH10,
    PREFETCH16,
    PREVENT_ALLOW,
    READ6,
    READ10,
    READ12,
    READ16,
    READ_CAPACITY10,
    RELEASE6,
    RELEASE10,
    REPORT_LUNS,
    REQUEST_SENSE,
    RESERVE6,
    RESERVE10,
    SAI_GET_LBA_STATUS,
    SAI_READ_CAPACITY16,
    SERVICE_ACTION_IN16,
    START_STOP_UNIT,
    SYNC_CACHE10,
    SYNC_CACHE16,
    TEST_UNIT_READY,
    UNMAP,
    VERIFY10,
    VERIFY12,
    VERIFY16,
    WRITE6,
    WRITE10,
    WRITE12,
    WRITE16,
    WRITE_SAME10,
    WRITE_SAME16,
    WRITE_VERIFY10,
    WRITE_VERIFY12,
    WRITE_VERIFY16,
    ScsiRequest,
    ScsiResult,
    u16,
    u32,
)
from cdp.targets.iscsi.pr import LuState
from cdp.targets.iscsi.sbc import (
    MAX_CAW_BLOCKS,
    MAX_UNMAP_BLOCKS,
    MAX_UNMAP_DESCS,
    MAX_WS_BLOCKS,
    MAX_XFER_BLOCKS,
    OPT_GRAN,
)
from cdp.targets.iscsi.sense import Asc, ScsiError, Sense, SenseKey, Status, illegal

VENDOR = b"CDP     "
PRODUCT = b"VOLUME          "
REVISION = b"0001"


#: opcode -> (service action or None, CDB usage data) for REPORT SUPPORTED OPERATION CODES
_USAGE: dict[tuple[int, int | None], bytes] = {
    (TEST_UNIT_READY, None): bytes([0x00, 0, 0, 0, 0, 0x07]),
    (REQUEST_SENSE, None): bytes([0x03, 0x01, 0, 0, 0xFF, 0x07]),
    (READ6, None): bytes([0x08, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (WRITE6, None): bytes([0x0A, 0x1F, 0xFF, 0xFF, 0xFF, 0x07]),
    (INQUIRY, None): bytes([0x12, 0x01, 0xFF, 0xFF, 0xFF, 0x07]),
    (MODE_SELECT6, None): bytes([0x15, 0x11, 0, 0, 0xFF, 0x07]),
    (RESERVE6, None): bytes([0x16, 0, 0, 0, 0, 0x07]),
    (RELEASE6, None): bytes([0x17, 0, 0, 0, 0, 0x07]),
    (MODE_SENSE6, None): bytes([0x1A, 0x08, 0xFF, 0xFF, 0xFF, 0x07]),
    (START_STOP_UNIT, None): bytes([0x1B, 0x01, 0, 0x0F, 0xF7, 0x07]),
    (PREVENT_ALLOW, None): bytes([0x1E, 0, 0, 0, 0x03, 0x07]),
    (READ_CAPACITY10, None): bytes([0x25, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (READ10, None): bytes([0x28, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE10, None): bytes([0x2A, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE_VERIFY10, None): bytes([0x2E, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (VERIFY10, None): bytes([0x2F, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (PREFETCH10, None): bytes([0x34, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (SYNC_CACHE10, None): bytes([0x35, 0x02, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (WRITE_SAME10, None): bytes([0x41, 0xE8, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0xFF, 0xFF, 0x07]),
    (UNMAP, None): bytes([0x42, 0x01, 0, 0, 0, 0, 0x1F, 0xFF, 0xFF, 0x07]),
    (MODE_SELECT10, None): bytes([0x55, 0x11, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (RESERVE10, None): bytes([0x56, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (RELEASE10, None): bytes([0x57, 0, 0, 0, 0, 0, 0, 0, 0, 0x07]),
    (MODE_SENSE10, None): bytes([0x5A, 0x18, 0xFF, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 0): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 1): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 2): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    (PR_IN, 3): bytes([0x5E, 0x1F, 0, 0, 0, 0, 0, 0xFF, 0xFF, 0x07]),
    **{
        (PR_OUT, sa): bytes([0x5F, 0x1F, 0xFF, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0x07])
        for sa in range(7)
    },
    (READ16, None): bytes([0x88, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (COMPARE_AND_WRITE, None): bytes([0x89, 0xF8] + [0xFF] * 8 + [0, 0, 0, 0xFF, 0x3F, 0x07]),
    (WRITE16, None): bytes([0x8A, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (ORWRITE16, None): bytes([0x8B, 0xF8] + [0xFF] * 12 + [0x3F, 0x07]),
    (WRITE_VERIFY16, None): bytes([0x8E, 0xF2] + [0xFF] * 12 + [0x3F, 0x07]),
    (VERIFY16, None): bytes([0x8F, 0xF6] + [0xFF] * 12 + [0x3F, 0x07]),
    (PREFETCH16, None): bytes([0x90, 0x02] + [0xFF] * 12 + [0x3F, 0x07]),
    (SYNC_CACHE16, None): bytes([0x91, 0x02] + [0xFF] * 12 + [0x3F, 0x07]),
    (WRITE_SAME16, None): bytes([0x93, 0xE9] + [0xFF] * 12 + [0x3F, 0x07]),
    (SERVICE_ACTION_IN16, SAI_READ_CAPACITY16): bytes([0x9E, 0x10] + [0] * 8 + [0xFF] * 4 + [0, 0x07]),
    (SERVICE_ACTION_IN16, SAI_GET_LBA_STATUS): bytes([0x9E, 0x12] + [0xFF] * 8 + [0xFF] * 4 + [0, 0x07]),
    (REPORT_LUNS, None): bytes([0xA0, 0, 0xFF, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),
    (MAINTENANCE_IN, MI_REPORT_OPCODES): bytes([0xA3, 0x0C, 0x87, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0, 0x07]),
    (READ12, None): bytes([0xA8, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (WRITE12, None): bytes([0xAA, 0xF8, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (WRITE_VERIFY12, None): bytes([0xAE, 0xF2, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
    (VERIFY12, None): bytes([0xAF, 0xF6, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0x1F, 0x07]),
}


class PrimaryCommands:
    """Primary commands of a logical unit (mixed into LogicalUnit)."""

    state: LuState
    blocks: int
    read_only: bool
    name: str
    serial: str
    target_iqn: str

    def _tur(self, req: ScsiRequest) -> ScsiResult:
        return GOOD

    def _request_sense(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sense = Sense(SenseKey.NO_SENSE, Asc.NO_ADDITIONAL_SENSE)
        data = sense.descriptor() if cdb[1] & 1 else sense.fixed()
        return ScsiResult(Status.GOOD, data[: cdb[4]])

    def _start_stop(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        loej, start = bool(cdb[4] & 0x02), bool(cdb[4] & 0x01)
        if loej and not start and (cdb[4] >> 4) == 0 and self.state.prevent:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.MEDIUM_REMOVAL_PREVENTED))
        return GOOD

    def _prevent_allow(self, req: ScsiRequest) -> ScsiResult:
        if req.cdb[4] & 0x01:
            self.state.prevent.add(req.nexus)
        else:
            self.state.prevent.discard(req.nexus)
        return GOOD

    def _maintenance_in(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        if cdb[1] & 0x1F != MI_REPORT_OPCODES:
            raise illegal(field=1, bit=4)
        opts = cdb[2] & 0x07
        rctd = bool(cdb[2] & 0x80)
        op, sa = cdb[3], u16(cdb, 4)
        alloc = u32(cdb, 6)
        timeouts = bytes([0, 10, 0, 0, 0, 0, 0, 0, 0, 0, 0, 30]) if rctd else b""
        if opts == 0:
            out = bytearray()
            for (o, s), usage in _USAGE.items():
                flags = (0x02 if rctd else 0) | (0x01 if s is not None else 0)
                out += bytes([o, 0]) + (s or 0).to_bytes(2, "big") + bytes([0, flags])
                out += len(usage).to_bytes(2, "big") + timeouts
            data = len(out).to_bytes(4, "big") + bytes(out)
        elif opts in (1, 2, 3):
            has_sa = any(o == op and s is not None for (o, s) in _USAGE)
            if opts == 1 and has_sa:
                raise illegal(field=2)
            if opts == 2 and not has_sa:
                raise illegal(field=2)
            key = (op, sa if has_sa else None)
            usage = _USAGE.get(key, b"")
            support = 3 if usage else 1
            data = bytes([0, (0x80 if rctd else 0) | support]) + len(usage).to_bytes(2, "big")
            data += usage + timeouts
        else:
            raise illegal(field=2)
        return ScsiResult(Status.GOOD, data[:alloc])

    # --- INQUIRY ------------------------------------------------------------------------
    def _inquiry(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        evpd = cdb[1] & 0x01
        page = cdb[2]
        alloc = u16(cdb, 3)
        if cdb[1] & 0xFE:
            raise illegal(field=1)
        if not evpd:
            if page:
                raise illegal(field=2)
            return ScsiResult(Status.GOOD, self._standard_inquiry()[:alloc])
        builder = {
            0x00: self._vpd_supported,
            0x80: self._vpd_serial,
            0x83: self._vpd_ids,
            0xB0: self._vpd_block_limits,
            0xB1: self._vpd_characteristics,
            0xB2: self._vpd_provisioning,
        }.get(page)
        if builder is None:
            raise illegal(field=2)
        body = builder()
        data = bytes([0x00, page]) + len(body).to_bytes(2, "big") + body
        return ScsiResult(Status.GOOD, data[:alloc])

    def _standard_inquiry(self) -> bytes:
        b = bytearray(74)
        b[0] = 0x00  # connected, direct access block device
        b[2] = 0x06  # SPC-4
        b[3] = 0x12  # HISUP, response data format 2
        b[4] = len(b) - 5
        b[6] = 0x00
        b[7] = 0x02  # CMDQUE
        b[8:16] = VENDOR
        b[16:32] = PRODUCT
        b[32:36] = REVISION
        b[36:44] = self.serial.encode()[:8].ljust(8)
        versions = (0x00A0, 0x0960, 0x0460, 0x04C0)  # SAM-5, iSCSI, SPC-4, SBC-3
        for i, v in enumerate(versions):
            b[58 + 2 * i : 60 + 2 * i] = v.to_bytes(2, "big")
        return bytes(b)

    def _vpd_supported(self) -> bytes:
        return bytes([0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2])

    def _vpd_serial(self) -> bytes:
        return self.serial.encode()

    def naa(self) -> bytes:
        """An NAA 6 (registered extended) identifier derived from the export name."""
        h = 0
        for ch in (self.name or self.serial).encode():
            h = (h * 1099511628211 + ch) & ((1 << 100) - 1)
        return bytes([0x60 | 0x0]) + (0x00CDF0 << 4).to_bytes(3, "big")[0:3] + h.to_bytes(
            13, "big"
        )[1:]

    def _vpd_ids(self) -> bytes:
        out = bytearray()
        t10 = VENDOR + self.serial.encode()
        out += bytes([0x02, 0x01, 0x00, len(t10)]) + t10  # T10 vendor id, ASCII
        naa = self.naa()
        out += bytes([0x01, 0x03, 0x00, len(naa)]) + naa  # NAA, binary, LU
        if self.target_iqn:
            name = self.target_iqn.encode() + b"\0"
            name += bytes(-len(name) % 4)
            out += bytes([0x53, 0x28, 0x00, len(name)]) + name  # SCSI name, target device
        out += bytes([0x61, 0x94, 0x00, 0x04, 0, 0, 0, 1])  # relative target port 1
        return bytes(out)

    def _vpd_block_limits(self) -> bytes:
        b = bytearray(0x3C)
        b[0] = 0  # WSNZ 0: WRITE SAME with 0 blocks means "to the end"
        b[1] = MAX_CAW_BLOCKS
        b[2:4] = OPT_GRAN.to_bytes(2, "big")
        b[4:8] = MAX_XFER_BLOCKS.to_bytes(4, "big")
        b[8:12] = (256).to_bytes(4, "big")
        b[12:16] = MAX_XFER_BLOCKS.to_bytes(4, "big")
        b[16:20] = MAX_UNMAP_BLOCKS.to_bytes(4, "big")
        b[20:24] = MAX_UNMAP_DESCS.to_bytes(4, "big")
        b[24:28] = OPT_GRAN.to_bytes(4, "big")
        b[28:32] = (0x80000000).to_bytes(4, "big")  # UGAVALID, alignment 0
        b[32:40] = MAX_WS_BLOCKS.to_bytes(8, "big")
        return bytes(b)

    def _vpd_characteristics(self) -> bytes:
        b = bytearray(0x3C)
        b[0:2] = (1).to_bytes(2, "big")  # non-rotating medium
        return bytes(b)

    def _vpd_provisioning(self) -> bytes:
        # LBPU, LBPWS, LBPWS10, LBPRZ; provisioning type 2 = thin
        return bytes([0x00, 0x80 | 0x40 | 0x20 | 0x04, 0x02, 0x00])

    # --- MODE SENSE / SELECT --------------------------------------------------------------
    def _pages(self, pc: int) -> dict[int, bytes]:
        st = self.state
        if pc == 1:  # changeable
            caching = bytes([0x08, 0x12, 0x04] + [0] * 17)
            control = bytes([0x0A, 0x0A, 0x04, 0, 0x08] + [0] * 7)
        else:
            wce = st.wce if pc == 0 else True
            caching = bytes([0x08, 0x12, 0x04 if wce else 0] + [0] * 17)
            d_sense = st.d_sense if pc == 0 else False
            swp = st.swp if pc == 0 else False
            control = bytes(
                [0x0A, 0x0A, 0x04 if d_sense else 0, 0x10, 0x08 if swp else 0, 0x00, 0, 0,
                 0xFF, 0xFF, 0, 0]
            )
        rw_recovery = bytes([0x01, 0x0A, 0x80] + [0] * 9)
        disconnect = bytes([0x02, 0x0E] + [0] * 14)
        iec = bytes([0x1C, 0x0A] + [0] * 10)
        return {0x01: rw_recovery, 0x02: disconnect, 0x08: caching, 0x0A: control, 0x1C: iec}

    def _mode_sense(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        ten = cdb[0] == MODE_SENSE10
        dbd = bool(cdb[1] & 0x08)
        llbaa = ten and bool(cdb[1] & 0x10)
        pc, page, subpage = cdb[2] >> 6, cdb[2] & 0x3F, cdb[3]
        alloc = u16(cdb, 7) if ten else cdb[4]
        if pc == 3:
            raise ScsiError(Sense(SenseKey.ILLEGAL_REQUEST, Asc.SAVING_PARAMETERS_NOT_SUPPORTED,
                                  field=2, bit=7))
        pages = self._pages(pc)
        if page == 0x3F:
            if subpage not in (0x00, 0xFF):
                raise illegal(field=3)
            body = b"".join(pages[k] for k in sorted(pages))
        elif page in pages and subpage == 0:
            body = pages[page]
        else:
            raise illegal(field=2 if subpage == 0 else 3)
        wp = 0x80 if (self.read_only or self.state.swp) else 0
        dsp = wp | 0x10  # DPOFUA
        if dbd:
            bdesc = b""
        elif llbaa:
            bdesc = self.blocks.to_bytes(8, "big") + bytes(4) + BLOCK.to_bytes(4, "big")
        else:
            bdesc = min(self.blocks, 0xFFFFFFFF).to_bytes(4, "big") + b"\0" + BLOCK.to_bytes(3, "big")
        if ten:
            head_len = 8
            total = head_len + len(bdesc) + len(body)
            head = (total - 2).to_bytes(2, "big") + bytes([0, dsp, 0x01 if llbaa and bdesc else 0, 0])
            head += len(bdesc).to_bytes(2, "big")
        else:
            total = 4 + len(bdesc) + len(body)
            head = bytes([total - 1, 0, dsp, len(bdesc)])
        return ScsiResult(Status.GOOD, (head + bdesc + body)[:alloc])

    def _mode_select(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        ten = cdb[0] == MODE_SELECT10
        plen = u16(cdb, 7) if ten else cdb[4]
        if cdb[1] & 0x01:  # SP: saving not supported
            raise illegal(Asc.INVALID_FIELD_IN_CDB, field=1, bit=0)
        data = req.data[:plen]
        if plen == 0:
            return GOOD
        hlen = 8 if ten else 4
        if len(data) < hlen:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=7 if ten else 4)
        bdlen = u16(data, 6) if ten else data[3]
        pos = hlen + bdlen
        changeable = self._pages(1)
        current = self._pages(0)
        while pos + 2 <= len(data):
            code = data[pos] & 0x3F
            if data[pos] & 0x40:  # SPF: no subpages here
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos, in_cdb=False)
            page_len = data[pos + 1] + 2
            page = data[pos : pos + page_len]
            if code not in current or len(page) != len(current[code]):
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos, in_cdb=False)
            mask, cur = changeable[code], current[code]
            for i in range(2, len(page)):
                if (page[i] ^ cur[i]) & ~mask[i] & 0xFF:
                    raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=pos + i,
                                  in_cdb=False)
            if code == 0x0A:
                self.state.d_sense = bool(page[2] & 0x04)
                self.state.swp = bool(page[4] & 0x08)
            elif code == 0x08:
                self.state.wce = bool(page[2] & 0x04)
            pos += page_len
        return GOOD


def report_luns(req: ScsiRequest, luns: tuple[int, ...] = (0,)) -> ScsiResult:
    """REPORT LUNS: LUN 0 only (it is answered on any LUN, present or not)."""
    cdb = req.cdb
    select = cdb[2]
    alloc = u32(cdb, 6)
    if alloc < 16:
        raise illegal(field=6)
    if select not in (0x00, 0x01, 0x02, 0x10, 0x11, 0x12):
        raise illegal(field=2)
    body = b"".join((lun << 48).to_bytes(8, "big") for lun in luns) if select != 0x01 else b""
    data = len(body).to_bytes(4, "big") + bytes(4) + body
    return ScsiResult(Status.GOOD, data[:alloc])
