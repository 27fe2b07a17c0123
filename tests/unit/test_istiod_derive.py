"""Derivation like istiod (world -> Workload/Service/Authorization) and the round trip through ztunnel's
conversion to domain types."""

from __future__ import annotations

import ipaddress

import msgspec
import pytest
from google.protobuf import any_pb2

from services.istiod.derive import (
    ADDRESS_TYPE_URL,
    AUTHORIZATION_TYPE_URL,
    Resources,
    derive_authorization,
    derive_service,
    derive_workload,
    is_ambient,
)
from services.istiod.testing import bookinfo_world
from services.istiod.world import World, load_world
from services.ztunnel.authz import AuthzRequest, evaluate
from services.ztunnel.state.types import (
    Action,
    Scope,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadType,
)
from services.ztunnel.xds.convert import address_from_any, authorization_from_any
from services.ztunnel.xds.errors import ConversionError
from shared.api import authorization_pb2 as apb
from shared.api import workload_pb2 as wpb
from shared.identity import SpiffeId


@pytest.fixture
def world() -> World:
    return bookinfo_world()


def pod(world: World, name: str):  # type: ignore[no-untyped-def]
    return next(p for p in world.pods if p.name.startswith(name))


def test_workload_from_ambient_pod(world: World) -> None:
    wl = derive_workload(world, pod(world, "reviews-v2"))
    assert wl.uid == "Kubernetes//Pod/bookinfo/reviews-v2-6d7e9a"
    assert [ipaddress.ip_address(a) for a in wl.addresses] == [ipaddress.ip_address("10.244.2.11")]
    assert wl.tunnel_protocol == wpb.HBONE
    assert (wl.trust_domain, wl.service_account, wl.node) == ("cluster.local", "bookinfo-reviews", "node-b")
    assert (wl.canonical_name, wl.canonical_revision) == ("reviews", "v2")
    assert (wl.workload_type, wl.workload_name) == (wpb.DEPLOYMENT, "reviews-v2")
    assert dict(wl.services)["bookinfo/reviews.bookinfo.svc.cluster.local"].ports[0].target_port == 9080
    # bookinfo is behind its waypoint: only the waypoint's identity may reach the pod.
    assert list(wl.authorization_policies) == [
        "bookinfo/istio_allow_waypoint_bookinfo_waypoint", "bookinfo/require_waypoint_bookinfo_waypoint"]
    assert wl.cluster_id == "Kubernetes"


@pytest.mark.parametrize("labels,workload,expected", [
    ({"service.istio.io/canonical-name": "cn", "app.kubernetes.io/name": "kn", "app": "a",
      "service.istio.io/canonical-revision": "cr", "app.kubernetes.io/version": "kv", "version": "v"},
     "deploy", ("cn", "cr")),
    ({"app.kubernetes.io/name": "kn", "app": "a", "app.kubernetes.io/version": "kv", "version": "v"},
     "deploy", ("kn", "kv")),
    ({"app": "a", "version": "v"}, "deploy", ("a", "v")),
    ({}, "deploy", ("deploy", "latest")),
    ({}, None, ("reviews-v2-6d7e9a", "latest")),  # a bare pod: its own name is the workload name
])
def test_canonical_name_and_revision_follow_istios_label_order(
        world: World, labels: dict[str, str], workload: str | None, expected: tuple[str, str]) -> None:
    base = pod(world, "reviews-v2")
    wl = derive_workload(world, msgspec.structs.replace(base, labels=labels, workload=workload))
    assert (wl.canonical_name, wl.canonical_revision) == expected
    assert wl.workload_name == (workload or base.name)
    resource = any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=wpb.Address(workload=wl).SerializeToString())
    converted = address_from_any(wl.uid, resource)
    assert isinstance(converted, Workload)
    assert (converted.canonical_name, converted.canonical_revision, converted.workload_name) == (
        *expected, workload or base.name)


def test_enablement_follows_spec_section_8(world: World) -> None:
    assert is_ambient(world, pod(world, "sleep"))  # namespace label
    assert not is_ambient(world, pod(world, "notmeshed"))  # pod opted out with `none`
    assert not is_ambient(world, pod(world, "legacy-app"))  # namespace not labelled
    assert derive_workload(world, pod(world, "legacy-app")).tunnel_protocol == wpb.NONE
    legacy = pod(world, "legacy-app")
    labelled = legacy.__class__(
        **{
            **{f: getattr(legacy, f) for f in legacy.__struct_fields__},
            "labels": {"istio.io/dataplane-mode": "ambient"},
        }
    )
    assert is_ambient(world, labelled)  # pod label alone is enough
    sidecar = labelled.__class__(
        **{
            **{f: getattr(labelled, f) for f in labelled.__struct_fields__},
            "annotations": {"sidecar.istio.io/status": "{}"},
        }
    )
    assert not is_ambient(world, sidecar)


