"""A lab with a waypoint (root): the client's ztunnel sends a service's traffic to the waypoint pod, the
waypoint process applies the world's L7 policy and route and opens HBONE to the chosen pod.

Looked at: a GET through the VIP answered by a backend whose peer is the waypoint's pod (the destination
ztunnel delivers from the waypoint), the client ztunnel's outbound line naming the waypoint
(`dst.workload`, `dst.identity .../sa/waypoint`, `dst.hbone_addr=<VIP>:80`), the waypoint's request line,
a POST denied with 403 `RBAC: access denied`, and the weighted route spreading requests over both versions.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.lab import components, lab
from ambient.lab.state import run_dir
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, needs_mesh, running_lab

WORLD = f"""
nodes:
  - {{name: node-a, podCidr: 10.244.{NET_A}.0/24}}
  - {{name: node-b, podCidr: 10.244.{NET_B}.0/24}}
namespaces:
  - {{name: mesh, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: waypoint}}}}
pods:
  - {{name: client, namespace: mesh, node: node-a, ips: [10.244.{NET_A}.10], labels: {{app: sleep}},
     serviceAccount: client}}
  - {{name: waypoint-0, namespace: mesh, node: node-a, ips: [10.244.{NET_A}.40], labels: {{app: waypoint}},
     serviceAccount: waypoint}}
  - {{name: web-v1, namespace: mesh, node: node-b, ips: [10.244.{NET_B}.11],
     labels: {{app: web, version: v1}}, serviceAccount: web}}
  - {{name: web-v2, namespace: mesh, node: node-b, ips: [10.244.{NET_B}.12],
     labels: {{app: web, version: v2}}, serviceAccount: web}}
services:
  - {{name: waypoint, namespace: mesh, vips: [10.96.0.40], selector: {{app: waypoint}},
     ports: [{{port: 15008}}]}}
  - {{name: web, namespace: mesh, vips: [10.96.0.50], selector: {{app: web}},
     ports: [{{port: 80, targetPort: 8080, appProtocol: http}}]}}
  - {{name: web-v1, namespace: mesh, vips: [10.96.0.51], selector: {{app: web, version: v1}},
     ports: [{{port: 80, targetPort: 8080, appProtocol: http}}]}}
  - {{name: web-v2, namespace: mesh, vips: [10.96.0.52], selector: {{app: web, version: v2}},
     ports: [{{port: 80, targetPort: 8080, appProtocol: http}}]}}
waypoints: [{{name: waypoint, namespace: mesh, pod: waypoint-0}}]
authorizationPolicies:
  - {{name: web-get-only, namespace: mesh, targetRefs: [{{kind: Service, name: web}}], action: ALLOW,
     rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]}}
httpRoutes:
  - name: web-split
    namespace: mesh
    parentRefs: [{{name: web, port: 80}}]
    rules:
      - backendRefs: [{{name: web-v1, port: 80, weight: 50}}, {{name: web-v2, port: 80, weight: 50}}]
"""

pytestmark = [needs_mesh, pytest.mark.skipif(not components.available("waypoint"),
                                             reason="needs the waypoint process")]


@pytest.fixture
def waypoint_lab(tmp_path: Path) -> Iterator[str]:
    with running_lab("zx", WORLD, tmp_path) as prefix:
        yield prefix


def lines(prefix: str, node: str, needle: str, timeout: float = 10.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        found = [line for line in lab.access_logs(prefix=prefix, node=node) if needle in line]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def test_requests_go_through_the_waypoint_with_policy_and_route(waypoint_lab: str) -> None:
    prefix = waypoint_lab
    code, body, err = client_get(prefix, "http://10.96.0.50/hello")
    assert code == 0, err
    assert body is not None and body["path"] == "/hello"
    assert body["served_by"]["pod"] in ("web-v1", "web-v2")
    assert body["served_by"]["peer"].startswith(f"10.244.{NET_A}.40:")  # delivered from the waypoint's pod
    outbound = lines(prefix, "node-a", "dst.hbone_addr=10.96.0.50:80")
    assert outbound, "no outbound line to the web VIP"
    assert 'dst.workload="waypoint-0"' in outbound[-1]
    assert 'dst.identity="spiffe://cluster.local/ns/mesh/sa/waypoint"' in outbound[-1]

    post = ["python", "-m", "services.apps.client", "-i", "-m", "5", "-X", "POST", "-d", "x",
            "http://10.96.0.50/hello"]
    denied = lab.exec_in_pod(post, pod="client", prefix=prefix, capture=True)
    out = denied.stdout.decode()
    assert " 403 " in out.splitlines()[0] and out.rstrip().endswith("RBAC: access denied"), out

    served: collections.Counter[str] = collections.Counter()
    for _ in range(16):
        code, body, err = client_get(prefix, "http://10.96.0.50/")
        assert code == 0 and body is not None, err
        served[body["served_by"]["pod"]] += 1
    assert set(served) == {"web-v1", "web-v2"}, served


def test_waypoint_writes_one_request_line_per_request(waypoint_lab: str) -> None:
    prefix = waypoint_lab
    for path in ("/a", "/b"):
        code, _, err = client_get(prefix, f"http://10.96.0.50{path}")
        assert code == 0, err
    log = components.LabPaths(run_dir(prefix)).log("waypoint/mesh/waypoint-0").read_text()
    requests = [line for line in log.splitlines() if "request complete" in line]
    assert [line for line in requests if 'path="/a"' in line], log[-2000:]
    assert any('response_code=200' in line and 'method="GET"' in line for line in requests)
