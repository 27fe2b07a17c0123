"""What a pod's connection handlers need: its identity, its netns, config, telemetry and a socket factory.

The socket factory is the seam between proxy logic and the kernel: the real one (inpod/sockets.py) creates
sockets inside the pod's namespace and reads netfilter's original destination; service tests use a
loopback fake.

With xDS configured, every pod also shares the process's `Mesh` (the xDS state, the certificate manager and
the TLS context cache) and owns an HBONE client pool for its lifetime (`PodContext.pool`).

A `PodContext` is immutable: the pod's proxy set (inpod/proxies.py) makes it once, and once more with the
pool when the pool is open. What its connection handlers change while they run is counted in the one small
mutable `PodCounters` it carries.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import msgspec
import trio

from services.ztunnel.hbone.pool import CertSource, HbonePool
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.net import PACKET_MARK
from services.ztunnel.peers import workload_peer
from services.ztunnel.proxy.limits import PodConnections
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Workload
from services.ztunnel.telemetry.access_log import Peer, Telemetry
from shared.addr import Addr
from shared.identity import SpiffeId
from shared.zds.types import PodUid, WorkloadInfo


class ProxyConfig(msgspec.Struct, frozen=True, kw_only=True):
    """Settings of the in-pod proxies (env names in services/ztunnel/config.py)."""

    packet_mark: int = PACKET_MARK
    connect_timeout: float = 10.0
    ipv6: bool = True
    orig_src: bool | None = None
    """ENABLE_ORIG_SRC: None = best effort, True = required, False = never spoof the client's address."""
    cluster_id: str = "Kubernetes"
    dns_capture: bool = False
    """Bind the DNS proxy (15053) in every pod (proxy metadata DNS_CAPTURE; load_config defaults it on)."""
    dns_upstreams: tuple[str, ...] = ()
    """The resolvers forwarded queries go to: the node's resolv.conf nameservers, read at start."""
    dns_timeout: float = 5.0
    """Seconds each upstream resolver gets to answer a forwarded query before the next is tried."""
    dns_max_inflight: int = 64
    """Forwarded queries one pod may have open at once; more are answered SERVFAIL."""
    max_connections: int | None = None
    """ZTUNNEL_MAX_CONNECTIONS: TCP connections the whole process may hold for its pods (limits.py says what
    counts); None: derived from the open-files limit at start."""
    max_connections_per_pod: int | None = None
    """ZTUNNEL_MAX_CONNECTIONS_PER_POD: the same for one pod; None: three quarters of the process cap."""
    splice: bool = True
    """Move plaintext passthrough bytes with os.splice (about half the CPU of the shared-buffer copy, see
    benchmarks/passthrough.py); False = recv_into the shared buffer and send."""


class Listener(Protocol):
    """One bound, listening, non-blocking socket of a pod and what it is for (inpod/sockets.py's
    `PodListener`)."""

    @property
    def role(self) -> str:
        """"outbound" | "inbound_plaintext" | "inbound_hbone"."""
        ...

    @property
    def port(self) -> int: ...

    @property
    def sock(self) -> socket.socket: ...


class ListenerSet(Protocol):
    """A pod's whole listener set, bound (inpod/sockets.py's `PodListeners`)."""

    def __iter__(self) -> Iterator[Listener]: ...

    def close(self) -> None: ...


class SocketFactory(Protocol):
    """Every socket a pod's proxy set makes (the real one is inpod/sockets.py's `InPodSocketFactory`)."""

    def bind_listeners(self, netns_fd: int) -> ListenerSet:
        """Bind the pod's whole listener set or raise ProxyStartError leaving nothing open."""
        ...

    def upstream(self, netns_fd: int, family: socket.AddressFamily, *,
                 bind_source: str | None = None) -> socket.socket:
        """A non-blocking, marked TCP socket in the pod's namespace (optionally transparently bound)."""
        ...

    def original_dst(self, sock: socket.socket) -> Addr | None:
        """Where the accepted connection was going before it was redirected (None: not redirected)."""
        ...


class PeerLookup(Protocol):
    """Who is behind an address (from xDS state): names remote ends in access logs and metrics."""

    def by_address(self, ip: str) -> Peer | None: ...


class NoPeers:
    """Until the xDS state is wired in: every remote end is known only by its address."""

    def by_address(self, ip: str) -> Peer | None:
        return None


class MeshCertificates(CertSource, Protocol):
    """The certificate manager as the mesh uses it (services/ztunnel/identity/manager.py, or a fake)."""

    def forget(self, identity: SpiffeId) -> None:
        """Stop caching and rotating `identity` (its last pod left the node)."""
        ...

    def dump(self) -> list[dict[str, Any]]:
        """The certificates held (identity, serial, validity), for /config_dump."""
        ...


