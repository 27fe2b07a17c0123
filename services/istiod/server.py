"""The stub's gRPC services (delta ADS, CA, pod watch, world admin): Trio code behind shared/aio.py.

Theory of operation (delta ADS)
-------------------------------
One DeltaAggregatedResources call carries any number of type subscriptions. Per call a reader task takes
requests and a writer task sends responses; they share `_Subscription`s (per type URL: wildcard or names, and
`sent` = name -> version the client holds). The writer wakes on a world change (WorldStore Wakeup) or on a new
subscription, and for every subscription sends the difference between the current resources and `sent`:
changed/added resources plus removed names, with a fresh nonce. The first response of a subscription is sent
even when empty so the client knows it is in sync. A reconnecting client's `initial_resource_versions` seeds
`sent`, so it only receives what changed while it was away. ACKs (response_nonce, no error_detail) and NACKs
(error_detail set) are recorded; like istiod, a NACKed resource is not re-sent until it changes again. An
unknown type URL ends the call with INVALID_ARGUMENT. A client vanishing cancels only its own call.
"""

from __future__ import annotations

import logging
import ssl
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import msgspec
import trio
from google.protobuf import any_pb2

from services.istiod.ca import CertificateAuthority
from services.istiod.derive import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from services.istiod.errors import CaError, NotFoundError, WorldError
from services.istiod.store import WorldStore
from services.istiod.world import REDIRECTION_ANNOTATION, REDIRECTION_VALUES, load_world, world_to_json
from shared.aio import RpcError, RpcStatus, ServerCall, serve_grpc, trio_service
from shared.api import (
    ca_grpc,
    ca_pb2,
    discovery_grpc,
    discovery_pb2,
    podwatch_grpc,
    podwatch_pb2,
    worldadmin_grpc,
    worldadmin_pb2,
)
from shared.identity import IdentityError, SpiffeId

log = logging.getLogger(__name__)

SUPPORTED_TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
MAX_RECORDED_NACKS = 1000


