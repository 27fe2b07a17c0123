"""Convert xDS protobufs (istio.workload.Address, istio.security.Authorization) into ztunnel domain types.

This is the only module of ztunnel that reads the generated protobuf classes. Every function either returns a
fully valid domain value or raises ConversionError with a reason fit for a NACK's error_detail.
"""

from __future__ import annotations

import functools
import ipaddress
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

from services.ztunnel.state.types import (
    Action,
    AppProtocol,
    Authorization,
    Clause,
    GatewayAddress,
    Match,
    NamespacedHostname,
    NetworkAddress,
    PolicyKey,
    Port,
    Rule,
    Scope,
    Service,
    ServiceAccountMatch,
    ServiceKey,
    StringMatch,
    TunnelProtocol,
    Workload,
    WorkloadType,
    WorkloadUid,
)
from services.ztunnel.xds.errors import ConversionError
from shared.addr import canonical_ip
from shared.api import authorization_pb2 as apb
from shared.api import workload_pb2 as wpb

V = TypeVar("V")
M = TypeVar("M", bound=Message)

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"

_TUNNEL = {
    wpb.NONE: TunnelProtocol.NONE,
    wpb.HBONE: TunnelProtocol.HBONE,
    wpb.LEGACY_ISTIO_MTLS: TunnelProtocol.LEGACY_ISTIO_MTLS,
}
_WL_TYPE = {
    wpb.DEPLOYMENT: WorkloadType.DEPLOYMENT,
    wpb.CRONJOB: WorkloadType.CRONJOB,
    wpb.POD: WorkloadType.POD,
    wpb.JOB: WorkloadType.JOB,
}
_APP = {
    wpb.UNKNOWN: AppProtocol.UNKNOWN,
    wpb.HTTP11: AppProtocol.HTTP11,
    wpb.HTTP2: AppProtocol.HTTP2,
    wpb.GRPC: AppProtocol.GRPC,
}
_SCOPE = {
    apb.GLOBAL: Scope.GLOBAL,
    apb.NAMESPACE: Scope.NAMESPACE,
    apb.WORKLOAD_SELECTOR: Scope.WORKLOAD_SELECTOR,
}
_ACTION = {apb.ALLOW: Action.ALLOW, apb.DENY: Action.DENY}


def _ip(name: str, raw: bytes, what: str) -> str:
    if len(raw) not in (4, 16):
        raise ConversionError(name, f"{what} has {len(raw)} bytes; an address must be 4 (IPv4) or 16 (IPv6)")
    return canonical_ip(raw)


def _enum(name: str, table: Mapping[Any, V], value: int, what: str) -> V:
    try:
        return table[value]
    except KeyError:
        raise ConversionError(name, f"unknown {what} value {value}") from None


def _port_number(name: str, value: int, what: str) -> int:
    if not 0 < value <= 65535:
        raise ConversionError(name, f"{what} {value} is outside 1-65535")
    return value


def _ports(name: str, ports: object) -> tuple[Port, ...]:
    out = []
    for p in ports:  # type: ignore[attr-defined]
        out.append(
            Port(
                service_port=_port_number(name, p.service_port, "service port"),
                target_port=_port_number(name, p.target_port, "target port")
                if p.target_port
                else p.service_port,
                app_protocol=_enum(name, _APP, p.app_protocol, "app protocol"),
            )
        )
    return tuple(out)


def _network_address(name: str, msg: wpb.NetworkAddress, what: str) -> NetworkAddress:
    return NetworkAddress(network=msg.network, address=_ip(name, msg.address, what))


def _gateway(name: str, msg: wpb.GatewayAddress, what: str) -> GatewayAddress:
    kind = msg.WhichOneof("destination")
    port = msg.hbone_mtls_port or 15008
    if kind == "hostname":
        return GatewayAddress(
            hostname=NamespacedHostname(namespace=msg.hostname.namespace, hostname=msg.hostname.hostname),
            hbone_mtls_port=port,
        )
    if kind == "address":
        return GatewayAddress(address=_network_address(name, msg.address, what), hbone_mtls_port=port)
    raise ConversionError(name, f"{what} has neither a hostname nor an address")


