"""HBONE across two lab nodes (root): the client pod on node-a reaches the web pod on node-b only through an
mTLS tunnel to web's 15008, the wire shows no plaintext, policies decide at the destination, and both
ztunnels log upstream's lines with SPIFFE identities.

The capture is an AF_PACKET socket opened inside node-a's namespace on its fabric uplink (eth0), so it sees
every frame between the nodes without any tool on the host. A plaintext request from a pod outside the mesh
is captured too, as the control that the capture would see the payload if it were there.
"""

from __future__ import annotations

import ipaddress
import json
import os
import socket
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ambient.lab import components, lab
from ambient.lab.probe import http_get
from shared.netns import entered, open_netns
from tests.access_logs import ParsedLine, parse_plain
from tests.netns.test_lab_mesh import WORLD
from tests.netns.test_lab_topology import client_get, running_lab

pytestmark = pytest.mark.skipif(
    not (components.available("node-agent") and components.available("ztunnel")),
    reason="needs the node agent and ztunnel processes",
)

CLIENT_IP = "10.244.1.10"
WEB_IP = "10.244.2.10"
OUTSIDER_IP = "10.244.1.20"
POD_RANGE = ipaddress.ip_network("10.244.0.0/16")
CLIENT_ID = "spiffe://cluster.local/ns/mesh/sa/client"
WEB_ID = "spiffe://cluster.local/ns/mesh/sa/web"

# upstream ztunnel's access-log field order; a line carries a subset of these, in this order
FIELD_ORDER = ["src.addr", "src.workload", "src.namespace", "src.identity", "src.cluster", "dst.addr",
               "dst.hbone_addr", "dst.service", "dst.workload", "dst.namespace", "dst.identity",
               "dst.cluster", "direction", "bytes_sent", "bytes_recv", "duration", "error"]

DENY_POLICY = f"""
name: deny-client
namespace: mesh
action: deny
selector: {{app: web}}
rules:
  - clauses: [{{matches: [{{principals: [{{exact: cluster.local/ns/mesh/sa/client}}]}}]}}]
  - clauses: [{{matches: [{{sourceIps: ["{OUTSIDER_IP}/32"]}}]}}]
"""


# --- the capture ----------------------------------------------------------------------------------------

ETH_P_ALL = 0x0003


@dataclass(frozen=True)
class Segment:
    """An IPv4 packet; ports and payload only for TCP (proto 6)."""

    src: str
    dst: str
    proto: int
    sport: int = 0
    dport: int = 0
    payload: bytes = b""


