"""The destination side of a waypoint, through what the istiod stub sends and what ztunnel does with it:
a workload behind a waypoint accepts only the waypoint's identity (anything else is refused with the
policy's name as the reason), its own ALLOW policies do not refuse the waypoint, workloads without a
waypoint are untouched, and the waypoint itself is never sent to a waypoint."""

from __future__ import annotations

from google.protobuf import any_pb2

from services.istiod.derive import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL, Resources
from services.istiod.world import World, load_world
from services.ztunnel.authz import AuthzRequest, authorize_from_state
from services.ztunnel.proxy.resolve import HboneRoute, resolve_outbound
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Workload
from services.ztunnel.xds.convert import address_from_any, authorization_from_any
from shared.identity import SpiffeId

WORLD = """
nodes: [{name: n}]
namespaces:
  - {name: ns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
  - {name: free, labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: wp-0, namespace: ns, node: n, ips: [10.0.0.9], serviceAccount: waypoint, labels: {app: wp}}
  - {name: details, namespace: ns, node: n, ips: [10.0.0.1], serviceAccount: details, labels: {app: details}}
  - {name: ratings, namespace: ns, node: n, ips: [10.0.0.2], serviceAccount: ratings, labels: {app: ratings}}
  - {name: client, namespace: free, node: n, ips: [10.0.0.3], serviceAccount: client, labels: {app: client}}
  - {name: other, namespace: free, node: n, ips: [10.0.0.4], serviceAccount: other, labels: {app: other}}
services:
  - {name: wp, namespace: ns, vips: [10.96.0.99], selector: {app: wp}, ports: [{port: 15008}]}
  - {name: details, namespace: ns, vips: [10.96.0.1], selector: {app: details}, ports: [{port: 9080}]}
  - {name: ratings, namespace: ns, vips: [10.96.0.2], selector: {app: ratings}, ports: [{port: 9080}]}
  - {name: other, namespace: free, vips: [10.96.0.4], selector: {app: other}, ports: [{port: 80}]}
waypoints: [{name: wp, namespace: ns, pod: wp-0, for: %s}]
policies:
  - name: ratings-from-client
    namespace: ns
    selector: {app: ratings}
    rules: [{clauses: [{matches: [{principals: [{exact: cluster.local/ns/free/sa/client}]}]}]}]
"""

WAYPOINT = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="waypoint")
CLIENT = SpiffeId(trust_domain="cluster.local", namespace="free", service_account="client")


def world(for_: str = "service") -> World:
    return load_world((WORLD % for_).encode(), "w.yaml")


def ztunnel_state(w: World) -> StateStore:
    """The state a ztunnel holds after receiving everything the stub derives from `w`."""
    res = Resources(w)
    store = StateStore()
    store.apply_addresses(
        [address_from_any(name, any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=msg.SerializeToString()))
         for name, (_, msg) in res.by_type[ADDRESS_TYPE_URL].items()], [])
    store.apply_authorizations(
        [authorization_from_any(name, any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL,
                                                  value=msg.SerializeToString()))
         for name, (_, msg) in res.by_type[AUTHORIZATION_TYPE_URL].items()], [])
    return store


def inbound(store: StateStore, dst_ip: str, src_ip: str, identity: SpiffeId | None) -> tuple[bool, str]:
    d = authorize_from_state(store, AuthzRequest(src_ip=src_ip, dst_ip=dst_ip, dst_port=9080,
                                                 src_identity=identity))
    return d.allowed, d.reason


def test_behind_a_waypoint_only_the_waypoint_is_accepted() -> None:
    store = ztunnel_state(world())
    assert inbound(store, "10.0.0.1", "10.0.0.9", WAYPOINT) == (True, "")
    # A meshed client going straight to details' pod: refused, the reason naming the policy.
    assert inbound(store, "10.0.0.1", "10.0.0.3", CLIENT) == (
        False, "explicitly denied by: ns/require_waypoint_ns_wp")
    # Plaintext (no identity): refused too.
    assert inbound(store, "10.0.0.1", "10.0.0.3", None)[0] is False
    # The waypoint's identity from another address is still the waypoint's identity (L4 sees identities).
    assert inbound(store, "10.0.0.1", "10.0.0.4", WAYPOINT)[0] is True


def test_the_pods_own_allow_policy_does_not_refuse_its_waypoint() -> None:
    store = ztunnel_state(world())
    # ratings allows only `client`, but client's traffic now arrives from the waypoint.
    assert inbound(store, "10.0.0.2", "10.0.0.9", WAYPOINT) == (True, "")
    # Around the waypoint the ALLOW policy no longer lets client in: the waypoint decides.
    assert inbound(store, "10.0.0.2", "10.0.0.3", CLIENT) == (
        False, "explicitly denied by: ns/require_waypoint_ns_wp")


def test_workloads_without_a_waypoint_and_the_waypoint_itself_are_untouched() -> None:
    store = ztunnel_state(world())
    assert inbound(store, "10.0.0.4", "10.0.0.3", CLIENT) == (True, "")  # free/other has no waypoint
    assert inbound(store, "10.0.0.9", "10.0.0.3", CLIENT) == (True, "")  # the waypoint pod
    wp = store.workload_by_ip("10.0.0.9")
    assert wp is not None and wp.waypoint is None
    assert not [k for k in wp.authorization_policies if "waypoint" in k]


def test_for_none_and_for_workload() -> None:
    # for: none takes no traffic: nothing to require.
    store = ztunnel_state(world("none"))
    assert inbound(store, "10.0.0.1", "10.0.0.3", CLIENT) == (True, "")
    # for: workload: the pods' Workload.waypoint is set, and the same requirement holds.
    store = ztunnel_state(world("workload"))
    details = store.workload_by_ip("10.0.0.1")
    assert details is not None and details.waypoint is not None
    assert inbound(store, "10.0.0.1", "10.0.0.3", CLIENT)[0] is False
    assert inbound(store, "10.0.0.1", "10.0.0.9", WAYPOINT)[0] is True


def test_clients_go_through_the_waypoint_and_the_waypoint_goes_direct() -> None:
    store = ztunnel_state(world("all"))
    client = store.workload_by_ip("10.0.0.3")
    waypoint = store.workload_by_ip("10.0.0.9")
    assert isinstance(client, Workload) and isinstance(waypoint, Workload)
    via = resolve_outbound(store, ("10.96.0.1", 9080), source=client)
    assert isinstance(via, HboneRoute) and via.via_waypoint
    assert via.dst == ("10.0.0.9", 15008) and via.target == ("10.96.0.1", 9080)
    assert via.identities == frozenset({WAYPOINT})
    direct = resolve_outbound(store, ("10.96.0.1", 9080), source=waypoint)
    assert isinstance(direct, HboneRoute) and not direct.via_waypoint
    assert direct.dst == ("10.0.0.1", 15008)
    direct = resolve_outbound(store, ("10.0.0.1", 9080), source=waypoint)  # by pod IP, for: all
    assert isinstance(direct, HboneRoute) and not direct.via_waypoint