def test_service_and_selector_policies(world: World) -> None:
    svc = derive_service(world, next(s for s in world.services if s.name == "ratings"))
    assert svc.hostname == "ratings.bookinfo.svc.cluster.local"
    assert svc.addresses[0].address == ipaddress.ip_address("10.96.0.13").packed
    assert (svc.ports[0].service_port, svc.ports[0].app_protocol) == (9080, wpb.HTTP11)
    wl = derive_workload(world, pod(world, "ratings"))
    assert list(wl.authorization_policies) == [
        "bookinfo/istio_allow_waypoint_bookinfo_waypoint", "bookinfo/ratings-from-reviews",
        "bookinfo/require_waypoint_bookinfo_waypoint"]


def test_policy_scopes_like_istiod(world: World) -> None:
    by_name = {p.name: p for p in world.policies}
    assert derive_authorization(world, by_name["ratings-from-reviews"]).scope == apb.WORKLOAD_SELECTOR
    deny = derive_authorization(world, by_name["deny-legacy"])
    assert (deny.scope, deny.action) == (apb.NAMESPACE, apb.DENY)
    root = by_name["deny-legacy"].__class__(name="mesh-wide", namespace="istio-system")
    assert derive_authorization(world, root).scope == apb.GLOBAL


def test_waypoint_becomes_a_gateway_address() -> None:
    world = load_world(
        b"""
nodes: [{name: n}]
namespaces: [{name: ns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}]
pods: [{name: a, namespace: ns, node: n, ips: [10.0.0.1], labels: {app: a}}]
services:
  - {name: wp, namespace: ns, vips: [10.96.0.99], ports: [{port: 15008}]}
  - {name: a, namespace: ns, vips: [10.96.0.1], selector: {app: a}, ports: [{port: 80, targetPort: 8080}]}
""",
        "wp.yaml",
    )
    wl = derive_workload(world, world.pods[0])
    assert wl.waypoint.address.address == ipaddress.ip_address("10.96.0.99").packed
    assert wl.waypoint.hbone_mtls_port == 15008
    svc = derive_service(world, world.services[1])
    assert svc.waypoint.address.address == ipaddress.ip_address("10.96.0.99").packed
    assert not derive_service(world, world.services[0]).HasField("waypoint")  # not its own waypoint


def test_resources_round_trip_through_ztunnel_conversion(world: World) -> None:
    resources = Resources(world)
    for name, (version, msg) in resources.by_type[ADDRESS_TYPE_URL].items():
        assert version
        item = address_from_any(name, any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=msg.SerializeToString()))
        if name.startswith("Kubernetes//Pod/"):
            assert item.uid == name  # type: ignore[union-attr]
    ratings_uid = "Kubernetes//Pod/bookinfo/ratings-v1-8c9f0b"
    _, msg = resources.by_type[ADDRESS_TYPE_URL][ratings_uid]
    wl = address_from_any(ratings_uid, any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=msg.SerializeToString()))
    assert wl.tunnel_protocol is TunnelProtocol.HBONE  # type: ignore[union-attr]
    assert wl.workload_type is WorkloadType.DEPLOYMENT  # type: ignore[union-attr]
    assert wl.addresses == ("10.244.2.12",)

    name = "bookinfo/ratings-from-reviews"
    _, msg = resources.by_type[AUTHORIZATION_TYPE_URL][name]
    pol = authorization_from_any(
        name, any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL, value=msg.SerializeToString())
    )
    assert (pol.scope, pol.action) == (Scope.WORKLOAD_SELECTOR, Action.ALLOW)
    principal = pol.rules[0].clauses[0].matches[0].principals[0]
    # the world file writes spiffe://...; principals travel without the scheme, as istiod sends them
    assert principal == StringMatch(kind="exact", value="cluster.local/ns/bookinfo/sa/bookinfo-reviews")
    reviews = SpiffeId.parse("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews")
    productpage = SpiffeId.parse("spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage")

    def to_ratings(identity: SpiffeId) -> AuthzRequest:
        return AuthzRequest(src_ip="10.244.2.11", dst_ip="10.244.2.12", dst_port=9080, src_identity=identity)

    assert evaluate([pol], to_ratings(reviews)).allowed
    assert not evaluate([pol], to_ratings(productpage)).allowed
    deny = "bookinfo/deny-legacy"
    _, msg = resources.by_type[AUTHORIZATION_TYPE_URL][deny]
    pol = authorization_from_any(
        deny, any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL, value=msg.SerializeToString())
    )
    assert pol.rules[0].clauses[0].matches[0].source_ips == ("10.244.1.30/32",)


