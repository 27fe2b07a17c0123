"""HBONE connection-per-request cost on loopback, both ends relaying (netperf TCP_CRR's pattern).

Per request: a pooled CONNECT stream, the client app sends 100 bytes and half-closes, the upstream app
answers 100 bytes and closes, both ztunnel ends relay with `relay()`. Prints CPU microseconds per request of
the Trio thread (both HBONE ends and both tiny apps) and requests per second.

    .venv/bin/python benchmarks/hbone_crr.py --requests 3000
"""

from __future__ import annotations

import argparse
import socket
import time

import trio
from hbone_loopback import CLIENT_ID, SERVER_ID, Loopback

from services.ztunnel.hbone.pool import PoolKey, open_hbone_pool
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.server import InboundInfo

PAYLOAD = b"r" * 100


async def upstream_app(sock: socket.socket) -> None:
    """Read the request to its end, answer, close (the server app of the exchange)."""
    s = trio.socket.from_stdlib_socket(sock)
    with s:
        while await s.recv(65536):
            pass
        await s.send(PAYLOAD)


async def main(requests: int) -> None:
    loop = Loopback(backlog=64)
    async with trio.open_nursery() as nursery:
        async def open_upstream(info: InboundInfo) -> socket.socket:
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            nursery.start_soon(upstream_app, theirs)
            return ours

        bundle = await loop.start(nursery, open_upstream=open_upstream)
        loop.contexts.client(bundle)
        key = PoolKey(src_identity=CLIENT_ID, dst_identities=frozenset([SERVER_ID]), dst=loop.addr)
        async with open_hbone_pool(certs=loop.certs, contexts=loop.contexts) as pool:
            async def one(i: int) -> None:
                stream = await pool.connect(key, loop.addr, forwarded_for=("127.0.0.1", i))
                app, captured = socket.socketpair()
                captured.setblocking(False)
                app_t = trio.socket.from_stdlib_socket(app)
                async with trio.open_nursery() as inner:
                    async def run_relay() -> None:
                        try:
                            await relay(stream, captured)
                        finally:
                            stream.close_nowait()
                            captured.close()
                    inner.start_soon(run_relay)
                    with app_t:
                        await app_t.send(PAYLOAD)
                        app_t.shutdown(socket.SHUT_WR)
                        got = b""
                        while chunk := await app_t.recv(65536):
                            got += chunk
                    assert got == PAYLOAD

            await one(0)
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            for i in range(requests):
                await one(i + 1)
            await trio.sleep(0.1)
            cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0 - 0.1
        nursery.cancel_scope.cancel()
    print(f"requests={requests} rate={requests / wall:.0f}/s")
    print(f"CPU (both HBONE ends + both apps, Trio thread): {cpu / requests * 1e6:.0f} us/request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=3000)
    args = parser.parse_args()
    trio.run(main, args.requests)
