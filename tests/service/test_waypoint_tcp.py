"""The waypoint's opaque TCP tunnels (L4 policy, copy both ways), connect retries and failures over HTTP."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
import trio

from services.istiod.ca import CertificateAuthority
from services.waypoint.config import Backend, HttpRoute, PathMatch, RouteMatch, RouteRule, WaypointConfig
from services.ztunnel.hbone.errors import HttpStatusError
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    Match,
    PolicyKey,
    Rule,
    Scope,
    StringMatch,
)
from tests.service.test_hbone_helpers import FakeCerts
from tests.service.waypoint_lab import (
    NET,
    OPAQUE,
    TCP_PORT,
    WAYPOINT_WORKLOAD,
    FakePod,
    Lab,
    hostname,
    http_client,
    pod,
    running_waypoint,
    service,
)

ECHO_VIP, FLAKY_VIP, DEAD_VIP, EMPTY_VIP = "10.96.1.10", "10.96.1.20", "10.96.1.30", "10.96.1.40"
EMPTY = service("empty", EMPTY_VIP)  # no pods
ECHO = service("echo", ECHO_VIP, OPAQUE)
FLAKY = service("flaky", FLAKY_VIP)
DEAD = service("dead", DEAD_VIP)
ECHO_IP, FLAKY_LIVE_IP, FLAKY_DEAD_IP, DEAD_IP = NET + "21", NET + "22", NET + "23", NET + "24"


def world() -> StateStore:
    store = StateStore()
    store.apply_addresses([ECHO, FLAKY, DEAD, EMPTY, WAYPOINT_WORKLOAD, pod("echo-v1", ECHO_IP, [ECHO]),
                           pod("flaky-v1", FLAKY_LIVE_IP, [FLAKY]),
                           pod("flaky-v2", FLAKY_DEAD_IP, [FLAKY]),  # nothing listens there
                           pod("dead-v1", DEAD_IP, [DEAD])], [])
    return store


RETRY = HttpRoute(name="flaky", namespace="default", services=(hostname("flaky"),), rules=(
    RouteRule(matches=(RouteMatch(path=PathMatch(kind="prefix", value="/ghost")),),
              backends=(Backend(service=hostname("ghost")),)),  # a service xDS does not know
    RouteRule(matches=(RouteMatch(path=PathMatch(kind="exact", value="/slow")),),
              backends=(Backend(service=hostname("flaky")),), retries=5, timeout=0.3),
    RouteRule(backends=(Backend(service=hostname("flaky")),), retries=5)))


@pytest.fixture
async def lab(ca: CertificateAuthority, certs: FakeCerts) -> AsyncIterator[Lab]:
    fakes = [FakePod("echo-v1", ECHO_IP), FakePod("flaky-v1", FLAKY_LIVE_IP)]
    async with running_waypoint(ca, certs, world(), fakes, WaypointConfig(routes=(RETRY,))) as running:
        yield running


async def test_opaque_tcp_is_copied_both_ways_with_half_close(lab: Lab,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    payload = b"not http at all\r\n" * 10_000
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            stream = await conn.open_stream((ECHO_VIP, TCP_PORT), forwarded_for=("10.0.0.9", 1))
            received = bytearray()

            async def send() -> None:
                await stream.send_all(payload)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                while data := await stream.receive_some():
                    received += data
            await stream.aclose()
            while not [r for r in caplog.records if r.getMessage() == "connection complete"]:
                await trio.sleep(0.01)
    assert bytes(received) == payload
    [line] = [dict(r.fields) for r in caplog.records if r.getMessage() == "connection complete"]  # type: ignore[attr-defined]
    assert line["dst.addr"] == f"{ECHO_IP}:{TCP_PORT}" and line["dst.hbone_addr"] == f"{ECHO_VIP}:{TCP_PORT}"
    assert line["bytes_sent"] == len(payload) and line["bytes_recv"] == len(payload)
    opened = lab.telemetry.metrics.opened
    labels = dict(zip(opened.labelnames, next(iter(opened.children)), strict=True))
    assert labels["reporter"] == "waypoint" and labels["destination_workload"] == "echo-v1"


async def test_opaque_tcp_obeys_l4_policy_on_the_waypoint(lab: Lab) -> None:
    deny_productpage = Authorization(
        name="no-productpage", namespace="default", scope=Scope.NAMESPACE, action=Action.DENY,
        rules=(Rule(clauses=(Clause(matches=(Match(principals=(
            StringMatch(kind="exact", value="cluster.local/ns/default/sa/bookinfo-productpage"),)),)),)),))
    lab.store.apply_authorizations([deny_productpage], [])
    with trio.fail_after(30):
        async with lab.connection() as conn:
            with pytest.raises(HttpStatusError) as info:
                await conn.open_stream((ECHO_VIP, TCP_PORT), forwarded_for=("10.0.0.9", 1))
            assert info.value.status == 401
            lab.store.apply_authorizations([], [PolicyKey("default/no-productpage")])
            stream = await conn.open_stream((ECHO_VIP, TCP_PORT), forwarded_for=("10.0.0.9", 1))
            await stream.send_all(b"ping")
            assert await stream.receive_some() == b"ping"
            await stream.aclose()


async def test_connect_failures_are_retried_on_another_endpoint(lab: Lab) -> None:
    with trio.fail_after(60):
        async with lab.connection() as conn:
            client = await http_client(conn, FLAKY_VIP, "flaky:9080")
            answers = [await client.request("GET", f"/{i}") for i in range(12)]
    assert {status for status, _ in answers} == {200}  # one of two endpoints is down: retries hide it
    assert len(lab.pods["flaky-v1"].requests) == 12


async def test_no_reachable_endpoint_is_503_and_the_tunnel_goes_on(lab: Lab,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            client = await http_client(conn, DEAD_VIP, "dead:9080")
            status, body = await client.request("GET", "/x")
            again = await client.request("GET", "/y")
    assert status == 503 and body.startswith(b"upstream connect error or disconnect/reset before headers")
    assert again[0] == 503
    flags = [dict(r.fields)["response_flags"] for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "request complete"]
    assert flags == ["UF", "UF"]


async def test_no_endpoint_and_unknown_backend_are_503_with_envoys_flags(
        lab: Lab, caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            empty = await http_client(conn, EMPTY_VIP, "empty:9080")
            assert await empty.request("GET", "/") == (503, b"no healthy upstream")
            flaky = await http_client(conn, FLAKY_VIP, "flaky:9080")
            assert await flaky.request("GET", "/ghost/1") == (503, b"no healthy upstream")
    flags = [(dict(r.fields)["response_flags"], dict(r.fields).get("route_name"))  # type: ignore[attr-defined]
             for r in caplog.records if r.getMessage() == "request complete"]
    assert flags == [("UH", None), ("NC", "default/flaky")]


async def test_route_timeout_is_504_and_the_tunnel_goes_on(lab: Lab,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(30), caplog.at_level(logging.INFO, logger="access"):
        async with lab.connection() as conn:
            client = await http_client(conn, FLAKY_VIP, "flaky:9080")
            assert await client.request("GET", "/slow") == (504, b"upstream request timeout")
            assert (await client.request("GET", "/after"))[0] == 200
    flags = [dict(r.fields)["response_flags"] for r in caplog.records  # type: ignore[attr-defined]
             if r.getMessage() == "request complete"]
    assert flags == ["UT", "-"]
