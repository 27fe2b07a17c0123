"""Outbound resolution from xDS state: service VIPs, pod IPs, waypoints, passthrough, no healthy upstream."""

from __future__ import annotations

from collections.abc import Sequence

from services.ztunnel.proxy.outbound import baggage_of
from services.ztunnel.proxy.resolve import HboneRoute, NoHealthyUpstream, Passthrough, resolve_outbound
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    GatewayAddress,
    NamespacedHostname,
    NetworkAddress,
    Port,
    Service,
    ServiceKey,
    TunnelProtocol,
    Workload,
    WorkloadType,
    WorkloadUid,
)
from shared.identity import SpiffeId

REVIEWS = ServiceKey("default/reviews.default.svc.cluster.local")
WAYPOINT_SVC = ServiceKey("default/waypoint.default.svc.cluster.local")


def pod(name: str, ip: str, *, sa: str | None = None,
        services: dict[ServiceKey, tuple[Port, ...]] | None = None, hbone: bool = True,
        healthy: bool = True, waypoint: GatewayAddress | None = None) -> Workload:
    return Workload(uid=WorkloadUid(f"Kubernetes//Pod/default/{name}"), name=name, namespace="default",
                    addresses=(ip,), service_account=sa or name,
                    tunnel_protocol=TunnelProtocol.HBONE if hbone else TunnelProtocol.NONE,
                    services=services or {}, healthy=healthy, waypoint=waypoint)


def reviews(**kwargs: object) -> Service:
    return Service(name="reviews", namespace="default", hostname="reviews.default.svc.cluster.local",
                   addresses=(NetworkAddress(address="10.96.0.10"),),
                   ports=(Port(service_port=9080, target_port=8080),), **kwargs)  # type: ignore[arg-type]


def first(items: Sequence[tuple[Workload, tuple[Port, ...]]]) -> tuple[Workload, tuple[Port, ...]]:
    return items[0]


def store_with(*items: Workload | Service) -> StateStore:
    store = StateStore()
    store.apply_addresses(items, [])
    return store


def ident(sa: str) -> SpiffeId:
    return SpiffeId(trust_domain="cluster.local", namespace="default", service_account=sa)


def test_unknown_destination_is_passthrough() -> None:
    assert resolve_outbound(StateStore(), ("1.1.1.1", 443)) == Passthrough(dst=("1.1.1.1", 443))


def test_vip_goes_to_a_healthy_endpoint_with_the_target_port() -> None:
    v1 = pod("reviews-v1", "10.244.1.5", sa="reviews", services={REVIEWS: ()})
    sick = pod("reviews-v2", "10.244.1.6", sa="reviews", services={REVIEWS: ()}, healthy=False)
    store = store_with(reviews(), v1, sick)
    for _ in range(10):  # the unhealthy one is never chosen
        route = resolve_outbound(store, ("10.96.0.10", 9080))
        assert isinstance(route, HboneRoute)
        assert route.dst == ("10.244.1.5", 15008)
        assert route.target == ("10.244.1.5", 8080)
        assert route.identities == frozenset([ident("reviews")])
        assert route.service is not None and route.service.name == "reviews"
        assert route.pool_key(ident("productpage"), "10.244.0.3").dst == ("10.244.1.5", 15008)


def test_endpoint_port_mapping_wins_over_the_service_target_port() -> None:
    v1 = pod("reviews-v1", "10.244.1.5", services={REVIEWS: (Port(service_port=9080, target_port=9999),)})
    route = resolve_outbound(store_with(reviews(), v1), ("10.96.0.10", 9080), choose=first)
    assert isinstance(route, HboneRoute) and route.target == ("10.244.1.5", 9999)


def test_service_sans_are_accepted_identities() -> None:
    v1 = pod("reviews-v1", "10.244.1.5", sa="reviews", services={REVIEWS: ()})
    svc = reviews(subject_alt_names=("spiffe://cluster.local/ns/default/sa/alt", "not-a-spiffe-id"))
    route = resolve_outbound(store_with(svc, v1), ("10.96.0.10", 9080))
    assert isinstance(route, HboneRoute) and route.identities == frozenset([ident("reviews"), ident("alt")])


