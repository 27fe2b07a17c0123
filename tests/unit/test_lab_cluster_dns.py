"""The lab's cluster DNS, rendered: dnsmasq with no upstream at the kube-dns VIP, the world's names, the
routes that reach it, and no world service on its address."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient.lab.cluster_dns import KUBE_DNS_VIP, dnsmasq_conf, hosts_file, node_resolv_conf, write_hosts
from ambient.lab.errors import PlanError
from ambient.lab.topology import build_steps, plan_lab
from services.istiod.world import World, load_world

WORLD = b"""
nodes: [{name: node-a, podCidr: 10.244.1.0/24}, {name: node-b, podCidr: 10.244.2.0/24}]
namespaces: [{name: mesh}]
pods:
  - {name: db-0, namespace: mesh, node: node-a, ips: [10.244.1.10], labels: {app: db}}
  - {name: db-1, namespace: mesh, node: node-b, ips: [10.244.2.10], labels: {app: db}}
services:
  - {name: web, namespace: mesh, vips: [10.96.0.50, "fd00:96::50"], ports: [{port: 80}]}
  - {name: db, namespace: mesh, selector: {app: db}, ports: [{port: 5432}]}
  - {name: api, namespace: mesh, hostname: api.example.com, vips: [240.240.0.1]}
"""


def world(text: bytes = WORLD) -> World:
    return load_world(text, "<test>")


def test_dnsmasq_never_forwards_and_answers_only_on_the_vip(tmp_path: Path) -> None:
    conf = dnsmasq_conf(hosts_dir=tmp_path / "hosts.d", query_log=tmp_path / "q.log").splitlines()
    assert "no-resolv" in conf and "no-hosts" in conf and "no-poll" in conf
    assert not [line for line in conf if line.startswith(("server=", "resolv-file", "rev-server"))]
    assert f"listen-address={KUBE_DNS_VIP}" in conf and "bind-interfaces" in conf
    assert "local=/cluster.local/" in conf  # unknown cluster names: NXDOMAIN, never asked elsewhere
    assert f"hostsdir={tmp_path / 'hosts.d'}" in conf and "log-queries" in conf


def test_hosts_file_has_vips_headless_endpoints_and_other_hosts() -> None:
    lines = hosts_file(world()).splitlines()[1:]
    assert lines == [
        "10.96.0.50\tweb.mesh.svc.cluster.local",
        "fd00:96::50\tweb.mesh.svc.cluster.local",
        "10.244.1.10\tdb.mesh.svc.cluster.local",
        "10.244.2.10\tdb.mesh.svc.cluster.local",
        "240.240.0.1\tapi.example.com",
    ]


def test_write_hosts_replaces_the_file(tmp_path: Path) -> None:
    write_hosts(tmp_path / "hosts.d", world())
    write_hosts(tmp_path / "hosts.d", world(WORLD.replace(b"10.96.0.50", b"10.96.0.51")))
    assert [p.name for p in (tmp_path / "hosts.d").iterdir()] == ["world.hosts"]
    assert "10.96.0.51\tweb.mesh" in (tmp_path / "hosts.d" / "world.hosts").read_text()


def test_the_vip_lives_on_the_control_plane_and_every_node_routes_to_it() -> None:
    plan = plan_lab(world(), prefix="t")
    steps = [s.argv for s in build_steps(plan)]
    assert ["ip", "-n", "t-cp", "addr", "add", f"{KUBE_DNS_VIP}/32", "dev", "lo"] in steps
    for node in plan.nodes:
        assert ["ip", "-n", node.netns, "route", "add", f"{KUBE_DNS_VIP}/32", "via",
                plan.control_plane.ip] in steps
    assert node_resolv_conf().splitlines()[1:] == [f"nameserver {KUBE_DNS_VIP}"]


def test_a_service_on_the_dns_vip_is_refused() -> None:
    with pytest.raises(PlanError, match="cluster DNS"):
        plan_lab(world(WORLD.replace(b"10.96.0.50", KUBE_DNS_VIP.encode())), prefix="t")
