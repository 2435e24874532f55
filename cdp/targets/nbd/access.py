"""Who may use which export: NBD clients named by their TLS client certificate.

Design notes
------------
- NBD itself has no client authentication. With ``tls_verify_peer`` (as ``nbdkit
  --tls-verify-peer``) the TLS handshake requires a client certificate signed by
  ``tls_ca``: a client without one, or with one from another CA, fails the handshake
  and never reaches option haggling, so nothing it sends reaches a device.
- A verified client's identity is its certificate subject as an RFC 4514 string
  (``CN=backup01,O=Example``: most specific attribute first, as ``openssl x509
  -subject -nameopt RFC2253`` prints it). Configured subjects are compared after
  :func:`normalize_subject` (attribute names case-insensitive, long names such as
  ``commonName`` accepted, spaces around ``=`` and ``,`` ignored).
- Per-volume access (``[[nbd.client]]`` rows: ``subject``, ``read_write``,
  ``read_only``, volume names or ``"*"``) is enforced by :class:`ClientExports`, an
  :class:`~cdp.targets.blockdev.ExportProvider` wrapped around the store's for one
  connection once TLS is up. The core sees only a provider: a refused export raises
  :class:`AccessDenied` (a PermissionError), which the core answers
  NBD_REP_ERR_POLICY with the reason and reports as a ``Refused`` event (logged with
  the identity in the reason). A read-only grant wraps the device in
  :class:`ReadOnlyView`: the core then refuses writes itself (EPERM, read-only flag
  advertised) and the view refuses them again should one get through.
- Without ``[[nbd.client]]`` rows every verified client may use every export, as
  nbdkit does. Point-in-time exports (``vol0@marker3``) are read-only anyway: either
  list grants them.
- With pre-shared keys (``tls_psk``, as ``nbdkit --tls-psk``) instead of certificates
  the identity is the PSK user the client proved the key of, and ``[[nbd.client]]``
  rows name ``user`` instead of ``subject``. A server has one or the other, so the
  two kinds of identity never meet in one rule table.
"""

from __future__ import annotations

import errno as _errno
import re
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from cdp.errors import CdpError, ConfigError, ReadOnly
from cdp.points import split_export_name
from cdp.targets.blockdev import BlockDevice, ExportProvider, MatchesMetaContexts


class AccessDenied(CdpError, PermissionError):
    """This client may not use that export (NBD_REP_ERR_POLICY)."""

    errno = _errno.EACCES


#: ssl's long attribute names -> RFC 4514 short names
_SHORT = {
    "commonname": "CN", "organizationname": "O", "organizationalunitname": "OU",
    "countryname": "C", "localityname": "L", "stateorprovincename": "ST",
    "domaincomponent": "DC", "userid": "UID", "streetaddress": "STREET",
    "emailaddress": "emailAddress", "serialnumber": "serialNumber",
}
_SPECIAL = re.compile(r'([,+"\\<>;])')


def _short(attr: str) -> str:
    a = attr.strip()
    return _SHORT.get(a.lower(), a.upper() if len(a) <= 2 or a.upper() in ("UID", "STREET") else a)


def _escape(value: str) -> str:
    v = _SPECIAL.sub(r"\\\1", value)
    if v.startswith(("#", " ")):
        v = "\\" + v
    if v.endswith(" ") and not v.endswith("\\ "):
        v = v[:-1] + "\\ "
    return v


def subject_text(peercert: Mapping[str, Any] | None) -> str:
    """The RFC 4514 subject of ``ssl``'s ``getpeercert()`` dict ("" without one):
    relative names most specific first, multi-valued ones joined with ``+``."""
    if not peercert:
        return ""
    rdns = peercert.get("subject", ())
    parts = ["+".join(f"{_short(k)}={_escape(v)}" for k, v in rdn) for rdn in reversed(rdns)]
    return ",".join(parts)


def _split_unescaped(text: str, sep: str) -> list[str]:
    out, cur, esc = [], "", False
    for ch in text:
        if esc:
            cur += "\\" + ch
            esc = False
        elif ch == "\\":
            esc = True
        elif ch == sep:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    out.append(cur)
    return out


def normalize_subject(text: str) -> str:
    """A configured subject in the form :func:`subject_text` gives (see the notes);
    raises ValueError for a part without ``=``."""
    parts = []
    for rdn in _split_unescaped(text.strip(), ","):
        avas = []
        for ava in _split_unescaped(rdn, "+"):
            k, eq, v = ava.partition("=")
            if not eq or not k.strip():
                raise ValueError(f"{ava.strip()!r} is not ATTRIBUTE=value")
            avas.append(f"{_short(k)}={v.strip()}")
        parts.append("+".join(avas))
    return ",".join(parts)


