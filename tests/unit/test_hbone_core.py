"""HBONE client and server cores back to back, no event loop: bytes from one are fed to the other."""

from __future__ import annotations

import h2.config
import h2.connection
import h2.events
import hyperframe.frame
import pytest

from services.ztunnel.hbone.core import (
    CLOSED_STREAMS_REMEMBERED,
    CONNECTION_WINDOW,
    MAX_FRAME_SIZE,
    STREAM_WINDOW,
    ClientCore,
    ConnectRequested,
    DataReceived,
    Event,
    Responded,
    ServerCore,
    StreamEnded,
    StreamRejected,
    StreamReset,
    WindowOpened,
    parse_authority,
)
from services.ztunnel.hbone.errors import HboneProtocolError
from services.ztunnel.proxy.inbound import forwarded_host
from shared.addr import format_host_port

TRACEPARENT = "00-" + "a" * 32 + "-" + "b" * 16 + "-00"


def exchange(client: ClientCore, server: ServerCore) -> tuple[list[Event], list[Event]]:
    """Move bytes both ways until both are quiet; returns (client events, server events)."""
    c_events: list[Event] = []
    s_events: list[Event] = []
    while True:
        to_server = client.data_to_send()
        to_client = server.data_to_send()
        if not to_server and not to_client:
            return c_events, s_events
        if to_server:
            s_events += server.receive_data(to_server)
        if to_client:
            c_events += client.receive_data(to_client)


def pair(local_ip: str = "10.0.0.2") -> tuple[ClientCore, ServerCore]:
    client, server = ClientCore(), ServerCore([local_ip])
    exchange(client, server)
    return client, server


def connect(client: ClientCore, server: ServerCore, target: tuple[str, int] = ("10.0.0.2", 8080)
            ) -> tuple[int, ConnectRequested]:
    sid = client.open_stream(target, forwarded_for=("10.0.0.1", 40000), traceparent=TRACEPARENT,
                             baggage="k8s.namespace.name=ns")
    _, s_events = exchange(client, server)
    [req] = [e for e in s_events if isinstance(e, ConnectRequested)]
    return sid, req


def data_of(events: list[Event], sid: int) -> bytes:
    return b"".join(e.data for e in events if isinstance(e, DataReceived) and e.stream_id == sid)


def test_connect_request_carries_upstream_headers() -> None:
    client, server = pair()
    sid, req = connect(client, server)
    assert req.stream_id == sid
    assert req.target == ("10.0.0.2", 8080)
    names = [k for k, _ in req.headers]
    assert b":scheme" not in names and b":path" not in names
    assert req.header(b":method") == b"CONNECT"
    assert req.header(b":authority") == b"10.0.0.2:8080"
    assert req.header(b"forwarded") == b'for="10.0.0.1:40000"'
    traceparent = req.header(b"traceparent")
    assert traceparent is not None and len(traceparent) == 55
    assert req.header(b"baggage") == b"k8s.namespace.name=ns"


def test_ipv6_authority_is_bracketed() -> None:
    client, server = pair("fd00::2")
    client.open_stream(("fd00::2", 80), forwarded_for=("::1", 80), traceparent=TRACEPARENT)
    _, s_events = exchange(client, server)
    [req] = s_events
    assert isinstance(req, ConnectRequested)
    assert req.header(b":authority") == b"[fd00::2]:80"
    assert req.header(b"forwarded") == b'for="[::1]:80"'
    assert req.target == ("fd00::2", 80)


def test_forwarded_host_when_service_known() -> None:
    client, server = pair()
    client.open_stream(("10.0.0.2", 80), forwarded_for=("10.0.0.1", 1), traceparent=TRACEPARENT,
                       host="details.ns.svc.cluster.local")
    _, [req] = exchange(client, server)
    assert isinstance(req, ConnectRequested)
    assert req.header(b"forwarded") == b'for="10.0.0.1:1";host=details.ns.svc.cluster.local'
    # ...as the inbound side reads it back (the `originalDst` of its open connection, configdump.py)
    assert forwarded_host((req.header(b"forwarded") or b"").decode()) == "details.ns.svc.cluster.local"
    assert forwarded_host('for="10.0.0.1:1"') is None and forwarded_host(None) is None
    assert forwarded_host('for="[::1]:80"; Host="web.ns.svc"') == "web.ns.svc"
    assert forwarded_host("for=x;host=") is None


def test_success_200_then_bytes_both_ways_with_half_close() -> None:
    client, server = pair()
    sid, _ = connect(client, server)
    server.respond(sid, 200)
    c_events, _ = exchange(client, server)
    assert c_events == [Responded(sid, 200, ((b":status", b"200"),))]

    assert client.send_data(sid, b"ping") == 4
    client.end_stream(sid)
    _, s_events = exchange(client, server)
    assert data_of(s_events, sid) == b"ping"
    assert StreamEnded(sid) in s_events

    # The server can still answer after the client half-closed.
    assert server.send_data(sid, b"pong") == 4
    server.end_stream(sid)
    c_events, _ = exchange(client, server)
    assert data_of(c_events, sid) == b"pong"
    assert StreamEnded(sid) in c_events
    assert not client.stream_open(sid) and not server.stream_open(sid)


