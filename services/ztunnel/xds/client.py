"""The delta ADS client: keeps ztunnel's StateStore in sync with the control plane.

Theory of operation
-------------------
`XdsClient.run()` loops forever: open a DeltaAggregatedResources stream, send one wildcard request per type
URL (Address, Authorization) carrying `initial_resource_versions` = every resource it already holds, then for
each response convert the resources (convert.py), apply the ones that convert and removals
to the store, and answer with an ACK, or a NACK whose error_detail lists every resource that did not convert
(the others are kept, as upstream ztunnel does). When the stream fails (server gone, TLS error, status) it
waits with exponential backoff (reset after a stream that delivered a response) and reconnects; the store
keeps serving the last known state in between, and the resume only transfers what changed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from google.protobuf import any_pb2, struct_pb2

from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Authorization, Service, Workload
from services.ztunnel.xds.convert import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    address_from_any,
    authorization_from_any,
)
from services.ztunnel.xds.errors import ConversionError
from shared.addr import format_host_port
from shared.aio import GrpcTarget, RpcError, open_aio_loop, open_target
from shared.api import discovery_grpc, discovery_pb2, envoy_base_pb2, rpc_status_pb2
from shared.logs import Display

if TYPE_CHECKING:
    from services.ztunnel.config import ZtunnelConfig

log = logging.getLogger(__name__)

INVALID_ARGUMENT = 3  # google.rpc.Code of a NACK
XDS_MAX_MESSAGE_SIZE = 200 * 1024 * 1024
"""The largest xDS response accepted (upstream ztunnel's bound); a larger one ends the stream with
RESOURCE_EXHAUSTED before its body is read, and the client reconnects with backoff."""


class XdsClientConfig(msgspec.Struct, frozen=True, kw_only=True):
    node_id: str
    node_metadata: dict[str, str] = {}
    type_urls: tuple[str, ...] = (ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL)
    backoff_initial: float = 0.1
    backoff_max: float = 15.0

    @classmethod
    def for_ztunnel(cls, config: ZtunnelConfig) -> XdsClientConfig:
        """Upstream ztunnel's node identity from its settings (INSTANCE_IP, POD_NAME, POD_NAMESPACE,
        NODE_NAME)."""
        return cls(
            node_id=ztunnel_node_id(config.instance_ip, config.pod_name, config.pod_namespace),
            node_metadata={"NAME": config.pod_name, "NAMESPACE": config.pod_namespace,
                           "INSTANCE_IPS": config.instance_ip, "NODE_NAME": config.node_name},
        )


def ztunnel_node_id(instance_ip: str, pod_name: str, pod_namespace: str) -> str:
    """Upstream's node id: `ztunnel~<IP>~<POD_NAME>.<POD_NAMESPACE>~<POD_NAMESPACE>.svc.cluster.local`."""
    return f"ztunnel~{instance_ip}~{pod_name}.{pod_namespace}~{pod_namespace}.svc.cluster.local"


_Converter = Callable[[str, any_pb2.Any], object]


class ResourceSink(Protocol):
    """Where the resources of a further type URL go (the waypoint's WaypointConfig): converted one by one,
    applied per response like the store's."""

    def convert(self, name: str, resource: any_pb2.Any) -> object:
        """The resource as a domain value. Raises ConversionError (the resource is NACKed)."""
        ...

    def apply(self, upserts: list[object], removed: list[str]) -> None: ...


