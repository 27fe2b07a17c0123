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

    def namespace(self, name: str) -> Namespace | None:
        return next((ns for ns in self.namespaces if ns.name == name), None)

    def waypoint(self, namespace: str, name: str) -> Waypoint | None:
        return next((w for w in self.waypoints if w.namespace == namespace and w.name == name), None)

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
