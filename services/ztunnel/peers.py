"""Names for the remote end of a connection, from the xDS state store (the PeerLookup of proxy/context.py)."""

from __future__ import annotations

from services.ztunnel.state.store import StateStore

from .telemetry import Peer


class StatePeers:
    """`by_address(ip)`: the workload at that IP, else the service whose VIP it is, else None."""

    def __init__(self, store: StateStore) -> None:
        self.store = store

    def by_address(self, ip: str) -> Peer | None:
        workload = self.store.workload_by_ip(ip)
        if workload is not None:
            return Peer(workload=workload.workload_name or workload.name, namespace=workload.namespace,
                        cluster=workload.cluster_id or None)
        service = self.store.service_by_vip(ip)
        if service is not None:
            return Peer(service=service.hostname, namespace=service.namespace)
        return None
