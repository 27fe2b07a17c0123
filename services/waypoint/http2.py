"""HTTP/2 with prior knowledge inside a waypoint tunnel: each h2 stream is one request, served concurrently.

Theory of operation
-------------------
When a tunnel starts with HTTP/2's connection preface (`sniff` in http.py), `serve_h2` runs an h2 server
connection on the tunnel's stream: one reader (this task) feeds the bytes to h2 and dispatches its events,
and every request stream gets a task of its own that goes through the same steps as an HTTP/1.1 request
(`HttpProxy.request`: policy, route, endpoint, forward as HTTP/1.1 to the endpoint). Writes go through one
lock, taken before h2's pending bytes are collected, so frames leave in the order h2 made them.

Bounds: at most `MAX_CONCURRENT_STREAMS` requests at once (h2 refuses more); a request body is queued only
up to the stream's flow-control window, which is given back as the request's task takes the bytes; a
response waits for the client's window. A protocol error ends the tunnel's h2 connection (GOAWAY), a reset
stream only its request. When the client ends the tunnel, requests whose body is still incomplete fail,
answered ones finish.
"""

from __future__ import annotations

import collections
import logging
from typing import Final

import h2.config
import h2.connection
import h2.events
import h2.exceptions
import h2.settings
import trio

from services.waypoint.http import READ_SIZE, DownstreamError, HttpProxy, Tunnel, TunnelAborted

log = logging.getLogger("waypoint.http2")

MAX_CONCURRENT_STREAMS: Final = 100
H2_DROP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                            b"upgrade", b"te"})
ERROR_CANCEL: Final = 0x8
ERROR_INTERNAL: Final = 0x2


class _Session:
    def __init__(self, stream: trio.abc.HalfCloseableStream) -> None:
        self.stream = stream
        config = h2.config.H2Configuration(client_side=False, header_encoding=None)
        self.conn = h2.connection.H2Connection(config=config)
        self.conn.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: MAX_CONCURRENT_STREAMS})
        self._lock = trio.Lock()
        self.window = trio.lowlevel.ParkingLot()
        self.requests: dict[int, _H2Downstream] = {}

    async def flush(self) -> None:
        async with self._lock:
            data = self.conn.data_to_send()
            if data:
                await self.stream.send_all(data)


class _H2Downstream:
    """One request stream of the tunnel's h2 connection."""

    def __init__(self, session: _Session, stream_id: int) -> None:
        self.session = session
        self.stream_id = stream_id
        self.body: collections.deque[bytes] = collections.deque()
        self.ended = False
        self.reset = False
        self._head_sent = False
        self.readable = trio.lowlevel.ParkingLot()
        self.scope = trio.CancelScope()

    @property
    def body_done(self) -> bool:
        return self.ended and not self.body

    @property
    def head_sent(self) -> bool:
        return self._head_sent

    async def receive_body(self) -> bytes | None:
        while not self.body and not self.ended and not self.reset:
            await self.readable.park()
        if self.body:
            chunk = self.body.popleft()
            self.session.conn.acknowledge_received_data(len(chunk), self.stream_id)
            await self.session.flush()
            return chunk
        if self.reset:
            raise DownstreamError("the client reset the stream or ended the tunnel mid-request")
        return None

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> None:
        h2_headers = [(b":status", str(status).encode())]
        h2_headers += [(k.lower(), v) for k, v in headers if k.lower() not in H2_DROP]
        self.session.conn.send_headers(self.stream_id, h2_headers)
        self._head_sent = True
        await self.session.flush()

    async def send_data(self, data: bytes) -> None:
        conn = self.session.conn
        view = memoryview(data)
        while view:
            room = min(conn.local_flow_control_window(self.stream_id), conn.max_outbound_frame_size)
            if room <= 0:
                await self.session.window.park()
                continue
            conn.send_data(self.stream_id, bytes(view[:room]))
            view = view[room:]
            await self.session.flush()

    async def end(self) -> None:
        self.session.conn.end_stream(self.stream_id)
        await self.session.flush()


