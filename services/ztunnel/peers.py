"""Names for the remote end of a connection, from the xDS state store (the PeerLookup of proxy/context.py)."""

from __future__ import annotations

from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service, Workload
from services.ztunnel.telemetry.access_log import Peer


def workload_peer(workload: Workload, *, mtls: bool = False, service: Service | None = None,
                  cluster: str | None = None) -> Peer:
    """A log/metrics end for an xDS workload; `mtls` adds its SPIFFE identity (only proven ends carry one)."""
    return Peer(workload=workload.workload_name or workload.name, namespace=workload.namespace,
                identity=workload.identity.uri if mtls else None,
                cluster=workload.cluster_id or cluster or None,
                service=service.hostname if service is not None else None)


class StatePeers:
    """`by_address(ip)`: the workload at that IP, else the service whose VIP it is, else None."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def by_address(self, ip: str) -> Peer | None:
        workload = self.store.workload_by_ip(ip)
        if workload is not None:
            return workload_peer(workload)
        service = self.store.service_by_vip(ip)
        if service is not None:
            return Peer(service=service.hostname, namespace=service.namespace)
        return None