class Nack(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    type_url: str
    nonce: str
    message: str


class Auth:
    """Bearer tokens: one per node (proves which node a caller runs on) and an optional admin token.

    With no node tokens at all, authentication is off (development/tests): any caller is accepted and the CA
    signs any identity that has a pod somewhere in the world.
    """

    def __init__(self, node_tokens: Mapping[str, str] | None = None, admin_token: str | None = None) -> None:
        self.node_by_token = {token: node for node, token in (node_tokens or {}).items()}
        self.admin_token = admin_token

    def set_node_tokens(self, node_tokens: Mapping[str, str]) -> None:
        self.node_by_token = {token: node for node, token in node_tokens.items()}

    @property
    def enabled(self) -> bool:
        return bool(self.node_by_token)

    @staticmethod
    def _bearer(metadata: Mapping[str, str]) -> str | None:
        value = metadata.get("authorization", "")
        return value[7:].strip() if value.lower().startswith("bearer ") else None

    def node_of(self, metadata: Mapping[str, str]) -> str | None:
        """The node the caller proved with its token, or None when auth is off. Raises RpcError."""
        if not self.enabled:
            return None
        token = self._bearer(metadata)
        if token is None:
            raise RpcError(RpcStatus.UNAUTHENTICATED, "missing 'authorization: Bearer <node token>' metadata")
        node = self.node_by_token.get(token)
        if node is None:
            raise RpcError(RpcStatus.UNAUTHENTICATED, "unknown node token; check the token file of this node")
        return node

    def check_admin(self, metadata: Mapping[str, str]) -> None:
        if self.admin_token is None:
            return
        if self._bearer(metadata) != self.admin_token:
            raise RpcError(
                RpcStatus.UNAUTHENTICATED,
                "world changes need 'authorization: Bearer <admin token>' (admin.token)",
            )


class _Subscription:
    def __init__(self, names: Sequence[str], unsubscribe: Sequence[str], initial: Mapping[str, str]) -> None:
        self.wildcard = (not names or "*" in names) and "*" not in unsubscribe
        self.names = {n for n in names if n != "*"}
        self.sent: dict[str, str] = dict(initial)
        self.initial_pending = True


class IstiodServer:
    """All services of the stub over one WorldStore. `nacks` records the NACKs received (newest last, the
    last MAX_RECORDED_NACKS)."""

    def __init__(self, store: WorldStore, ca: CertificateAuthority, auth: Auth | None = None) -> None:
        self.store = store
        self.ca = ca
        self.auth = auth or Auth()
        self.nacks: list[Nack] = []
        self.acks = 0
        self._nonce = 0

    def services(self) -> list[object]:
        return [
            trio_service(discovery_grpc.AggregatedDiscoveryServiceBase, self),
            trio_service(ca_grpc.IstioCertificateServiceBase, self),
            trio_service(podwatch_grpc.PodWatchBase, self),
            trio_service(worldadmin_grpc.WorldAdminBase, self),
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
            self.services(), host=host, port=port, ssl_context=ssl_context, task_status=task_status
        )

    # --- delta ADS -------------------------------------------------------------------------------------

    async def DeltaAggregatedResources(self, call: ServerCall) -> None:
        node = self.auth.node_of(call.metadata)
        subs: dict[str, _Subscription] = {}
        node_id = "?"
        with self.store.subscribe() as wakeup:

            async def reader() -> None:
                nonlocal node_id
                while (req := await call.recv_message()) is not None:
                    if req.node.id:
                        node_id = req.node.id
                    self._on_request(req, subs, node_id)
                    wakeup.set()
                # The client half-closed: nothing more to serve.
                nursery.cancel_scope.cancel()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                log.info("xDS stream opened by %s (node %s)", call.peer, node or "-")
                try:
                    while True:
                        await wakeup.wait()
                        for type_url, sub in list(subs.items()):
                            response = self._diff(type_url, sub)
                            if response is not None:
                                await call.send_message(response)
                finally:
                    log.info("xDS stream of %s (%s) closed", node_id, call.peer)

    def _on_request(
        self, req: discovery_pb2.DeltaDiscoveryRequest, subs: dict[str, _Subscription], node_id: str
    ) -> None:
        if req.type_url not in SUPPORTED_TYPE_URLS:
            raise RpcError(
                RpcStatus.INVALID_ARGUMENT,
                f"unknown type URL {req.type_url!r}; this server serves {', '.join(SUPPORTED_TYPE_URLS)}",
            )
        sub = subs.get(req.type_url)
        if sub is None:
            subs[req.type_url] = _Subscription(
                list(req.resource_names_subscribe),
                list(req.resource_names_unsubscribe),
                dict(req.initial_resource_versions),
            )
            log.info(
                "%s subscribed to %s (%d known)", node_id, req.type_url, len(req.initial_resource_versions)
            )
            return
        if req.response_nonce:
            if req.HasField("error_detail"):
                nack = Nack(
                    node_id=node_id,
                    type_url=req.type_url,
                    nonce=req.response_nonce,
                    message=req.error_detail.message,
                )
                self.nacks.append(nack)
                del self.nacks[:-MAX_RECORDED_NACKS]
                log.warning(
                    "NACK from %s for %s (nonce %s): %s",
                    node_id,
                    req.type_url,
                    req.response_nonce,
                    nack.message,
                )
            else:
                self.acks += 1
        for name in req.resource_names_subscribe:
            if name == "*":
                sub.wildcard = True
            else:
                sub.names.add(name)
        for name in req.resource_names_unsubscribe:
            if name == "*":
                # Leaving wildcard: the client drops what it no longer wants; nothing to send as removed.
                sub.wildcard = False
                sub.sent = {n: v for n, v in sub.sent.items() if n in sub.names}
            else:
                sub.names.discard(name)
                if not sub.wildcard:
                    sub.sent.pop(name, None)

    def _diff(self, type_url: str, sub: _Subscription) -> discovery_pb2.DeltaDiscoveryResponse | None:
        current = self.store.resources.by_type[type_url]
        visible = current if sub.wildcard else {n: current[n] for n in sub.names if n in current}
        resources = []
        for name, (version, msg) in sorted(visible.items()):
            if sub.sent.get(name) != version:
                packed = any_pb2.Any(type_url=type_url, value=msg.SerializeToString())
                resources.append(discovery_pb2.Resource(name=name, version=version, resource=packed))
                sub.sent[name] = version
        removed = sorted(name for name in sub.sent if name not in visible)
        for name in removed:
            del sub.sent[name]
        if not resources and not removed and not sub.initial_pending:
            return None
        sub.initial_pending = False
        self._nonce += 1
        return discovery_pb2.DeltaDiscoveryResponse(
            system_version_info=str(self.store.generation),
            type_url=type_url,
            resources=resources,
            removed_resources=removed,
            nonce=f"{self.store.generation}-{self._nonce}",
        )

    # --- CA --------------------------------------------------------------------------------------------

    async def CreateCertificate(self, call: ServerCall) -> None:
        node = self.auth.node_of(call.metadata)
        req = await call.recv_message()
        if req is None:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "no request")
        field = req.metadata.fields.get("ImpersonatedIdentity")
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
        log.info("issued a certificate for %s to %s", identity.uri, node or call.peer)
        await call.send_message(ca_pb2.IstioCertificateResponse(cert_chain=chain))

    # --- pod watch -------------------------------------------------------------------------------------

    async def Watch(self, call: ServerCall) -> None:
        caller = self.auth.node_of(call.metadata)
        req = await call.recv_message()
        if req is None:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "no request")
        if caller is not None and caller != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED, f"the token is node {caller}'s, not node {req.node}'s"
            )
        if req.node not in self.store.resources.pods_by_node:
            nodes = ", ".join(sorted(self.store.resources.pods_by_node)) or "none"
            raise RpcError(RpcStatus.NOT_FOUND, f"unknown node {req.node!r} (world nodes: {nodes})")
        log.info(
            "pod watch for node %s opened by %s (%d known)", req.node, call.peer, len(req.known_versions)
        )
        with self.store.subscribe() as wakeup:
            current = self.store.resources.pods_by_node.get(req.node, {})
            known = dict(req.known_versions)
            if known:
                sync = podwatch_pb2.Sync(
                    full=False,
                    pods=[p for uid, p in current.items() if known.get(uid) != p.version],
                    removed=sorted(uid for uid in known if uid not in current),
                )
            else:
                sync = podwatch_pb2.Sync(full=True, pods=list(current.values()))
            await call.send_message(podwatch_pb2.PodWatchEvent(revision=self.store.generation, sync=sync))
            sent = dict(current)
            while True:
                await wakeup.wait()
                current = self.store.resources.pods_by_node.get(req.node, {})
                revision = self.store.generation
                for uid, pod in current.items():
                    if uid not in sent or sent[uid].version != pod.version:
                        await call.send_message(podwatch_pb2.PodWatchEvent(revision=revision, changed=pod))
                for uid, old in list(sent.items()):
                    if uid not in current:
                        gone = podwatch_pb2.PodRemoved(uid=uid, name=old.name, namespace=old.namespace)
                        await call.send_message(podwatch_pb2.PodWatchEvent(revision=revision, removed=gone))
                sent = dict(current)

    async def SetRedirection(self, call: ServerCall) -> None:
        """A node agent sets or removes the `ambient.istio.io/redirection` annotation of a pod on its node."""
        caller = self.auth.node_of(call.metadata)
        req = await call.recv_message()
        if req is None:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "no request")
        if not (req.node and req.namespace and req.name):
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "node, namespace and name are all required")
        if caller is not None and caller != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED, f"the token is node {caller}'s, not node {req.node}'s"
            )
        value = req.value if req.HasField("value") else None
        if value is not None and value not in REDIRECTION_VALUES:
            raise RpcError(
                RpcStatus.INVALID_ARGUMENT,
                f"{value!r} is not a value of {REDIRECTION_ANNOTATION}: use "
                f"{' or '.join(REDIRECTION_VALUES)}, or leave value unset to remove the annotation",
            )
        key = f"{req.namespace}/{req.name}"
        pod = self.store.find_pod(req.namespace, req.name)
        if pod is None:
            raise RpcError(RpcStatus.NOT_FOUND, f"no pod {key} in the world")
        if req.uid and pod.kube_uid != req.uid:
            raise RpcError(
                RpcStatus.NOT_FOUND,
                f"pod {key} with uid {req.uid} no longer exists (the pod of that name has uid "
                f"{pod.kube_uid})",
            )
        if pod.node != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED,
                f"pod {key} runs on node {pod.node}, not on node {req.node}; a node agent may only set the "
                "status of its own node's pods",
            )
        # Nothing awaits between the checks above and this change: they still hold.
        with self._world_errors():
            generation, changed = self.store.set_pod_redirection(req.namespace, req.name, value, uid=req.uid)
        version = self.store.resources.pods_by_node[pod.node][pod.kube_uid].version
        if changed:
            log.info(
                "node %s set %s of pod %s to %s", req.node, REDIRECTION_ANNOTATION, key, value or "(removed)"
            )
        await call.send_message(
            podwatch_pb2.SetRedirectionResponse(revision=generation, version=version, changed=changed)
        )

    # --- world admin -----------------------------------------------------------------------------------

    @contextmanager
    def _admin(self, call: ServerCall) -> Iterator[None]:
        self.auth.check_admin(call.metadata)
        with self._world_errors():
            yield

    @staticmethod
    @contextmanager
    def _world_errors() -> Iterator[None]:
        try:
            yield
        except WorldError as exc:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, str(exc)) from None
        except NotFoundError as exc:
            raise RpcError(RpcStatus.NOT_FOUND, str(exc)) from None

    async def _admin_request(self, call: ServerCall) -> Any:
        self.auth.check_admin(call.metadata)
        req = await call.recv_message()
        if req is None:
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "no request")
        return req

    async def _reply(self, call: ServerCall, generation: int) -> None:
        await call.send_message(worldadmin_pb2.WorldResponse(generation=generation))

    async def ApplyWorld(self, call: ServerCall) -> None:
        req: worldadmin_pb2.ApplyWorldRequest = await self._admin_request(call)
        with self._admin(call):
            world = load_world(req.document, req.source or "world")
            generation = self.store.apply(world, req.source or "world")
        await self._reply(call, generation)

    async def AddPod(self, call: ServerCall) -> None:
        req: worldadmin_pb2.AddPodRequest = await self._admin_request(call)
        with self._admin(call):
            generation = self.store.add_pod(req.pod_json)
        await self._reply(call, generation)

    async def RemovePod(self, call: ServerCall) -> None:
        req: worldadmin_pb2.RemovePodRequest = await self._admin_request(call)
        with self._admin(call):
            generation = self.store.remove_pod(req.namespace, req.name)
        await self._reply(call, generation)

    async def SetLabels(self, call: ServerCall) -> None:
        req: worldadmin_pb2.SetLabelsRequest = await self._admin_request(call)
        with self._admin(call):
            if req.kind == worldadmin_pb2.SetLabelsRequest.NAMESPACE:
                generation = self.store.set_namespace_labels(req.name, dict(req.set), list(req.remove))
            else:
                generation = self.store.set_pod_labels(
                    req.namespace, req.name, dict(req.set), list(req.remove)
                )
        await self._reply(call, generation)

    async def AddPolicy(self, call: ServerCall) -> None:
        req: worldadmin_pb2.AddPolicyRequest = await self._admin_request(call)
        with self._admin(call):
            generation = self.store.add_policy(req.policy_json)
        await self._reply(call, generation)

    async def RemovePolicy(self, call: ServerCall) -> None:
        req: worldadmin_pb2.RemovePolicyRequest = await self._admin_request(call)
        with self._admin(call):
            generation = self.store.remove_policy(req.namespace, req.name)
        await self._reply(call, generation)

    async def GetWorld(self, call: ServerCall) -> None:
        await self._admin_request(call)
        await call.send_message(
            worldadmin_pb2.WorldResponse(
                generation=self.store.generation, world_json=world_to_json(self.store.world)
            )
        )


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
        key_path.write_bytes(key_pem)
        ctx.load_cert_chain(cert_path, key_path)
    return ctx
