"""The world model: what the stub knows about the cluster (nodes, namespaces, pods, services, policies).

A world document is YAML or JSON with camelCase keys (see examples/bookinfo.yaml). `load_world` parses it with
msgspec and then checks cross references; any problem raises WorldError naming the source, the path inside the
document and what is wrong. Worlds are immutable values: mutations build a new World and validate it whole, so
a rejected change never leaves anything half-applied.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Callable, Iterable
from typing import Final, TypeVar

import msgspec

from services.istiod.errors import WorldError

DATAPLANE_MODE_LABEL = "istio.io/dataplane-mode"
USE_WAYPOINT_LABEL = "istio.io/use-waypoint"
SIDECAR_STATUS_ANNOTATION = "sidecar.istio.io/status"
# Written by the node agent (PodWatch.SetRedirection), like upstream's node agent patches the pod.
REDIRECTION_ANNOTATION = "ambient.istio.io/redirection"
REDIRECTION_VALUES = ("pending", "enabled")
# Labels upstream's gateway controller puts on a waypoint's pods: the node agent never captures them.
GATEWAY_NAME_LABEL = "gateway.networking.k8s.io/gateway-name"
WAYPOINT_FOR_VALUES = ("service", "workload", "all", "none")

T = TypeVar("T")

_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")


class _Base(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True, rename="camel"):
    pass


class Node(_Base, frozen=True, kw_only=True):
    name: str
    # Optional: when set, every pod IP on this node must fall inside it.
    pod_cidr: str | None = None


class Namespace(_Base, frozen=True, kw_only=True):
    name: str
    labels: dict[str, str] = {}


class WaypointRef(_Base, frozen=True, kw_only=True):
    """A waypoint, named by its Service (which must exist in the world)."""

    name: str
    namespace: str | None = None  # default: the referring object's namespace


class Pod(_Base, frozen=True, kw_only=True):
    name: str
    namespace: str
    node: str
    ips: list[str]
    uid: str | None = None  # Kubernetes metadata.uid; default: a stable UUID derived from namespace/name
    service_account: str = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    host_network: bool = False
    # The owning Deployment's name; the Workload is then of type DEPLOYMENT with this workload_name.
    workload: str | None = None
    waypoint: WaypointRef | None = None

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def kube_uid(self) -> str:
        return self.uid or str(
            uuid.uuid5(uuid.NAMESPACE_URL, f"trio-ambient/pod/{self.namespace}/{self.name}")
        )


class ServicePort(_Base, frozen=True, kw_only=True):
    port: int
    target_port: int | None = None  # default: port
    name: str | None = None  # without app_protocol, a name `PROTOCOL` or `PROTOCOL-SUFFIX` selects it
    app_protocol: str | None = None  # http, http2, grpc (anything else: unknown)


class Service(_Base, frozen=True, kw_only=True):
    name: str
    namespace: str
    labels: dict[str, str] = {}  # istio.io/use-waypoint: NAME (or "none") binds it to a waypoint
    vips: list[str] = []
    ports: list[ServicePort] = []
    selector: dict[str, str] = {}
    hostname: str | None = None  # default: <name>.<namespace>.svc.<domainSuffix>
    waypoint: WaypointRef | None = None


class StringMatch(_Base, frozen=True, kw_only=True):
    """Exactly one of the fields."""

    exact: str | None = None
    prefix: str | None = None
    suffix: str | None = None
    presence: bool | None = None


class ServiceAccountMatch(_Base, frozen=True, kw_only=True):
    namespace: str
    service_account: str


class Match(_Base, frozen=True, kw_only=True):
    namespaces: list[StringMatch] = []
    not_namespaces: list[StringMatch] = []
    principals: list[StringMatch] = []
    not_principals: list[StringMatch] = []
    source_ips: list[str] = []  # CIDRs or addresses
    not_source_ips: list[str] = []
    destination_ips: list[str] = []
    not_destination_ips: list[str] = []
    destination_ports: list[int] = []
    not_destination_ports: list[int] = []
    service_accounts: list[ServiceAccountMatch] = []
    not_service_accounts: list[ServiceAccountMatch] = []


class Clause(_Base, frozen=True, kw_only=True):
    matches: list[Match] = []


class Rule(_Base, frozen=True, kw_only=True):
    clauses: list[Clause] = []


class Policy(_Base, frozen=True, kw_only=True):
    """An L4 authorization policy in upstream's Authorization shape.

    Scope is derived like istiod: a `selector` makes it WORKLOAD_SELECTOR; otherwise it is GLOBAL in the root
    namespace and NAMESPACE elsewhere.
    """

    name: str
    namespace: str
    action: str = "allow"  # allow | deny
    selector: dict[str, str] | None = None
    rules: list[Rule] = []
    dry_run: bool = False

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class Waypoint(_Base, frozen=True, kw_only=True):
    """A waypoint (upstream: a Gateway of class istio-waypoint) run by one pod of its namespace.

    Its address is the Service of the same name and namespace (which must exist, VIP and port 15008);
    `for` says which traffic it takes, as upstream's `istio.io/waypoint-for` label: `service` (the default),
    `workload`, `all` or `none`.
    """

    name: str
    namespace: str
    pod: str
    for_: str = msgspec.field(default="service", name="for")

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def serves_services(self) -> bool:
        return self.for_ in ("service", "all")

    @property
    def serves_workloads(self) -> bool:
        return self.for_ in ("workload", "all")


# --- L7: what a waypoint enforces (Istio AuthorizationPolicy with targetRefs, Gateway API HTTPRoute) --------


class TargetRef(_Base, frozen=True, kw_only=True):
    """What an L7 policy applies to: a waypoint (`kind: Gateway`) or a Service, in the policy's namespace."""

    kind: str
    name: str
    group: str | None = None  # gateway.networking.k8s.io for Gateway, "" (core) for Service


