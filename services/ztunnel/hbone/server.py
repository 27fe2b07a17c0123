"""The HBONE server side (a pod's 15008): mTLS termination, CONNECT validation, then what the policy says.

Theory of operation
-------------------
The caller accepts (the in-pod proxy set's accept loop) and hands each connection to
`serve_hbone_connection`, with an `InboundPolicy`: the one seam between this transport and the proxy above
it (proxy/inbound.py implements it; tests use a fake). Per connection:

1. TLS 1.3 handshake with this workload's certificate, requiring a client certificate of our trust domain
   (a plaintext or untrusted client fails here, with the TLS alert): `policy.refused(outcome)`, logged;
2. `policy.accepted(conn)` once the handshake succeeded, before any stream (so the caller can GOAWAY the
   connection later, when its pod drains);
3. an h2 `ServerCore` that answers 400 itself to anything but a CONNECT to this connection's local IP
   (`policy.refused(outcome)` with that status); a CONNECT to one of ztunnel's own ports is answered 400 as
   a self call (its outcome goes to `policy.closed`, counted as failed);
4. per valid CONNECT, in its own task: `policy.outcome(info)` names the tunnel's ends;
   `policy.authorize(info)` -> 401 when it denies; `policy.open_upstream(info)` -> 503 when it raises
   `ConnectError` or `OSError`; else `policy.opened(outcome)`, 200, and `relay()` between the stream and the
   upstream socket, with half-close. When the stream ends, its outcome (status, bytes, error) goes to
   `policy.closed(outcome)`: once per stream, for the access log and the metrics.

A waypoint serves its tunnels itself: `serve_hbone_tunnels` runs the same connection (TLS, bounds, core)
without the own-IP check and hands each valid CONNECT to its tunnel handler, which answers and carries it;
its `ConnectionPolicy` only hears `accepted` and `refused`.

The policy's methods are plain calls except `open_upstream`; authorization is synchronous (a decision over
the state as it is now). A bug in the policy fails its stream (503 or a reset), never the connection.

Bounds (docs/limits.md has them all): once our certificate is at hand, the client has `handshake_timeout`
(10 s) to finish the TLS handshake and send its first CONNECT, else the connection is closed (a GOAWAY once
TLS is up); an authenticated connection that has carried no stream for `idle_timeout` gets GOAWAY and is
closed; a stream the peer resets before it was answered is never connected to the app (the connect is
abandoned if it was under way), and more than 20 such resets a second end the connection with GOAWAY
ENHANCE_YOUR_CALM (connection.py). A stream past the 200-stream cap is refused alone with REFUSED_STREAM
(core.py).
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Awaitable, Callable
from math import inf
from typing import Any, Final, Protocol, cast

import msgspec
import trio

from services.ztunnel.errors import ConnectError
from services.ztunnel.hbone.connection import PING_INTERVAL, PING_TIMEOUT, HboneConnection
from services.ztunnel.hbone.core import (
    ERROR_CANCEL,
    ERROR_INTERNAL,
    ConnectRequested,
    ServerCore,
    StreamRejected,
)
from services.ztunnel.hbone.errors import HboneError
from services.ztunnel.hbone.pool import CertSource
from services.ztunnel.hbone.relay import relay
from services.ztunnel.hbone.stream import HboneStream
from services.ztunnel.hbone.tls import (
    TlsContextCache,
    check_established,
    describe_ssl_error,
    server_connection,
)
from services.ztunnel.hbone.tlsstream import TlsSocketStream
from services.ztunnel.net import SELF_CALL_ERROR, ZTUNNEL_PORTS, describe_os_error, peer_addr
from services.ztunnel.telemetry.access_log import ConnectionOutcome, format_addr
from services.ztunnel.telemetry.trace import Verdict
from shared.addr import Addr, format_host_port
from shared.errors import AmbientError
from shared.identity import SpiffeId

log = logging.getLogger("ztunnel.hbone")

HANDSHAKE_TIMEOUT: Final = 10.0  # upstream's TLS listener default; ours covers the first CONNECT too
IDLE_TIMEOUT: Final = 600.0  # twice upstream's POOL_UNUSED_RELEASE_TIMEOUT: a client pool lets go first
EARLY_RESET: Final = "the peer reset the stream before it was answered"
POLICY_REJECTION: Final = "connection closed due to policy rejection"


def policy_rejection(reason: str) -> str:
    """Upstream's error for a connection its policy denied, with the reason when there is one."""
    return f"{POLICY_REJECTION}: {reason}" if reason else POLICY_REJECTION


class InboundInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One CONNECT request as the policy sees it."""

    src_addr: Addr
    """The TCP peer: the client's ztunnel, from the client pod's netns, so the client pod's IP."""
    dst_addr: Addr
    """Our 15008 address (the pod IP)."""
    target: Addr
    """The `:authority`: the app address to connect to (same IP as dst_addr)."""
    src_identity: SpiffeId
    forwarded: str | None = None
    traceparent: str | None = None
    baggage: str | None = None


class ConnectionPolicy(Protocol):
    """What the server tells its owner about one accepted connection, whoever serves its tunnels."""

    def accepted(self, conn: HboneConnection) -> None:
        """The TLS handshake succeeded; no stream yet."""
        ...

    def refused(self, outcome: ConnectionOutcome) -> None:
        """The connection (handshake, identity) or a request (400 from the core) was refused before any
        tunnel: `outcome` has the TCP addresses, the error and, for a request, the status."""
        ...


TunnelHandler = Callable[[HboneConnection, HboneStream, InboundInfo], Awaitable[None]]
"""Serves one valid CONNECT in its own task (`serve_hbone_tunnels`): answers it (`conn.respond`) and
carries it until it ends. The connection's other streams never wait for it."""


class InboundPolicy(ConnectionPolicy, Protocol):
    """What the server asks of the proxy for one accepted connection (see the theory of operation)."""

    def outcome(self, info: InboundInfo) -> ConnectionOutcome:
        """The record of the tunnel `info` asks for, its ends named; the server fills in the rest."""
        ...

    def authorize(self, info: InboundInfo) -> Verdict: ...

    async def open_upstream(self, info: InboundInfo) -> socket.socket:
        """The connected, non-blocking socket to the app at `info.target`.

        Raises:
            ConnectError, OSError: no connection (answered 503).
        """
        ...

    def opened(self, outcome: ConnectionOutcome) -> None:
        """The tunnel is open (authorized, upstream connected): its 200 goes out next."""
        ...

    def closed(self, outcome: ConnectionOutcome) -> None:
        """The stream ended; `outcome` is complete."""
        ...


def inbound_info(conn: HboneConnection, event: ConnectRequested) -> InboundInfo:
    """The CONNECT `event` of `conn`, as a policy or a tunnel handler sees it."""
    def text(name: bytes) -> str | None:
        value = event.header(name)
        return value.decode("latin-1") if value is not None else None

    return InboundInfo(src_addr=conn.peer_addr, dst_addr=conn.local_addr, target=event.target,
                       src_identity=conn.peer_identity, forwarded=text(b"forwarded"),
                       traceparent=text(b"traceparent"), baggage=text(b"baggage"))


