"""The sans-I/O iSCSI core driven by an in-process initiator (no sockets)."""

from __future__ import annotations

import hashlib

import pytest

from cdp.errors import CdpError, Corruption, NotFound, OutOfRange, ReadOnly, StoreFull
from cdp.targets.iscsi import naming
from cdp.targets.iscsi.core import Portal, State
from cdp.targets.iscsi.login import AUTH_TRANSITIONS, Auth, AuthEv, ChapConfig, ChapExchange
from cdp.targets.iscsi.pdu import (
    F_OVERFLOW,
    F_UNDERFLOW,
    IscsiProtocolError,
    LoginStatus,
    Op,
    RejectReason,
    TmfFunction,
    TmfResponse,
    encode_binary,
    new_pdu,
    parse_text,
)
from cdp.targets.iscsi.sense import Asc, SenseKey, Status, scsi_sense
from cdp.targets.testing.iscsi_wire import Initiator
from cdp.targets.testing.memdev import MemoryProvider
from tests.helpers import assert_bytes_equal

VOL0 = "iqn.2026-11.io.cdp:vol0"
SIZE = 4 << 20


def sense_of(sense: bytes) -> tuple[int, int]:
    assert sense[0] & 0x7F == 0x70
    return sense[2] & 0x0F, (sense[12] << 8) | sense[13]


@pytest.fixture
def provider() -> MemoryProvider:
    p = MemoryProvider()
    p.add("vol0", SIZE, description="live")
    p.add("vol0@marker17", SIZE, read_only=True)
    p.add("vol0@@123", SIZE, read_only=True)
    p.add("secure", SIZE)
    p.add("mutual", SIZE)
    return p


@pytest.fixture
def portal(provider: MemoryProvider) -> Portal:
    return Portal(
        provider,
        {
            "secure": {"user": "alice", "secret": "alice-secret1"},
            "iqn.2026-11.io.cdp:mutual": {
                "user": "bob", "secret": "bob-secret-12",
                "mutual_user": "tgt", "mutual_secret": "target-secret",
            },
        },
        address="127.0.0.1:3260",
        random=lambda n: bytes(range(1, n + 1)),
    )


def logged_in(portal: Portal, target: str = VOL0, **kw: object) -> Initiator:
    ini = Initiator(portal)
    rsp = ini.login(target, **kw)  # type: ignore[arg-type]
    assert Initiator.status(rsp) == 0
    assert ini.conn.state is State.FULL
    return ini


def cdb_rw(op: int, lba: int, blocks: int, flags: int = 0) -> bytes:
    if op in (0x28, 0x2A, 0x2F, 0x2E):
        return bytes([op, flags]) + lba.to_bytes(4, "big") + b"\0" + blocks.to_bytes(2, "big") + b"\0"
    return bytes([op, flags]) + lba.to_bytes(8, "big") + blocks.to_bytes(4, "big") + b"\0\0"


# --- naming -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("export", "iqn"),
    [
        ("vol0", "iqn.2026-11.io.cdp:vol0"),
        ("vol0@marker17", "iqn.2026-11.io.cdp:vol0.marker17"),
        ("vol0@@123", "iqn.2026-11.io.cdp:vol0.seq-123"),
        ("vol0@before-upgrade", "iqn.2026-11.io.cdp:vol0.before-upgrade"),
        ("Vol_A@Nightly", "iqn.2026-11.io.cdp::56ol:5f:41.:4eightly"),
        ("vol0@seq-5", "iqn.2026-11.io.cdp:vol0.:73eq-5"),
        ("db.1@2024-05-01T10:00", "iqn.2026-11.io.cdp:db:2e1.2024-05-01:5410:3a00"),
    ],
)
def test_naming_round_trip(export: str, iqn: str) -> None:
    assert naming.target_name(export) == iqn
    assert naming.export_name(iqn) == export
    assert naming.export_name(iqn.upper().replace("IQN.", "iqn.")) == export
    assert set(iqn[len(naming.PREFIX):]) <= set("abcdefghijklmnopqrstuvwxyz0123456789-.:")


@pytest.mark.parametrize("bad", ["iqn.2000-01.other:vol0", naming.PREFIX, naming.PREFIX + "a.b.c",
                                 naming.PREFIX + "a:zz", naming.PREFIX + "v_l"])
def test_naming_rejects_foreign_names(bad: str) -> None:
    assert naming.export_name(bad) is None