class XdsClient:
    def __init__(self, target: GrpcTarget, store: StateStore, config: XdsClientConfig, *,
                 sinks: Mapping[str, ResourceSink] | None = None) -> None:
        """`sinks`: type URLs beyond Address and Authorization (also list them in `config.type_urls`)."""
        self.target = target
        self.store = store
        self.config = config
        self.sinks = dict(sinks or {})
        # type URL -> resource name -> version of what the store holds (what we ACKed).
        self.versions: dict[str, dict[str, str]] = {url: {} for url in config.type_urls}
        self.connected = False
        self.connects = 0
        self.nacks_sent: list[str] = []
        self._synced_types: set[str] = set()
        self._synced = trio.Event()
        self._converters: Mapping[str, _Converter] = {
            ADDRESS_TYPE_URL: address_from_any,
            AUTHORIZATION_TYPE_URL: authorization_from_any,
        }

    def is_synced(self) -> bool:
        """Every subscribed type has had its first response (the readiness check)."""
        return self._synced.is_set()

    async def wait_synced(self) -> None:
        """Return once every type URL has received its first response (the store holds a full view)."""
        await self._synced.wait()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Stay connected until cancelled. started() right away; is_synced() is the readiness check."""
        async with open_aio_loop():
            task_status.started()
            await self._run_forever()

    async def _run_forever(self) -> None:
        backoff = self.config.backoff_initial
        while True:
            delivered = False
            try:
                delivered = await self._session()
                reason = "the server ended the stream"
            except RpcError as exc:
                reason = str(exc)
            finally:
                self.connected = False
            if delivered:
                backoff = self.config.backoff_initial
            log.warning("xDS stream ended; reconnecting", extra={"fields": [
                ("address", self._address()), ("error", reason), ("backoff", f"{backoff:.1f}s")]})
            await trio.sleep(backoff)
            backoff = min(backoff * 2, self.config.backoff_max)

    def _address(self) -> Display:
        return Display(format_host_port(self.target.host, self.target.port))

    def _node(self) -> envoy_base_pb2.Node:
        metadata = struct_pb2.Struct()
        metadata.update(self.config.node_metadata)
        return envoy_base_pb2.Node(id=self.config.node_id, metadata=metadata)

    async def _session(self) -> bool:
        """One stream; returns whether it delivered at least one response. Raises RpcError."""
        delivered = False
        async with (
            open_target(self.target, max_message_size=XDS_MAX_MESSAGE_SIZE) as channel,
            channel.stream(
                discovery_grpc.AggregatedDiscoveryServiceStub,
                "DeltaAggregatedResources",
                metadata=self.target.call_metadata(),
            ) as call,
        ):
            node = self._node()
            for type_url in self.config.type_urls:
                await call.send_message(
                    discovery_pb2.DeltaDiscoveryRequest(
                        node=node, type_url=type_url, initial_resource_versions=self.versions[type_url]
                    )
                )
            self.connected = True
            self.connects += 1
            log.info("xDS connected",
                     extra={"fields": [("address", self._address()), ("connection", self.connects)]})
            while (response := await call.recv_message()) is not None:
                delivered = True
                await call.send_message(self.handle_response(response))
        return delivered

    def handle_response(
        self, response: discovery_pb2.DeltaDiscoveryResponse
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        """Apply one response to the store; return the ACK or NACK to send (sync, no I/O)."""
        type_url = response.type_url
        reply = discovery_pb2.DeltaDiscoveryRequest(type_url=type_url, response_nonce=response.nonce)
        sink = self.sinks.get(type_url)
        convert = sink.convert if sink is not None else self._converters.get(type_url)
        if convert is None or type_url not in self.versions:
            return self._nack(reply, [f"type URL {type_url!r} was not subscribed"])
        good: list[object] = []
        failures: list[str] = []
        versions = self.versions[type_url]
        for resource in response.resources:
            try:
                item = convert(resource.name, resource.resource)
            except ConversionError as exc:
                failures.append(str(exc))
                continue
            good.append(item)
            versions[resource.name] = resource.version
        removed = list(response.removed_resources)
        for name in removed:
            versions.pop(name, None)
        if sink is not None:
            sink.apply(good, removed)
        elif type_url == ADDRESS_TYPE_URL:
            self.store.apply_addresses([x for x in good if isinstance(x, Workload | Service)], removed)
        else:
            self.store.apply_authorizations([x for x in good if isinstance(x, Authorization)], removed)
        log.debug("xDS response applied", extra={"fields": [
            ("type_url", type_url), ("updated", len(good)), ("removed", len(removed)),
            ("rejected", len(failures))]})
        self._synced_types.add(type_url)
        if self._synced_types >= set(self.config.type_urls):
            self._synced.set()
        if failures:
            return self._nack(reply, failures)
        return reply

    def _nack(
        self, reply: discovery_pb2.DeltaDiscoveryRequest, failures: list[str]
    ) -> discovery_pb2.DeltaDiscoveryRequest:
        message = "; ".join(failures)
        log.warning("sending NACK", extra={"fields": [
            ("type_url", reply.type_url), ("nonce", reply.response_nonce), ("error", message)]})
        self.nacks_sent.append(message)
        reply.error_detail.CopyFrom(rpc_status_pb2.Status(code=INVALID_ARGUMENT, message=message))
        return reply
