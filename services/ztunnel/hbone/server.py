"""The HBONE server (a pod's 15008 listener): mTLS termination, CONNECT validation, authorization, upstream.

Theory of operation
-------------------
`serve_hbone()` accepts on a listening socket until cancelled; every connection is handled in
`handler_nursery` (one pod's connections never outlive its proxy set). Per connection:

1. TLS 1.3 handshake with this workload's certificate, requiring a client certificate of our trust domain
   (a plaintext or untrusted client fails here, with the TLS alert, and is logged);
2. an h2 `ServerCore` that answers 400 itself to anything but a CONNECT to this connection's local IP;
3. per valid CONNECT, in its own task: `authorize(info)` -> 401 on deny; `open_upstream(info)` -> 503 when it
   raises; else 200 and `relay()` between the stream and the upstream socket, with half-close.

`on_connection(conn)` is called once a connection's handshake succeeded (before any stream), so the caller
can close it later (a GOAWAY when its pod drains). `on_open(info)` is called when a tunnel opens (just
before its 200, for "connection opened" lines); each stream ends with one `InboundRecord` passed to
`on_complete` (for the access log and metrics): the status, the byte counts and the error, if any.
Connection-level failures (handshake, protocol) give a record with `target=None`.
"""

from __future__ import annotations

import inspect
import logging
import os
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import trio

from services.ztunnel.authz import AuthzRequest, Decision
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
from services.ztunnel.net import accept_forever, describe_os_error, peer_addr
from shared.errors import AmbientError
from shared.identity import SpiffeId

log = logging.getLogger("ztunnel.hbone")

HANDSHAKE_TIMEOUT: Final = 10.0

Addr = tuple[str, int]


class InboundInfo(msgspec.Struct, frozen=True, kw_only=True):
    """One CONNECT request as the authorizer and the upstream connector see it."""

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

    def authz_request(self) -> AuthzRequest:
        """What `authz` decides on: the TCP peer's IP, the target, and the verified peer identity."""
        return AuthzRequest(src_ip=self.src_addr[0], dst_ip=self.target[0], dst_port=self.target[1],
                            src_identity=self.src_identity)


class InboundRecord(msgspec.Struct, kw_only=True):
    """What happened to one stream (or a connection that failed before any stream)."""

    src_addr: Addr
    dst_addr: Addr
    target: Addr | None = None
    src_identity: SpiffeId | None = None
    status: int | None = None
    bytes_sent: int = 0
    """To the client (upstream's `bytes_sent` for inbound)."""
    bytes_recv: int = 0
    started: float = 0.0
    duration: float = 0.0
    error: str | None = None
    decision: Decision | None = None


Authorizer = Callable[[InboundInfo], "Decision | Awaitable[Decision]"]
UpstreamOpener = Callable[[InboundInfo], Awaitable[socket.socket]]


