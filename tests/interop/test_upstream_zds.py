"""ZDS interop with upstream's ztunnel, one two-node lab for the module (ours on node-a, upstream's on
node-b), driven by our node agents and istiod stub: enrolment (the listeners inside each pod's netns belong to
upstream's process, found by socket inode), both restarts (upstream's ztunnel, then our node agent under it),
un-enrolment on label removal, and 1 MiB each way through HBONE between the two ztunnels, byte-exact.

Runs only when AMBIENT_UPSTREAM_ZTUNNEL names a ztunnel built from istio/ztunnel; skipped otherwise. The
tests run in file order: the label removal comes last of the ZDS cases because it takes a pod out.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator

import pytest

from ambient.lab import components, lab
from ambient.lab.components import LabPaths
from ambient.lab.topology import PodPlan
from services.node_agent.verify import PROXY_PORTS, listeners_here, socket_inodes
from shared import netns
from tests.interop.test_upstream_mixed_lab import (  # noqa: F401  (pytestmark: the skips)
    CLIENT_ID,
    UPSTREAM_BIN,
    log_line,
    pytestmark,
)
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, running_lab

A, B = f"10.244.{NET_A}.", f"10.244.{NET_B}."
UPSTREAM_NODE = "node-b"
# `mesh` is ambient by its namespace label; `solo` is not, and its pod `spare-b` is ambient by its own label
WORLD = f"""
nodes:
  - {{name: node-a, podCidr: {A}0/24}}
  - {{name: node-b, podCidr: {B}0/24}}
namespaces:
  - {{name: mesh, labels: {{istio.io/dataplane-mode: ambient}}}}
  - {{name: solo}}
pods:
  - {{name: client, namespace: mesh, node: node-a, ips: [{A}10], labels: {{app: sleep, sink: a}},
     serviceAccount: client}}
  - {{name: web-a, namespace: mesh, node: node-a, ips: [{A}11], labels: {{app: web, side: a}},
     serviceAccount: web}}
  - {{name: client-b, namespace: mesh, node: node-b, ips: [{B}10], labels: {{app: sleep, sink: b}},
     serviceAccount: client}}
  - {{name: web-b, namespace: mesh, node: node-b, ips: [{B}11], labels: {{app: web, side: b}},
     serviceAccount: web}}
  - {{name: spare-b, namespace: solo, node: node-b, ips: [{B}12],
     labels: {{app: web, istio.io/dataplane-mode: ambient}}}}
services:
  - {{name: web-a, namespace: mesh, vips: [10.96.0.61], selector: {{side: a}},
     ports: [{{port: 80, targetPort: 8080}}]}}
  - {{name: web-b, namespace: mesh, vips: [10.96.0.62], selector: {{side: b}},
     ports: [{{port: 80, targetPort: 8080}}]}}
  # the sleep pods serve nothing themselves: the 1 MiB test runs its own server on 9100 in them
  - {{name: sink-a, namespace: mesh, vips: [10.96.0.63], selector: {{sink: a}},
     ports: [{{port: 9100, targetPort: 9100}}]}}
  - {{name: sink-b, namespace: mesh, vips: [10.96.0.64], selector: {{sink: b}},
     ports: [{{port: 9100, targetPort: 9100}}]}}
"""
UPSTREAM_PODS = ("mesh/client-b", "mesh/web-b", "solo/spare-b")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_lab("zi", WORLD, tmp_path_factory.mktemp("lab"), ztunnel_bin=UPSTREAM_BIN,
                     upstream_on=[UPSTREAM_NODE]) as name:  # fmt: skip
        yield name


def pod_plan(prefix: str, key: str) -> PodPlan:
    return next(p for p in lab.plan_of(lab.require_state(prefix)).pods if p.key == key)


def ztunnel_pid(prefix: str, node: str = UPSTREAM_NODE) -> int:
    record = lab.require_state(prefix).process(f"ztunnel/{node}")
    assert record is not None, f"no ztunnel/{node} in the lab"
    return record.pid


def workload_state(prefix: str) -> dict[str, str]:
    """uid -> state ("Up", "Pending", ...) from upstream's /config_dump `workloadState`."""
    dump = lab.ztunnel_dump(lab.plan_of(lab.require_state(prefix)), UPSTREAM_NODE)
    assert dump is not None, "upstream's ztunnel did not answer /config_dump"
    return {uid: str(entry.get("state")) for uid, entry in dump.get("workloadState", {}).items()}


def pod_listeners(pod: PodPlan) -> dict[str, set[int]]:
    """`PORT/tcp` -> inodes of the listening sockets inside the pod's netns (its /proc/net/tcp{,6})."""
    fd = netns.open_netns(pod.netns)
    try:
        with netns.entered(fd):
            return listeners_here()
    finally:
        os.close(fd)


