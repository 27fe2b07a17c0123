"""Helpers (no tests) for the waypoint service tests: fake pods on loopback addresses, the waypoint, a client.

Each fake pod has its own loopback address in 127.0.88.0/24: its app listens there (HTTP on 9080, an echo
on 9000) and its HBONE server on 15008, as in a pod netns; the waypoint listens on its own address. The xDS
state is written straight into a StateStore, certificates come from the istiod stub's CA.
"""

from __future__ import annotations

import functools
import random
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import h11
import trio

from services.istiod.ca import CertificateAuthority
from services.waypoint.app import open_waypoint, serve_waypoint
from services.waypoint.config import WaypointConfig
from services.waypoint.proxy import WaypointProxy
from services.waypoint.telemetry import WaypointTelemetry
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.pool import open_hbone_connection
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import INBOUND_HBONE_PORT
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    AppProtocol,
    GatewayAddress,
    NetworkAddress,
    Port,
    Service,
    ServiceKey,
    TunnelProtocol,
    Workload,
    WorkloadUid,
)
from shared.httpd import Request, Response, receive_body, receive_head, serve_http_tcp, text_response
from shared.identity import SpiffeId
from tests.service.test_hbone_helpers import FakeCerts, Server, _echo, serve_hbone, spiffe

NET = "127.0.88."
WAYPOINT_IP = NET + "1"
WAYPOINT_ID = spiffe("waypoint")
CLIENT_ID = spiffe("bookinfo-productpage")
HTTP_PORT = 9080
TCP_PORT = 9000
GATEWAY = GatewayAddress(address=NetworkAddress(address=WAYPOINT_IP))
HTTP = (Port(service_port=HTTP_PORT, target_port=HTTP_PORT, app_protocol=AppProtocol.HTTP11),)
OPAQUE = (Port(service_port=TCP_PORT, target_port=TCP_PORT),)


def hostname(name: str) -> str:
    return f"{name}.default.svc.cluster.local"


def service(name: str, vip: str, ports: tuple[Port, ...] = HTTP, *, waypoint: bool = True) -> Service:
    return Service(name=name, namespace="default", hostname=hostname(name),
                   addresses=(NetworkAddress(address=vip),), ports=ports,
                   waypoint=GATEWAY if waypoint else None)


def pod(name: str, ip: str, services: list[Service], *, waypoint: bool = False) -> Workload:
    return Workload(uid=WorkloadUid(f"Kubernetes//Pod/default/{name}"), name=name, namespace="default",
                    addresses=(ip,), tunnel_protocol=TunnelProtocol.HBONE, service_account=name,
                    workload_name=name, canonical_name=name,
                    services={ServiceKey(s.key): s.ports for s in services},
                    waypoint=GATEWAY if waypoint else None)


WAYPOINT_WORKLOAD = Workload(uid=WorkloadUid("Kubernetes//Pod/default/waypoint-0"), name="waypoint-0",
                             namespace="default", addresses=(WAYPOINT_IP,), service_account="waypoint",
                             tunnel_protocol=TunnelProtocol.HBONE, workload_name="waypoint")


@dataclass
class FakePod:
    name: str
    ip: str
    requests: list[Request] = field(default_factory=list)
    identity: SpiffeId | None = None
    """Its HBONE server's; default spiffe://cluster.local/ns/default/sa/<name>."""


async def run_pod(nursery: trio.Nursery, fake: FakePod, certs: FakeCerts, roots: list[str]) -> None:
    """The pod's HTTP app (answers `<pod> <method> <path>`), echo app and HBONE server on its address."""
    async def app(request: Request) -> Response:
        fake.requests.append(request)
        if request.path == "/big":
            return Response(body=b"x" * 300_000)
        if request.path == "/slow":  # answers after any route timeout a test sets
            await trio.sleep(30)
        return text_response(f"{fake.name} {request.method} {request.target} {len(request.body)}")

    await nursery.start(functools.partial(serve_http_tcp, app, HTTP_PORT, fake.ip))
    await nursery.start(functools.partial(trio.serve_tcp, _echo, TCP_PORT, host=fake.ip))
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((fake.ip, INBOUND_HBONE_PORT))
    listener.listen(64)
    identity = fake.identity or spiffe(fake.name)
    policy = Server(addr=(fake.ip, INBOUND_HBONE_PORT), identity=identity)
    nursery.start_soon(functools.partial(serve_hbone, listener, policy, identity=identity, certs=certs,
                                         contexts=TlsContextCache(roots)))


