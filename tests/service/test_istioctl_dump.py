"""Upstream's reader proves the /config_dump schema: a ztunnel run in-process syncs a world from the istiod
stub over xDS, takes two pods from a real ZDS server (one of which cannot start), fetches their certificates
from the stub's CA; its dump, written to a file, is read by the real `istioctl ztunnel-config ... --file`
(built from the istio.io/istio module by scripts/build-istioctl).

The connections table needs traffic: a second ztunnel runs two pods on loopback addresses (the sockets of
tests/service/test_ztunnel_mesh.py) and is dumped while connections of every kind are held open through it:
HBONE to a service VIP, outbound passthrough, inbound plaintext."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from services.istiod.world import World, load_world
from services.node_agent.zds_server import ZdsServer
from services.ztunnel.admin import ZtunnelParts
from services.ztunnel.app import run_ztunnel
from services.ztunnel.errors import ProxyStartError
from services.ztunnel.inpod.sockets import PodListeners
from shared.addr import Addr
from shared.netns import netns_id
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo
from tests.service.test_ztunnel_app import Snapshot, config, http_get, pipe_fds
from tests.service.test_ztunnel_inpod import FakeSockets
from tests.service.test_ztunnel_mesh import (
    CLIENT_IP,
    NAMED_CLIENT,
    NAMED_SERVER,
    NODE,
    SERVER_IP,
    VIP,
    PodSockets,
    echo_app,
    named_world,
    skip_if_server_hbone_port_taken,
)
from tests.service.zds_fakes import wait_until

__all__ = ["pipe_fds"]  # the fixture, used by name

WORLD = b"""
trustDomain: cluster.local
clusterId: Kubernetes
nodes:
  - {name: node-a, podCidr: 10.244.1.0/24}
  - {name: node-b, podCidr: 10.244.2.0/24}
namespaces:
  - {name: bookinfo, labels: {istio.io/dataplane-mode: ambient}}
  - {name: legacy, labels: {}}
pods:
  - {name: productpage-v1-6f9c7d, namespace: bookinfo, node: node-a, ips: [10.244.1.10],
     workload: productpage-v1, serviceAccount: bookinfo-productpage, labels: {app: productpage, version: v1}}
  - {name: reviews-v1-7b8c4f, namespace: bookinfo, node: node-a, ips: [10.244.1.11], workload: reviews-v1,
     serviceAccount: bookinfo-reviews, labels: {app: reviews, version: v1}, waypoint: {name: waypoint}}
  - {name: details-v1-5f4d58, namespace: bookinfo, node: node-a, ips: [10.244.1.12], workload: details-v1,
     serviceAccount: bookinfo-details, labels: {app: details, version: v1}}
  - {name: ratings-v1-8c9f0b, namespace: bookinfo, node: node-b, ips: [10.244.2.12], workload: ratings-v1,
     serviceAccount: bookinfo-ratings, labels: {app: ratings, version: v1}}
  - {name: waypoint-5d6e7f, namespace: bookinfo, node: node-b, ips: [10.244.2.40], workload: waypoint,
     serviceAccount: waypoint, labels: {gateway.networking.k8s.io/gateway-name: waypoint}}
  - {name: legacy-app-1b2c3d, namespace: legacy, node: node-a, ips: [10.244.1.30], workload: legacy-app,
     labels: {app: legacy-app}}
services:
  - {name: productpage, namespace: bookinfo, vips: [10.96.0.10], selector: {app: productpage},
     ports: [{port: 9080, targetPort: 9080, appProtocol: http}]}
  - {name: reviews, namespace: bookinfo, vips: [10.96.0.12], selector: {app: reviews},
     waypoint: {name: waypoint}, ports: [{port: 9080, targetPort: 9080, appProtocol: http}]}
  - {name: ratings, namespace: bookinfo, vips: [10.96.0.13], selector: {app: ratings},
     ports: [{port: 9080, targetPort: 9080, appProtocol: http}]}
  - {name: waypoint, namespace: bookinfo, vips: [10.96.0.40],
     selector: {gateway.networking.k8s.io/gateway-name: waypoint}, ports: [{port: 15008}]}
  - {name: legacy-app, namespace: legacy, vips: [10.96.0.30], selector: {app: legacy-app},
     ports: [{port: 80, targetPort: 8080}]}
