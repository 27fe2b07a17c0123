"""The sample apps over real loopback sockets: the bookinfo chain, the echo app, the client's errors."""

from __future__ import annotations

import socket
from collections.abc import Mapping
from functools import partial
from typing import Any

import msgspec
import pytest
import trio

from services.apps.bookinfo import LIMITS, make_handler
from services.apps.http import FetchError, fetch
from shared.httpd import serve_http_tcp


async def serve(nursery: trio.Nursery, kind: str, env: Mapping[str, str]) -> int:
    """Serve app `kind` as its server does (the apps' limits) on a free loopback port; the port."""
    serving = partial(serve_http_tcp, make_handler(kind, env), 0, "127.0.0.1", limits=LIMITS)
    listeners = await nursery.start(serving)
    return int(listeners[0].socket.getsockname()[1])


async def start(nursery: trio.Nursery, kind: str, env: Mapping[str, str]) -> str:
    return f"http://127.0.0.1:{await serve(nursery, kind, env)}"


def decode(body: bytes) -> dict[str, Any]:
    return msgspec.json.decode(body, type=dict[str, Any])


async def test_productpage_calls_details_and_reviews_which_calls_ratings() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            ratings = await start(nursery, "ratings", {"POD_NAME": "ratings-1"})
            details = await start(nursery, "details", {"POD_NAME": "details-1"})
            reviews = await start(
                nursery, "reviews", {"POD_NAME": "reviews-2", "SERVICE_VERSION": "v2", "RATINGS_URL": ratings}
            )
            page = await start(
                nursery, "productpage", {"POD_NAME": "page-1", "DETAILS_URL": details, "REVIEWS_URL": reviews}
            )
            result = await fetch(page + "/productpage")
            nursery.cancel_scope.cancel()
    assert result.status == 200
    body = decode(result.body)
    assert body["served_by"]["pod"] == "page-1"
    assert body["served_by"]["peer"].startswith("127.0.0.1:")
    assert body["details"]["served_by"]["pod"] == "details-1"
    assert body["reviews"]["served_by"]["pod"] == "reviews-2"
    assert body["reviews"]["ratings"]["served_by"]["pod"] == "ratings-1"
    assert [r["rating"] for r in body["reviews"]["reviews"]] == [5, 4]


async def test_reviews_v1_does_not_call_ratings() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            reviews = await start(nursery, "reviews", {"SERVICE_VERSION": "v1"})
            body = decode((await fetch(reviews + "/reviews/0")).body)
            nursery.cancel_scope.cancel()
    assert "ratings" not in body
    assert all("rating" not in r for r in body["reviews"])


async def test_productpage_reports_an_unreachable_upstream_in_the_page() -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}"
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                page = await start(nursery, "productpage", {"DETAILS_URL": dead})
                result = await fetch(page + "/productpage")
                nursery.cancel_scope.cancel()
    body = decode(result.body)
    assert result.status == 200
    assert "failed to connect" in body["details"]["error"]
    assert "REVIEWS_URL unset" in body["reviews"]["error"]


async def test_echo_returns_method_path_body_and_keeps_the_connection_alive() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, "echo", {})
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            request = b"POST /a?b=1 HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\nhi"
            await stream.send_all(request + request)
            data = b""
            while data.count(b"HTTP/1.1 200") < 2:
                data += await stream.receive_some(65536)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    first = data.split(b"\r\n\r\n", 1)[1].split(b"\n", 1)[0]
    assert decode(first)["path"] == "/a?b=1"
    assert decode(first)["body"] == "hi"


async def test_malformed_request_gets_a_400() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            port = await serve(nursery, "echo", {})
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(b"NOT HTTP AT ALL\r\n\r\n")
            data = await stream.receive_some(65536)
            await stream.aclose()
            nursery.cancel_scope.cancel()
    assert data.startswith(b"HTTP/1.1 400")


async def test_unknown_path_is_a_404() -> None:
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            details = await start(nursery, "details", {})
            result = await fetch(details + "/nope")
            health = await fetch(details + "/healthz")
            nursery.cancel_scope.cancel()
    assert result.status == 404
    assert decode(health.body)["status"] == "ok"


async def test_fetch_errors_carry_curl_exit_codes() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
        with pytest.raises(FetchError) as refused:
            await fetch(f"http://127.0.0.1:{port}/")
    assert refused.value.exit_code == 7
    with pytest.raises(FetchError) as bad:
        await fetch("https://example/")
    assert bad.value.exit_code == 3


async def test_fetch_times_out_with_code_28() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # accepts, never answers
        with pytest.raises(FetchError) as info:
            await fetch(f"http://127.0.0.1:{silent.getsockname()[1]}/", timeout=0.3)
    assert info.value.exit_code == 28


def test_unknown_app_kind_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown app 'db'"):
        make_handler("db", {})


async def test_a_server_that_closes_without_answering_is_an_empty_reply() -> None:
    async def close_at_once(stream: trio.SocketStream) -> None:
        await stream.receive_some(1024)
        await stream.aclose()

    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(partial(trio.serve_tcp, close_at_once, 0, host="127.0.0.1"))
            port = listeners[0].socket.getsockname()[1]
            with pytest.raises(FetchError) as info:
                await fetch(f"http://127.0.0.1:{port}/")
            nursery.cancel_scope.cancel()
    assert info.value.exit_code == 52
    assert "empty reply from server" in str(info.value)
