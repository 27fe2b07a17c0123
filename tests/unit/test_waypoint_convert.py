"""The WaypointConfig the istiod stub derives from a world, as the waypoint reads it: conversion, the
decisions and routes it leads to, the xDS sink, and NACK reasons for what does not convert."""

from __future__ import annotations

import random

import pytest
from google.protobuf import any_pb2

from services.istiod.derive import derive_waypoint_config
from services.waypoint.config import Backend, HttpRoute, PathMatch, WaypointConfig
from services.waypoint.convert import (
    WAYPOINT_CONFIG_TYPE_URL,
    WaypointConfigs,
    waypoint_config_from_any,
)
from services.waypoint.policy import L7Request, applicable, decide
from services.waypoint.routes import Chosen, choose
from services.ztunnel.state.types import Action, StringMatch
from services.ztunnel.xds.errors import ConversionError
from shared.api import waypoint_pb2 as pb
from shared.identity import SpiffeId
from tests.unit.test_istiod_l7 import POLICIES, ROUTES, world

A = "a.ns.svc.cluster.local"
B = "b.ns.svc.cluster.local"


def packed(msg: pb.WaypointConfig) -> any_pb2.Any:
    return any_pb2.Any(type_url=WAYPOINT_CONFIG_TYPE_URL, value=msg.SerializeToString())


def converted(extra: str) -> WaypointConfig:
    w = world(extra)
    return waypoint_config_from_any("ns/wp", packed(derive_waypoint_config(w, w.waypoints[0])))


def test_policies_convert_with_istio_match_kinds_and_decide() -> None:
    cfg = converted(POLICIES)
    assert cfg.key == "ns/wp"
    by_name = {p.name: p for p in cfg.policies}
    allow, deny = by_name["a-get-only"], by_name["deny-all-delete"]
    assert allow.action is Action.ALLOW and allow.target_services == (A,)
    assert deny.action is Action.DENY and deny.dry_run and deny.target_services == ()
    op = allow.rules[0].operations[0]
    assert op.methods == (StringMatch(kind="exact", value="GET"),)
    assert [m.kind for m in op.paths] == ["prefix", "suffix", "exact"]
    assert allow.rules[0].when[0].name == "x-team"

    def request(method: str, path: str, team: str = "blue") -> L7Request:
        return L7Request(method=method, path=path, host="a.ns.svc.cluster.local", port=80,
                         headers={"x-team": team},
                         src_identity=SpiffeId(trust_domain="cluster.local", namespace="ns",
                                               service_account="default"), service=A)

    policies = applicable(cfg.policies, A)
    assert decide(policies, request("GET", "/api/x")).allowed
    assert not decide(policies, request("GET", "/api/admin")).allowed  # notPaths
    assert not decide(policies, request("GET", "/api/x", team="red")).allowed  # when
    dry = decide(policies, request("DELETE", "/api/x"))
    assert not dry.allowed and "ns/deny-all-delete: would deny" in dry.dry_run


def test_routes_convert_and_choose() -> None:
    cfg = converted(ROUTES)
    [route] = cfg.routes
    assert isinstance(route, HttpRoute) and route.services == (B,) and route.port == 9080
    first, second = route.rules
    assert first.matches[0].path == PathMatch(kind="exact", value="/v2")
    assert first.matches[1].method == "GET" and first.matches[1].headers[0].name == "x-version"
    assert second.timeout == 90.0 and second.retries == 2 and first.timeout is None
    assert second.backends == (Backend(service="b-v1.ns.svc.cluster.local", port=9080, weight=90),
                               Backend(service="b-v2.ns.svc.cluster.local", port=9080, weight=10))
    chosen = choose(cfg.routes, B, port=9080, method="GET", path="/v2", headers={}, rng=random.Random(1))
    assert isinstance(chosen, Chosen) and chosen.backend.service == "b-v2.ns.svc.cluster.local"


def test_audit_becomes_a_policy_that_never_decides() -> None:
    msg = pb.WaypointConfig(name="wp", namespace="ns", policies=[
        pb.L7Policy(name="audit", namespace="ns", action=pb.AUDIT, rules=[pb.L7Rule()])])
    [audit] = waypoint_config_from_any("ns/wp", packed(msg)).policies
    assert audit.audit


def test_bad_resources_are_named_for_the_nack() -> None:
    wrong_name = pb.WaypointConfig(name="other", namespace="ns")
    with pytest.raises(ConversionError, match=r"'ns/wp'.*ns/other"):
        waypoint_config_from_any("ns/wp", packed(wrong_name))
    no_kind = pb.WaypointConfig(name="wp", namespace="ns", routes=[pb.HttpRoute(
        name="r", namespace="ns", parent=pb.ServiceRef(namespace="ns", hostname=B),
        rules=[pb.RouteRule(matches=[pb.RouteMatch(path=pb.PathMatch())])])])
    with pytest.raises(ConversionError, match="neither exact nor prefix"):
        waypoint_config_from_any("ns/wp", packed(no_kind))
    with pytest.raises(ConversionError, match="resource of type"):
        waypoint_config_from_any("ns/wp", any_pb2.Any(type_url="type.googleapis.com/x.Y"))


def test_sink_keeps_the_current_config_and_drops_removed_ones() -> None:
    sink = WaypointConfigs()
    assert sink.current() == WaypointConfig()
    cfg = converted(ROUTES)
    sink.apply([sink.convert("ns/wp", packed(pb.WaypointConfig(name="wp", namespace="ns")))], [])
    sink.apply([cfg], [])
    assert sink.current() == cfg
    sink.apply([], ["ns/wp"])
    assert sink.current().routes == ()