policies:
  - name: ratings-from-reviews
    namespace: bookinfo
    action: allow
    selector: {app: ratings}
    rules:
      - clauses:
          - matches:
              - principals: [{exact: spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews}]
  - name: deny-legacy
    namespace: bookinfo
    action: deny
    rules:
      - clauses:
          - matches:
              - sourceIps: [10.244.1.30/32]
                notDestinationPorts: [15021]
"""

PRODUCTPAGE_ID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
REVIEWS_ID = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-reviews"


class OneFails(FakeSockets):
    """Loopback listeners, except for the pod whose netns (a pipe) is `failing`: its start fails."""

    def __init__(self, failing: int) -> None:
        super().__init__()
        self.failing = os.fstat(failing).st_ino

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        if os.fstat(netns_fd).st_ino == self.failing:
            raise ProxyStartError("no such network namespace (test)")
        return super().bind_listeners(netns_fd)


def entry(world: World, name: str, fd: int) -> SnapshotEntry:
    pod = next(p for p in world.pods if p.name == name)
    info = WorkloadInfo(name=pod.name, namespace=pod.namespace, service_account=pod.service_account)
    return SnapshotEntry(uid=PodUid(pod.kube_uid), info=info, netns_fd=fd)


async def node_a_dump(tmp_path: Path, fds: list[int]) -> tuple[World, dict[str, Any]]:
    """node-a's ztunnel after xDS sync, with productpage and reviews up and details pending."""
    from services.istiod.testing import open_test_istiod

    world = load_world(WORLD, "world.yaml")
    with trio.fail_after(30):
        async with open_test_istiod(world) as istiod, trio.open_nursery() as nursery:
            cfg = msgspec.structs.replace(config(tmp_path), xds_target=istiod.target(node="node-a"),
                                          node_name="node-a")
            sockets = OneFails(failing=fds[2])
            app: ZtunnelParts = await nursery.start(lambda **kw: run_ztunnel(cfg, sockets=sockets, **kw))
            snap = Snapshot()
            snap.entries += [entry(world, "productpage-v1-6f9c7d", fds[0]),
                             entry(world, "reviews-v1-7b8c4f", fds[1]),
                             entry(world, "details-v1-5f4d58", fds[2])]
            server = ZdsServer(cfg.inpod_uds, snap, accept_interval=0)
            await nursery.start(server.serve)
            await wait_until(lambda: app.store.policies.keys() >= {"bookinfo/deny-legacy",
                                                                    "bookinfo/ratings-from-reviews"}
                             and len(app.manager.running) == 2 and len(app.manager.pending) == 1)
            assert app.mesh is not None
            while [c["state"] for c in app.mesh.certs.dump()] != ["Available", "Available"]:
                await trio.sleep(0.05)
            status, body = await http_get(app.addresses["admin"][0], "/config_dump")
            assert status == 200
            nursery.cancel_scope.cancel()
    return world, json.loads(body)


Dumped = tuple[World, dict[str, Any], Path]


@pytest.fixture
def dump_file(tmp_path: Path, pipe_fds: list[int]) -> Dumped:
    world, dump = trio.run(node_a_dump, tmp_path, pipe_fds)
    path = tmp_path / "node-a.json"
    path.write_text(json.dumps(dump, indent=2))
    return world, dump, path


def run(istioctl: str, *args: str, tmp_path: Path) -> str:
    # No cluster: --file reads the dump; KUBECONFIG names a file that does not exist, so nothing is contacted.
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path), "KUBECONFIG": str(tmp_path / "none")}
    result = subprocess.run([istioctl, "ztunnel-config", *args], capture_output=True, text=True, env=env,
                            timeout=60)
    assert result.returncode == 0, f"istioctl {' '.join(args)}: {result.stderr}"
    return result.stdout


