"""Waypoints in the world file: validation naming the path, and what the istiod stub derives from them."""

from __future__ import annotations

import ipaddress

import pytest

from services.istiod.derive import Resources, derive_pod, derive_service, derive_workload, is_ambient
from services.istiod.errors import WorldError
from services.istiod.world import World, load_world
from services.node_agent.eligibility import decide
from services.node_agent.model import Pod as AgentPod
from shared.api import workload_pb2 as wpb

BASE = """
nodes: [{name: n}]
namespaces: [{name: ns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}]
pods:
  - {name: wp-0, namespace: ns, node: n, ips: [10.0.0.9], serviceAccount: waypoint, labels: {app: wp}}
  - {name: a, namespace: ns, node: n, ips: [10.0.0.1], labels: {app: a}}
services:
  - {name: wp, namespace: ns, vips: [10.96.0.99], selector: {app: wp}, ports: [{port: 15008}]}
  - {name: a, namespace: ns, vips: [10.96.0.1], selector: {app: a}, ports: [{port: 80}]}
"""


def world(waypoints: str) -> World:
    return load_world((BASE + waypoints).encode(), "w.yaml")


VIP = ipaddress.ip_address("10.96.0.99").packed


def test_for_service_sets_only_the_service_waypoint() -> None:
    w = world("waypoints: [{name: wp, namespace: ns, pod: wp-0}]")
    assert derive_service(w, w.services[1]).waypoint.address.address == VIP
    assert derive_service(w, w.services[1]).waypoint.hbone_mtls_port == 15008
    assert not derive_workload(w, w.pods[1]).HasField("waypoint")
    assert not derive_service(w, w.services[0]).HasField("waypoint")  # the waypoint's own service


def test_for_all_sets_both_and_never_the_waypoints_own_workload() -> None:
    w = world("waypoints: [{name: wp, namespace: ns, pod: wp-0, for: all}]")
    assert derive_service(w, w.services[1]).waypoint.address.address == VIP
    assert derive_workload(w, w.pods[1]).waypoint.address.address == VIP
    own = derive_workload(w, w.pods[0])
    assert not own.HasField("waypoint")
    assert own.tunnel_protocol == wpb.HBONE  # it terminates HBONE itself
    assert "ns/wp.ns.svc.cluster.local" in own.services


def test_for_workload_and_none() -> None:
    w = world("waypoints: [{name: wp, namespace: ns, pod: wp-0, for: workload}]")
    assert not derive_service(w, w.services[1]).HasField("waypoint")
    assert derive_workload(w, w.pods[1]).waypoint.address.address == VIP
    w = world("waypoints: [{name: wp, namespace: ns, pod: wp-0, for: none}]")
    assert not derive_service(w, w.services[1]).HasField("waypoint")
    assert not derive_workload(w, w.pods[1]).HasField("waypoint")


def test_use_waypoint_label_on_a_service_and_opt_out_with_none() -> None:
    w = load_world((BASE.replace(", istio.io/use-waypoint: wp", "").replace(
        "selector: {app: a}", "selector: {app: a}, labels: {istio.io/use-waypoint: wp}")
        + "waypoints: [{name: wp, namespace: ns, pod: wp-0}]").encode(), "w.yaml")
    assert derive_service(w, w.services[1]).waypoint.address.address == VIP
    opted_out = "selector: {app: a}, labels: {istio.io/use-waypoint: none}"
    w = load_world((BASE.replace("selector: {app: a}", opted_out)
                    + "waypoints: [{name: wp, namespace: ns, pod: wp-0}]").encode(), "w.yaml")
    assert not derive_service(w, w.services[1]).HasField("waypoint")


def test_waypoint_pod_is_labelled_out_of_capture_but_gets_a_certificate() -> None:
    w = world("waypoints: [{name: wp, namespace: ns, pod: wp-0}]")
    pod = derive_pod(w, w.pods[0])
    assert pod.labels["istio.io/dataplane-mode"] == "none"
    assert pod.labels["gateway.networking.k8s.io/gateway-name"] == "wp"
    assert not is_ambient(w, w.pods[0])
    agent_pod = AgentPod(uid=pod.uid, name=pod.name, namespace=pod.namespace, labels=dict(pod.labels))  # type: ignore[arg-type]
    decision = decide(agent_pod, dict(pod.namespace_labels))
    assert not decision.eligible and "opts out" in decision.reason
    assert "spiffe://cluster.local/ns/ns/sa/waypoint" in Resources(w).identities_by_node["n"]


@pytest.mark.parametrize(
    ("waypoints", "path", "words"),
    [
        ("waypoints: [{name: wq, namespace: ns, pod: wp-0}]", "$.waypoints[0].name", "needs a service"),
        ("waypoints: [{name: wp, namespace: ns, pod: nope}]", "$.waypoints[0].pod", "unknown pod ns/nope"),
        ("waypoints: [{name: wp, namespace: ns, pod: wp-0, for: pods}]", "$.waypoints[0].for",
         "must be one of"),
        ("waypoints: [{name: wp, namespace: nx, pod: wp-0}]", "$.waypoints[0].namespace",
         "unknown namespace"),
        ("waypoints: [{name: wp, namespace: ns, pod: wp-0}, {name: wp, namespace: ns, pod: a}]",
         "$.waypoints[1]", "duplicate waypoint"),
    ],
)
def test_invalid_waypoints_name_the_path(waypoints: str, path: str, words: str) -> None:
    with pytest.raises(WorldError) as err:
        world(waypoints)
    assert path in str(err.value) and words in str(err.value)


def test_unknown_use_waypoint_label_on_a_pod_names_the_path() -> None:
    with pytest.raises(WorldError) as err:
        load_world(BASE.replace("labels: {app: a}", "labels: {app: a, istio.io/use-waypoint: nope}").encode(),
                   "w.yaml")
    assert "$.pods[1].labels" in str(err.value) and "ns/nope" in str(err.value)
