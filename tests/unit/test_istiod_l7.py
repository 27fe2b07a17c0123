"""L7 policies and HTTP routes in the world file: validation naming the path, the WaypointConfig the stub
derives for each waypoint, and that policies with targetRefs never become ztunnel's Authorization."""

from __future__ import annotations

import pytest

from services.istiod.derive import (
    AUTHORIZATION_TYPE_URL,
    WAYPOINT_CONFIG_TYPE_URL,
    Resources,
    derive_waypoint_config,
    waypoint_node_id,
)
from services.istiod.errors import WorldError
from services.istiod.world import World, load_world, parse_duration
from shared.api import waypoint_pb2 as wypb

BASE = """
nodes: [{name: n}, {name: m}]
namespaces:
  - {name: ns, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}
  - {name: other, labels: {istio.io/dataplane-mode: ambient}}
pods:
  - {name: wp-0, namespace: ns, node: n, ips: [10.0.0.9], serviceAccount: waypoint, labels: {app: wp}}
  - {name: a, namespace: ns, node: n, ips: [10.0.0.1], labels: {app: a}}
  - {name: b1, namespace: ns, node: m, ips: [10.0.0.2], labels: {app: b, version: v1}}
  - {name: b2, namespace: ns, node: m, ips: [10.0.0.3], labels: {app: b, version: v2}}
  - {name: o, namespace: other, node: m, ips: [10.0.0.4], labels: {app: o}}
services:
  - {name: wp, namespace: ns, vips: [10.96.0.99], selector: {app: wp}, ports: [{port: 15008}]}
  - {name: a, namespace: ns, vips: [10.96.0.1], selector: {app: a}, ports: [{port: 80, appProtocol: http}]}
  - {name: b, namespace: ns, vips: [10.96.0.2], selector: {app: b}, ports: [{port: 9080}]}
  - {name: b-v1, namespace: ns, vips: [10.96.0.3], selector: {app: b, version: v1}, ports: [{port: 9080}]}
  - {name: b-v2, namespace: ns, vips: [10.96.0.4], selector: {app: b, version: v2}, ports: [{port: 9080}]}
  - {name: o, namespace: other, vips: [10.96.0.5], selector: {app: o}, ports: [{port: 80}]}
waypoints: [{name: wp, namespace: ns, pod: wp-0}]
"""

POLICIES = """
authorizationPolicies:
  - name: a-get-only
    namespace: ns
    targetRefs: [{kind: Service, name: a}]
    action: ALLOW
    rules:
      - from: [{source: {principals: [cluster.local/ns/ns/sa/default], namespaces: ["n*"]}}]
        to: [{operation: {methods: [GET], paths: [/api/*, "*.json", /exact], notPaths: [/api/admin*],
                          hosts: ["a.ns*"]}}]
        when: [{key: "request.headers[X-Team]", values: [blue], notValues: ["*-old"]}]
  - name: deny-all-delete
    namespace: ns
    targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: wp}]
    action: DENY
    dryRun: true
    rules: [{to: [{operation: {methods: [DELETE], ports: [80]}}]}]
  - name: on-other
    namespace: other
    targetRefs: [{kind: Service, name: o}]
    rules: [{}]
"""

ROUTES = """
httpRoutes:
  - name: b-split
    namespace: ns
    parentRefs: [{name: b, port: 9080}]
    rules:
      - matches: [{path: {type: Exact, value: /v2}}, {headers: [{name: X-Version, value: "2"}], method: GET}]
        backendRefs: [{name: b-v2, port: 9080}]
      - matches: [{path: {type: PathPrefix, value: /}}]
        backendRefs: [{name: b-v1, port: 9080, weight: 90}, {name: b-v2, port: 9080, weight: 10}]
        timeouts: {request: 1m30s}
        retry: {attempts: 2}
"""


def world(extra: str = "") -> World:
    return load_world((BASE + extra).encode(), "w.yaml")


def config(w: World) -> wypb.WaypointConfig:
    return derive_waypoint_config(w, w.waypoints[0])


