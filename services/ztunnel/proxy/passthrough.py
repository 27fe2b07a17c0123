"""Plain TCP proxying for a pod: outbound capture (15001) and inbound plaintext (15006), the building blocks
the mesh handlers (proxy/mesh.py) use for passthrough, and all there is without xDS.

Theory of operation
-------------------
Each accepted connection runs one handler task in its pod's nursery. The handler recovers the original
destination (netfilter SO_ORIGINAL_DST), opens the upstream socket *in the pod's namespace* with SO_MARK 1337
(so the pod's own REDIRECT rules skip it), copies bytes both ways with half-close, and writes exactly one
access log line when done. Inbound connections are made to the app from the client's own address (a
transparent, freebind socket bound to the source IP) so the app sees who really called; if the kernel refuses
that, a plain connect is used unless ENABLE_ORIG_SRC=true demands it.

Cancellation (the pod being removed) interrupts the copy; the caller's finally closes both sockets, which is
upstream's "Immediate" drain.
"""

from __future__ import annotations

import logging
import socket
from typing import Final

import trio

from services.ztunnel.errors import ConnectError
from services.ztunnel.hbone.core import Addr
from services.ztunnel.net import (
    INBOUND_HBONE_PORT,
    INBOUND_PLAINTEXT_PORT,
    OUTBOUND_PORT,
    connect,
    describe_os_error,
    family_of,
    local_addr,
)
from services.ztunnel.proxy.context import PodContext
from services.ztunnel.proxy.tcp import copy_bidirectional
from services.ztunnel.telemetry.access_log import ConnectionRecord, Peer, format_addr
from shared.netns import NetnsError

log = logging.getLogger("ztunnel.proxy")

SELF_CALL_PORTS: Final = frozenset({OUTBOUND_PORT, INBOUND_PLAINTEXT_PORT, INBOUND_HBONE_PORT})
SELF_CALL_ERROR: Final = "attempted recursive call to ourselves"


async def proxy_tcp(ctx: PodContext, client: socket.socket, upstream: socket.socket, dst: Addr,
                    record: ConnectionRecord) -> None:
    """Connect `upstream` to `dst`, copy both ways, write the access log. Closes `upstream`."""
    tel = ctx.telemetry
    tel.connection_opened(record)
    error: str | None = "connection drained"
    ctx.active_connections += 1
    try:
        await connect(upstream, dst, connect_timeout=ctx.config.connect_timeout)

        def sent(n: int) -> None:
            record.bytes_sent += n

        def received(n: int) -> None:
            record.bytes_recv += n

        await copy_bidirectional(client, upstream, sent, received, splice=ctx.config.splice)
        error = None
    except ConnectError as exc:
        error = str(exc)
    except OSError as exc:
        error = describe_os_error(exc)
    finally:
        ctx.active_connections -= 1
        upstream.close()
        tel.connection_complete(record, error=error)


def outbound_dst(ctx: PodContext, client: socket.socket, peer: Addr) -> Addr | None:
    """The original destination of a captured connection; None (and a log line) if it was not redirected."""
    dst = ctx.sockets.original_dst(client)
    if dst is None:
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(local_addr(client)),
                                        direction="outbound",
                                        error="no original destination (connection was not redirected)")
    return dst


async def proxy_outbound(ctx: PodContext, client: socket.socket, dst: Addr, record: ConnectionRecord) -> None:
    """Plain TCP from the pod's netns (marked, so not captured again) to `dst`, logged as `record`."""
    try:
        upstream = ctx.sockets.upstream(ctx.netns_fd, family_of(dst[0]))
    except (OSError, NetnsError) as exc:
        error = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        ctx.telemetry.connection_failed(src_addr=record.src_addr, dst_addr=record.dst_addr,
                                        direction="outbound", record=record,
                                        error=f"cannot create the upstream socket: {error}")
        return
    await proxy_tcp(ctx, client, upstream, dst, record)


async def handle_outbound(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A connection the pod's app made to anywhere, redirected to 15001: plain TCP passthrough."""
    dst = outbound_dst(ctx, client, peer)
    if dst is None:
        return
    record = ConnectionRecord(direction="outbound", src_addr=format_addr(peer), dst_addr=format_addr(dst),
                              src=ctx.peer, dst=ctx.peers.by_address(dst[0]) or Peer())
    await proxy_outbound(ctx, client, dst, record)


def inbound_upstream(ctx: PodContext, src: Addr, dst: Addr) -> socket.socket:
    """A socket in the pod's netns for delivering to the app at `dst`, bound to the client's IP `src` when
    the kernel allows (IP_TRANSPARENT), so the app sees who really called.

    Raises:
        OSError, NetnsError: the socket could not be made (or ENABLE_ORIG_SRC=true and spoofing failed).
    """
    family = family_of(dst[0])
    if ctx.config.orig_src is False or src[0] == dst[0] or family_of(src[0]) != family:
        return ctx.sockets.upstream(ctx.netns_fd, family)
    try:
        return ctx.sockets.upstream(ctx.netns_fd, family, bind_source=src[0])
    except OSError as exc:
        if ctx.config.orig_src:
            raise
        log.debug("cannot preserve source address, using a plain connect",
                  extra={"fields": [("src", src[0]), ("error", describe_os_error(exc))]})
        return ctx.sockets.upstream(ctx.netns_fd, family)


def inbound_dst(ctx: PodContext, client: socket.socket, peer: Addr) -> Addr | None:
    """Where a plaintext inbound connection was going; None (logged) for ztunnel's own ports (SelfCall)."""
    dst = ctx.sockets.original_dst(client) or local_addr(client)
    if dst[1] in SELF_CALL_PORTS:
        ctx.telemetry.connection_failed(src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                        direction="inbound", error=SELF_CALL_ERROR)
        return None
    return dst


async def proxy_inbound(ctx: PodContext, client: socket.socket, peer: Addr, dst: Addr,
                        record: ConnectionRecord) -> None:
    """Deliver a plaintext inbound connection to the app at `dst` as the client `peer`."""
    try:
        upstream = inbound_upstream(ctx, peer, dst)
    except (OSError, NetnsError) as exc:
        error = describe_os_error(exc) if isinstance(exc, OSError) else str(exc)
        ctx.telemetry.connection_failed(src_addr=record.src_addr, dst_addr=record.dst_addr,
                                        direction="inbound", record=record,
                                        error=f"cannot create the upstream socket: {error}")
        return
    await proxy_tcp(ctx, client, upstream, dst, record)


def inbound_record(ctx: PodContext, peer: Addr, dst: Addr) -> ConnectionRecord:
    return ConnectionRecord(direction="inbound", src_addr=format_addr(peer), dst_addr=format_addr(dst),
                            src=ctx.peers.by_address(peer[0]) or Peer(), dst=ctx.peer)


async def handle_inbound_plaintext(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A plaintext connection to the pod, redirected to 15006: deliver it to the app as the client."""
    dst = inbound_dst(ctx, client, peer)
    if dst is None:
        return
    await proxy_inbound(ctx, client, peer, dst, inbound_record(ctx, peer, dst))


async def handle_inbound_hbone(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """Without xDS there are no identities: 15008 stays bound and accepting, each connection is closed with
    a log line."""
    log.warning("inbound HBONE needs the control plane (XDS_ADDRESS is not set); closing the connection",
                extra={"fields": [("src.addr", format_addr(peer)),
                                  ("dst.addr", format_addr(local_addr(client))), ("pod", ctx.uid)]})
    await trio.lowlevel.checkpoint()
