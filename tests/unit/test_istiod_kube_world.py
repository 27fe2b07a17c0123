"""The istiod stub's world from Kubernetes objects: the same xDS as from the world file, and istiod's
conversion rules for AuthorizationPolicies."""

from __future__ import annotations

from pathlib import Path

from services.istiod.derive import WAYPOINT_CONFIG_TYPE_URL, Resources
from services.istiod.kube_source import lost_problem
from services.istiod.kube_world import KubeObjects, policy_from, world_from_objects, world_to_objects
from services.istiod.world import Match, StringMatch, load_world
from shared.kube.reflector import Lost

BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml"


def _xds(resources: Resources) -> dict[str, dict[str, str]]:
    return {url: {name: version for name, (version, _) in items.items()}
            for url, items in resources.by_type.items()}  # fmt: skip


def test_bookinfo_as_kubernetes_objects_derives_the_same_xds_as_the_world_file() -> None:
    world = load_world(BOOKINFO.read_bytes(), str(BOOKINFO))
    again, notes = world_from_objects(world_to_objects(world), base=world)
    assert notes == []
    ours, theirs = _xds(Resources(again)), _xds(Resources(world))
    # The waypoint comes back from its pod's gateway labels; its L7 policies and routes are not read from
    # the API server yet, so only its WaypointConfig's contents differ.
    assert again.waypoints == world.waypoints
    assert ours.keys() == theirs.keys()
    configs = WAYPOINT_CONFIG_TYPE_URL
    assert ours[configs].keys() == theirs[configs].keys() == {"bookinfo/waypoint"}
    del ours[WAYPOINT_CONFIG_TYPE_URL], theirs[WAYPOINT_CONFIG_TYPE_URL]
    assert ours == theirs
    assert Resources(again).identities_by_node == Resources(world).identities_by_node
    assert {p.key: p.workload for p in again.pods} == {p.key: p.workload for p in world.pods}


def _policy(spec: dict[str, object], name: str = "p") -> dict[str, object]:
    return {"metadata": {"name": name, "namespace": "bookinfo"}, "spec": spec}


def test_policy_rules_become_clauses_as_istiod_converts_them() -> None:
    notes: list[str] = []
    pol = policy_from(_policy({"selector": {"matchLabels": {"app": "ratings"}}, "rules": [{
        "from": [{"source": {"principals": ["cluster.local/ns/bookinfo/sa/reviews"], "namespaces": ["x*"]}},
                 {"source": {"ipBlocks": ["10.0.0.1"], "serviceAccounts": ["sleep", "other/sa"]}}],
        "to": [{"operation": {"ports": ["9080", "bad"]}}],
        "when": [{"key": "source.namespace", "values": ["*-prod"], "notValues": ["*"]}],
    }]}), notes)  # fmt: skip
    assert pol is not None and notes == []
    assert pol.action == "allow" and pol.selector == {"app": "ratings"}
    (rule,) = pol.rules
    to, frm, when = rule.clauses
    assert to.matches == [Match(destination_ports=[9080])]
    assert frm.matches[0].principals == [StringMatch(exact="cluster.local/ns/bookinfo/sa/reviews")]
    assert frm.matches[0].namespaces == [StringMatch(prefix="x")]
    assert frm.matches[1].source_ips == ["10.0.0.1/32"]
    assert [(a.namespace, a.service_account) for a in frm.matches[1].service_accounts] == [
        ("bookinfo", "sleep"), ("other", "sa")]
    assert when.matches == [Match(namespaces=[StringMatch(suffix="-prod")],
                                  not_namespaces=[StringMatch(presence=True)])]  # fmt: skip


