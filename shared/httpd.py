"""One small HTTP/1.1 server on h11 and Trio, for every process's local endpoints.

The node agent's CNI-event socket and health port, ztunnel's admin, stats and readiness ports and the sample
apps all serve through here: a handler is `async (Request) -> Response`, and `Router` is the routing table
most of them need (exact paths, a 404 naming what exists).

Theory of operation
-------------------
`serve_http(handler, listeners)` runs until cancelled, one task per connection in a nursery it owns (via
`trio.serve_listeners`, which also retries accept errors from resource exhaustion). A connection feeds bytes
into an `h11.Connection` and collects one request (head up to `Limits.max_head`, body up to
`Limits.max_body`, the whole request within `Limits.request_timeout` of starting to wait for it), awaits
`handler(request)`, writes the response and starts the next cycle while both sides keep the connection
alive. Errors, and which connection they end:

    malformed request (h11 RemoteProtocolError)   h11's suggested status (400, 431...), then close
    body over Limits.max_body                     413, then close
    no complete request in time, peer gone        close, logged at debug
    the handler raises                            500, logged with its traceback, then close

A failure only ever ends its own connection, never the server.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import socket
import stat
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping, Sequence
from functools import partial
from typing import Final, TypeVar
from urllib.parse import parse_qs

import h11
import msgspec
import trio

from shared.addr import format_host_port
from shared.rundir import in_use_message, socket_in_use

log = logging.getLogger(__name__)

READ_SIZE: Final = 64 * 1024
M = TypeVar("M", h11.Request, h11.Response)  # a message head


class Limits(msgspec.Struct, frozen=True, kw_only=True):
    """What one request may take: head and body sizes in bytes, and seconds until it is complete."""

    max_head: int = 64 * 1024
    max_body: int = 64 * 1024
    request_timeout: float = 30.0


DEFAULT_LIMITS: Final = Limits()


class Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    target: str
    """The request target as sent: path and query (`/logging?level=debug`)."""
    headers: Mapping[str, str] = {}
    """Header names lower-cased; a repeated header keeps its last value."""
    body: bytes = b""
    peer: str = ""
    """`host:port` of the client as the server's socket sees it (IPv6 bracketed); empty for a Unix socket."""

    @property
    def path(self) -> str:
        return self.target.partition("?")[0]

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(self.target.partition("?")[2])


class Response(msgspec.Struct, frozen=True, kw_only=True):
    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    stream: Callable[[], AsyncGenerator[bytes, None]] | None = None
    """A streamed body instead of `body`: each chunk goes out as it comes (chunked), until the iterator ends
    or the client goes away (then it is cancelled); the connection closes after it."""


Handler = Callable[[Request], Awaitable[Response]]


def json_response(payload: object, status: int = 200) -> Response:
    """`payload` as a JSON body (one line, newline-terminated)."""
    return Response(status=status, body=msgspec.json.encode(payload) + b"\n", content_type="application/json")


def text_response(text: str, status: int = 200) -> Response:
    return Response(status=status, body=text.encode())


class Router:
    """A routing table: exact path -> handler; any other path goes to `fallback` (default: a 404 that names
    the paths there are)."""

    def __init__(self, routes: Mapping[str, Handler], *, fallback: Handler | None = None) -> None:
        self.routes = dict(routes)
        self.fallback = fallback or self._not_found

    async def __call__(self, request: Request) -> Response:
        handler = self.routes.get(request.path, self.fallback)
        return await handler(request)

    async def _not_found(self, request: Request) -> Response:
        return text_response(f"not found; try {' or '.join(self.routes)}\n", 404)


# --- listeners -------------------------------------------------------------------------------------------


async def open_unix_listener(path: str, *, mode: int = 0o600, backlog: int = 64) -> trio.SocketListener:
    """Bind a stream Unix socket at `path` (a stale socket file is replaced; any other file, or a socket a
    live process still serves, is refused; the directory must exist).

    Raises:
        OSError: the path exists and is not a socket (EEXIST), a live process serves it (EADDRINUSE), or
            the bind failed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise OSError(errno.EEXIST, f"{path} exists and is not a socket; refusing to replace it")
        if socket_in_use(path):
            raise OSError(errno.EADDRINUSE, in_use_message(path))
        os.unlink(path)
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        await sock.bind(path)
        os.chmod(path, mode)
        sock.listen(backlog)
    except FileNotFoundError:  # the owner makes the directory (shared.rundir.make_parents), never this
        sock.close()
        directory = os.path.dirname(path) or "."
        message = f"{directory} does not exist; create it or choose another socket path"
        raise OSError(errno.ENOENT, message) from None
    except BaseException:
        sock.close()
        raise
    return trio.SocketListener(sock)


def bound_addresses(listeners: Sequence[trio.SocketListener]) -> list[tuple[str, int]]:
    """(host, port) each TCP listener is bound to (the port the kernel picked for port 0)."""
    return [(str(addr[0]), int(addr[1])) for addr in (lst.socket.getsockname() for lst in listeners)]


# --- serving ---------------------------------------------------------------------------------------------


async def serve_http(
    handler: Handler,
    listeners: Sequence[trio.abc.Listener[trio.abc.Stream]],
    *,
    limits: Limits = DEFAULT_LIMITS,
    server: str | None = None,
    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve HTTP/1.1 on `listeners` until cancelled; started() once they accept.

    Args:
        server: the `server` response header (none when None).
    """
    async with trio.open_nursery() as handlers:
        await handlers.start(
            partial(
                trio.serve_listeners,
                partial(_on_connection, handler, limits, server),
                list(listeners),
                handler_nursery=handlers,
            )
        )
        task_status.started()


