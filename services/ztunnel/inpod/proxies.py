"""One pod's proxy set: bind all listeners in its netns, serve them in one nursery, drain on cancel.

Theory of operation
-------------------
`run_pod_proxies` is the unit of a pod's lifetime. It binds the whole listener set synchronously (inside
the pod netns; a failure raises before `task_status.started`, so the caller's `nursery.start` raises and the
ZDS client can NACK), then runs one accept loop per listener and one task per connection, all under a cancel
scope the caller gets back in the `PodHandle`:

    handle = await pods_nursery.start(run_pod_proxies, ctx)
    handle.scope.cancel()          # Immediate drain: listeners and open connections closed now
    handle.stop_accepting()        # Graceful drain: listeners closed, connections left to finish

Connections live in the outer nursery and accept loops in an inner one, so stopping the accept loops lets the
pod's task end by itself once its last connection finishes. With the mesh (xDS), the pod's HBONE client pool
wraps both: its connections are made in the pod's netns and live exactly as long as the pod's proxy set (a
GOAWAY when it ends; the handlers get a copy of the immutable context with the pool in it), and the pod's
certificate is fetched as soon as its listeners run. Per-connection errors are caught and logged in the
handler wrapper: nothing a peer does can take down the pod's other connections, or another pod.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Final

import trio

from services.ztunnel.dns.forwarder import Forwarder, Upstream
from services.ztunnel.dns.resolver import Resolver
from services.ztunnel.dns.server import DnsProxy
from services.ztunnel.hbone.pool import HbonePool, open_hbone_pool
from services.ztunnel.hbone.relay import abort_on_close
from services.ztunnel.inpod.sockets import create_dns_upstream_socket
from services.ztunnel.net import accept_forever
from services.ztunnel.proxy.context import Listener, PodContext
from services.ztunnel.proxy.inbound import handle_inbound_hbone
from services.ztunnel.proxy.inbound_passthrough import handle_inbound_plaintext
from services.ztunnel.proxy.outbound import handle_outbound
from services.ztunnel.telemetry.access_log import format_addr
from shared.addr import Addr
from shared.errors import AmbientError
from shared.netns import NetnsId, netns_id
from shared.zds.types import PodUid

log = logging.getLogger("ztunnel.inpod")

ConnHandler = Callable[[PodContext, socket.socket, Addr], Awaitable[None]]

HANDLERS: Final[Mapping[str, ConnHandler]] = {
    "outbound": handle_outbound,
    "inbound_plaintext": handle_inbound_plaintext,
    "inbound_hbone": handle_inbound_hbone,
}


@dataclass(frozen=True, slots=True)
class ListenerInfo:
    role: str
    address: str
    port: int
    mark: int


@dataclass
class PodHandle:
    """A running pod proxy set. `scope.cancel()` = immediate drain; `done` is set once all is closed."""

    uid: PodUid
    netns: NetnsId
    scope: trio.CancelScope
    accept_scope: trio.CancelScope
    listeners: tuple[ListenerInfo, ...]
    context: PodContext
    pool: HbonePool | None = None
    """The pod's HBONE client pool while it is open (with the mesh)."""
    done: trio.Event = field(default_factory=trio.Event)

    @property
    def stop_requested(self) -> bool:
        """A drain (immediate or graceful) was asked for; False while the set ends only by failing."""
        return self.scope.cancel_called or self.accept_scope.cancel_called

    def stop_accepting(self) -> None:
        self.accept_scope.cancel()
        self.context.draining.set()

    async def drain_immediately(self) -> None:
        self.scope.cancel()
        await self.done.wait()


async def _run_connection(ctx: PodContext, handler: ConnHandler, conn: socket.socket, raw_peer: Addr) -> None:
    """Run one accepted connection (counted in `ctx.connections` by the accept loop: released here)."""
    try:
        await handler(ctx, conn, raw_peer)
    except Exception:
        # One connection's bug or peer misbehaviour must never take down the pod's other connections.
        log.exception("connection handler failed", extra={"fields": [("pod", ctx.uid)]})
    finally:
        conn.close()
        ctx.connections.release()


def refuse_connection(ctx: PodContext, port: int, conn: socket.socket, peer: Addr, error: str) -> None:
    """Over the pod's or the process's connection cap: reset `conn` at once (the app gets ECONNRESET, not a
    clean end) and log it, at most once a second per pod (proxy/limits.py)."""
    abort_on_close(conn)
    conn.close()
    ctx.connections.log_refusal(error, [("pod", ctx.uid), ("port", port), ("src.addr", format_addr(peer))])


async def serve_listener(ctx: PodContext, listener: Listener, handler: ConnHandler,
                         handler_nursery: trio.Nursery) -> None:
    """Accept forever on `listener`, each connection handled in `handler_nursery`, unless the pod or the
    process holds as many connections as its cap allows (then it is reset). Closes the listener."""
    sock = listener.sock

    def spawn(conn: socket.socket, peer: Addr) -> None:
        refusal = ctx.connections.acquire()
        if refusal is not None:
            refuse_connection(ctx, listener.port, conn, peer, refusal)
            return
        handler_nursery.start_soon(_run_connection, ctx, handler, conn, peer)

    def capacity_error(exc: OSError) -> None:
        log.error("accept failed, retrying in 100 ms", extra={"fields": [
            ("pod", ctx.uid), ("port", listener.port), ("error", os.strerror(exc.errno or 0))]})

    try:
        await accept_forever(sock, spawn, on_capacity_error=capacity_error)
    finally:
        sock.close()


DNS_ROLES: Final = frozenset({"dns_tcp", "dns_udp"})


