"""The lab's pure plan: world -> namespaces, links, addresses, routes, resolv.conf, DNAT, apps; bad worlds."""

from __future__ import annotations

from pathlib import Path

import msgspec
import pytest

from ambient.lab.errors import LabError, PlanError
from ambient.lab.topology import (
    as_container_node,
    bridge_mac,
    build_steps,
    check_prefix,
    container_node_steps,
    plan_lab,
    pod_steps,
    render_dnat,
    rescale_notes,
    rescale_world,
)
from services.istiod.errors import WorldError
from services.istiod.world import World, load_world

BOOKINFO = Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml"

SMALL = b"""
nodes:
  - {name: node-a, podCidr: 10.244.1.0/24}
  - {name: node-b, podCidr: 10.244.2.0/24}
namespaces:
  - {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
  - {name: plain}
pods:
  - {name: client, namespace: mesh, node: node-a, ips: [10.244.1.10], labels: {app: sleep}}
  - {name: web-1, namespace: mesh, node: node-b, ips: [10.244.2.10], labels: {app: web}}
  - {name: web-2, namespace: mesh, node: node-a, ips: [10.244.1.11], labels: {app: web}}
  - {name: other, namespace: plain, node: node-b, ips: [10.244.2.20], labels: {app: other}}
services:
  - {name: web, namespace: mesh, vips: [10.96.0.50], selector: {app: web},
     ports: [{port: 80, targetPort: 8080}]}
"""


def world(text: bytes = SMALL) -> World:
    return load_world(text, "test.yaml")


def with_pods(extra: str) -> bytes:
    return SMALL.replace(b"services:", extra.encode() + b"\nservices:")


def test_bookinfo_plans_every_namespace_with_the_prefix() -> None:
    plan = plan_lab(load_world(BOOKINFO.read_bytes(), str(BOOKINFO)), prefix="lab1")
    assert plan.fabric.netns == "lab1-fabric"
    assert plan.control_plane.netns == "lab1-cp"
    assert [n.netns for n in plan.nodes] == ["lab1-node-a", "lab1-node-b"]
    assert all(name.startswith("lab1-") for name in plan.all_netns())
    assert len(set(plan.all_netns())) == len(plan.all_netns()) == 4 + 9
    page = next(p for p in plan.pods if p.name.startswith("productpage"))
    assert page.netns == "lab1-bookinfo-productpage-v1-6f9c7d"
    assert (page.address, page.gateway, page.node) == ("10.244.1.10/24", "10.244.1.1", "node-a")
    assert page.app.kind == "productpage"
    assert page.app.env["DETAILS_URL"] == "http://details:9080"
    assert page.app.env["REVIEWS_URL"] == "http://reviews:9080"


def test_bookinfo_ambient_decisions_follow_spec_8() -> None:
    plan = plan_lab(load_world(BOOKINFO.read_bytes(), str(BOOKINFO)), prefix="lab1")
    ambient = {p.name.split("-")[0]: p.ambient for p in plan.pods}
    assert ambient == {
        "productpage": True,
        "details": True,
        "reviews": True,
        "ratings": True,
        "sleep": True,
        "notmeshed": False,
        "legacy": False,
        "waypoint": False,  # the waypoint's pod is never captured
    }


def test_nodes_are_on_the_fabric_with_routes_to_each_other() -> None:
    plan = plan_lab(world(), prefix="t")
    a, b = plan.nodes
    assert (a.address, b.address) == ("172.29.0.10/24", "172.29.0.11/24")
    assert (a.gateway, b.gateway) == ("10.244.1.1/24", "10.244.2.1/24")
    assert [(r.dst, r.via) for r in a.routes] == [("10.244.2.0/24", "172.29.0.11")]
    assert [(r.dst, r.via) for r in b.routes] == [("10.244.1.0/24", "172.29.0.10")]
    assert plan.control_plane.address == "172.29.0.2/24"
    assert [(r.dst, r.via) for r in plan.control_plane.routes] == [
        ("10.244.1.0/24", "172.29.0.10"),
        ("10.244.2.0/24", "172.29.0.11"),
    ]
    assert plan.istiod_address == "172.29.0.2:15012"