def parse_frame(frame: bytes) -> Segment | None:
    """An Ethernet frame's IPv4 packet (None for anything else, e.g. ARP)."""
    if len(frame) < 34 or frame[12:14] != b"\x08\x00":
        return None
    ip = frame[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    src, dst = socket.inet_ntoa(ip[12:16]), socket.inet_ntoa(ip[16:20])
    if ip[9] != socket.IPPROTO_TCP or len(ip) < ihl + 20:
        return Segment(src=src, dst=dst, proto=ip[9])
    tcp = ip[ihl:total]
    sport, dport = struct.unpack_from("!HH", tcp, 0)
    offset = (tcp[12] >> 4) * 4
    return Segment(src=src, dst=dst, proto=socket.IPPROTO_TCP, sport=sport, dport=dport,
                   payload=bytes(tcp[offset:]))


@dataclass
class Capture:
    """Frames on one interface of one namespace, read by a background thread until `stop()`."""

    sock: socket.socket
    frames: list[bytes] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.frames.append(self.sock.recv(262144))
            except TimeoutError:
                continue

    def stop(self) -> list[Segment]:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self.sock.close()
        return [s for s in map(parse_frame, self.frames) if s is not None]


@pytest.fixture
def capture_uplink() -> Iterator[Callable[[str], Capture]]:
    """capture(netns) -> a running capture of every frame on eth0 in that namespace."""
    made: list[Capture] = []

    def start(netns: str) -> Capture:
        fd = open_netns(netns)
        try:
            with entered(fd):  # the socket (and the interface name it binds) belong to the node's netns
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                sock.bind(("eth0", ETH_P_ALL))
        finally:
            os.close(fd)
        sock.settimeout(0.2)
        cap = Capture(sock)
        cap._thread = threading.Thread(target=cap._run, daemon=True)
        cap._thread.start()
        made.append(cap)
        return cap

    try:
        yield start
    finally:
        for cap in made:
            if not cap._stop.is_set():
                cap.stop()


def between_pods(segments: list[Segment]) -> list[Segment]:
    return [s for s in segments
            if ipaddress.ip_address(s.src) in POD_RANGE and ipaddress.ip_address(s.dst) in POD_RANGE]


def streams(segments: list[Segment]) -> dict[tuple[str, int, str, int], bytes]:
    """Payload bytes per direction of each TCP connection, in capture order (a marker split across two
    segments is still found)."""
    out: dict[tuple[str, int, str, int], bytes] = {}
    for s in segments:
        key = (s.src, s.sport, s.dst, s.dport)
        out[key] = out.get(key, b"") + s.payload
    return out


# --- the lab --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mesh_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_lab("h", WORLD, tmp_path_factory.mktemp("hbone")) as prefix:
        yield prefix


def access_lines(prefix: str, node: str, direction: str, *, since: int = 0) -> list[ParsedLine]:
    lines = [parse_plain(line) for line in lab.access_logs(prefix=prefix, node=node, direction=direction)]
    return [p for p in lines[since:] if p.message == "connection complete"]


def wait_lines(prefix: str, node: str, direction: str, predicate: Callable[[ParsedLine], bool], *,
               since: int = 0, timeout: float = 10.0) -> list[ParsedLine]:
    deadline = time.monotonic() + timeout
    while True:
        found = [p for p in access_lines(prefix, node, direction, since=since) if predicate(p)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.1)


def log_count(prefix: str, node: str, direction: str) -> int:
    return len(list(lab.access_logs(prefix=prefix, node=node, direction=direction)))


def in_field_order(line: ParsedLine) -> bool:
    keys = list(line.fields)
    return keys == [k for k in FIELD_ORDER if k in keys]


def post(prefix: str, url: str, body: str, pod: str = "client") -> tuple[int, dict[str, object] | None, str]:
    result = lab.exec_in_pod(["python", "-m", "services.apps.client", "-m", "5", "-d", body, url], pod=pod,
                             prefix=prefix, capture=True)
    parsed = json.loads(result.stdout) if result.returncode == 0 and result.stdout else None
    return result.returncode, parsed, result.stderr.decode()


def until(check: Callable[[], bool], timeout: float = 15.0) -> bool:
    """Poll `check` (the policy travels istiod -> xDS -> ztunnel) until it holds or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.3)
    return True


# --- tests ----------------------------------------------------------------------------------------------


def test_cross_node_traffic_is_hbone_only_and_never_plaintext(
        mesh_lab: str, capture_uplink: Callable[[str], Capture]) -> None:
    prefix = mesh_lab
    marker = f"plaintext-marker-{uuid.uuid4().hex}"
    out_before, in_before = log_count(prefix, "node-a", "outbound"), log_count(prefix, "node-b", "inbound")

    cap = capture_uplink(f"{prefix}-node-a")
    code, body, err = post(prefix, f"http://web/{marker}", marker)
    assert code == 0, err
    assert body is not None and body["path"] == f"/{marker}" and body["body"] == marker
    served = body["served_by"]
    assert isinstance(served, dict) and str(served["peer"]).startswith(f"{CLIENT_IP}:")  # the client pod's IP
    meshed = between_pods(cap.stop())
    print(f"captured {len(cap.frames)} frames on node-a's uplink, {len(meshed)} between pods:",
          sorted({(s.src, s.sport, s.dst, s.dport) for s in meshed}))

    # control: the same capture sees a plaintext request from outside the mesh, payload and all
    control = capture_uplink(f"{prefix}-node-a")
    code, _, err = post(prefix, f"http://{WEB_IP}:8080/{marker}", marker, pod="outsider")
    assert code == 0, err
    plain = between_pods(control.stop())
    assert any(marker.encode() in data for (src, _, dst, dport), data in streams(plain).items()
               if (src, dst, dport) == (OUTSIDER_IP, WEB_IP, 8080))

    # between pods, the node link carried TCP to or from web's 15008 and nothing else
    assert any({s.src, s.dst} == {CLIENT_IP, WEB_IP} for s in meshed), "no client <-> web frames captured"
    assert all(s.proto == socket.IPPROTO_TCP for s in meshed), sorted({s.proto for s in meshed})
    assert all(15008 in (s.sport, s.dport) for s in meshed), sorted({(s.sport, s.dport) for s in meshed})
    assert any(s.payload and (s.src, s.dst, s.dport) == (CLIENT_IP, WEB_IP, 15008) for s in meshed)
    to_web = [data for (src, _, dst, dport), data in streams(meshed).items() if (src, dst, dport) == (
        CLIENT_IP, WEB_IP, 15008)]
    assert any(b"\x17\x03\x03" in data for data in to_web)  # TLS application-data records
    assert not any(marker.encode() in data for data in streams(meshed).values())

    outbound = wait_lines(prefix, "node-a", "outbound", lambda p: p.fields.get("dst.service") is not None,
                          since=out_before)
    inbound = wait_lines(prefix, "node-b", "inbound", lambda p: "dst.hbone_addr" in p.fields, since=in_before)
    assert outbound and inbound, list(lab.access_logs(prefix=prefix))
    for line in (outbound[-1], inbound[-1]):
        assert line.level == "info" and line.target == "access" and in_field_order(line), line
        assert line.fields["src.identity"] == CLIENT_ID and line.fields["dst.identity"] == WEB_ID
        assert line.fields["src.workload"] == "client" and line.fields["dst.workload"] == "web"
        assert line.fields["src.namespace"] == "mesh" and line.fields["dst.namespace"] == "mesh"
        assert line.fields["dst.addr"] == f"{WEB_IP}:15008"
        assert line.fields["dst.hbone_addr"] == f"{WEB_IP}:8080"
        assert line.fields["dst.service"] == "web.mesh.svc.cluster.local"
        assert str(line.fields["src.addr"]).startswith(f"{CLIENT_IP}:")
        assert int(line.fields["bytes_sent"]) > len(marker) and int(line.fields["bytes_recv"]) > len(marker)
    assert outbound[-1].fields["direction"] == "outbound" and inbound[-1].fields["direction"] == "inbound"

    # the client's ztunnel shows the pod's certificate and its pooled connection to web
    status, raw = http_get(f"{prefix}-node-a", "127.0.0.1", components.ZTUNNEL_ADMIN_PORT, "/config_dump")
    assert status == 200
    dump = json.loads(raw)
    [cert] = [c for c in dump["certificates"] if c["identity"] == CLIENT_ID]
    assert cert["state"] == "Available" and cert["certChain"][0]["serialNumber"].isdigit()
    assert cert["certChain"][0]["expirationTime"].endswith("Z") and cert["rootCerts"]
    [pod] = [p for p in dump["pods"] if p["workload"]["name"] == "client"]
    assert pod["identity"] == CLIENT_ID
    assert [k["dst"] for k in pod["pool"]] == [f"{WEB_IP}:15008"] and pod["pool"][0]["connections"]


def test_deny_policy_refuses_with_401_and_both_ztunnels_say_so(mesh_lab: str, tmp_path: Path) -> None:
    prefix = mesh_lab
    policy = tmp_path / "deny.yaml"
    policy.write_text(DENY_POLICY)
    out_before, in_before = log_count(prefix, "node-a", "outbound"), log_count(prefix, "node-b", "inbound")
    result = lab.world_command(["policy", "add", str(policy)], prefix=prefix, capture=True)
    assert result.returncode == 0, result.stderr.decode()
    try:
        assert until(lambda: client_get(prefix, "http://web/denied")[0] != 0), "the policy never applied"
        denied = wait_lines(prefix, "node-a", "outbound", lambda p: p.level == "error", since=out_before)
        assert denied and denied[-1].fields["error"] == "http status: 401 Unauthorized", denied
        assert denied[-1].fields["dst.addr"] == f"{WEB_IP}:15008" and in_field_order(denied[-1])
        rejected = wait_lines(prefix, "node-b", "inbound", lambda p: "src.identity" in p.fields
                              and "policy rejection" in str(p.fields.get("error")), since=in_before)
        assert rejected, list(lab.access_logs(prefix=prefix, node="node-b"))
        line = rejected[-1]
        assert line.level == "error" and in_field_order(line)
        assert line.fields["error"] == ("connection closed due to policy rejection: explicitly denied by: "
                                        "mesh/deny-client")
        assert line.fields["src.identity"] == CLIENT_ID and line.fields["dst.hbone_addr"] == f"{WEB_IP}:8080"

        # plaintext inbound (15006) is decided by the same policies, without an identity
        code, _, _ = client_get(prefix, f"http://{WEB_IP}:8080/plain-denied", pod="outsider")
        assert code != 0
        plain = wait_lines(prefix, "node-b", "inbound",
                           lambda p: str(p.fields.get("src.addr", "")).startswith(f"{OUTSIDER_IP}:")
                           and "policy rejection" in str(p.fields.get("error")), since=in_before)
        assert plain and "src.identity" not in plain[-1].fields
    finally:
        result = lab.world_command(["policy", "rm", "mesh/deny-client"], prefix=prefix, capture=True)
    assert result.returncode == 0, result.stderr.decode()
    assert until(lambda: client_get(prefix, "http://web/allowed-again")[0] == 0), "the policy never went away"
