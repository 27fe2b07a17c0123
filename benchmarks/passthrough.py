"""Plain TCP passthrough cost of ztunnel's copy loop: shared-buffer recv_into/send vs os.splice.

Runs the real pod supervisor (InPodWorkloadHandler + run_pod_proxies) in this process with a loopback socket
factory (no root needed), and a sender and a sink in *separate processes*, so the CPU time measured with
getrusage(RUSAGE_SELF) is the proxy's alone. Prints figures; asserts nothing.

    .venv/bin/python benchmarks/passthrough.py [--mb 1024] [--connections 1] [--modes copy,splice]
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

import trio

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.sockets import PORTS, PodListener, PodListeners
from services.ztunnel.proxy.context import ProxyConfig
from services.ztunnel.telemetry.access_log import Telemetry
from shared.addr import Addr
from shared.zds.types import PodUid, WorkloadInfo

SINK = r"""
import socket, sys, threading
srv = socket.socket(); srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(64)
print(srv.getsockname()[1], flush=True)
def drain(c):
    buf = bytearray(1 << 20); n = 0
    while (k := c.recv_into(buf)): n += k
    c.sendall(b"done"); c.close()
while True:
    c, _ = srv.accept(); threading.Thread(target=drain, args=(c,), daemon=True).start()
"""

SENDER = r"""
import socket, sys, threading
port, total, conns = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
chunk = b"x" * (1 << 20)
def one():
    s = socket.create_connection(("127.0.0.1", port))
    left = total // conns
    while left > 0:
        left -= s.send(chunk[:min(left, len(chunk))])
    s.shutdown(socket.SHUT_WR)
    assert s.recv(16) == b"done"
threads = [threading.Thread(target=one) for _ in range(conns)]
[t.start() for t in threads]; [t.join() for t in threads]
"""


class LoopbackSockets:
    def __init__(self, target: Addr) -> None:
        self.target = target
        self.ports: dict[str, int] = {}

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        made = []
        for role, _ in PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.bind(("127.0.0.1", 0))
            sock.listen(128)
            self.ports[role] = sock.getsockname()[1]
            made.append(PodListener(role=role, port=self.ports[role], sock=sock))
        return PodListeners(listeners=tuple(made), ipv6=False, transparent=False)

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return sock

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return self.target


def cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(mode: str, total: int, connections: int, sink_port: int) -> tuple[float, float]:
    sockets = LoopbackSockets(("127.0.0.1", sink_port))
    r, w = os.pipe()
    try:
        async with trio.open_nursery() as pods:
            zt = InPodWorkloadHandler(pods, config=ProxyConfig(splice=mode == "splice"),
                                      telemetry=Telemetry(), sockets=sockets)
            info = WorkloadInfo(name="b", namespace="b", service_account="b")
            await zt.start_workload(PodUid("bench"), info, r)
            cpu0, wall0 = cpu(), time.perf_counter()
            await trio.run_process([sys.executable, "-c", SENDER, str(sockets.ports["outbound"]), str(total),
                                    str(connections)])
            cpu1, wall1 = cpu(), time.perf_counter()
            pods.cancel_scope.cancel()
    finally:
        os.close(r)
        os.close(w)
    return cpu1 - cpu0, wall1 - wall0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=int, default=1024, help="megabytes per mode (default 1024)")
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--modes", default="copy,splice")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    total = args.mb * 1024 * 1024
    sink = subprocess.Popen([sys.executable, "-c", SINK], stdout=subprocess.PIPE, text=True)
    try:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        print(f"{args.mb} MiB per run over {args.connections} connection(s), proxy in this process, "
              f"sender and sink in child processes")
        print(f"{'mode':8} {'round':>5} {'proxy CPU-s':>12} {'CPU-s/GB':>9} {'wall s':>7} {'MB/s':>8}")
        for rnd in range(args.rounds):
            for mode in args.modes.split(","):
                cpu_s, wall = trio.run(measure, mode, total, args.connections, port)
                gb = total / 1e9
                print(f"{mode:8} {rnd:>5} {cpu_s:>12.3f} {cpu_s / gb:>9.3f} {wall:>7.2f} "
                      f"{total / 1e6 / wall:>8.0f}")
    finally:
        sink.kill()
        sink.wait()


if __name__ == "__main__":
    main()
