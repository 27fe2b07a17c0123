"""Minimal HTTP/1.1 on h11 + Trio for the sample apps: a server loop and a one-request client.

Theory of operation
-------------------
Server: `serve_app(handler, port)` runs until cancelled; each connection is a task that feeds bytes into an
`h11.Connection`, collects one request (head + body up to MAX_BODY), awaits `handler(request)` and writes the
response, then starts the next cycle while both sides keep the connection alive. A malformed request gets
h11's suggested status; an exception in the handler gets a 500 and ends only that connection.

Client: `fetch(url)` opens one TCP connection, sends one request with `Connection: close` and reads the
whole response. Errors are `FetchError`s whose `kind` matches curl's exit codes (resolve 6, connect 7,
timeout 28), so `python -m services.apps.client` behaves like curl for scripts.
"""

from __future__ import annotations

import errno
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

import h11
import msgspec
import trio

log = logging.getLogger("apps.http")

MAX_BODY = 1024 * 1024
READ_SIZE = 64 * 1024
REQUEST_TIMEOUT = 30.0


class Request(msgspec.Struct, frozen=True, kw_only=True):
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    peer: str  # "ip:port" of the client as the server's socket sees it

    @property
    def path(self) -> str:
        return self.target.split("?", 1)[0]


class Response(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    body: bytes = b""
    content_type: str = "application/json"


Handler = Callable[[Request], Awaitable[Response]]


def json_response(payload: object, status: int = 200) -> Response:
    return Response(status=status, body=msgspec.json.encode(payload) + b"\n")


# --- server ----------------------------------------------------------------------------------------------


def _peer(stream: trio.abc.Stream) -> str:
    if isinstance(stream, trio.SocketStream):
        addr = stream.socket.getpeername()
        if isinstance(addr, tuple):
            return f"{addr[0]}:{addr[1]}"
    return "unknown"


def _message_bytes(conn: h11.Connection, head: h11.Request | h11.Response, body: bytes) -> bytes:
    """One whole HTTP/1.1 message (head, body, end) as `conn` frames it."""
    data = conn.send(head) or b""
    if body:
        data += conn.send(h11.Data(data=body)) or b""
    return data + (conn.send(h11.EndOfMessage()) or b"")


async def _send_response(stream: trio.abc.Stream, conn: h11.Connection, response: Response) -> None:
    headers = [("content-type", response.content_type), ("content-length", str(len(response.body)))]
    head = h11.Response(status_code=response.status, headers=headers)
    await stream.send_all(_message_bytes(conn, head, response.body))


async def _read_request(stream: trio.abc.Stream, conn: h11.Connection) -> tuple[h11.Request, bytes] | None:
    head: h11.Request | None = None
    body = bytearray()
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
        elif isinstance(event, h11.Request):
            head = event
        elif isinstance(event, h11.Data):
            body += event.data
            if len(body) > MAX_BODY:
                raise h11.RemoteProtocolError("request body too large", error_status_hint=413)
        elif isinstance(event, h11.EndOfMessage):
            assert head is not None
            return head, bytes(body)
        else:  # ConnectionClosed, PAUSED
            return None


async def handle_connection(stream: trio.abc.Stream, handler: Handler) -> None:
    """Serve HTTP/1.1 requests on one connection until either side closes it."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
    peer = _peer(stream)
    while True:
        try:
            with trio.fail_after(REQUEST_TIMEOUT):
                got = await _read_request(stream, conn)
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                body = f"bad request: {exc}\n".encode()
                await _send_response(
                    stream, conn, Response(status=exc.error_status_hint, body=body, content_type="text/plain")
                )
            return
        if got is None:
            return
        head, body = got
        request = Request(
            method=head.method.decode(),
            target=head.target.decode("latin-1"),
            headers={k.decode().lower(): v.decode("latin-1") for k, v in head.headers},
            body=body,
            peer=peer,
        )
        try:
            response = await handler(request)
        except Exception:
            log.exception("handling %s %s failed", request.method, request.target)
            response = Response(status=500, body=b"internal error\n", content_type="text/plain")
        await _send_response(stream, conn, response)
        if conn.our_state is h11.MUST_CLOSE or conn.their_state is h11.MUST_CLOSE:
            return
        try:
            conn.start_next_cycle()
        except h11.LocalProtocolError:
            return


async def serve_app(
    handler: Handler,
    port: int,
    host: str | None = None,
    *,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `handler` on `port` (all addresses) until cancelled; started() with the bound listeners."""

    async def on_connection(stream: trio.SocketStream) -> None:
        try:
            await handle_connection(stream, handler)
        except (trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError) as exc:
            log.debug("connection from %s ended: %r", _peer(stream), exc)
        finally:
            await trio.aclose_forcefully(stream)

    await trio.serve_tcp(on_connection, port, host=host, task_status=task_status)


# --- client ----------------------------------------------------------------------------------------------


class FetchError(Exception):
    """A request that got no HTTP response; `exit_code` follows curl (6 resolve, 7 connect, 28 timeout)."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class FetchResult(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


async def fetch(
    url: str,
    *,
    method: str = "GET",
    body: bytes = b"",
    timeout: float = 10.0,  # noqa: ASYNC109
    headers: dict[str, str] | None = None,
) -> FetchResult:
    """One HTTP/1.1 request to an `http://` URL; the whole response.

    Raises:
        FetchError: bad URL, name not resolved, connection refused/unreachable, timeout, broken response.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or not parts.hostname:
        raise FetchError(f"unsupported URL {url!r}: only http://HOST[:PORT]/PATH", 3)
    host, port = parts.hostname, parts.port or 80
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    try:
        with trio.fail_after(timeout):
            try:
                stream = await trio.open_tcp_stream(host, port)
            except socket.gaierror as exc:
                raise FetchError(f"could not resolve host {host}: {exc.strerror}", 6) from None
            except OSError as exc:
                root = _first_cause(exc)
                code = 28 if root.errno == errno.ETIMEDOUT else 7
                why = root.strerror or root
                raise FetchError(f"failed to connect to {host} port {port}: {why}", code) from None
            async with stream:
                return await _exchange(stream, method, parts.netloc, target, body, headers or {})
    except trio.TooSlowError:
        raise FetchError(f"operation timed out after {timeout:g} s ({url})", 28) from None


def _first_cause(exc: OSError) -> OSError:
    """trio reports "all attempts to connect failed" with the per-address errors as the cause; the first."""
    cause = exc.__cause__
    if isinstance(cause, BaseExceptionGroup):
        cause = cause.exceptions[0]
    return cause if isinstance(cause, OSError) else exc


async def _exchange(
    stream: trio.abc.Stream, method: str, authority: str, target: str, body: bytes, extra: dict[str, str]
) -> FetchResult:
    conn = h11.Connection(h11.CLIENT)
    headers = [
        ("host", authority),
        ("user-agent", "trio-ambient-client/1"),
        ("accept", "*/*"),
        ("connection", "close"),
        *extra.items(),
    ]
    if body or method in ("POST", "PUT", "PATCH"):
        headers.append(("content-length", str(len(body))))
    response: h11.Response | None = None
    try:
        head = h11.Request(method=method, target=target, headers=headers)
        await stream.send_all(_message_bytes(conn, head, body))
        out = bytearray()
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
            elif isinstance(event, h11.Response):
                response = event
            elif isinstance(event, h11.Data):
                out += event.data
            elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                break
    except (trio.BrokenResourceError, h11.ProtocolError) as exc:
        if response is None and not isinstance(exc, trio.BrokenResourceError):
            raise FetchError("empty reply from server (closed before any answer)", 52) from None
        raise FetchError(f"connection broken before a complete response: {exc}", 56) from None
    if response is None:
        raise FetchError("empty reply from server", 52)
    return FetchResult(
        status=response.status_code,
        reason=response.reason.decode("latin-1"),
        headers=[(k.decode(), v.decode("latin-1")) for k, v in response.headers],
        body=bytes(out),
    )
