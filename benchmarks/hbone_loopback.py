"""What the HBONE loopback benchmarks share: certificates from a fresh CA, a client and a server identity,
and an HBONE server on 127.0.0.1 that allows everything."""

from __future__ import annotations

import functools
import socket
from typing import Any

import trio

from services.istiod.ca import CertificateAuthority
from services.ztunnel.authz import Decision
from services.ztunnel.hbone.server import serve_hbone
from services.ztunnel.hbone.tls import TlsContextCache
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


class Loopback:
    """The CA, the TLS context cache and the server's listening socket (bound at once; served by start())."""

    def __init__(self, backlog: int) -> None:
        self.certs = Certs()
        self.contexts = TlsContextCache([self.certs.ca.root_pem])
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(backlog)
        self.addr: tuple[str, int] = self.listener.getsockname()

    async def start(self, nursery: trio.Nursery, **serve_kwargs: Any) -> CertBundle:
        """Serve HBONE as SERVER_ID in `nursery` (`serve_kwargs`: open_upstream, on_complete, ...); the
        client's certificate."""
        await nursery.start(functools.partial(
            serve_hbone, self.listener, identity=SERVER_ID, certs=self.certs, contexts=self.contexts,
            authorize=lambda info: Decision(allowed=True), **serve_kwargs))
        return await self.certs.fetch_certificate(CLIENT_ID)
