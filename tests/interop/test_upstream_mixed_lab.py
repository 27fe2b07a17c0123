"""Interop with upstream's ztunnel: a two-node lab with ours on node-a and upstream's on node-b, driven by
our node agents and istiod stub, and HBONE across them in both directions.

This tier runs only when AMBIENT_UPSTREAM_ZTUNNEL names a ztunnel binary built from istio/ztunnel (the
project ships none); otherwise every test here is skipped, saying so. It needs root like the netns tier.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from ambient.lab import lab
from ambient.lab.upstream import IMPLEMENTATION_OURS, IMPLEMENTATION_UPSTREAM, UPSTREAM_ENV
from tests.conftest import netns_unavailable_reason
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, running_lab

UPSTREAM_BIN = os.environ.get(UPSTREAM_ENV, "")
pytestmark = [
    pytest.mark.skipif(not UPSTREAM_BIN, reason=f"{UPSTREAM_ENV} is not set: no upstream ztunnel to run "
                       "(set it to a ztunnel binary built from istio/ztunnel)"),
    pytest.mark.skipif(netns_unavailable_reason() is not None, reason=str(netns_unavailable_reason())),
]

A, B = f"10.244.{NET_A}.", f"10.244.{NET_B}."
WORLD = f"""
nodes:
  - {{name: node-a, podCidr: {A}0/24}}
  - {{name: node-b, podCidr: {B}0/24}}
namespaces:
  - {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}
pods:
  - {{name: client, namespace: mesh, node: node-a, ips: [{A}10], labels: {{app: sleep}},
     serviceAccount: client}}
  - {{name: web-a, namespace: mesh, node: node-a, ips: [{A}11], labels: {{app: web, side: a}},
     serviceAccount: web}}
  - {{name: client-b, namespace: mesh, node: node-b, ips: [{B}10], labels: {{app: sleep}},
     serviceAccount: client}}
  - {{name: web-b, namespace: mesh, node: node-b, ips: [{B}11], labels: {{app: web, side: b}},
     serviceAccount: web}}
services:
  - {{name: web-a, namespace: mesh, vips: [10.96.0.61], selector: {{side: a}},
     ports: [{{port: 80, targetPort: 8080}}]}}
  - {{name: web-b, namespace: mesh, vips: [10.96.0.62], selector: {{side: b}},
     ports: [{{port: 80, targetPort: 8080}}]}}
"""
CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
WEB_ID = "spiffe://cluster.local/ns/mesh/sa/web"


def log_line(prefix: str, node: str, direction: str, *needles: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        for line in lab.access_logs(prefix=prefix, node=node, direction=direction):
            if "connection complete" in line and all(n in line for n in needles):
                return line
        if time.monotonic() > deadline:
            raise AssertionError(f"no {direction} line on {node} with {needles}")
        time.sleep(0.1)


def test_hbone_both_ways_between_our_ztunnel_and_upstreams(tmp_path: Path) -> None:
    with running_lab("u", WORLD, tmp_path, ztunnel_bin=UPSTREAM_BIN, upstream_on=["node-b"]) as prefix:
        data = lab.status(prefix=prefix)
        status = {p["name"]: p["enrolment"] for p in data["pods"]}
        assert set(status.values()) == {"enabled"}, status
        ztunnels = {c["name"]: c["implementation"] for c in data["components"] if c["component"] == "ztunnel"}
        assert ztunnels == {"ztunnel/node-a": IMPLEMENTATION_OURS, "ztunnel/node-b": IMPLEMENTATION_UPSTREAM}
        # ours -> upstream's, by VIP and by pod IP; then upstream's -> ours
        for pod, url, server_node, server_ip in (
            ("client", "http://10.96.0.62/", "node-b", f"{B}11"),
            ("client", f"http://{B}11:8080/", "node-b", f"{B}11"),
            ("client-b", "http://10.96.0.61/", "node-a", f"{A}11"),
            ("client-b", f"http://{A}11:8080/", "node-a", f"{A}11"),
        ):
            code, body, err = client_get(prefix, url, pod=pod)
            assert code == 0 and body is not None, (url, err)
            client_node = "node-a" if server_node == "node-b" else "node-b"
            hbone = f"dst.hbone_addr={server_ip}:8080"
            out = log_line(prefix, client_node, "outbound", hbone, f'dst.identity="{WEB_ID}"')
            inbound = log_line(prefix, server_node, "inbound", hbone, f'src.identity="{CLIENT_ID}"')
            assert f"dst.addr={server_ip}:15008" in out and f"dst.addr={server_ip}:15008" in inbound
