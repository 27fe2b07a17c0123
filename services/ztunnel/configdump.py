"""ztunnel's `/config_dump` in upstream ztunnel's JSON schema, so that upstream tooling reads it
(`istioctl ztunnel-config all|workload|service|policy|certificate|connections --file DUMP`).

Pure functions from the domain types (state/types.py, the ZDS workload info, the connection records of
telemetry/access_log.py) to JSON-able dicts. Upstream's
top-level keys and what fills them here:

    workloads      every xDS Workload the store holds, sorted by uid          (`workload`)
    services       every xDS Service, sorted by key, with its endpoints       (`service`)
    policies       every Authorization, sorted by key                         (`policy`)
    certificates   the certificate manager's entries (identity/manager.py)
    workloadState  ZDS pod uid -> state, info, connections                    (`workload_state`)
                   connections: the pod's open connections (access_log.OpenConnections), as upstream's
                   connection manager lists them                              (`connections`)
    config         the process's settings (our own names; tokens redacted)

Field names are upstream's (camelCase; enum values as upstream spells them: `HBONE`/`TCP`, `Healthy`,
`Allow`/`Deny`, `Global`/`Namespace`/`WorkloadSelector`); fields ztunnel leaves out when empty are left out
here too. Addresses are upstream's `network/ip`, a namespaced hostname `namespace/hostname`.

Connections are the ones open when the dump is taken, each pod's in the order they opened (upstream's come
from hash sets, in no order), every entry `{src, originalDst, actualDst, protocol}` with `ip:port` strings:

    inbound    src = the TCP peer (for HBONE, the client ztunnel's connection from the client pod's IP);
               originalDst = the service hostname of the client's `Forwarded: host=`, else null;
               actualDst = the app address delivered to; protocol HBONE (15008) or TCP (15006)
    outbound   src = the app's address; originalDst = where it was going (SO_ORIGINAL_DST, a VIP say);
               actualDst = where ztunnel connected: the peer's (or waypoint's) 15008, or the passthrough
               destination; protocol HBONE or TCP
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from services.ztunnel.state.types import (
    Action,
    Authorization,
    GatewayAddress,
    Match,
    NetworkAddress,
    Scope,
    Service,
    ServiceAccountMatch,
    StringMatch,
    TunnelProtocol,
    Workload,
)
from services.ztunnel.telemetry.access_log import ConnectionOutcome, OpenConnections
from shared.addr import format_host_port, unmap
from shared.zds.types import PodUid, WorkloadInfo

_PROTOCOL = {TunnelProtocol.NONE: "TCP", TunnelProtocol.HBONE: "HBONE",
             TunnelProtocol.LEGACY_ISTIO_MTLS: "LEGACY_ISTIO_MTLS"}  # upstream refuses the last one
_SCOPE = {Scope.GLOBAL: "Global", Scope.NAMESPACE: "Namespace", Scope.WORKLOAD_SELECTOR: "WorkloadSelector"}
_ACTION = {Action.ALLOW: "Allow", Action.DENY: "Deny"}
_STRING_MATCH = {"exact": "Exact", "prefix": "Prefix", "suffix": "Suffix", "presence": "Presence"}


def network_address(addr: NetworkAddress) -> str:
    return f"{addr.network}/{addr.address}"


def gateway(gw: GatewayAddress) -> dict[str, Any]:
    if gw.hostname is not None:
        destination = f"{gw.hostname.namespace}/{gw.hostname.hostname}"
    else:
        assert gw.address is not None, "a GatewayAddress has a hostname or an address"
        destination = network_address(gw.address)
    return {"destination": destination, "hboneMtlsPort": gw.hbone_mtls_port}


def health(healthy: bool) -> str:
    return "Healthy" if healthy else "Unhealthy"


def workload(wl: Workload) -> dict[str, Any]:
    out: dict[str, Any] = {"workloadIps": list(wl.addresses)}
    if wl.waypoint is not None:
        out["waypoint"] = gateway(wl.waypoint)
    if wl.network_gateway is not None:
        out["networkGateway"] = gateway(wl.network_gateway)
    out["protocol"] = _PROTOCOL[wl.tunnel_protocol]
    out["networkMode"] = "HostNetwork" if wl.host_network else "Standard"
    out["uid"] = wl.uid
    out["name"] = wl.name
    out["namespace"] = wl.namespace
    optional = {
        "trustDomain": wl.trust_domain, "serviceAccount": wl.service_account, "network": wl.network,
        "workloadName": wl.workload_name, "workloadType": str(wl.workload_type),
        "canonicalName": wl.canonical_name, "canonicalRevision": wl.canonical_revision,
        "hostname": wl.hostname, "node": wl.node,
    }
    out.update((key, value) for key, value in optional.items() if value)
    if wl.native_tunnel:
        out["nativeTunnel"] = True
    if wl.authorization_policies:
        out["authorizationPolicies"] = list(wl.authorization_policies)
    out["status"] = health(wl.healthy)
    out["clusterId"] = wl.cluster_id
    if wl.services:
        out["services"] = sorted(wl.services)
    return out


def service(svc: Service, endpoints: Iterable[Workload]) -> dict[str, Any]:
    """`endpoints`: the workloads selecting `svc` (StateStore.endpoints); keyed by uid, as upstream does."""
    out: dict[str, Any] = {
        "name": svc.name,
        "namespace": svc.namespace,
        "hostname": svc.hostname,
        "vips": [network_address(a) for a in svc.addresses],
        "ports": {str(p.service_port): p.target_port for p in svc.ports},
        "endpoints": {
            wl.uid: {"workloadUid": wl.uid,
                     "port": {str(p.service_port): p.target_port for p in wl.services.get(svc.key, ())},
                     "status": health(wl.healthy)}
            for wl in endpoints
        },
        "subjectAltNames": list(svc.subject_alt_names),
    }
    if svc.waypoint is not None:
        out["waypoint"] = gateway(svc.waypoint)
    return out


def string_match(sm: StringMatch) -> dict[str, Any]:
    # Upstream's enum, externally tagged: {"Exact": "v"}; Presence carries nothing ([]).
    return {_STRING_MATCH[sm.kind]: [] if sm.kind == "presence" else sm.value}


def _accounts(items: Iterable[ServiceAccountMatch]) -> list[dict[str, str]]:
    return [{"namespace": a.namespace, "serviceAccount": a.service_account} for a in items]


def policy_match(m: Match) -> dict[str, Any]:
    fields: dict[str, list[Any]] = {
        "namespaces": [string_match(s) for s in m.namespaces],
        "notNamespaces": [string_match(s) for s in m.not_namespaces],
        "serviceAccounts": _accounts(m.service_accounts),
        "notServiceAccounts": _accounts(m.not_service_accounts),
        "principals": [string_match(s) for s in m.principals],
        "notPrincipals": [string_match(s) for s in m.not_principals],
        "sourceIps": list(m.source_ips),
        "notSourceIps": list(m.not_source_ips),
        "destinationIps": list(m.destination_ips),
        "notDestinationIps": list(m.not_destination_ips),
        "destinationPorts": list(m.destination_ports),
        "notDestinationPorts": list(m.not_destination_ports),
    }
    return {key: value for key, value in fields.items() if value}


def policy(pol: Authorization) -> dict[str, Any]:
    return {
        "name": pol.name,
        "namespace": pol.namespace,
        "scope": _SCOPE[pol.scope],
        "action": _ACTION[pol.action],
        "rules": [[[policy_match(m) for m in clause.matches] for clause in rule.clauses]
                  for rule in pol.rules],
        "dryRun": pol.dry_run,
    }


def workload_info(info: WorkloadInfo) -> dict[str, str]:
    return {"name": info.name, "namespace": info.namespace, "serviceAccount": info.service_account}


def _protocol(outcome: ConnectionOutcome) -> str:
    # Through a tunnel (15008 in, a CONNECT out) or plain TCP (15006 in, passthrough out).
    return "HBONE" if outcome.dst_hbone_addr is not None else "TCP"


def outbound_connection(outcome: ConnectionOutcome) -> dict[str, Any]:
    """Upstream's `OutboundConnection`: the app's address, where it was going (SO_ORIGINAL_DST), where
    ztunnel connected for it (a peer's 15008, or the passthrough destination) and how."""
    original = outcome.original
    return {"src": str(outcome.src_addr),
            "originalDst": (format_host_port(unmap(original[0]), original[1]) if original is not None
                            else str(outcome.dst_addr)),
            "actualDst": str(outcome.dst_addr),
            "protocol": _protocol(outcome)}


def inbound_connection(outcome: ConnectionOutcome) -> dict[str, Any]:
    """Upstream's `InboundConnectionDump`: the TCP peer, the service hostname the client named (the
    `Forwarded` host; null when none), the app address the connection was delivered to, and how it came."""
    return {"src": str(outcome.src_addr),
            "originalDst": outcome.for_host,
            "actualDst": str(outcome.dst_hbone_addr if outcome.dst_hbone_addr is not None
                             else outcome.dst_addr),
            "protocol": _protocol(outcome)}


def connections(open_connections: OpenConnections | None) -> dict[str, list[dict[str, Any]]]:
    """A pod's open connections per direction, in the order they opened."""
    if open_connections is None:
        return {"inbound": [], "outbound": []}
    return {"inbound": [inbound_connection(o) for o in open_connections.inbound],
            "outbound": [outbound_connection(o) for o in open_connections.outbound]}


def workload_state(running: Mapping[PodUid, WorkloadInfo], pending: Mapping[PodUid, WorkloadInfo],
                   open_connections: Mapping[PodUid, OpenConnections]) -> dict[str, Any]:
    """ZDS pod uid -> upstream's proxy state: `Up` (proxies running), with the pod's open connections, or
    `Pending` (start failed, retried), with none."""
    out: dict[str, Any] = {}
    for uid, info in sorted(pending.items()):
        out[uid] = {"state": "Pending", "info": workload_info(info)}
    for uid, info in sorted(running.items()):
        out[uid] = {"state": "Up", "connections": connections(open_connections.get(uid)),
                    "info": workload_info(info)}
    return dict(sorted(out.items()))