def test_node_without_pod_cidr_gets_a_default_block() -> None:
    text = (
        b"nodes: [{name: n1}, {name: n2}]\nnamespaces: [{name: x}]\n"
        b"pods: [{name: p, namespace: x, node: n2, ips: [10.244.2.5]}]\n"
    )
    plan = plan_lab(world(text), prefix="t")
    assert [n.pod_cidr for n in plan.nodes] == ["10.244.1.0/24", "10.244.2.0/24"]
    assert plan.pods[0].gateway == "10.244.2.1"


def test_every_pod_resolves_through_the_cluster_dns_with_its_namespace_first() -> None:
    plan = plan_lab(world(), prefix="t")
    client = next(p for p in plan.pods if p.name == "client")
    assert client.resolv_conf.splitlines()[1:] == [
        "nameserver 10.96.255.10",
        f"search {client.namespace}.svc.cluster.local svc.cluster.local cluster.local",
        "options ndots:5",
    ]


def test_apps_and_ports_come_from_labels_and_services() -> None:
    plan = plan_lab(world(), prefix="t")
    kinds = {p.name: (p.app.kind, p.app.ports) for p in plan.pods}
    assert kinds == {
        "client": ("sleep", []),
        "web-1": ("echo", [8080]),
        "web-2": ("echo", [8080]),
        "other": ("sleep", []),
    }
    web = plan.services[0]
    assert web.endpoints == ["mesh/web-1", "mesh/web-2"]


def test_dnat_spreads_a_vip_over_its_endpoints_and_masquerades_only_hairpin() -> None:
    plan = plan_lab(world(), prefix="t")
    rules = render_dnat(plan, plan.nodes[0])
    assert rules.splitlines() == [
        "*nat",
        ":LAB-SERVICES - [0:0]",
        "-A PREROUTING -j LAB-SERVICES",
        "-A OUTPUT -j LAB-SERVICES",
        "-A LAB-SERVICES -d 10.96.0.50/32 -p tcp -m tcp --dport 80 -m statistic --mode random "
        "--probability 0.50000 -j DNAT --to-destination 10.244.2.10:8080",
        "-A LAB-SERVICES -d 10.96.0.50/32 -p tcp -m tcp --dport 80 -j DNAT --to-destination 10.244.1.11:8080",
        # only the node's own endpoint reaching itself through the VIP: every other source IP is kept
        "-A POSTROUTING -s 10.244.1.11/32 -d 10.244.1.11/32 -m conntrack --ctstate DNAT -j MASQUERADE",
        "COMMIT",
    ]
    other = render_dnat(plan, plan.nodes[1]).splitlines()
    assert [line for line in other if "POSTROUTING" in line] == [
        "-A POSTROUTING -s 10.244.2.10/32 -d 10.244.2.10/32 -m conntrack --ctstate DNAT -j MASQUERADE"]


def test_steps_only_touch_lab_namespaces() -> None:
    plan = plan_lab(world(), prefix="t")
    lab_ns = set(plan.all_netns())
    for step in build_steps(plan):
        if step.netns is not None:
            assert step.netns in lab_ns
        else:
            assert step.argv[:2] == ["ip", "-n"], step.describe()
            assert step.argv[2] in lab_ns, step.describe()
        if "netns" in step.argv[3:]:  # veth peers are moved into a lab namespace, never the host's
            assert step.argv[step.argv.index("netns", 3) + 1] in lab_ns


