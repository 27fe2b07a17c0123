"""The CA client: asks istiod's IstioCertificateService for a workload certificate.

A fresh ECDSA P-256 key per request, a CSR with an empty subject and one URI SAN (the SPIFFE id), metadata
`{"ImpersonatedIdentity": <spiffe id>}` (ztunnel's shared mode), and the node token as bearer.
"""

from __future__ import annotations

from typing import Protocol

from google.protobuf import struct_pb2

from services.ztunnel.identity.errors import CertificateError
from shared.aio import GrpcTarget, RpcError, open_target
from shared.api import ca_grpc, ca_pb2
from shared.identity import CertBundle, IdentityError, SpiffeId, generate_key, key_to_pem, make_csr

DEFAULT_TTL_SECONDS = 86400
CA_MAX_MESSAGE_SIZE = 4 * 1024 * 1024
"""The largest CA answer accepted (a certificate chain is a few KiB; gRPC's usual 4 MiB, as upstream's
client has): a larger one is refused before its body is read."""


class CaClient(Protocol):
    async def fetch(self, identity: SpiffeId) -> CertBundle:
        """A new certificate for `identity`. Raises CertificateError."""
        ...


class GrpcCaClient:
    """CaClient over gRPC; one connection per request (certificates are rare: one per identity per 12 h)."""

    def __init__(self, target: GrpcTarget, *, ttl_seconds: int = DEFAULT_TTL_SECONDS) -> None:
        self.target = target
        self.ttl_seconds = ttl_seconds

    async def fetch(self, identity: SpiffeId) -> CertBundle:
        key = generate_key()
        metadata = struct_pb2.Struct()
        metadata.update({"ImpersonatedIdentity": identity.uri})
        request = ca_pb2.IstioCertificateRequest(
            csr=make_csr(key, identity), validity_duration=self.ttl_seconds, metadata=metadata
        )
        try:
            async with open_target(self.target, max_message_size=CA_MAX_MESSAGE_SIZE) as channel:
                response = await channel.unary(
                    ca_grpc.IstioCertificateServiceStub,
                    "CreateCertificate",
                    request,
                    metadata=self.target.call_metadata(),
                )
        except RpcError as exc:
            raise CertificateError(f"the CA refused a certificate for {identity.uri}: {exc}") from None
        try:
            return CertBundle.from_chain(identity, key_to_pem(key), list(response.cert_chain))
        except IdentityError as exc:
            raise CertificateError(f"the CA's answer for {identity.uri} is unusable: {exc}") from None
