"""HBONE set-up costs on loopback: a new mTLS + h2 connection vs a CONNECT stream on a pooled one.

Prints CPU milliseconds per connection and per stream (both ends run in this process on one Trio thread; one
side costs roughly half) and the Python heap held per idle pooled connection (both ends).

    .venv/bin/python benchmarks/hbone_setup.py --connections 200 --streams 2000
"""

from __future__ import annotations

import argparse
import socket
import time
import tracemalloc

import trio
from hbone_loopback import CLIENT_ID, SERVER_ID, Loopback

from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.pool import PoolKey, connect_hbone, open_hbone_pool
from services.ztunnel.hbone.server import InboundInfo


async def main(connections: int, streams: int) -> None:
    loop = Loopback(backlog=1024)
    certs, contexts, addr = loop.certs, loop.contexts, loop.addr
    app = socket.socket()
    app.bind(("127.0.0.1", 0))
    app.listen(4096)

    async def open_upstream(info: InboundInfo) -> socket.socket:
        sock = socket.socket()
        sock.setblocking(False)
        try:
            sock.connect(info.target)
        except BlockingIOError:
            await trio.lowlevel.wait_writable(sock)
        return sock

    async def drain_app() -> None:
        app.setblocking(False)
        while True:
            try:
                conn, _ = app.accept()
                conn.close()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(app)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(drain_app)
        bundle = await loop.start(nursery, open_upstream=open_upstream)
        contexts.client(bundle)

        async def open_many(n: int) -> list[HboneConnection]:
            conns = []
            for _ in range(n):
                conn = await connect_hbone(addr, bundle=bundle, expected=[SERVER_ID], contexts=contexts)
                await nursery.start(conn.run)
                conns.append(conn)
            await trio.sleep(0.2)  # let the server sides finish their set-up
            return conns

        cpu0 = time.thread_time()
        conns = await open_many(connections)
        cpu_conn = time.thread_time() - cpu0
        for conn in conns:
            await conn.aclose()
        tracemalloc.start()  # separately: tracing slows everything down
        heap0 = tracemalloc.get_traced_memory()[0]
        conns = await open_many(connections)
        heap = tracemalloc.get_traced_memory()[0] - heap0
        tracemalloc.stop()
        for conn in conns:
            await conn.aclose()

        key = PoolKey(src_identity=CLIENT_ID, dst_identities=frozenset([SERVER_ID]), dst=addr)
        target = app.getsockname()
        async with open_hbone_pool(certs=certs, contexts=contexts) as pool:
            await (await pool.connect(key, target, forwarded_for=("127.0.0.1", 1))).aclose()
            cpu0 = time.thread_time()
            for i in range(streams):
                stream = await pool.connect(key, target, forwarded_for=("127.0.0.1", i))
                await stream.aclose()
            await trio.sleep(0.2)
            cpu_stream = time.thread_time() - cpu0
        nursery.cancel_scope.cancel()

    print(f"new connection: {cpu_conn / connections * 1e3:.2f} ms CPU (both ends, includes handshake)")
    print(f"pooled stream:  {cpu_stream / streams * 1e3:.2f} ms CPU (both ends, CONNECT + upstream connect + "
          f"close)")
    print(f"idle connection heap (Python objects, both ends): {heap / connections / 1024:.1f} KiB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--streams", type=int, default=2000)
    args = parser.parse_args()
    trio.run(main, args.connections, args.streams)
