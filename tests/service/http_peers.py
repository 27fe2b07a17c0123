"""Misbehaving peers for the tests of every process's HTTP endpoints (all on shared/httpd.py).

    async with misbehaving_peers(lambda: trio.open_tcp_stream(*addr)):
        ...a well-behaved client asks its question here and must get its answer...

Three connections are made before the block: a slowloris (a head trickled and never finished, held open
through the block), an oversized head (just over the server's head limit: answered 431, or reset when the
server closes with some of it unread) and a body cut short (a declared body of which the peer sends a few
bytes, then goes away). Each may end only its own connection.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress

import trio

from shared.httpd import DEFAULT_LIMITS

Connect = Callable[[], Awaitable[trio.abc.Stream]]


async def _answer(stream: trio.abc.Stream) -> bytes | None:
    """Everything the server wrote until it closed; None when it reset the connection."""
    data = b""
    try:
        while chunk := await stream.receive_some(65536):
            data += chunk
    except trio.BrokenResourceError:
        return None
    return data


@asynccontextmanager
async def misbehaving_peers(connect: Connect, target: str = "/") -> AsyncIterator[None]:
    slowloris = await connect()
    try:
        await slowloris.send_all(f"GET {target} HTTP/1.1\r\nhost: x\r\nx-slow: ".encode())
        await slowloris.send_all(b"a")  # ...and never the rest

        oversized = await connect()
        async with oversized:
            head = f"GET {target} HTTP/1.1\r\nhost: x\r\nx-big: ".encode()
            with suppress(trio.BrokenResourceError):
                await oversized.send_all(head + b"a" * (DEFAULT_LIMITS.max_head + 100 - len(head)))
            answer = await _answer(oversized)
        assert answer is None or answer.startswith(b"HTTP/1.1 431"), answer[:100]

        dropped = await connect()
        async with dropped:
            head = f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: 1000\r\n\r\n".encode()
            await dropped.send_all(head + b'{"Netns": ')
        yield
    finally:
        await slowloris.aclose()