def workload_from_pb(msg: wpb.Workload) -> Workload:
    name = msg.uid or f"{msg.namespace}/{msg.name}"
    if not msg.uid:
        raise ConversionError(name, "workload without uid")
    if not msg.name or not msg.namespace:
        raise ConversionError(name, "workload without name or namespace")
    return Workload(
        uid=WorkloadUid(msg.uid),
        name=msg.name,
        namespace=msg.namespace,
        addresses=tuple(_ip(name, a, "workload address") for a in msg.addresses),
        hostname=msg.hostname,
        network=msg.network,
        tunnel_protocol=_enum(name, _TUNNEL, msg.tunnel_protocol, "tunnel protocol"),
        trust_domain=msg.trust_domain or "cluster.local",
        service_account=msg.service_account or "default",
        waypoint=_gateway(name, msg.waypoint, "waypoint") if msg.HasField("waypoint") else None,
        network_gateway=(
            _gateway(name, msg.network_gateway, "network gateway")
            if msg.HasField("network_gateway")
            else None
        ),
        node=msg.node,
        canonical_name=msg.canonical_name,
        canonical_revision=msg.canonical_revision,
        workload_type=_enum(name, _WL_TYPE, msg.workload_type, "workload type"),
        workload_name=msg.workload_name,
        native_tunnel=msg.native_tunnel,
        services={ServiceKey(k): _ports(name, v.ports) for k, v in msg.services.items()},
        authorization_policies=tuple(PolicyKey(p) for p in msg.authorization_policies),
        healthy=msg.status == wpb.HEALTHY,
        cluster_id=msg.cluster_id,
        host_network=msg.network_mode == wpb.HOST_NETWORK,
    )


def service_from_pb(msg: wpb.Service) -> Service:
    name = f"{msg.namespace}/{msg.hostname}"
    if not msg.hostname or not msg.namespace:
        raise ConversionError(name, "service without hostname or namespace")
    return Service(
        name=msg.name,
        namespace=msg.namespace,
        hostname=msg.hostname,
        addresses=tuple(_network_address(name, a, "service VIP") for a in msg.addresses),
        ports=_ports(name, msg.ports),
        subject_alt_names=tuple(msg.subject_alt_names),
        waypoint=_gateway(name, msg.waypoint, "waypoint") if msg.HasField("waypoint") else None,
    )


def _unpack(name: str, resource: any_pb2.Any, type_url: str, msg: M) -> M:
    """Parse `resource` into the empty `msg` after checking that its type URL is `type_url`."""
    if resource.type_url != type_url:
        raise ConversionError(name, f"resource of type {resource.type_url!r} in an {msg.DESCRIPTOR.name} "
                                    f"response")
    try:
        msg.ParseFromString(resource.value)
    except DecodeError as exc:
        raise ConversionError(name, f"cannot decode {msg.DESCRIPTOR.full_name}: {exc}") from None
    return msg


def _named_errors(convert: Callable[[str, any_pb2.Any], V]) -> Callable[[str, any_pb2.Any], V]:
    """`convert` whose ConversionError is named by the resource's own xDS name, as a NACK must say it (the
    content's own name, a uid or namespace/name, may be empty or another)."""
    @functools.wraps(convert)
    def named(name: str, resource: any_pb2.Any) -> V:
        try:
            return convert(name, resource)
        except ConversionError as exc:
            if exc.name == name:
                raise
            raise ConversionError(name, f"{exc.name!r}: {exc.problem}") from None

    return named