# --- login ------------------------------------------------------------------------------------
def test_login_none_and_negotiation(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.login(VOL0)
    assert Initiator.status(rsp) == 0
    assert rsp.flags & 0x80 and rsp.flags & 0x03 == 3  # T bit, NSG=FFP
    assert rsp.u16(14) != 0  # TSIH
    keys = dict(parse_text(rsp.data))
    assert keys["MaxRecvDataSegmentLength"] == "262144"
    assert keys["InitialR2T"] == "No"
    assert keys["ImmediateData"] == "Yes"
    assert keys["ErrorRecoveryLevel"] == "0"
    assert keys["MaxOutstandingR2T"] == "1"
    assert int(keys["FirstBurstLength"]) <= int(keys["MaxBurstLength"])
    assert len(portal.sessions) == 1


def test_login_first_response_carries_tpgt(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.send(ini.login_pdu(0, 1, True, [("InitiatorName", ini.name), ("TargetName", VOL0),
                                               ("AuthMethod", "None")]))[0]
    keys = dict(parse_text(rsp.data))
    assert keys["TargetPortalGroupTag"] == "1"
    assert keys["AuthMethod"] == "None"


def test_login_unknown_key_not_understood(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.login(VOL0, operational=[("X-com.example.Foo", "1"), ("HeaderDigest", "None")])
    assert dict(parse_text(rsp.data))["X-com.example.Foo"] == "NotUnderstood"


@pytest.mark.parametrize(
    ("target", "status"),
    [("iqn.2026-11.io.cdp:nope", LoginStatus.NOT_FOUND),
     ("iqn.1999-01.other:vol0", LoginStatus.NOT_FOUND)],
)
def test_login_unknown_target(portal: Portal, target: str, status: LoginStatus) -> None:
    ini = Initiator(portal)
    rsp = ini.login(target)
    assert Initiator.status(rsp) == status
    assert ini.closed and ini.conn.state is State.CLOSED


def test_login_missing_initiator_name(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.send(ini.login_pdu(0, 1, True, [("TargetName", VOL0), ("AuthMethod", "None")]))[0]
    assert Initiator.status(rsp) == LoginStatus.MISSING_PARAMETER
    assert ini.closed


def test_chap_one_way(portal: Portal) -> None:
    ini = logged_in(portal, "iqn.2026-11.io.cdp:secure", chap=("alice", "alice-secret1"))
    assert ini.scsi(bytes([0, 0, 0, 0, 0, 0])).status == Status.GOOD


def test_chap_wrong_secret_fails_login(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.login("iqn.2026-11.io.cdp:secure", chap=("alice", "wrong"))
    assert Initiator.status(rsp) == LoginStatus.AUTH_FAILED
    assert ini.closed
    assert not portal.sessions


def test_chap_wrong_user_fails_login(portal: Portal) -> None:
    rsp = Initiator(portal).login("iqn.2026-11.io.cdp:secure", chap=("mallory", "alice-secret1"))
    assert Initiator.status(rsp) == LoginStatus.AUTH_FAILED


def test_chap_required_but_not_offered(portal: Portal) -> None:
    rsp = Initiator(portal).login("iqn.2026-11.io.cdp:secure")
    assert Initiator.status(rsp) == LoginStatus.AUTH_FAILED


def test_chap_mutual(portal: Portal) -> None:
    ini = logged_in(portal, "iqn.2026-11.io.cdp:mutual", chap=("bob", "bob-secret-12"),
                    mutual=("tgt", "target-secret"))
    assert ini.scsi(bytes(6)).status == Status.GOOD


def test_chap_mutual_refused_without_target_secret(portal: Portal) -> None:
    rsp = Initiator(portal).login("iqn.2026-11.io.cdp:secure", chap=("alice", "alice-secret1"),
                                  mutual=("tgt", "x"))
    assert Initiator.status(rsp) == LoginStatus.AUTH_FAILED


def test_chap_covers_point_in_time_views_of_a_volume(provider: MemoryProvider) -> None:
    portal = Portal(provider, {"vol0": {"user": "u", "secret": "secret-secret"}})
    rsp = Initiator(portal).login("iqn.2026-11.io.cdp:vol0.marker17")
    assert Initiator.status(rsp) == LoginStatus.AUTH_FAILED
    logged_in(portal, "iqn.2026-11.io.cdp:vol0.marker17", chap=("u", "secret-secret"))


def _md5(ident: int, secret: str, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([ident]) + secret.encode() + challenge).digest()


def test_chap_exchange_moves_only_along_its_table() -> None:
    ex = ChapExchange(lambda n: bytes(range(1, n + 1)))
    ex.config = ChapConfig("alice", "alice-secret1", "tgt", "target-secret")
    reply: list[tuple[str, str]] = []
    seen = [ex.state]
    assert ex.receive({"AuthMethod": "CHAP,None"}, reply) is LoginStatus.SUCCESS
    seen.append(ex.state)
    assert ex.receive({}, reply) is LoginStatus.SUCCESS  # an empty request waits
    assert ex.leave() is LoginStatus.SUCCESS and not ex.done  # T bit mid-exchange: stays
    assert ex.receive({"CHAP_A": "7,5"}, reply) is LoginStatus.SUCCESS
    seen.append(ex.state)
    mine = bytes(range(100, 116))
    answer = _md5(ex.ident, "alice-secret1", ex.challenge)
    keys = {"CHAP_N": "alice", "CHAP_R": encode_binary(answer),
            "CHAP_I": "7", "CHAP_C": encode_binary(mine)}
    assert ex.receive(keys, reply) is LoginStatus.SUCCESS and ex.done
    seen.append(ex.state)
    assert seen == [Auth.START, Auth.CHAP_A, Auth.CHAP_R, Auth.DONE]
    assert dict(reply)["CHAP_R"] == encode_binary(_md5(7, "target-secret", mine))
    assert ex.required_done() is LoginStatus.SUCCESS
    # DONE and FAILED are terminal; every other state can fail
    assert {src for src, _ in AUTH_TRANSITIONS} == {Auth.START, Auth.CHAP_A, Auth.CHAP_R}
    live = (Auth.START, Auth.CHAP_A, Auth.CHAP_R)
    assert all((src, AuthEv.FAIL) in AUTH_TRANSITIONS for src in live)


@pytest.mark.parametrize(
    ("config", "steps"),
    [
        (ChapConfig("alice", "alice-secret1"), [{"AuthMethod": "None"}]),  # CHAP required
        (ChapConfig("alice", "alice-secret1"), ["leave"]),  # stage left, CHAP never offered
        (ChapConfig("alice", "alice-secret1"), [{"AuthMethod": "CHAP"}, {"CHAP_A": "7"}]),
        (ChapConfig("alice", "alice-secret1"), [{"AuthMethod": "CHAP"}, {"HeaderDigest": "None"}]),
        (ChapConfig("alice", "alice-secret1"), [{"AuthMethod": "CHAP"}, "operational"]),
        (ChapConfig("alice", "alice-secret1"),
         [{"AuthMethod": "CHAP"}, {"CHAP_A": "5"}, {"CHAP_N": "alice", "CHAP_R": "0x00"}]),
        (None, [{"AuthMethod": "CHAP"}]),  # no CHAP configured, None not offered
    ],
)
def test_chap_exchange_failures_end_in_failed(
    config: ChapConfig | None, steps: list[object]
) -> None:
    ex = ChapExchange(lambda n: bytes(n))
    ex.config = config
    for step in steps[:-1]:
        assert isinstance(step, dict)
        assert ex.receive(step, []) is LoginStatus.SUCCESS
    last = steps[-1]
    if last == "leave":
        status = ex.leave()
    elif last == "operational":
        status = ex.required_done()
    else:
        assert isinstance(last, dict)
        status = ex.receive(last, [])
    assert status is LoginStatus.AUTH_FAILED
    assert ex.state is Auth.FAILED


def test_no_chap_configured_leaves_security_without_auth_method() -> None:
    ex = ChapExchange(lambda n: bytes(n))
    assert ex.leave() is LoginStatus.SUCCESS and ex.done
    assert ex.required_done() is LoginStatus.SUCCESS


def test_discovery_send_targets(portal: Portal) -> None:
    ini = Initiator(portal)
    assert Initiator.status(ini.login(None)) == 0
    rsp = ini.text([("SendTargets", "All")])
    assert rsp[0].opcode == Op.TEXT_RSP and rsp[0].final
    pairs = parse_text(rsp[0].data)
    names = [v for k, v in pairs if k == "TargetName"]
    assert names == [naming.target_name(e) for e in
                     ("vol0", "vol0@marker17", "vol0@@123", "secure", "mutual")]
    assert ("TargetAddress", "127.0.0.1:3260,1") in pairs


def test_discovery_irrelevant_session_keys(portal: Portal) -> None:
    ini = Initiator(portal)
    rsp = ini.login(None, operational=[("InitialR2T", "No"), ("MaxBurstLength", "4096")])
    keys = dict(parse_text(rsp.data))
    assert keys["InitialR2T"] == "Irrelevant"


def test_scsi_before_login_is_protocol_error(portal: Portal) -> None:
    ini = Initiator(portal)
    p = new_pdu(Op.SCSI_CMD, 0x80, 1)
    with pytest.raises(IscsiProtocolError):
        ini.send(p)
    assert ini.conn.state is State.ERROR
    with pytest.raises(IscsiProtocolError):
        ini.feed(b"x")


# --- SCSI -----------------------------------------------------------------------------------------
def test_inquiry_and_vpd(portal: Portal) -> None:
    ini = logged_in(portal)
    r = ini.scsi(bytes([0x12, 0, 0, 0, 255, 0]), edtl=255)
    assert r.status == Status.GOOD
    assert r.data[0] == 0 and r.data[8:16] == b"CDP     "
    assert r.flags & F_UNDERFLOW and r.residual == 255 - len(r.data)
    r = ini.scsi(bytes([0x12, 1, 0x00, 0, 255, 0]), edtl=255)
    assert list(r.data[4:]) == [0x00, 0x80, 0x83, 0xB0, 0xB1, 0xB2]
    r = ini.scsi(bytes([0x12, 1, 0xB2, 0, 255, 0]), edtl=255)
    assert r.data[5] & 0x80 and r.data[5] & 0x04  # LBPU, LBPRZ
    r = ini.scsi(bytes([0x12, 1, 0x83, 0, 255, 0]), edtl=255)
    assert VOL0.encode() in r.data
    r = ini.scsi(bytes([0x12, 1, 0x42, 0, 255, 0]), edtl=255)
    assert r.status == Status.CHECK_CONDITION
    assert sense_of(r.sense) == (SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB)


def test_read_capacity16_thin_bits(portal: Portal) -> None:
    ini = logged_in(portal)
    r = ini.scsi(bytes([0x9E, 0x10]) + bytes(8) + (32).to_bytes(4, "big") + b"\0\0", edtl=32)
    assert int.from_bytes(r.data[0:8], "big") == SIZE // 512 - 1
    assert int.from_bytes(r.data[8:12], "big") == 512
    assert r.data[13] == 3  # 4096-byte physical blocks
    assert r.data[14] & 0xC0 == 0xC0  # LBPME, LBPRZ
    r = ini.scsi(bytes([0x25]) + bytes(9), edtl=8)
    assert int.from_bytes(r.data[0:4], "big") == SIZE // 512 - 1


def test_write_read_with_r2t(portal: Portal, provider: MemoryProvider) -> None:
    ini = logged_in(portal)
    data = bytes(range(256)) * 1024  # 256 KiB: immediate 64 KiB + R2T
    w = ini.scsi(cdb_rw(0x2A, 8, len(data) // 512), data, immediate_len=8192)
    assert w.status == Status.GOOD
    assert any(p.opcode == Op.R2T for p in w.pdus)
    assert_bytes_equal(bytes(provider.exports["vol0"].data[4096 : 4096 + len(data)]), data)
    r = ini.scsi(cdb_rw(0x28, 8, len(data) // 512), edtl=len(data))
    assert r.status == Status.GOOD
    assert_bytes_equal(r.data, data)
    assert not r.flags & (F_OVERFLOW | F_UNDERFLOW)
    # one Data-In per MaxRecvDataSegmentLength, the last carries the status
    dins = [p for p in r.pdus if p.opcode == Op.DATA_IN]
    assert len(dins) == 1 and dins[-1].flags & 0x01


def test_fua_and_sync_cache_flush(portal: Portal, provider: MemoryProvider) -> None:
    ini = logged_in(portal)
    dev = provider.exports["vol0"]
    before = dev.flushes
    assert ini.scsi(bytes([0x35]) + bytes(9)).status == Status.GOOD
    assert dev.flushes == before + 1


def test_read_residuals(portal: Portal) -> None:
    ini = logged_in(portal)
    r = ini.scsi(cdb_rw(0x28, 0, 1), edtl=10000)
    assert r.status == Status.GOOD and len(r.data) == 512
    assert r.flags & F_UNDERFLOW and r.residual == 10000 - 512
    r = ini.scsi(cdb_rw(0x28, 0, 1), edtl=200)
    assert len(r.data) == 200 and r.flags & F_OVERFLOW and r.residual == 312


def test_write_residual_overflow_writes_edtl(portal: Portal, provider: MemoryProvider) -> None:
    ini = logged_in(portal)
    r = ini.scsi(cdb_rw(0x2A, 0, 2), b"b" * 512)
    assert r.status == Status.GOOD and r.flags & F_OVERFLOW and r.residual == 512
    assert bytes(provider.exports["vol0"].data[:1024]) == b"b" * 512 + bytes(512)


@pytest.mark.parametrize(
    ("cdb", "key", "asc"),
    [
        (cdb_rw(0x28, SIZE // 512, 1), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE),
        (bytes([0xC7]) + bytes(9), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_OPCODE),
        (cdb_rw(0x28, 0, 1, flags=0x20), SenseKey.ILLEGAL_REQUEST, Asc.INVALID_FIELD_IN_CDB),
        (bytes([0x1A, 0, 0x3F | 0xC0, 0, 255, 0]), SenseKey.ILLEGAL_REQUEST,
         Asc.SAVING_PARAMETERS_NOT_SUPPORTED),
    ],
)
def test_sense_data(portal: Portal, cdb: bytes, key: int, asc: int) -> None:
    ini = logged_in(portal)
    r = ini.scsi(cdb, edtl=512)
    assert r.status == Status.CHECK_CONDITION
    assert sense_of(r.sense) == (key, asc)


def test_read_only_view_rejects_writes(portal: Portal) -> None:
    ini = logged_in(portal, "iqn.2026-11.io.cdp:vol0.marker17")
    r = ini.scsi(cdb_rw(0x2A, 0, 1), b"x" * 512)
    assert sense_of(r.sense) == (SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED)
    ms = ini.scsi(bytes([0x1A, 0x08, 0x3F, 0, 255, 0]), edtl=255)
    assert ms.data[2] & 0x80  # WP in the mode parameter header
    assert ini.scsi(cdb_rw(0x28, 0, 1), edtl=512).status == Status.GOOD


def test_unmap_and_get_lba_status(portal: Portal) -> None:
    ini = logged_in(portal)
    ini.scsi(cdb_rw(0x2A, 0, 64), b"\xff" * 64 * 512)
    desc = (0).to_bytes(8, "big") + (32).to_bytes(4, "big") + bytes(4)
    param = (22).to_bytes(2, "big") + (16).to_bytes(2, "big") + bytes(4) + desc
    r = ini.scsi(bytes([0x42, 0, 0, 0, 0, 0, 0]) + len(param).to_bytes(2, "big") + b"\0", param)
    assert r.status == Status.GOOD
    r = ini.scsi(bytes([0x9E, 0x12]) + (0).to_bytes(8, "big") + (64).to_bytes(4, "big") + b"\0\0",
                 edtl=64)
    first = r.data[8:24]
    assert int.from_bytes(first[0:8], "big") == 0
    assert int.from_bytes(first[8:12], "big") == 32 and first[12] == 1  # deallocated
    second = r.data[24:40]
    assert int.from_bytes(second[0:8], "big") == 32 and second[12] == 0  # mapped
    assert_bytes_equal(ini.scsi(cdb_rw(0x28, 0, 32), edtl=32 * 512).data, bytes(32 * 512))


def test_compare_and_write_miscompare(portal: Portal) -> None:
    ini = logged_in(portal)
    ini.scsi(cdb_rw(0x2A, 0, 1), b"A" * 512)
    caw = bytes([0x89, 0]) + (0).to_bytes(8, "big") + bytes([0, 0, 0, 1, 0, 0])
    r = ini.scsi(caw, b"B" * 512 + b"C" * 512)
    assert r.status == Status.CHECK_CONDITION
    assert sense_of(r.sense) == (SenseKey.MISCOMPARE, Asc.MISCOMPARE_DURING_VERIFY)
    assert ini.scsi(caw, b"A" * 512 + b"C" * 512).status == Status.GOOD
    assert ini.scsi(cdb_rw(0x28, 0, 1), edtl=512).data == b"C" * 512


def test_report_luns_and_missing_lun(portal: Portal) -> None:
    ini = logged_in(portal)
    r = ini.scsi(bytes([0xA0, 0, 0, 0, 0, 0]) + (64).to_bytes(4, "big") + b"\0\0", edtl=64)
    assert r.data[:4] == (8).to_bytes(4, "big") and r.data[8:16] == bytes(8)
    r = ini.scsi(bytes([0x12, 0, 0, 0, 36, 0]), edtl=36, lun=3)
    assert r.data[0] == 0x7F
    r = ini.scsi(bytes(6), lun=3)
    assert sense_of(r.sense) == (SenseKey.ILLEGAL_REQUEST, Asc.LUN_NOT_SUPPORTED)


def test_reservations_between_two_sessions(portal: Portal) -> None:
    a = logged_in(portal)
    b = Initiator(portal, name="iqn.2026-11.test:other", isid=b"\x80\0\0\0\0\x02")
    assert Initiator.status(b.login(VOL0)) == 0
    assert a.scsi(bytes([0x16]) + bytes(5)).status == Status.GOOD
    assert b.scsi(cdb_rw(0x28, 0, 1), edtl=512).status == Status.RESERVATION_CONFLICT
    assert b.scsi(bytes([0x12, 0, 0, 0, 36, 0]), edtl=36).status == Status.GOOD
    a.logout()
    assert b.scsi(cdb_rw(0x28, 0, 1), edtl=512).status == Status.GOOD


def test_persistent_reservation_write_exclusive(portal: Portal) -> None:
    a = logged_in(portal)
    b = Initiator(portal, name="iqn.2026-11.test:other", isid=b"\x80\0\0\0\0\x02")
    b.login(VOL0)

    def prout(ini: Initiator, sa: int, key: int, sakey: int, ptype: int = 0) -> int:
        param = key.to_bytes(8, "big") + sakey.to_bytes(8, "big") + bytes(8)
        cdb = bytes([0x5F, sa, ptype, 0, 0]) + (24).to_bytes(4, "big") + b"\0"
        return ini.scsi(cdb, param).status

    assert prout(a, 0, 0, 0xAA) == Status.GOOD  # REGISTER
    assert prout(a, 1, 0xAA, 0, ptype=1) == Status.GOOD  # RESERVE, write exclusive
    assert b.scsi(cdb_rw(0x28, 0, 1), edtl=512).status == Status.GOOD
    assert b.scsi(cdb_rw(0x2A, 0, 1), b"z" * 512).status == Status.RESERVATION_CONFLICT
    assert a.scsi(cdb_rw(0x2A, 0, 1), b"z" * 512).status == Status.GOOD
    keys = a.scsi(bytes([0x5E, 0, 0, 0, 0, 0, 0, 0, 64, 0]), edtl=64).data
    assert keys[8:16] == (0xAA).to_bytes(8, "big")
    assert prout(a, 2, 0xAA, 0, ptype=1) == Status.GOOD  # RELEASE
    assert b.scsi(cdb_rw(0x2A, 0, 1), b"z" * 512).status == Status.GOOD


# --- CmdSN window, NOP, Text, Logout --------------------------------------------------------
def test_cmdsn_outside_window_is_ignored(portal: Portal) -> None:
    ini = logged_in(portal)
    good = ini.cmdsn
    ini.cmdsn = good + 500  # beyond MaxCmdSN
    r = ini.scsi(bytes(6))
    assert r.pdus == []
    ini.cmdsn = good - 1  # already used
    assert ini.scsi(bytes(6)).pdus == []
    ini.cmdsn = good
    r = ini.scsi(bytes(6))
    assert r.status == Status.GOOD
    rsp = r.pdus[-1]
    assert rsp.u32(28) == good + 1  # ExpCmdSN
    assert rsp.u32(32) == good + 128  # MaxCmdSN: a 128-command window


def test_nop_echo_and_target_ping(portal: Portal) -> None:
    ini = logged_in(portal)
    rsp = ini.nop(b"ping-data")
    assert rsp[0].opcode == Op.NOP_IN and rsp[0].data == b"ping-data"
    ini.conn.ping()
    pings = ini.collect()
    assert pings[0].opcode == Op.NOP_IN and pings[0].itt == 0xFFFFFFFF
    ttt = pings[0].u32(20)
    reply = new_pdu(Op.NOP_OUT | 0x40, 0x80, 0xFFFFFFFF)
    reply.set(20, 4, ttt)
    reply.set(24, 4, ini.cmdsn)
    assert ini.send(reply) == []
    assert ini.conn.ping_ttt is None


def test_logout_closes(portal: Portal) -> None:
    ini = logged_in(portal)
    rsp = ini.logout()
    assert rsp[0].opcode == Op.LOGOUT_RSP and rsp[0].bhs[2] == 0
    assert ini.closed and not portal.sessions


def test_session_reinstatement(portal: Portal) -> None:
    killed: list[object] = []
    portal.on_kill = killed.append
    a = logged_in(portal)
    b = logged_in(portal)  # same initiator name and ISID
    assert killed == [a.conn]
    assert len(portal.sessions) == 1
    assert b.scsi(bytes(6)).status == Status.GOOD


def test_snack_and_unknown_opcodes_rejected(portal: Portal) -> None:
    ini = logged_in(portal)
    for op in (Op.SNACK, 0x0D):
        out = ini.send(new_pdu(op, 0x80, 5))
        assert out[0].opcode == Op.REJECT
    assert ini.scsi(bytes(6)).status == Status.GOOD


# --- task management ----------------------------------------------------------------------
def test_abort_task_waiting_for_data(portal: Portal) -> None:
    ini = logged_in(portal, operational=[("InitialR2T", "Yes"), ("ImmediateData", "No")])
    p = new_pdu(Op.SCSI_CMD, 0x80 | 0x20 | 1, 0x99)
    p.set(20, 4, 512)
    p.set(24, 4, ini.cmdsn)
    p.bhs[32:42] = cdb_rw(0x2A, 0, 1)
    ini.cmdsn += 1
    out = ini.send(p)
    assert out[0].opcode == Op.R2T
    rsp = ini.tmf(TmfFunction.ABORT_TASK, rtt=0x99, refcmdsn=ini.cmdsn - 1)
    assert rsp[0].opcode == Op.TASK_MGMT_RSP and rsp[0].bhs[2] == TmfResponse.COMPLETE
    d = new_pdu(Op.DATA_OUT, 0x80, 0x99, b"x" * 512)
    d.set(20, 4, out[0].u32(20))
    assert ini.send(d) == []  # data for an aborted task is dropped
    assert ini.scsi(bytes(6)).status == Status.GOOD


def test_abort_unknown_task_and_lun_reset(portal: Portal) -> None:
    ini = logged_in(portal)
    rsp = ini.tmf(TmfFunction.ABORT_TASK, rtt=0x1234, refcmdsn=ini.cmdsn + 50)
    assert rsp[0].bhs[2] == TmfResponse.NO_TASK
    assert ini.scsi(bytes([0x16]) + bytes(5)).status == Status.GOOD  # RESERVE
    rsp = ini.tmf(TmfFunction.LOGICAL_UNIT_RESET)
    assert rsp[0].bhs[2] == TmfResponse.COMPLETE
    assert portal.lu_states["vol0"].reserved_by is None
    assert ini.tmf(TmfFunction.LOGICAL_UNIT_RESET, lun=5)[0].bhs[2] == TmfResponse.NO_LUN
    assert ini.tmf(TmfFunction.TARGET_WARM_RESET)[0].bhs[2] == TmfResponse.COMPLETE
    assert ini.tmf(TmfFunction.TASK_REASSIGN)[0].bhs[2] == TmfResponse.NO_REASSIGN


# --- digests and bad framing -----------------------------------------------------------------
def test_crc32c_digests(portal: Portal) -> None:
    ini = logged_in(portal, operational=[("HeaderDigest", "CRC32C,None"),
                                         ("DataDigest", "CRC32C,None")])
    assert ini.header_digest and ini.data_digest
    r = ini.scsi(cdb_rw(0x2A, 0, 2), b"q" * 1024)
    assert r.status == Status.GOOD
    assert ini.scsi(cdb_rw(0x28, 0, 2), edtl=1024).data == b"q" * 1024
    # a bad data digest: Reject (reason 2), the connection carries on
    p = new_pdu(Op.NOP_OUT | 0x40, 0x80, 0x77, b"abcd")
    p.set(20, 4, 0xFFFFFFFF)
    raw = bytearray(p.encode(True, True))
    raw[-1] ^= 0xFF
    out = ini.feed(bytes(raw))
    assert out[0].opcode == Op.REJECT and out[0].bhs[2] == RejectReason.DATA_DIGEST
    assert ini.scsi(bytes(6)).status == Status.GOOD
    # a bad header digest: the stream cannot be trusted, the connection closes
    raw = bytearray(p.encode(True, True))
    raw[50] ^= 0xFF
    with pytest.raises(IscsiProtocolError):
        ini.feed(bytes(raw))
    assert ini.conn.state is State.ERROR
    assert not portal.sessions


def test_oversized_data_segment_rejected_then_closed(portal: Portal) -> None:
    ini = logged_in(portal)
    p = new_pdu(Op.NOP_OUT | 0x40, 0x80, 0x77)
    raw = bytearray(p.encode())
    raw[5:8] = (1 << 20).to_bytes(3, "big")  # > MaxRecvDataSegmentLength
    with pytest.raises(IscsiProtocolError):
        ini.feed(bytes(raw))
    out = ini.collect()
    assert out and out[0].opcode == Op.REJECT and out[0].bhs[2] == RejectReason.PROTOCOL_ERROR


# --- exception -> sense mapping --------------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "key", "asc"),
    [
        (ReadOnly("x"), SenseKey.DATA_PROTECT, Asc.WRITE_PROTECTED),
        (OutOfRange("x"), SenseKey.ILLEGAL_REQUEST, Asc.LBA_OUT_OF_RANGE),
        (Corruption("x"), SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR),
        (StoreFull("x"), SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        (NotFound("x"), SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE),
        (CdpError("x"), SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE),
        (OSError(28, "full"), SenseKey.DATA_PROTECT, Asc.SPACE_ALLOCATION_FAILED_WRITE_PROTECT),
        (RuntimeError("bug"), SenseKey.HARDWARE_ERROR, Asc.INTERNAL_TARGET_FAILURE),
    ],
)
def test_scsi_sense_mapping(exc: BaseException, key: SenseKey, asc: Asc) -> None:
    s = scsi_sense(exc)
    assert (s.key, s.asc) == (key, asc)
    assert sense_of(s.fixed()) == (key, asc)


def test_device_errors_become_sense(portal: Portal, provider: MemoryProvider) -> None:
    dev = provider.exports["vol0"]

    def broken(offset: int, length: int) -> bytes:
        raise Corruption("bad crc")

    dev.read = broken  # type: ignore[method-assign]
    ini = logged_in(portal)
    r = ini.scsi(cdb_rw(0x28, 0, 1), edtl=512)
    assert sense_of(r.sense) == (SenseKey.MEDIUM_ERROR, Asc.UNRECOVERED_READ_ERROR)


def test_write_announcing_gigabytes_is_refused_without_buffering(portal: Portal) -> None:
    """Regression (found by the coverage-guided fuzzer): a WRITE whose EDTL announced
    4 GiB with a few bytes of immediate data made the target allocate 4 GiB up front.
    Now: CHECK CONDITION / INVALID FIELD IN CDB at once, nothing buffered, and the
    session keeps working."""
    import resource

    ini = logged_in(portal)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    r = ini.scsi(cdb_rw(0x2A, 0, 1), b"w" * 512, edtl=0xFFFFFFFF)
    assert r.status == Status.CHECK_CONDITION
    assert r.sense[2] & 0x0F == 0x05 and r.sense[12] == 0x24  # ILLEGAL REQUEST, INVALID FIELD
    assert not ini.conn.tasks
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 256 << 10  # KiB
    assert ini.scsi(cdb_rw(0x2A, 8, 1), b"v" * 512).status == Status.GOOD
    assert ini.scsi(cdb_rw(0x28, 8, 1), edtl=512).data == b"v" * 512


def test_write_data_out_bursts_assemble_in_place(portal: Portal) -> None:
    """The write buffer grows with the data: a 4 MiB write in R2T bursts after 8 KiB of
    immediate data reads back exactly."""
    ini = logged_in(portal)
    data = bytes(range(256)) * (4 << 12)
    assert ini.scsi(cdb_rw(0x2A, 0, len(data) // 512), data, immediate_len=8192).status == Status.GOOD
    assert_bytes_equal(ini.scsi(cdb_rw(0x28, 0, len(data) // 512), edtl=len(data)).data, data)


def test_login_split_by_continue_still_needs_initiator_and_target(portal: Portal) -> None:
    """Regression (found by the coverage-guided fuzzer): a login request sent as a
    Continue PDU and a final PDU, without InitiatorName, reached full feature phase
    with no target opened and failed an internal assertion. The keys of the first
    complete request are checked however many PDUs carried them."""
    ini = Initiator(portal)
    p1 = ini.login_pdu(1, 3, False, [("InitiatorNYme", "iqn.2026-11.test:f"),
                                      ("TargetName", VOL0)])
    p1.bhs[1] |= 0x40  # Continue
    p2 = ini.login_pdu(1, 3, True, [("HeaderDigest", "None")])
    out = ini.feed(p1.encode() + p2.encode())
    rsp = [x for x in out if x.opcode == 0x23]
    assert Initiator.status(rsp[-1]) == 0x0207  # MISSING PARAMETER
    assert ini.conn.state is not State.FULL
