"""What a pod's connection handlers need: its identity, its netns, config, telemetry and a socket factory.

The socket factory is the seam between proxy logic and the kernel: the real one creates sockets inside the
pod's namespace and reads netfilter's original destination; service tests use a loopback fake.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from shared.zds.types import PodUid, WorkloadInfo

from ..errors import ProxyStartError
from ..inpod.sockets import PACKET_MARK, PodListeners, bind_pod_listeners, create_upstream_socket
from ..telemetry import Peer, Telemetry
from .net import Addr, original_dst


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the in-pod proxies (env names in services/ztunnel/config.py)."""

    packet_mark: int = PACKET_MARK
    connect_timeout: float = 10.0
    ipv6: bool = True
    orig_src: bool | None = None
    """ENABLE_ORIG_SRC: None = best effort, True = required, False = never spoof the client's address."""
    cluster_id: str = "Kubernetes"
    splice: bool = True
    """Move plaintext passthrough bytes with os.splice (about half the CPU of the shared-buffer copy, see
    benchmarks/passthrough.py); False = recv_into the shared buffer and send."""


class SocketFactory(Protocol):
    def bind_listeners(self, netns_fd: int) -> PodListeners:
        """Bind the pod's whole listener set or raise ProxyStartError leaving nothing open."""
        ...

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        """A non-blocking, marked TCP socket in the pod's namespace (optionally transparently bound)."""
        ...

    def original_dst(self, sock: socket.socket) -> Addr | None:
        """Where the accepted connection was going before it was redirected (None: not redirected)."""
        ...


class InPodSocketFactory:
    """The real factory: sockets created inside the pod netns via shared.netns.entered."""

    def __init__(self, config: ProxyConfig) -> None:
        self.config = config

    def bind_listeners(self, netns_fd: int) -> PodListeners:
        listeners = bind_pod_listeners(netns_fd, ipv6=self.config.ipv6, mark=self.config.packet_mark,
                                       transparent=self.config.orig_src is not False)
        if self.config.orig_src and not listeners.transparent:
            listeners.close()
            raise ProxyStartError("ENABLE_ORIG_SRC=true but IP_TRANSPARENT is not permitted on the pod's "
                                  "listeners (needs CAP_NET_ADMIN); unset it to fall back to plain connects")
        return listeners

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        return create_upstream_socket(netns_fd, family, mark=self.config.packet_mark, bind_source=bind_source)

    def original_dst(self, sock: socket.socket) -> Addr | None:
        return original_dst(sock)


class PeerLookup(Protocol):
    """Who is behind an address (from xDS state): names remote ends in access logs and metrics."""

    def by_address(self, ip: str) -> Peer | None: ...


class NoPeers:
    """Until the xDS state is wired in: every remote end is known only by its address."""

    def by_address(self, ip: str) -> Peer | None:
        return None


@dataclass
class PodContext:
    """One pod's proxy set context; `netns_fd` is owned (closed) by the pod's supervisor."""

    uid: PodUid
    info: WorkloadInfo | None
    netns_fd: int
    config: ProxyConfig
    telemetry: Telemetry
    sockets: SocketFactory
    peers: PeerLookup = field(default_factory=NoPeers)
    active_connections: int = field(default=0)

    @property
    def peer(self) -> Peer:
        if self.info is None:
            return Peer(cluster=self.config.cluster_id)
        return Peer(workload=self.info.name, namespace=self.info.namespace, cluster=self.config.cluster_id)