class _Server:
    def __init__(self, *, identity: SpiffeId, certs: CertSource, contexts: TlsContextCache,
                 authorize: Authorizer, open_upstream: UpstreamOpener,
                 on_complete: Callable[[InboundRecord], None] | None,
                 on_open: Callable[[InboundInfo], None] | None, handshake_timeout: float,
                 ping_interval: float | None, ping_timeout: float,
                 on_connection: Callable[[HboneConnection], None] | None = None) -> None:
        self.identity = identity
        self.certs = certs
        self.contexts = contexts
        self.authorize = authorize
        self.open_upstream = open_upstream
        self.on_complete = on_complete
        self.on_open = on_open
        self.on_connection = on_connection
        self.handshake_timeout = handshake_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout

    def _report(self, record: InboundRecord) -> None:
        if self.on_complete is not None:
            self.on_complete(record)

    async def serve_connection(self, sock: socket.socket, peer: Addr) -> None:
        local = peer_addr(sock.getsockname())
        record = InboundRecord(src_addr=peer, dst_addr=local, started=time.time())
        try:
            try:
                bundle = await self.certs.fetch_certificate(self.identity)
                tls = TlsSocketStream(sock, server_connection(self.contexts.server(bundle), sock))
                with trio.move_on_after(self.handshake_timeout) as scope:
                    await tls.do_handshake()
                if scope.cancelled_caught:
                    raise HboneError(f"TLS handshake timed out after {self.handshake_timeout:g}s")
                identity = check_established(tls.ssl)
            except AmbientError as exc:  # TLS/identity failures, or no certificate for this workload
                record.error = str(exc)
                log.warning("inbound HBONE connection refused", extra={"fields": [
                    ("src.addr", f"{peer[0]}:{peer[1]}"), ("error", record.error)]})
                self._report(record)
                return
            conn = HboneConnection(tls, ServerCore([local[0]]), peer_identity=identity, local_addr=local,
                                   peer_addr=peer, ping_interval=self.ping_interval,
                                   ping_timeout=self.ping_timeout)

            def on_request(stream: HboneStream, event: ConnectRequested) -> None:
                conn.spawn(self.serve_stream, conn, stream, event)

            def on_rejected(event: StreamRejected) -> None:
                self._report(InboundRecord(src_addr=peer, dst_addr=local, src_identity=identity,
                                           status=event.status, started=time.time(), error=event.reason))

            conn.on_request = on_request
            conn.on_rejected = on_rejected
            if self.on_connection is not None:
                self.on_connection(conn)
            await conn.run()
            if conn.error is not None and isinstance(conn.error, HboneError) and not conn.streams:
                log.debug("inbound HBONE connection ended", extra={"fields": [
                    ("src.addr", f"{peer[0]}:{peer[1]}"), ("error", str(conn.error))]})
        finally:
            sock.close()

    async def serve_stream(self, conn: HboneConnection, stream: HboneStream, event: ConnectRequested) -> None:
        def text(name: bytes) -> str | None:
            value = event.header(name)
            return value.decode("latin-1") if value is not None else None

        info = InboundInfo(src_addr=conn.peer_addr, dst_addr=conn.local_addr, target=event.target,
                           src_identity=conn.peer_identity, forwarded=text(b"forwarded"),
                           traceparent=text(b"traceparent"), baggage=text(b"baggage"))
        record = InboundRecord(src_addr=conn.peer_addr, dst_addr=conn.local_addr, target=event.target,
                               src_identity=conn.peer_identity, started=time.time())
        upstream: socket.socket | None = None
        try:
            decision = self.authorize(info)
            if inspect.isawaitable(decision):
                decision = await decision
            assert isinstance(decision, Decision)
            record.decision = decision
            if not decision.allowed:
                record.status = 401
                record.error = "connection closed due to policy rejection"
                if decision.reason:
                    record.error += f": {decision.reason}"
                conn.respond(stream, 401)
                return
            try:
                upstream = await self.open_upstream(info)
            except (ConnectError, OSError) as exc:
                record.status = 503
                record.error = str(exc) if isinstance(exc, ConnectError) else describe_os_error(exc)
                conn.respond(stream, 503)
                return
            record.status = 200
            if self.on_open is not None:
                self.on_open(info)
            conn.respond(stream, 200)
            await relay(stream, upstream)
        except OSError as exc:
            record.error = describe_os_error(exc)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            cause = exc.__cause__ or exc
            record.error = str(cause) or "the HBONE stream was closed"
        except Exception as exc:
            # A bug in a callback: this stream fails, the connection and its other streams carry on.
            log.exception("inbound HBONE stream failed", extra={"fields": [
                ("src.addr", f"{conn.peer_addr[0]}:{conn.peer_addr[1]}"),
                ("dst.hbone_addr", f"{event.target[0]}:{event.target[1]}")]})
            record.error = f"internal error: {exc!r}"
            if stream.status is None:
                conn.respond(stream, 503)
            else:
                stream.reset(ERROR_INTERNAL)
        except BaseException:
            # Cancelled (the pod is going away): the client must not take a truncated stream for a
            # complete one.
            record.error = record.error or "connection drained"
            stream.reset(ERROR_CANCEL)
            raise
        finally:
            record.bytes_sent = stream.bytes_sent
            record.bytes_recv = stream.bytes_received
            record.duration = time.time() - record.started
            if upstream is not None:
                upstream.close()
            stream.close_nowait()
            self._report(record)