def rows(table: str, header: str) -> list[list[str]]:
    """The rows of the table under `header`, up to the next blank line, each split on whitespace (no value in
    these tables has a space)."""
    lines = table.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split() == header.split())
    out = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        out.append(line.split())
    return out


def test_istioctl_reads_workloads_services_policies(istioctl: str, dump_file: Dumped, tmp_path: Path) -> None:
    world, _, path = dump_file
    f = ("--file", str(path))

    workloads = rows(run(istioctl, "workload", *f, "-o", "short", tmp_path=tmp_path),
                     "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL")
    assert workloads == [
        ["bookinfo", "details-v1-5f4d58", "10.244.1.12", "node-a", "None", "HBONE"],
        ["bookinfo", "productpage-v1-6f9c7d", "10.244.1.10", "node-a", "None", "HBONE"],
        ["bookinfo", "ratings-v1-8c9f0b", "10.244.2.12", "node-b", "None", "HBONE"],
        ["bookinfo", "reviews-v1-7b8c4f", "10.244.1.11", "node-a", "waypoint", "HBONE"],
        ["bookinfo", "waypoint-5d6e7f", "10.244.2.40", "node-b", "None", "HBONE"],
        ["legacy", "legacy-app-1b2c3d", "10.244.1.30", "node-a", "None", "TCP"],
    ]
    on_b = rows(run(istioctl, "workload", *f, "--workload-node", "node-b", tmp_path=tmp_path),
                "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL")
    assert [r[1] for r in on_b] == ["ratings-v1-8c9f0b", "waypoint-5d6e7f"]
    as_json = json.loads(run(istioctl, "workload", *f, "--address", "10.244.1.11", "-o", "json",
                             tmp_path=tmp_path))
    [reviews] = as_json
    pod = next(p for p in world.pods if p.name == "reviews-v1-7b8c4f")
    assert reviews["uid"] == "Kubernetes//Pod/bookinfo/reviews-v1-7b8c4f"
    assert (reviews["workloadIps"], reviews["protocol"]) == (["10.244.1.11"], "HBONE")
    assert reviews["node"] == "node-a"
    assert (reviews["serviceAccount"], reviews["trustDomain"]) == (pod.service_account, "cluster.local")
    assert (reviews["workloadName"], reviews["workloadType"]) == ("reviews-v1", "deployment")
    assert (reviews["canonicalName"], reviews["canonicalRevision"]) == ("reviews", "v1")
    assert (reviews["status"], reviews["clusterId"]) == ("Healthy", "Kubernetes")
    assert reviews["waypoint"] == {"destination": "/10.96.0.40"}  # istioctl keeps only the destination

    services = rows(run(istioctl, "service", *f, "-o", "short", tmp_path=tmp_path),
                    "NAMESPACE SERVICE NAME SERVICE VIP WAYPOINT ENDPOINTS")
    assert services == [
        ["bookinfo", "productpage", "10.96.0.10", "None", "1/1"],
        ["bookinfo", "ratings", "10.96.0.13", "None", "1/1"],
        ["bookinfo", "reviews", "10.96.0.12", "waypoint", "1/1"],
        ["bookinfo", "waypoint", "10.96.0.40", "None", "1/1"],
        ["legacy", "legacy-app", "10.96.0.30", "None", "1/1"],
    ]
    svc_json = json.loads(run(istioctl, "service", *f, "-o", "json", tmp_path=tmp_path))
    legacy = next(s for s in svc_json if s["name"] == "legacy-app")
    assert legacy["hostname"] == "legacy-app.legacy.svc.cluster.local" and legacy["vips"] == ["/10.96.0.30"]
    assert legacy["ports"] == {"80": 8080}
    assert legacy["endpoints"] == {"Kubernetes//Pod/legacy/legacy-app-1b2c3d": {
        "workloadUid": "Kubernetes//Pod/legacy/legacy-app-1b2c3d", "service": "", "port": {"80": 8080}}}

    policies = rows(run(istioctl, "policy", *f, "-o", "short", tmp_path=tmp_path),
                    "NAMESPACE POLICY NAME ACTION SCOPE")
    assert policies == [["bookinfo", "deny-legacy", "Deny", "Namespace"],
                        ["bookinfo", "ratings-from-reviews", "Allow", "WorkloadSelector"]]
    pol_json = {p["name"]: p
                for p in json.loads(run(istioctl, "policy", *f, "-o", "json", tmp_path=tmp_path))}
    assert pol_json["deny-legacy"]["rules"] == [[[{"sourceIps": ["10.244.1.30/32"],
                                                   "notDestinationPorts": [15021]}]]]
    assert pol_json["ratings-from-reviews"]["rules"] == [[[{"principals": [
        {"Exact": "cluster.local/ns/bookinfo/sa/bookinfo-reviews"}]}]]]