def test_pod_steps_are_what_cni_bridge_does() -> None:
    plan = plan_lab(world(), prefix="t")
    client = next(p for p in plan.pods if p.name == "client")
    described = [s.describe() for s in build_steps(plan) if client.netns in s.argv]
    assert described == [
        "ip -n t-mesh-client link set lo up",
        f"ip -n t-node-a link add {client.host_veth} type veth peer name eth0 netns t-mesh-client",
        "ip -n t-mesh-client addr add 10.244.1.10/24 dev eth0",
        "ip -n t-mesh-client link set eth0 up",
        "ip -n t-mesh-client route add default via 10.244.1.1",
    ]
    assert len(client.host_veth) <= 15
    # hairpin on the bridge port, as the bridge plugin's hairpinMode: a pod reaching itself through a VIP
    assert f"ip -n t-node-a link set dev {client.host_veth} type bridge_slave hairpin on" in [
        s.describe() for s in pod_steps(plan, client)]


def test_bridges_have_fixed_distinct_locally_administered_macs() -> None:
    plan = plan_lab(world(), prefix="t")
    adds = [s.argv for s in build_steps(plan) if "bridge" in s.argv and "add" in s.argv]
    macs = [argv[argv.index("address") + 1] for argv in adds]
    assert len(macs) == 3 and len(set(macs)) == 3
    assert all(int(mac.split(":")[0], 16) & 0b11 == 0b10 for mac in macs)  # local, unicast


def test_plan_round_trips_through_json() -> None:
    plan = plan_lab(world(), prefix="t")
    assert msgspec.json.decode(msgspec.json.encode(plan), type=type(plan)) == plan


def test_rescale_deals_pods_round_robin_and_readdresses() -> None:
    rescaled = rescale_world(world(), 3)
    assert [n.name for n in rescaled.nodes] == ["node-a", "node-b", "node-c"]
    assert [(p.node, p.ips) for p in rescaled.pods] == [
        ("node-a", ["10.244.1.10"]),
        ("node-b", ["10.244.2.10"]),
        ("node-c", ["10.244.3.10"]),
        ("node-a", ["10.244.1.11"]),
    ]
    plan_lab(rescaled, prefix="t")  # and it is a valid lab


@pytest.mark.parametrize("nodes", [0, 27])
def test_rescale_refuses_silly_node_counts(nodes: int) -> None:
    with pytest.raises(PlanError, match="1 to 26"):
        rescale_world(world(), nodes)


@pytest.mark.parametrize("prefix", ["", "Upper", "1abc", "a_b", "x" * 21, "a b"])
def test_bad_prefix_is_refused(prefix: str) -> None:
    with pytest.raises(LabError, match="prefix"):
        check_prefix(prefix)


@pytest.mark.parametrize(
    ("text", "path", "problem"),
    [
        (
            SMALL.replace(b"10.244.2.0/24", b"10.245.2.0/24").replace(b"10.244.2.", b"10.245.2."),
            "$.nodes[1].podCidr",
            "outside the lab's pod range 10.244.0.0/16",
        ),
        (SMALL.replace(b"10.244.2.0/24", b"10.244.2.0/23"), "$.nodes[1].podCidr", "/24 to /29"),
        (
            b"nodes: [{name: n1, podCidr: 10.244.1.0/24}, {name: n2, podCidr: 10.244.1.128/25}]\n",
            "$.nodes[1].podCidr",
            "overlaps node n1",
        ),
        (
            with_pods("  - {name: gw, namespace: plain, node: node-a, ips: [10.244.1.1]}"),
            "$.pods[4].ips[0]",
            "gateway",
        ),
        (
            b"nodes: [{name: n1}]\nnamespaces: [{name: x}]\npods: [{name: v6, namespace: x, node: n1, "
            b"ips: ['fd00::1']}]\n",
            "$.pods[0].ips",
            "needs an IPv4 address",
        ),
        (
            with_pods("  - {name: h, namespace: plain, node: node-a, ips: [10.244.1.50], hostNetwork: true}"),
            "$.pods[4].hostNetwork",
            "hostNetwork",
        ),
        (b"namespaces: [{name: x}]\n", "$.nodes", "at least one node"),
    ],
)
def test_worlds_the_lab_cannot_build_raise_plan_errors(text: bytes, path: str, problem: str) -> None:
    with pytest.raises(PlanError) as info:
        plan_lab(world(text), prefix="t", source="bad.yaml")
    assert info.value.path == path
    assert problem in info.value.problem
    assert str(info.value).startswith(f"bad.yaml: {path}: ")


