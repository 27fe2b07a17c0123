"""New connections through two pods' whole proxy sets (outbound 15001 -> HBONE -> inbound 15008 -> app).

Unlike `hbone_crr.py` (the HBONE layer alone), every new connection here takes the real per-connection path
of both ztunnels: the accept loop and its handler task, the original destination, resolution against an xDS
state, the pooled CONNECT, the authorization (one ALLOW policy on the server), the socket to the app made
inside a network namespace (`entered()`: setns into this process's own namespace and back, as root), the
relay, the access-log lines (formatted as ztunnel writes them, to /dev/null) and the metrics. Both pods live
in this one Trio thread on loopback addresses (127.0.91.2 client, 127.0.91.3 server), so the figure is the
sum of both sides plus the two tiny apps; `--direct` runs the same apps without the mesh, for subtracting.

Load-independent figures come from running it under callgrind with two connection counts and subtracting
(start-up cancels out):

    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python benchmarks/ztunnel_crr.py -n 100
    valgrind --tool=callgrind --callgrind-out-file=/dev/null .venv/bin/python benchmarks/ztunnel_crr.py -n 400

(the "Collected" line is the instruction count). Needs root (SO_MARK, IP_TRANSPARENT, setns) and a free
127.0.91.3:15008.
"""

from __future__ import annotations

import argparse
import functools
import os
import socket
import sys
import time
from typing import Any

import trio
from hbone_loopback import Certs

from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.inpod.sockets import PORTS, PodListener, PodListeners, create_upstream_socket
from services.ztunnel.net import INBOUND_HBONE_PORT
from services.ztunnel.peers import StatePeers
from services.ztunnel.proxy.context import Mesh, ProxyConfig
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    Match,
    NetworkAddress,
    PolicyKey,
    Port,
    Rule,
    Scope,
    Service,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadUid,
)
from services.ztunnel.telemetry.access_log import Telemetry
from shared.addr import Addr
from shared.identity import SpiffeId
from shared.logs import setup_logging
from shared.netns import NetnsId, current_netns_fd, netns_id
from shared.zds.types import PodUid, WorkloadInfo

CLIENT_IP, SERVER_IP, VIP, APP_PORT = "127.0.91.2", "127.0.91.3", "10.96.91.1", 18080
PAYLOAD = b"r" * 100
NODE = "node-a"


class MeshCerts(Certs):
    """The loopback benchmarks' certificates plus what the certificate manager's admin side offers."""

    def forget(self, identity: SpiffeId) -> None:
        self.bundles.pop(identity, None)

    def dump(self) -> list[dict[str, Any]]:
        return [{"identity": i.uri} for i in sorted(self.bundles)]


class BenchSockets:
    """The in-pod socket factory on loopback: listeners on each pod's address, upstream sockets made by the
    real `create_upstream_socket` inside this process's own namespace (the same setns calls as a pod's)."""

    def __init__(self) -> None:
        self.home = current_netns_fd()
        self.ip_of: dict[NetnsId, str] = {}
        self.outbound_port = 0

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        ip = self.ip_of[netns_id(netns_fd)]
        made = []
        for role, port in PORTS:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ip, port if port == INBOUND_HBONE_PORT else 0))
            sock.listen(128)
            if role == "outbound" and ip == CLIENT_IP:
                self.outbound_port = sock.getsockname()[1]
            made.append(PodListener(role=role, port=sock.getsockname()[1], sock=sock))
        return PodListeners(listeners=tuple(made), ipv6=False, transparent=False)

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        sock = create_upstream_socket(self.home, family, bind_source=bind_source)
        if bind_source is None:
            sock.bind((self.ip_of[netns_id(netns_fd)], 0))
        return sock

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return (VIP, 80)


