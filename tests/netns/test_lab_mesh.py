"""End to end through the mesh (root): enrolment, in-pod rules, ztunnel's listeners in the pod, a cross-node
request with access-log lines on both ztunnels, fail-closed while ztunnel is down, recovery after restarts.

Meshed traffic is HBONE: both lines name dst.addr=<pod>:15008 and dst.hbone_addr=<pod>:<port> with the
SPIFFE identities of both ends (tests/netns/test_hbone_mesh.py looks at the wire and at policies).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.lab import components, lab
from ambient.lab.errors import UnknownPodError
from ambient.lab.probe import http_get
from ambient.lab.state import load_state, process_start_time, stop_process
from tests.netns.test_lab_topology import (
    CLIENT_IP,
    NET_A,
    NET_B,
    WEB_IP,
    client_get,
    force_clean,
    lab_netns,
    needs_mesh,
    running_lab,
)

OUTSIDER_IP = f"10.244.{NET_A}.20"

WORLD = """
nodes:
  - {name: node-a, podCidr: 10.244.1.0/24}
  - {name: node-b, podCidr: 10.244.2.0/24}
namespaces:
  - {name: mesh, labels: {istio.io/dataplane-mode: ambient}}
  - {name: plain}
pods:
  - {name: client, namespace: mesh, node: node-a, ips: [10.244.1.10], labels: {app: sleep},
     serviceAccount: client}
  - {name: web, namespace: mesh, node: node-b, ips: [10.244.2.10], labels: {app: web}, serviceAccount: web}
  - {name: outsider, namespace: plain, node: node-a, ips: [10.244.1.20], labels: {app: sleep}}
services:
  - {name: web, namespace: mesh, vips: [10.96.0.50], selector: {app: web},
     ports: [{port: 80, targetPort: 8080}]}