def test_istioctl_reads_certificates_and_states(istioctl: str, dump_file: Dumped, tmp_path: Path) -> None:
    _, dump, path = dump_file
    f = ("--file", str(path))

    table = run(istioctl, "certificate", *f, "-o", "short", tmp_path=tmp_path)
    certs = rows(table, "CERTIFICATE NAME TYPE STATUS VALID CERT SERIAL NUMBER NOT AFTER NOT BEFORE")
    now = datetime.now(UTC)
    by_identity: dict[str, list[list[str]]] = {}
    for row in certs:
        by_identity.setdefault(row[0], []).append(row[1:])
    assert sorted(by_identity) == [PRODUCTPAGE_ID, REVIEWS_ID]
    for identity, (leaf, root) in by_identity.items():
        [held] = [c for c in dump["certificates"] if c["identity"] == identity]
        assert leaf[:3] == ["Leaf", "Available", "true"] and root[:3] == ["Root", "Available", "true"]
        assert leaf[3] == format(int(held["certChain"][0]["serialNumber"]), "x")
        not_after, not_before = (datetime.fromisoformat(t) for t in leaf[4:6])
        assert not_before <= now < not_after
        assert datetime.fromisoformat(root[4]) > not_after  # the CA's root outlives the leaf
    cert_json = json.loads(run(istioctl, "certificate", *f, "-o", "json", tmp_path=tmp_path))
    assert cert_json == dump["certificates"]

    states = json.loads(run(istioctl, "connections", *f, "-o", "json", tmp_path=tmp_path))
    assert [(s["info"]["name"], s["state"]) for s in states] == [
        ("details-v1-5f4d58", "Pending"), ("productpage-v1-6f9c7d", "Up"), ("reviews-v1-7b8c4f", "Up")]
    assert states[1]["info"] == {"name": "productpage-v1-6f9c7d", "namespace": "bookinfo", "trustDomain": "",
                                 "serviceAccount": "bookinfo-productpage"}


def test_istioctl_all_prints_every_section(istioctl: str, dump_file: Dumped, tmp_path: Path) -> None:
    _, dump, path = dump_file
    f = ("--file", str(path))
    summary = run(istioctl, "all", *f, "-o", "short", "--with-headers", tmp_path=tmp_path)
    headers = re.findall(r"^------ (.*) ------$", summary, flags=re.M)
    assert headers == ["WORKLOAD INFO", "SERVICE INFO", "POLICY INFO", "SECRET INFO", "CONNECTIONS INFO"]
    assert rows(summary, "NAMESPACE POD NAME ADDRESS NODE WAYPOINT PROTOCOL")[3][1:] == [
        "reviews-v1-7b8c4f", "10.244.1.11", "node-a", "waypoint", "HBONE"]
    assert rows(summary, "NAMESPACE POLICY NAME ACTION SCOPE")[0] == ["bookinfo", "deny-legacy", "Deny",
                                                                       "Namespace"]
    assert json.loads(run(istioctl, "all", *f, "-o", "json", tmp_path=tmp_path)) == dump
    assert dump["workloadState"] and dump["config"]["node_name"] == "node-a"


