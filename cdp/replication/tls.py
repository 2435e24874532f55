"""TLS for replication streams (``[replication] tls_cert``, ``tls_key``, ``tls_ca``).

Design notes
------------
- Both directions are mutual TLS with the ``ssl`` module: the target's server context
  requires a client certificate signed by ``tls_ca``; the source's client context
  verifies the target's certificate against ``tls_ca`` and its name against the host of
  ``--to`` (a DNS or IP subjectAltName), and presents its own certificate. TLS 1.2 is
  the floor.
- TLS only wraps the socket: the sans-I/O core and the HMAC handshake run inside it
  unchanged (TLS gives confidentiality and integrity on the wire, the shared secret
  still names the peer appliance). Without the three settings the stream is plain TCP.
"""

from __future__ import annotations

import ssl

from cdp.config import ReplicationSettings
from cdp.errors import ConfigError


def _context(rs: ReplicationSettings, purpose: ssl.Purpose) -> ssl.SSLContext | None:
    if not (rs.tls_cert and rs.tls_key and rs.tls_ca):
        return None
    ctx = ssl.create_default_context(purpose, cafile=rs.tls_ca)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED
    try:
        ctx.load_cert_chain(rs.tls_cert, rs.tls_key)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"replication.tls_cert/tls_key: cannot load "
                          f"{rs.tls_cert} / {rs.tls_key}: {e}") from None
    return ctx


def server_context(rs: ReplicationSettings) -> ssl.SSLContext | None:
    """The target's TLS context (client certificates required), or None without TLS."""
    try:
        return _context(rs, ssl.Purpose.CLIENT_AUTH)
    except (OSError, ssl.SSLError) as e:  # the CA file
        raise ConfigError(f"replication.tls_ca: cannot load {rs.tls_ca}: {e}") from None


def client_context(rs: ReplicationSettings) -> ssl.SSLContext | None:
    """The source's TLS context (verifies the target), or None without TLS."""
    try:
        return _context(rs, ssl.Purpose.SERVER_AUTH)
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(f"replication.tls_ca: cannot load {rs.tls_ca}: {e}") from None