def owned_listeners(prefix: str, key: str) -> dict[str, set[int]]:
    """The pod's proxy listeners, each asserted to be held as an fd by upstream's ztunnel process."""
    pid = ztunnel_pid(prefix)
    assert os.path.realpath(f"/proc/{pid}/exe") == os.path.realpath(UPSTREAM_BIN), "not upstream's process"
    held = socket_inodes([pid])
    bound = pod_listeners(pod_plan(prefix, key))
    found = {}
    for port in PROXY_PORTS:
        inodes = bound.get(f"{port}/tcp", set())
        assert inodes, f"{key}: nothing listens on {port}"
        assert inodes & held, f"{key}: {port} is bound but not by upstream's ztunnel (pid {pid})"
        found[f"{port}/tcp"] = inodes
    return found


def in_pod(prefix: str, pod: str, *argv: str) -> str:
    return lab.exec_in_pod(list(argv), pod=pod, prefix=prefix, capture=True).stdout.decode()


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what}: not within {timeout:g} s"
        time.sleep(0.2)


def snapshots_delivered(prefix: str) -> int:
    """How many snapshots node-b's node agents (this one and earlier runs) saw ACKed, from their log."""
    path = LabPaths(lab.require_state(prefix).run_dir).log(f"node-agent/{UPSTREAM_NODE}")
    return path.read_text(errors="replace").count("snapshot delivered")


def traffic_works(prefix: str) -> None:
    """Both directions, by VIP: ours (node-a) -> upstream's (node-b) and back."""
    for pod, url in (("client", "http://10.96.0.62/"), ("client-b", "http://10.96.0.61/")):
        code, body, err = client_get(prefix, url, pod=pod)
        assert code == 0 and body is not None, (pod, url, err)


def test_our_node_agent_enrols_pods_into_upstreams_ztunnel(prefix: str) -> None:
    status = {p["name"]: p["enrolment"] for p in lab.status(prefix=prefix)["pods"]}
    assert set(status.values()) == {"enabled"}, status
    uids = {pod_plan(prefix, k).uid for k in UPSTREAM_PODS}
    assert {u for u, s in workload_state(prefix).items() if s == "Up"} == uids
    for key in UPSTREAM_PODS:
        owned_listeners(prefix, key)
    # and on node-a the same ports belong to our ztunnel, not to upstream's
    ours = socket_inodes([ztunnel_pid(prefix, "node-a")])
    assert pod_listeners(pod_plan(prefix, "mesh/client"))["15008/tcp"] & ours
    traffic_works(prefix)


def test_upstreams_ztunnel_restarted_takes_the_snapshot_and_serves_again(prefix: str) -> None:
    before = ztunnel_pid(prefix)
    old = owned_listeners(prefix, "mesh/web-b")
    assert lab.restart("ztunnel", UPSTREAM_NODE, prefix=prefix, timeout=30) == [f"ztunnel/{UPSTREAM_NODE}"]
    assert ztunnel_pid(prefix) != before
    uids = {pod_plan(prefix, k).uid for k in UPSTREAM_PODS}
    wait_until(lambda: {u for u, s in workload_state(prefix).items() if s == "Up"} == uids,
               "upstream's ztunnel holding the node's pods again")  # fmt: skip
    new = {key: owned_listeners(prefix, key) for key in UPSTREAM_PODS}
    assert new["mesh/web-b"]["15008/tcp"].isdisjoint(old["15008/tcp"])  # the new process bound new sockets
    traffic_works(prefix)


def test_our_node_agent_restarted_under_running_upstream_keeps_pods_enrolled(prefix: str) -> None:
    pid = ztunnel_pid(prefix)
    old = {key: owned_listeners(prefix, key) for key in UPSTREAM_PODS}
    delivered = snapshots_delivered(prefix)
    restarted = lab.restart("node-agent", UPSTREAM_NODE, prefix=prefix, timeout=30)
    assert restarted == [f"node-agent/{UPSTREAM_NODE}"]
    wait_until(lambda: snapshots_delivered(prefix) > delivered, "the new agent's snapshot ACKed by upstream")
    assert ztunnel_pid(prefix) == pid
    # upstream reconnected to the new agent and reconciled: the same netns for each pod, so nothing rebound
    uids = {pod_plan(prefix, k).uid for k in UPSTREAM_PODS}
    assert {u for u, s in workload_state(prefix).items() if s == "Up"} == uids
    assert {key: owned_listeners(prefix, key) for key in UPSTREAM_PODS} == old
    status = {p["name"]: p["enrolment"] for p in lab.status(prefix=prefix)["pods"]}
    assert set(status.values()) == {"enabled"}, status
    traffic_works(prefix)


