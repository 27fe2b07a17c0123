"""One tunnel's HTTP/1.1 requests at the waypoint: parse, authorize, route, forward, answer.

Theory of operation
-------------------
`HttpProxy.serve(stream, tunnel)` reads requests from the tunnel's stream with h11, one at a time (a
keep-alive connection and pipelined requests alike: h11 keeps what follows a request until its turn), and
for each one:

1. L7 policy (policy.py) over the policies that target the waypoint or the destination service: a denial is
   answered `403` with body `RBAC: access denied`;
2. the route (routes.py) when the tunnel was for a service VIP: `NoRoute` is answered 500; a tunnel
   for a workload's own address goes to that workload;
3. an endpoint of the chosen backend, and a new stream to it (upstream.py; connect failures retried as the
   rule says, then 503);
4. the request head (hop-by-hop headers dropped) and its body are streamed to the endpoint, and the response
   streamed back; then the upstream stream is closed. The rule's timeout covers 3 and 4 (504 when it
   passes before the response started).

Every request, answered locally or not, ends in one access log line and its metrics (telemetry.py). Each
request is drawn its own endpoint and backend, so one connection's requests are balanced separately.

Steps 1-4 (`HttpProxy.request`) are written against a `Downstream`, the client's side of one request:
`_H1Downstream` here, one h2 stream in http2.py; the endpoint is always spoken to in HTTP/1.1.

Bounds: a request head over `MAX_HEAD` bytes is answered 431, malformed HTTP 400 (h11's hint), then the
tunnel's stream is closed (the HBONE connection and its other streams go on); a head must arrive within
`HEAD_TIMEOUT` of waiting for it. Bodies are never buffered whole: they go through in chunks of at most
`READ_SIZE` as the receiver takes them. A request answered locally has its body read and dropped, up to
`MAX_DRAIN` bytes; past that the stream is closed after the answer.
"""

from __future__ import annotations

import logging
import math
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol

import h11
import trio

from services.waypoint.config import Backend, WaypointConfig
from services.waypoint.policy import DENIED_BODY, L7Request, applicable, decide
from services.waypoint.routes import Chosen, NoRoute, choose
from services.waypoint.telemetry import RequestOutcome, WaypointTelemetry
from services.waypoint.upstream import UpstreamError, Upstreams
from services.ztunnel.peers import workload_peer
from services.ztunnel.state.types import Service, TunnelProtocol, Workload
from services.ztunnel.telemetry.access_log import Peer, format_addr
from shared.addr import Addr
from shared.httpd import receive_head
from shared.identity import SpiffeId

log = logging.getLogger("waypoint.http")

READ_SIZE: Final = 64 * 1024
MAX_HEAD: Final = 60 * 1024
"""Envoy's default `max_request_headers_kb` (60 KiB)."""
MAX_DRAIN: Final = 1024 * 1024
HEAD_TIMEOUT: Final = 300.0
"""Seconds a tunnel may sit without sending the next request head (Envoy's stream idle timeout)."""
HOP_BY_HOP: Final = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"te", b"trailer",
                               b"upgrade", b"http2-settings"})
H2_PREFACE: Final = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"


class TunnelAborted(Exception):
    """The exchange broke after the response started (or the client's body did): the tunnel's stream must
    be reset, so that the client does not take a cut response for a whole one."""


@dataclass(frozen=True, kw_only=True)
class Tunnel:
    """What every request of one CONNECT tunnel shares."""

    src_addr: Addr
    src_identity: SpiffeId
    src: Peer
    target: Addr
    service: Service | None
    """The service the tunnel is for (its VIP), or the service of the workload port it is for."""
    workload: Workload | None = None
    """Set when the tunnel is for a workload's own address (then no route applies)."""


async def _next_event(stream: trio.abc.ReceiveStream, conn: h11.Connection) -> object:
    while True:
        event = conn.next_event()
        if event is h11.NEED_DATA:
            conn.receive_data(bytes(await stream.receive_some(READ_SIZE)))
            continue
        return event


async def _send(stream: trio.abc.SendStream, conn: h11.Connection, event: h11.Event) -> None:
    data = conn.send(event)
    if data:
        await stream.send_all(data)


