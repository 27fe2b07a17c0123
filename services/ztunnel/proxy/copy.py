"""Bidirectional byte copy with one shared receive buffer per process.

Theory of operation
-------------------
Every connection reads into the same 256 KiB buffer (DESIGN §5: a buffer per connection would cost 300 KiB
each). That is only safe if no task can run between filling the buffer and emptying it, so each step is:
`recv_into(shared)` then an immediate non-blocking `send` — both synchronous, no await between them. Only if
the kernel does not take everything does the unsent tail get *copied out* into a bytes object owned by this
direction, which is then awaited onto the socket. Reads are as large as the kernel offers, so a busy
connection moves up to 256 KiB per loop turn.

EOF on one side is propagated as `shutdown(SHUT_WR)` on the other (half-close), and the copy ends when both
directions have. An OSError (reset, broken pipe) on either direction ends both; the first error is raised
as is (never wrapped in an ExceptionGroup) so callers can log it.
"""

from __future__ import annotations

import contextlib
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


async def copy_bidirectional(client: socket.socket, upstream: socket.socket,
                             sent: Callable[[int], None], received: Callable[[int], None]) -> None:
    """Copy both ways until both sides reached EOF. `sent` counts client->upstream, `received` the reverse.

    Raises:
        OSError: the first socket error of either direction (the other direction is cancelled).
    """
    errors: list[OSError] = []

    async def one_way(src: socket.socket, dst: socket.socket, count: Callable[[int], None],
                      scope: trio.CancelScope) -> None:
        try:
            await pump(src, dst, count)
        except OSError as exc:
            errors.append(exc)
            scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(one_way, client, upstream, sent, nursery.cancel_scope)
        nursery.start_soon(one_way, upstream, client, received, nursery.cancel_scope)
    if errors:
        raise errors[0]