def test_pod_outside_its_node_range_is_refused_when_the_node_has_no_cidr() -> None:
    text = (
        b"nodes: [{name: n1}]\nnamespaces: [{name: x}]\npods: [{name: p, namespace: x, node: n1, "
        b"ips: [10.244.9.5]}]\n"
    )
    with pytest.raises(
        PlanError, match=r"\$\.pods\[0\]\.ips\[0\]: 10\.244\.9\.5 is outside node n1's pod range"
    ):
        plan_lab(world(text), prefix="t", source="w")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            "  - {name: dup, namespace: plain, node: node-a, ips: [10.244.1.10]}",
            "already used by pod mesh/client",
        ),
        ("  - {name: lost, namespace: plain, node: node-z, ips: [10.244.1.99]}", "unknown node 'node-z'"),
    ],
)
def test_overlapping_ips_and_unknown_nodes_are_caught_by_world_validation(extra: str, message: str) -> None:
    with pytest.raises(WorldError, match=message):
        world(with_pods(extra))


def test_container_node_uses_its_own_namespace_and_routes_via_peer_containers() -> None:
    plan = as_container_node(plan_lab(world(), prefix="pod"), "node-a")
    steps = [s.describe() for s in container_node_steps(plan, "node-a", {"node-b": "172.30.0.12"})]
    assert steps == [
        f"ip link add cbr0 address {bridge_mac('node-a')} type bridge",
        "ip addr add 10.244.1.1/24 dev cbr0",
        "ip link set cbr0 up",
        "iptables-restore --noflush",
        "ip route add 10.244.2.0/24 via 172.30.0.12",
    ]
    client = next(p for p in plan.pods if p.name == "client")
    wired = [s.describe() for s in pod_steps(plan, client)]
    assert wired[0] == f"ip link add {client.host_veth} type veth peer name eth0 netns pod-mesh-client"
    assert wired[-1] == "ip -n pod-mesh-client route add default via 10.244.1.1"


def test_container_node_needs_every_peer_address() -> None:
    plan = as_container_node(plan_lab(world(), prefix="pod"), "node-a")
    with pytest.raises(PlanError, match="no address for node node-b; pass --peer node-b=IP"):
        container_node_steps(plan, "node-a", {})


def test_rescale_keeps_world_addresses_it_can_and_rewrites_policies_naming_moved_pods() -> None:
    bookinfo = load_world(BOOKINFO.read_bytes(), str(BOOKINFO))
    rescaled = rescale_world(bookinfo, 3)
    ips = {p.name: (p.node, p.ips[0]) for p in rescaled.pods}
    assert ips["productpage-v1-6f9c7d"] == ("node-a", "10.244.1.10")  # in its new node's range: kept
    assert ips["legacy-app-1b2c3d"] == ("node-b", "10.244.2.11")  # moved to node-b: re-addressed
    assert len({ip for _, ip in ips.values()}) == len(ips)
    [deny] = [p for p in rescaled.policies if p.name == "deny-legacy"]
    assert deny.rules[0].clauses[0].matches[0].source_ips == ["10.244.2.11/32"]  # still matches legacy-app
    notes = rescale_notes(bookinfo, rescaled)
    assert "legacy/legacy-app-1b2c3d 10.244.1.30 -> 10.244.2.11" in notes[0]
    assert "policy bookinfo/deny-legacy: pod addresses rewritten to the new ones" in notes


def test_rescale_names_the_policy_ranges_it_invalidates() -> None:
    text = SMALL + b"""policies:
  - name: from-node-a
    namespace: mesh
    action: allow
    rules: [{clauses: [{matches: [{sourceIps: [10.244.1.0/24]}]}]}]
"""
    before = world(text)
    notes = rescale_notes(before, rescale_world(before, 3))
    assert notes[-1] == (
        "policy mesh/from-node-a: 10.244.1.0/24 no longer matches mesh/web-2; edit the world file, "
        "or run without --nodes"
    )
