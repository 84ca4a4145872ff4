"""The daemon's command socket protocol, shared by the client and the server.

Standard library only: the client imports it on the fast path. A frame is a
4-byte big-endian length and that many bytes of JSON. The server sends ACCEPTED
once it has read a whole request, so a client that never saw it knows the
command did not run and may run it itself.
"""

from __future__ import annotations

import json
import os
import socket
import struct
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Protocol

ACCEPTED = b"\x01"
HEADER = struct.Struct("!I")


class Receiver(Protocol):
    """What frames are read from: a socket, or a reader wrapping one."""

    def recv(self, bufsize: int, /) -> bytes: ...


def send_frame(sock: socket.socket, obj: Any) -> None:
    data = json.dumps(obj).encode()
    sock.sendall(HEADER.pack(len(data)) + data)


def recv_exact(sock: Receiver, size: int) -> bytes:
    """Exactly `size` bytes; ConnectionError when the peer closes before that."""
    chunks = []
    while size:
        chunk = sock.recv(min(size, 1 << 20))
        if not chunk:
            raise ConnectionError("the connection closed mid-frame")
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def recv_size(sock: Receiver) -> int:
    """The length of the next frame."""
    (size,) = HEADER.unpack(recv_exact(sock, HEADER.size))
    return int(size)


@contextmanager
def short_path(path: str) -> Iterator[str]:
    """A name for `path` that fits in sockaddr_un (108 bytes): the path itself,
    or, when it is too long, the same file reached through an open descriptor
    of its directory (/proc/self/fd/N/NAME; Linux)."""
    if len(os.fsencode(path)) < 100:
        yield path
        return
    fd = os.open(os.path.dirname(path), os.O_PATH | os.O_DIRECTORY)
    try:
        yield f"/proc/self/fd/{fd}/{os.path.basename(path)}"
    finally:
        os.close(fd)
