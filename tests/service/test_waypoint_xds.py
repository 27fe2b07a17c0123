"""The WaypointConfig over the stub's delta ADS: the waypoint pod's proxy gets its own config and follows
world changes; ztunnel, another pod's node id or another node's token see no such resource."""

from __future__ import annotations

import trio

from services.istiod.derive import WAYPOINT_CONFIG_TYPE_URL, waypoint_node_id
from services.istiod.testing import open_test_istiod
from services.istiod.world import World, load_world
from shared.aio import ClientCall, open_target
from shared.api import discovery_grpc, discovery_pb2, envoy_base_pb2
from shared.api import waypoint_pb2 as wypb

WORLD = b"""
nodes: [{name: node-a}, {name: node-b}]
namespaces: [{name: ns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}]
pods:
  - {name: wp-0, namespace: ns, node: node-a, ips: [10.0.0.9], serviceAccount: waypoint, labels: {app: wp}}
  - {name: a, namespace: ns, node: node-b, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: wp, namespace: ns, vips: [10.96.0.99], selector: {app: wp}, ports: [{port: 15008}]}
  - {name: a, namespace: ns, vips: [10.96.0.1], selector: {app: a}, ports: [{port: 80, appProtocol: http}]}
waypoints: [{name: wp, namespace: ns, pod: wp-0}]
authorizationPolicies:
  - {name: get-only, namespace: ns, targetRefs: [{kind: Gateway, name: wp}],
     rules: [{to: [{operation: {methods: [GET]}}]}]}
"""


def world() -> World:
    return load_world(WORLD, "w.yaml")


def request(node_id: str, **kwargs: object) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(
        node=envoy_base_pb2.Node(id=node_id), type_url=WAYPOINT_CONFIG_TYPE_URL, **kwargs  # type: ignore[arg-type]
    )


async def first_response(
    call: ClientCall, node_id: str, **kwargs: object
) -> discovery_pb2.DeltaDiscoveryResponse:
    await call.send_message(request(node_id, **kwargs))
    response = await call.recv_message()
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    return response


async def test_the_waypoint_gets_its_config_and_its_changes() -> None:
    w = world()
    own = waypoint_node_id(w.pods[0], w.domain_suffix)
    with trio.fail_after(20):
        async with (
            open_test_istiod(w) as istiod,
            open_target(istiod.target(node="node-a")) as channel,
            channel.stream(discovery_grpc.AggregatedDiscoveryServiceStub, "DeltaAggregatedResources",
                           metadata=istiod.target(node="node-a").call_metadata()) as call,
        ):
            response = await first_response(call, own)
            assert response.type_url == WAYPOINT_CONFIG_TYPE_URL
            [resource] = response.resources
            assert resource.name == "ns/wp"
            assert resource.resource.type_url == WAYPOINT_CONFIG_TYPE_URL
            cfg = wypb.WaypointConfig.FromString(resource.resource.value)
            assert [s.hostname for s in cfg.services] == ["a.ns.svc.cluster.local"]
            assert [p.name for p in cfg.policies] == ["get-only"]
            await call.send_message(request(own, response_nonce=response.nonce))
            istiod.store.apply(load_world(WORLD.replace(b"methods: [GET]", b"methods: [POST]"), "w2"))
            second = await call.recv_message()
            assert isinstance(second, discovery_pb2.DeltaDiscoveryResponse)
            cfg = wypb.WaypointConfig.FromString(second.resources[0].resource.value)
            assert list(cfg.policies[0].rules[0].to[0].methods) == ["POST"]


async def test_nobody_else_sees_a_waypoint_config() -> None:
    w = world()
    own = waypoint_node_id(w.pods[0], w.domain_suffix)
    others = [
        ("node-a", "ztunnel~10.0.0.100~ztunnel-a.istio-system~istio-system.svc.cluster.local", {}),
        ("node-a", "router~10.0.0.1~a.ns~ns.svc.cluster.local", {}),
        ("node-b", own, {}),  # the right node id with another node's token
        ("node-b", own, {"resource_names_subscribe": ["ns/wp"]}),
    ]
    with trio.fail_after(20):
        async with open_test_istiod(w) as istiod:
            for node, node_id, kwargs in others:
                async with (
                    open_target(istiod.target(node=node)) as channel,
                    channel.stream(discovery_grpc.AggregatedDiscoveryServiceStub, "DeltaAggregatedResources",
                                   metadata=istiod.target(node=node).call_metadata()) as call,
                ):
                    response = await first_response(call, node_id, **kwargs)
                    assert not response.resources, (node, node_id)