@dataclass(frozen=True)
class ClientRule:
    """One ``[[nbd.client]]`` row: an identity (a normalized certificate subject, or a
    PSK user) and the volumes it may write and only read (``"*"``: every volume)."""

    identity: str
    read_write: frozenset[str] = frozenset()
    read_only: frozenset[str] = frozenset()


def grant(rules: Iterable[ClientRule], identity: str, volume: str) -> str | None:
    """"rw", "ro" or None (refused) for ``identity`` on ``volume``; the first row naming
    the identity decides. Cost: O(rules)."""
    for r in rules:
        if r.identity != identity:
            continue
        if volume in r.read_write or "*" in r.read_write:
            return "rw"
        if volume in r.read_only or "*" in r.read_only:
            return "ro"
        return None
    return None


def nbd_client_rules(rows: Iterable[Any]) -> tuple[ClientRule, ...]:
    """:class:`ClientRule` s from config rows (``subject`` or ``user``, ``read_write``,
    ``read_only`` attributes: :class:`cdp.config.NbdClientAccess`); raises
    :class:`~cdp.errors.ConfigError` for a subject that does not parse."""
    out = []
    for i, r in enumerate(rows):
        try:
            identity = getattr(r, "user", "") or normalize_subject(r.subject)
        except ValueError as exc:
            raise ConfigError(f"nbd.client[{i}].subject: {exc}") from None
        out.append(ClientRule(identity, frozenset(r.read_write), frozenset(r.read_only)))
    return tuple(out)


class ReadOnlyView:
    """A device opened for a client that may only read it: ``read_only`` and every
    write refused; everything else is the device's."""

    read_only = True

    def __init__(self, device: BlockDevice, identity: str) -> None:
        self._dev = device
        self._why = f"client {identity!r} may only read this export"
        self.size = device.size
        self.can_multi_conn = device.can_multi_conn

    def __getattr__(self, name: str) -> Any:  # description, min_block_size, ...
        if name == "match_meta_contexts" and not isinstance(self._dev, MatchesMetaContexts):
            raise AttributeError(name)
        return getattr(self._dev, name)

    def read(self, offset: int, length: int) -> bytes | Awaitable[bytes]:
        return self._dev.read(offset, length)

    def write(self, offset: int, data: bytes | bytearray, fua: bool) -> None:
        raise ReadOnly(self._why)

    def flush(self) -> Awaitable[None] | None:
        return self._dev.flush()

    def trim(self, offset: int, length: int, fua: bool) -> None:
        raise ReadOnly(self._why)

    def write_zeroes(self, offset: int, length: int, fua: bool, may_trim: bool, fast: bool) -> None:
        raise ReadOnly(self._why)

    def cache(self, offset: int, length: int) -> Awaitable[None] | None:
        return self._dev.cache(offset, length)

    def meta_contexts(self) -> list[str]:
        return self._dev.meta_contexts()

    def block_status(self, context: str, offset: int, length: int) -> Any:
        return self._dev.block_status(context, offset, length)

    def close(self) -> None:
        self._dev.close()


class ClientExports:
    """The exports one identified client may use (an ExportProvider); see the notes."""

    def __init__(self, provider: ExportProvider, identity: str, rules: tuple[ClientRule, ...]) -> None:
        self.provider = provider
        self.identity = identity
        self.rules = rules

    def _grant(self, volume: str) -> str | None:
        return grant(self.rules, self.identity, volume) if self.rules else "rw"

    def list_exports(self) -> list[tuple[str, str]]:
        return [(n, d) for n, d in self.provider.list_exports()
                if self._grant(split_export_name(n)[0])]

    def open_export(self, name: str) -> BlockDevice:
        volume = split_export_name(name)[0]
        if not volume:
            # the default export: whichever volume the store opens
            dev = self.provider.open_export(name)
            volume = str(getattr(getattr(dev, "volume", None), "name", ""))
        else:
            dev = None
        level = self._grant(volume)
        if level is None:
            if dev is not None:
                dev.close()
            raise AccessDenied(f"client {self.identity or '(no identity)'!r} may not use "
                               f"volume {volume!r}")
        if dev is None:
            dev = self.provider.open_export(name)
        if level == "ro" and not dev.read_only:
            return ReadOnlyView(dev, self.identity)
        return dev
