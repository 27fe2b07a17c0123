"""HBONE throughput on loopback: client core -> TLS 1.3 -> server core -> upstream socket.

Prints MB/s and CPU seconds per GB. Both HBONE ends run in this process on one Trio thread (the figure is
for both ends together; one end is roughly half); the upstream app is a thread that discards what it reads
and is not counted.

    .venv/bin/python benchmarks/hbone_throughput.py --megabytes 1024 --streams 1
"""

from __future__ import annotations

import argparse
import socket
import threading
import time

import trio
from hbone_loopback import SERVER_ID, Loopback

from services.ztunnel.hbone.pool import open_hbone_connection
from services.ztunnel.hbone.server import InboundInfo
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.telemetry.access_log import ConnectionOutcome


def sink(sock: socket.socket) -> None:
    buf = bytearray(1 << 20)
    with sock:
        while sock.recv_into(buf):
            pass


async def main(megabytes: int, streams: int, chunk_kib: int) -> None:
    loop = Loopback(backlog=16)
    records: list[ConnectionOutcome] = []
    all_done = trio.Event()

    def on_complete(record: ConnectionOutcome) -> None:
        records.append(record)
        if len(records) == streams:
            all_done.set()

    async def open_upstream(info: InboundInfo) -> socket.socket:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        threading.Thread(target=sink, args=(theirs,), daemon=True).start()
        return ours

    payload = b"\xa5" * (chunk_kib * 1024)
    per_stream = megabytes * 1024 * 1024 // streams

    async def push(stream: HboneStream) -> None:
        sent = 0
        while sent < per_stream:
            await stream.send_all(payload)
            sent += len(payload)
        await stream.send_eof()
        while await stream.receive_some():
            pass
        await stream.aclose()

    async with trio.open_nursery() as nursery:
        bundle = await loop.start(nursery, open_upstream=open_upstream, closed=on_complete)
        async with open_hbone_connection(loop.addr, bundle=bundle, expected=[SERVER_ID],
                                         contexts=loop.contexts) as conn:
            opened = [await conn.open_stream(loop.addr, forwarded_for=("127.0.0.1", 1))
                      for _ in range(streams)]
            cpu0, wall0 = time.thread_time(), time.perf_counter()
            async with trio.open_nursery() as pushers:
                for stream in opened:
                    pushers.start_soon(push, stream)
            await all_done.wait()
            cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0
        nursery.cancel_scope.cancel()
    total = sum(r.bytes_sent for r in records)  # client -> app
    gb = total / 1e9
    print(f"streams={streams} chunk={chunk_kib}KiB bytes={total} wall={wall:.2f}s")
    print(f"throughput: {total / 1e6 / wall:.0f} MB/s")
    print(f"CPU (both HBONE ends, Trio thread): {cpu / gb:.2f} CPU-s/GB  (~{cpu / gb / 2:.2f} per end)")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megabytes", type=int, default=1024)
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--chunk-kib", type=int, default=256)
    args = parser.parse_args()
    trio.run(main, args.megabytes, args.streams, args.chunk_kib)