def world(store: StateStore, *, policy: bool) -> None:
    service = Service(name="web", namespace="bench", hostname="web.bench.svc.cluster.local",
                      addresses=(NetworkAddress(address=VIP),), ports=(Port(service_port=80, target_port=0),))
    policies: tuple[Authorization, ...] = (Authorization(
        name="allow-client", namespace="bench", scope=Scope.WORKLOAD_SELECTOR, action=Action.ALLOW,
        rules=(Rule(clauses=(Clause(matches=(Match(principals=(StringMatch(
            kind="exact", value="cluster.local/ns/bench/sa/client"),)),)),)),)),) if policy else ()

    def workload(name: str, ip: str, **extra: object) -> Workload:
        return Workload(uid=WorkloadUid(f"Kubernetes//Pod/bench/{name}"), name=name, namespace="bench",
                        addresses=(ip,), service_account=name, node=NODE, cluster_id="Kubernetes",
                        tunnel_protocol=TunnelProtocol.HBONE, **extra)  # type: ignore[arg-type]

    store.apply_addresses([
        workload("client", CLIENT_IP), service,
        workload("web", SERVER_IP, services={service.key: (Port(service_port=80, target_port=APP_PORT),)},
                 authorization_policies=tuple(PolicyKey(p.key) for p in policies))], [])
    store.apply_authorizations(policies, [])


async def serve_app(listener: trio.socket.SocketType) -> None:
    """The server app: read the 100-byte request (or to its end), answer, close (the server closes first,
    as `loadgen serve`'s crr port does)."""
    async def one(conn: trio.socket.SocketType) -> None:
        with conn:
            got = 0
            while got < len(PAYLOAD) and (chunk := await conn.recv(65536)):
                got += len(chunk)
            await conn.send(PAYLOAD)

    async with trio.open_nursery() as nursery:
        while True:
            conn, _ = await listener.accept()
            nursery.start_soon(one, conn)


async def call(port: int, ip: str, half_close: bool) -> None:
    """The client app: connect, send (and half-close, unless told not to), read to EOF."""
    sock = trio.socket.socket()
    with sock:
        await sock.bind((CLIENT_IP, 0))
        await sock.connect((ip, port))
        await sock.send(PAYLOAD)
        if half_close:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := await sock.recv(65536):
            got += chunk
    if got != PAYLOAD:
        raise SystemExit(f"wrong answer: {got[:40]!r}")


async def main(n: int, *, direct: bool, policy: bool, half_close: bool) -> None:
    app = trio.socket.socket()
    app.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    await app.bind((SERVER_IP, APP_PORT))
    app.listen(128)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve_app, app)
        if direct:
            target = (SERVER_IP, APP_PORT)
        else:
            certs = MeshCerts()
            store = StateStore()
            world(store, policy=policy)
            sockets = BenchSockets()
            mesh = Mesh(store=store, certs=certs, contexts=TlsContextCache([certs.ca.root_pem]),
                        node=NODE)
            handler = InPodWorkloadHandler(nursery, config=ProxyConfig(connect_timeout=5),
                                           telemetry=Telemetry(), sockets=sockets, peers=StatePeers(store),
                                           mesh=mesh)
            fds = []
            for uid, name, ip in (("client-uid", "client", CLIENT_IP), ("web-uid", "web", SERVER_IP)):
                r, w = os.pipe()  # a stand-in netns handle: its identity names the pod
                fds += [r, w]
                sockets.ip_of[netns_id(r)] = ip
                await handler.start_workload(PodUid(uid), WorkloadInfo(name=name, namespace="bench",
                                                                       service_account=name), r)
            target = (CLIENT_IP, sockets.outbound_port)
        await call(target[1], target[0], half_close)  # warm: certificates, the pooled connection, caches
        cpu0, wall0 = time.thread_time(), time.perf_counter()
        for _ in range(n):
            await call(target[1], target[0], half_close)
        await trio.sleep(0.05)
        cpu, wall = time.thread_time() - cpu0, time.perf_counter() - wall0 - 0.05
        nursery.cancel_scope.cancel()
    print(f"connections={n} rate={n / wall:.0f}/s cpu={cpu / n * 1e6:.0f} us/connection "
          f"({'direct' if direct else 'both ztunnels + apps'})", file=sys.stderr)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--connections", type=int, default=1000)
    parser.add_argument("--direct", action="store_true", help="the apps alone, no mesh")
    parser.add_argument("--no-policy", action="store_true", help="no authorization policy on the server")
    parser.add_argument("--no-half-close", action="store_true",
                        help="the client sends without half-closing and waits for the server to close "
                             "(loadgen crr's pattern); by default it half-closes after its request")
    args = parser.parse_args()
    with open(os.devnull, "w") as devnull:
        setup_logging(json_format=False, level="info", stream=devnull)
        trio.run(functools.partial(main, args.connections, direct=args.direct, policy=not args.no_policy,
                                     half_close=not args.no_half_close))