def test_versions_change_only_with_content(world: World) -> None:
    a, b = Resources(world), Resources(world)
    assert a.by_type[ADDRESS_TYPE_URL].keys() == b.by_type[ADDRESS_TYPE_URL].keys()
    assert all(a.by_type[ADDRESS_TYPE_URL][k][0] == v[0] for k, v in b.by_type[ADDRESS_TYPE_URL].items())


@pytest.mark.parametrize(
    ("msg", "problem"),
    [
        (
            wpb.Address(workload=wpb.Workload(uid="u", name="n", namespace="ns", addresses=[b"\x01"])),
            "1 bytes",
        ),
        (wpb.Address(workload=wpb.Workload(name="n", namespace="ns")), "without uid"),
        (wpb.Address(service=wpb.Service(name="s", namespace="ns")), "without hostname"),
        (
            wpb.Address(
                service=wpb.Service(
                    namespace="ns", hostname="h", ports=[wpb.Port(service_port=0, target_port=1)]
                )
            ),
            "service port 0",
        ),
        (wpb.Address(), "neither workload nor service"),
    ],
)
def test_conversion_rejects_bad_addresses(msg: wpb.Address, problem: str) -> None:
    with pytest.raises(ConversionError, match=problem):
        address_from_any("u", any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=msg.SerializeToString()))


def test_conversion_rejects_wrong_type_and_garbage() -> None:
    with pytest.raises(ConversionError, match="in an Address response"):
        address_from_any("x", any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL, value=b""))
    with pytest.raises(ConversionError, match="cannot decode"):
        address_from_any("x", any_pb2.Any(type_url=ADDRESS_TYPE_URL, value=b"\xff\xff\xff"))
    bad = apb.Authorization(
        name="p",
        namespace="ns",
        rules=[
            apb.Rule(
                clauses=[
                    apb.Clause(
                        matches=[apb.Match(source_ips=[apb.Address(address=b"\x0a\x00\x00\x00", length=40)])]
                    )
                ]
            )
        ],
    )
    with pytest.raises(ConversionError, match="prefix length 40"):
        authorization_from_any(
            "ns/p", any_pb2.Any(type_url=AUTHORIZATION_TYPE_URL, value=bad.SerializeToString())
        )


@pytest.mark.parametrize(
    ("port", "expected"),
    [
        ({"port": 80, "appProtocol": "http"}, wpb.HTTP11),
        ({"port": 80, "name": "http-web"}, wpb.HTTP11),
        ({"port": 80, "name": "http2"}, wpb.HTTP2),
        ({"port": 80, "name": "grpc-api"}, wpb.GRPC),
        ({"port": 80, "name": "HTTP-web"}, wpb.HTTP11),
        ({"port": 80, "name": "tcp-db", "appProtocol": "http2"}, wpb.HTTP2),  # appProtocol first
        ({"port": 80, "name": "http-web", "appProtocol": "tcp"}, wpb.UNKNOWN),
        ({"port": 80, "name": "httpweb"}, wpb.UNKNOWN),  # a prefix must end at '-'
        ({"port": 80, "name": "web"}, wpb.UNKNOWN),
        ({"port": 80}, wpb.UNKNOWN),
    ],
)
def test_port_protocol_follows_istios_selection(port: dict[str, object], expected: int) -> None:
    world = load_world(msgspec.json.encode({
        "nodes": [{"name": "n", "podCidr": "10.244.1.0/24"}],
        "namespaces": [{"name": "ns"}],
        "services": [{"name": "s", "namespace": "ns", "vips": ["10.96.0.9"], "selector": {"a": "b"},
                      "ports": [port]}],
    }), "test.yaml")  # fmt: skip
    assert derive_service(world, world.services[0]).ports[0].app_protocol == expected