class L7Source(_Base, frozen=True, kw_only=True):
    """Values in Istio's syntax: `x` exact, `x*` prefix, `*x` suffix, `*` any."""

    principals: list[str] = []
    not_principals: list[str] = []
    namespaces: list[str] = []
    not_namespaces: list[str] = []


class L7From(_Base, frozen=True, kw_only=True):
    source: L7Source


class L7Operation(_Base, frozen=True, kw_only=True):
    methods: list[str] = []
    not_methods: list[str] = []
    paths: list[str] = []
    not_paths: list[str] = []
    ports: list[int] = []
    not_ports: list[int] = []
    hosts: list[str] = []
    not_hosts: list[str] = []


class L7To(_Base, frozen=True, kw_only=True):
    operation: L7Operation


class L7Condition(_Base, frozen=True, kw_only=True):
    key: str  # request.headers[NAME]
    values: list[str] = []
    not_values: list[str] = []


class L7Rule(_Base, frozen=True, kw_only=True):
    from_: list[L7From] = msgspec.field(default_factory=list, name="from")
    to: list[L7To] = []
    when: list[L7Condition] = []


class AuthorizationPolicy(_Base, frozen=True, kw_only=True):
    """An Istio AuthorizationPolicy with `targetRefs`: enforced by the waypoint, never sent to ztunnel."""

    name: str
    namespace: str
    target_refs: list[TargetRef] = []
    action: str = "ALLOW"  # ALLOW | DENY | AUDIT
    rules: list[L7Rule] = []
    dry_run: bool = False  # upstream: the istio.io/dry-run annotation

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class ParentRef(_Base, frozen=True, kw_only=True):
    """The Service an HTTPRoute attaches to (Gateway API's GAMMA shape)."""

    name: str
    kind: str = "Service"
    group: str | None = None
    namespace: str | None = None  # default: the route's namespace
    port: int | None = None  # default: every port of the service


