"""The stub's delta ADS (envoy.service.discovery.v3.AggregatedDiscoveryService): workloads, services and
authorization policies of the world, as upstream istiod serves them to ztunnel.

Theory of operation
-------------------
One DeltaAggregatedResources call carries any number of type subscriptions. Per call a reader task takes
requests and a writer task sends responses; they share `_Subscription`s (per type URL: wildcard or names, and
`sent` = name -> version the client holds). The writer wakes on a world change (WorldStore Wakeup) or on a new
subscription, and for every subscription sends the difference between the current resources and `sent`:
changed/added resources plus removed names, with a fresh nonce. The first response of a subscription is sent
even when empty so the client knows it is in sync. A reconnecting client's `initial_resource_versions` seeds
`sent`, so it only receives what changed while it was away. ACKs (response_nonce, no error_detail) and NACKs
(error_detail set) are recorded; like istiod, a NACKed resource is not re-sent until it changes again. An
unknown type URL ends the call with INVALID_ARGUMENT. A client vanishing cancels only its own call.

WaypointConfig (ours, proto/waypoint.proto) is visible to one client only: the one whose node id is its
waypoint pod's (`router~IP~POD.NS~...`) and, with node tokens, whose token is of that pod's node. To anyone
else the resource does not exist (a wildcard subscription gets none, a named one gets nothing).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import msgspec
import trio
from google.protobuf import any_pb2

from services.istiod.auth import Auth
from services.istiod.derive import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_CONFIG_TYPE_URL
from services.istiod.store import WorldStore
from shared.aio import RpcError, RpcStatus, ServerCall
from shared.api import discovery_pb2

log = logging.getLogger(__name__)

SUPPORTED_TYPE_URLS = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, WAYPOINT_CONFIG_TYPE_URL)
MAX_RECORDED_NACKS = 1000


class Nack(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    type_url: str
    nonce: str
    message: str


class _Subscription:
    def __init__(self, names: Sequence[str], unsubscribe: Sequence[str], initial: Mapping[str, str]) -> None:
        self.wildcard = (not names or "*" in names) and "*" not in unsubscribe
        self.names = {n for n in names if n != "*"}
        self.sent: dict[str, str] = dict(initial)
        self.initial_pending = True


class AggregatedDiscoveryServicer:
    """Delta ADS over the WorldStore. `nacks` records the NACKs received (newest last, the last
    MAX_RECORDED_NACKS); `acks` counts the ACKs."""

    def __init__(self, store: WorldStore, auth: Auth) -> None:
        self.store = store
        self.auth = auth
        self.nacks: list[Nack] = []
        self.acks = 0
        self._nonce = 0

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
                log.info("xDS stream opened",
                         extra={"fields": [("peer", str(call.peer)), ("node", node or None)]})
                try:
                    while True:
                        await wakeup.wait()
                        for type_url, sub in list(subs.items()):
                            response = self._diff(type_url, sub, node_id, node)
                            if response is not None:
                                await call.send_message(response)
                finally:
                    log.info("xDS stream closed",
                             extra={"fields": [("node_id", node_id), ("peer", str(call.peer))]})

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
            log.info("xDS subscription", extra={"fields": [
                ("node_id", node_id), ("type_url", req.type_url),
                ("known", len(req.initial_resource_versions))]})
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
                log.warning("xDS NACK", extra={"fields": [
                    ("node_id", node_id), ("type_url", req.type_url), ("nonce", req.response_nonce),
                    ("error", nack.message)]})
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

    def _diff(
        self, type_url: str, sub: _Subscription, node_id: str, token_node: str | None
    ) -> discovery_pb2.DeltaDiscoveryResponse | None:
        current = self.store.resources.by_type[type_url]
        if type_url == WAYPOINT_CONFIG_TYPE_URL:
            readers = self.store.resources.waypoint_readers
            current = {n: r for n, r in current.items() if readers[n].admits(node_id, token_node)}
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