"""
# (WORLD keeps the fixed addresses other test modules assert on; this module's labs use random pod ranges)
LAB_WORLD = WORLD.replace("10.244.1.", f"10.244.{NET_A}.").replace("10.244.2.", f"10.244.{NET_B}.")


pytestmark = needs_mesh


@pytest.fixture
def mesh_lab(tmp_path: Path) -> Iterator[str]:
    with running_lab("m", LAB_WORLD, tmp_path) as prefix:
        yield prefix


def wait_for_lines(prefix: str, node: str, direction: str, needle: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [
            line
            for line in lab.access_logs(prefix=prefix, node=node, direction=direction)
            if "connection complete" in line and needle in line
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def in_pod(prefix: str, pod: str, *argv: str) -> str:
    return lab.exec_in_pod(list(argv), pod=pod, prefix=prefix, capture=True).stdout.decode()


def test_cross_node_request_through_the_mesh(mesh_lab: str) -> None:
    prefix = mesh_lab
    data = lab.status(prefix=prefix)
    status = {p["name"]: p for p in data["pods"]}
    assert status["client"]["enrolment"] == "enabled"
    assert status["web"]["enrolment"] == "enabled"
    assert status["outsider"]["enrolment"] == "not-ambient"
    # read from the control plane: the annotation the node agents wrote
    assert data["control_plane"]["answered"]
    assert [status[n]["redirection"] for n in ("client", "web", "outsider")] == ["enabled", "enabled", None]

    rules = in_pod(prefix, "web", "iptables-save")
    assert "-A ISTIO_OUTPUT" in rules and "--to-ports 15001" in rules and "--to-ports 15006" in rules
    assert "ISTIO" not in in_pod(prefix, "outsider", "iptables-save")
    listening = in_pod(prefix, "web", "ss", "-ltn")
    for port in (":15001", ":15006", ":15008", ":8080"):
        assert port in listening

    # `ambient trace client` follows the client's DNS queries and connections on node-a's ztunnel while it
    # calls web: first the lookups of `web` (answered by ztunnel's DNS proxy), then the connection
    trace = subprocess.Popen(
        [sys.executable, "-c", "from ambient.cli import main; main()", "trace", "client", "--prefix", prefix,
         "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert trace.stdout is not None
        tracing = json.loads(trace.stdout.readline())
        assert tracing["event"] == "tracing" and tracing["running"][0]["pod"] == "mesh/client", tracing
        code, body, err = client_get(prefix, "http://web/through-mesh")
        lookups = []
        while (traced := json.loads(trace.stdout.readline()))["event"] == "dns query":
            lookups.append(traced)
    finally:
        trace.kill()
        trace.wait()
    web_a = ("web.mesh.svc.cluster.local", "A", "ztunnel", ["10.96.0.50"])
    assert web_a in [(q["name"], q["type"], q["answered_by"], q["answers"]) for q in lookups], lookups
    assert code == 0, err
    assert body is not None and body["path"] == "/through-mesh"
    assert (traced["listener"], traced["original_dst"], traced["route"], traced["error"]) == (
        "outbound (15001)", "10.96.0.50:80", f"HBONE to the ztunnel at {WEB_IP}:15008", None), traced

    outbound = wait_for_lines(prefix, "node-a", "outbound", f"src.addr={CLIENT_IP}:")
    inbound = wait_for_lines(prefix, "node-b", "inbound", f"{WEB_IP}:")
    assert outbound, list(lab.access_logs(prefix=prefix))
    assert inbound, list(lab.access_logs(prefix=prefix))
    assert 'src.workload="client"' in outbound[-1]
    assert 'dst.workload="web"' in inbound[-1]
    for line in (outbound[-1], inbound[-1]):
        assert f"dst.addr={WEB_IP}:15008 dst.hbone_addr={WEB_IP}:8080" in line
        assert 'src.identity="spiffe://cluster.local/ns/mesh/sa/client"' in line
        assert 'dst.identity="spiffe://cluster.local/ns/mesh/sa/web"' in line
    assert not list(lab.access_logs(prefix=prefix, node="node-b", direction="outbound"))
    # node-b's metrics, labelled from the Workloads the lab's istiod sent: client is app=sleep
    state = load_state(prefix)
    assert state is not None
    status_code, metrics = http_get(lab.plan_of(state).node("node-b").netns, "127.0.0.1", 15020, "/metrics")
    assert status_code == 200 and b"_created" not in metrics
    closed = [line for line in metrics.decode().splitlines()
              if line.startswith("istio_tcp_connections_closed_total{") and 'reporter="destination"' in line]
    assert closed, metrics.decode()
    for label in ('source_workload="client"', 'source_canonical_service="sleep"', 'source_app="sleep"',
                  'source_version="latest"', 'destination_workload="web"', 'destination_app="web"',
                  'destination_service="web.mesh.svc.cluster.local"', 'destination_service_name="web"',
                  'connection_security_policy="mutual_tls"'):
        assert label in closed[0], closed[0]

    # a pod outside the mesh reaches the meshed service too (plain TCP into web's inbound capture)
    code, _, err = client_get(prefix, "http://web.mesh/from-outside", pod="outsider")
    assert code == 0, err


def test_fail_closed_while_ztunnel_is_down_and_recovery_after_restart(mesh_lab: str) -> None:
    prefix = mesh_lab
    state = load_state(prefix)
    assert state is not None
    record = state.process("ztunnel/node-b")
    assert record is not None
    stop_process(record)
    # the rules stay: web's inbound traffic is redirected to ports nobody serves, it never bypasses
    assert "--to-ports 15006" in in_pod(prefix, "web", "iptables-save")
    code, _, _ = client_get(prefix, f"http://{WEB_IP}:8080/while-down")
    assert code != 0

    lab.restart("ztunnel", "node-b", prefix=prefix, timeout=30)
    code, err = eventually_ok(prefix, f"http://{WEB_IP}:8080/after-restart")
    assert code == 0, err

    lab.restart("node-agent", "node-a", prefix=prefix, timeout=30)
    # (a restarted agent currently hands its pods over again, which replaces their listeners: a short
    # window of refused connections on that node; it must close, and the pods must stay captured)
    code, err = eventually_ok(prefix, "http://web/after-agent-restart")
    assert code == 0, err
    assert "--to-ports 15001" in in_pod(prefix, "client", "iptables-save")


def eventually_ok(prefix: str, url: str, within: float = 15.0) -> tuple[int, str]:
    deadline = time.monotonic() + within
    while True:
        code, _, err = client_get(prefix, url)
        if code == 0 or time.monotonic() > deadline:
            return code, err
        time.sleep(0.3)


def test_exec_exits_as_a_shell_would_and_deleting_a_pod_unenrols_it(mesh_lab: str, tmp_path: Path) -> None:
    """One lab for both: exec's exit codes; then delete, after which exec and status know the pod is gone."""
    prefix = mesh_lab
    fresh = load_state(prefix)
    assert fresh is not None
    for node in ("node-a", "node-b"):  # a fresh lab: nothing restarted, so nothing to warn about
        agent_log = components.LabPaths(fresh.run_dir).log(f"node-agent/{node}").read_text()
        assert " WARNING " not in agent_log, agent_log
    missing = lab.exec_in_pod(["nosuchcmd"], pod="client", prefix=prefix, capture=True)
    assert missing.returncode == 127 and b"nosuchcmd: command not found" in missing.stderr
    plain = tmp_path / "not-a-program"
    plain.write_text("data\n")
    plain.chmod(0o644)
    not_exec = lab.exec_in_pod([str(plain)], pod="client", prefix=prefix, capture=True)
    assert not_exec.returncode == 126
    assert lab.exec_in_pod(["sh", "-c", "exit 7"], pod="client", prefix=prefix).returncode == 7

    state = load_state(prefix)
    assert state is not None
    web_uid = next(p.uid for p in lab.plan_of(state).pods if p.name == "web")
    assert web_uid in lab.ztunnel_pods(lab.plan_of(state), "node-b")

    assert lab.delete_pod("web", prefix=prefix, timeout=30) == "mesh/web"
    assert web_uid not in lab.ztunnel_pods(lab.plan_of(state), "node-b")
    assert f"{prefix}-mesh-web" not in lab_netns(prefix)
    status = {p["name"]: p["enrolment"] for p in lab.status(prefix=prefix)["pods"]}
    assert status["web"] == "deleted"
    code, _, _ = client_get(prefix, f"http://{WEB_IP}:8080/gone")
    assert code != 0
    # the rest of the mesh is unaffected
    assert status["client"] == "enabled"
    # a deleted pod matches nothing any more, and asking for it by name says so
    with pytest.raises(UnknownPodError, match=r"pod mesh/web was deleted \(`ambient lab delete`\)"):
        lab.exec_in_pod(["true"], pod="web", prefix=prefix)
    apps = {p["name"]: (p["app"], p["program"]) for p in lab.status(prefix=prefix)["pods"]}
    assert apps["client"] == ("sleep", "sleep") and apps["web"] == ("web", "echo")  # the app label