class HTTPPathMatch(_Base, frozen=True, kw_only=True):
    type: str = "PathPrefix"  # Exact | PathPrefix
    value: str = "/"


class HTTPHeaderMatch(_Base, frozen=True, kw_only=True):
    name: str
    value: str
    type: str = "Exact"


class HTTPRouteMatch(_Base, frozen=True, kw_only=True):
    path: HTTPPathMatch | None = None
    headers: list[HTTPHeaderMatch] = []
    method: str | None = None


class BackendRef(_Base, frozen=True, kw_only=True):
    name: str
    port: int
    kind: str = "Service"
    group: str | None = None
    namespace: str | None = None  # default: the route's namespace
    weight: int = 1


class HTTPRouteTimeouts(_Base, frozen=True, kw_only=True):
    request: str | None = None  # Gateway API duration: 10s, 500ms, 1m30s


class HTTPRouteRetry(_Base, frozen=True, kw_only=True):
    attempts: int = 0  # further endpoints tried when connecting to the backend fails


class HTTPRouteRule(_Base, frozen=True, kw_only=True):
    matches: list[HTTPRouteMatch] = []
    backend_refs: list[BackendRef] = []
    timeouts: HTTPRouteTimeouts | None = None
    retry: HTTPRouteRetry | None = None


class HTTPRoute(_Base, frozen=True, kw_only=True):
    name: str
    namespace: str
    parent_refs: list[ParentRef] = []
    rules: list[HTTPRouteRule] = []

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class World(_Base, frozen=True, kw_only=True):
    trust_domain: str = "cluster.local"
    cluster_id: str = "Kubernetes"
    network: str = ""
    domain_suffix: str = "cluster.local"
    root_namespace: str = "istio-system"
    nodes: list[Node] = []
    namespaces: list[Namespace] = []
    pods: list[Pod] = []
    services: list[Service] = []
    policies: list[Policy] = []
    waypoints: list[Waypoint] = []
    authorization_policies: list[AuthorizationPolicy] = []
    http_routes: list[HTTPRoute] = []

    def namespace(self, name: str) -> Namespace | None:
        return next((ns for ns in self.namespaces if ns.name == name), None)

    def waypoint(self, namespace: str, name: str) -> Waypoint | None:
        return next((w for w in self.waypoints if w.namespace == namespace and w.name == name), None)

    def service(self, namespace: str, name: str) -> Service | None:
        return next((s for s in self.services if s.namespace == namespace and s.name == name), None)

    def find_pod(self, namespace: str, name: str) -> Pod | None:
        return next((p for p in self.pods if p.namespace == namespace and p.name == name), None)

    def waypoint_of_pod(self, pod: Pod) -> Waypoint | None:
        """The waypoint this pod runs, if any."""
        return next((w for w in self.waypoints if w.namespace == pod.namespace and w.pod == pod.name), None)

    def service_hostname(self, svc: Service) -> str:
        return svc.hostname or f"{svc.name}.{svc.namespace}.svc.{self.domain_suffix}"


# --- loading ---------------------------------------------------------------------------------------------


MAX_WORLD_BYTES: Final = 16 * 1024 * 1024
"""The largest world document accepted (16 MiB: a few hundred thousand pods' worth of YAML)."""


def load_world(data: bytes, source: str) -> World:
    """Parse and validate a world document (YAML, or JSON which is YAML too). Raises WorldError."""
    if len(data) > MAX_WORLD_BYTES:
        raise WorldError(source, "$", f"the document is {len(data):,} bytes, over the limit of "
                         f"{MAX_WORLD_BYTES:,}; split the world or trim it")
    stripped = data.lstrip()
    try:
        if stripped.startswith(b"{"):
            world = msgspec.json.decode(data, type=World)
        else:
            if not stripped:
                raise WorldError(source, "$", "the document is empty")
            world = msgspec.yaml.decode(data, type=World)
    except msgspec.ValidationError as exc:
        raise _from_msgspec(source, exc) from None
    except msgspec.DecodeError as exc:
        raise WorldError(source, "$", f"not valid YAML/JSON: {exc}") from None
    validate(world, source)
    return world


