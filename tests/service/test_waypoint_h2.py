"""HTTP/2 with prior knowledge inside a waypoint tunnel: concurrent requests on one h2 connection, each
decided and routed on its own (403 for the denied one, weighted backends), a request body, and a protocol
error that ends only that tunnel."""

from __future__ import annotations

import collections
from collections.abc import AsyncIterator

import h2.config
import h2.connection
import h2.events
import msgspec
import pytest
import trio

from services.istiod.ca import CertificateAuthority
from services.waypoint.config import WaypointConfig
from services.ztunnel.hbone.stream import HboneStream
from tests.service.test_hbone_helpers import FakeCerts
from tests.service.test_waypoint_http import DETAILS_VIP, GET_DETAILS_ONLY, REVIEWS_VIP, SPLIT, fakes, world
from tests.service.waypoint_lab import HTTP_PORT, Lab, http_client, running_waypoint

# Concurrent streams draw from the seeded RNG in whatever order they are scheduled, so the split here is
# even: 30 draws all landing on one side has odds of 2 in 2**30 (90/10 would be 4 in 100).
_EVEN = tuple(msgspec.structs.replace(b, weight=50) for b in SPLIT.rules[1].backends)
EVEN_SPLIT = msgspec.structs.replace(
    SPLIT, rules=(SPLIT.rules[0], msgspec.structs.replace(SPLIT.rules[1], backends=_EVEN))
)


@pytest.fixture
async def lab(ca: CertificateAuthority, certs: FakeCerts) -> AsyncIterator[Lab]:
    config = WaypointConfig(routes=(EVEN_SPLIT,), policies=(GET_DETAILS_ONLY,))
    async with running_waypoint(ca, certs, world(), fakes(), config) as running:
        yield running


async def h2_exchange(stream: HboneStream, requests: list[tuple[str, str, str, bytes]]
                      ) -> dict[int, tuple[int, bytes]]:
    """Send every request at once on one h2 connection; (status, body) per stream id (1, 3, 5, ...)."""
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    pending: dict[int, bytes] = {}
    for i, (method, path, authority, body) in enumerate(requests):
        sid = 1 + 2 * i
        conn.send_headers(sid, [(b":method", method.encode()), (b":path", path.encode()),
                                (b":scheme", b"http"), (b":authority", authority.encode())],
                          end_stream=not body)
        if body:
            pending[sid] = body

    def pump() -> None:  # what the flow-control windows let through now
        for sid, rest in list(pending.items()):
            while rest and (room := min(conn.local_flow_control_window(sid), conn.max_outbound_frame_size)):
                conn.send_data(sid, rest[:room], end_stream=len(rest) <= room)
                rest = rest[room:]
            pending[sid] = rest
            if not rest:
                del pending[sid]

    pump()
    await stream.send_all(conn.data_to_send())
    status: dict[int, int] = {}
    bodies: dict[int, bytearray] = collections.defaultdict(bytearray)
    done: set[int] = set()
    while len(done) < len(requests):
        data = await stream.receive_some()
        assert data, "the waypoint ended the tunnel before every answer"
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                status[event.stream_id] = int(dict(event.headers)[b":status"])
            elif isinstance(event, h2.events.DataReceived):
                bodies[event.stream_id] += event.data
                conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif isinstance(event, h2.events.StreamEnded):
                done.add(event.stream_id)
        pump()
        if out := conn.data_to_send():
            await stream.send_all(out)
    return {sid: (status[sid], bytes(bodies[sid])) for sid in done}


async def test_concurrent_h2_requests_are_each_decided_and_routed(lab: Lab) -> None:
    with trio.fail_after(60):
        async with lab.connection() as conn:
            reviews = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            answers = await h2_exchange(reviews, [("GET", f"/r/{i}", "reviews:9080", b"") for i in range(30)]
                                        + [("POST", "/v2/body", "reviews:9080", b"y" * 60_000)])
            details = await conn.open_stream((DETAILS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            decided = await h2_exchange(details, [("GET", "/details/1", "details:9080", b""),
                                                  ("DELETE", "/details/1", "details:9080", b"")])
    assert {status for status, _ in answers.values()} == {200}
    served = collections.Counter(body.split()[0] for sid, (_, body) in answers.items() if sid != 61)
    assert set(served) == {b"reviews-v1", b"reviews-v2"}, served  # one h2 connection, balanced per request
    assert answers[61] == (200, b"reviews-v2 POST /v2/body 60000")
    assert decided == {1: (200, b"details-v1 GET /details/1 0"), 3: (403, b"RBAC: access denied")}
    host = lab.pods["reviews-v2"].requests[0].headers["host"]
    assert host == "reviews:9080"  # :authority became the HTTP/1.1 Host


async def test_an_h2_protocol_error_ends_only_its_tunnel(lab: Lab) -> None:
    with trio.fail_after(30):
        async with lab.connection() as conn:
            bad = await conn.open_stream((REVIEWS_VIP, HTTP_PORT), forwarded_for=("10.0.0.9", 1))
            garbage = b"\x00\x00\x04\x09\x00\x00\x00\x00\x00junk"  # CONTINUATION with no HEADERS
            await bad.send_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + garbage)
            received = bytearray()
            while data := await bad.receive_some():
                received += data
            assert b"\x07" in received[:200]  # a GOAWAY frame (type 7) among h2's answer
            client = await http_client(conn, REVIEWS_VIP, "reviews:9080")
            assert (await client.request("GET", "/v2/after"))[0] == 200
