"""What the source and the target share on the asyncio side of a stream."""

from __future__ import annotations

import asyncio


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
