"""The bookinfo lab with its waypoint (root): the waypoint's pod is not captured and is listed with its
program; meshed clients' ztunnels send bookinfo's service traffic to the waypoint with the service VIP as
HBONE target (the seed article's outbound line); a meshed pod that goes around the waypoint straight to
details' pod is refused by details' ztunnel, naming the policy that requires the waypoint.

With AMBIENT_UPSTREAM_ZTUNNEL set, everything runs a second time with upstream's ztunnel on node-b (details'
and the waypoint's node), which gets the same policies from the stub.

Through the running waypoint (skipped without services/waypoint/): the page is served with details'
ztunnel seeing the waypoint as the source; the L7 policy lets productpage GET /details/* and answers
anyone else 403 with the waypoint's request line; the reviews route splits requests over v1 and v2.
"""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.lab import components, lab
from ambient.lab.components import LabPaths
from ambient.lab.state import stop_process
from ambient.lab.upstream import UPSTREAM_ENV
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, needs_mesh, running_lab

A, B = f"10.244.{NET_A}.", f"10.244.{NET_B}."
WORLD = (Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml").read_text().replace(
    "10.244.1.", A).replace("10.244.2.", B)
DETAILS_POD, WAYPOINT_POD = f"{B}10", f"{B}40"
PRODUCTPAGE_VIP = "10.96.0.10"

pytestmark = needs_mesh
needs_waypoint = pytest.mark.skipif(not components.available("waypoint"),
                                    reason="needs the waypoint program (services/waypoint/)")


UPSTREAM_BIN = os.environ.get(UPSTREAM_ENV, "")


@pytest.fixture(scope="module", params=["ours", "upstream-node-b"])
def prefix(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The lab with our ztunnels, and again with upstream's on node-b (details' node) when
    AMBIENT_UPSTREAM_ZTUNNEL names one: the destination side holds for both."""
    options: dict[str, Any] = {}
    if request.param == "upstream-node-b":
        if not UPSTREAM_BIN:
            pytest.skip(f"{UPSTREAM_ENV} is not set: no upstream ztunnel for node-b")
        options = {"ztunnel_bin": UPSTREAM_BIN, "upstream_on": ["node-b"]}
    with running_lab("zw", WORLD, tmp_path_factory.mktemp("waypoint"), **options) as name:
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


def waypoint_lines(prefix: str, *needles: str, timeout: float = 5.0) -> list[str]:
    log = LabPaths(lab.require_state(prefix).run_dir).log("waypoint/bookinfo/waypoint-7c8d9e")
    deadline = time.monotonic() + timeout
    while True:
        lines = [line for line in log.read_text().splitlines()
                 if "request complete" in line and all(n in line for n in needles)]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.1)


@needs_waypoint
def test_the_l7_policy_lets_only_productpage_get_details(prefix: str) -> None:
    code, body, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
    assert code == 0 and body is not None, err
    assert body["details"]["served_by"]["pod"] == "details-v1-5f4d58", body["details"]
    assert waypoint_lines(prefix, 'src.identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"',
                          'dst.service="details.bookinfo.svc.cluster.local"', 'method="GET"',
                          "response_code=200")
    # sleep is not productpage: the waypoint answers 403 as Envoy's RBAC filter does
    argv = ["python", "-m", "services.apps.client", "-m", "5", "-i", "http://details.bookinfo:9080/details/0"]
    result = lab.exec_in_pod(argv, pod="sleep", prefix=prefix, capture=True)
    out = result.stdout.decode()
    assert " 403 " in out.splitlines()[0] and "RBAC: access denied" in out, out
    lines = waypoint_lines(prefix, 'src.identity="spiffe://cluster.local/ns/sleep/sa/sleep"',
                           'path="/details/0"', "response_code=403")
    assert lines, "no waypoint request line for the denied request"


SPLIT = """
import http.client, json, sys
conn = http.client.HTTPConnection("reviews.bookinfo", 9080, timeout=10)
pods = []
for _ in range(int(sys.argv[1])):
    conn.request("GET", "/reviews/0")
    pods.append(json.loads(conn.getresponse().read())["served_by"]["pod"])
print(json.dumps(pods))
"""


@needs_waypoint
def test_the_route_splits_reviews_over_v1_and_v2(prefix: str) -> None:
    n = 100
    result = lab.exec_in_pod(["python", "-c", SPLIT, str(n)], pod="sleep", prefix=prefix, capture=True)
    assert result.returncode == 0, result.stderr.decode()
    split = Counter(json.loads(result.stdout))
    print(f"reviews split over {n} requests on one keep-alive connection: {dict(split)}")
    assert set(split) <= {"reviews-v1-7b8c4f", "reviews-v2-6d7e9a"} and sum(split.values()) == n
    # 90/10: v2 gets a few, v1 most (P(v2 = 0) = 0.9^100 ~ 3e-5; P(v2 >= 50) is far smaller)
    assert 0 < split["reviews-v2-6d7e9a"] < split["reviews-v1-7b8c4f"], split


@needs_waypoint
def test_a_restarted_waypoint_serves_again(prefix: str) -> None:
    [name] = lab.restart("waypoint", prefix=prefix)
    assert name == "waypoint/bookinfo/waypoint-7c8d9e"
    code, body, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
    assert code == 0 and body is not None, err


@needs_waypoint
def test_a_waypoint_that_is_down_fails_closed(prefix: str) -> None:
    """With the waypoint stopped, service traffic is refused, never sent around it to the destination; the
    client's ztunnel logs the failed connection to the waypoint. Restarted, it serves again."""
    state = lab.require_state(prefix)
    [record] = [r for r in state.processes if r.spec.component == "waypoint"]
    sleep_id = 'src.identity="spiffe://cluster.local/ns/sleep/sa/sleep"'
    before = set(access_lines(prefix, "node-a", "inbound", sleep_id, timeout=0))
    stop_process(record)
    try:
        code, body, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
        assert code != 0 and body is None, f"a request reached productpage with its waypoint down: {body}"
        lines = access_lines(prefix, "node-a", "outbound", sleep_id, f"dst.addr={WAYPOINT_POD}:15008",
                             f"dst.hbone_addr={PRODUCTPAGE_VIP}:9080", "error=")
        assert lines, f"no outbound line naming the waypoint and an error: {err}"
        # productpage (node-a) saw no connection from sleep: nothing went around the waypoint
        assert set(access_lines(prefix, "node-a", "inbound", sleep_id, timeout=0)) == before
    finally:
        lab.restart("waypoint", prefix=prefix)
    code, body, err = client_get(prefix, "http://productpage.bookinfo:9080/productpage", pod="sleep")
    assert code == 0 and body is not None, err
