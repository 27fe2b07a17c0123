"""Names for the remote end of a connection, from the xDS state store (the PeerLookup of proxy/context.py)."""

from __future__ import annotations

from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service, Workload
from services.ztunnel.telemetry.access_log import Peer


def workload_peer(workload: Workload, *, mtls: bool = False, service: Service | None = None,
                  cluster: str | None = None) -> Peer:
    """A log/metrics end for an xDS workload, named by its workload name (the pod name only when xDS gives
    none); `mtls` adds its SPIFFE identity as proven (only proven ends carry `identity`)."""
    principal = workload.identity.uri
    return Peer(workload=workload.workload_name or workload.name, name=workload.name or None,
                namespace=workload.namespace,
                identity=principal if mtls else None,
                cluster=workload.cluster_id or cluster or None,
                canonical_service=workload.canonical_name or None,
                canonical_revision=workload.canonical_revision or None, principal=principal,
                **service_fields(service))


def service_fields(service: Service | None) -> dict[str, str | None]:
    """The `service*` fields of a Peer whose destination is `service`."""
    if service is None:
        return {}
    return {"service": service.hostname, "service_name": service.name, "service_namespace": service.namespace}


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
            return Peer(**service_fields(service))
        return None