def test_waypoint_config_lists_its_services_only() -> None:
    cfg = config(world())
    assert (cfg.name, cfg.namespace) == ("wp", "ns")
    hosts = [s.hostname for s in cfg.services]
    # Every service of the namespace but the waypoint's own; `other` has no waypoint.
    assert hosts == [f"{n}.ns.svc.cluster.local" for n in ("a", "b", "b-v1", "b-v2")]
    assert all(s.namespace == "ns" for s in cfg.services)


def test_l7_policies_reach_the_waypoint_in_its_shape() -> None:
    cfg = config(world(POLICIES))
    by_name = {p.name: p for p in cfg.policies}
    assert set(by_name) == {"a-get-only", "deny-all-delete"}  # on-other targets a service wp does not serve
    allow = by_name["a-get-only"]
    assert allow.action == wypb.ALLOW and not allow.dry_run
    assert [t.hostname for t in allow.target_services] == ["a.ns.svc.cluster.local"]
    rule = allow.rules[0]
    src = getattr(rule, "from")[0]
    assert src.principals[0].exact == "cluster.local/ns/ns/sa/default"
    assert src.namespaces[0].prefix == "n"
    op = rule.to[0]
    assert list(op.methods) == ["GET"]
    assert [p.WhichOneof("match_type") for p in op.paths] == ["prefix", "suffix", "exact"]
    assert [op.paths[0].prefix, op.paths[1].suffix, op.paths[2].exact] == ["/api/", ".json", "/exact"]
    assert op.not_paths[0].prefix == "/api/admin"
    assert op.hosts[0].prefix == "a.ns" and not op.not_hosts
    cond = rule.when[0]
    assert cond.header == "x-team" and cond.values[0].exact == "blue" and cond.not_values[0].suffix == "-old"
    deny = by_name["deny-all-delete"]
    assert deny.action == wypb.DENY and deny.dry_run
    assert not deny.target_services  # names the waypoint: applies to all its services
    assert list(deny.rules[0].to[0].ports) == [80]


def test_policies_with_target_refs_are_not_ztunnel_authorization() -> None:
    w = world(POLICIES)
    res = Resources(w)
    # Only the stub's own waypoint-enforcement policies (see test_waypoint_destination.py) are there.
    names = set(res.by_type[AUTHORIZATION_TYPE_URL])
    assert names and all("waypoint_ns_wp" in name for name in names)
    assert not {"ns/a-get-only", "ns/deny-all-delete", "other/on-other"} & names
    assert set(res.by_type[WAYPOINT_CONFIG_TYPE_URL]) == {"ns/wp"}


def test_routes_carry_matches_weights_timeout_and_retries() -> None:
    cfg = config(world(ROUTES))
    [route] = cfg.routes
    assert (route.name, route.parent.hostname) == ("b-split", "b.ns.svc.cluster.local")
    assert route.parent_port == 9080
    first, second = route.rules
    assert first.matches[0].path.exact == "/v2"
    assert first.matches[1].headers[0].name == "x-version" and first.matches[1].headers[0].exact == "2"
    assert (first.matches[0].method, first.matches[1].method) == ("", "GET")
    assert [(b.service.hostname, b.weight) for b in first.backends] == [("b-v2.ns.svc.cluster.local", 1)]
    assert second.matches[0].path.prefix == "/"
    assert [(b.service.hostname, b.port, b.weight) for b in second.backends] == [
        ("b-v1.ns.svc.cluster.local", 9080, 90), ("b-v2.ns.svc.cluster.local", 9080, 10)]
    assert second.timeout.ToMilliseconds() == 90_000
    assert second.connect_retries == 2
    assert not first.HasField("timeout") and first.connect_retries == 0


def test_a_route_on_a_service_without_the_waypoint_is_not_sent_to_it() -> None:
    w = world("""
httpRoutes:
  - {name: r, namespace: other, parentRefs: [{name: o}], rules: [{backendRefs: [{name: o, port: 80}]}]}
""")
    assert not config(w).routes


