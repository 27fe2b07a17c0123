"""A pod's inbound plaintext (15006): a connection redirected to the pod, authorized, delivered to the app.

Theory of operation
-------------------
The original destination (netfilter SO_ORIGINAL_DST, else the local address) is the app's ip:port; one of
ztunnel's own ports there is a loop and is refused. With xDS the connection is decided against the current
policies with no identity (plaintext proves none); a deny ends it with one `connection complete` line
counted as failed. Then it is delivered to the app from the client's own address (`app_socket`, tcp.py) and
copied both ways (`proxy_tcp`), ending in one `ConnectionOutcome`. Without xDS nothing is decided: every
connection is delivered.
"""

from __future__ import annotations

import socket

from services.ztunnel.authz import AuthzRequest, authorize_from_state
from services.ztunnel.hbone.server import policy_rejection
from services.ztunnel.net import SELF_CALL_ERROR, ZTUNNEL_PORTS, local_addr
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy.context import PodContext
from services.ztunnel.proxy.inbound import service_for_port
from services.ztunnel.proxy.tcp import proxy_tcp
from services.ztunnel.telemetry.access_log import ConnectionOutcome, Peer, format_addr
from shared.addr import Addr


async def handle_inbound_plaintext(ctx: PodContext, client: socket.socket, peer: Addr) -> None:
    """A plaintext connection to the pod, redirected to 15006: authorized (no identity), then delivered."""
    dst = ctx.sockets.original_dst(client) or local_addr(client)
    if dst[1] in ZTUNNEL_PORTS:
        refused = ConnectionOutcome(direction="inbound", src_addr=format_addr(peer),
                                    dst_addr=format_addr(dst), src=ctx.peers.by_address(peer[0]) or Peer(),
                                    dst=ctx.peer)
        ctx.telemetry.connection_failed(src_addr=refused.src_addr, dst_addr=refused.dst_addr,
                                        direction="inbound", error=SELF_CALL_ERROR, outcome=refused)
        return
    mesh = ctx.mesh
    workload = ctx.workload()
    dst_peer = (workload_peer(workload, cluster=ctx.config.cluster_id,
                              service=service_for_port(mesh.store, workload, dst[1]))
                if workload is not None and mesh is not None else ctx.peer)
    outcome = ConnectionOutcome(direction="inbound", src_addr=format_addr(peer), dst_addr=format_addr(dst),
                                src=ctx.peers.by_address(peer[0]) or Peer(), dst=dst_peer)
    if mesh is not None:
        decision = authorize_from_state(mesh.store, AuthzRequest(src_ip=peer[0], dst_ip=dst[0],
                                                                 dst_port=dst[1]))
        outcome.verdict = decision
        if not decision.allowed:
            outcome.error = policy_rejection(decision.reason)
            ctx.telemetry.connection_complete(outcome)
            return
    await proxy_tcp(ctx, client, dst, outcome, as_client=peer)
