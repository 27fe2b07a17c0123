"""The lab's DNS for real (root): a meshed pod's names are answered by its ztunnel on 15053 (the pod's
15053 nat rule counts them, ztunnel's istio_dns_requests_total counts them, the cluster DNS's query log never
shows them); a name outside the cluster is forwarded by ztunnel to the cluster DNS (which has no upstream:
it never forwards); a pod that opts out with `ambient.istio.io/dns-capture: "false"` is answered by the
cluster DNS; a service added to the world is answered by both; no pod has a generated /etc/hosts.

Every query stays inside this test's lab namespaces.
"""

from __future__ import annotations

import io
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rich.console import Console

from ambient.lab import lab
from ambient.lab.cluster_dns import KUBE_DNS_VIP
from ambient.lab.components import LabPaths
from ambient.lab.demo import dns_answer
from ambient.lab.probe import http_get
from ambient.lab.state import load_state
from ambient.lab.topology import ETC_NETNS
from tests.netns.conftest import run
from tests.netns.test_lab_topology import NET_A, needs_mesh, running_lab

SLEEP_IP, OPTOUT_IP, WEB_IP = (f"10.244.{NET_A}.{i}" for i in (10, 11, 12))
WORLD = f"""
nodes:
  - {{name: node-a, podCidr: 10.244.{NET_A}.0/24}}
namespaces:
  - {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}
pods:
  - {{name: sleep, namespace: mesh, node: node-a, ips: [{SLEEP_IP}], labels: {{app: sleep}},
     serviceAccount: sleep}}
  - {{name: optout, namespace: mesh, node: node-a, ips: [{OPTOUT_IP}], labels: {{app: sleep}},
     annotations: {{ambient.istio.io/dns-capture: "false"}}}}
  - {{name: web, namespace: mesh, node: node-a, ips: [{WEB_IP}], labels: {{app: web}}}}
services:
  - {{name: web, namespace: mesh, vips: [10.96.0.50], selector: {{app: web}},
     ports: [{{port: 80, targetPort: 8080}}]}}
"""
NEW_SERVICE = ("  - {name: extra, namespace: mesh, vips: [10.96.0.51], selector: {app: web},\n"
               "     ports: [{port: 81}]}\n")

pytestmark = needs_mesh


@pytest.fixture
def dns_lab(tmp_path: Path) -> Iterator[str]:
    with running_lab("d", WORLD, tmp_path) as prefix:
        yield prefix


def getent(prefix: str, pod: str, name: str) -> tuple[int, str]:
    result = lab.exec_in_pod(["getent", "ahostsv4", name], pod=pod, prefix=prefix, capture=True)
    return result.returncode, result.stdout.decode()


def queries_seen(prefix: str) -> str:
    state = load_state(prefix)
    assert state is not None
    path = LabPaths(state.run_dir).cluster_dns_queries
    return path.read_text() if path.exists() else ""


def dns_rule_packets(prefix: str, pod: str) -> int:
    out = run("iptables", "-t", "nat", "-L", "ISTIO_OUTPUT", "-v", "-x", "-n",
              netns=f"{prefix}-mesh-{pod}").stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "redir ports 15053" in line)


def ztunnel_metric(prefix: str, name: str) -> float:
    status, body = http_get(f"{prefix}-node-a", "127.0.0.1", 15020, "/metrics")
    assert status == 200
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode().splitlines()
               if line.startswith(name + "{") and 'source_workload="sleep"' in line)


def getent_eventually(prefix: str, pod: str, name: str, timeout: float = 15.0) -> tuple[int, str]:
    """getent until it answers (xDS and the cluster DNS's hosts directory follow the world by themselves)."""
    deadline = time.monotonic() + timeout
    while True:
        code, out = getent(prefix, pod, name)
        if code == 0 or time.monotonic() > deadline:
            return code, out
        time.sleep(0.2)


def test_meshed_pods_ask_ztunnel_and_opted_out_pods_the_cluster_dns(dns_lab: str, tmp_path: Path) -> None:
    prefix = dns_lab
    for pod in ("sleep", "optout", "web"):
        assert not (ETC_NETNS / f"{prefix}-mesh-{pod}" / "hosts").exists()
        resolv = (ETC_NETNS / f"{prefix}-mesh-{pod}" / "resolv.conf").read_text()
        assert f"nameserver {KUBE_DNS_VIP}" in resolv and "options ndots:5" in resolv
    assert f"nameserver {KUBE_DNS_VIP}" in (ETC_NETNS / f"{prefix}-node-a" / "resolv.conf").read_text()

    # the meshed pod: answered by its ztunnel, the cluster DNS never sees the query
    before = dns_rule_packets(prefix, "sleep")
    code, out = getent(prefix, "sleep", "web")
    assert code == 0 and out.startswith("10.96.0.50 "), out
    assert dns_rule_packets(prefix, "sleep") > before
    assert ztunnel_metric(prefix, "istio_dns_requests_total") >= 1
    assert f"web.mesh.svc.cluster.local from {SLEEP_IP}" not in queries_seen(prefix)

    # a name outside the cluster: ztunnel forwards it to the cluster DNS, which has nowhere to send it
    code, _ = getent(prefix, "sleep", "www.example.com")
    assert code != 0
    assert ztunnel_metric(prefix, "istio_dns_upstream_requests_total") >= 1
    seen = queries_seen(prefix)
    assert f"query[A] www.example.com from {SLEEP_IP}" in seen
    assert "forwarded" not in seen

    # the opted-out pod: no DNS rules, the cluster DNS answers it
    code, out = getent(prefix, "optout", "web")
    assert code == 0 and out.startswith("10.96.0.50 "), out
    assert dns_rule_packets(prefix, "optout") == 0
    assert f"query[A] web.mesh.svc.cluster.local from {OPTOUT_IP}" in queries_seen(prefix)

    # a new service reaches both: ztunnel through xDS, the cluster DNS through the lab
    world = tmp_path / "changed.yaml"
    world.write_text(WORLD + NEW_SERVICE)
    assert lab.world_command(["apply", str(world)], prefix=prefix, capture=True).returncode == 0
    for pod in ("sleep", "optout"):
        code, out = getent_eventually(prefix, pod, "extra.mesh")
        assert code == 0 and out.startswith("10.96.0.51 "), (pod, out)
    assert "extra.mesh.svc.cluster.local from " + SLEEP_IP not in queries_seen(prefix)


def test_the_demo_shows_a_dns_answer_and_who_gave_it(dns_lab: str) -> None:
    console = Console(record=True, width=200, file=io.StringIO())
    assert dns_answer(dns_lab, console, pod="sleep", name="web.mesh") == "ztunnel"
    text = console.export_text()
    assert "web.mesh. 30 IN A 10.96.0.50" in text and "flags QR AA" in text
    assert dns_answer(dns_lab, console, pod="optout", name="web.mesh.svc.cluster.local") == "cluster-dns"
