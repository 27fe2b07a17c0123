"""HBONE request/response cost on loopback: 1 KB request, 1 KB answer, over one pooled tunnel, both ends.

The client app writes to a socket relayed by an outbound `relay()` into an HBONE stream; the server end
relays to an echo thread. Prints requests/s (closed loop, one request in flight) and CPU microseconds per
request of the Trio thread (both HBONE ends plus the tiny client loop; one end is roughly half).

    .venv/bin/python benchmarks/hbone_rr.py --requests 20000
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import trio
from hbone_loopback import SERVER_ID, Loopback

from services.ztunnel.hbone.pool import open_hbone_connection
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.server import InboundInfo


def echo(sock: socket.socket) -> None:
    with sock:
        while data := sock.recv(65536):
            sock.sendall(data)


async def main(requests: int, size: int) -> None:
    loop = Loopback(backlog=16)

    async def open_upstream(info: InboundInfo) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        threading.Thread(target=echo, args=(theirs,), daemon=True).start()
        return ours

    payload = b"q" * size
    async with trio.open_nursery() as nursery:
        bundle = await loop.start(nursery, open_upstream=open_upstream)
        async with open_hbone_connection(loop.addr, bundle=bundle, expected=[SERVER_ID],
                                         contexts=loop.contexts) as conn:
            stream = await conn.open_stream(loop.addr, forwarded_for=("127.0.0.1", 1))
            app, captured = socket.socketpair()
            captured.setblocking(False)
            lat = []
            async with trio.open_nursery() as relays:
                relays.start_soon(relay, stream, captured)
                app_t = trio.socket.from_stdlib_socket(app)
                cpu0, wall0 = time.thread_time(), time.perf_counter()
                for _ in range(requests):
                    t = time.perf_counter()
                    await app_t.send(payload)
                    got = 0
                    while got < size:
                        got += len(await app_t.recv(65536))
                    lat.append(time.perf_counter() - t)
                cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
                app_t.close()
        nursery.cancel_scope.cancel()
    lat.sort()
    print(f"requests={requests} size={size} rate={requests / wall:.0f}/s "
          f"p50={lat[len(lat) // 2] * 1e3:.3f}ms p99={lat[int(len(lat) * 0.99)] * 1e3:.3f}ms")
    print(f"CPU (both HBONE ends + client loop, Trio thread): {cpu / requests * 1e6:.0f} us/request")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--size", type=int, default=1024)
    args = parser.parse_args()
    trio.run(main, args.requests, args.size)
