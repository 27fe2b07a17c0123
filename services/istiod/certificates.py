"""The stub's CA service (istio.v1.auth.IstioCertificateService): workload certificates for ztunnel, which
asks for each identity it proxies (shared mode: the identity named in ImpersonatedIdentity)."""

from __future__ import annotations

import logging

from services.istiod.auth import Auth
from services.istiod.ca import CertificateAuthority
from services.istiod.errors import CaError
from services.istiod.rpc import one_request
from services.istiod.store import WorldStore
from shared.aio import RpcError, RpcStatus, ServerCall
from shared.api import ca_pb2
from shared.identity import IdentityError, SpiffeId

log = logging.getLogger(__name__)


class _Asked:
    """Who asked for what, as far as the request got: for the log line of a refusal."""

    __slots__ = ("identity", "node")

    def __init__(self) -> None:
        self.node: str | None = None
        self.identity: str | None = None


class CertificateServicer:
    """Signs a workload CSR when the calling node runs a pod with that identity (any pod when auth is off)."""

    def __init__(self, store: WorldStore, ca: CertificateAuthority, auth: Auth) -> None:
        self.store = store
        self.ca = ca
        self.auth = auth

    async def CreateCertificate(self, call: ServerCall) -> None:
        asked = _Asked()
        try:
            await self._create(call, asked)
        except RpcError as exc:
            log.warning("certificate refused", extra={"fields": [
                ("node", asked.node), ("identity", asked.identity), ("peer", str(call.peer)),
                ("status", exc.status.name), ("reason", exc.message)]})
            raise

    async def _create(self, call: ServerCall, asked: _Asked) -> None:
        node = asked.node = self.auth.node_of(call.metadata)
        req = await one_request(call)
        field = req.metadata.fields.get("ImpersonatedIdentity")
        asked.identity = field.string_value if field is not None and field.string_value else None
        if field is None or not field.string_value:
            raise RpcError(
                RpcStatus.INVALID_ARGUMENT,
                "the request must name the workload identity in metadata ImpersonatedIdentity "
                "(shared-mode ztunnel)",
            )
        try:
            identity = SpiffeId.parse(field.string_value)
        except IdentityError as exc:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, str(exc)) from None
        resources = self.store.resources
        if node is None:
            allowed = set().union(*resources.identities_by_node.values())
            where = "the world"
        elif node not in resources.identities_by_node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED, f"node {node} is not in the world; it runs no pods to sign for"
            )
        else:
            allowed = resources.identities_by_node[node]
            where = f"node {node}"
        if identity.uri not in allowed:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED,
                f"{where} runs no pod with identity {identity.uri}; a node may only request certificates "
                "for the service accounts of its own pods",
            )
        try:
            chain = self.ca.sign_workload_csr(req.csr, identity, req.validity_duration)
        except CaError as exc:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, str(exc)) from None
        log.info("certificate issued", extra={"fields": [
            ("identity", identity.uri), ("node", node or None), ("peer", str(call.peer))]})
        await call.send_message(ca_pb2.IstioCertificateResponse(cert_chain=chain))
