"""The stub's gRPC server: one servicer per gRPC service over one WorldStore, served on one port.

    ads.py            AggregatedDiscoveryServicer   delta xDS (Address, Authorization) for ztunnel
    certificates.py   CertificateServicer           workload certificates (the CA)
    podwatch.py       PodWatchServicer              the node agents' pod watch and status writes
    worldadmin.py     WorldAdminServicer            `ambient world` changes

All of them are Trio code behind shared/aio.py, and all check callers with one `Auth`.
"""

from __future__ import annotations

import ssl
import tempfile
from collections.abc import Sequence
from pathlib import Path

import trio

from services.istiod.ads import AggregatedDiscoveryServicer
from services.istiod.auth import Auth
from services.istiod.ca import CertificateAuthority
from services.istiod.certificates import CertificateServicer
from services.istiod.podwatch import PodWatchServicer
from services.istiod.store import WorldStore
from services.istiod.world import MAX_WORLD_BYTES
from services.istiod.worldadmin import WorldAdminServicer
from shared.aio import serve_grpc, trio_service
from shared.api import ca_grpc, discovery_grpc, podwatch_grpc, worldadmin_grpc
from shared.secretfile import write_secret


class IstiodServer:
    """The stub's four servicers over one WorldStore, one CA and one Auth."""

    def __init__(self, store: WorldStore, ca: CertificateAuthority, auth: Auth | None = None) -> None:
        self.store = store
        self.ca = ca
        self.auth = auth or Auth()
        self.ads = AggregatedDiscoveryServicer(store, self.auth)
        self.certificates = CertificateServicer(store, ca, self.auth)
        self.pods = PodWatchServicer(store, self.auth)
        self.admin = WorldAdminServicer(store, self.auth)

    def services(self) -> list[object]:
        return [
            trio_service(discovery_grpc.AggregatedDiscoveryServiceBase, self.ads),
            trio_service(ca_grpc.IstioCertificateServiceBase, self.certificates),
            trio_service(podwatch_grpc.PodWatchBase, self.pods),
            trio_service(worldadmin_grpc.WorldAdminBase, self.admin),
        ]

    async def serve(
        self,
        *,
        host: str,
        port: int,
        ssl_context: ssl.SSLContext | None = None,
        task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve every service on host:port until cancelled; started() with the bound port."""
        await serve_grpc(
            self.services(), host=host, port=port, ssl_context=ssl_context,
            max_message_size=MAX_REQUEST_SIZE, task_status=task_status
        )


MAX_REQUEST_SIZE = MAX_WORLD_BYTES + 1024 * 1024
"""The largest request message the stub reads: a whole world document (ApplyWorld) and its envelope. A
larger one ends its call with RESOURCE_EXHAUSTED before its body is read."""

DEFAULT_SERVER_NAMES = ("istiod.istio-system.svc", "istiod", "localhost", "127.0.0.1", "::1")


def server_ssl_context(
    ca: CertificateAuthority, names: Sequence[str] = DEFAULT_SERVER_NAMES
) -> ssl.SSLContext:
    """A TLS 1.2+ server context with a fresh serving certificate signed by the stub's root, ALPN h2."""
    key_pem, chain_pem = ca.issue_server_cert(list(names))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.set_alpn_protocols(["h2"])
    # ssl can only load keys from files: write them to a private temporary folder, load, delete.
    with tempfile.TemporaryDirectory(prefix="istiod-tls-") as tmp:
        cert_path, key_path = Path(tmp) / "cert.pem", Path(tmp) / "key.pem"
        cert_path.write_text(chain_pem)
        write_secret(key_path, key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