OUTSIDE_IP = "127.0.77.4"  # an address outside the mesh: outbound passthrough
CONNECTIONS = "WORKLOAD DIRECTION LOCAL REMOTE REMOTE TARGET PROTOCOL"


class Held(msgspec.Struct, kw_only=True):
    """What the mesh dump held open, and the ports it ran on."""

    app_port: int
    outside_port: int
    hbone_port: int
    """The client app's port of its call to the service VIP (HBONE)."""
    passthrough_port: int
    plain_port: int
    """The client's port of its plaintext call into the server pod's 15006."""
    after: dict[str, Any]
    """The dump taken once all of them had closed."""


async def hold(sockets: PodSockets, original: Addr, listener: Addr) -> trio.SocketStream:
    """A connection from the client pod's address, as redirected from `original` to `listener`, with a
    round trip through it (so every proxy on the way has opened it), left open."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((CLIENT_IP, 0))
    sockets.original[sock.getsockname()[1]] = original
    stream = trio.SocketStream(trio.socket.from_stdlib_socket(sock))
    await stream.socket.connect(listener)
    await stream.send_all(b"held\n")
    got = b""
    while got.count(b"\n") < 2:  # the echo app's `<peer ip>` line, then our own
        got += await stream.receive_some(4096)
    assert got.endswith(b"held\n"), got
    return stream


async def mesh_dump(tmp_path: Path, fds: list[int]) -> tuple[dict[str, Any], Held]:
    """A ztunnel with the client and server pods of the named world on loopback addresses, dumped while an
    HBONE call to the service VIP, a passthrough call and a plaintext call into the server are open."""
    from services.istiod.testing import open_test_istiod

    skip_if_server_hbone_port_taken()
    sockets = PodSockets()
    sockets.ip_of.update({netns_id(fds[0]): CLIENT_IP, netns_id(fds[1]): SERVER_IP})
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app_port: int = await nursery.start(echo_app)
            outside_port: int = await nursery.start(echo_app, OUTSIDE_IP)
            world = named_world(app_port)
            async with open_test_istiod(world) as istiod:
                cfg = msgspec.structs.replace(config(tmp_path), xds_target=istiod.target(node=NODE),
                                              node_name=NODE)
                app: ZtunnelParts = await nursery.start(lambda **kw: run_ztunnel(cfg, sockets=sockets, **kw))
                snap = Snapshot()
                snap.entries += [entry(world, NAMED_CLIENT.name, fds[0]),
                                 entry(world, NAMED_SERVER.name, fds[1])]
                server = ZdsServer(cfg.inpod_uds, snap, accept_interval=0)
                nursery.start_soon(server.serve)
                await wait_until(lambda: len(app.manager.running) == 2 and len(app.store.services) == 1
                                 and len(app.store.workloads) == 2)
                assert app.mesh is not None
                while [c["state"] for c in app.mesh.certs.dump()] != ["Available", "Available"]:
                    await trio.sleep(0.05)
                outbound = sockets.ports[CLIENT_IP]["outbound"]
                held = [
                    await hold(sockets, (VIP, 80), (CLIENT_IP, outbound)),
                    await hold(sockets, (OUTSIDE_IP, outside_port), (CLIENT_IP, outbound)),
                    await hold(sockets, (SERVER_IP, app_port),
                               (SERVER_IP, sockets.ports[SERVER_IP]["inbound_plaintext"])),
                ]
                status, body = await http_get(app.addresses["admin"][0], "/config_dump")
                assert status == 200
                ports = [s.socket.getsockname()[1] for s in held]
                for stream in held:
                    await stream.aclose()
                pods = list(app.handler.pods.values())
                await wait_until(lambda: all(len(p.context.telemetry.open) == 0 for p in pods))
                status, after = await http_get(app.addresses["admin"][0], "/config_dump")
                assert status == 200
                nursery.cancel_scope.cancel()
    return json.loads(body), Held(app_port=app_port, outside_port=outside_port, hbone_port=ports[0],
                                  passthrough_port=ports[1], plain_port=ports[2], after=json.loads(after))


def test_istioctl_lists_the_connections_open_during_the_dump(istioctl: str, tmp_path: Path,
                                                            pipe_fds: list[int]) -> None:
    dump, held = trio.run(mesh_dump, tmp_path, pipe_fds)
    path = tmp_path / "mesh.json"
    path.write_text(json.dumps(dump, indent=2))
    f = ("--file", str(path))
    client, server = f"{NAMED_CLIENT.name}.mesh", f"{NAMED_SERVER.name}.mesh"
    outside = f"{OUTSIDE_IP}:{held.outside_port}"
    states = {s["info"]["name"]: s for s in json.loads(run(istioctl, "connections", *f, "-o", "json",
                                                           tmp_path=tmp_path))}
    assert sorted(states) == [NAMED_CLIENT.name, NAMED_SERVER.name]
    # The inbound HBONE connection comes from the client pod's pooled connection (its own port).
    [hbone_in, _] = states[NAMED_SERVER.name]["connections"]["inbound"]
    pool_host, _, pool_port = hbone_in["src"].rpartition(":")
    assert pool_host == CLIENT_IP and int(pool_port) not in (held.hbone_port, held.plain_port)
    assert states[NAMED_CLIENT.name]["connections"] == {"inbound": [], "outbound": [
        {"src": f"{CLIENT_IP}:{held.hbone_port}", "originalDst": f"{VIP}:80",
         "actualDst": f"{SERVER_IP}:15008", "protocol": "HBONE"},
        {"src": f"{CLIENT_IP}:{held.passthrough_port}", "originalDst": outside, "actualDst": outside,
         "protocol": "TCP"},
    ]}
    assert states[NAMED_SERVER.name]["connections"] == {"outbound": [], "inbound": [
        {"src": f"{CLIENT_IP}:{pool_port}", "originalDst": "web.mesh.svc.cluster.local",
         "actualDst": f"{SERVER_IP}:{held.app_port}", "protocol": "HBONE"},
        {"src": f"{CLIENT_IP}:{held.plain_port}", "originalDst": "",  # istioctl reads null as ""
         "actualDst": f"{SERVER_IP}:{held.app_port}", "protocol": "TCP"},
    ]}

    service = "web.mesh.svc.cluster.local"
    expected = [
        [client, "Outbound", f"{client}:{held.hbone_port}", f"{server}:15008", f"{service}:80", "HBONE"],
        [client, "Outbound", f"{client}:{held.passthrough_port}", outside, outside, "TCP"],
        [server, "Inbound", f"{server}:{held.app_port}", f"{client}:{pool_port}", service, "HBONE"],
        [server, "Inbound", f"{server}:{held.app_port}", f"{client}:{held.plain_port}", "TCP"],  # no target
    ]
    table = run(istioctl, "connections", *f, "-o", "short", tmp_path=tmp_path)
    assert rows(table, CONNECTIONS) == expected
    inbound = rows(run(istioctl, "connections", *f, "--direction", "inbound", tmp_path=tmp_path), CONNECTIONS)
    assert inbound == expected[2:]
    summary = run(istioctl, "all", *f, "-o", "short", "--with-headers", tmp_path=tmp_path)
    assert rows(summary, CONNECTIONS) == expected

    # Once they closed, the pods list none.
    after = tmp_path / "after.json"
    after.write_text(json.dumps(held.after))
    assert rows(run(istioctl, "connections", "--file", str(after), tmp_path=tmp_path), CONNECTIONS) == []
    assert [s["connections"] for s in held.after["workloadState"].values()] == [
        {"inbound": [], "outbound": []}] * 2