class _Server:
    def __init__(self, *, identity: SpiffeId, certs: CertSource, contexts: TlsContextCache,
                 policy: ConnectionPolicy, handshake_timeout: float, ping_interval: float | None,
                 ping_timeout: float, idle_timeout: float | None,
                 handler: TunnelHandler | None = None) -> None:
        self.identity = identity
        self.certs = certs
        self.contexts = contexts
        self.policy = policy
        self.handler = handler
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.idle_timeout = idle_timeout

    def _refused(self, peer: Addr, local: Addr, error: str, status: int | None = None) -> None:
        outcome = ConnectionOutcome(direction="inbound", src_addr=format_addr(peer),
                                    dst_addr=format_addr(local))
        outcome.error = error
        outcome.status = status
        self.policy.refused(outcome)

    async def serve_connection(self, sock: socket.socket, peer: Addr) -> None:
        local = peer_addr(sock.getsockname())
        try:
            try:
                bundle = await self.certs.fetch_certificate(self.identity)
                # The client's time starts once we can answer: TLS done and the first CONNECT in.
                deadline = trio.current_time() + self.handshake_timeout
                tls = TlsSocketStream(sock, server_connection(self.contexts.server(bundle), sock))
                with trio.move_on_at(deadline) as scope:
                    await tls.do_handshake()
                if scope.cancelled_caught:
                    raise HboneError(f"TLS handshake timed out after {self.handshake_timeout:g}s")
                identity = check_established(tls.ssl)
            except AmbientError as exc:  # TLS/identity failures, or no certificate for this workload
                log.warning("inbound HBONE connection refused", extra={"fields": [
                    ("src.addr", format_host_port(*peer)), ("error", str(exc))]})
                self._refused(peer, local, str(exc))
                return
            # A tunnel handler (a waypoint) decides which targets it serves; the pod's own 15008 takes only
            # its own IP.
            core = ServerCore(None if self.handler is not None else [local[0]])
            conn = HboneConnection(tls, core, peer_identity=identity, local_addr=local,
                                   peer_addr=peer, ping_interval=self.ping_interval,
                                   ping_timeout=self.ping_timeout,
                                   idle_timeout=self.idle_timeout if self.idle_timeout is not None else inf,
                                   first_stream_deadline=deadline)

            handler = self.handler

            def on_request(stream: HboneStream, event: ConnectRequested) -> None:
                if handler is not None:
                    conn.spawn(handler, conn, stream, inbound_info(conn, event))
                else:
                    conn.spawn(self.serve_stream, conn, stream, event)

            def on_rejected(event: StreamRejected) -> None:
                reason = event.reason or f"rejected with status {event.status}"
                self._refused(peer, local, reason, event.status)

            conn.on_request = on_request
            conn.on_rejected = on_rejected
            self.policy.accepted(conn)
            await conn.run()
            if conn.error is not None and isinstance(conn.error, HboneError) and not conn.streams:
                log.debug("inbound HBONE connection ended", extra={"fields": [
                    ("src.addr", format_host_port(*peer)), ("error", str(conn.error))]})
        finally:
            sock.close()

    async def serve_stream(self, conn: HboneConnection, stream: HboneStream, event: ConnectRequested) -> None:
        policy = cast(InboundPolicy, self.policy)  # without a handler, the policy serves the tunnels
        info = inbound_info(conn, event)
        outcome: ConnectionOutcome | None = None
        upstream: socket.socket | None = None
        error: str | None = None
        try:
            outcome = policy.outcome(info)
            if event.target[1] in ZTUNNEL_PORTS:  # back into ztunnel: a loop (upstream: 400, SelfCall)
                outcome.status = 400
                error = SELF_CALL_ERROR
                conn.respond(stream, 400)
                return
            verdict = policy.authorize(info)
            outcome.verdict = verdict
            if not verdict.allowed:
                outcome.status = 401
                error = policy_rejection(verdict.reason)
                conn.respond(stream, 401)
                return
            # A stream the peer already reset (rapid reset) never reaches the app; one reset while its
            # connect is under way abandons the connect.
            with conn.cancel_on_reset(stream) as reset_scope:
                if not reset_scope.cancel_called:  # checked first: a connect starts before its checkpoint
                    try:
                        upstream = await policy.open_upstream(info)
                    except (ConnectError, OSError) as exc:
                        outcome.status = 503
                        error = str(exc) if isinstance(exc, ConnectError) else describe_os_error(exc)
                        conn.respond(stream, 503)
                        return
            if upstream is None:
                error = EARLY_RESET
                return
            outcome.status = 200
            policy.opened(outcome)
            conn.respond(stream, 200)
            await relay(stream, upstream, fresh=True)
        except OSError as exc:
            error = describe_os_error(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            error = str(cause) or "the HBONE stream was closed"
        except Exception as exc:
            # A bug in the policy: this stream fails, the connection and its other streams carry on.
            log.exception("inbound HBONE stream failed", extra={"fields": [
                ("src.addr", format_host_port(*conn.peer_addr)),
                ("dst.hbone_addr", format_host_port(*event.target))]})
            error = f"internal error: {exc!r}"
            if stream.status is None:
                conn.respond(stream, 503)
            else:
                stream.reset(ERROR_INTERNAL)
        except BaseException:
            # Cancelled (the pod is going away): the client must not take a truncated stream for a
            # complete one.
            error = error or "connection drained"
            stream.reset(ERROR_CANCEL)
            raise
        finally:
            if upstream is not None:
                upstream.close()
            stream.close_nowait()
            if outcome is not None:
                outcome.bytes_sent = stream.bytes_received  # client -> app
                outcome.bytes_recv = stream.bytes_sent
                outcome.error = error
                policy.closed(outcome)


async def _guarded(server: _Server, sock: socket.socket, peer: Addr) -> None:
    try:
        await server.serve_connection(sock, peer)
    except Exception as exc:
        # One connection's failure never takes down the listener or the pod's other connections.
        log.exception("inbound HBONE connection failed", extra={"fields": [
            ("src.addr", format_host_port(*peer)), ("error", describe_ssl_error(exc))]})
    finally:
        sock.close()


async def serve_hbone_connection(sock: socket.socket, peer: tuple[Any, ...], *, identity: SpiffeId,
                                 certs: CertSource, contexts: TlsContextCache, policy: InboundPolicy,
                                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                                 ping_interval: float | None = PING_INTERVAL,
                                 ping_timeout: float = PING_TIMEOUT,
                                 idle_timeout: float | None = IDLE_TIMEOUT) -> None:
    """Serve one accepted 15008 connection until it ends; closes `sock`.

    Args:
        peer: the address `accept()` returned (IPv6 4-tuples and v4-mapped addresses are fine).
        identity: the workload identity whose certificate is presented (the pod's).
        certs: certificate source (`fetch_certificate(identity)` per connection; cheap when cached).
        contexts: TLS context cache; `contexts.roots` are the trust anchors.
        policy: what to do with the connection and its tunnels (see `InboundPolicy`).
        handshake_timeout: from accept, for the TLS handshake and the first CONNECT together.
        idle_timeout: an authenticated connection carrying no stream this long is closed (None: never).

    Peer and TLS failures are reported to `policy.refused` and logged, never raised.
    """
    server = _Server(identity=identity, certs=certs, contexts=contexts, policy=policy,
                     handshake_timeout=handshake_timeout, ping_interval=ping_interval,
                     ping_timeout=ping_timeout, idle_timeout=idle_timeout)
    sock.setblocking(False)
    await _guarded(server, sock, peer_addr(tuple(peer)))


async def serve_hbone_tunnels(sock: socket.socket, peer: tuple[Any, ...], *, identity: SpiffeId,
                              certs: CertSource, contexts: TlsContextCache, policy: ConnectionPolicy,
                              handler: TunnelHandler, handshake_timeout: float = HANDSHAKE_TIMEOUT,
                              ping_interval: float | None = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                              idle_timeout: float | None = IDLE_TIMEOUT) -> None:
    """`serve_hbone_connection` for a proxy that serves the tunnels itself (the waypoint): the same TLS,
    bounds and core, but a CONNECT to any ip:port reaches `handler` (in its own task), which answers it and
    carries the stream; `policy` hears only of the connection (`accepted`, `refused`)."""
    server = _Server(identity=identity, certs=certs, contexts=contexts, policy=policy,
                     handshake_timeout=handshake_timeout, ping_interval=ping_interval,
                     ping_timeout=ping_timeout, idle_timeout=idle_timeout, handler=handler)
    sock.setblocking(False)
    await _guarded(server, sock, peer_addr(tuple(peer)))