def _dns_proxy(ctx: PodContext) -> DnsProxy:
    """The pod's DNS proxy: answers from the mesh's state (none without xDS: all is forwarded), forwards
    from the pod's netns with ztunnel's mark."""
    config = ctx.config

    def make_socket(family: socket.AddressFamily, kind: socket.SocketKind) -> socket.socket:
        return create_dns_upstream_socket(ctx.netns_fd, family, kind, mark=config.packet_mark)

    def source() -> dict[str, str]:
        workload = ctx.workload()
        info = ctx.info
        return {
            "source_canonical_service": (workload.canonical_name if workload else "") or "unknown",
            "source_canonical_revision": (workload.canonical_revision if workload else "") or "unknown",
            "source_workload": (workload.workload_name if workload else "") or (info.name if info else "")
                               or "unknown",
            "source_workload_namespace": (info.namespace if info else "") or "unknown",
        }

    forwarder = Forwarder([Upstream(host) for host in config.dns_upstreams], timeout=config.dns_timeout,
                          make_socket=make_socket)
    resolver = Resolver(ctx.mesh.store) if ctx.mesh is not None else None
    telemetry = ctx.telemetry
    return DnsProxy(resolver, forwarder, telemetry.metrics, client_namespace=ctx.info.namespace
                    if ctx.info else "", source=source, max_inflight=config.dns_max_inflight,
                    trace=partial(telemetry.trace.publish, telemetry.pod))


async def _serve_dns_tcp(dns: DnsProxy, ctx: PodContext, conn: socket.socket, raw_peer: Addr) -> None:
    await dns.handle_tcp(conn)


def _info(listener: Listener, mark: int) -> ListenerInfo:
    host = str(listener.sock.getsockname()[0])
    return ListenerInfo(role=listener.role, address=host, port=listener.port,
                        mark=mark)


@asynccontextmanager
async def _open_pool(ctx: PodContext) -> AsyncIterator[HbonePool | None]:
    """The pod's HBONE client pool (None without the mesh): sockets made in the pod netns, marked."""
    mesh = ctx.mesh
    if mesh is None:
        yield None
        return

    def make_socket(family: socket.AddressFamily) -> socket.socket:
        return ctx.sockets.upstream(ctx.netns_fd, family)

    async with open_hbone_pool(certs=mesh.certs, contexts=mesh.contexts, make_socket=make_socket,
                               connect_timeout=ctx.config.connect_timeout) as pool:
        yield pool


async def _prefetch_certificate(ctx: PodContext) -> None:
    """Fetch the pod's certificate up front, so its first connection does not wait for the CA."""
    mesh = ctx.mesh
    workload = await ctx.wait_workload()
    if mesh is None or workload is None:
        return
    with contextlib.suppress(AmbientError):  # the certificate manager logs it and retries; so does each use
        await mesh.certs.fetch_certificate(workload.identity)


async def run_pod_proxies(ctx: PodContext, *, handlers: Mapping[str, ConnHandler] = HANDLERS,
                          task_status: trio.TaskStatus[PodHandle] = trio.TASK_STATUS_IGNORED) -> None:
    """Bind the pod's listener set in its netns and serve it until cancelled.

    Owns `ctx.netns_fd` from the moment it is called: it is closed when this returns or raises.

    Raises:
        ProxyStartError: binding failed (before `started()`; nothing is left open).
    """
    handle: PodHandle | None = None
    try:
        listeners = ctx.sockets.bind_listeners(ctx.netns_fd)
        started = False
        try:
            infos = tuple(_info(listener, ctx.config.packet_mark) for listener in listeners)
            handle = PodHandle(uid=ctx.uid, netns=netns_id(ctx.netns_fd), scope=trio.CancelScope(),
                               accept_scope=trio.CancelScope(), listeners=infos, context=ctx)
            with handle.scope:
                async with _open_pool(ctx) as pool, trio.open_nursery() as connections:
                    handle.pool = pool
                    served = ctx if pool is None else dataclasses.replace(ctx, pool=pool)
                    with handle.accept_scope:
                        async with trio.open_nursery() as accepting:
                            dns = (_dns_proxy(served) if any(li.role in DNS_ROLES for li in listeners)
                                   else None)
                            for listener in listeners:
                                if dns is not None and listener.role == "dns_udp":
                                    accepting.start_soon(dns.serve_udp, listener.sock, connections)
                                elif dns is not None and listener.role == "dns_tcp":
                                    accepting.start_soon(serve_listener, served, listener,
                                                         functools.partial(_serve_dns_tcp, dns), connections)
                                else:
                                    accepting.start_soon(serve_listener, served, listener,
                                                         handlers[listener.role], connections)
                            if ctx.mesh is not None:
                                accepting.start_soon(_prefetch_certificate, ctx)
                            log.info("pod proxies started", extra={"fields": [
                                ("uid", ctx.uid), ("workload", ctx.info.name if ctx.info else None),
                                ("ports", ",".join(str(i.port) for i in infos))]})
                            task_status.started(handle)
                            started = True
        except Exception:
            if not started:
                raise
            # After started() the pod's failure is its own: log it, never propagate into the pods nursery.
            log.exception("pod proxies failed; its listeners are closed",
                          extra={"fields": [("uid", ctx.uid)]})
        finally:
            listeners.close()  # idempotent: accept loops close theirs, this covers the not-yet-started ones
            log.info("pod proxies stopped", extra={"fields": [("uid", ctx.uid)]})
    finally:
        os.close(ctx.netns_fd)
        if handle is not None:
            handle.pool = None
            handle.done.set()