def test_only_the_waypoint_pods_proxy_on_its_node_reads_the_config() -> None:
    w = world()
    reader = Resources(w).waypoint_readers["ns/wp"]
    pod = w.pods[0]
    own = waypoint_node_id(pod, w.domain_suffix)
    assert own == "router~10.0.0.9~wp-0.ns~ns.svc.cluster.local"
    assert reader.admits(own, "n") and reader.admits(own, None)
    assert not reader.admits(own, "m")  # another node's token
    assert not reader.admits(own.replace("router", "ztunnel"), "n")
    assert not reader.admits(own.replace("10.0.0.9", "10.0.0.1"), "n")
    assert not reader.admits("router~10.0.0.1~a.ns~ns.svc.cluster.local", "n")


def test_durations() -> None:
    assert parse_duration("10s") == 10
    assert parse_duration("500ms") == 0.5
    assert parse_duration("1h1m1s1ms") == pytest.approx(3661.001)
    for bad in ("", "10", "1.5s", "-1s", "10d"):
        assert parse_duration(bad) is None


@pytest.mark.parametrize(
    ("extra", "path", "problem"),
    [
        ("authorizationPolicies: [{name: p, namespace: ns, targetRefs: [{kind: Gateway, name: nope}]}]",
         "$.authorizationPolicies[0].targetRefs[0].name", "unknown waypoint ns/nope"),
        ("authorizationPolicies: [{name: p, namespace: ns, targetRefs: [{kind: Service, name: nope}]}]",
         "$.authorizationPolicies[0].targetRefs[0].name", "unknown service ns/nope"),
        ("authorizationPolicies: [{name: p, namespace: ns, targetRefs: [{kind: Pod, name: a}]}]",
         "$.authorizationPolicies[0].targetRefs[0].kind", "must be Gateway"),
        ("authorizationPolicies: [{name: p, namespace: ns}]",
         "$.authorizationPolicies[0].targetRefs", "needs targetRefs"),
        ("authorizationPolicies: [{name: p, namespace: ns, action: CUSTOM, "
         "targetRefs: [{kind: Service, name: a}]}]",
         "$.authorizationPolicies[0].action", "must be one of ALLOW, DENY, AUDIT"),
        ("authorizationPolicies: [{name: p, namespace: ns, targetRefs: [{kind: Service, name: a}], "
         "rules: [{to: [{operation: {methods: [get]}}]}]}]",
         "$.authorizationPolicies[0].rules[0].to[0].operation.methods[0]", "method 'get'"),
        ("authorizationPolicies: [{name: p, namespace: ns, targetRefs: [{kind: Service, name: a}], "
         "rules: [{when: [{key: source.ip, values: [1.2.3.4]}]}]}]",
         "$.authorizationPolicies[0].rules[0].when[0].key", "request.headers[NAME]"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: nope}]}]",
         "$.httpRoutes[0].parentRefs[0].name", "route to unknown service ns/nope"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{backendRefs: [{name: gone, port: 9080}]}]}]",
         "$.httpRoutes[0].rules[0].backendRefs[0].name", "route to unknown service ns/gone"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{backendRefs: [{name: b-v1, port: 9080, weight: -1}]}]}]",
         "$.httpRoutes[0].rules[0].backendRefs[0].weight", "weight -1 must be an integer from 0"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{backendRefs: [{name: b-v1, port: 9080, weight: 1.5}]}]}]",
         "$.httpRoutes[0].rules[0].backendRefs[0].weight", "Expected `int`"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{backendRefs: [{name: b-v1, port: 81}]}]}]",
         "$.httpRoutes[0].rules[0].backendRefs[0].port", "has no port 81"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{timeouts: {request: soon}}]}]",
         "$.httpRoutes[0].rules[0].timeouts.request", "not a duration"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], "
         "rules: [{matches: [{path: {type: RegularExpression, value: /x}}]}]}]",
         "$.httpRoutes[0].rules[0].matches[0].path.type", "must be Exact or PathPrefix"),
        ("httpRoutes: [{name: r, namespace: ns, parentRefs: [{name: b}], rules: [{retry: {attempts: -2}}]}]",
         "$.httpRoutes[0].rules[0].retry.attempts", "cannot be negative"),
    ],
)
def test_bad_references_are_rejected_naming_the_path(extra: str, path: str, problem: str) -> None:
    with pytest.raises(WorldError) as err:
        world(extra)
    assert err.value.path == path
    assert problem in err.value.problem
    assert str(err.value).startswith(f"w.yaml: {path}: ")


