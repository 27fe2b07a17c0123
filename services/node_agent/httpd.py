"""A small HTTP/1.1 server on h11 for the node agent's CNI-event socket and its health endpoint.

Theory of operation
-------------------
`serve_http(listeners, route)` runs until cancelled, one task per connection in a nursery it owns (via
`trio.serve_listeners`). A connection reads requests with h11 (bodies up to 64 KiB), hands each complete
request to `route(Request) -> Response`, writes the answer and keeps the connection for the next request
when both sides allow it. A malformed request gets h11's suggested status; an exception in `route` is
logged and answered 500, and only ever ends its own connection.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import stat
from collections.abc import Awaitable, Callable, Sequence

import h11
import msgspec
import trio

log = logging.getLogger("node_agent.httpd")

MAX_BODY = 64 * 1024
READ_SIZE = 16 * 1024
REQUEST_TIMEOUT = 30.0


class Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    path: str
    body: bytes = b""


class Response(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    body: bytes = b""
    content_type: str = "application/json"


Route = Callable[[Request], Awaitable[Response]]


def json_response(status: int, payload: object) -> Response:
    return Response(status=status, body=msgspec.json.encode(payload) + b"\n")


async def open_unix_listener(path: str, *, mode: int = 0o600) -> trio.SocketListener:
    """Bind a stream Unix socket at `path` (a stale socket file is replaced; any other file is refused)."""
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(64)
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


async def serve_http(
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    route: Route,
    *,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 on `listeners` until cancelled; started() once they accept."""

    async def handler(stream: trio.abc.Stream) -> None:
        try:
            await _serve_connection(stream, route)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.debug("HTTP connection ended: %r", exc)
        finally:
            await trio.aclose_forcefully(stream)

    async with trio.open_nursery() as nursery:
        await nursery.start(trio.serve_listeners, handler, list(listeners))
        task_status.started()


async def _serve_connection(stream: trio.abc.Stream, route: Route) -> None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_BODY)
    while True:
        request: h11.Request | None = None
        body = bytearray()
        with trio.fail_after(REQUEST_TIMEOUT):
            try:
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        data = await stream.receive_some(READ_SIZE)
                        conn.receive_data(bytes(data))
                        continue
                    if isinstance(event, h11.Request):
                        request = event
                    elif isinstance(event, h11.Data):
                        body += event.data
                        if len(body) > MAX_BODY:
                            await _send(stream, conn, Response(status=413, body=b"request body too large\n"))
                            return
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
                        return
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    msg = f"bad request: {exc}\n".encode()
                    await _send(stream, conn, Response(status=exc.error_status_hint, body=msg))
                return
        assert request is not None
        req = Request(method=request.method.decode(), path=request.target.decode("latin-1"), body=bytes(body))
        try:
            response = await route(req)
        except Exception:
            log.exception("handling %s %s failed", req.method, req.path)
            response = Response(
                status=500, body=b"internal error; see the node agent's log\n", content_type="text/plain"
            )
        await _send(stream, conn, response)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def _send(stream: trio.abc.Stream, conn: h11.Connection, response: Response) -> None:
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
    ]
    data = conn.send(h11.Response(status_code=response.status, headers=headers)) or b""
    if response.body:
        data += conn.send(h11.Data(data=response.body)) or b""
    data += conn.send(h11.EndOfMessage()) or b""
    await stream.send_all(data)
