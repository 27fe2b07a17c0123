"""Bidirectional byte copy with one shared receive buffer per process.

Theory of operation
-------------------
Every connection reads into the same 256 KiB buffer (DESIGN §5: a buffer per connection would cost 300 KiB
each). That is only safe if no task can run between filling the buffer and emptying it, so each step is:
`recv_into(shared)` then an immediate non-blocking `send` — both synchronous, no await between them. Only if
the kernel does not take everything does the unsent tail get *copied out* into a bytes object owned by this
direction, which is then awaited onto the socket. Reads are as large as the kernel offers, so a busy
connection moves up to 256 KiB per loop turn.

With `splice=True` (the default for plaintext passthrough) each direction instead moves bytes
socket -> pipe -> socket with `os.splice` (no copy through user space at all; one pipe per direction, 4 fds
per connection, enlarged to 1 MiB when allowed). benchmarks/passthrough.py measured about half the CPU per
GB of the shared-buffer loop on this machine class.

EOF on one side is propagated as `shutdown(SHUT_WR)` on the other (half-close), and the copy ends when both
directions have. An OSError (reset, broken pipe) on either direction ends both; the first error is raised
as is (never wrapped in an ExceptionGroup) so callers can log it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import socket
from collections.abc import Callable
from typing import Final

import trio

BUFFER_SIZE: Final = 256 * 1024
_shared = bytearray(BUFFER_SIZE)
_view = memoryview(_shared)


async def _send_all(sock: socket.socket, data: memoryview) -> None:
    try:
        sent = sock.send(data)
    except BlockingIOError:
        sent = 0
    if sent == len(data):
        return
    rest = memoryview(bytes(data[sent:]))  # leave the shared buffer before awaiting
    while rest:
        await trio.lowlevel.wait_writable(sock)
        try:
            sent = sock.send(rest)
        except BlockingIOError:
            continue
        rest = rest[sent:]


async def pump(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Copy src -> dst until EOF on src, then half-close dst. `count(n)` after each chunk is delivered."""
    while True:
        try:
            n = src.recv_into(_view)
        except BlockingIOError:
            await trio.lowlevel.wait_readable(src)
            continue
        if n == 0:
            break
        await _send_all(dst, _view[:n])
        count(n)
        await trio.lowlevel.checkpoint()  # fairness between connections, and a cancellation point
    with contextlib.suppress(OSError):  # peer already gone: the other direction will notice
        dst.shutdown(socket.SHUT_WR)


_SPLICE_FLAGS: Final = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)
_F_SETPIPE_SZ: Final = 1031
PIPE_SIZE: Final = 1024 * 1024


async def pump_splice(src: socket.socket, dst: socket.socket, count: Callable[[int], None]) -> None:
    """Like `pump`, with the bytes moved by the kernel through a pipe (os.splice)."""
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        with contextlib.suppress(OSError):  # above /proc/sys/fs/pipe-max-size: keep the default 64 KiB
            fcntl.fcntl(w, _F_SETPIPE_SZ, PIPE_SIZE)
        src_fd, dst_fd = src.fileno(), dst.fileno()
        while True:
            try:
                n = os.splice(src_fd, w, PIPE_SIZE, flags=_SPLICE_FLAGS)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(src)
                continue
            if n == 0:
                break
            left = n
            while left:
                try:
                    left -= os.splice(r, dst_fd, left, flags=_SPLICE_FLAGS)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(dst)
            count(n)
            await trio.lowlevel.checkpoint()
    finally:
        os.close(r)
        os.close(w)
    with contextlib.suppress(OSError):
        dst.shutdown(socket.SHUT_WR)


async def copy_bidirectional(client: socket.socket, upstream: socket.socket,
                             sent: Callable[[int], None], received: Callable[[int], None], *,
                             splice: bool = False) -> None:
    """Copy both ways until both sides reached EOF. `sent` counts client->upstream, `received` the reverse.

    Raises:
        OSError: the first socket error of either direction (the other direction is cancelled).
    """
    errors: list[OSError] = []

    move = pump_splice if splice else pump

    async def one_way(src: socket.socket, dst: socket.socket, count: Callable[[int], None],
                      scope: trio.CancelScope) -> None:
        try:
            await move(src, dst, count)
        except OSError as exc:
            errors.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, client, upstream, sent, nursery.cancel_scope)
        nursery.start_soon(one_way, upstream, client, received, nursery.cancel_scope)
    if errors:
        raise errors[0]
