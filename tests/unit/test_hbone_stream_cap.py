"""HBONE server core: a stream past the concurrency cap is refused alone (REFUSED_STREAM)."""

from __future__ import annotations

import h2.config
import h2.connection
import pytest

from services.ztunnel.hbone.core import (
    ERROR_ENHANCE_YOUR_CALM,
    ERROR_REFUSED_STREAM,
    LOCAL_RESET_COUNT_MAX,
    SERVER_MAX_CONCURRENT_STREAMS,
    ConnectRequested,
    Event,
    ServerCore,
)
from services.ztunnel.hbone.errors import HboneProtocolError

POD = "10.0.0.1"


def _client() -> h2.connection.H2Connection:
    # The client never reads the server's SETTINGS, so its own h2 does not hold it to the cap.
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
    client.initiate_connection()
    return client


def _connect(client: h2.connection.H2Connection, n: int) -> int:
    sid = client.get_next_available_stream_id()
    # An indexed header unique per stream: it adds an entry to the HPACK dynamic table, so a header block the
    # server skipped would shift every later index and garble the next request.
    client.send_headers(sid, [(b":method", b"CONNECT"), (b":authority", f"{POD}:{8000 + n}".encode()),
                              (b"x-seq", str(n).encode())])
    return sid


def _requests(events: list[Event]) -> list[ConnectRequested]:
    return [e for e in events if isinstance(e, ConnectRequested)]


def _rst_codes(wire: bytes) -> dict[int, int]:
    """stream id -> error code of every RST_STREAM frame in `wire` (raw frames, no HPACK needed)."""
    out: dict[int, int] = {}
    pos = 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        kind = wire[pos + 3]
        sid = int.from_bytes(wire[pos + 5:pos + 9], "big") & 0x7FFFFFFF
        if kind == 0x3:
            out[sid] = int.from_bytes(wire[pos + 9:pos + 13], "big")
        pos += 9 + length
    return out


def _goaway_code(wire: bytes) -> int | None:
    pos = 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        if wire[pos + 3] == 0x7:
            return int.from_bytes(wire[pos + 13:pos + 17], "big")
        pos += 9 + length
    return None


def _open_to_the_cap(server: ServerCore, client: h2.connection.H2Connection) -> None:
    server.receive_data(client.data_to_send())
    server.data_to_send()
    for n in range(SERVER_MAX_CONCURRENT_STREAMS):
        _connect(client, n)
    events = server.receive_data(client.data_to_send())
    assert len(_requests(events)) == SERVER_MAX_CONCURRENT_STREAMS
    server.data_to_send()


def test_the_stream_past_the_cap_is_refused_and_the_connection_carries_on() -> None:
    server, client = ServerCore([POD]), _client()
    _open_to_the_cap(server, client)

    extra = _connect(client, 999)
    events = server.receive_data(client.data_to_send())
    wire = bytes(server.data_to_send())
    assert _requests(events) == []
    assert _rst_codes(wire) == {extra: ERROR_REFUSED_STREAM}
    assert _goaway_code(wire) is None and not server.closed
    assert server.refused_streams == 1

    # One stream ends; the next CONNECT is served, and its headers decode right (HPACK stayed in step).
    client.end_stream(1)
    server.respond(1, 200)
    server.receive_data(client.data_to_send())
    server.end_stream(1)
    server.data_to_send()
    nxt = _connect(client, 1000)
    [request] = _requests(server.receive_data(client.data_to_send()))
    assert request.stream_id == nxt
    assert request.target == (POD, 9000)
    assert request.header(b"x-seq") == b"1000"


def test_frames_for_a_refused_stream_are_ignored_and_its_reset_is_not_answered() -> None:
    server, client = ServerCore([POD]), _client()
    _open_to_the_cap(server, client)
    extra = _connect(client, 999)
    server.receive_data(client.data_to_send())
    server.data_to_send()
    client.reset_stream(extra, 0x8)  # the client's own CANCEL of the refused stream
    assert server.receive_data(client.data_to_send()) == []
    assert _rst_codes(bytes(server.data_to_send())) == {}  # no RST_STREAM in reply to a RST_STREAM
    assert not server.closed


def test_a_peer_that_keeps_opening_past_the_cap_gets_enhance_your_calm() -> None:
    server, client = ServerCore([POD]), _client()
    _open_to_the_cap(server, client)
    with pytest.raises(HboneProtocolError) as info:
        for n in range(LOCAL_RESET_COUNT_MAX + 1):
            _connect(client, 10_000 + n)
            server.receive_data(client.data_to_send())
    assert info.value.error_code == ERROR_ENHANCE_YOUR_CALM
    assert server.refused_streams == LOCAL_RESET_COUNT_MAX + 1
    assert _goaway_code(bytes(server.data_to_send())) == ERROR_ENHANCE_YOUR_CALM