async def serve_hbone(listener: socket.socket, *, identity: SpiffeId, certs: CertSource,
                      contexts: TlsContextCache, authorize: Authorizer, open_upstream: UpstreamOpener,
                      on_complete: Callable[[InboundRecord], None] | None = None,
                      on_open: Callable[[InboundInfo], None] | None = None,
                      handler_nursery: trio.Nursery | None = None,
                      handshake_timeout: float = HANDSHAKE_TIMEOUT,
                      ping_interval: float | None = PING_INTERVAL, ping_timeout: float = PING_TIMEOUT,
                      task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Serve HBONE on `listener` (bound and listening, e.g. the pod's 15008) until cancelled.

    Args:
        identity: the workload identity whose certificate is presented (the pod's).
        certs: certificate source (`fetch_certificate(identity)` per connection; cheap when cached).
        contexts: TLS context cache; `contexts.roots` are the trust anchors.
        authorize: `InboundInfo -> Decision` (sync or async); deny answers 401.
        open_upstream: connect to the app for `info.target` (transparently from `info.src_addr` in-pod)
            and return the connected non-blocking socket; ConnectError/OSError answers 503.
        on_complete: called once per stream (and per refused connection) with its `InboundRecord`.
        on_open: called when a tunnel opens (authorized, upstream connected), just before its 200.
        handler_nursery: where connections run (default: a nursery of this call).

    The listener is closed when this returns.
    """
    server = _Server(identity=identity, certs=certs, contexts=contexts, authorize=authorize,
                     open_upstream=open_upstream, on_complete=on_complete, on_open=on_open,
                     handshake_timeout=handshake_timeout, ping_interval=ping_interval,
                     ping_timeout=ping_timeout)
    listener.setblocking(False)
    try:
        async with trio.open_nursery() as own:
            nursery = handler_nursery or own
            task_status.started()

            def spawn(conn: socket.socket, peer: Addr) -> None:
                nursery.start_soon(_guarded, server, conn, peer)

            def capacity_error(exc: OSError) -> None:
                log.error("accept failed on the HBONE listener, retrying in 100 ms",
                          extra={"fields": [("error", os.strerror(exc.errno or 0))]})

            await accept_forever(listener, spawn, on_capacity_error=capacity_error)
    finally:
        listener.close()


async def _guarded(server: _Server, sock: socket.socket, peer: Addr) -> None:
    try:
        await server.serve_connection(sock, peer)
    except Exception as exc:
        # One connection's failure never takes down the listener or the pod's other connections.
        log.exception("inbound HBONE connection failed", extra={"fields": [
            ("src.addr", f"{peer[0]}:{peer[1]}"), ("error", describe_ssl_error(exc))]})
    finally:
        sock.close()


async def serve_hbone_connection(sock: socket.socket, peer: tuple[Any, ...], *, identity: SpiffeId,
                                 certs: CertSource,
                                 contexts: TlsContextCache, authorize: Authorizer,
                                 open_upstream: UpstreamOpener,
                                 on_complete: Callable[[InboundRecord], None] | None = None,
                                 on_open: Callable[[InboundInfo], None] | None = None,
                                 on_connection: Callable[[HboneConnection], None] | None = None,
                                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                                 ping_interval: float | None = PING_INTERVAL,
                                 ping_timeout: float = PING_TIMEOUT) -> None:
    """Serve one accepted 15008 connection until it ends (for callers with their own accept loop, like the
    in-pod proxy set). `peer` is the address `accept()` returned (IPv6 4-tuples and v4-mapped addresses are
    fine). Same keyword arguments as `serve_hbone`, plus `on_connection(conn)` once the TLS handshake
    succeeded (e.g. to `conn.close()` it with a GOAWAY later); closes `sock`. Peer and TLS failures are
    reported through `on_complete` and logged, never raised."""
    server = _Server(identity=identity, certs=certs, contexts=contexts, authorize=authorize,
                     open_upstream=open_upstream, on_complete=on_complete, on_open=on_open,
                     handshake_timeout=handshake_timeout, ping_interval=ping_interval,
                     ping_timeout=ping_timeout, on_connection=on_connection)
    sock.setblocking(False)
    await _guarded(server, sock, peer_addr(tuple(peer)))
