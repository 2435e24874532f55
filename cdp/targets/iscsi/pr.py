"""Reservations: SPC-2 RESERVE / RELEASE and persistent reservations (PERSISTENT
RESERVE IN / OUT), and :class:`LuState`, the logical-unit state every session on one
export shares (reservations, medium-removal prevention, mode page settings).

:class:`Reservations` is the part of :class:`~cdp.targets.iscsi.scsi.LogicalUnit` that
runs these commands and decides reservation conflicts (SPC-4 5.9).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cdp.targets.iscsi.command import (
    GOOD,
    INQUIRY,
    MAINTENANCE_IN,
    MODE_SENSE6,
    MODE_SENSE10,
    PR_IN,
    PR_OUT,
    PREFETCH10,
    PREFETCH16,
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
    SERVICE_ACTION_IN16,
    TEST_UNIT_READY,
    VERIFY10,
    VERIFY12,
    VERIFY16,
    ScsiRequest,
    ScsiResult,
    u16,
    u32,
    u64,
)
from cdp.targets.iscsi.sense import Asc, Status, illegal

PR_WE, PR_EA, PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR = 1, 3, 5, 6, 7, 8
_PR_TYPES = {PR_WE, PR_EA, PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR}


@dataclass
class LuState:
    """Logical-unit state shared by every session on one export."""

    reserved_by: str | None = None  # SPC-2 RESERVE holder nexus
    pr_generation: int = 0
    pr_keys: dict[str, int] = field(default_factory=dict)  # nexus -> key
    pr_holder: str | None = None
    pr_type: int = 0
    prevent: set[str] = field(default_factory=set)
    d_sense: bool = False
    swp: bool = False
    wce: bool = True

    def release_nexus(self, nexus: str) -> None:
        """I_T nexus loss or logout: SPC-2 reservation and medium-removal prevention go."""
        if self.reserved_by == nexus:
            self.reserved_by = None
        self.prevent.discard(nexus)

    def reset(self) -> None:
        """LOGICAL UNIT RESET / target reset: SPC-2 reservations and PREVENT are cleared."""
        self.reserved_by = None
        self.prevent.clear()

    def pr_is_holder(self, nexus: str) -> bool:
        if self.pr_holder is None:
            return False
        if self.pr_type in (PR_WE_AR, PR_EA_AR):
            return nexus in self.pr_keys
        return self.pr_holder == nexus


#: commands allowed whatever reservation is held (SPC-4 table of reservation conflicts)
_ALWAYS_ALLOWED = frozenset(
    {INQUIRY, REPORT_LUNS, REQUEST_SENSE, PR_IN, PR_OUT, MAINTENANCE_IN, READ_CAPACITY10,
     SERVICE_ACTION_IN16, TEST_UNIT_READY}
)
#: commands that only read (allowed to everyone under WRITE EXCLUSIVE reservations)
_READS = frozenset(
    {READ6, READ10, READ12, READ16, VERIFY10, VERIFY12, VERIFY16, MODE_SENSE6, MODE_SENSE10,
     PREFETCH10, PREFETCH16}
)


class Reservations:
    """Reservation commands of a logical unit (mixed into LogicalUnit)."""

    state: LuState

    def _conflict(self, req: ScsiRequest) -> bool:
        """True when a reservation held by another I_T nexus refuses this command
        (SPC-4 5.9: RESERVATION CONFLICT)."""
        st = self.state
        op = req.cdb[0]
        if op in _ALWAYS_ALLOWED:
            return False
        if st.reserved_by is not None and st.reserved_by != req.nexus:
            return op not in (RELEASE6, RELEASE10)
        if st.pr_holder is None:
            return False
        if op in (RESERVE6, RESERVE10, RELEASE6, RELEASE10):
            return True
        if st.pr_is_holder(req.nexus):
            return False
        registered = req.nexus in st.pr_keys
        t = st.pr_type
        if op in _READS:
            if t in (PR_WE, PR_WE_RO, PR_WE_AR):
                return False
            return not (t in (PR_EA_RO, PR_EA_AR) and registered)
        return not (t in (PR_WE_RO, PR_EA_RO, PR_WE_AR, PR_EA_AR) and registered)

    def _reserve(self, req: ScsiRequest) -> ScsiResult:
        st = self.state
        if st.reserved_by not in (None, req.nexus):
            return ScsiResult(Status.RESERVATION_CONFLICT)
        st.reserved_by = req.nexus
        return GOOD

    def _release(self, req: ScsiRequest) -> ScsiResult:
        st = self.state
        if st.reserved_by == req.nexus:
            st.reserved_by = None
        return GOOD

    def _pr_in(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        alloc = u16(cdb, 7)
        st = self.state
        gen = st.pr_generation.to_bytes(4, "big")
        if sa == 0:  # READ KEYS
            keys = b"".join(k.to_bytes(8, "big") for k in st.pr_keys.values())
            data = gen + len(keys).to_bytes(4, "big") + keys
        elif sa == 1:  # READ RESERVATION
            if st.pr_holder is None:
                data = gen + bytes(4)
            else:
                key = st.pr_keys.get(st.pr_holder, 0)
                if st.pr_type in (PR_WE_AR, PR_EA_AR):
                    key = 0
                data = gen + (16).to_bytes(4, "big") + key.to_bytes(8, "big") + bytes(
                    [0, 0, 0, 0, 0, st.pr_type & 0x0F, 0, 0])
        elif sa == 2:  # REPORT CAPABILITIES
            data = bytes([0, 8, 0x10, 0x80, 0x80 | 0x40 | 0x20 | 0x08 | 0x02, 0x01, 0, 0])
        elif sa == 3:  # READ FULL STATUS
            out = bytearray()
            for nexus, key in st.pr_keys.items():
                holder = st.pr_is_holder(nexus)
                tid = _transport_id(nexus)
                out += key.to_bytes(8, "big") + bytes(4)
                out += bytes([0x01 if holder else 0, (st.pr_type & 0x0F) if holder else 0])
                out += bytes(4) + (1).to_bytes(2, "big") + len(tid).to_bytes(4, "big") + tid
            data = gen + len(out).to_bytes(4, "big") + bytes(out)
        else:
            raise illegal(field=1, bit=4)
        return ScsiResult(Status.GOOD, data[:alloc])

    def _pr_out(self, req: ScsiRequest) -> ScsiResult:
        cdb = req.cdb
        sa = cdb[1] & 0x1F
        ptype = cdb[2] & 0x0F
        scope = cdb[2] >> 4
        plen = u32(cdb, 5)
        if sa > 7:
            raise illegal(field=1, bit=4)
        if plen != 24 and sa != 7:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=5)
        data = req.data
        if len(data) < 24:
            raise illegal(Asc.PARAMETER_LIST_LENGTH_ERROR, field=5)
        key, sa_key = u64(data, 0), u64(data, 8)
        flags = data[20]
        st = self.state
        nexus = req.nexus
        conflict = ScsiResult(Status.RESERVATION_CONFLICT)
        registered = nexus in st.pr_keys
        if sa in (0, 6):  # REGISTER / REGISTER AND IGNORE EXISTING KEY
            if flags & 0x0C:  # SPEC_I_PT / ALL_TG_PT not supported
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=20, in_cdb=False)
            if sa == 0:
                if not registered and key != 0:
                    return conflict
                if registered and key != st.pr_keys[nexus]:
                    return conflict
            if sa_key == 0:
                if registered:
                    self._unregister(nexus)
            else:
                st.pr_keys[nexus] = sa_key
            st.pr_generation += 1
            return GOOD
        if sa == 7:
            raise illegal(field=1, bit=4)
        if not registered or st.pr_keys[nexus] != key:
            return conflict
        if sa in (1, 2, 4, 5) and scope != 0:
            raise illegal(field=2, bit=7)
        if sa == 1:  # RESERVE
            if ptype not in _PR_TYPES:
                raise illegal(field=2, bit=3)
            if st.pr_holder is not None:
                if st.pr_is_holder(nexus):
                    return GOOD if st.pr_type == ptype else conflict
                return conflict
            st.pr_holder, st.pr_type = nexus, ptype
            return GOOD
        if sa == 2:  # RELEASE
            if st.pr_holder is None or not st.pr_is_holder(nexus):
                return GOOD
            if st.pr_type != ptype:
                raise illegal(Asc.INVALID_RELEASE_OF_PR)
            st.pr_holder, st.pr_type = None, 0
            return GOOD
        if sa == 3:  # CLEAR
            st.pr_keys.clear()
            st.pr_holder, st.pr_type = None, 0
            st.pr_generation += 1
            return GOOD
        # PREEMPT / PREEMPT AND ABORT
        if ptype not in _PR_TYPES:
            raise illegal(field=2, bit=3)
        all_reg = st.pr_type in (PR_WE_AR, PR_EA_AR) and st.pr_holder is not None
        if st.pr_holder is None or all_reg:
            if sa_key == 0 and not all_reg:
                raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=8, in_cdb=False)
            victims = [n for n, k in st.pr_keys.items() if (k == sa_key or (all_reg and sa_key == 0)) and n != nexus]
            if not victims and not all_reg:
                return conflict
            for n in victims:
                del st.pr_keys[n]
            if all_reg and sa_key == 0:
                st.pr_holder, st.pr_type = nexus, ptype
        else:
            holder_key = st.pr_keys.get(st.pr_holder, None)
            victims = [n for n, k in st.pr_keys.items() if k == sa_key and n != nexus]
            if sa_key == holder_key:
                for n in victims:
                    del st.pr_keys[n]
                st.pr_holder, st.pr_type = nexus, ptype
            else:
                if sa_key == 0:
                    raise illegal(Asc.INVALID_FIELD_IN_PARAMETER_LIST, field=8, in_cdb=False)
                if not victims:
                    return conflict
                for n in victims:
                    del st.pr_keys[n]
        st.pr_generation += 1
        return GOOD

    def _unregister(self, nexus: str) -> None:
        st = self.state
        del st.pr_keys[nexus]
        if st.pr_holder == nexus or (st.pr_type in (PR_WE_AR, PR_EA_AR) and not st.pr_keys):
            if st.pr_type in (PR_WE_AR, PR_EA_AR) and st.pr_keys:
                st.pr_holder = next(iter(st.pr_keys))
            else:
                st.pr_holder, st.pr_type = None, 0


def _transport_id(nexus: str) -> bytes:
    """iSCSI TransportID (format 01b: name + ",i,0x" + ISID) of a nexus."""
    name = nexus.encode() + b"\0"
    name += bytes(-len(name) % 4)
    return bytes([0x45, 0]) + len(name).to_bytes(2, "big") + name
