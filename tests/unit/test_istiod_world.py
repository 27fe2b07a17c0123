"""World file validation: every error names the source, the path inside it and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.istiod.errors import NotFoundError, WorldError
from services.istiod.store import WorldStore
from services.istiod.testing import bookinfo_world
from services.istiod.world import load_world

BASE = """
nodes: [{name: node-a, podCidr: 10.244.1.0/24}]
namespaces: [{name: ns}]
"""


def load(text: str) -> None:
    load_world((BASE + text).encode(), "w.yaml")


def test_example_world_loads() -> None:
    world = bookinfo_world()
    assert {n.name for n in world.nodes} == {"node-a", "node-b"}
    assert len(world.pods) == 9  # eight app pods and the waypoint's
    assert [(w.key, w.pod) for w in world.waypoints] == [("bookinfo/waypoint", "waypoint-7c8d9e")]


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        ("pods: [{name: p, namespace: ns, node: node-a}]", "$.pods[0]", "missing required field `ips`"),
        ("pods: [{name: p, namespace: ns, node: node-a, ips: [1]}]", "$.pods[0].ips[0]", "Expected `str`"),
        (
            "pods: [{name: p, namespace: ns, node: node-z, ips: [10.244.1.2]}]",
            "$.pods[0].node",
            "unknown node 'node-z'",
        ),
        (
            "pods: [{name: p, namespace: nope, node: node-a, ips: [10.244.1.2]}]",
            "$.pods[0].namespace",
            "unknown namespace",
        ),
        (
            "pods: [{name: p, namespace: ns, node: node-a, ips: [10.244.9.2]}]",
            "$.pods[0].ips[0]",
            "outside node node-a's podCidr",
        ),
        (
            "pods: [{name: p, namespace: ns, node: node-a, ips: [not-an-ip]}]",
            "$.pods[0].ips[0]",
            "not an IPv4 or IPv6",
        ),
        (
            "pods: [{name: P_Q, namespace: ns, node: node-a, ips: [10.244.1.2]}]",
            "$.pods[0].name",
            "not a valid Kubernetes",
        ),
        (
            "pods: [{name: p, namespace: ns, node: node-a, ips: [10.244.1.2]},"
            " {name: p, namespace: ns, node: node-a, ips: [10.244.1.3]}]",
            "$.pods[1]",
            "duplicate pod 'ns/p'",
        ),
        (
            "pods: [{name: p, namespace: ns, node: node-a, ips: [10.244.1.2]},"
            " {name: q, namespace: ns, node: node-a, ips: [10.244.1.2]}]",
            "$.pods[1].ips[0]",
            "already used by pod ns/p",
        ),
        (
            "services: [{name: s, namespace: ns, ports: [{port: 70000}]}]",
            "$.services[0].ports[0].port",
            "outside 1-65535",
        ),
        (
            "services: [{name: s, namespace: ns, waypoint: {name: wp}}]",
            "$.services[0].waypoint",
            "does not exist",
        ),
        (
            "policies: [{name: x, namespace: ns, action: audit}]",
            "$.policies[0].action",
            "must be 'allow' or 'deny'",
        ),
        (
            "policies: [{name: x, namespace: ns, rules: [{clauses: [{matches: "
            "[{sourceIps: [10.0.0.0/99]}]}]}]}]",
            "$.policies[0].rules[0].clauses[0].matches[0].sourceIps[0]",
            "not an address or CIDR",
        ),
        (
            "policies: [{name: x, namespace: ns, rules: [{clauses: [{matches: "
            "[{principals: [{exact: a, prefix: b}]}]}]}]}]",
            "$.policies[0].rules[0].clauses[0].matches[0].principals[0]",
            "exactly one of",
        ),
        ("bogus: 1", "$", "unknown field `bogus`"),
    ],
)
def test_errors_name_file_path_and_problem(text: str, path: str, problem: str) -> None:
    with pytest.raises(WorldError) as info:
        load(text)
    assert info.value.source == "w.yaml"
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value).startswith(f"w.yaml: {path}: ")


def test_not_yaml_and_empty_documents() -> None:
    with pytest.raises(WorldError, match="not valid YAML/JSON"):
        load_world(b"pods: [unclosed", "x.yaml")
    with pytest.raises(WorldError, match="the document is empty"):
        load_world(b"  \n", "x.yaml")
    with pytest.raises(WorldError, match=r"x.json: \$.nodes: Expected `array`"):
        load_world(b'{"nodes": 3}', "x.json")


def test_rejected_mutation_changes_nothing() -> None:
    store = WorldStore(bookinfo_world())
    before_world, before_resources, generation = store.world, store.resources, store.generation
    with pytest.raises(WorldError) as info:
        store.add_pod(b'{"name": "x", "namespace": "sleep", "node": "node-a", "ips": ["10.244.1.10"]}')
    assert "already used by pod bookinfo/productpage-v1-6f9c7d" in str(info.value)
    assert info.value.path == "$.ips[0]"
    with pytest.raises(WorldError, match=r"pod: \$.ips: Expected `array`"):
        store.add_pod(b'{"name": "x", "namespace": "sleep", "node": "node-a", "ips": "10.244.1.99"}')
    with pytest.raises(NotFoundError, match="no pod sleep/ghost"):
        store.remove_pod("sleep", "ghost")
    with pytest.raises(NotFoundError, match="no namespace ghost"):
        store.set_namespace_labels("ghost", {"a": "b"}, [])
    with pytest.raises(WorldError):
        store.apply(load_world(b"nodes: []", "ok.yaml").__class__(pods=before_world.pods), "bad")
    assert (store.world, store.resources, store.generation) == (before_world, before_resources, generation)


def test_accepted_mutations_bump_the_generation() -> None:
    store = WorldStore(bookinfo_world())
    g = store.generation
    assert store.set_pod_labels("sleep", "sleep-5c6d7e", {"x": "y"}, ["app"]) == g + 1
    pod = next(p for p in store.world.pods if p.name == "sleep-5c6d7e")
    assert pod.labels == {"x": "y"}
    assert store.add_policy(b'{"name": "p", "namespace": "sleep", "action": "deny"}') == g + 2
    assert store.remove_policy("sleep", "p") == g + 3


def test_a_world_over_the_size_limit_is_refused_before_parsing() -> None:
    from services.istiod.world import MAX_WORLD_BYTES

    oversized = b"namespaces: []\n" + b"#" * MAX_WORLD_BYTES
    with pytest.raises(WorldError, match="over the limit"):
        load_world(oversized, "big.yaml")


def test_the_stub_refuses_an_oversized_world_file_without_reading_it(tmp_path: Path) -> None:
    from services.istiod.app import _load_world_file
    from services.istiod.errors import StartupError
    from services.istiod.world import MAX_WORLD_BYTES

    path = tmp_path / "world.yaml"
    with path.open("wb") as f:
        f.truncate(MAX_WORLD_BYTES + 1)  # sparse: costs no disk
    with pytest.raises(StartupError, match="over the limit"):
        _load_world_file(path)
