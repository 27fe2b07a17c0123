"""ztunnel's view of the mesh as domain types: what the xDS client converts istio.workload / istio.security
protobufs into (the protobuf classes never get past services/ztunnel/xds/convert.py).

Addresses are canonical text (`shared.addr.canonical_ip`, ipaddress's compressed form), CIDRs `addr/len`.
Enums are strings so that config dumps read well.
"""

from __future__ import annotations

import enum
from typing import NewType

import msgspec

from shared.identity import SpiffeId

WorkloadUid = NewType("WorkloadUid", str)
"""xDS Workload.uid, e.g. `Kubernetes//Pod/<ns>/<name>` (not the Kubernetes pod uid)."""

ServiceKey = NewType("ServiceKey", str)
"""`<namespace>/<hostname>`."""

PolicyKey = NewType("PolicyKey", str)
"""`<namespace>/<name>`."""


class TunnelProtocol(enum.StrEnum):
    NONE = "none"
    HBONE = "hbone"
    LEGACY_ISTIO_MTLS = "legacy_istio_mtls"


class WorkloadType(enum.StrEnum):
    DEPLOYMENT = "deployment"
    CRONJOB = "cronjob"
    POD = "pod"
    JOB = "job"


class AppProtocol(enum.StrEnum):
    UNKNOWN = "unknown"
    HTTP11 = "http11"
    HTTP2 = "http2"
    GRPC = "grpc"


class NetworkAddress(msgspec.Struct, frozen=True, kw_only=True):
    network: str = ""
    address: str


class NamespacedHostname(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    hostname: str


class GatewayAddress(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of `hostname` / `address` is set."""

    hostname: NamespacedHostname | None = None
    address: NetworkAddress | None = None
    hbone_mtls_port: int = 15008


class Port(msgspec.Struct, frozen=True, kw_only=True):
    service_port: int
    target_port: int
    app_protocol: AppProtocol = AppProtocol.UNKNOWN


class Workload(msgspec.Struct, frozen=True, kw_only=True):
    uid: WorkloadUid
    name: str
    namespace: str
    addresses: tuple[str, ...] = ()
    hostname: str = ""
    network: str = ""
    tunnel_protocol: TunnelProtocol = TunnelProtocol.NONE
    trust_domain: str = "cluster.local"
    service_account: str = "default"
    waypoint: GatewayAddress | None = None
    network_gateway: GatewayAddress | None = None
    node: str = ""
    canonical_name: str = ""
    canonical_revision: str = ""
    workload_type: WorkloadType = WorkloadType.DEPLOYMENT
    workload_name: str = ""
    native_tunnel: bool = False
    services: dict[ServiceKey, tuple[Port, ...]] = {}
    authorization_policies: tuple[PolicyKey, ...] = ()
    healthy: bool = True
    cluster_id: str = ""
    host_network: bool = False

    @property
    def identity(self) -> SpiffeId:
        return SpiffeId(
            trust_domain=self.trust_domain or "cluster.local",
            namespace=self.namespace,
            service_account=self.service_account or "default",
        )


class Service(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    hostname: str
    addresses: tuple[NetworkAddress, ...] = ()
    ports: tuple[Port, ...] = ()
    subject_alt_names: tuple[str, ...] = ()
    waypoint: GatewayAddress | None = None

    @property
    def key(self) -> ServiceKey:
        return ServiceKey(f"{self.namespace}/{self.hostname}")


class Scope(enum.StrEnum):
    GLOBAL = "global"
    NAMESPACE = "namespace"
    WORKLOAD_SELECTOR = "workload_selector"


class Action(enum.StrEnum):
    ALLOW = "allow"
    DENY = "deny"


class StringMatch(msgspec.Struct, frozen=True, kw_only=True):
    kind: str  # "exact" | "prefix" | "suffix" | "presence"
    value: str = ""

    def matches(self, text: str | None) -> bool:
        if text is None:
            return False
        if self.kind == "exact":
            return text == self.value
        if self.kind == "prefix":
            return text.startswith(self.value)
        if self.kind == "suffix":
            return text.endswith(self.value)
        return bool(text)  # presence


class ServiceAccountMatch(msgspec.Struct, frozen=True, kw_only=True):
    namespace: str
    service_account: str


class Match(msgspec.Struct, frozen=True, kw_only=True):
    """Fields are ANDed; the values within a field ORed (upstream semantics)."""

    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()
    principals: tuple[StringMatch, ...] = ()
    not_principals: tuple[StringMatch, ...] = ()
    source_ips: tuple[str, ...] = ()
    not_source_ips: tuple[str, ...] = ()
    destination_ips: tuple[str, ...] = ()
    not_destination_ips: tuple[str, ...] = ()
    destination_ports: tuple[int, ...] = ()
    not_destination_ports: tuple[int, ...] = ()
    service_accounts: tuple[ServiceAccountMatch, ...] = ()
    not_service_accounts: tuple[ServiceAccountMatch, ...] = ()


class Clause(msgspec.Struct, frozen=True, kw_only=True):
    matches: tuple[Match, ...] = ()


class Rule(msgspec.Struct, frozen=True, kw_only=True):
    clauses: tuple[Clause, ...] = ()


class Authorization(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    scope: Scope = Scope.GLOBAL
    action: Action = Action.ALLOW
    rules: tuple[Rule, ...] = ()
    dry_run: bool = False

    @property
    def key(self) -> PolicyKey:
        return PolicyKey(f"{self.namespace}/{self.name}")
