"""What the source and the target share on the asyncio side of a stream."""

from __future__ import annotations

import asyncio
import socket


def send(writer: asyncio.StreamWriter, data: bytes | list[bytes]) -> None:
    """Queue *data* (bytes, or pieces for a gathering write) on the stream;
    ConnectionResetError (an OSError, which both sides treat as the end of the
    connection) once the connection is closed, where asyncio would drop the bytes and
    uvloop raises RuntimeError (a crash of the task, which then never reconnects)."""
    if writer.is_closing():
        raise ConnectionResetError("the connection is closed")
    if isinstance(data, list):
        writer.writelines(data)
    else:
        writer.write(data)


#: bytes of socket buffer a stream asks the kernel for (the source: ``SO_SNDBUF``; the
#: kernel caps it at ``net.core.wmem_max`` and doubles it for its bookkeeping). Sized to
#: hold a few RECORDS frames, so that the kernel moves them to the target as the target
#: reads while the source's event loop is busy with the host's writes: bytes the socket
#: does not take wait in the transport's user-space buffer until the loop comes round
#: (issue #20: after a 3 MiB frame of 1 MiB records, 1-3 MB often waited there, for up
#: to 0.3-0.4 s on a loaded machine, with the target idle)
SOCKET_BUFFER = 4 << 20


def widen(writer: asyncio.StreamWriter, option: int, size: int = SOCKET_BUFFER) -> int:
    """Set the stream socket's ``option`` (``socket.SO_SNDBUF`` or ``SO_RCVBUF``) to
    ``size`` bytes (plain TCP or the socket under TLS); the size the kernel granted, or
    0 when there is no socket or the call failed (the kernel's autotuned buffer then
    stands). Cost: two syscalls."""
    sock = writer.get_extra_info("socket")
    if sock is None:
        return 0
    try:
        sock.setsockopt(socket.SOL_SOCKET, option, size)
        return int(sock.getsockopt(socket.SOL_SOCKET, option))
    except OSError:
        return 0
