"""shared.httpd over in-memory streams (one connection, no sockets) and a real Unix socket: routing, limits,
errors, keep-alive."""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator
from pathlib import Path

import pytest
import trio
import trio.testing

from shared.httpd import (
    DEFAULT_LIMITS,
    Limits,
    Request,
    Response,
    Router,
    json_response,
    open_unix_listener,
    serve_connection,
    serve_http,
    text_response,
)


async def echo(request: Request) -> Response:
    return json_response({"method": request.method, "path": request.path, "query": request.query,
                          "body": request.body.decode(), "agent": request.headers.get("user-agent")})


async def boom(request: Request) -> Response:
    raise RuntimeError("the handler broke")


ROUTER = Router({"/echo": echo, "/boom": boom})


async def exchange(data: bytes, *, limits: Limits = DEFAULT_LIMITS, server: str | None = None) -> bytes:
    """Send `data` on one connection served by ROUTER; everything the server wrote until it closed."""
    client, server_end = trio.testing.memory_stream_pair()

    async def serve() -> None:
        try:
            await serve_connection(server_end, ROUTER, limits=limits, server=server)
        finally:
            await server_end.aclose()

    out = b""
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve)
            await client.send_all(data)
            while chunk := await client.receive_some(65536):
                out += chunk
    return out


def request(target: str, body: bytes = b"", *, method: str = "POST", close: bool = True) -> bytes:
    connection = "connection: close\r\n" if close else ""
    return (f"{method} {target} HTTP/1.1\r\nhost: x\r\nuser-agent: t/1\r\ncontent-length: {len(body)}\r\n"
            f"{connection}\r\n").encode() + body


async def test_a_request_reaches_its_route_with_query_headers_and_body() -> None:
    out = await exchange(request("/echo?level=debug&a=1", b"hi"))
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and b"content-type: application/json" in head
    assert body == (b'{"method":"POST","path":"/echo","query":{"level":["debug"],"a":["1"]},"body":"hi",'
                    b'"agent":"t/1"}\n')


async def test_an_unknown_path_is_a_404_naming_the_routes() -> None:
    out = await exchange(request("/nope"))
    assert out.startswith(b"HTTP/1.1 404") and out.endswith(b"not found; try /echo or /boom\n")


async def test_keep_alive_serves_pipelined_requests_in_order() -> None:
    out = await exchange(request("/echo?n=1", close=False) + request("/echo?n=2"), server="ztunnel")
    assert out.count(b"HTTP/1.1 200") == 2 and out.count(b"server: ztunnel") == 2
    assert out.index(b'"n":["1"]') < out.index(b'"n":["2"]')


async def test_a_handler_exception_is_a_500_and_the_server_keeps_serving() -> None:
    out = await exchange(request("/boom"))
    assert out.startswith(b"HTTP/1.1 500") and out.endswith(b"internal error: the handler broke\n")
    assert (await exchange(request("/echo"))).startswith(b"HTTP/1.1 200")


async def test_a_body_over_the_limit_is_a_413() -> None:
    out = await exchange(request("/echo", b"x" * 11), limits=Limits(max_body=10))
    assert out.startswith(b"HTTP/1.1 413") and b"request body too large (over 10 bytes)" in out
    fits = await exchange(request("/echo", b"x" * 10), limits=Limits(max_body=10))
    assert fits.startswith(b"HTTP/1.1 200")


async def test_a_malformed_request_gets_h11s_status() -> None:
    assert (await exchange(b"NOT HTTP AT ALL\r\n\r\n")).startswith(b"HTTP/1.1 400")
    huge_head = b"GET / HTTP/1.1\r\nhost: x\r\nx-big: " + b"a" * 2000  # still incomplete past the limit
    assert (await exchange(huge_head, limits=Limits(max_head=1024))).startswith(b"HTTP/1.1 431")


async def test_an_incomplete_request_times_out(autojump_clock: trio.testing.MockClock) -> None:
    client, server_end = trio.testing.memory_stream_pair()
    await client.send_all(b"GET /echo HTTP/1.1\r\n")
    with pytest.raises(trio.TooSlowError):
        await serve_connection(server_end, ROUTER, limits=Limits(request_timeout=3.0))
    assert trio.current_time() == pytest.approx(3.0)


async def test_serve_http_on_a_unix_socket(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "http.sock")

    async def hello(request: Request) -> Response:
        return text_response("hello\n")

    with pytest.raises(OSError, match="run does not exist; create it"):  # never made silently
        await open_unix_listener(path)
    (tmp_path / "run").mkdir()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            listener = await open_unix_listener(path)
            await nursery.start(serve_http, hello, [listener])
            assert oct(os.stat(path).st_mode & 0o777) == "0o600"
            stream = await trio.open_unix_socket(path)
            await stream.send_all(request("/", method="GET"))
            out = b""
            while chunk := await stream.receive_some(65536):
                out += chunk
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert out.startswith(b"HTTP/1.1 200") and out.endswith(b"\r\n\r\nhello\n")


async def test_open_unix_listener_replaces_a_stale_socket_but_no_other_file(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    (await open_unix_listener(path)).socket.close()
    second = await open_unix_listener(path)  # the stale socket file is replaced
    second.socket.close()
    os.unlink(path)
    Path(path).write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        await open_unix_listener(path)


async def test_a_streamed_response_is_chunked_and_cancelled_when_the_client_leaves() -> None:
    release = trio.Event()
    finished: list[str] = []

    async def chunks() -> AsyncGenerator[bytes, None]:
        try:
            yield b"first\n"
            await release.wait()
            yield b"second\n"
            await trio.sleep_forever()
        finally:
            finished.append("closed")

    async def streamed(request: Request) -> Response:
        return Response(content_type="application/x-ndjson", stream=chunks)

    client, server_end = trio.testing.memory_stream_pair()
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            async def serve() -> None:
                try:
                    await serve_connection(server_end, streamed)
                finally:
                    await server_end.aclose()
                    finished.append("connection closed")

            nursery.start_soon(serve)
            await client.send_all(b"GET /s HTTP/1.1\r\nhost: x\r\n\r\n")
            head = b""
            while b"first\n" not in head:
                head += await client.receive_some(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            assert b"transfer-encoding: chunked" in head.lower() and b"content-length" not in head.lower()
            release.set()
            rest = b""
            while b"second\n" not in rest:
                rest += await client.receive_some(65536)
            await client.aclose()  # the reader goes away mid-stream
    assert finished == ["closed", "connection closed"]


async def test_open_unix_listener_refuses_a_socket_a_live_process_serves(tmp_path: Path) -> None:
    path = str(tmp_path / "http.sock")
    first = await open_unix_listener(path)
    try:
        with pytest.raises(OSError, match="another live process is serving"):
            await open_unix_listener(path)
        assert os.path.exists(path)  # the first server's socket file is left in place
    finally:
        first.socket.close()
    (await open_unix_listener(path)).socket.close()  # once it is gone, the stale file is replaced