@pytest.mark.parametrize("status", [401, 503])
def test_application_status_ends_the_stream(status: int) -> None:
    client, server = pair()
    sid, _ = connect(client, server)
    server.respond(sid, status)
    c_events, _ = exchange(client, server)
    assert [e.status for e in c_events if isinstance(e, Responded)] == [status]
    assert not client.stream_open(sid)


def raw_client() -> h2.connection.H2Connection:
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    conn.initiate_connection()
    return conn


def raw_request(server: ServerCore, headers: list[tuple[bytes, bytes]]
                ) -> tuple[list[Event], list[h2.events.Event]]:
    conn = raw_client()
    server.receive_data(conn.data_to_send())
    conn.receive_data(server.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, headers)
    s_events = server.receive_data(conn.data_to_send())
    return s_events, conn.receive_data(server.data_to_send())


def status_of(events: list[h2.events.Event]) -> bytes | None:
    for ev in events:
        if isinstance(ev, h2.events.ResponseReceived):
            return dict(ev.headers or [])[b":status"]
    return None


def test_non_connect_is_400() -> None:
    server = ServerCore(["10.0.0.2"])
    s_events, c_events = raw_request(server, [(b":method", b"GET"), (b":scheme", b"http"), (b":path", b"/"),
                                              (b":authority", b"10.0.0.2:80")])
    assert [type(e) for e in s_events if not isinstance(e, WindowOpened)] == [StreamRejected]
    assert status_of(c_events) == b"400"


@pytest.mark.parametrize("authority", [b"details:9080", b"10.0.0.2", b"10.0.0.2:0", b"[10.0.0.2]:80",
                                       b"fd00::2:80", b"10.0.0.2:99999"])
def test_bad_authority_is_400(authority: bytes) -> None:
    server = ServerCore(["10.0.0.2", "fd00::2"])
    s_events, c_events = raw_request(server, [(b":method", b"CONNECT"), (b":authority", authority)])
    assert any(isinstance(e, StreamRejected) and e.status == 400 for e in s_events)
    assert status_of(c_events) == b"400"


def test_target_other_than_local_ip_is_400() -> None:
    client, server = pair("10.0.0.2")
    sid = client.open_stream(("10.0.0.3", 8080), forwarded_for=("10.0.0.1", 1), traceparent=TRACEPARENT)
    c_events, s_events = exchange(client, server)
    [rejected] = [e for e in s_events if isinstance(e, StreamRejected)]
    assert isinstance(rejected, StreamRejected) and "10.0.0.3" in rejected.reason
    assert [e.status for e in c_events if isinstance(e, Responded)] == [400]
    assert not client.stream_open(sid)


def test_ipv4_mapped_local_ip_matches() -> None:
    client, server = pair("::ffff:10.0.0.2")
    connect(client, server, ("10.0.0.2", 80))


def test_settings_per_upstream() -> None:
    client, server = pair()
    sid, _ = connect(client, server)
    # Large frames both ways: one DATA frame carries 1 MiB.
    assert client._h2.max_outbound_frame_size == MAX_FRAME_SIZE
    assert server._h2.max_outbound_frame_size == MAX_FRAME_SIZE
    assert client.send_window(sid) == STREAM_WINDOW
    assert client._h2.outbound_flow_control_window == CONNECTION_WINDOW
    assert client.peer_max_concurrent_streams == 200
    server.respond(sid, 200)
    exchange(client, server)
    client.send_data(sid, b"x" * MAX_FRAME_SIZE)
    frames = list(_frames(client.data_to_send()))
    assert [len(f.data) for f in frames if isinstance(f, hyperframe.frame.DataFrame)] == [MAX_FRAME_SIZE]


def _frames(data: bytes | bytearray) -> list[hyperframe.frame.Frame]:
    out = []
    while data:
        frame, length = hyperframe.frame.Frame.parse_frame_header(memoryview(data[:9]))
        frame.parse_body(memoryview(data[9:9 + length]))
        out.append(frame)
        data = data[9 + length:]
    return out


def test_data_frame_repr_does_not_dump_payload() -> None:
    frame = hyperframe.frame.DataFrame(1, data=b"\x00" * 100_000)
    assert len(repr(frame)) < 200