def test_http_attributes_drop_an_allow_rule_and_keep_the_l4_part_of_a_deny_rule() -> None:
    rules = [{"to": [{"operation": {"methods": ["GET"], "ports": ["80"]}}]},
             {"from": [{"source": {"namespaces": ["sleep"]}}]}]  # fmt: skip
    notes: list[str] = []
    allow = policy_from(_policy({"action": "ALLOW", "rules": rules}), notes)
    assert allow is not None and len(allow.rules) == 1  # the rule with `methods` never matches
    assert "HTTP attributes (methods)" in notes[0] and "left out" in notes[0]
    deny = policy_from(_policy({"action": "DENY", "rules": rules}), notes)
    assert deny is not None and deny.rules[0].clauses[0].matches == [Match(destination_ports=[80])]
    assert "more restrictive" in notes[1]


def test_policies_not_for_ztunnel_are_left_out() -> None:
    notes: list[str] = []
    assert policy_from(_policy({"targetRefs": [{"kind": "Service", "name": "details"}]}), notes) is None
    assert notes == []
    assert policy_from(_policy({"action": "CUSTOM"}), notes) is None
    assert notes == [
        "AuthorizationPolicy bookinfo/p: ztunnel does not support the CUSTOM action; policy left out"]


def test_pending_pods_and_rejected_objects_are_left_out_with_a_note_the_rest_stays() -> None:
    world = load_world(BOOKINFO.read_bytes(), str(BOOKINFO))
    objects = world_to_objects(world)
    pending = dict(objects.pods[0])
    pending["metadata"] = {"name": "pending", "namespace": "bookinfo"}
    pending["status"] = {"phase": "Pending"}
    clash = dict(objects.pods[1])
    clash["metadata"] = {"name": "clash", "namespace": "bookinfo", "uid": "u-clash"}  # reuses details' IP
    named = {"metadata": {"name": "named", "namespace": "bookinfo"},
             "spec": {"clusterIP": "10.96.0.99", "selector": {"app": "details"},
                      "ports": [{"port": 80, "targetPort": "http"}]}}  # fmt: skip
    got, notes = world_from_objects(KubeObjects(nodes=objects.nodes, namespaces=objects.namespaces,
                                                pods=[*objects.pods, pending, clash],
                                                services=[*objects.services, named],
                                                policies=objects.policies), base=world)  # fmt: skip
    keys = {p.key for p in got.pods}
    assert "bookinfo/pending" not in keys and "bookinfo/clash" not in keys
    assert len(keys) == len(world.pods)
    assert any(n.startswith("Pod bookinfo/clash left out") and "already used" in n for n in notes)
    assert any("container port named 'http'" in n for n in notes)
    assert next(s for s in got.services if s.name == "named").ports == []


def test_a_malformed_policy_is_left_out_with_a_note_naming_the_field() -> None:
    notes: list[str] = []
    assert policy_from(_policy({"rules": [{"to": [{"operation": {"ports": "9080"}}]}]}), notes) is None
    assert policy_from(_policy({"selector": {"matchLabels": ["app"]}}, name="q"), notes) is None
    assert policy_from({"metadata": {"name": "r", "namespace": "bookinfo"}, "spec": []}, notes) is None
    assert notes == [
        "AuthorizationPolicy bookinfo/p: malformed (Expected `array`, got `str` - at "
        "`spec.rules[0].to[0].operation.ports`); policy left out",
        "AuthorizationPolicy bookinfo/q: malformed (Expected `object`, got `array` - at "
        "`spec.selector.matchLabels`); policy left out",
        "AuthorizationPolicy bookinfo/r: malformed (spec: expected an object, got list); policy left out",
    ]
    # ports and values may be numbers as well as strings, as users write them
    ok = policy_from(_policy({"rules": [{"to": [{"operation": {"ports": [9080]}}],
                                         "when": [{"key": "destination.port", "values": [80]}]}]}), notes)
    assert ok is not None and len(notes) == 3


def test_a_lost_collection_is_explained_by_its_status() -> None:
    assert "credentials" in lost_problem(Lost(kind="pods", reason="x", status=401))
    assert "may not list and watch pods" in lost_problem(Lost(kind="pods", reason="x", status=403))
    assert "deploy/kubernetes/crds/" in lost_problem(Lost(kind="policies", reason="x", status=404))
    assert lost_problem(Lost(kind="services", reason="x")) == "cannot list or watch services"
