"""The local state store: every Workload, Service and Authorization ztunnel knows, with the lookups the proxy
needs (by address, by VIP, endpoints of a service, policies for a workload).

Written only by the xDS client (one writer, on the Trio thread); read by everyone. Readers that need to react
to changes wait with `wait_for(predicate)` or `wait_changed(generation)`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import trio

from services.ztunnel.state.types import (
    Authorization,
    PolicyKey,
    Port,
    Service,
    ServiceKey,
    Workload,
    WorkloadUid,
)
from shared.addr import canonical_ip


class StateStore:
    def __init__(self) -> None:
        self.workloads: dict[WorkloadUid, Workload] = {}
        self.services: dict[ServiceKey, Service] = {}
        self.policies: dict[PolicyKey, Authorization] = {}
        self._by_addr: dict[tuple[str, str], WorkloadUid] = {}
        self._by_vip: dict[tuple[str, str], ServiceKey] = {}
        self.generation = 0
        self._changed = trio.Event()

    # --- writes (xDS client) ------------------------------------------------------------------------------

    def apply_addresses(self, upserts: Iterable[Workload | Service], removed: Iterable[str]) -> None:
        """Add/replace workloads and services, then remove names (a workload uid or a service key)."""
        for item in upserts:
            if isinstance(item, Workload):
                self._drop_workload(item.uid)
                self.workloads[item.uid] = item
                for ip in item.addresses:
                    self._by_addr[(item.network, ip)] = item.uid
            else:
                self._drop_service(item.key)
                self.services[item.key] = item
                for addr in item.addresses:
                    self._by_vip[(addr.network, addr.address)] = item.key
        for name in removed:
            self._drop_workload(WorkloadUid(name))
            self._drop_service(ServiceKey(name))
        self._bump()

    def apply_authorizations(self, upserts: Iterable[Authorization], removed: Iterable[str]) -> None:
        for pol in upserts:
            self.policies[pol.key] = pol
        for name in removed:
            self.policies.pop(PolicyKey(name), None)
        self._bump()

    def _drop_workload(self, uid: WorkloadUid) -> None:
        old = self.workloads.pop(uid, None)
        if old is not None:
            for ip in old.addresses:
                if self._by_addr.get((old.network, ip)) == uid:
                    del self._by_addr[(old.network, ip)]

    def _drop_service(self, key: ServiceKey) -> None:
        old = self.services.pop(key, None)
        if old is not None:
            for addr in old.addresses:
                if self._by_vip.get((addr.network, addr.address)) == key:
                    del self._by_vip[(addr.network, addr.address)]

    def _bump(self) -> None:
        self.generation += 1
        self._changed.set()
        self._changed = trio.Event()

    # --- reads ----------------------------------------------------------------------------------------------

    def workload_by_uid(self, uid: str) -> Workload | None:
        return self.workloads.get(WorkloadUid(uid))

    def workload_by_ip(self, ip: str, network: str = "") -> Workload | None:
        uid = self._by_addr.get((network, canonical_ip(ip)))
        return self.workloads.get(uid) if uid is not None else None

    def service_by_vip(self, ip: str, network: str = "") -> Service | None:
        key = self._by_vip.get((network, canonical_ip(ip)))
        return self.services.get(key) if key is not None else None

    def service_by_key(self, key: str) -> Service | None:
        return self.services.get(ServiceKey(key))

    def endpoints(self, service: Service) -> list[tuple[Workload, tuple[Port, ...]]]:
        """Workloads selected by `service` with their port mappings (sorted by uid for determinism)."""
        return [
            (wl, wl.services[service.key])
            for uid, wl in sorted(self.workloads.items())
            if service.key in wl.services
        ]

    # --- waiting --------------------------------------------------------------------------------------------

    async def wait_changed(self, seen_generation: int) -> int:
        """Return once generation > seen_generation; returns the new generation."""
        while self.generation <= seen_generation:
            await self._changed.wait()
        return self.generation

    async def wait_for(self, predicate: Callable[[StateStore], bool]) -> None:
        """Return once `predicate(self)` is true (checked after every change)."""
        while not predicate(self):
            await self._changed.wait()
