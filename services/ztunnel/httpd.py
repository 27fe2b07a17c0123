"""A small HTTP/1.1 server on Trio with h11, for ztunnel's admin, stats and readiness ports.

Each connection is one task in the server's handler nursery: read a request (bounded size), call the app,
write the response, loop while keep-alive allows. The app is `async (HttpRequest) -> HttpResponse`; its
exceptions become 500s and never end the server.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Final
from urllib.parse import parse_qs, urlsplit

import h11
import msgspec
import trio

log = logging.getLogger("ztunnel.http")

MAX_REQUEST: Final = 64 * 1024
IDLE_TIMEOUT: Final = 30.0


class HttpRequest(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    target: str
    body: bytes = b""

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query)


class HttpResponse(msgspec.Struct, frozen=True, kw_only=True):
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"


App = Callable[[HttpRequest], Awaitable[HttpResponse]]


async def _next_event(conn: h11.Connection, stream: trio.SocketStream) -> object:
    while True:
        event = conn.next_event()
        if event is not h11.NEED_DATA:
            return event
        with trio.move_on_after(IDLE_TIMEOUT) as idle:
            data = await stream.receive_some(16384)
        if idle.cancelled_caught:
            return h11.ConnectionClosed()
        conn.receive_data(data)


async def _send(conn: h11.Connection, stream: trio.SocketStream, response: HttpResponse) -> None:
    headers = [("content-type", response.content_type), ("content-length", str(len(response.body))),
               ("server", "ztunnel")]
    data = conn.send(h11.Response(status_code=response.status, headers=headers))
    data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)


async def handle_http_connection(app: App, stream: trio.SocketStream) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_REQUEST)
    try:
        while True:
            event = await _next_event(conn, stream)
            if not isinstance(event, h11.Request):
                return
            body = bytearray()
            while not isinstance(ev := await _next_event(conn, stream), h11.EndOfMessage):
                if isinstance(ev, h11.ConnectionClosed):
                    return
                if isinstance(ev, h11.Data):
                    body += ev.data
                    if len(body) > MAX_REQUEST:
                        await _send(conn, stream, HttpResponse(status=413, body=b"request too large\n"))
                        return
            request = HttpRequest(method=event.method.decode(), target=event.target.decode(),
                                  body=bytes(body))
            try:
                response = await app(request)
            except Exception as exc:
                log.exception("admin handler failed", extra={"fields": [("path", request.path)]})
                response = HttpResponse(status=500, body=f"internal error: {exc}\n".encode())
            await _send(conn, stream, response)
            if conn.our_state is h11.MUST_CLOSE:
                return
            conn.start_next_cycle()
    except h11.RemoteProtocolError as exc:
        if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            with contextlib.suppress(h11.LocalProtocolError, trio.BrokenResourceError):
                await _send(conn, stream, HttpResponse(status=exc.error_status_hint,
                                                       body=f"bad request: {exc}\n".encode()))
    except trio.BrokenResourceError:
        pass
    finally:
        await stream.aclose()


async def serve_http(app: App, host: str | None, port: int, *,
                     task_status: trio.TaskStatus[list[tuple[str, int]]] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve `app` on host:port (host None = every wildcard) until cancelled; started() gets the bound
    addresses once listening."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    addrs = [tuple(listener.socket.getsockname()[:2]) for listener in listeners]
    async with trio.open_nursery() as handlers:
        task_status.started([(str(a[0]), int(a[1])) for a in addrs])
        await trio.serve_listeners(partial(handle_http_connection, app), listeners, handler_nursery=handlers)