def test_service_without_healthy_endpoints_is_refused() -> None:
    sick = pod("reviews-v1", "10.244.1.5", services={REVIEWS: ()}, healthy=False)
    route = resolve_outbound(store_with(reviews(), sick), ("10.96.0.10", 9080))
    assert isinstance(route, NoHealthyUpstream) and "no healthy upstream" in route.reason


def test_pod_ip_of_a_meshed_workload_is_hbone() -> None:
    route = resolve_outbound(store_with(pod("details", "10.244.2.7")), ("10.244.2.7", 9080))
    assert isinstance(route, HboneRoute)
    assert (route.dst, route.target) == (("10.244.2.7", 15008), ("10.244.2.7", 9080))


def test_workload_outside_the_mesh_is_passthrough() -> None:
    route = resolve_outbound(store_with(pod("legacy", "10.244.2.8", hbone=False)), ("10.244.2.8", 80))
    assert isinstance(route, Passthrough) and route.dst == ("10.244.2.8", 80)
    assert route.workload is not None and route.workload.name == "legacy"


def test_service_waypoint_gets_the_original_vip_as_target() -> None:
    waypoint = pod("waypoint", "10.244.3.2", services={WAYPOINT_SVC: ()})
    wp_service = Service(name="waypoint", namespace="default", hostname="waypoint.default.svc.cluster.local",
                         addresses=(NetworkAddress(address="10.96.0.99"),))
    gateway = GatewayAddress(hostname=NamespacedHostname(namespace="default",
                                                         hostname="waypoint.default.svc.cluster.local"),
                             hbone_mtls_port=15008)
    v1 = pod("reviews-v1", "10.244.1.5", sa="reviews", services={REVIEWS: ()})
    store = store_with(reviews(waypoint=gateway), v1, waypoint, wp_service)
    route = resolve_outbound(store, ("10.96.0.10", 9080))
    assert isinstance(route, HboneRoute) and route.via_waypoint
    assert (route.dst, route.target) == (("10.244.3.2", 15008), ("10.96.0.10", 9080))
    assert route.identities == frozenset([ident("waypoint")])
    # The waypoint itself goes straight to the endpoint.
    direct = resolve_outbound(store, ("10.96.0.10", 9080), source=waypoint)
    assert isinstance(direct, HboneRoute) and not direct.via_waypoint
    assert direct.target == ("10.244.1.5", 8080)


def test_workload_waypoint_by_address() -> None:
    waypoint = pod("waypoint", "10.244.3.2")
    gateway = GatewayAddress(address=NetworkAddress(address="10.244.3.2"), hbone_mtls_port=15088)
    store = store_with(pod("details", "10.244.2.7", waypoint=gateway), waypoint)
    route = resolve_outbound(store, ("10.244.2.7", 9080))
    assert isinstance(route, HboneRoute) and route.via_waypoint
    assert (route.dst, route.target) == (("10.244.3.2", 15088), ("10.244.2.7", 9080))


def test_missing_waypoint_is_refused() -> None:
    gateway = GatewayAddress(address=NetworkAddress(address="10.244.3.2"))
    store = store_with(pod("details", "10.244.2.7", waypoint=gateway))
    route = resolve_outbound(store, ("10.244.2.7", 9080))
    assert isinstance(route, NoHealthyUpstream) and "waypoint" in route.reason


def test_baggage_lists_only_known_keys() -> None:
    wl = Workload(uid=WorkloadUid("Kubernetes//Pod/ns/p"), name="p", namespace="ns",
                  workload_name="reviews-v1", workload_type=WorkloadType.DEPLOYMENT, canonical_name="reviews",
                  canonical_revision="v1", cluster_id="Kubernetes")
    assert baggage_of(wl) == ("k8s.cluster.name=Kubernetes,k8s.namespace.name=ns,"
                              "k8s.deployment.name=reviews-v1,service.name=reviews,service.version=v1")
    bare = Workload(uid=WorkloadUid("x"), name="x", namespace="ns")
    assert baggage_of(bare, region="eu") == "k8s.namespace.name=ns,cloud.region=eu"