@_named_errors
def address_from_any(name: str, resource: any_pb2.Any) -> Workload | Service:
    """Decode one Address resource of a DeltaDiscoveryResponse; check it is keyed as upstream keys it.

    Raises:
        ConversionError: named by `name`, whatever the resource's content calls itself.
    """
    msg = _unpack(name, resource, ADDRESS_TYPE_URL, wpb.Address())
    kind = msg.WhichOneof("type")
    if kind == "workload":
        wl = workload_from_pb(msg.workload)
        if wl.uid != name:
            raise ConversionError(name, f"workload resource named {name!r} has uid {wl.uid!r}")
        return wl
    if kind == "service":
        svc = service_from_pb(msg.service)
        if svc.key != name:
            raise ConversionError(name, f"service resource named {name!r} is {svc.key!r}")
        return svc
    raise ConversionError(name, "Address with neither workload nor service")


def _string_match(name: str, msg: apb.StringMatch) -> StringMatch:
    kind = msg.WhichOneof("match_type")
    if kind is None:
        raise ConversionError(name, "empty string match")
    if kind == "presence":
        return StringMatch(kind="presence")
    return StringMatch(kind=kind, value=getattr(msg, kind))


def _cidr(name: str, msg: apb.Address) -> str:
    ip = _ip(name, msg.address, "policy address")
    bits = 32 if len(msg.address) == 4 else 128
    length = msg.length if msg.length else bits
    if length > bits:
        raise ConversionError(name, f"prefix length {length} is longer than {bits}")
    return str(ipaddress.ip_network(f"{ip}/{length}", strict=False))


def _match(name: str, m: apb.Match) -> Match:
    return Match(
        namespaces=tuple(_string_match(name, x) for x in m.namespaces),
        not_namespaces=tuple(_string_match(name, x) for x in m.not_namespaces),
        principals=tuple(_string_match(name, x) for x in m.principals),
        not_principals=tuple(_string_match(name, x) for x in m.not_principals),
        source_ips=tuple(_cidr(name, x) for x in m.source_ips),
        not_source_ips=tuple(_cidr(name, x) for x in m.not_source_ips),
        destination_ips=tuple(_cidr(name, x) for x in m.destination_ips),
        not_destination_ips=tuple(_cidr(name, x) for x in m.not_destination_ips),
        destination_ports=tuple(_port_number(name, p, "destination port") for p in m.destination_ports),
        not_destination_ports=tuple(
            _port_number(name, p, "destination port") for p in m.not_destination_ports
        ),
        service_accounts=tuple(
            ServiceAccountMatch(namespace=x.namespace, service_account=x.service_account)
            for x in m.service_accounts
        ),
        not_service_accounts=tuple(
            ServiceAccountMatch(namespace=x.namespace, service_account=x.service_account)
            for x in m.not_service_accounts
        ),
    )


def authorization_from_pb(msg: apb.Authorization) -> Authorization:
    name = f"{msg.namespace}/{msg.name}"
    if not msg.name:
        raise ConversionError(name, "authorization policy without name")
    return Authorization(
        name=msg.name,
        namespace=msg.namespace,
        scope=_enum(name, _SCOPE, msg.scope, "scope"),
        action=_enum(name, _ACTION, msg.action, "action"),
        rules=tuple(
            Rule(clauses=tuple(Clause(matches=tuple(_match(name, m) for m in c.matches)) for c in r.clauses))
            for r in msg.rules
        ),
        dry_run=msg.dry_run,
    )


@_named_errors
def authorization_from_any(name: str, resource: any_pb2.Any) -> Authorization:
    """Decode one Authorization resource (named `namespace/name`).

    Raises:
        ConversionError: named by `name`, whatever the resource's content calls itself.
    """
    pol = authorization_from_pb(_unpack(name, resource, AUTHORIZATION_TYPE_URL, apb.Authorization()))
    if pol.key != name:
        raise ConversionError(name, f"authorization resource named {name!r} is {pol.key!r}")
    return pol