def test_flow_control_stops_at_the_stream_window_until_consumed() -> None:
    client, server = pair()
    sid, _ = connect(client, server)
    server.respond(sid, 200)
    exchange(client, server)
    payload = b"y" * (STREAM_WINDOW + 1000)
    taken = client.send_data(sid, payload)
    assert taken == STREAM_WINDOW  # the rest stays with the caller: nothing is buffered without bound
    assert client.send_data(sid, payload[taken:]) == 0
    _, s_events = exchange(client, server)
    received = [e for e in s_events if isinstance(e, DataReceived)]
    assert sum(len(e.data) for e in received) == STREAM_WINDOW
    # The server application has not consumed anything: the window stays shut.
    c_events, _ = exchange(client, server)
    assert client.send_window(sid) == 0
    for e in received:
        server.consumed(sid, e.flow_controlled_length)
    c_events, _ = exchange(client, server)
    assert any(isinstance(e, WindowOpened) for e in c_events)
    assert client.send_data(sid, payload[taken:]) == 1000


def test_flow_control_violation_is_a_protocol_error() -> None:
    server = ServerCore(["10.0.0.2"])
    conn = raw_client()
    server.receive_data(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80")])
    server.receive_data(conn.data_to_send())
    # Forge a DATA frame bigger than the default window the raw client believes in: past our 4 MiB.
    big = hyperframe.frame.DataFrame(sid, data=b"z" * MAX_FRAME_SIZE)
    with pytest.raises(HboneProtocolError) as info:
        for _ in range(5):
            server.receive_data(big.serialize())
    assert info.value.error_code == 3  # FLOW_CONTROL_ERROR
    assert server.closed
    assert server.data_to_send() != b""  # the GOAWAY


def test_oversized_header_block_is_refused() -> None:
    server = ServerCore(["10.0.0.2"])
    conn = raw_client()
    server.receive_data(conn.data_to_send())
    sid = conn.get_next_available_stream_id()
    conn.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:80"),
                            *[(b"x-pad-%d" % i, b"v" * 1000) for i in range(80)]])
    with pytest.raises(HboneProtocolError):
        server.receive_data(conn.data_to_send())


def test_reset_reaches_the_peer() -> None:
    client, server = pair()
    sid, _ = connect(client, server)
    server.respond(sid, 200)
    exchange(client, server)
    client.reset(sid, 8)
    _, s_events = exchange(client, server)
    assert StreamReset(sid, 8) in s_events
    client.reset(sid)  # already closed: no-op


def test_closed_streams_are_remembered_for_a_bounded_number() -> None:
    """h2 keeps how each closed stream ended: bounded per connection (memory), yet a frame still in flight on
    a stream just reset is ignored, not a protocol error."""
    client, server = pair()
    for _ in range(CLOSED_STREAMS_REMEMBERED + 500):
        sid, _ = connect(client, server)
        server.respond(sid, 200)
        exchange(client, server)
        client.reset(sid)
        exchange(client, server)
    for core in (client, server):
        assert len(core._h2._closed_streams) <= CLOSED_STREAMS_REMEMBERED
    sid, _ = connect(client, server)
    server.respond(sid, 200)
    exchange(client, server)
    client.reset(sid)  # the server has not seen the reset yet and sends
    server.send_data(sid, b"late")
    late = server.data_to_send()
    assert client.receive_data(late) == []  # ignored, no HboneProtocolError
    exchange(client, server)


def test_streams_closed_both_ways_leave_h2s_books_at_once() -> None:
    """A peak of tunnels that then all end (half-closed both ways, or reset) leaves no stream object in
    either core: only how each ended (bounded above). Before, h2 kept each until the next stream opened."""
    client, server = pair()
    ids = []
    for _ in range(100):
        sid, _ = connect(client, server)
        server.respond(sid, 200)
        ids.append(sid)
    exchange(client, server)
    for n, sid in enumerate(ids):
        if n % 2:
            client.reset(sid)
        else:
            client.end_stream(sid)
    exchange(client, server)
    for sid in ids[::2]:
        server.end_stream(sid)
    exchange(client, server)
    for core in (client, server):
        assert core._h2.streams == {}
        assert core.open_streams == 0
        assert set(ids) <= set(core._h2._closed_streams)
    sid, _ = connect(client, server)  # the connection carries on
    server.respond(sid, 200)
    assert client.send_data(sid, b"more") == 4


def test_goaway_ends_the_connection() -> None:
    client, server = pair()
    server.close()
    exchange(client, server)
    assert client.goaway_received and client.closed


def test_many_streams_on_one_connection() -> None:
    client, server = pair()
    ids = [connect(client, server)[0] for _ in range(150)]
    assert len(set(ids)) == 150
    assert client.open_streams == 150


@pytest.mark.parametrize(("addr", "text"), [(("10.1.2.3", 80), "10.1.2.3:80"),
                                           (("fd00::1", 8080), "[fd00::1]:8080")])
def test_authority_round_trip(addr: tuple[str, int], text: str) -> None:
    assert format_host_port(*addr) == text
    assert parse_authority(text.encode()) == addr


def test_new_traceparent_is_w3c_shaped_and_unique() -> None:
    import re

    from services.ztunnel.hbone.connection import new_traceparent

    seen = {new_traceparent() for _ in range(2000)}
    assert len(seen) == 2000
    assert all(re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-00", t) for t in seen)
    assert not any(t.startswith("00-" + "0" * 32) for t in seen)
