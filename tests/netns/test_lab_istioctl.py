"""The real istioctl reads a lab node's ztunnel (root): after a request through the mesh, each node's
/config_dump, asked inside the node's namespace (README: "Inspecting a node with istioctl"), shows the pods
on their nodes, HBONE for the meshed ones, the service's VIP and endpoints, and the certificates of the
node's own pods, and the connection the client holds open during the dumps on both nodes
(tests/service/test_istioctl_dump.py covers waypoints, policies and the other kinds of connection)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from ambient.lab import lab
from ambient.lab.state import load_state
from tests.netns.test_lab_mesh import OUTSIDER_IP, mesh_lab
from tests.netns.test_lab_topology import CLIENT_IP, WEB_IP, client_get
from tests.service.test_istioctl_dump import rows, run

__all__ = ["mesh_lab"]  # the fixture, used by name

HOLD = """
import socket, sys
s = socket.create_connection(("10.96.0.50", 80), timeout=20)
s.sendall(b"GET /held HTTP/1.1\\r\\nhost: web\\r\\n\\r\\n")
got = b""
while b"\\r\\n\\r\\n" not in got:
    got += s.recv(65536)
print(s.getsockname()[1], flush=True)
sys.stdin.read()
s.close()
"""
CONNECTIONS = "WORKLOAD DIRECTION LOCAL REMOTE REMOTE TARGET PROTOCOL"
CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
WEB_ID = "spiffe://cluster.local/ns/mesh/sa/web"


def test_istioctl_reads_each_lab_nodes_dump(mesh_lab: str, istioctl: str, tmp_path: Path) -> None:
    prefix = mesh_lab
    code, _, err = client_get(prefix, "http://web/for-istioctl")
    assert code == 0, err
    state = load_state(prefix)
    assert state is not None
    plan = lab.plan_of(state)
    # A request to the service whose keep-alive connection the client holds open while the nodes are dumped.
    holder = subprocess.Popen(
        ["ip", "netns", "exec", lab.find_pod(plan, "client").netns, sys.executable, "-c", HOLD],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    files = {}
    try:
        assert holder.stdout is not None
        held_port = int(holder.stdout.readline())
        for node in ("node-a", "node-b"):
            dump = lab.ztunnel_dump(plan, node)
            assert dump is not None, f"ztunnel on {node} did not answer /config_dump"
            files[node] = tmp_path / f"{node}.json"
            files[node].write_text(json.dumps(dump))
    finally:
        holder.communicate(timeout=30)  # its stdin closes: it closes the connection and exits

    for node, path in files.items():
        workloads = rows(run(istioctl, "workload", "--file", str(path), tmp_path=tmp_path),
                         "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL")
        assert workloads == [["mesh", "client", CLIENT_IP, "node-a", "None", "HBONE"],
                             ["mesh", "web", WEB_IP, "node-b", "None", "HBONE"],
                             ["plain", "outsider", OUTSIDER_IP, "node-a", "None", "TCP"]], node
        services = rows(run(istioctl, "service", "--file", str(path), tmp_path=tmp_path),
                        "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS")
        assert services == [["mesh", "web", "10.96.0.50", "None", "1/1"]], node

    held = {node: run(istioctl, "certificate", "--file", str(path), tmp_path=tmp_path)
            for node, path in files.items()}
    header = "CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE"
    for node, identity in (("node-a", CLIENT_ID), ("node-b", WEB_ID)):
        certs = rows(held[node], header)
        assert [(r[0], r[1], r[2], r[3]) for r in certs] == [(identity, "Leaf", "Available", "true"),
                                                             (identity, "Root", "Available", "true")], node

    states = json.loads(run(istioctl, "connections", "--file", str(files["node-a"]), "-o", "json",
                            tmp_path=tmp_path))
    assert [(s["info"]["name"], s["info"]["namespace"], s["state"]) for s in states] == [
        ("client", "mesh", "Up")]
    web = "web.mesh.svc.cluster.local"
    assert states[0]["connections"] == {"inbound": [], "outbound": [
        {"src": f"{CLIENT_IP}:{held_port}", "originalDst": "10.96.0.50:80", "actualDst": f"{WEB_IP}:15008",
         "protocol": "HBONE"}]}
    assert rows(run(istioctl, "connections", "--file", str(files["node-a"]), tmp_path=tmp_path),
                CONNECTIONS) == [["client.mesh", "Outbound", f"client.mesh:{held_port}", "web.mesh:15008",
                                  f"{web}:80", "HBONE"]]
    [inbound] = rows(run(istioctl, "connections", "--file", str(files["node-b"]), tmp_path=tmp_path),
                     CONNECTIONS)
    assert inbound[:3] == ["web.mesh", "Inbound", "web.mesh:8080"]
    assert inbound[3].startswith("client.mesh:") and inbound[4:] == [web, "HBONE"]
    summary = run(istioctl, "all", "--file", str(files["node-b"]), tmp_path=tmp_path)
    assert rows(summary, "NAMESPACE POLICY NAME ACTION SCOPE") == []
    assert rows(summary, "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS") == services
