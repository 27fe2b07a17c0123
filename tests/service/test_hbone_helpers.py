"""Helpers (no tests) for the HBONE service tests: a CA, workload certificates, an echo app, a server."""

from __future__ import annotations

import functools
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import trio

from services.istiod.ca import CertificateAuthority
from services.ztunnel.authz import Decision
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.pool import plain_socket
from services.ztunnel.hbone.server import InboundInfo, InboundPolicy, serve_hbone_connection
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import accept_forever, connect
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, format_addr
from shared.identity import CertBundle, SpiffeId, generate_key, key_to_pem, make_csr


def spiffe(sa: str, ns: str = "default", td: str = "cluster.local") -> SpiffeId:
    return SpiffeId(trust_domain=td, namespace=ns, service_account=sa)


def mint(ca: CertificateAuthority, identity: SpiffeId) -> CertBundle:
    key = generate_key()
    chain = ca.sign_workload_csr(make_csr(key, identity), identity)
    return CertBundle.from_chain(identity, key_to_pem(key), chain)


class FakeCerts:
    """A certificate manager stand-in: mints on first use from the given CA."""

    def __init__(self, ca: CertificateAuthority) -> None:
        self.ca = ca
        self.bundles: dict[SpiffeId, CertBundle] = {}
        self.fetches = 0

    async def fetch_certificate(self, identity: SpiffeId) -> CertBundle:
        self.fetches += 1
        await trio.lowlevel.checkpoint()
        if identity not in self.bundles:
            self.bundles[identity] = mint(self.ca, identity)
        return self.bundles[identity]


def loopback_listener() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(256)
    sock.setblocking(False)
    return sock


async def _echo(stream: trio.SocketStream) -> None:
    async with stream:
        try:
            async for data in stream:
                await stream.send_all(data)
            await stream.send_eof()
        except trio.BrokenResourceError:
            pass


async def start_echo(nursery: trio.Nursery) -> int:
    """An echo app on 127.0.0.1 (echoes until EOF, then half-closes). Returns its port."""
    listeners = await nursery.start(functools.partial(trio.serve_tcp, _echo, 0, host="127.0.0.1"))
    return int(listeners[0].socket.getsockname()[1])


async def connect_upstream(info: InboundInfo) -> socket.socket:
    sock = plain_socket(socket.AF_INET)
    try:
        await connect(sock, info.target, connect_timeout=5)
    except BaseException:
        sock.close()
        raise
    return sock


UpstreamOpener = Callable[[InboundInfo], Awaitable[socket.socket]]


@dataclass
class Server:
    """A running HBONE server and the `InboundPolicy` it asks: allows (or `decision`), connects to the
    target on loopback, and keeps every outcome (refused connections and requests, ended streams)."""

    addr: tuple[str, int]
    identity: SpiffeId
    upstream: UpstreamOpener = connect_upstream
    records: list[ConnectionOutcome] = field(default_factory=list)
    infos: list[InboundInfo] = field(default_factory=list)
    tunnels: list[ConnectionOutcome] = field(default_factory=list)
    decision: Decision = field(default_factory=lambda: Decision(allowed=True))
    record_event: trio.Event = field(default_factory=trio.Event)
    authorizer: Callable[[InboundInfo], Decision] | None = None

    def accepted(self, conn: HboneConnection) -> None:
        pass

    def refused(self, outcome: ConnectionOutcome) -> None:
        self._record(outcome)

    def outcome(self, info: InboundInfo) -> ConnectionOutcome:
        return ConnectionOutcome(direction="inbound", src_addr=format_addr(info.src_addr),
                                 dst_addr=format_addr(info.dst_addr), dst_hbone_addr=format_addr(info.target),
                                 src=Peer(identity=info.src_identity.uri))

    def authorize(self, info: InboundInfo) -> Decision:
        self.infos.append(info)
        return self.authorizer(info) if self.authorizer is not None else self.decision

    async def open_upstream(self, info: InboundInfo) -> socket.socket:
        return await self.upstream(info)

    def opened(self, outcome: ConnectionOutcome) -> None:
        self.tunnels.append(outcome)

    def closed(self, outcome: ConnectionOutcome) -> None:
        self._record(outcome)

    def _record(self, outcome: ConnectionOutcome) -> None:
        self.records.append(outcome)
        self.record_event.set()
        self.record_event = trio.Event()

    async def wait_records(self, n: int) -> list[ConnectionOutcome]:
        while len(self.records) < n:
            await self.record_event.wait()
        return self.records


async def serve_hbone(listener: socket.socket, policy: InboundPolicy, *, identity: SpiffeId, certs: FakeCerts,
                      contexts: TlsContextCache, **kwargs: Any) -> None:
    """An accept loop around `serve_hbone_connection` (what the in-pod proxy set's listener does)."""
    listener.setblocking(False)
    async with trio.open_nursery() as nursery:
        def spawn(sock: socket.socket, peer: tuple[str, int]) -> None:
            nursery.start_soon(functools.partial(serve_hbone_connection, sock, peer, identity=identity,
                                                 certs=certs, contexts=contexts, policy=policy, **kwargs))

        def capacity_error(exc: OSError) -> None:
            raise AssertionError(f"accept failed: {exc}")

        await accept_forever(listener, spawn, on_capacity_error=capacity_error)


@asynccontextmanager
async def running_server(certs: FakeCerts, identity: SpiffeId, *, roots: list[str],
                         open_upstream: UpstreamOpener = connect_upstream,
                         server_type: type[Server] = Server, **kwargs: Any) -> AsyncIterator[Server]:
    listener = loopback_listener()
    server = server_type(addr=listener.getsockname(), identity=identity, upstream=open_upstream)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(serve_hbone, listener, server, identity=identity, certs=certs,
                                             contexts=TlsContextCache(roots), **kwargs))
        yield server
        nursery.cancel_scope.cancel()
    listener.close()


async def push_until_stalled(stream: HboneStream, *, limit: int, quiet: float = 0.5) -> int:
    """Send until the peer's flow-control window stays shut for `quiet` seconds; returns the bytes taken.

    Raises AssertionError if `limit` bytes went through without a stall (no back-pressure).
    """
    chunk = b"z" * (256 * 1024)
    while stream.bytes_sent < limit:
        if stream.send_nowait(chunk):
            await stream.wait_drained()
            continue
        with trio.move_on_after(quiet) as scope:  # stall detection only: nothing asserts on time
            await stream.wait_send_all_might_not_block()
        if scope.cancelled_caught:
            return stream.bytes_sent
    raise AssertionError(f"{limit} bytes went through: the sender was never held back")


async def test_accepted_and_hbone_client_sockets_get_upstreams_tcp_keepalive() -> None:
    from services.ztunnel.hbone.pool import plain_socket

    listener = loopback_listener()
    accepted: list[socket.socket] = []

    def spawn(conn: socket.socket, _peer: object) -> None:
        accepted.append(conn)

    def capacity_error(exc: OSError) -> None:
        raise AssertionError(f"accept failed: {exc}")

    client = plain_socket(socket.AF_INET)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(functools.partial(accept_forever, listener, spawn,
                                                     on_capacity_error=capacity_error))
                with suppress(BlockingIOError):
                    client.connect(listener.getsockname())
                while not accepted:
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        for sock in (accepted[0], client):
            assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 180
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL) == 180
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 9
    finally:
        client.close()
        for sock in accepted:
            sock.close()
        listener.close()
