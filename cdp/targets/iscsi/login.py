"""iSCSI login keys (RFC 7143 §6, §13): who logs in to what, operational negotiation, and
the security stage as a CHAP exchange. Sans-I/O, like :mod:`.core`.

Design notes
------------
- Split as tgt splits ``usr/iscsi/param.c`` and ``chap.c`` from the connection: the
  core reads the login PDUs (stages, Continue, ISID, the response PDU) and makes every
  connection state move (its ``TRANSITIONS`` table, h11's Rule 1); a :class:`Login`
  only answers keys. :meth:`Login.request` takes one complete request's keys and
  returns a :class:`~cdp.targets.iscsi.pdu.LoginStatus` and the reply keys.
- The security stage is a :class:`ChapExchange` whose states (:class:`Auth`) move only
  along :data:`AUTH_TRANSITIONS`: AuthMethod agreed (CHAP, or None when the target
  needs none), CHAP_A answered with CHAP_I / CHAP_C, CHAP_N / CHAP_R checked (and a
  mutual CHAP_I / CHAP_C answered). Any failure ends in FAILED and fails the login with
  AUTHENTICATION FAILURE.
- Negotiated values land in :class:`Params`, which the connection keeps using in full
  feature phase; digests agreed during login take effect only when it completes
  (:attr:`Login.digests`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum, auto
from typing import Final, Protocol

from cdp.errors import CdpError, ConfigError
from cdp.targets.blockdev import BlockDevice, ExportProvider
from cdp.targets.iscsi import naming
from cdp.targets.iscsi.pdu import IscsiProtocolError, LoginStatus, decode_binary, encode_binary

#: login stages (CSG / NSG)
SECURITY, OPERATIONAL, FULL_FEATURE = 0, 1, 3

OUR_MRDSL: Final = 262144
OUR_MAX_BURST: Final = 1 << 20
OUR_FIRST_BURST: Final = 262144
OUR_MAX_R2T: Final = 16

_SESSION_ONLY: Final = frozenset(
    {"InitialR2T", "ImmediateData", "MaxBurstLength", "FirstBurstLength",
     "MaxOutstandingR2T", "DataPDUInOrder", "DataSequenceInOrder"}
)


# --- configuration ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class ChapConfig:
    """CHAP for one target: the initiator proves ``user``/``secret``; with
    ``mutual_user``/``mutual_secret`` the target proves itself back when asked."""

    user: str
    secret: str
    mutual_user: str = ""
    mutual_secret: str = ""

    @classmethod
    def from_mapping(cls, m: Mapping[str, str] | ChapConfig) -> ChapConfig:
        if isinstance(m, ChapConfig):
            return m
        unknown = set(m) - {"user", "secret", "mutual_user", "mutual_secret"}
        if unknown or "user" not in m or "secret" not in m:
            raise ConfigError(f"CHAP settings need user and secret (unknown: {sorted(unknown)})")
        return cls(m["user"], m["secret"], m.get("mutual_user", ""), m.get("mutual_secret", ""))


@dataclass(slots=True)
class Params:
    """Negotiated operational parameters (RFC 7143 defaults until negotiated)."""

    header_digest: bool = False
    data_digest: bool = False
    peer_mrdsl: int = 8192  # what we may send in one PDU
    max_burst: int = 262144
    first_burst: int = 65536
    immediate_data: bool = True
    initial_r2t: bool = True
    max_r2t: int = 1


class LoginPortal(Protocol):
    """What a login needs from the portal (:class:`~cdp.targets.iscsi.core.Portal`)."""

    @property
    def provider(self) -> ExportProvider: ...

    @property
    def tpgt(self) -> int: ...

    @property
    def random(self) -> Callable[[int], bytes]: ...

    @property
    def sessions(self) -> Mapping[int, object]: ...

    def chap_for(self, iqn: str, export: str | None) -> ChapConfig | None: ...

    def exports(self) -> list[str]: ...


# --- the security stage -------------------------------------------------------------------
class Auth(Enum):
    START = auto()  # no AuthMethod agreed yet
    CHAP_A = auto()  # AuthMethod=CHAP agreed; waiting for CHAP_A
    CHAP_R = auto()  # challenge sent; waiting for CHAP_N / CHAP_R
    DONE = auto()  # authenticated, or no authentication needed
    FAILED = auto()


class AuthEv(Enum):
    NONE = auto()  # AuthMethod=None agreed, or the stage left without one: none needed
    CHAP = auto()  # AuthMethod=CHAP agreed
    CHALLENGE = auto()  # CHAP_A=5 accepted; CHAP_I / CHAP_C sent
    RESPONSE = auto()  # CHAP_N / CHAP_R verified (and a mutual challenge answered)
    FAIL = auto()


#: every state change of a CHAP exchange; anything else -> FAILED
AUTH_TRANSITIONS: Final[dict[tuple[Auth, AuthEv], Auth]] = {
    (Auth.START, AuthEv.NONE): Auth.DONE,
    (Auth.START, AuthEv.CHAP): Auth.CHAP_A,
    (Auth.CHAP_A, AuthEv.CHALLENGE): Auth.CHAP_R,
    (Auth.CHAP_R, AuthEv.RESPONSE): Auth.DONE,
    (Auth.START, AuthEv.FAIL): Auth.FAILED,
    (Auth.CHAP_A, AuthEv.FAIL): Auth.FAILED,
    (Auth.CHAP_R, AuthEv.FAIL): Auth.FAILED,
}


class ChapExchange:
    """The security stage of one login: CHAP (MD5) when ``config`` is set, else None.

    ``config`` is set once the target is known (the first complete request)."""

    def __init__(self, random: Callable[[int], bytes]) -> None:
        self.random = random
        self.config: ChapConfig | None = None
        self.state = Auth.START
        self.ident = 0
        self.challenge = b""

    @property
    def done(self) -> bool:
        return self.state is Auth.DONE

    def _move(self, ev: AuthEv) -> None:
        self.state = AUTH_TRANSITIONS.get((self.state, ev), Auth.FAILED)

    def _fail(self) -> LoginStatus:
        self._move(AuthEv.FAIL)
        return LoginStatus.AUTH_FAILED

    def receive(self, keys: dict[str, str], reply: list[tuple[str, str]]) -> LoginStatus:
        """One security-stage request's keys (all of them); appends the answers to
        ``reply``. A request without keys while CHAP is under way just waits."""
        state = self.state
        chap = self.config
        if "AuthMethod" in keys and state is Auth.START:
            offered = keys["AuthMethod"].split(",")
            if chap is not None:
                if "CHAP" not in offered:
                    return self._fail()
                reply.append(("AuthMethod", "CHAP"))
                self._move(AuthEv.CHAP)
                return LoginStatus.SUCCESS
            if "None" not in offered:
                return self._fail()
            reply.append(("AuthMethod", "None"))
            self._move(AuthEv.NONE)
            return LoginStatus.SUCCESS
        if state is Auth.CHAP_A and "CHAP_A" in keys:
            if "5" not in keys["CHAP_A"].split(","):
                reply.append(("CHAP_A", "Reject"))
                return self._fail()
            self.ident = self.random(1)[0]
            self.challenge = self.random(16)
            reply.append(("CHAP_A", "5"))
            reply.append(("CHAP_I", str(self.ident)))
            reply.append(("CHAP_C", encode_binary(self.challenge)))
            self._move(AuthEv.CHALLENGE)
            return LoginStatus.SUCCESS
        if state is Auth.CHAP_R and ("CHAP_N" in keys or "CHAP_R" in keys):
            assert chap is not None
            try:
                response = decode_binary(keys.get("CHAP_R", ""))
            except IscsiProtocolError:
                return self._fail()
            want = _chap_md5(self.ident, chap.secret.encode(), self.challenge)
            if keys.get("CHAP_N") != chap.user or response != want:
                return self._fail()
            if "CHAP_I" in keys or "CHAP_C" in keys:
                if not chap.mutual_secret:
                    return self._fail()
                try:
                    ident = int(keys.get("CHAP_I", ""), 0)
                    challenge = decode_binary(keys.get("CHAP_C", ""))
                except (ValueError, IscsiProtocolError):
                    return self._fail()
                if not 0 <= ident <= 255 or not challenge or challenge == self.challenge:
                    return self._fail()
                reply.append(("CHAP_N", chap.mutual_user or chap.user))
                reply.append(("CHAP_R", encode_binary(
                    _chap_md5(ident, chap.mutual_secret.encode(), challenge))))
            self._move(AuthEv.RESPONSE)
            return LoginStatus.SUCCESS
        if state in (Auth.CHAP_A, Auth.CHAP_R):
            return LoginStatus.SUCCESS if not keys else self._fail()
        return LoginStatus.SUCCESS

    def leave(self) -> LoginStatus:
        """The initiator asks to leave the security stage (T bit). Without AuthMethod
        that is fine only when the target needs no CHAP; during CHAP it stays (the
        caller sees :attr:`done` False)."""
        if self.state is Auth.START:
            if self.config is None:
                self._move(AuthEv.NONE)
                return LoginStatus.SUCCESS
            return self._fail()  # CHAP required, never offered
        return LoginStatus.SUCCESS

    def required_done(self) -> LoginStatus:
        """Operational stage: fails unless CHAP, when required, has completed."""
        if self.config is not None and self.state is not Auth.DONE:
            return self._fail()
        return LoginStatus.SUCCESS


def _chap_md5(ident: int, secret: bytes, challenge: bytes) -> bytes:
    return hashlib.md5(bytes([ident]) + secret + challenge).digest()


# --- the login ----------------------------------------------------------------------------
class Login:
    """The login of one connection: who logs in to which export, what was negotiated,
    and the security stage. The connection reads the PDUs and makes the moves."""

    def __init__(self, portal: LoginPortal) -> None:
        self.portal = portal
        self.params = Params()
        self.auth = ChapExchange(portal.random)
        self.isid = b""
        self.tsih = 0
        self.initiator = ""
        self.kind = "Normal"
        self.target = ""
        self.export: str | None = None
        #: the export opened for a normal session; the session owns it once it starts
        self.device: BlockDevice | None = None
        #: (header, data) digests agreed; they take effect when the login completes
        self.digests = (False, False)
        self._declared = False
        self._first_rsp = True
        self._keys_done = False  # the first complete login request's keys were checked

    def request(self, pairs: list[tuple[str, str]], stage: int,
                transit: bool) -> tuple[LoginStatus, list[tuple[str, str]]]:
        """Answer one complete login request in ``stage`` (SECURITY or OPERATIONAL);
        ``transit``: the initiator asks to leave the stage. Returns SUCCESS or the
        status the login fails with, and the reply keys."""
        # the first *complete* request carries InitiatorName / TargetName, however many
        # Continue PDUs it took (RFC 7143 §13.5.1)
        status, reply = self._keys(pairs, not self._keys_done, stage)
        self._keys_done = True
        if status is not LoginStatus.SUCCESS:
            return status, reply
        if stage == SECURITY and transit:
            status = self.auth.leave()
            if status is not LoginStatus.SUCCESS:
                return status, []
        if stage == OPERATIONAL:
            status = self.auth.required_done()
            if status is not LoginStatus.SUCCESS:
                return status, []
            if not self._declared:
                self._declared = True
                reply.append(("MaxRecvDataSegmentLength", str(OUR_MRDSL)))
        return LoginStatus.SUCCESS, reply

    def _keys(self, pairs: list[tuple[str, str]], first: bool,
              stage: int) -> tuple[LoginStatus, list[tuple[str, str]]]:
        reply: list[tuple[str, str]] = []
        keys = dict(pairs)
        if len(keys) != len(pairs):
            return LoginStatus.INITIATOR_ERROR, reply
        if first:
            self.initiator = keys.get("InitiatorName", "")
            if not self.initiator:
                return LoginStatus.MISSING_PARAMETER, reply
            self.kind = keys.get("SessionType", "Normal")
            if self.kind not in ("Normal", "Discovery"):
                return LoginStatus.SESSION_TYPE_UNSUPPORTED, reply
            if self.tsih != 0:
                existing = self.portal.sessions.get(self.tsih)
                return (LoginStatus.TOO_MANY_CONNECTIONS if existing is not None
                        else LoginStatus.SESSION_DOES_NOT_EXIST), reply
            if self.kind == "Normal":
                target = keys.get("TargetName", "")
                if not target:
                    return LoginStatus.MISSING_PARAMETER, reply
                export = naming.export_name(target)
                if export is None or export not in self.portal.exports():
                    return LoginStatus.NOT_FOUND, reply
                try:
                    self.device = self.portal.provider.open_export(export)
                except CdpError:
                    return LoginStatus.NOT_FOUND, reply
                except Exception:
                    return LoginStatus.TARGET_ERROR, reply
                self.target = naming.target_name(export)
                self.export = export
                self.auth.config = self.portal.chap_for(target, export)
            else:
                self.auth.config = self.portal.chap_for("", None)
            if self._first_rsp and self.kind == "Normal":
                reply.append(("TargetPortalGroupTag", str(self.portal.tpgt)))
            self._first_rsp = False
        discovery = self.kind == "Discovery"
        for key, value in pairs:
            if key in ("InitiatorName", "InitiatorAlias", "SessionType", "TargetName"):
                continue
            if key == "AuthMethod" or key.startswith("CHAP_"):
                if stage != SECURITY:
                    return LoginStatus.INITIATOR_ERROR, reply
                continue
            try:
                res = self._negotiate(key, value, discovery)
            except ValueError:
                return LoginStatus.INITIATOR_ERROR, reply
            if res is not None:
                reply.append((key, res))
        if stage == SECURITY:
            status = self.auth.receive(keys, reply)
            if status is not LoginStatus.SUCCESS:
                return status, reply
        return LoginStatus.SUCCESS, reply

    def _negotiate(self, key: str, value: str, discovery: bool) -> str | None:
        """Our answer to one operational key (None: declarative, no answer)."""
        p = self.params
        if discovery and key in _SESSION_ONLY:
            return "Irrelevant"
        if key in ("HeaderDigest", "DataDigest"):
            offered = value.split(",")
            pick = next((o for o in offered if o in ("CRC32C", "None")), None)
            if pick is None:
                return "Reject"
            hd, dd = self.digests
            on = pick == "CRC32C"
            self.digests = (on, dd) if key == "HeaderDigest" else (hd, on)
            return pick
        if key == "MaxRecvDataSegmentLength":
            p.peer_mrdsl = parse_number(value, 512, 0xFFFFFF)
            return None
        if key == "MaxBurstLength":
            p.max_burst = min(parse_number(value, 512, 0xFFFFFF), OUR_MAX_BURST)
            p.first_burst = min(p.first_burst, p.max_burst)
            return str(p.max_burst)
        if key == "FirstBurstLength":
            p.first_burst = min(parse_number(value, 512, 0xFFFFFF), OUR_FIRST_BURST, p.max_burst)
            return str(p.first_burst)
        if key == "ImmediateData":
            p.immediate_data = _bool(value)
            return "Yes" if p.immediate_data else "No"
        if key == "InitialR2T":
            p.initial_r2t = _bool(value)
            return "Yes" if p.initial_r2t else "No"
        if key == "MaxOutstandingR2T":
            p.max_r2t = min(parse_number(value, 1, 65535), OUR_MAX_R2T)
            return str(p.max_r2t)
        if key in ("DataPDUInOrder", "DataSequenceInOrder"):
            _bool(value)
            return "Yes"
        if key == "ErrorRecoveryLevel":
            parse_number(value, 0, 2)
            return "0"
        if key == "MaxConnections":
            parse_number(value, 1, 65535)
            return "1"
        if key == "DefaultTime2Wait":
            return str(max(parse_number(value, 0, 3600), 2))
        if key == "DefaultTime2Retain":
            parse_number(value, 0, 3600)
            return "0"
        if key in ("IFMarker", "OFMarker"):
            return "No"
        if key in ("IFMarkInt", "OFMarkInt"):
            return "Irrelevant"
        return "NotUnderstood"


def parse_number(value: str, lo: int, hi: int) -> int:
    """A decimal key value in ``[lo, hi]``; ValueError otherwise."""
    if not value.isdigit():
        raise ValueError(value)
    n = int(value)
    if not lo <= n <= hi:
        raise ValueError(value)
    return n


def _bool(value: str) -> bool:
    if value not in ("Yes", "No"):
        raise ValueError(value)
    return value == "Yes"
