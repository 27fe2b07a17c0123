"""The waypoint over real loopback HBONE: a client's tunnel through it to backend pods' HBONE servers.

Routing by weight and by path (keep-alive and pipelined requests, each routed on its own), the L7 deny
(403 `RBAC: access denied`, the tunnel going on), malformed HTTP (400, the HBONE connection still usable),
targets the waypoint does not serve (400), connect retries, the access log line and the request metrics.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import AsyncIterator

import pytest
import trio

from services.istiod.ca import CertificateAuthority
from services.waypoint.config import (
    Backend,
    HttpRoute,
    L7Policy,
    L7Rule,
    Operation,
    PathMatch,
    RouteMatch,
    RouteRule,
    Source,
    WaypointConfig,
    istio_matches,
)
from services.ztunnel.hbone.errors import HttpStatusError
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Action
from tests.service.test_hbone_helpers import FakeCerts
from tests.service.waypoint_lab import (
    CLIENT_ID,
    HTTP_PORT,
    NET,
    WAYPOINT_WORKLOAD,
    FakePod,
    Lab,
    hostname,
    http_client,
    pod,
    running_waypoint,
    service,
)

REVIEWS_VIP, V1_VIP, V2_VIP, DETAILS_VIP, OTHER_VIP = "10.96.0.20", "10.96.0.21", "10.96.0.22", \
    "10.96.0.30", "10.96.0.40"
REVIEWS = service("reviews", REVIEWS_VIP)
REVIEWS_V1 = service("reviews-v1", V1_VIP)
REVIEWS_V2 = service("reviews-v2", V2_VIP)
DETAILS = service("details", DETAILS_VIP)
OTHER = service("other", OTHER_VIP, waypoint=False)
PODS = {
    "reviews-v1": (NET + "11", [REVIEWS, REVIEWS_V1]),
    "reviews-v2": (NET + "12", [REVIEWS, REVIEWS_V2]),
    "details-v1": (NET + "13", [DETAILS]),
    "other-v1": (NET + "14", [OTHER]),
}


def world() -> StateStore:
    store = StateStore()
    workloads = [pod(name, ip, services) for name, (ip, services) in PODS.items()]
    store.apply_addresses([REVIEWS, REVIEWS_V1, REVIEWS_V2, DETAILS, OTHER, WAYPOINT_WORKLOAD, *workloads],
                          [])
    return store


def fakes() -> list[FakePod]:
    return [FakePod(name=name, ip=ip) for name, (ip, _) in PODS.items()]


SPLIT = HttpRoute(name="reviews-split", namespace="default", services=(hostname("reviews"),), rules=(
    RouteRule(matches=(RouteMatch(path=PathMatch(kind="prefix", value="/v2")),),
              backends=(Backend(service=hostname("reviews-v2")),)),
    RouteRule(backends=(Backend(service=hostname("reviews-v1"), weight=90),
                        Backend(service=hostname("reviews-v2"), weight=10))),
))
GET_DETAILS_ONLY = L7Policy(
    name="productpage-get-details", namespace="default", action=Action.ALLOW,
    target_services=(hostname("details"),),
    rules=(L7Rule(
        sources=(Source(principals=istio_matches(["cluster.local/ns/default/sa/bookinfo-productpage"])),),
        operations=(Operation(methods=istio_matches(["GET"]), paths=istio_matches(["/details/*"])),)),))


@pytest.fixture
async def lab(ca: CertificateAuthority, certs: FakeCerts) -> AsyncIterator[Lab]:
    config = WaypointConfig(routes=(SPLIT,), policies=(GET_DETAILS_ONLY,))
    async with running_waypoint(ca, certs, world(), fakes(), config) as running:
        yield running


def backend(body: bytes) -> str:
    return body.decode().split()[0]


async def test_weighted_split_balances_each_keep_alive_request(lab: Lab) -> None:
    with trio.fail_after(60):
        async with lab.connection() as conn:
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            answers = [await client.request("GET", f"/reviews/{i}") for i in range(60)]
    assert {status for status, _ in answers} == {200}
    counts = collections.Counter(backend(body) for _, body in answers)
    assert set(counts) == {"reviews-v1", "reviews-v2"}  # one tunnel, both backends: balanced per request
    assert counts["reviews-v1"] > counts["reviews-v2"]
    assert len(lab.pods["reviews-v1"].requests) == counts["reviews-v1"]
    first = lab.pods["reviews-v1"].requests[0]
    assert first.headers["host"] == "reviews:9080" and first.headers.get("x-request-id")


async def test_pipelined_requests_are_routed_one_by_one(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            answers = await client.pipeline(["/v2/a", "/v2/b", "/v2/c"])
            posted = await client.request("POST", "/v2/post", body=b"hello")
    assert posted == (200, b"reviews-v2 POST /v2/post 5")
    assert [(s, b.decode()) for s, b in answers] == [
        (200, "reviews-v2 GET /v2/a 0"), (200, "reviews-v2 GET /v2/b 0"), (200, "reviews-v2 GET /v2/c 0")]


async def test_l7_deny_is_403_rbac_access_denied_and_the_tunnel_goes_on(
        lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            client = await http_client(conn, DETAILS_VIP, "details:9080")
            denied = await client.request("POST", "/details/1", body=b"x" * 1000)
            other_path = await client.request("GET", "/ratings/1")
            allowed = await client.request("GET", "/details/1")
    assert denied == (403, b"RBAC: access denied")
    assert other_path == (403, b"RBAC: access denied")
    assert allowed == (200, b"details-v1 GET /details/1 0")
    assert [r.method for r in lab.pods["details-v1"].requests] == ["GET"]  # the denied never reached it
    lines = [dict(r.fields) for r in caplog.records if r.getMessage() == "request complete"]  # type: ignore[attr-defined]
    assert [(f["method"], f["path"], f["response_code"]) for f in lines] == [
        ("POST", "/details/1", 403), ("GET", "/ratings/1", 403), ("GET", "/details/1", 200)]
    ok = lines[2]
    assert ok["src.identity"] == CLIENT_ID.uri and ok["authority"] == "details:9080"
    assert ok["upstream_host"] == f"{NET}13:{HTTP_PORT}" and ok["dst.service"] == hostname("details")
    assert ok["dst.identity"] == "spiffe://cluster.local/ns/default/sa/details-v1"
    assert ok["bytes_sent"] == len(b"details-v1 GET /details/1 0")
    assert lines[0]["bytes_received"] == 1000
    requests = lab.telemetry.metrics.requests
    by_code = collections.Counter({dict(zip(requests.labelnames, key, strict=True))["response_code"]: c.value
                                   for key, c in requests.children.items()})
    assert by_code == {"403": 2, "200": 1}
    labels = dict(zip(requests.labelnames, next(iter(requests.children)), strict=True))
    assert labels["reporter"] == "waypoint" and labels["request_protocol"] == "http"
    assert labels["source_principal"] == CLIENT_ID.uri


async def test_malformed_request_is_400_and_the_hbone_connection_still_serves(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            bad = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            await bad.send_all(b"THIS IS NOT HTTP\r\n\r\n")
            reply = bytearray()
            while data := await bad.receive_some():
                reply += data
            assert reply.startswith(b"HTTP/1.1 400 ")
            huge = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            await huge.send_all(b"GET / HTTP/1.1\r\nhost: reviews\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n")
            reply = bytearray()
            while data := await huge.receive_some():
                reply += data
            assert reply.startswith(b"HTTP/1.1 431 ")
            good = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            status, body = await good.request("GET", "/v2/after")
    assert (status, body) == (200, b"reviews-v2 GET /v2/after 0")


async def test_targets_it_does_not_serve_are_refused(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            for target in [(OTHER_VIP, HTTP_PORT),  # a service without this waypoint
                           (REVIEWS_VIP, 1234),  # not a port of the service
                           ("10.99.0.1", HTTP_PORT),  # nothing xDS knows
                           (NET + "11", HTTP_PORT)]:  # a workload that does not use this waypoint
                with pytest.raises(HttpStatusError) as info:
                    await conn.open_stream(target, forwarded_for=("10.0.0.9", 1))
                assert info.value.status == 400
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            assert (await client.request("GET", "/v2/x"))[0] == 200


async def test_large_response_streams_back_whole(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            status, body = await client.request("GET", "/big")
    assert status == 200 and body == b"x" * 300_000


async def test_drain_serves_the_open_tunnel_then_goaway(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            lab.draining.set()
            assert (await client.request("GET", "/v2/during"))[0] == 200  # the open tunnel goes on
            assert not lab.stopped.is_set()
            await client.stream.aclose()
            await conn.wait_closed()  # the GOAWAY came once the tunnel ended
        await lab.stopped.wait()


async def test_an_http_tunnel_also_ends_in_its_l4_line(lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    def tunnel_lines() -> list[dict[str, object]]:
        return [dict(r.fields) for r in caplog.records  # type: ignore[attr-defined]
                if r.getMessage() == "connection complete"]

    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            assert (await client.request("GET", "/v2/x"))[0] == 200
            await client.stream.aclose()
            while not tunnel_lines():
                await trio.sleep(0.01)
    [line] = tunnel_lines()
    assert line["dst.hbone_addr"] == f"{REVIEWS_VIP}:{HTTP_PORT}" and line["dst.workload"] == "waypoint-0"
    assert line["dst.service"] == hostname("reviews") and line["src.identity"] == CLIENT_ID.uri
    assert isinstance(line["bytes_recv"], int) and line["bytes_recv"] > len(b"reviews-v2 GET /v2/x 0")


async def test_http10_and_connection_close_end_the_tunnel_after_the_answer(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            for request in (b"GET /v2/old HTTP/1.0\r\nhost: reviews\r\n\r\n",
                            b"GET /v2/close HTTP/1.1\r\nhost: reviews\r\nconnection: close\r\n\r\n"):
                stream = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
                await stream.send_all(request)
                reply = bytearray()
                while data := await stream.receive_some():  # ends: the waypoint closed its side
                    reply += data
                assert reply.startswith(b"HTTP/1.1 200 ") and reply.endswith(b" 0"), bytes(reply)
                await stream.aclose()


async def test_expect_100_continue_is_answered_by_the_waypoint(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            stream = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            await stream.send_all(b"POST /v2/up HTTP/1.1\r\nhost: reviews\r\ncontent-length: 5\r\n"
                                  b"expect: 100-continue\r\n\r\n")
            interim = await stream.receive_some()  # the client waits for it before its body
            assert interim.startswith(b"HTTP/1.1 100 ")
            await stream.send_all(b"hello")
            reply = bytearray()
            while not reply.endswith(b"reviews-v2 POST /v2/up 5"):
                data = await stream.receive_some()
                assert data, bytes(reply)
                reply += data
            await stream.aclose()
    assert "expect" not in lab.pods["reviews-v2"].requests[-1].headers
