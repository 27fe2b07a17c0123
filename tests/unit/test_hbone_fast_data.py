"""The plain-DATA fast path of the HBONE core gives exactly what h2 alone gives.

A raw h2 client (not our core, so it can also pad, reset and send after a reset) writes a mixed byte stream;
two server cores take it in the same arbitrary chunks, one with the fast path and one without. Events, the
bytes each answers with, and the flow-control windows must be the same.
"""

from __future__ import annotations

from collections.abc import Callable

import h2.config
import h2.connection
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import services.ztunnel.hbone.core as core
from services.ztunnel.hbone.core import ConnectRequested, Event, ServerCore
from services.ztunnel.hbone.errors import HboneProtocolError

CONNECT = [(b":method", b"CONNECT"), (b":authority", b"10.0.0.2:8080")]


def client_bytes(sizes: list[int]) -> bytes:
    """Preamble and settings, three CONNECTs, DATA of the given sizes spread over them (some padded, some
    empty), a PING, a reset stream that still gets DATA, END_STREAM on another: all one byte stream."""
    h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.receive_data(ServerCore(["10.0.0.2"]).data_to_send())  # the server's settings: 1 MiB frames, windows
    for sid in (1, 3, 5):
        h2c.send_headers(sid, CONNECT)
    for i, size in enumerate(sizes):
        sid = (1, 3, 5)[i % 3]
        h2c.send_data(sid, bytes([i % 251]) * size, pad_length=7 if i % 5 == 4 else None)
        if i == len(sizes) // 2:
            h2c.ping(b"12345678")
    h2c.reset_stream(5)
    h2c.send_data(1, b"after the reset of 5")
    h2c.end_stream(3)
    return h2c.data_to_send()


FAST_FRAMES = [0]


def _counting(method: Callable[[ServerCore, memoryview, list[Event]], int]
              ) -> Callable[[ServerCore, memoryview, list[Event]], int]:
    def wrapper(self: ServerCore, view: memoryview, out: list[Event]) -> int:
        before = len(out)
        used = method(self, view, out)
        FAST_FRAMES[0] += len(out) - before
        return used
    return wrapper


def run(data: bytes, cuts: list[int], *, fast: bool, monkeypatch: pytest.MonkeyPatch
        ) -> tuple[list[Event], bytes, int, dict[int, int]]:
    monkeypatch.setattr(core, "FAST_DATA", fast)
    if fast:
        monkeypatch.setattr(ServerCore, "_receive_plain_data", _counting(ServerCore._receive_plain_data))
    server = ServerCore(["10.0.0.2"])
    events: list[Event] = []
    out = bytearray(server.data_to_send())
    last = 0
    for cut in [*sorted(set(cuts)), len(data)]:
        chunk = data[last:cut]
        last = cut
        if not chunk:
            continue
        got = server.receive_data(chunk)
        for ev in got:
            if isinstance(ev, ConnectRequested) and server.stream_open(ev.stream_id):
                server.respond(ev.stream_id, 200)  # (not stream 5 when its reset came in the same chunk)
        events += got
        out += server.data_to_send()
    h2c = server._h2
    windows = {sid: s._inbound_window_manager.current_window_size for sid, s in h2c.streams.items()}
    return events, bytes(out), h2c._inbound_flow_control_window_manager.current_window_size, windows


def frame_boundaries(data: bytes) -> list[int]:
    """Offsets where a frame starts (after the 24-byte client preamble): chunks cut there are what a TLS
    read usually returns, and where the fast path can start."""
    out, pos = [], 24
    while pos + 9 <= len(data):
        out.append(pos)
        pos += 9 + int.from_bytes(data[pos:pos + 3], "big")
    return out


@settings(max_examples=80, deadline=None)
@given(sizes=st.lists(st.integers(min_value=0, max_value=40_000), min_size=1, max_size=12),
       at_frames=st.lists(st.integers(min_value=0, max_value=10_000), max_size=10),
       anywhere=st.lists(st.floats(min_value=0, max_value=1), max_size=4))
def test_fast_path_matches_h2(sizes: list[int], at_frames: list[int], anywhere: list[float]) -> None:
    assert core.FAST_DATA, "this h2 version lacks what the fast path needs: every frame goes through h2"
    data = client_bytes(sizes)
    boundaries = frame_boundaries(data)
    cuts = [boundaries[i % len(boundaries)] for i in at_frames] + [int(f * len(data)) for f in anywhere]
    with pytest.MonkeyPatch.context() as mp:
        fast = run(data, cuts, fast=True, monkeypatch=mp)
    with pytest.MonkeyPatch.context() as mp:
        slow = run(data, cuts, fast=False, monkeypatch=mp)
    assert fast == slow


def test_the_fast_path_takes_frames_cut_at_frame_boundaries() -> None:
    """The comparison above means something: with chunks cut where frames start, plain DATA frames are
    taken by the fast path."""
    data = client_bytes([1000] * 9)
    FAST_FRAMES[0] = 0
    with pytest.MonkeyPatch.context() as mp:
        run(data, frame_boundaries(data), fast=True, monkeypatch=mp)
    assert FAST_FRAMES[0] >= 5  # 9 DATA frames; the padded ones and those before the 200 go to h2


def test_data_beyond_the_window_is_still_a_protocol_error() -> None:
    h2c = h2.connection.H2Connection(config=h2.config.H2Configuration(client_side=True))
    h2c.initiate_connection()
    h2c.send_headers(1, CONNECT)
    server = ServerCore(["10.0.0.2"])
    server.receive_data(h2c.data_to_send())
    server.respond(1, 200)
    h2c.receive_data(server.data_to_send())
    # A DATA frame written by hand, larger than the 4 MiB stream window the server granted.
    length = core.STREAM_WINDOW + 1
    frame = length.to_bytes(3, "big") + b"\x00\x00" + (1).to_bytes(4, "big") + b"x" * length
    with pytest.raises(HboneProtocolError):
        server.receive_data(frame)