async def serve_http_tcp(
    handler: Handler,
    port: int,
    host: str | None = None,
    *,
    limits: Limits = DEFAULT_LIMITS,
    server: str | None = None,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on TCP `host:port` (host None: every wildcard address, v4 and v6) until cancelled; started()
    with the bound listeners (see `bound_addresses`)."""
    listeners = await trio.open_tcp_listeners(port, host=host)
    async with trio.open_nursery() as nursery:
        await nursery.start(partial(serve_http, handler, listeners, limits=limits, server=server))
        task_status.started(listeners)


async def _on_connection(
    handler: Handler, limits: Limits, server: str | None, stream: trio.abc.Stream
) -> None:
    try:
        await serve_connection(stream, handler, limits=limits, server=server)
    except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
        log.debug("HTTP connection ended",
                  extra={"fields": [("peer", _peer(stream) or "a local socket"), ("error", repr(exc))]})
    finally:
        await trio.aclose_forcefully(stream)


async def serve_connection(
    stream: trio.abc.Stream, handler: Handler, *, limits: Limits = DEFAULT_LIMITS, server: str | None = None
) -> None:
    """Serve requests on one connection until either side closes it (does not close `stream`).

    Raises:
        trio.TooSlowError: no complete request within `limits.request_timeout`.
        trio.BrokenResourceError: the peer went away mid-message.
    """
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=limits.max_head)
    peer = _peer(stream)
    extra = [("server", server)] if server else []
    while True:
        try:
            with trio.fail_after(limits.request_timeout):
                head = await receive_head(stream, conn, h11.Request)
                body = b"" if head is None else await receive_body(stream, conn, max_body=limits.max_body)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                reason = f"bad request: {exc}\n" if exc.error_status_hint != 413 else f"{exc}\n"
                await _send(stream, conn, text_response(reason, exc.error_status_hint), extra)
            return
        if head is None:
            return
        request = Request(
            method=head.method.decode(),
            target=head.target.decode("latin-1"),
            headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
            body=body,
            peer=peer,
        )
        try:
            response = await handler(request)
        except Exception as exc:
            log.exception("HTTP handler failed",
                          extra={"fields": [("method", request.method), ("path", request.path)]})
            response = text_response(f"internal error: {exc}\n", 500)
        await _send(stream, conn, response, extra)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def receive_head(stream: trio.abc.Stream, conn: h11.Connection, kind: type[M]) -> M | None:
    """The head of the next message (a request on a server, a response on a client; 1xx responses are
    skipped); None when the peer closed first (or, on a server, pipelined past a request we refused).

    Raises:
        h11.RemoteProtocolError: a malformed head, or one over the connection's max_incomplete_event_size.
    """
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, kind):
            return event
        elif isinstance(event, h11.ConnectionClosed) or event is h11.PAUSED:
            return None


async def receive_body(
    stream: trio.abc.Stream, conn: h11.Connection, *, max_body: int | None = None
) -> bytes:
    """The body of the message whose head `receive_head` returned, up to its end.

    Raises:
        h11.RemoteProtocolError: a malformed body, or one over `max_body` (suggesting 413).
    """
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, h11.Data):
            body += event.data
            if max_body is not None and len(body) > max_body:
                raise h11.RemoteProtocolError(
                    f"request body too large (over {max_body} bytes)", error_status_hint=413
                )
        elif isinstance(event, h11.EndOfMessage):
            return bytes(body)
        else:  # h11 raises on a close mid-message; nothing else comes between a head and its end
            raise h11.RemoteProtocolError(f"unexpected {event!r} inside a message", error_status_hint=400)


def message_bytes(conn: h11.Connection, head: h11.Request | h11.Response, body: bytes) -> bytes:
    """One whole HTTP/1.1 message (head, body, end) as `conn` frames it."""
    data = conn.send(head) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def _send(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, extra: list[tuple[str, str]]
) -> None:
    if response.stream is not None:
        await _send_streamed(stream, conn, response, extra)
        return
    headers = [
        ("content-type", response.content_type),
        ("content-length", str(len(response.body))),
        *extra,
    ]
    head = h11.Response(status_code=response.status, headers=headers)
    await stream.send_all(message_bytes(conn, head, response.body))


async def _send_streamed(
    stream: trio.abc.Stream, conn: h11.Connection, response: Response, extra: list[tuple[str, str]]
) -> None:
    assert response.stream is not None
    headers = [("content-type", response.content_type), ("connection", "close"), *extra]
    await stream.send_all(conn.send(h11.Response(status_code=response.status, headers=headers)) or b"")

    async def until_client_leaves(scope: trio.CancelScope) -> None:
        with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
            while await stream.receive_some(READ_SIZE):
                pass  # nothing more is expected on a connection that is closed after this response
        scope.cancel()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(until_client_leaves, nursery.cancel_scope)
        async with contextlib.aclosing(response.stream()) as chunks:
            async for chunk in chunks:
                if chunk:
                    await stream.send_all(conn.send(h11.Data(data=chunk)) or b"")
        await stream.send_all(conn.send(h11.EndOfMessage()) or b"")
        nursery.cancel_scope.cancel()


def _peer(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        addr = stream.socket.getpeername()
        if isinstance(addr, tuple):
            return format_host_port(str(addr[0]), int(addr[1]))
    return ""
