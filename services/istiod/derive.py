"""Derive upstream's xDS resources from a World, the way istiod does (pure functions, no I/O).

* pod -> istio.workload.Workload, keyed by uid `<clusterId>//Pod/<namespace>/<name>`; tunnel_protocol HBONE
  when the pod is ambient-enabled (is_ambient), NONE otherwise; `services` lists every Service whose selector
  matches the pod (key `<namespace>/<hostname>`, ports with resolved target ports); `authorization_policies`
  lists the WORKLOAD_SELECTOR policies of its namespace that select it.
* service -> istio.workload.Service, keyed `<namespace>/<hostname>`.
* policy -> istio.security.Authorization, keyed `<namespace>/<name>`; scope GLOBAL in the root namespace,
  NAMESPACE elsewhere, WORKLOAD_SELECTOR when it has a selector.
* a waypoint reference becomes a GatewayAddress: the waypoint Service's first VIP, hbone_mtls_port 15008.
* waypoint -> trio_ambient.waypoint.v1.WaypointConfig (ours), keyed `<namespace>/<name>`: the services it
  takes, the authorizationPolicies whose targetRefs name it (kind Gateway) or one of those services, and the
  httpRoutes whose parent is one of them. Those policies are never Authorization resources (ztunnel does not
  see them), as istiod keeps policies with targetRefs away from ztunnel.
"""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Mapping

import msgspec
from google.protobuf import empty_pb2, message

from services.istiod.world import (
    DATAPLANE_MODE_LABEL,
    GATEWAY_NAME_LABEL,
    SIDECAR_STATUS_ANNOTATION,
    USE_WAYPOINT_LABEL,
    AuthorizationPolicy,
    BackendRef,
    HTTPRoute,
    HTTPRouteRule,
    L7Rule,
    Match,
    Pod,
    Policy,
    Service,
    ServicePort,
    StringMatch,
    Waypoint,
    WaypointRef,
    World,
    header_of_key,
    parse_duration,
    string_match,
)
from shared.api import authorization_pb2 as apb
from shared.api import podwatch_pb2
from shared.api import waypoint_pb2 as wypb
from shared.api import workload_pb2 as wpb
from shared.identity import SpiffeId

ADDRESS_TYPE_URL = "type.googleapis.com/istio.workload.Address"
AUTHORIZATION_TYPE_URL = "type.googleapis.com/istio.security.Authorization"
# Ours (proto/waypoint.proto): what a waypoint enforces; served only to that waypoint's proxy.
WAYPOINT_CONFIG_TYPE_URL = "type.googleapis.com/trio_ambient.waypoint.v1.WaypointConfig"
HBONE_PORT = 15008

_APP_PROTOCOLS = {"http": wpb.HTTP11, "http1": wpb.HTTP11, "http2": wpb.HTTP2, "grpc": wpb.GRPC}


