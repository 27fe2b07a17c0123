"""Answers from the xDS state: which names ztunnel knows, and what a query for one of them gets. Pure.

Theory of operation
-------------------
A query name is looked up as it is and in the short forms a pod's search list produces (`name`,
`name.ns`, `name.ns.svc`, each completed with the pod's namespace and `svc.<domain>`):

- a service's hostname (`name.ns.svc.<domain>`, or any host a ServiceEntry-like service names) answers its
  VIPs; a headless service (no VIP) answers its endpoints' addresses;
- `<pod hostname>.<headless service hostname>` answers that endpoint's addresses (the pod's `hostname`
  from xDS, else its name);
- the family follows the query type: A answers IPv4, AAAA IPv6; a known name without an address of that
  family, or asked another type, is an empty NOERROR answer;
- any other name under the cluster domain does not exist (NXDOMAIN): nothing else could answer it;
- everything else is forwarded.

    resolver = Resolver(store)
    resolver.resolve("productpage.bookinfo", "A", client_namespace="default")  # -> Records((...))
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Service

CLUSTER_DOMAIN = "cluster.local"
TTL = 30
"""Seconds an answer may be cached by the pod (upstream answers its own records with 30 s)."""


@dataclass(frozen=True, slots=True)
class Records:
    """The name is ztunnel's: these addresses (possibly none of the asked family) with `name` as owner."""

    addresses: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class NxDomain:
    """Under the cluster domain and unknown."""


@dataclass(frozen=True, slots=True)
class Forward:
    """Not ztunnel's to answer: send it to the upstream resolvers."""


Answer = Records | NxDomain | Forward

FAMILIES = {"A": 4, "AAAA": 6}


class Resolver:
    """Looks names up in `store` (read on every query, so xDS changes are answered at once)."""

    def __init__(self, store: StateStore, *, domain: str = CLUSTER_DOMAIN) -> None:
        self.store = store
        self.domain = domain.strip(".").lower()
        self._generation = -1
        self._hosts: dict[str, Service] = {}

    def _index(self) -> dict[str, Service]:
        if self.store.generation != self._generation:
            self._hosts = {svc.hostname.lower().rstrip("."): svc for svc in self.store.services.values()}
            self._generation = self.store.generation
        return self._hosts

    def candidates(self, name: str, client_namespace: str) -> list[str]:
        """`name` (lower case, no trailing dot) and the full hostnames its short forms stand for."""
        out = [name]
        svc_suffix = f"svc.{self.domain}"
        labels = name.split(".")
        if len(labels) == 1 and client_namespace:
            out.append(f"{name}.{client_namespace}.{svc_suffix}")
        elif len(labels) == 2:
            out.append(f"{name}.{svc_suffix}")
        elif len(labels) == 3 and labels[2] == "svc":
            out.append(f"{name}.{self.domain}")
        return out

    def lookup(self, name: str, client_namespace: str = "") -> tuple[str, ...] | None:
        """The addresses (both families) a known name stands for; None when it is not known."""
        hosts = self._index()
        for candidate in self.candidates(name, client_namespace):
            service = hosts.get(candidate)
            if service is not None:
                return self._service_addresses(service)
            head, _, rest = candidate.partition(".")
            service = hosts.get(rest)
            if service is not None and not service.addresses:
                for workload, _ in self.store.endpoints(service):
                    if (workload.hostname or workload.name).lower() == head:
                        return workload.addresses
        return None

    def _service_addresses(self, service: Service) -> tuple[str, ...]:
        if service.addresses:
            return tuple(addr.address for addr in service.addresses)
        seen: dict[str, None] = {}
        for workload, _ in self.store.endpoints(service):
            if workload.healthy:
                seen.update(dict.fromkeys(workload.addresses))
        return tuple(seen)

    def resolve(self, name: str, rdtype: str, *, client_namespace: str = "") -> Answer:
        """What a query for `name` (any case, trailing dot or not) of type `rdtype` ("A", "AAAA", ...)
        gets."""
        name = name.lower().rstrip(".")
        found = self.lookup(name, client_namespace)
        if found is None:
            if name == self.domain or name.endswith("." + self.domain):
                return NxDomain()
            return Forward()
        family = FAMILIES.get(rdtype.upper())
        if family is None:
            return Records(addresses=())
        return Records(addresses=tuple(ip for ip in found if ipaddress.ip_address(ip).version == family))
