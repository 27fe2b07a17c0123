"""The bookinfo lab with its waypoint (root): the waypoint's pod is not captured and is listed with its
program; meshed clients' ztunnels send bookinfo's service traffic to the waypoint with the service VIP as
HBONE target (the seed article's outbound line); a meshed pod that goes around the waypoint straight to
details' pod is refused by details' ztunnel, naming the policy that requires the waypoint.

The flows through a running waypoint (L7 deny, weighted split) need the waypoint program
(services/waypoint/) and are skipped without it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.lab import components, lab
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, needs_mesh, running_lab

A, B = f"10.244.{NET_A}.", f"10.244.{NET_B}."
WORLD = (Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml").read_text().replace(
    "10.244.1.", A).replace("10.244.2.", B)
DETAILS_POD, WAYPOINT_POD = f"{B}10", f"{B}40"
PRODUCTPAGE_VIP = "10.96.0.10"

pytestmark = needs_mesh
needs_waypoint = pytest.mark.skipif(not components.available("waypoint"),
                                    reason="needs the waypoint program (services/waypoint/)")


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_lab("zw", WORLD, tmp_path_factory.mktemp("waypoint")) as name:
        yield name


def access_lines(prefix: str, node: str, direction: str, *needles: str, timeout: float = 5.0) -> list[str]:
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in lab.access_logs(prefix=prefix, node=node, direction=direction)
                 if "connection complete" in line and all(n in line for n in needles)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


def test_the_waypoint_pod_is_not_captured_and_runs_the_waypoint(prefix: str) -> None:
    data = lab.status(prefix=prefix)
    pods = {p["name"]: p for p in data["pods"]}
    wp = pods["waypoint-7c8d9e"]
    assert (wp["ip"], wp["program"], wp["ambient"]) == (WAYPOINT_POD, "waypoint", False)
    assert wp["redirection"] is None
    assert pods["details-v1-5f4d58"]["enrolment"] == "enabled"
    names = {c["name"]: c for c in data["components"]}
    if components.available("waypoint"):
        assert names["waypoint/bookinfo/waypoint-7c8d9e"]["running"]
    else:
        assert "waypoint/bookinfo/waypoint-7c8d9e" not in names


def test_going_around_the_waypoint_is_refused_at_the_destination(prefix: str) -> None:
    # sleep dials details' pod IP: its ztunnel opens HBONE straight to details (a `for: service` waypoint
    # takes only service traffic), and details' ztunnel admits only the waypoint's identity.
    code, _, err = client_get(prefix, f"http://{DETAILS_POD}:9080/details/0", pod="sleep")
    assert code != 0, f"details answered a client that went around the waypoint: {err}"
    [line, *_] = access_lines(prefix, "node-b", "inbound", "explicitly denied by: "
                              "bookinfo/require_waypoint_bookinfo_waypoint") or [""]
    assert 'src.identity="spiffe://cluster.local/ns/sleep/sa/sleep"' in line, line
    assert f"dst.hbone_addr={DETAILS_POD}:9080" in line, line


def test_service_traffic_goes_to_the_waypoint_with_the_vip_as_target(prefix: str) -> None:
    client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
    lines = access_lines(prefix, "node-a", "outbound", 'src.identity="spiffe://cluster.local/ns/sleep/sa/sleep"',
                         f"dst.hbone_addr={PRODUCTPAGE_VIP}:9080")
    assert lines, "no outbound line from sleep to productpage's VIP"
    line = lines[-1]
    assert f"dst.addr={WAYPOINT_POD}:15008" in line, line
    assert 'dst.workload="waypoint-7c8d9e"' in line, line
    assert 'dst.identity="spiffe://cluster.local/ns/bookinfo/sa/waypoint"' in line, line
    assert 'dst.service="productpage.bookinfo.svc.cluster.local"' in line, line


@needs_waypoint
def test_through_the_waypoint_the_page_is_served(prefix: str) -> None:
    code, body, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
    assert code == 0 and body is not None, err
    # details' ztunnel saw the waypoint as the source of productpage's call
    lines = access_lines(prefix, "node-b", "inbound", f"dst.hbone_addr={DETAILS_POD}:9080",
                         'src.identity="spiffe://cluster.local/ns/bookinfo/sa/waypoint"')
    assert lines and "error=" not in lines[-1], lines