def decode_fragment(data: bytes, type_: type[T], source: str, path: str) -> T:
    """Decode one pod/policy (JSON) for a mutation. Raises WorldError."""
    try:
        return msgspec.json.decode(data, type=type_)
    except msgspec.ValidationError as exc:
        raise _from_msgspec(source, exc, prefix=path) from None
    except msgspec.DecodeError as exc:
        raise WorldError(source, path, f"not valid JSON: {exc}") from None


def world_to_json(world: World) -> bytes:
    return msgspec.json.encode(world)


def _from_msgspec(source: str, exc: msgspec.ValidationError, prefix: str = "$") -> WorldError:
    text = str(exc)
    problem, sep, where = text.rpartition(" - at `")
    if sep:
        path = where.rstrip("`")
        if prefix != "$":
            path = prefix + path[1:]
        return WorldError(source, path, problem)
    return WorldError(source, prefix, text)


# --- validation ------------------------------------------------------------------------------------------


def _check_name(source: str, path: str, value: str, what: str) -> None:
    if not _NAME.match(value) or len(value) > 253:
        raise WorldError(
            source, path, f"{what} {value!r} is not a valid Kubernetes name (lowercase a-z, 0-9, '-', '.')"
        )


def _ip(source: str, path: str, value: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    try:
        return ipaddress.ip_address(value)
    except ValueError:
        raise WorldError(source, path, f"{value!r} is not an IPv4 or IPv6 address") from None


def _cidr(source: str, path: str, value: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise WorldError(source, path, f"{value!r} is not an address or CIDR (e.g. 10.244.1.0/24)") from None


def _port(source: str, path: str, value: int) -> None:
    if not 1 <= value <= 65535:
        raise WorldError(source, path, f"port {value} is outside 1-65535")


def _dupes(source: str, items: Iterable[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for path, key in items:
        if key in seen:
            raise WorldError(source, path, f"duplicate {what} {key!r} (first at {seen[key]})")
        seen[key] = path


def validate(world: World, source: str) -> None:
    """Check names, addresses and cross references of a whole world. Raises WorldError on the first one."""
    _check_name(source, "$.trustDomain", world.trust_domain, "trust domain")
    _dupes(source, ((f"$.nodes[{i}].name", n.name) for i, n in enumerate(world.nodes)), "node")
    _dupes(source, ((f"$.namespaces[{i}].name", n.name) for i, n in enumerate(world.namespaces)), "namespace")
    _dupes(source, ((f"$.pods[{i}]", p.key) for i, p in enumerate(world.pods)), "pod")
    _dupes(source, ((f"$.pods[{i}].uid", p.kube_uid) for i, p in enumerate(world.pods)), "pod uid")
    _dupes(
        source,
        ((f"$.services[{i}]", f"{s.namespace}/{s.name}") for i, s in enumerate(world.services)),
        "service",
    )
    _dupes(source, ((f"$.policies[{i}]", p.key) for i, p in enumerate(world.policies)), "policy")
    _dupes(source, ((f"$.waypoints[{i}]", w.key) for i, w in enumerate(world.waypoints)), "waypoint")
    _dupes(source, ((f"$.waypoints[{i}].pod", f"{w.namespace}/{w.pod}")
                    for i, w in enumerate(world.waypoints)), "waypoint pod")

    nodes: dict[str, ipaddress.IPv4Network | ipaddress.IPv6Network | None] = {}
    for i, node in enumerate(world.nodes):
        _check_name(source, f"$.nodes[{i}].name", node.name, "node name")
        nodes[node.name] = _cidr(source, f"$.nodes[{i}].podCidr", node.pod_cidr) if node.pod_cidr else None
    namespaces = set()
    for i, ns in enumerate(world.namespaces):
        _check_name(source, f"$.namespaces[{i}].name", ns.name, "namespace name")
        namespaces.add(ns.name)

    def need_ns(path: str, name: str) -> None:
        if name not in namespaces:
            known = ", ".join(sorted(namespaces)) or "none"
            raise WorldError(
                source, path, f"unknown namespace {name!r} (declared: {known}); add it to namespaces"
            )

    services = {(s.namespace, s.name) for s in world.services}

    def need_waypoint(path: str, ref: WaypointRef | None, default_ns: str) -> None:
        if ref is not None and (ref.namespace or default_ns, ref.name) not in services:
            raise WorldError(
                source,
                path,
                f"waypoint service {ref.namespace or default_ns}/{ref.name} does not exist in services",
            )

    addresses: dict[str, str] = {}
    for i, pod in enumerate(world.pods):
        base = f"$.pods[{i}]"
        _check_name(source, f"{base}.name", pod.name, "pod name")
        need_ns(f"{base}.namespace", pod.namespace)
        if pod.node not in nodes:
            known = ", ".join(sorted(nodes)) or "none"
            raise WorldError(source, f"{base}.node", f"unknown node {pod.node!r} (nodes: {known})")
        if not pod.ips:
            raise WorldError(source, f"{base}.ips", "a pod needs at least one IP")
        _check_name(source, f"{base}.serviceAccount", pod.service_account, "service account")
        for j, text in enumerate(pod.ips):
            ip = _ip(source, f"{base}.ips[{j}]", text)
            cidr = nodes[pod.node]
            if cidr is not None and not pod.host_network and ip not in cidr:
                raise WorldError(
                    source, f"{base}.ips[{j}]", f"{ip} is outside node {pod.node}'s podCidr {cidr}"
                )
            if str(ip) in addresses and not pod.host_network:
                raise WorldError(
                    source, f"{base}.ips[{j}]", f"address {ip} is already used by {addresses[str(ip)]}"
                )
            if not pod.host_network:
                addresses[str(ip)] = f"pod {pod.key}"
        need_waypoint(f"{base}.waypoint", pod.waypoint, pod.namespace)

    for i, svc in enumerate(world.services):
        base = f"$.services[{i}]"
        _check_name(source, f"{base}.name", svc.name, "service name")
        need_ns(f"{base}.namespace", svc.namespace)
        for j, text in enumerate(svc.vips):
            ip = _ip(source, f"{base}.vips[{j}]", text)
            if str(ip) in addresses:
                raise WorldError(
                    source, f"{base}.vips[{j}]", f"address {ip} is already used by {addresses[str(ip)]}"
                )
            addresses[str(ip)] = f"service {svc.namespace}/{svc.name}"
        for j, port in enumerate(svc.ports):
            _port(source, f"{base}.ports[{j}].port", port.port)
            if port.target_port is not None:
                _port(source, f"{base}.ports[{j}].targetPort", port.target_port)
        _dupes(
            source,
            ((f"{base}.ports[{j}].port", str(p.port)) for j, p in enumerate(svc.ports)),
            "service port",
        )
        if svc.waypoint is not None and (svc.waypoint.namespace or svc.namespace, svc.waypoint.name) == (
            svc.namespace,
            svc.name,
        ):
            raise WorldError(source, f"{base}.waypoint", "a service cannot be its own waypoint")
        need_waypoint(f"{base}.waypoint", svc.waypoint, svc.namespace)

    def need_label_waypoint(path: str, labels: dict[str, str], namespace: str) -> None:
        name = labels.get(USE_WAYPOINT_LABEL)
        if name is not None and name != "none":
            need_waypoint(f"{path}.labels", WaypointRef(name=name), namespace)

    for i, ns in enumerate(world.namespaces):
        need_label_waypoint(f"$.namespaces[{i}]", ns.labels, ns.name)
    for i, pod in enumerate(world.pods):
        need_label_waypoint(f"$.pods[{i}]", pod.labels, pod.namespace)
    for i, svc in enumerate(world.services):
        need_label_waypoint(f"$.services[{i}]", svc.labels, svc.namespace)

    pods = {p.key for p in world.pods}
    for i, wp in enumerate(world.waypoints):
        base = f"$.waypoints[{i}]"
        _check_name(source, f"{base}.name", wp.name, "waypoint name")
        need_ns(f"{base}.namespace", wp.namespace)
        if (wp.namespace, wp.name) not in services:
            raise WorldError(source, f"{base}.name", f"waypoint {wp.key} needs a service of the same "
                             f"name and namespace (its address, port 15008) in services")
        if f"{wp.namespace}/{wp.pod}" not in pods:
            raise WorldError(source, f"{base}.pod", f"unknown pod {wp.namespace}/{wp.pod}; the waypoint's "
                             f"pod must be in pods, in the waypoint's namespace")
        if wp.for_ not in WAYPOINT_FOR_VALUES:
            raise WorldError(source, f"{base}.for", f"for {wp.for_!r} must be one of "
                             f"{', '.join(WAYPOINT_FOR_VALUES)}")

    for i, pol in enumerate(world.policies):
        _validate_policy(source, f"$.policies[{i}]", pol, need_ns)
    _dupes(source, ((f"$.authorizationPolicies[{i}]", p.key)
                    for i, p in enumerate(world.authorization_policies)), "authorization policy")
    for i, l7 in enumerate(world.authorization_policies):
        _validate_l7_policy(source, f"$.authorizationPolicies[{i}]", world, l7, need_ns)
    _dupes(source, ((f"$.httpRoutes[{i}]", r.key) for i, r in enumerate(world.http_routes)), "HTTP route")
    for i, route in enumerate(world.http_routes):
        _validate_route(source, f"$.httpRoutes[{i}]", world, route, need_ns)


def _validate_policy(source: str, base: str, pol: Policy, need_ns: Callable[[str, str], None]) -> None:
    _check_name(source, f"{base}.name", pol.name, "policy name")
    need_ns(f"{base}.namespace", pol.namespace)
    if pol.action not in ("allow", "deny"):
        raise WorldError(source, f"{base}.action", f"action {pol.action!r} must be 'allow' or 'deny'")
    for r, rule in enumerate(pol.rules):
        for c, clause in enumerate(rule.clauses):
            for m, match in enumerate(clause.matches):
                path = f"{base}.rules[{r}].clauses[{c}].matches[{m}]"
                for field in ("namespaces", "not_namespaces", "principals", "not_principals"):
                    for k, sm in enumerate(getattr(match, field)):
                        _validate_string_match(source, f"{path}.{_camel(field)}[{k}]", sm)
                for field in ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips"):
                    for k, text in enumerate(getattr(match, field)):
                        _cidr(source, f"{path}.{_camel(field)}[{k}]", text)
                for field in ("destination_ports", "not_destination_ports"):
                    for k, port in enumerate(getattr(match, field)):
                        _port(source, f"{path}.{_camel(field)}[{k}]", port)


def _validate_string_match(source: str, path: str, sm: StringMatch) -> None:
    set_fields = [f for f in ("exact", "prefix", "suffix", "presence") if getattr(sm, f) is not None]
    if len(set_fields) != 1:
        raise WorldError(
            source,
            path,
            f"a string match needs exactly one of exact/prefix/suffix/presence, got {set_fields}",
        )
    if sm.presence is False:
        raise WorldError(source, path, "presence must be true when given")


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


# --- L7 policies and routes ------------------------------------------------------------------------------


L7_ACTIONS: Final = ("ALLOW", "DENY", "AUDIT")
GATEWAY_GROUP: Final = "gateway.networking.k8s.io"
HTTP_METHODS: Final = frozenset(
    {"GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"}
)
MAX_BACKEND_WEIGHT: Final = 1_000_000  # Gateway API's bound
_HEADER_KEY = re.compile(r"^request\.headers\[([!#$%&'*+.^_`|~0-9A-Za-z-]+)\]$")
_DURATION = re.compile(r"^([0-9]{1,5}(h|m|s|ms)){1,4}$")
_DURATION_PART = re.compile(r"([0-9]{1,5})(h|ms|m|s)")
_UNIT_SECONDS: Final = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def string_match(value: str) -> StringMatch:
    """Istio's value syntax: `*` any (presence), `*x` suffix, `x*` prefix, anything else exact."""
    if value == "*":
        return StringMatch(presence=True)
    if value.startswith("*"):
        return StringMatch(suffix=value[1:])
    if value.endswith("*"):
        return StringMatch(prefix=value[:-1])
    return StringMatch(exact=value)


def header_of_key(key: str) -> str | None:
    """`request.headers[X-Foo]` -> `x-foo` (the one condition key a waypoint checks), else None."""
    m = _HEADER_KEY.match(key)
    return m[1].lower() if m else None


def parse_duration(text: str) -> float | None:
    """A Gateway API duration (`10s`, `500ms`, `1m30s`) in seconds, or None when it is not one."""
    if not _DURATION.match(text):
        return None
    return sum(int(n) * _UNIT_SECONDS[unit] for n, unit in _DURATION_PART.findall(text))


def _validate_l7_policy(source: str, base: str, world: World, pol: AuthorizationPolicy,
                        need_ns: Callable[[str, str], None]) -> None:
    _check_name(source, f"{base}.name", pol.name, "policy name")
    need_ns(f"{base}.namespace", pol.namespace)
    if pol.action.upper() not in L7_ACTIONS:
        raise WorldError(source, f"{base}.action", f"action {pol.action!r} must be one of "
                         f"{', '.join(L7_ACTIONS)}")
    if not pol.target_refs:
        raise WorldError(source, f"{base}.targetRefs", "an authorization policy here is for a waypoint and "
                         "needs targetRefs (kind Gateway: the waypoint, or kind Service); ztunnel's L4 "
                         "policies go in policies")
    for j, ref in enumerate(pol.target_refs):
        path = f"{base}.targetRefs[{j}]"
        if ref.kind == "Gateway":
            if ref.group not in (None, GATEWAY_GROUP):
                raise WorldError(source, f"{path}.group", f"a Gateway's group is {GATEWAY_GROUP}")
            if world.waypoint(pol.namespace, ref.name) is None:
                known = ", ".join(w.name for w in world.waypoints if w.namespace == pol.namespace) or "none"
                raise WorldError(source, f"{path}.name", f"unknown waypoint {pol.namespace}/{ref.name} "
                                 f"(waypoints of {pol.namespace}: {known}); declare it in waypoints")
        elif ref.kind == "Service":
            if ref.group:
                raise WorldError(source, f"{path}.group", "a Service's group is the core group: \"\" or none")
            if world.service(pol.namespace, ref.name) is None:
                raise WorldError(source, f"{path}.name",
                                 f"unknown service {pol.namespace}/{ref.name}; add it to services")
        else:
            raise WorldError(source, f"{path}.kind", f"kind {ref.kind!r} must be Gateway (a waypoint) or "
                             "Service")
    for r, rule in enumerate(pol.rules):
        for k, to in enumerate(rule.to):
            path = f"{base}.rules[{r}].to[{k}].operation"
            for field in ("methods", "not_methods"):
                for m, method in enumerate(getattr(to.operation, field)):
                    if method not in HTTP_METHODS:
                        raise WorldError(source, f"{path}.{_camel(field)}[{m}]", f"method {method!r} is "
                                         f"not one of {', '.join(sorted(HTTP_METHODS))}")
            for field in ("paths", "not_paths"):
                for m, value in enumerate(getattr(to.operation, field)):
                    if not value:
                        raise WorldError(source, f"{path}.{_camel(field)}[{m}]", "a path cannot be empty")
            for field in ("ports", "not_ports"):
                for m, port in enumerate(getattr(to.operation, field)):
                    _port(source, f"{path}.{_camel(field)}[{m}]", port)
        for k, cond in enumerate(rule.when):
            if header_of_key(cond.key) is None:
                raise WorldError(source, f"{base}.rules[{r}].when[{k}].key", f"key {cond.key!r}: a "
                                 "waypoint checks request.headers[NAME] conditions only")
            if not cond.values and not cond.not_values:
                raise WorldError(source, f"{base}.rules[{r}].when[{k}]", "a condition needs values or "
                                 "notValues")


def _validate_route(source: str, base: str, world: World, route: HTTPRoute,
                    need_ns: Callable[[str, str], None]) -> None:
    _check_name(source, f"{base}.name", route.name, "route name")
    need_ns(f"{base}.namespace", route.namespace)
    if not route.parent_refs:
        raise WorldError(source, f"{base}.parentRefs", "a route needs parentRefs: the Service it attaches to")

    def need_service(path: str, kind: str, group: str | None, ns: str | None, name: str,
                     port: int | None) -> None:
        if kind != "Service" or group:
            raise WorldError(source, f"{path}.kind", f"kind {kind!r} (group {group!r}): only core Services "
                             "are supported here")
        svc = world.service(ns or route.namespace, name)
        if svc is None:
            raise WorldError(source, f"{path}.name", f"route to unknown service {ns or route.namespace}/"
                             f"{name}; add it to services")
        if port is not None and all(p.port != port for p in svc.ports):
            ports = ", ".join(str(p.port) for p in svc.ports) or "none"
            raise WorldError(source, f"{path}.port", f"service {svc.namespace}/{svc.name} has no port "
                             f"{port} (ports: {ports})")

    for j, parent in enumerate(route.parent_refs):
        need_service(f"{base}.parentRefs[{j}]", parent.kind, parent.group, parent.namespace, parent.name,
                     parent.port)
    for r, rule in enumerate(route.rules):
        rbase = f"{base}.rules[{r}]"
        for m, match in enumerate(rule.matches):
            if match.path is not None:
                path = f"{rbase}.matches[{m}].path"
                if match.path.type not in ("Exact", "PathPrefix"):
                    raise WorldError(source, f"{path}.type",
                                     f"path type {match.path.type!r} must be Exact or PathPrefix")
                if not match.path.value.startswith("/"):
                    raise WorldError(source, f"{path}.value", f"path {match.path.value!r} must start with /")
            if match.method is not None and match.method not in HTTP_METHODS:
                raise WorldError(source, f"{rbase}.matches[{m}].method", f"method {match.method!r} is not "
                                 f"one of {', '.join(sorted(HTTP_METHODS))}")
            for h, header in enumerate(match.headers):
                if header.type != "Exact":
                    raise WorldError(source, f"{rbase}.matches[{m}].headers[{h}].type",
                                     f"header match type {header.type!r}: only Exact is supported")
        for b, backend in enumerate(rule.backend_refs):
            bpath = f"{rbase}.backendRefs[{b}]"
            need_service(bpath, backend.kind, backend.group, backend.namespace, backend.name, backend.port)
            if not 0 <= backend.weight <= MAX_BACKEND_WEIGHT:
                raise WorldError(source, f"{bpath}.weight", f"weight {backend.weight} must be an integer "
                                 f"from 0 to {MAX_BACKEND_WEIGHT:,}")
        timeout = rule.timeouts.request if rule.timeouts is not None else None
        if timeout is not None and parse_duration(timeout) is None:
            raise WorldError(source, f"{rbase}.timeouts.request",
                             f"{timeout!r} is not a duration like 10s, 500ms or 1m30s")
        if rule.retry is not None and rule.retry.attempts < 0:
            raise WorldError(source, f"{rbase}.retry.attempts", "attempts cannot be negative")