def selector_matches(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """Kubernetes equality selector; an empty selector selects nothing here (a Service without selector has no
    endpoints derived from pods)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def pod_labels(world: World, pod: Pod) -> dict[str, str]:
    """The pod's labels; a waypoint's pod also carries what upstream's gateway controller puts on it (its
    gateway's name, and `istio.io/dataplane-mode: none`, so no node agent captures it)."""
    wp = world.waypoint_of_pod(pod)
    if wp is None:
        return pod.labels
    return {**pod.labels, GATEWAY_NAME_LABEL: wp.name, DATAPLANE_MODE_LABEL: "none"}


def is_ambient(world: World, pod: Pod) -> bool:
    """Upstream's default enablement: pod label ambient, or namespace label ambient and pod not opted out with
    `none`; pods with a sidecar, host-network pods and waypoint pods are never captured."""
    if SIDECAR_STATUS_ANNOTATION in pod.annotations or pod.host_network or world.waypoint_of_pod(pod):
        return False
    mode = pod.labels.get(DATAPLANE_MODE_LABEL)
    if mode == "ambient":
        return True
    ns = world.namespace(pod.namespace)
    ns_mode = ns.labels.get(DATAPLANE_MODE_LABEL) if ns is not None else None
    return ns_mode == "ambient" and mode != "none"


def workload_uid(world: World, pod: Pod) -> str:
    return f"{world.cluster_id}//Pod/{pod.namespace}/{pod.name}"


def _canonical_name(pod: Pod) -> str:
    for key in ("service.istio.io/canonical-name", "app.kubernetes.io/name", "app"):
        if key in pod.labels:
            return pod.labels[key]
    return pod.workload or pod.name


def _canonical_revision(pod: Pod) -> str:
    for key in ("service.istio.io/canonical-revision", "app.kubernetes.io/version", "version"):
        if key in pod.labels:
            return pod.labels[key]
    return "latest"


def _waypoint_address(world: World, ref: WaypointRef | None, default_ns: str, *,
                      kind: str = "service") -> wpb.GatewayAddress | None:
    """The GatewayAddress of the waypoint `ref` names, when it takes traffic of `kind` (service|workload):
    a declared waypoint by its `for`; a bare waypoint service (no declaration) takes both."""
    if ref is None or ref.name == "none":
        return None
    ns = ref.namespace or default_ns
    declared = world.waypoint(ns, ref.name)
    if declared is not None and not (
        declared.serves_services if kind == "service" else declared.serves_workloads
    ):
        return None
    svc = next((s for s in world.services if s.namespace == ns and s.name == ref.name), None)
    if svc is None:
        return None
    if svc.vips:
        dest = wpb.NetworkAddress(network=world.network, address=ipaddress.ip_address(svc.vips[0]).packed)
        return wpb.GatewayAddress(address=dest, hbone_mtls_port=HBONE_PORT)
    return wpb.GatewayAddress(
        hostname=wpb.NamespacedHostname(namespace=ns, hostname=world.service_hostname(svc)),
        hbone_mtls_port=HBONE_PORT,
    )


def _pod_waypoint_ref(world: World, pod: Pod) -> WaypointRef | None:
    """The waypoint a pod names: its own field, its label, else its namespace's label; never for a waypoint's
    own pod (a waypoint is never sent to a waypoint)."""
    if world.waypoint_of_pod(pod) is not None:
        return None
    if pod.waypoint is not None:
        return pod.waypoint
    if USE_WAYPOINT_LABEL in pod.labels:
        return WaypointRef(name=pod.labels[USE_WAYPOINT_LABEL])
    ns = world.namespace(pod.namespace)
    if ns is not None and USE_WAYPOINT_LABEL in ns.labels:
        return WaypointRef(name=ns.labels[USE_WAYPOINT_LABEL])
    return None


def _pod_waypoint(world: World, pod: Pod) -> wpb.GatewayAddress | None:
    return _waypoint_address(world, _pod_waypoint_ref(world, pod), pod.namespace, kind="workload")


def _declared(world: World, ref: WaypointRef | None, default_ns: str) -> Waypoint | None:
    if ref is None or ref.name == "none":
        return None
    return world.waypoint(ref.namespace or default_ns, ref.name)


def waypoints_in_front_of(world: World, pod: Pod) -> list[Waypoint]:
    """The declared waypoints that traffic for `pod` goes through: the one its Workload.waypoint names, and
    those of the services selecting it (Service.waypoint). Empty for a waypoint's own pod."""
    if not world.waypoints or world.waypoint_of_pod(pod) is not None:
        return []
    found: dict[str, Waypoint] = {}
    own = _declared(world, _pod_waypoint_ref(world, pod), pod.namespace)
    if own is not None and own.serves_workloads:
        found[own.key] = own
    labels = pod_labels(world, pod)
    for svc in world.services:
        if svc.namespace != pod.namespace or not selector_matches(svc.selector, labels):
            continue
        wp = _declared(world, service_waypoint_ref(world, svc), svc.namespace)
        if wp is not None and wp.serves_services:
            found[wp.key] = wp
    return [found[k] for k in sorted(found)]


def _waypoint_principals(world: World, waypoints: list[Waypoint]) -> list[apb.StringMatch]:
    principals = []
    for wp in waypoints:
        pod = world.find_pod(wp.namespace, wp.pod)
        if pod is not None:
            principals.append(apb.StringMatch(
                exact=f"{world.trust_domain}/ns/{pod.namespace}/sa/{pod.service_account}"))
    return principals


def waypoint_policies(world: World, pod: Pod) -> list[apb.Authorization]:
    """The policies that make `pod` accept traffic only through its waypoints (none without one), both
    WORKLOAD_SELECTOR in the pod's namespace and listed in its Workload:

    * `istio_allow_waypoint_<ns>_<name>`: ALLOW from the waypoint's identity, upstream istiod's implicit
      waypoint policy (so the pod's own ALLOW policies, which now see the waypoint as the source, do not
      refuse it);
    * `require_waypoint_<ns>_<name>` (ours): DENY from any other source, so a client that goes around the
      waypoint is refused by the destination's ztunnel with the policy's name as the reason.
    """
    waypoints = waypoints_in_front_of(world, pod)
    principals = _waypoint_principals(world, waypoints)
    if not principals:
        return []
    suffix = "_".join(f"{wp.namespace}_{wp.name}" for wp in waypoints)
    def policy(name: str, action: int, match: apb.Match) -> apb.Authorization:
        return apb.Authorization(name=name, namespace=pod.namespace, scope=apb.WORKLOAD_SELECTOR,
                                 action=action,  # type: ignore[arg-type]
                                 rules=[apb.Rule(clauses=[apb.Clause(matches=[match])])])
    return [
        policy(f"istio_allow_waypoint_{suffix}", apb.ALLOW, apb.Match(principals=principals)),
        policy(f"require_waypoint_{suffix}", apb.DENY, apb.Match(not_principals=principals)),
    ]


def port_protocol(port: ServicePort) -> wpb.AppProtocol:
    """Istio's protocol selection for a service port: `appProtocol` when set, else the port name's prefix
    (`http`, `http-web`, `grpc-api`); anything else is opaque TCP (UNKNOWN)."""
    chosen = port.app_protocol or (port.name or "").split("-", 1)[0]
    return _APP_PROTOCOLS.get(chosen.lower(), wpb.UNKNOWN)


def _service_ports(svc: Service) -> list[wpb.Port]:
    return [
        wpb.Port(service_port=p.port, target_port=p.target_port or p.port, app_protocol=port_protocol(p))
        for p in svc.ports
    ]


def derive_workload(world: World, pod: Pod) -> wpb.Workload:
    services = {
        service_key(world, svc): wpb.PortList(ports=_service_ports(svc))
        for svc in world.services
        if svc.namespace == pod.namespace and selector_matches(svc.selector, pod_labels(world, pod))
    }
    policies = [
        pol.key
        for pol in world.policies
        if pol.namespace == pod.namespace
        and pol.selector is not None
        and selector_matches(pol.selector, pod.labels)
    ]
    wl = wpb.Workload(
        uid=workload_uid(world, pod),
        name=pod.name,
        namespace=pod.namespace,
        addresses=[ipaddress.ip_address(ip).packed for ip in pod.ips],
        network=world.network,
        # A waypoint is not captured but terminates HBONE itself on 15008.
        tunnel_protocol=wpb.HBONE if is_ambient(world, pod) or world.waypoint_of_pod(pod) else wpb.NONE,
        trust_domain=world.trust_domain,
        service_account=pod.service_account,
        node=pod.node,
        canonical_name=_canonical_name(pod),
        canonical_revision=_canonical_revision(pod),
        workload_type=wpb.DEPLOYMENT if pod.workload else wpb.POD,
        workload_name=pod.workload or pod.name,
        services=services,
        authorization_policies=sorted(policies + [
            f"{p.namespace}/{p.name}" for p in waypoint_policies(world, pod)]),
        status=wpb.HEALTHY,
        cluster_id=world.cluster_id,
        network_mode=wpb.HOST_NETWORK if pod.host_network else wpb.STANDARD,
    )
    waypoint = _pod_waypoint(world, pod)
    if waypoint is not None:
        wl.waypoint.CopyFrom(waypoint)
    return wl


def service_key(world: World, svc: Service) -> str:
    return f"{svc.namespace}/{world.service_hostname(svc)}"


def derive_service(world: World, svc: Service) -> wpb.Service:
    out = wpb.Service(
        name=svc.name,
        namespace=svc.namespace,
        hostname=world.service_hostname(svc),
        addresses=[
            wpb.NetworkAddress(network=world.network, address=ipaddress.ip_address(v).packed)
            for v in svc.vips
        ],
        ports=_service_ports(svc),
    )
    waypoint = _waypoint_address(world, service_waypoint_ref(world, svc), svc.namespace)
    if waypoint is not None:
        out.waypoint.CopyFrom(waypoint)
    return out


def service_waypoint_ref(world: World, svc: Service) -> WaypointRef | None:
    """The waypoint a service names: its own field, its label, else its namespace's label (a waypoint's own
    service never takes its namespace's waypoint)."""
    ref = svc.waypoint
    if ref is None and USE_WAYPOINT_LABEL in svc.labels:
        ref = WaypointRef(name=svc.labels[USE_WAYPOINT_LABEL])
    if ref is None and world.waypoint(svc.namespace, svc.name) is None:
        ns = world.namespace(svc.namespace)
        if ns is not None and USE_WAYPOINT_LABEL in ns.labels and ns.labels[USE_WAYPOINT_LABEL] != svc.name:
            ref = WaypointRef(name=ns.labels[USE_WAYPOINT_LABEL])
    return ref


def _string_match(sm: StringMatch) -> apb.StringMatch:
    if sm.exact is not None:
        return apb.StringMatch(exact=sm.exact)
    if sm.prefix is not None:
        return apb.StringMatch(prefix=sm.prefix)
    if sm.suffix is not None:
        return apb.StringMatch(suffix=sm.suffix)
    return apb.StringMatch(presence=empty_pb2.Empty())


def _principal_match(sm: StringMatch) -> apb.StringMatch:
    """Principals travel without the `spiffe://` scheme (`cluster.local/ns/x/sa/y`), as istiod sends them and
    ztunnel compares them; a world file may write either form."""
    scheme = "spiffe://"
    if sm.exact is not None and sm.exact.startswith(scheme):
        return apb.StringMatch(exact=sm.exact.removeprefix(scheme))
    if sm.prefix is not None and sm.prefix.startswith(scheme):
        return apb.StringMatch(prefix=sm.prefix.removeprefix(scheme))
    return _string_match(sm)


def _address(text: str) -> apb.Address:
    net = ipaddress.ip_network(text, strict=False)
    return apb.Address(address=net.network_address.packed, length=net.prefixlen)


def _match(m: Match) -> apb.Match:
    return apb.Match(
        namespaces=[_string_match(x) for x in m.namespaces],
        not_namespaces=[_string_match(x) for x in m.not_namespaces],
        principals=[_principal_match(x) for x in m.principals],
        not_principals=[_principal_match(x) for x in m.not_principals],
        source_ips=[_address(x) for x in m.source_ips],
        not_source_ips=[_address(x) for x in m.not_source_ips],
        destination_ips=[_address(x) for x in m.destination_ips],
        not_destination_ips=[_address(x) for x in m.not_destination_ips],
        destination_ports=m.destination_ports,
        not_destination_ports=m.not_destination_ports,
        service_accounts=[
            apb.ServiceAccountMatch(namespace=x.namespace, service_account=x.service_account)
            for x in m.service_accounts
        ],
        not_service_accounts=[
            apb.ServiceAccountMatch(namespace=x.namespace, service_account=x.service_account)
            for x in m.not_service_accounts
        ],
    )


def derive_authorization(world: World, pol: Policy) -> apb.Authorization:
    if pol.selector is not None:
        scope = apb.WORKLOAD_SELECTOR
    elif pol.namespace == world.root_namespace:
        scope = apb.GLOBAL
    else:
        scope = apb.NAMESPACE
    return apb.Authorization(
        name=pol.name,
        namespace=pol.namespace,
        scope=scope,
        action=apb.DENY if pol.action == "deny" else apb.ALLOW,
        rules=[
            apb.Rule(clauses=[apb.Clause(matches=[_match(m) for m in c.matches]) for c in r.clauses])
            for r in pol.rules
        ],
        dry_run=pol.dry_run,
    )


def served_services(world: World, wp: Waypoint) -> list[Service]:
    """The services whose traffic `wp` takes (their Service.waypoint is its address)."""
    if not wp.serves_services:
        return []
    out = []
    for svc in world.services:
        ref = service_waypoint_ref(world, svc)
        if ref is not None and (ref.namespace or svc.namespace, ref.name) == (wp.namespace, wp.name):
            out.append(svc)
    return out


def _service_ref(world: World, svc: Service) -> wypb.ServiceRef:
    return wypb.ServiceRef(namespace=svc.namespace, hostname=world.service_hostname(svc))


def _values(values: list[str], principal: bool = False) -> list[apb.StringMatch]:
    convert = _principal_match if principal else _string_match
    return [convert(string_match(v)) for v in values]


def _l7_rule(rule: L7Rule) -> wypb.L7Rule:
    return wypb.L7Rule(
        **{"from": [
            wypb.Source(
                principals=_values(f.source.principals, principal=True),
                not_principals=_values(f.source.not_principals, principal=True),
                namespaces=_values(f.source.namespaces),
                not_namespaces=_values(f.source.not_namespaces),
            )
            for f in rule.from_
        ]},
        to=[
            wypb.Operation(
                methods=t.operation.methods,
                not_methods=t.operation.not_methods,
                paths=_values(t.operation.paths),
                not_paths=_values(t.operation.not_paths),
                ports=t.operation.ports,
                not_ports=t.operation.not_ports,
                hosts=_values(t.operation.hosts),
                not_hosts=_values(t.operation.not_hosts),
            )
            for t in rule.to
        ],
        when=[
            wypb.Condition(header=header_of_key(c.key) or "", values=_values(c.values),
                           not_values=_values(c.not_values))
            for c in rule.when
        ],
    )


def derive_l7_policy(world: World, pol: AuthorizationPolicy, targets: list[Service]) -> wypb.L7Policy:
    """`targets` empty: the policy names the waypoint itself."""
    return wypb.L7Policy(
        name=pol.name,
        namespace=pol.namespace,
        action=wypb.Action.Value(pol.action.upper()),
        dry_run=pol.dry_run,
        target_services=[_service_ref(world, svc) for svc in targets],
        rules=[_l7_rule(r) for r in pol.rules],
    )


def _backend(world: World, route: HTTPRoute, b: BackendRef) -> wypb.Backend:
    svc = world.service(b.namespace or route.namespace, b.name)
    assert svc is not None  # validated
    return wypb.Backend(service=_service_ref(world, svc), port=b.port, weight=b.weight)


def _route_rule(world: World, route: HTTPRoute, rule: HTTPRouteRule) -> wypb.RouteRule:
    out = wypb.RouteRule(
        matches=[
            wypb.RouteMatch(
                path=(None if m.path is None else wypb.PathMatch(exact=m.path.value) if m.path.type == "Exact"
                      else wypb.PathMatch(prefix=m.path.value)),
                headers=[wypb.HeaderMatch(name=h.name.lower(), exact=h.value) for h in m.headers],
                method=m.method or "",
            )
            for m in rule.matches
        ],
        backends=[_backend(world, route, b) for b in rule.backend_refs],
        connect_retries=rule.retry.attempts if rule.retry is not None else 0,
    )
    timeout = parse_duration(rule.timeouts.request) if rule.timeouts and rule.timeouts.request else None
    if timeout is not None:
        out.timeout.FromMilliseconds(round(timeout * 1000))
    return out


def derive_waypoint_config(world: World, wp: Waypoint) -> wypb.WaypointConfig:
    """Everything `wp` enforces: its services, the L7 policies naming it or them, the routes on them."""
    services = served_services(world, wp)
    served = {(s.namespace, s.name): s for s in services}
    policies = []
    for pol in sorted(world.authorization_policies, key=lambda p: p.key):
        # targetRefs name objects of the policy's own namespace: the waypoint, or a service it serves there
        refs = pol.target_refs
        if any(r.kind == "Gateway" and r.name == wp.name and pol.namespace == wp.namespace for r in refs):
            policies.append(derive_l7_policy(world, pol, []))
            continue
        targets = [served[(pol.namespace, r.name)] for r in refs
                   if r.kind == "Service" and (pol.namespace, r.name) in served]
        if targets:
            policies.append(derive_l7_policy(world, pol, targets))
    routes = []
    for route in sorted(world.http_routes, key=lambda r: r.key):
        for parent in route.parent_refs:
            svc = served.get((parent.namespace or route.namespace, parent.name))
            if svc is None:
                continue
            routes.append(wypb.HttpRoute(
                name=route.name,
                namespace=route.namespace,
                parent=_service_ref(world, svc),
                parent_port=parent.port or 0,
                rules=[_route_rule(world, route, r) for r in route.rules],
            ))
    return wypb.WaypointConfig(
        name=wp.name,
        namespace=wp.namespace,
        services=[_service_ref(world, s) for s in services],
        policies=policies,
        routes=routes,
    )


def unapplied_l7(world: World, configs: list[wypb.WaypointConfig]) -> list[tuple[str, str]]:
    """(kind `authorizationPolicy`/`httpRoute`, `ns/name`) of the L7 objects no waypoint applies: their
    targets or parents are services no waypoint takes (upstream: the policy or route is not attached)."""
    policies: set[str] = set()
    routes: set[str] = set()
    for cfg in configs:
        policies.update(f"{p.namespace}/{p.name}" for p in cfg.policies)
        routes.update(f"{r.namespace}/{r.name}" for r in cfg.routes)
    return ([("authorizationPolicy", p.key) for p in world.authorization_policies if p.key not in policies]
            + [("httpRoute", r.key) for r in world.http_routes if r.key not in routes])


def waypoint_node_id(pod: Pod, domain_suffix: str) -> str:
    """The node id a waypoint pod's proxy presents (upstream's Envoy for gateways: proxy type `router`)."""
    return f"router~{pod.ips[0]}~{pod.name}.{pod.namespace}~{pod.namespace}.svc.{domain_suffix}"


def derive_pod(world: World, pod: Pod) -> podwatch_pb2.Pod:
    ns = world.namespace(pod.namespace)
    out = podwatch_pb2.Pod(
        uid=pod.kube_uid,
        name=pod.name,
        namespace=pod.namespace,
        service_account=pod.service_account,
        node=pod.node,
        ips=pod.ips,
        labels=pod_labels(world, pod),
        annotations=pod.annotations,
        namespace_labels=ns.labels if ns is not None else {},
        host_network=pod.host_network,
    )
    out.version = version_of(out)
    return out


def version_of(msg: message.Message) -> str:
    """A content version: equal for equal messages (deterministic serialisation), 16 hex digits."""
    return hashlib.sha256(msg.SerializeToString(deterministic=True)).hexdigest()[:16]


class WaypointReader(msgspec.Struct, frozen=True, kw_only=True):
    """The one proxy that may read a WaypointConfig: node id `router~IP~POD.NS~...` from that pod's node."""

    node_id_pod: str
    node: str
    ips: frozenset[str]

    def admits(self, node_id: str, token_node: str | None) -> bool:
        """`token_node` is the node the caller's token proves (None: the stub checks no tokens)."""
        parts = node_id.split("~")
        return (
            len(parts) == 4
            and parts[0] == "router"
            and parts[1] in self.ips
            and parts[2] == self.node_id_pod
            and (token_node is None or token_node == self.node)
        )


class Resources:
    """Everything derived from one World: serialized xDS resources per type URL and pods per node.

    `by_type[type_url][name] = (version, Any-packable message)`.
    """

    def __init__(self, world: World) -> None:
        addresses: dict[str, tuple[str, message.Message]] = {}
        for pod in world.pods:
            addr = wpb.Address(workload=derive_workload(world, pod))
            addresses[addr.workload.uid] = (version_of(addr), addr)
        for svc in world.services:
            addr = wpb.Address(service=derive_service(world, svc))
            addresses[service_key(world, svc)] = (version_of(addr), addr)
        authz: dict[str, tuple[str, message.Message]] = {}
        for pol in world.policies:
            auth = derive_authorization(world, pol)
            authz[pol.key] = (version_of(auth), auth)
        for pod in world.pods:
            for auth in waypoint_policies(world, pod):
                authz[f"{auth.namespace}/{auth.name}"] = (version_of(auth), auth)
        configs: dict[str, tuple[str, message.Message]] = {}
        # Who may read each WaypointConfig: the waypoint pod's proxy (its node id) on the pod's node.
        self.waypoint_readers: dict[str, WaypointReader] = {}
        derived: list[wypb.WaypointConfig] = []
        for wp in world.waypoints:
            cfg = derive_waypoint_config(world, wp)
            configs[wp.key] = (version_of(cfg), cfg)
            derived.append(cfg)
            wp_pod = world.find_pod(wp.namespace, wp.pod)
            assert wp_pod is not None  # validated
            self.waypoint_readers[wp.key] = WaypointReader(
                node_id_pod=f"{wp_pod.name}.{wp_pod.namespace}", node=wp_pod.node, ips=frozenset(wp_pod.ips)
            )
        self.unapplied = unapplied_l7(world, derived)
        self.by_type: dict[str, dict[str, tuple[str, message.Message]]] = {
            ADDRESS_TYPE_URL: addresses,
            AUTHORIZATION_TYPE_URL: authz,
            WAYPOINT_CONFIG_TYPE_URL: configs,
        }
        self.pods_by_node: dict[str, dict[str, podwatch_pb2.Pod]] = {node.name: {} for node in world.nodes}
        for pod in world.pods:
            self.pods_by_node.setdefault(pod.node, {})[pod.kube_uid] = derive_pod(world, pod)
        self.identities_by_node: dict[str, set[str]] = {node.name: set() for node in world.nodes}
        # The CA signs identities of ambient pods (their traffic is proxied by ztunnel) and of waypoint pods
        # (the waypoint process terminates and originates HBONE with its own identity).
        for pod in world.pods:
            if not is_ambient(world, pod) and world.waypoint_of_pod(pod) is None:
                continue
            identity = SpiffeId(
                trust_domain=world.trust_domain, namespace=pod.namespace, service_account=pod.service_account
            )
            self.identities_by_node.setdefault(pod.node, set()).add(identity.uri)