def _forwarded_headers(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    return [(k, v) for k, v in headers if k.lower() not in HOP_BY_HOP and k.lower() != b"expect"]


class Downstream(Protocol):
    """The client's side of one request, whatever HTTP version it speaks (HTTP/1.1 here, HTTP/2 in
    http2.py): the request body as it comes, the response as it goes."""

    @property
    def body_done(self) -> bool:
        """The whole request body was read."""
        ...

    @property
    def head_sent(self) -> bool:
        """The response head went out (an answer can no longer be changed, only cut)."""
        ...

    async def receive_body(self) -> bytes | None:
        """The next chunk of the request body; None at its end.

        Raises:
            DownstreamError: the body is malformed or cut short.
        """
        ...

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> None:
        """The response head; `headers` without hop-by-hop ones (each version adds its framing)."""
        ...

    async def send_data(self, data: bytes) -> None: ...

    async def end(self) -> None:
        """The response is complete."""
        ...


class DownstreamError(Exception):
    """The client's request broke the protocol (a malformed body, a head over the limits)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


class _H1Downstream:
    """One HTTP/1.1 request of a tunnel's h11 connection."""

    def __init__(self, stream: trio.abc.HalfCloseableStream, conn: h11.Connection, *,
                 close: bool = False) -> None:
        self.stream = stream
        self.conn = conn
        self.close = close

    @property
    def body_done(self) -> bool:
        return self.conn.their_state is not h11.SEND_BODY

    @property
    def head_sent(self) -> bool:
        return self.conn.our_state is not h11.SEND_RESPONSE

    async def receive_body(self) -> bytes | None:
        if self.body_done:
            return None
        if self.conn.they_are_waiting_for_100_continue:  # `Expect: 100-continue`: answered here, as Envoy
            await _send(self.stream, self.conn, h11.InformationalResponse(status_code=100, headers=[]))
        try:
            event = await _next_event(self.stream, self.conn)
        except h11.RemoteProtocolError as exc:
            raise DownstreamError(str(exc), exc.error_status_hint) from exc
        if isinstance(event, h11.Data):
            return bytes(event.data)
        if isinstance(event, h11.EndOfMessage):
            return None
        raise DownstreamError(f"unexpected {event!r} inside a request")

    async def send_head(self, status: int, headers: list[tuple[bytes, bytes]], reason: bytes = b"") -> None:
        if self.close:
            headers = [*headers, (b"connection", b"close")]
        await _send(self.stream, self.conn, h11.Response(status_code=status, reason=reason, headers=headers))

    async def send_data(self, data: bytes) -> None:
        await _send(self.stream, self.conn, h11.Data(data=data))

    async def end(self) -> None:
        await _send(self.stream, self.conn, h11.EndOfMessage())


async def sniff(stream: trio.abc.ReceiveStream) -> bytes:
    """The tunnel's first bytes, enough to tell HTTP/2's connection preface (prior knowledge) from an
    HTTP/1.1 request; b"" when the client ended first. Waits up to HEAD_TIMEOUT."""
    first = b""
    with trio.move_on_after(HEAD_TIMEOUT):
        while len(first) < len(H2_PREFACE) and H2_PREFACE.startswith(first):
            data = await stream.receive_some(READ_SIZE)
            if not data:
                break
            first += data
    return first


def is_h2(first: bytes) -> bool:
    return first.startswith(H2_PREFACE)


class HttpProxy:
    """Serves the HTTP tunnels of one waypoint."""

    def __init__(self, *, config: Callable[[], WaypointConfig], upstreams: Upstreams,
                 telemetry: WaypointTelemetry, cluster: str | None = None) -> None:
        self.config = config
        self.upstreams = upstreams
        self.telemetry = telemetry
        self.cluster = cluster

    async def serve(self, stream: trio.abc.HalfCloseableStream, tunnel: Tunnel, first: bytes = b"") -> None:
        """Serve HTTP/1.1 requests until the client ends the stream or one of them ends it; `first`: bytes
        already read from the stream (`sniff`).

        Raises:
            TunnelAborted: reset the stream (a response was cut).
            trio.BrokenResourceError: the stream failed.
        """
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        if first:
            conn.receive_data(first)
        while True:
            try:
                with trio.fail_after(HEAD_TIMEOUT):
                    event = await _next_event(stream, conn)
            except h11.RemoteProtocolError as exc:
                await self._bad_request(_H1Downstream(stream, conn, close=True), tunnel, exc)
                return
            except trio.TooSlowError:
                return
            if not isinstance(event, h11.Request):  # ConnectionClosed: the client is done
                return
            headers = [(bytes(k), bytes(v)) for k, v in event.headers]
            if not await self.request(_H1Downstream(stream, conn), tunnel, bytes(event.method),
                                      bytes(event.target), headers):
                return
            if h11.MUST_CLOSE in (conn.our_state, conn.their_state):
                return
            conn.start_next_cycle()

    def _outcome(self, tunnel: Tunnel, method: str, path: str, authority: str,
                 protocol: str = "HTTP/1.1") -> RequestOutcome:
        service = tunnel.service
        dst = Peer(service=service.hostname, service_name=service.name,
                   service_namespace=service.namespace) if service is not None else Peer()
        return RequestOutcome(src_addr=format_addr(tunnel.src_addr), src=tunnel.src, dst=dst, method=method,
                              path=path, authority=authority, protocol=protocol)

    async def _bad_request(self, down: _H1Downstream, tunnel: Tunnel, exc: h11.RemoteProtocolError) -> None:
        outcome = self._outcome(tunnel, "-", "-", "-")
        outcome.response_flags = "DPE"  # Envoy: downstream protocol error
        status = exc.error_status_hint if exc.error_status_hint in (400, 413, 431) else 400
        log.info("malformed request", extra={"fields": [
            ("src.addr", outcome.src_addr), ("src.identity", tunnel.src_identity.uri), ("error", str(exc))]})
        if down.conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            body = b"Bad Request" if status == 400 else b"Request Header Fields Too Large"
            await self._reply(down, outcome, status, body)
        self.telemetry.request_complete(outcome)

    async def _reply(self, down: Downstream, outcome: RequestOutcome, status: int, body: bytes) -> None:
        outcome.status = status
        await down.send_head(status, [(b"content-type", b"text/plain"),
                                      (b"content-length", str(len(body)).encode())])
        if body and outcome.method != "HEAD":
            await down.send_data(body)
            outcome.bytes_sent += len(body)
        await down.end()

    async def _local(self, down: Downstream, outcome: RequestOutcome, status: int, body: bytes) -> bool:
        """Answer locally once the request body is read and dropped (up to MAX_DRAIN); whether the
        connection may go on."""
        whole = True
        while (chunk := await down.receive_body()) is not None:
            outcome.bytes_received += len(chunk)
            if outcome.bytes_received > MAX_DRAIN:
                whole = False
                break
        if not whole and isinstance(down, _H1Downstream):
            down.close = True
        await self._reply(down, outcome, status, body)
        return whole

    async def request(self, down: Downstream, tunnel: Tunnel, method_raw: bytes, target_raw: bytes,
                      raw_headers: list[tuple[bytes, bytes]], *, protocol: str = "HTTP/1.1") -> bool:
        """One request, answered; whether the connection may carry the next. `raw_headers` as the client
        sent them (HTTP/2: `host` from `:authority`, no pseudo-headers)."""
        method = method_raw.decode("ascii", "replace")
        target = target_raw.decode("latin-1")
        path = target.partition("?")[0]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in raw_headers}
        outcome = self._outcome(tunnel, method, path, headers.get("host", ""), protocol)
        try:
            return await self._decide_and_forward(down, tunnel, method_raw, target_raw, raw_headers, headers,
                                                  outcome)
        except DownstreamError as exc:  # the client's body was malformed
            outcome.response_flags = "DPE"
            log.info("malformed request body", extra={"fields": [
                ("src.addr", outcome.src_addr), ("error", str(exc))]})
            if down.head_sent:
                raise TunnelAborted(f"malformed request body: {exc}") from exc
            if isinstance(down, _H1Downstream):
                down.close = True
            await self._reply(down, outcome, 400, b"Bad Request")
            return False
        finally:
            self.telemetry.request_complete(outcome)

    async def _decide_and_forward(self, down: Downstream, tunnel: Tunnel, method_raw: bytes,
                                  target_raw: bytes, raw_headers: list[tuple[bytes, bytes]],
                                  headers: dict[str, str], outcome: RequestOutcome) -> bool:
        config = self.config()
        service = tunnel.service
        hostname = service.hostname if service is not None else None
        decision = decide(applicable(config.policies, hostname), L7Request(
            method=outcome.method, path=outcome.path, host=outcome.authority, port=tunnel.target[1],
            headers=headers, src_identity=tunnel.src_identity, service=hostname))
        if not decision.allowed:
            log.info("request denied", extra={"fields": [
                ("src.identity", tunnel.src_identity.uri), ("method", outcome.method), ("path", outcome.path),
                ("dst.service", hostname), ("reason", decision.reason)]})
            return await self._local(down, outcome, 403, DENIED_BODY)
        if tunnel.workload is None and hostname is not None:
            chosen = choose(config.routes, hostname, port=tunnel.target[1], method=outcome.method,
                            path=outcome.path, headers=headers, rng=self.upstreams.rng)
        else:
            chosen = Chosen(backend=Backend(service=hostname or ""))
        if isinstance(chosen, NoRoute):
            outcome.response_flags = chosen.response_flag
            return await self._local(down, outcome, chosen.status, chosen.reason.encode())
        outcome.route_name = chosen.route_name
        try:
            dst = self._destination(tunnel, chosen.backend)
        except UpstreamError as exc:
            outcome.response_flags = exc.response_flag
            return await self._local(down, outcome, exc.status, exc.body.encode())
        timeout = chosen.timeout if chosen.timeout is not None else math.inf
        with trio.move_on_after(timeout):
            return await self._forward(down, tunnel, method_raw, target_raw, raw_headers, outcome, dst,
                                       chosen)
        outcome.response_flags = "UT"
        if down.head_sent:
            raise TunnelAborted("upstream request timeout after the response started")
        whole = down.body_done  # a body cut short: the connection cannot go on
        if not whole and isinstance(down, _H1Downstream):
            down.close = True
        await self._reply(down, outcome, 504, b"upstream request timeout")
        return whole

    def _destination(self, tunnel: Tunnel, backend: Backend) -> Addr:
        service = tunnel.service
        if tunnel.workload is not None or (
                service is not None and backend.service == service.hostname and backend.port is None):
            return tunnel.target
        return self.upstreams.backend_addr(backend.service, backend.port or tunnel.target[1])

    async def _forward(self, down: Downstream, tunnel: Tunnel, method_raw: bytes, target_raw: bytes,
                       raw_headers: list[tuple[bytes, bytes]], outcome: RequestOutcome, dst: Addr,
                       chosen: Chosen) -> bool:
        try:
            opened = await self.upstreams.open(dst, forwarded_for=tunnel.src_addr, retries=chosen.retries)
        except UpstreamError as exc:
            outcome.response_flags = exc.response_flag
            log.warning("upstream unavailable", extra={"fields": [
                ("dst.hbone_addr", format_addr(dst)), ("error", str(exc))]})
            return await self._local(down, outcome, exc.status, exc.body.encode())
        outcome.upstream_host = opened.host
        if opened.workload is not None:
            outcome.dst = workload_peer(opened.workload, service=opened.service or tunnel.service,
                                        mtls=opened.workload.tunnel_protocol is TunnelProtocol.HBONE,
                                        cluster=self.cluster)
        upstream = opened.stream
        try:
            up = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
            request_headers = _forwarded_headers(raw_headers)
            if not any(k.lower() == b"x-request-id" for k, _ in request_headers):
                request_headers.append((b"x-request-id", str(uuid.uuid4()).encode()))
            if not any(k.lower() in (b"content-length", b"transfer-encoding") for k, _ in request_headers) \
                    and not down.body_done:
                request_headers.append((b"transfer-encoding", b"chunked"))  # HTTP/2: a body of unknown size
            await _send(upstream, up, h11.Request(method=method_raw, target=target_raw,
                                                  headers=request_headers))
            while (chunk := await down.receive_body()) is not None:
                outcome.bytes_received += len(chunk)
                if chunk:
                    await _send(upstream, up, h11.Data(data=chunk))
            await _send(upstream, up, h11.EndOfMessage())
            return await self._relay_response(down, upstream, up, outcome)
        finally:
            await trio.aclose_forcefully(upstream)

    async def _relay_response(self, down: Downstream, upstream: trio.abc.HalfCloseableStream,
                              up: h11.Connection, outcome: RequestOutcome) -> bool:
        try:
            response = await receive_head(upstream, up, h11.Response)
        except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
            log.warning("upstream reset before the response", extra={"fields": [
                ("upstream_host", outcome.upstream_host), ("error", str(exc))]})
            response = None
        if response is None:
            outcome.response_flags = "UC"
            await self._reply(down, outcome, 503, b"upstream connect error or disconnect/reset "
                              b"before headers. reset reason: connection termination")
            return True
        outcome.status = response.status_code
        await down.send_head(response.status_code, _forwarded_headers(list(response.headers)),
                             reason=bytes(response.reason))
        try:
            while True:
                event = await _next_event(upstream, up)
                if isinstance(event, h11.Data):
                    outcome.bytes_sent += len(event.data)
                    await down.send_data(bytes(event.data))
                elif isinstance(event, h11.EndOfMessage):
                    await down.end()
                    return True
                else:
                    raise TunnelAborted(f"unexpected {event!r} in the upstream response")
        except (h11.RemoteProtocolError, trio.BrokenResourceError) as exc:
            outcome.response_flags = "UPE"
            raise TunnelAborted(f"the upstream response broke off: {exc}") from exc
