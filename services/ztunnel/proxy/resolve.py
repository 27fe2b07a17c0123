"""Outbound resolution: where a captured connection goes, decided from the xDS state (pure, no I/O).

Theory of operation
-------------------
The in-pod outbound listener (15001) knows the original destination `ip:port` the app dialled; this module
turns it into a route, the way upstream ztunnel does:

1. a Service VIP:port -> one healthy endpoint of that service, chosen at random, its port mapped
   (the endpoint's own mapping for the service port, else the service's `target_port`, else the port as is);
   a service with a waypoint -> an HBONE tunnel to the waypoint carrying the original VIP:port as target;
   a service without a healthy endpoint -> `NoHealthyUpstream` (refuse the connection, log why);
2. a pod IP -> that workload; with a waypoint -> a tunnel to the waypoint, target the original ip:port;
3. the chosen workload speaks HBONE -> `HboneRoute` to its IP on 15008 with `:authority` = its IP and the
   target port, expecting its SPIFFE identity (plus the service's subject alt names);
   otherwise -> `Passthrough` to its IP and port (plain TCP);
4. anything unknown -> `Passthrough` to where the app was going.

A source that is itself the waypoint is never sent back to its own waypoint. Multi-network (network
gateways, double HBONE) is not handled: every address is looked up on one network.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import msgspec

from services.ztunnel.hbone.pool import PoolKey
from services.ztunnel.net import INBOUND_HBONE_PORT
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import GatewayAddress, Port, Service, TunnelProtocol, Workload
from shared.addr import Addr
from shared.identity import IdentityError, SpiffeId


class Passthrough(msgspec.Struct, frozen=True, kw_only=True):
    """Plain TCP to `dst` (unknown destination, or a workload outside the mesh)."""

    dst: Addr
    workload: Workload | None = None
    service: Service | None = None


class HboneRoute(msgspec.Struct, frozen=True, kw_only=True):
    """An HBONE tunnel: connect to `dst` (ip:15008), CONNECT `target`, accept only `identities`."""

    dst: Addr
    target: Addr
    identities: frozenset[SpiffeId]
    workload: Workload
    """The workload the tunnel ends at (the waypoint's, when `via_waypoint`)."""
    service: Service | None = None
    via_waypoint: bool = False

    def pool_key(self, src_identity: SpiffeId, src_ip: str | None = None) -> PoolKey:
        return PoolKey(src_identity=src_identity, dst_identities=self.identities, dst=self.dst, src_ip=src_ip)


class NoHealthyUpstream(msgspec.Struct, frozen=True, kw_only=True):
    """A meshed destination with nowhere to go: refuse the connection, log `reason`."""

    reason: str
    service: Service | None = None


Route = Passthrough | HboneRoute | NoHealthyUpstream
Chooser = Callable[[Sequence[tuple[Workload, tuple[Port, ...]]]], tuple[Workload, tuple[Port, ...]]]


def _first_address(workload: Workload, family_of: str) -> str | None:
    v6 = ":" in family_of
    for addr in workload.addresses:
        if (":" in addr) == v6:
            return addr
    return workload.addresses[0] if workload.addresses else None


def _identities(workload: Workload, service: Service | None) -> frozenset[SpiffeId]:
    ids = {workload.identity}
    for san in service.subject_alt_names if service is not None else ():
        try:
            ids.add(SpiffeId.parse(san))
        except IdentityError:
            continue  # a non-SPIFFE SAN can never match what we verify
    return frozenset(ids)


def _gateway_service(store: StateStore, gateway: GatewayAddress, network: str) -> Service | None:
    """The Service a GatewayAddress names: by hostname, or by an address that is a service VIP (istiod's
    usual form: the waypoint Service's VIP)."""
    if gateway.address is not None:
        return store.service_by_vip(gateway.address.address, gateway.address.network or network)
    if gateway.hostname is not None:
        return store.service_by_key(f"{gateway.hostname.namespace}/{gateway.hostname.hostname}")
    return None


def is_waypoint_of(source: Workload | None, gateway: GatewayAddress, store: StateStore) -> bool:
    """`source` is (one of the pods of) that waypoint: a waypoint is never sent to its own waypoint."""
    if source is None:
        return False
    if gateway.address is not None and gateway.address.address in source.addresses:
        return True
    service = _gateway_service(store, gateway, source.network)
    return service is not None and service.key in source.services


def _target_port(service: Service, workload_ports: tuple[Port, ...], port: int) -> int:
    for p in workload_ports:
        if p.service_port == port and p.target_port:
            return p.target_port
    for p in service.ports:
        if p.service_port == port and p.target_port:
            return p.target_port
    return port


def _waypoint_route(store: StateStore, gateway: GatewayAddress, target: Addr, *, network: str,
                    service: Service | None, choose: Chooser) -> Route:
    waypoint: Workload | None = None
    if gateway.address is not None:
        what = gateway.address.address
        waypoint = store.workload_by_ip(gateway.address.address, gateway.address.network or network)
    elif gateway.hostname is not None:
        what = f"{gateway.hostname.namespace}/{gateway.hostname.hostname}"
    else:
        what = "(empty)"
    wp_service = _gateway_service(store, gateway, network) if waypoint is None else None
    if wp_service is not None:
        healthy = [(wl, ports) for wl, ports in store.endpoints(wp_service) if wl.healthy and wl.addresses]
        if healthy:
            waypoint = choose(healthy)[0]
    if waypoint is None:
        return NoHealthyUpstream(reason=f"waypoint {what} has no healthy endpoint", service=service)
    ip = _first_address(waypoint, target[0])
    assert ip is not None
    return HboneRoute(dst=(ip, gateway.hbone_mtls_port or INBOUND_HBONE_PORT), target=target,
                      identities=frozenset([waypoint.identity]), workload=waypoint, service=service,
                      via_waypoint=True)


def _workload_route(workload: Workload, ip: str, port: int, service: Service | None) -> Route:
    if workload.tunnel_protocol is TunnelProtocol.HBONE:
        return HboneRoute(dst=(ip, INBOUND_HBONE_PORT), target=(ip, port),
                          identities=_identities(workload, service), workload=workload, service=service)
    return Passthrough(dst=(ip, port), workload=workload, service=service)


def resolve_outbound(store: StateStore, dst: Addr, *, source: Workload | None = None, network: str = "",
                     choose: Chooser = random.choice, via_waypoints: bool = True) -> Route:
    """Where a connection from `source` to `dst` (the original destination) goes. See the module doc.

    `via_waypoints=False` resolves as the waypoint itself does for what it serves: straight to an endpoint.
    """
    ip, port = dst
    service = store.service_by_vip(ip, network)
    if service is not None:
        if (via_waypoints and service.waypoint is not None
                and not is_waypoint_of(source, service.waypoint, store)):
            return _waypoint_route(store, service.waypoint, dst, network=network, service=service,
                                   choose=choose)
        healthy = [(wl, ports) for wl, ports in store.endpoints(service) if wl.healthy and wl.addresses]
        if not healthy:
            return NoHealthyUpstream(reason=f"no healthy upstream for service {service.key} "
                                            f"(port {port})", service=service)
        endpoint, ports = choose(healthy)
        address = _first_address(endpoint, ip)
        assert address is not None
        return _workload_route(endpoint, address, _target_port(service, ports, port), service)
    workload = store.workload_by_ip(ip, network)
    if workload is None:
        return Passthrough(dst=dst)
    if (via_waypoints and workload.waypoint is not None
            and not is_waypoint_of(source, workload.waypoint, store)):
        return _waypoint_route(store, workload.waypoint, dst, network=network, service=None, choose=choose)
    return _workload_route(workload, ip, port, None)