async def _serve_request(proxy: HttpProxy, session: _Session, down: _H2Downstream, tunnel: Tunnel,
                         method: bytes, path: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    try:
        with down.scope:
            await proxy.request(down, tunnel, method, path, headers, protocol="HTTP/2")
    except (trio.BrokenResourceError, trio.ClosedResourceError):
        down.reset = True  # the tunnel is gone: nothing to answer on
    except (TunnelAborted, DownstreamError, h2.exceptions.ProtocolError) as exc:
        log.debug("HTTP/2 request aborted",
                  extra={"fields": [("stream", down.stream_id), ("error", str(exc))]})
        if not down.reset:
            try:
                session.conn.reset_stream(down.stream_id, ERROR_CANCEL)
                await session.flush()
            except h2.exceptions.ProtocolError:
                pass
    finally:
        session.requests.pop(down.stream_id, None)


def _request_head(headers: list[tuple[bytes, bytes]]) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]]:
    """(:method, :path, the headers for HTTP/1.1: `host` from :authority, no pseudo-headers)."""
    pseudo = {k: v for k, v in headers if k.startswith(b":")}
    regular = [(k, v) for k, v in headers if not k.startswith(b":") and k not in H2_DROP]
    authority = pseudo.get(b":authority")
    if authority is not None and not any(k == b"host" for k, _ in regular):
        regular.insert(0, (b"host", authority))
    return pseudo.get(b":method", b"GET"), pseudo.get(b":path", b"/"), regular


async def serve_h2(proxy: HttpProxy, stream: trio.abc.HalfCloseableStream, tunnel: Tunnel,
                   first: bytes) -> None:
    """Serve the tunnel as an HTTP/2 connection (prior knowledge) until the client ends it."""
    session = _Session(stream)
    session.conn.initiate_connection()
    await session.flush()
    async with trio.open_nursery() as nursery:
        try:
            await _read(proxy, session, nursery, tunnel, first)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:  # the tunnel is gone
            log.debug("HTTP/2 tunnel ended", extra={"fields": [("error", str(exc))]})
            nursery.cancel_scope.cancel()
        for down in list(session.requests.values()):
            if not down.ended:  # its body can never complete
                down.reset = True
                down.readable.unpark_all()


async def _read(proxy: HttpProxy, session: _Session, nursery: trio.Nursery, tunnel: Tunnel,
                first: bytes) -> None:
    conn = session.conn
    data = first
    while True:
        if data:
            try:
                events = conn.receive_data(data)
            except h2.exceptions.ProtocolError as exc:
                log.info("HTTP/2 protocol error in a waypoint tunnel", extra={"fields": [
                    ("src.identity", tunnel.src_identity.uri), ("error", str(exc))]})
                await session.flush()  # h2's GOAWAY
                break
            for event in events:
                _dispatch(proxy, session, nursery, tunnel, event)
            await session.flush()
            if any(isinstance(e, h2.events.ConnectionTerminated) for e in events):
                break
        data = bytes(await session.stream.receive_some(READ_SIZE))
        if not data:
            break


def _dispatch(proxy: HttpProxy, session: _Session, nursery: trio.Nursery, tunnel: Tunnel,
              event: h2.events.Event) -> None:
    conn = session.conn
    if isinstance(event, h2.events.RequestReceived) and event.stream_id is not None:
        new = _H2Downstream(session, event.stream_id)
        session.requests[event.stream_id] = new
        method, path, headers = _request_head([(bytes(k), bytes(v)) for k, v in event.headers or ()])
        nursery.start_soon(_serve_request, proxy, session, new, tunnel, method, path, headers)
        return
    down = session.requests.get(getattr(event, "stream_id", None) or 0)
    if isinstance(event, h2.events.DataReceived) and event.stream_id is not None:
        data = event.data or b""
        padding = (event.flow_controlled_length or 0) - len(data)
        if down is None:
            conn.acknowledge_received_data(event.flow_controlled_length or 0, event.stream_id)
            return
        if padding:
            conn.acknowledge_received_data(padding, event.stream_id)
        if data:
            down.body.append(data)
            down.readable.unpark_all()
    elif isinstance(event, h2.events.StreamEnded):
        if down is not None:
            down.ended = True
            down.readable.unpark_all()
    elif isinstance(event, h2.events.StreamReset):
        if down is not None:
            down.reset = True
            down.readable.unpark_all()
            down.scope.cancel()
    elif isinstance(event, h2.events.WindowUpdated | h2.events.RemoteSettingsChanged):
        session.window.unpark_all()
