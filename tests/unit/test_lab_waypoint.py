"""The lab runs a waypoint's pod as the waypoint process (not an app): its plan, and the process spec it is
started from (the pod's netns, the node's token and root certificate, readiness on 15008)."""

from __future__ import annotations

from pathlib import Path

import pytest

from ambient.lab import components
from ambient.lab.components import LabPaths
from ambient.lab.state import HttpCheck, TcpCheck
from ambient.lab.topology import LabPlan, plan_lab
from services.istiod.world import load_world

WORLD = b"""
nodes:
  - {name: node-a, podCidr: 10.244.1.0/24}
  - {name: node-b, podCidr: 10.244.2.0/24}
namespaces: [{name: mesh, labels: {istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}]
pods:
  - {name: waypoint-0, namespace: mesh, node: node-b, ips: [10.244.2.9], serviceAccount: waypoint,
     labels: {app: waypoint}}
  - {name: web, namespace: mesh, node: node-a, ips: [10.244.1.10], labels: {app: web}}
services:
  - {name: waypoint, namespace: mesh, vips: [10.96.0.99], selector: {app: waypoint}, ports: [{port: 15008}]}
  - {name: web, namespace: mesh, vips: [10.96.0.50], selector: {app: web}, ports: [{port: 80}]}
waypoints: [{name: waypoint, namespace: mesh, pod: waypoint-0}]
"""


def plan() -> LabPlan:
    return plan_lab(load_world(WORLD, "w.yaml"), prefix="zw1")


def test_the_waypoint_pod_runs_the_waypoint_program_and_is_not_captured() -> None:
    p = plan()
    wp = next(pod for pod in p.pods if pod.name == "waypoint-0")
    assert (wp.app.kind, wp.app.ports) == ("waypoint", [15008])
    assert not wp.ambient  # upstream's gateway labels keep the node agent away
    assert wp.app.env["WAYPOINT_NAME"] == "waypoint"
    assert (wp.app.env["POD_NAME"], wp.app.env["POD_NAMESPACE"]) == ("waypoint-0", "mesh")
    assert wp.app.env["SERVICE_ACCOUNT"] == "waypoint"
    assert wp.app.env["TRUST_DOMAIN"] == "cluster.local"
    web = next(pod for pod in p.pods if pod.name == "web")
    assert web.app.kind == "echo" and web.ambient


def test_the_waypoint_process_spec(tmp_path: Path) -> None:
    p = plan()
    wp = next(pod for pod in p.pods if pod.name == "waypoint-0")
    paths = LabPaths(tmp_path)
    spec = components.waypoint_spec(p, wp, paths)
    assert (spec.name, spec.component, spec.netns) == ("waypoint/mesh/waypoint-0", "waypoint", wp.netns)
    assert spec.argv[-2:] == ["-m", "services.waypoint.app"]
    env = spec.env
    assert env["INSTANCE_IP"] == "10.244.2.9" and env["NODE_NAME"] == "node-b"
    node_dir = paths.node_dir("node-b")
    assert env["XDS_ADDRESS"] == env["CA_ADDRESS"] == f"https://{p.istiod_address}"
    assert env["XDS_TOKEN_FILE"] == env["CA_TOKEN_FILE"] == str(node_dir / components.TOKEN_PATH)
    assert env["XDS_ROOT_CERT"] == env["CA_ROOT_CERT"] == str(node_dir / components.ROOT_CERT_PATH)
    hbone, ready = spec.checks
    assert isinstance(hbone, TcpCheck) and isinstance(ready, HttpCheck)
    assert (hbone.netns, hbone.host, hbone.port) == (wp.netns, "10.244.2.9", 15008)
    assert (ready.netns, ready.port, ready.path, ready.status) == (wp.netns, 15021, "/healthz/ready", 200)
    # ztunnel of the same node reaches istiod the same way.
    zt = components.ztunnel_spec(p, p.node("node-b"), paths, with_agent=True)
    assert all(zt.env[k] == env[k] for k in ("XDS_ADDRESS", "XDS_TOKEN_FILE", "CA_ROOT_CERT"))


def test_pod_spec_picks_the_waypoint_process_or_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = plan()
    paths = LabPaths(tmp_path)
    wp = next(pod for pod in p.pods if pod.name == "waypoint-0")
    web = next(pod for pod in p.pods if pod.name == "web")
    app = components.pod_spec(p, web, paths)
    assert app is not None and app.component == "app"
    monkeypatch.setattr(components, "available", lambda component: component != "waypoint")
    assert components.pod_spec(p, wp, paths) is None  # not installed: nothing runs, traffic fails closed
    monkeypatch.setattr(components, "available", lambda component: True)
    spec = components.pod_spec(p, wp, paths, istiod="172.30.0.2:15012")  # a container node's istiod
    assert spec is not None and spec.component == "waypoint"
    assert spec.env["XDS_ADDRESS"] == "https://172.30.0.2:15012"