def test_policy_actions_are_case_insensitive_and_audit_travels() -> None:
    w = world("authorizationPolicies: [{name: p, namespace: ns, action: audit, "
              "targetRefs: [{kind: Gateway, name: wp}]}]")
    assert config(w).policies[0].action == wypb.AUDIT


def test_policy_add_takes_either_shape_and_rm_removes_either() -> None:
    from services.istiod.errors import NotFoundError
    from services.istiod.store import WorldStore

    store = WorldStore(world())
    store.add_policy(b'{"name": "deny-sleep", "namespace": "ns", "action": "DENY",'
                     b' "targetRefs": [{"kind": "Service", "name": "a"}],'
                     b' "rules": [{"from": [{"source": {"namespaces": ["sleep"]}}]}]}')
    assert [p.key for p in store.world.authorization_policies] == ["ns/deny-sleep"]
    assert not store.world.policies
    assert [p.name for p in config(store.world).policies] == ["deny-sleep"]
    # the same name in ztunnel's shape replaces it
    store.add_policy(b'{"name": "deny-sleep", "namespace": "ns", "action": "deny"}')
    assert [p.key for p in store.world.policies] == ["ns/deny-sleep"]
    assert not store.world.authorization_policies
    store.add_policy(b'{"name": "l7", "namespace": "ns", "targetRefs": [{"kind": "Gateway", "name": "wp"}]}')
    store.remove_policy("ns", "l7")
    store.remove_policy("ns", "deny-sleep")
    assert not store.world.policies and not store.world.authorization_policies
    with pytest.raises(NotFoundError):
        store.remove_policy("ns", "l7")
    bad = b'{"name": "x", "namespace": "ns", "targetRefs": [{"kind": "Gateway", "name": "nope"}]}'
    with pytest.raises(WorldError, match=r"targetRefs\[0\].name: unknown waypoint ns/nope"):
        store.add_policy(bad)


def test_a_policy_on_a_service_of_another_namespace_that_uses_the_waypoint_reaches_it() -> None:
    w = load_world((BASE.replace(
        "  - {name: o, namespace: other, vips: [10.96.0.5], selector: {app: o}, ports: [{port: 80}]}",
        "  - {name: o, namespace: other, vips: [10.96.0.5], selector: {app: o}, ports: [{port: 80}],\n"
        "     waypoint: {name: wp, namespace: ns}}") + POLICIES).encode(), "w.yaml")
    cfg = config(w)
    assert "o.other.svc.cluster.local" in [s.hostname for s in cfg.services]
    on_other = next(p for p in cfg.policies if p.name == "on-other")
    targets = [(t.namespace, t.hostname) for t in on_other.target_services]
    assert targets == [("other", "o.other.svc.cluster.local")]


def test_l7_objects_no_waypoint_applies_are_reported(caplog: pytest.LogCaptureFixture) -> None:
    from services.istiod.store import WorldStore

    w = world(POLICIES + ROUTES + """
  - {name: r-other, namespace: other, parentRefs: [{name: o}], rules: [{backendRefs: [{name: o, port: 80}]}]}
""")
    expected = [("authorizationPolicy", "other/on-other"), ("httpRoute", "other/r-other")]
    assert Resources(w).unapplied == expected
    with caplog.at_level("WARNING", logger="services.istiod.store"):
        WorldStore(w)
    noted = [r for r in caplog.records if r.getMessage() == "L7 object not applied by any waypoint"]
    assert [dict(getattr(r, "fields", ()))["name"] for r in noted] == ["other/on-other", "other/r-other"]
    assert Resources(world(POLICIES.replace("on-other", "x").replace("namespace: other", "namespace: ns")
                           .replace("name: o}", "name: a}"))).unapplied == []
