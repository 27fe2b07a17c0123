"""Test helpers: run a real istiod stub in-process on loopback (like trio.testing for this service).

    async with open_test_istiod(bookinfo_world()) as istiod:   # or load_world(data, name)
        target = istiod.target(node="node-a")        # GrpcTarget with the root cert and node-a's token
        ...
        istiod.store.add_pod(...)                      # mutate the world directly, or through WorldAdmin

Used by this project's service tests and available to other services' tests (ztunnel, node agent).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import msgspec
import trio

from services.istiod.auth import Auth
from services.istiod.ca import CertificateAuthority
from services.istiod.server import IstiodServer, server_ssl_context
from services.istiod.store import WorldStore
from services.istiod.world import World, load_world
from shared.aio import GrpcTarget, open_aio_loop

ADMIN_TOKEN = "test-admin-token"
BOOKINFO_PATH = Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml"


def bookinfo_world() -> World:
    """A fresh World from examples/bookinfo.yaml, the world most tests start from."""
    return load_world(BOOKINFO_PATH.read_bytes(), "bookinfo.yaml")


class TestIstiod(msgspec.Struct, kw_only=True):
    __test__ = False  # not a pytest test class

    server: IstiodServer
    port: int
    root_pem: str | None
    tokens: dict[str, str]
    nursery: trio.Nursery

    @property
    def store(self) -> WorldStore:
        return self.server.store

    def target(self, node: str | None = None, *, token: str | None = None) -> GrpcTarget:
        """A client target; `node` picks that node's token (or pass `token` explicitly)."""
        if token is None and node is not None:
            token = self.tokens[node]
        return GrpcTarget(host="127.0.0.1", port=self.port, root_cert_pem=self.root_pem, token=token)

    def admin_target(self) -> GrpcTarget:
        return GrpcTarget(host="127.0.0.1", port=self.port, root_cert_pem=self.root_pem, token=ADMIN_TOKEN)


@asynccontextmanager
async def open_test_istiod(
    world: World, *, tls: bool = True, auth: bool = True, ca: CertificateAuthority | None = None
) -> AsyncIterator[TestIstiod]:
    """Serve `world` on 127.0.0.1 (a free port) until the block ends. Tokens are `token-<node>`."""
    ca = ca or CertificateAuthority.create(world.trust_domain)
    tokens = {node.name: f"token-{node.name}" for node in world.nodes} if auth else {}
    server = IstiodServer(WorldStore(world), ca, Auth(tokens, ADMIN_TOKEN if auth else None))
    ssl_context = server_ssl_context(ca) if tls else None
    async with open_aio_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(
            lambda task_status: server.serve(
                host="127.0.0.1", port=0, ssl_context=ssl_context, task_status=task_status
            )
        )
        handle = TestIstiod(
            server=server, port=port, root_pem=ca.root_pem if tls else None, tokens=tokens, nursery=nursery
        )
        try:
            yield handle
        finally:
            nursery.cancel_scope.cancel()