@dataclass
class Lab:
    store: StateStore
    certs: FakeCerts
    ca: CertificateAuthority
    proxy: WaypointProxy
    telemetry: WaypointTelemetry
    addr: tuple[str, int]
    pods: dict[str, FakePod]
    draining: trio.Event
    """Set: the waypoint drains (what SIGTERM does)."""
    stopped: trio.Event
    """Set once the drained waypoint's HBONE side returned."""

    def contexts(self) -> TlsContextCache:
        return TlsContextCache([self.ca.root_pem])

    @asynccontextmanager
    async def connection(self) -> AsyncIterator[HboneConnection]:
        bundle = await self.certs.fetch_certificate(CLIENT_ID)
        async with open_hbone_connection(self.addr, bundle=bundle, expected=[WAYPOINT_ID],
                                         contexts=self.contexts()) as conn:
            yield conn


@asynccontextmanager
async def running_waypoint(ca: CertificateAuthority, certs: FakeCerts, store: StateStore,
                           pods: list[FakePod], config: WaypointConfig,
                           seed: int = 7) -> AsyncIterator[Lab]:
    roots = [ca.root_pem]
    telemetry = WaypointTelemetry()
    async with trio.open_nursery() as nursery:
        for fake in pods:
            await run_pod(nursery, fake, certs, roots)
        async with open_waypoint(store=store, certs=certs, contexts=TlsContextCache(roots),
                                 identity=WAYPOINT_ID, config=lambda: config, telemetry=telemetry,
                                 me=WAYPOINT_WORKLOAD, rng=random.Random(seed), connect_timeout=2) as proxy:
            listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            listener.bind((WAYPOINT_IP, 0))
            listener.listen(64)
            listener.setblocking(False)
            draining, stopped = trio.Event(), trio.Event()

            async def serve(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
                await serve_waypoint(listener, proxy, certs=certs, contexts=TlsContextCache(roots),
                                     draining=draining, task_status=task_status)
                stopped.set()

            await nursery.start(serve)
            yield Lab(store=store, certs=certs, ca=ca, proxy=proxy, telemetry=telemetry,
                      addr=listener.getsockname(), pods={p.name: p for p in pods}, draining=draining,
                      stopped=stopped)
            nursery.cancel_scope.cancel()
        listener.close()


class HttpClient:
    """HTTP/1.1 on one tunnel stream, keep-alive: `request()` one at a time, or `pipeline()`."""

    def __init__(self, stream: HboneStream, host: str) -> None:
        self.stream = stream
        self.host = host
        self.conn = h11.Connection(h11.CLIENT)

    def _head(self, method: str, path: str, body: bytes, headers: list[tuple[str, str]]) -> bytes:
        all_headers = [("host", self.host), *headers]
        if body or method in ("POST", "PUT"):
            all_headers.append(("content-length", str(len(body))))
        data = self.conn.send(h11.Request(method=method, target=path, headers=all_headers)) or b""
        if body:
            data += self.conn.send(h11.Data(data=body)) or b""
        return data + (self.conn.send(h11.EndOfMessage()) or b"")

    async def _response(self) -> tuple[int, bytes]:
        response = await receive_head(self.stream, self.conn, h11.Response)
        assert response is not None, "the waypoint closed the stream without answering"
        body = await receive_body(self.stream, self.conn)
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            self.conn.start_next_cycle()
        return response.status_code, body

    async def request(self, method: str, path: str, *, body: bytes = b"",
                      headers: list[tuple[str, str]] | None = None) -> tuple[int, bytes]:
        await self.stream.send_all(self._head(method, path, body, headers or []))
        return await self._response()

    async def pipeline(self, paths: list[str]) -> list[tuple[int, bytes]]:
        """Send every GET first, then read the answers (h11 allows one request in flight: the bytes are
        framed by hand after the first)."""
        data = self._head("GET", paths[0], b"", [])
        for path in paths[1:]:
            data += f"GET {path} HTTP/1.1\r\nhost: {self.host}\r\n\r\n".encode()
        await self.stream.send_all(data)
        out = [await self._response()]
        for path in paths[1:]:
            # The next answer as its own exchange on a fresh h11 state, with the bytes already read.
            left, _ = self.conn.trailing_data
            self.conn = h11.Connection(h11.CLIENT)
            self.conn.send(h11.Request(method="GET", target=path, headers=[("host", self.host)]))
            self.conn.send(h11.EndOfMessage())
            if left:  # (receive_data of nothing would mean EOF)
                self.conn.receive_data(bytes(left))
            out.append(await self._response())
        return out


async def http_client(conn: HboneConnection, vip: str, host: str, port: int = HTTP_PORT) -> HttpClient:
    """A tunnel to `vip:port` through the waypoint, as a client ztunnel opens one, with HTTP on it."""
    return HttpClient(await conn.open_stream((vip, port), forwarded_for=("10.0.0.9", 40000)), host)
