"""What the HBONE loopback benchmarks share: certificates from a fresh CA, a client and a server identity,
and an HBONE server on 127.0.0.1 that allows everything."""

from __future__ import annotations

import functools
import socket
from collections.abc import Awaitable, Callable

import trio

from services.istiod.ca import CertificateAuthority
from services.ztunnel.authz import Decision
from services.ztunnel.hbone.connection import HboneConnection
from services.ztunnel.hbone.server import InboundInfo, serve_hbone_connection
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import accept_forever
from services.ztunnel.telemetry.access_log import ConnectionOutcome, format_addr
from shared.identity import CertBundle, SpiffeId, generate_key, key_to_pem, make_csr

CLIENT_ID = SpiffeId(trust_domain="cluster.local", namespace="bench", service_account="client")
SERVER_ID = SpiffeId(trust_domain="cluster.local", namespace="bench", service_account="server")


class Certs:
    def __init__(self) -> None:
        self.ca = CertificateAuthority.create()
        self.bundles: dict[SpiffeId, CertBundle] = {}

    async def fetch_certificate(self, identity: SpiffeId) -> CertBundle:
        if identity not in self.bundles:
            key = generate_key()
            chain = self.ca.sign_workload_csr(make_csr(key, identity), identity)
            self.bundles[identity] = CertBundle.from_chain(identity, key_to_pem(key), chain)
        return self.bundles[identity]


ALLOW = Decision(allowed=True)


class AllowAll:
    """The server's `InboundPolicy`: every tunnel allowed and sent to `upstream`; `closed` per stream."""

    def __init__(self, open_upstream: Callable[[InboundInfo], Awaitable[socket.socket]],
                 closed: Callable[[ConnectionOutcome], None] | None = None) -> None:
        self._upstream = open_upstream
        self._closed = closed

    def accepted(self, conn: HboneConnection) -> None:
        pass

    def refused(self, outcome: ConnectionOutcome) -> None:
        pass

    def outcome(self, info: InboundInfo) -> ConnectionOutcome:
        return ConnectionOutcome(direction="inbound", src_addr=format_addr(info.src_addr),
                                 dst_addr=format_addr(info.dst_addr), dst_hbone_addr=format_addr(info.target))

    def authorize(self, info: InboundInfo) -> Decision:
        return ALLOW

    async def open_upstream(self, info: InboundInfo) -> socket.socket:
        return await self._upstream(info)

    def opened(self, outcome: ConnectionOutcome) -> None:
        pass

    def closed(self, outcome: ConnectionOutcome) -> None:
        if self._closed is not None:
            self._closed(outcome)


class Loopback:
    """The CA, the TLS context cache and the server's listening socket (bound at once; served by start())."""

    def __init__(self, backlog: int) -> None:
        self.certs = Certs()
        self.contexts = TlsContextCache([self.certs.ca.root_pem])
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.addr: tuple[str, int] = self.listener.getsockname()

    async def start(self, nursery: trio.Nursery, *,
                    open_upstream: Callable[[InboundInfo], Awaitable[socket.socket]],
                    closed: Callable[[ConnectionOutcome], None] | None = None) -> CertBundle:
        """Serve HBONE as SERVER_ID in `nursery` (each connection in a task of its own); the client's
        certificate."""
        policy = AllowAll(open_upstream, closed)

        def spawn(sock: socket.socket, peer: tuple[str, int]) -> None:
            nursery.start_soon(functools.partial(serve_hbone_connection, sock, peer, identity=SERVER_ID,
                                                 certs=self.certs, contexts=self.contexts, policy=policy))

        def capacity_error(exc: OSError) -> None:
            raise exc

        self.listener.setblocking(False)
        nursery.start_soon(functools.partial(accept_forever, self.listener, spawn,
                                             on_capacity_error=capacity_error))
        return await self.certs.fetch_certificate(CLIENT_ID)