WORKLOAD_WAIT = 5.0
"""How long a pod's connection waits for xDS to name the pod's workload (upstream: 5 s)."""


@dataclass
class Mesh:
    """What HBONE needs, shared by every pod of the process.

    Args:
        store: the xDS state (workloads, services, policies).
        certs: workload certificates by identity (the certificate manager).
        contexts: the one process-wide TLS context cache.
        node: this node's name (NODE_NAME): a pod's workload is looked up among this node's workloads.
    """

    store: StateStore
    certs: MeshCertificates
    contexts: TlsContextCache
    node: str = ""
    workload_wait: float = WORKLOAD_WAIT
    _workloads: dict[tuple[str, str, str], Workload | None] = field(default_factory=dict, repr=False)
    _workloads_generation: int = field(default=-1, repr=False)

    def local_workload(self, info: WorkloadInfo) -> Workload | None:
        """The node-local xDS workload of a pod: same name, namespace and service account."""
        account = info.service_account or "default"
        for workload in self.store.workloads.values():
            if (workload.name == info.name and workload.namespace == info.namespace
                    and (workload.service_account or "default") == account
                    and (not self.node or workload.node == self.node)):
                return workload
        return None

    def workload_of(self, info: WorkloadInfo) -> Workload | None:
        """`local_workload`, remembered until the store's next generation (it runs once per connection)."""
        generation = self.store.generation
        if generation != self._workloads_generation:
            self._workloads.clear()
            self._workloads_generation = generation
        key = (info.name, info.namespace, info.service_account or "default")
        try:
            return self._workloads[key]
        except KeyError:
            found = self._workloads[key] = self.local_workload(info)
            return found


class PodCounters:
    """What a pod's connection handlers count while its proxy set runs (read by /config_dump)."""

    __slots__ = ("active_connections",)

    def __init__(self) -> None:
        self.active_connections = 0


@dataclass(frozen=True, slots=True)
class PodContext:
    """One pod's proxy set context; `netns_fd` is owned (closed) by the pod's supervisor."""

    uid: PodUid
    info: WorkloadInfo | None
    netns_fd: int
    config: ProxyConfig
    telemetry: Telemetry
    sockets: SocketFactory
    peers: PeerLookup = field(default_factory=NoPeers)
    mesh: Mesh | None = None
    """None without xDS: every connection is plain passthrough."""
    pool: HbonePool | None = None
    """The pod's HBONE client pool, in the context run_pod_proxies hands to the handlers once it is open."""
    counters: PodCounters = field(default_factory=PodCounters)
    connections: PodConnections = field(default_factory=PodConnections)
    """The pod's count of the connections it holds, under its cap and the process's (limits.py); the
    default is unlimited."""
    draining: trio.Event = field(default_factory=trio.Event)
    """Set when the pod stops accepting (graceful drain): idle inbound HBONE connections are closed."""

    def workload(self) -> Workload | None:
        """The pod's xDS workload as the store knows it now."""
        if self.mesh is None or self.info is None:
            return None
        return self.mesh.workload_of(self.info)

    async def wait_workload(self) -> Workload | None:
        """`workload()`, waiting up to the mesh's `workload_wait` for xDS to deliver it."""
        if self.mesh is None or self.info is None:
            return None
        with trio.move_on_after(self.mesh.workload_wait):
            await self.mesh.store.wait_for(lambda _: self.workload() is not None)
        return self.workload()

    def missing_workload(self) -> str:
        """The error of a connection that needs the pod's workload (its identity) when xDS has none."""
        info = self.info
        who = (f"{info.namespace}/{info.name} (service account {info.service_account or 'default'})" if info
               else f"uid {self.uid}")
        node = self.mesh.node if self.mesh is not None and self.mesh.node else "this node"
        return (f"unknown source workload: xDS has no workload for pod {who} on {node}, so it has no "
                f"identity (is the pod in the control plane's world, and NODE_NAME right?)")

    @property
    def peer(self) -> Peer:
        """This pod as an end of its connections: its xDS workload, else (no xDS, or none for it yet) its
        pod name from ZDS."""
        workload = self.workload()
        if workload is not None:
            return workload_peer(workload, cluster=self.config.cluster_id)
        if self.info is None:
            return Peer(cluster=self.config.cluster_id)
        return Peer(workload=self.info.name, namespace=self.info.namespace, cluster=self.config.cluster_id)
