"""A one-request HTTP/1.1 client on h11 + Trio for the sample apps and `python -m services.apps.client`.

`fetch(url)` opens one TCP connection, sends one request with `Connection: close` and reads the whole
response. Errors are `FetchError`s whose `exit_code` matches curl's (resolve 6, connect 7, timeout 28,
empty reply 52, broken reply 56), so the client behaves like curl for scripts. The apps' server side is
shared.httpd.
"""

from __future__ import annotations

import errno
import socket
from urllib.parse import urlsplit

import h11
import msgspec
import trio

from shared.httpd import message_bytes, receive_body, receive_head


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
        await stream.send_all(message_bytes(conn, head, body))
        response = await receive_head(stream, conn, h11.Response)
        out = b"" if response is None else await receive_body(stream, conn)
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
        body=out,
    )