def test_label_removal_unenrols_the_pod_from_upstreams_ztunnel(prefix: str) -> None:
    spare = pod_plan(prefix, "solo/spare-b")
    owned_listeners(prefix, spare.key)
    assert "ISTIO_PRERT" in in_pod(prefix, "spare-b", "iptables-save")
    assert "lookup 100" in in_pod(prefix, "spare-b", "ip", "rule")  # the fwmark policy route
    done = lab.world_command(["label", "pod", "solo/spare-b", "istio.io/dataplane-mode-"], prefix=prefix,
                             capture=True)  # fmt: skip
    assert done.returncode == 0, done.stderr
    wait_until(lambda: spare.uid not in workload_state(prefix), "upstream's workloadState dropping spare-b")
    wait_until(lambda: not any(pod_listeners(spare).get(f"{p}/tcp") for p in PROXY_PORTS),
               "spare-b's listeners closing")  # fmt: skip
    wait_until(lambda: "ISTIO" not in in_pod(prefix, "spare-b", "iptables-save"), "spare-b's rules removed")
    assert "lookup 100" not in in_pod(prefix, "spare-b", "ip", "rule")
    # the others stay enrolled and served
    others = {pod_plan(prefix, k).uid for k in UPSTREAM_PODS if k != spare.key}
    assert {u for u, s in workload_state(prefix).items() if s == "Up"} == others
    traffic_works(prefix)


# --- 1 MiB each way -------------------------------------------------------------------------------------

MIB = 1024 * 1024
TRANSFER_PORT = 9100
# One TCP exchange: the client sends 1 MiB of random bytes and half-closes, the server reads to EOF and
# answers with 1 MiB of its own; each side prints the sha256 of what it sent and of what it received.
TRANSFER = """
import hashlib, os, socket, sys, json
MIB = 1024 * 1024
def read_all(s):
    h, n = hashlib.sha256(), 0
    while chunk := s.recv(65536):
        h.update(chunk)
        n += len(chunk)
    return h.hexdigest(), n
mode = sys.argv[1]
body = os.urandom(MIB)
if mode == "serve":
    ls = socket.create_server(("0.0.0.0", int(sys.argv[2])))
    print("listening", flush=True)
    conn, _ = ls.accept()
    got, n = read_all(conn)
    conn.sendall(body)
    conn.shutdown(socket.SHUT_WR)
else:
    conn = socket.create_connection((sys.argv[2], int(sys.argv[3])), timeout=20)
    conn.sendall(body)
    conn.shutdown(socket.SHUT_WR)
    got, n = read_all(conn)
print(json.dumps({"sent": hashlib.sha256(body).hexdigest(), "received": got, "received_bytes": n}))
"""


def start_server(prefix: str, pod: PodPlan) -> subprocess.Popen[str]:
    """The transfer server in the pod's netns; returns once it listens."""
    proc = subprocess.Popen(
        ["ip", "netns", "exec", pod.netns, components.PYTHON, "-c", TRANSFER, "serve", str(TRANSFER_PORT)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "listening", proc.stderr.read() if proc.stderr else ""
    return proc


@pytest.mark.parametrize(
    ("client", "server", "host"),
    [
        ("client", "mesh/client-b", "10.96.0.64"),  # ours -> upstream's, by VIP
        ("client", "mesh/client-b", f"{B}10"),  # ours -> upstream's, by pod IP
        ("client-b", "mesh/client", "10.96.0.63"),  # upstream's -> ours, by VIP
        ("client-b", "mesh/client", f"{A}10"),  # upstream's -> ours, by pod IP
    ],
)
def test_one_mib_each_way_byte_exact_through_hbone(prefix: str, client: str, server: str, host: str) -> None:
    target = pod_plan(prefix, server)
    proc = start_server(prefix, target)
    try:
        done = lab.exec_in_pod([components.PYTHON, "-c", TRANSFER, "connect", host, str(TRANSFER_PORT)],
                               pod=client, prefix=prefix, capture=True)  # fmt: skip
        assert done.returncode == 0, done.stderr.decode()
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    sent_by_client, seen_by_server = json.loads(done.stdout), json.loads(out)
    assert seen_by_server["received_bytes"] == MIB and sent_by_client["received_bytes"] == MIB
    assert seen_by_server["received"] == sent_by_client["sent"]
    assert sent_by_client["received"] == seen_by_server["sent"]
    assert hashlib.sha256(b"").hexdigest() not in (seen_by_server["received"], sent_by_client["received"])
    # the access-log pair: both ztunnels counted the megabyte each way for this HBONE tunnel
    client_node = "node-a" if target.node == "node-b" else "node-b"
    needles = (f"dst.hbone_addr={target.ip}:{TRANSFER_PORT}", f"bytes_sent={MIB}", f"bytes_recv={MIB}",
               f'src.identity="{CLIENT_ID}"', f'dst.identity="{CLIENT_ID}"')  # sinks run as sa/client too
    log_line(prefix, client_node, "outbound", *needles)
    log_line(prefix, target.node, "inbound", *needles)