def test_labelling_a_namespace_ambient_enrols_its_running_pod(mesh_lab: str) -> None:
    prefix = mesh_lab
    state = load_state(prefix)
    assert state is not None
    plan = lab.plan_of(state)
    outsider = next(p for p in plan.pods if p.name == "outsider")
    assert "ISTIO" not in in_pod(prefix, "outsider", "iptables-save")
    label = ["label", "namespace", "plain", "istio.io/dataplane-mode=ambient"]
    done = lab.world_command(label, prefix=prefix, capture=True)
    assert done.returncode == 0, done.stderr
    # no CNI event: the node agent sees the label through its pod watch and finds the netns by the pod's IP
    deadline = time.monotonic() + 20
    while outsider.uid not in lab.ztunnel_pods(plan, "node-a"):
        assert time.monotonic() < deadline, "ztunnel on node-a never got the relabelled pod"
        time.sleep(0.2)
    assert "--to-ports 15001" in in_pod(prefix, "outsider", "iptables-save")
    code, _, err = client_get(prefix, "http://web.mesh/now-meshed", pod="outsider")
    assert code == 0, err
    lines = wait_for_lines(prefix, "node-a", "outbound", f"src.addr={OUTSIDER_IP}:")
    assert lines and 'src.identity="spiffe://cluster.local/ns/plain/sa/default"' in lines[-1]


def test_down_leaves_nothing(tmp_path: Path) -> None:
    prefix = f"m{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    world = tmp_path / "mesh.yaml"
    world.write_text(LAB_WORLD)
    try:
        state = lab.up(prefix=prefix, world_file=world, timeout=30)
        pids = [(p.pid, p.start_time) for p in state.processes]
        assert lab.down(prefix=prefix)
        assert lab_netns(prefix) == []
        assert all(process_start_time(pid) != start for pid, start in pids)
    finally:
        force_clean(prefix)


# bookinfo without its waypoint: this module is about L4 (the waypoint's flows have their own test)
BOOKINFO = (Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml").read_text().replace(
    "istio.io/use-waypoint: waypoint", "istio.io/use-waypoint: none")


def test_source_ip_deny_holds_through_a_vip_and_hairpin_works(tmp_path: Path) -> None:
    # kube-proxy masquerades only hairpin traffic: legacy-app keeps its own source IP through productpage's
    # VIP on the same node, so bookinfo/deny-legacy (sourceIps) refuses it there as at the pod IP; and
    # legacy-app reaching itself through its own service still works.
    prefix = f"k{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    legacy_ip = f"10.244.{NET_A}.30"
    world = tmp_path / "bookinfo.yaml"
    world.write_text(BOOKINFO.replace("10.244.1.", f"10.244.{NET_A}.")
                     .replace("10.244.2.", f"10.244.{NET_B}."))
    try:
        lab.up(prefix=prefix, world_file=world, timeout=60)
        for url in ("http://productpage.bookinfo:9080/productpage", f"http://10.244.{NET_A}.10:9080/productpage"):
            code, _, err = client_get(prefix, url, pod="legacy-app")
            assert code != 0, f"{url} answered although bookinfo/deny-legacy refuses {legacy_ip}"
        denied = wait_for_lines(prefix, "node-a", "inbound", "explicitly denied by: bookinfo/deny-legacy")
        assert len(denied) >= 2 and all(f"src.addr={legacy_ip}:" in line for line in denied), denied
        code, body, err = client_get(prefix, "http://legacy-app.legacy/hairpin", pod="legacy-app")
        assert code == 0 and body is not None, err
        code, _, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
        assert code == 0, err  # the mesh itself still works
    finally:
        try:
            lab.down(prefix=prefix)
        finally:
            force_clean(prefix)
