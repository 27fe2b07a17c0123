"""A world from Kubernetes objects: Nodes, Namespaces, Pods, Services and `security.istio.io/v1`
AuthorizationPolicies, as the API server returns them (JSON), turned into the same `World` a world file
gives, so xDS is derived from both in one way (derive.py).

What is taken from each object:

    Node                  metadata.name, spec.podCIDR
    Namespace             metadata.name, metadata.labels
    Pod                   metadata.{name, namespace, uid, labels, annotations, ownerReferences},
                          spec.{nodeName, serviceAccountName, hostNetwork}, status.{podIPs, podIP, phase}
    Service               metadata.{name, namespace, labels}, spec.{clusterIPs, clusterIP, ports[].{port,
                          targetPort, appProtocol}, selector}
    AuthorizationPolicy   metadata.{name, namespace, annotations}, spec.{selector.matchLabels, action, rules}

A pod owned by a ReplicaSet named `<deployment>-<pod-template-hash>` belongs to that Deployment (the
Workload's workload_name, as istiod names it); one owned by a StatefulSet, DaemonSet or Job to that owner.
Pods without a node or an IP yet are pending: left out until they have both, not an error. Pods that ended
(phase Succeeded or Failed) are left out. A Service port whose `targetPort` is a name is resolved against
the container ports of the Service's pods (the first pod that names it); a name no pod declares leaves
the port out, with a note. A pod with upstream's `gateway.networking.k8s.io/gateway-name` label runs that
waypoint (its Service is the one of the same name; `istio.io/waypoint-for` on the pod, default `service`).
L7 policies and HTTP routes for waypoints are not read from the API server yet: a Kubernetes world's
waypoints get none.

AuthorizationPolicies are converted as istiod converts them for ztunnel:
- a policy with `targetRefs` is for a waypoint, not for ztunnel: left out;
- `action` ALLOW or DENY (default ALLOW); AUDIT and CUSTOM are not supported by ztunnel: left out, noted;
- each rule is one group of clauses that must all match: one clause from the `to` operations (their
  ports), one from the `from` sources (principals, namespaces, service accounts, ipBlocks and their `not`
  forms), one per `when` condition on an L4 key (source.ip, source.namespace, source.principal,
  destination.ip, destination.port);
- string values: `*` is presence, `*x` a suffix, `x*` a prefix, anything else exact;
- HTTP attributes (hosts, methods, paths, requestPrincipals, remoteIpBlocks, other `when` keys) cannot be
  checked by ztunnel: an ALLOW rule with any of them is dropped (it never matches), a DENY rule keeps its
  L4 part (more restrictive than asked); either way the policy gets a note;
- `istio.io/dry-run: "true"` makes it a dry-run policy.

An object the world rejects (an address used twice, a pod outside its node's podCIDR, a name Kubernetes
would not allow, ...) is left out with a note naming it and the reason; the others still form the world.
Notes are for the caller to log; they never stop the conversion.
"""

from __future__ import annotations

import ipaddress
import re
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import msgspec

from services.istiod.derive import pod_labels
from services.istiod.errors import WorldError
from services.istiod.world import (
    GATEWAY_NAME_LABEL,
    Clause,
    Match,
    Namespace,
    Node,
    Pod,
    Policy,
    Rule,
    Service,
    ServiceAccountMatch,
    ServicePort,
    StringMatch,
    Waypoint,
    World,
    string_match,
    validate,
)

TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})
DRY_RUN_ANNOTATION = "istio.io/dry-run"
L4_WHEN_KEYS = frozenset(
    {"source.ip", "source.namespace", "source.principal", "destination.ip", "destination.port"}
)
HTTP_OPERATION_FIELDS = ("hosts", "notHosts", "methods", "notMethods", "paths", "notPaths")
HTTP_SOURCE_FIELDS = ("remoteIpBlocks", "notRemoteIpBlocks", "requestPrincipals", "notRequestPrincipals")
WAYPOINT_FOR_LABEL = "istio.io/waypoint-for"
_INDEXED = re.compile(r"^\$\.(pods|services|policies|namespaces|nodes|waypoints)\[(\d+)\]")

Obj = Mapping[str, Any]


class KubeObjects(msgspec.Struct, kw_only=True):
    """The objects of one snapshot of the API server, each as its JSON object."""

    nodes: list[dict[str, Any]] = []
    namespaces: list[dict[str, Any]] = []
    pods: list[dict[str, Any]] = []
    services: list[dict[str, Any]] = []
    policies: list[dict[str, Any]] = []


def _meta(obj: Obj) -> Obj:
    meta = obj.get("metadata")
    return meta if isinstance(meta, Mapping) else {}


def _spec(obj: Obj, key: str = "spec") -> Obj:
    spec = obj.get(key)
    return spec if isinstance(spec, Mapping) else {}


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, Mapping):
        return {}
    return {str(k): str(v) for k, v in value.items()}


def _list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else []


def object_name(kind: str, obj: Obj) -> str:
    """`Kind namespace/name` (or `Kind name`) for notes."""
    meta = _meta(obj)
    ns, name = meta.get("namespace"), meta.get("name", "?")
    return f"{kind} {ns}/{name}" if ns else f"{kind} {name}"


# --- objects -> world types ------------------------------------------------------------------------------


def node_from(obj: Obj) -> Node:
    return Node(name=str(_meta(obj).get("name", "")), pod_cidr=_spec(obj).get("podCIDR") or None)


def namespace_from(obj: Obj) -> Namespace:
    meta = _meta(obj)
    return Namespace(name=str(meta.get("name", "")), labels=_strings(meta.get("labels")))


def pod_ips(obj: Obj) -> list[str]:
    status = _spec(obj, "status")
    listed = [str(p["ip"]) for p in _list(status.get("podIPs")) if isinstance(p, Mapping) and p.get("ip")]
    if listed:
        return listed
    return [str(status["podIP"])] if status.get("podIP") else []


def workload_name(obj: Obj) -> str | None:
    """The Deployment (or other controller) a pod belongs to, from its controller owner reference."""
    meta = _meta(obj)
    owners = [o for o in _list(meta.get("ownerReferences")) if isinstance(o, Mapping)]
    owner = next((o for o in owners if o.get("controller")), owners[0] if owners else None)
    if owner is None or not owner.get("name"):
        return None
    name, kind = str(owner["name"]), owner.get("kind")
    if kind == "ReplicaSet":
        template_hash = _strings(meta.get("labels")).get("pod-template-hash")
        if template_hash and name.endswith("-" + template_hash):
            return name[: -len(template_hash) - 1]
        return name
    if kind in ("StatefulSet", "DaemonSet", "Job", "Deployment"):
        return name
    return None


def pod_from(obj: Obj) -> Pod | None:
    """The world's pod, or None while it is pending (no node or no IP yet) or after it ended."""
    meta, spec, status = _meta(obj), _spec(obj), _spec(obj, "status")
    ips = pod_ips(obj)
    if not spec.get("nodeName") or not ips or status.get("phase") in TERMINATED_PHASES:
        return None
    return Pod(
        name=str(meta.get("name", "")),
        namespace=str(meta.get("namespace", "")),
        node=str(spec["nodeName"]),
        ips=ips,
        uid=str(meta["uid"]) if meta.get("uid") else None,
        service_account=str(spec.get("serviceAccountName") or "default"),
        labels=_strings(meta.get("labels")),
        annotations=_strings(meta.get("annotations")),
        host_network=bool(spec.get("hostNetwork", False)),
        workload=workload_name(obj),
    )


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def _named_port(name: str, namespace: str, selector: Mapping[str, str], pods: Iterable[Obj]) -> int | None:
    for pod in pods:
        meta = _meta(pod)
        if meta.get("namespace") != namespace or not _selects(selector, _strings(meta.get("labels"))):
            continue
        for container in _list(_spec(pod).get("containers")):
            for port in _list(container.get("ports") if isinstance(container, Mapping) else None):
                if isinstance(port, Mapping) and port.get("name") == name:
                    number = port.get("containerPort")
                    if isinstance(number, int):
                        return number
    return None


def service_from(obj: Obj, pods: Iterable[Obj], notes: list[str]) -> Service:
    meta, spec = _meta(obj), _spec(obj)
    namespace = str(meta.get("namespace", ""))
    selector = _strings(spec.get("selector"))
    vips = [str(ip) for ip in _list(spec.get("clusterIPs")) if ip and ip != "None"]
    if not vips and spec.get("clusterIP") not in (None, "", "None"):
        vips = [str(spec["clusterIP"])]
    pod_list = list(pods)
    ports = []
    for p in _list(spec.get("ports")):
        if not isinstance(p, Mapping) or not isinstance(p.get("port"), int):
            continue
        if p.get("protocol", "TCP") != "TCP":
            continue  # ztunnel carries TCP only
        target = p.get("targetPort")
        if isinstance(target, str) and not target.isdigit():
            resolved = _named_port(target, namespace, selector, pod_list)
            if resolved is None:
                notes.append(f"{object_name('Service', obj)}: port {p['port']} targets the container port "
                             f"named {target!r}, which none of its pods declares; port left out")
                continue
            target = resolved
        ports.append(ServicePort(port=int(p["port"]), target_port=int(target) if target else None,
                                 name=str(p["name"]) if p.get("name") else None,
                                 app_protocol=str(p["appProtocol"]) if p.get("appProtocol") else None))
    return Service(name=str(meta.get("name", "")), namespace=namespace, vips=vips, ports=ports,
                   selector=selector)


# --- AuthorizationPolicy -> the world's Policy -----------------------------------------------------------


def _matches(values: Any) -> list[StringMatch]:
    return [string_match(str(v)) for v in _list(values)]


def _ports(values: Any) -> list[int]:
    out = []
    for v in _list(values):
        text = str(v)
        if text.isdigit() and 0 < int(text) <= 65535:
            out.append(int(text))
    return out


def _ips(values: Any) -> list[str]:
    out = []
    for v in _list(values):
        try:
            out.append(str(ipaddress.ip_network(str(v), strict=False)))
        except ValueError:
            continue  # istiod skips what it cannot parse
    return out


def _accounts(values: Any, namespace: str) -> list[ServiceAccountMatch]:
    out = []
    for v in _list(values):
        ns, sep, sa = str(v).partition("/")
        out.append(ServiceAccountMatch(namespace=ns, service_account=sa) if sep
                   else ServiceAccountMatch(namespace=namespace, service_account=ns))
    return out


def _when_match(key: str, values: Any, negate: bool) -> Match:
    """One `when` condition on an L4 key as a match."""
    field = {"source.ip": "source_ips", "source.namespace": "namespaces", "source.principal": "principals",
             "destination.ip": "destination_ips", "destination.port": "destination_ports"}[key]
    converted: Any
    if field in ("source_ips", "destination_ips"):
        converted = _ips(values)
    elif field == "destination_ports":
        converted = _ports(values)
    else:
        converted = _matches(values)
    fields: dict[str, Any] = {("not_" if negate else "") + field: converted}
    return Match(**fields)


def _rule(action: str, rule: Obj, namespace: str) -> tuple[Rule | None, list[str]]:
    http: list[str] = []
    clauses: list[Clause] = []
    to_matches = []
    for to in _list(rule.get("to")):
        op = _spec(to, "operation") if isinstance(to, Mapping) else {}
        http += [f for f in HTTP_OPERATION_FIELDS if op.get(f)]
        to_matches.append(Match(destination_ports=_ports(op.get("ports")),
                                not_destination_ports=_ports(op.get("notPorts"))))
    from_matches = []
    for frm in _list(rule.get("from")):
        src = _spec(frm, "source") if isinstance(frm, Mapping) else {}
        http += [f for f in HTTP_SOURCE_FIELDS if src.get(f)]
        from_matches.append(Match(
            source_ips=_ips(src.get("ipBlocks")), not_source_ips=_ips(src.get("notIpBlocks")),
            namespaces=_matches(src.get("namespaces")), not_namespaces=_matches(src.get("notNamespaces")),
            principals=_matches(src.get("principals")), not_principals=_matches(src.get("notPrincipals")),
            service_accounts=_accounts(src.get("serviceAccounts"), namespace),
            not_service_accounts=_accounts(src.get("notServiceAccounts"), namespace),
        ))  # fmt: skip
    if to_matches:
        clauses.append(Clause(matches=to_matches))
    if from_matches:
        clauses.append(Clause(matches=from_matches))
    for when in _list(rule.get("when")):
        if not isinstance(when, Mapping):
            continue
        key = str(when.get("key", ""))
        if key not in L4_WHEN_KEYS:
            http.append(key)
            continue
        match = _when_match(key, when.get("values"), negate=False)
        negated = _when_match(key, when.get("notValues"), negate=True)
        merged = {f: getattr(negated, f) for f in negated.__struct_fields__ if getattr(negated, f)}
        clauses.append(Clause(matches=[msgspec.structs.replace(match, **merged)]))
    if action == "allow" and http:
        return None, http  # an ALLOW rule on HTTP attributes never matches at L4
    return Rule(clauses=clauses), http


class _Source(msgspec.Struct, kw_only=True, rename="camel"):
    principals: list[str] = []
    not_principals: list[str] = []
    request_principals: list[str] = []
    not_request_principals: list[str] = []
    namespaces: list[str] = []
    not_namespaces: list[str] = []
    service_accounts: list[str] = []
    not_service_accounts: list[str] = []
    ip_blocks: list[str] = []
    not_ip_blocks: list[str] = []
    remote_ip_blocks: list[str] = []
    not_remote_ip_blocks: list[str] = []


class _Operation(msgspec.Struct, kw_only=True, rename="camel"):
    hosts: list[str] = []
    not_hosts: list[str] = []
    ports: list[str | int] = []
    not_ports: list[str | int] = []
    methods: list[str] = []
    not_methods: list[str] = []
    paths: list[str] = []
    not_paths: list[str] = []


class _From(msgspec.Struct, kw_only=True):
    source: _Source = msgspec.field(default_factory=_Source)


class _To(msgspec.Struct, kw_only=True):
    operation: _Operation = msgspec.field(default_factory=_Operation)


class _Condition(msgspec.Struct, kw_only=True, rename="camel"):
    key: str
    values: list[str | int] = []
    not_values: list[str | int] = []


class _Rule(msgspec.Struct, kw_only=True):
    from_: list[_From] = msgspec.field(default_factory=list, name="from")
    to: list[_To] = []
    when: list[_Condition] = []


class _Selector(msgspec.Struct, kw_only=True, rename="camel"):
    match_labels: dict[str, str] = {}


class _PolicySpec(msgspec.Struct, kw_only=True):
    """The shape of an AuthorizationPolicy's spec (the types of the fields read; others are ignored)."""

    selector: _Selector | None = None
    action: str = "ALLOW"
    rules: list[_Rule] = []


def policy_shape_problem(obj: Obj) -> str | None:
    """What is malformed in the policy's spec (a field of the wrong type), or None when its shape is right.

    The CRD leaves the spec's validation to the control plane, as istiod's webhook does, so a policy the
    API server stored can still be malformed.
    """
    spec = obj.get("spec", {})
    if not isinstance(spec, Mapping):
        return f"spec: expected an object, got {type(spec).__name__}"
    try:
        msgspec.convert(spec, _PolicySpec)
    except msgspec.ValidationError as exc:
        return str(exc).replace("`$", "`spec")
    return None


def policy_from(obj: Obj, notes: list[str]) -> Policy | None:
    """The world's policy for ztunnel, or None when the policy is not for ztunnel (targetRefs), uses an
    action ztunnel does not have, or is malformed (both noted)."""
    meta, spec = _meta(obj), _spec(obj)
    what = object_name("AuthorizationPolicy", obj)
    problem = policy_shape_problem(obj)
    if problem is not None:
        notes.append(f"{what}: malformed ({problem}); policy left out")
        return None
    if spec.get("targetRef") or spec.get("targetRefs"):
        return None
    action = str(spec.get("action") or "ALLOW").upper()
    if action not in ("ALLOW", "DENY"):
        notes.append(f"{what}: ztunnel does not support the {action} action; policy left out")
        return None
    namespace = str(meta.get("namespace", ""))
    rules: list[Rule] = []
    http: list[str] = []
    for rule in _list(spec.get("rules")):
        if not isinstance(rule, Mapping):
            continue
        converted, found = _rule(action.lower(), rule, namespace)
        http += found
        if converted is not None:
            rules.append(converted)
    if http:
        effect = ("its rules on HTTP attributes are left out (they never match)" if action == "ALLOW"
                  else "it is enforced without its HTTP rules (more restrictive)")
        notes.append(f"{what}: ztunnel cannot check HTTP attributes ({', '.join(sorted(set(http)))}): "
                     f"{effect}; a waypoint enforces them")
    selector = _spec(spec, "selector").get("matchLabels")
    return Policy(
        name=str(meta.get("name", "")), namespace=namespace, action=action.lower(),
        selector=_strings(selector) if isinstance(selector, Mapping) and selector else None,
        rules=rules, dry_run=_strings(meta.get("annotations")).get(DRY_RUN_ANNOTATION) == "true",
    )  # fmt: skip


# --- the world ------------------------------------------------------------------------------------------


def mesh_settings(world: World) -> World:
    """`world` without its objects: only the mesh settings (trust domain, cluster id, domain suffix, root
    namespace, network) that a world from the API server is built on."""
    return msgspec.structs.replace(world, nodes=[], namespaces=[], pods=[], services=[], policies=[],
                                   waypoints=[], authorization_policies=[], http_routes=[])  # fmt: skip


def world_from_objects(objects: KubeObjects, *, base: World | None = None,
                       source: str = "kubernetes") -> tuple[World, list[str]]:
    """The world of one snapshot of the API server, and notes on what was left out and why.

    `base` gives the mesh settings (trust domain, cluster id, domain suffix, root namespace, network);
    its own objects are ignored. Nodes the API server does not list but pods name are added without a pod
    range (a pod may be scheduled before its Node object is seen).
    """
    base = mesh_settings(base or World())
    notes: list[str] = []
    pods = [p for p in (pod_from(o) for o in objects.pods) if p is not None]
    nodes = [node_from(o) for o in objects.nodes]
    known = {n.name for n in nodes}
    nodes += [Node(name=name) for name in sorted({p.node for p in pods} - known)]
    services = [service_from(o, objects.pods, notes) for o in objects.services]
    policies = [p for p in (policy_from(o, notes) for o in objects.policies) if p is not None]
    waypoints = [waypoint_of(p) for p in pods if GATEWAY_NAME_LABEL in p.labels]
    world = msgspec.structs.replace(
        base, nodes=nodes, namespaces=[namespace_from(o) for o in objects.namespaces], pods=pods,
        services=services, policies=policies, waypoints=waypoints,
    )  # fmt: skip
    # Drop what the world refuses, one object at a time, until the rest is valid.
    for _ in range(len(pods) + len(services) + len(policies) + len(nodes) + len(world.namespaces)
                   + len(waypoints) + 1):
        try:
            validate(world, source)
            return world, notes
        except WorldError as exc:
            found = _INDEXED.match(exc.path)
            if found is None:
                raise  # a setting of `base`, not an object: the caller's configuration is wrong
            field, index = found.group(1), int(found.group(2))
            items = list(getattr(world, field))
            dropped = items.pop(index)
            notes.append(f"{_describe(field, dropped)} left out: {exc.path}: {exc.problem}")
            world = msgspec.structs.replace(world, **{field: items})
    validate(world, source)
    return world, notes


def waypoint_of(pod: Pod) -> Waypoint:
    """The waypoint a pod runs, from the labels upstream's gateway controller gives a waypoint's pods (the
    Gateway's name; `istio.io/waypoint-for` when the Gateway sets it, else upstream's default `service`)."""
    return Waypoint(name=pod.labels[GATEWAY_NAME_LABEL], namespace=pod.namespace, pod=pod.name,
                    for_=pod.labels.get(WAYPOINT_FOR_LABEL, "service"))  # fmt: skip


def _describe(field: str, item: Any) -> str:
    if field == "waypoints":
        return f"the waypoint {item.namespace}/{item.name} of Pod {item.namespace}/{item.pod}"
    kind = {"pods": "Pod", "services": "Service", "policies": "AuthorizationPolicy",
            "namespaces": "Namespace", "nodes": "Node"}[field]
    namespace = getattr(item, "namespace", None)
    return f"{kind} {namespace}/{item.name}" if namespace else f"{kind} {item.name}"


# --- the world as Kubernetes objects (what the lab loads into an API server) -----------------------------

POD_TEMPLATE_HASH = "5d8b9c7f6"
"""The pod-template-hash label the lab gives its pods (one value for all: the lab has no ReplicaSets)."""


def pod_to_object(pod: Pod, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    """A Pod object for `pod`, as a kubelet-run pod of a Deployment would look (status with its IPs);
    `labels` instead of the pod's own (a waypoint's pod gets its gateway's labels)."""
    labels = dict(pod.labels if labels is None else labels)
    meta: dict[str, Any] = {"name": pod.name, "namespace": pod.namespace, "uid": pod.kube_uid}
    if pod.workload:
        labels["pod-template-hash"] = POD_TEMPLATE_HASH
        owner = f"{pod.workload}-{POD_TEMPLATE_HASH}"
        meta["ownerReferences"] = [{
            "apiVersion": "apps/v1", "kind": "ReplicaSet", "controller": True, "name": owner,
            "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"trio-ambient/replicaset/{pod.namespace}/{owner}")),
        }]  # fmt: skip
    meta["labels"] = labels
    if pod.annotations:
        meta["annotations"] = dict(pod.annotations)
    return {
        "apiVersion": "v1", "kind": "Pod", "metadata": meta,
        "spec": {"nodeName": pod.node, "serviceAccountName": pod.service_account,
                 "hostNetwork": pod.host_network, "containers": [{"name": "app", "image": "lab"}]},
        "status": {"phase": "Running", "podIP": pod.ips[0], "podIPs": [{"ip": ip} for ip in pod.ips]},
    }  # fmt: skip


def service_to_object(svc: Service) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "selector": dict(svc.selector),
        "ports": [{"name": p.name or f"tcp-{p.port}", "port": p.port, "targetPort": p.target_port or p.port,
                   "protocol": "TCP", **({"appProtocol": p.app_protocol} if p.app_protocol else {})}
                  for p in svc.ports],
    }  # fmt: skip
    if svc.vips:
        spec["clusterIP"], spec["clusterIPs"] = svc.vips[0], list(svc.vips)
    else:
        spec["clusterIP"] = "None"
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": svc.name, "namespace": svc.namespace}, "spec": spec}  # fmt: skip


def _values(matches: Iterable[StringMatch]) -> list[str]:
    out = []
    for m in matches:
        if m.presence:
            out.append("*")
        elif m.suffix is not None:
            out.append("*" + m.suffix)
        elif m.prefix is not None:
            out.append(m.prefix + "*")
        elif m.exact is not None:
            out.append(m.exact.removeprefix("spiffe://"))
    return out


SOURCE_FIELDS = ("source_ips", "not_source_ips", "namespaces", "not_namespaces", "principals",
                 "not_principals", "service_accounts", "not_service_accounts")
PORT_FIELDS = ("destination_ports", "not_destination_ports")


def _set_fields(m: Match) -> set[str]:
    return {f for f in m.__struct_fields__ if getattr(m, f)}


def _source(m: Match) -> dict[str, Any]:
    out: dict[str, Any] = {}
    accounts = [f"{a.namespace}/{a.service_account}" for a in m.service_accounts]
    not_accounts = [f"{a.namespace}/{a.service_account}" for a in m.not_service_accounts]
    for key, values in (
        ("ipBlocks", m.source_ips), ("notIpBlocks", m.not_source_ips),
        ("namespaces", _values(m.namespaces)), ("notNamespaces", _values(m.not_namespaces)),
        ("principals", _values(m.principals)), ("notPrincipals", _values(m.not_principals)),
        ("serviceAccounts", accounts), ("notServiceAccounts", not_accounts),
    ):  # fmt: skip
        if values:
            out[key] = list(values)
    return out


def _operation(m: Match) -> dict[str, Any]:
    ports = (("ports", m.destination_ports), ("notPorts", m.not_destination_ports))
    return {key: [str(p) for p in values] for key, values in ports if values}


def _when(m: Match) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for key, values, negated in (
        ("source.ip", m.source_ips, False), ("source.ip", m.not_source_ips, True),
        ("source.namespace", _values(m.namespaces), False),
        ("source.namespace", _values(m.not_namespaces), True),
        ("source.principal", _values(m.principals), False),
        ("source.principal", _values(m.not_principals), True),
        ("destination.ip", m.destination_ips, False), ("destination.ip", m.not_destination_ips, True),
        ("destination.port", [str(p) for p in m.destination_ports], False),
        ("destination.port", [str(p) for p in m.not_destination_ports], True),
    ):  # fmt: skip
        if values:
            out.append({"key": key, ("notValues" if negated else "values"): list(values)})
    return out


def policy_to_object(pol: Policy) -> dict[str, Any]:
    """An AuthorizationPolicy that istiod converts back into `pol`'s rules.

    Per rule: one clause whose matches use only source fields becomes `from` (one source per match), one
    whose matches use only ports becomes `to`, and any other clause of a single match becomes `when`
    conditions (ANDed, so only a match without service accounts qualifies).

    Raises:
        ValueError: a rule that an AuthorizationPolicy cannot express (two source clauses, a clause of
            several matches mixing sources and destinations, ...).
    """
    rules = []
    for r, rule in enumerate(pol.rules):
        out: dict[str, Any] = {}
        for clause in rule.clauses:
            fields = set().union(*(_set_fields(m) for m in clause.matches)) if clause.matches else set()
            if fields and fields <= set(SOURCE_FIELDS) and "from" not in out:
                out["from"] = [{"source": _source(m)} for m in clause.matches]
            elif fields and fields <= set(PORT_FIELDS) and "to" not in out:
                out["to"] = [{"operation": _operation(m)} for m in clause.matches]
            elif len(clause.matches) == 1 and not fields & {"service_accounts", "not_service_accounts"}:
                out.setdefault("when", []).extend(_when(clause.matches[0]))
            else:
                raise ValueError(f"policy {pol.key}: rules[{r}] cannot be written as an AuthorizationPolicy")
        rules.append(out)
    spec: dict[str, Any] = {"action": pol.action.upper(), "rules": rules}
    if pol.selector is not None:
        spec["selector"] = {"matchLabels": dict(pol.selector)}
    meta: dict[str, Any] = {"name": pol.name, "namespace": pol.namespace}
    if pol.dry_run:
        meta["annotations"] = {DRY_RUN_ANNOTATION: "true"}
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy", "metadata": meta,
            "spec": spec}  # fmt: skip


def _object_labels(world: World, pod: Pod) -> dict[str, str]:
    """The pod's labels as the API server would hold them: a waypoint's pod has its gateway's labels."""
    labels = dict(pod_labels(world, pod))
    wp = world.waypoint_of_pod(pod)
    if wp is not None and wp.for_ != "service":
        labels[WAYPOINT_FOR_LABEL] = wp.for_
    return labels


def world_to_objects(world: World) -> KubeObjects:
    """The world's nodes, namespaces, pods, services and policies as Kubernetes objects."""
    return KubeObjects(
        nodes=[{"apiVersion": "v1", "kind": "Node", "metadata": {"name": n.name},
                "spec": {"podCIDR": n.pod_cidr} if n.pod_cidr else {}} for n in world.nodes],
        namespaces=[{"apiVersion": "v1", "kind": "Namespace",
                     "metadata": {"name": ns.name, "labels": dict(ns.labels)}} for ns in world.namespaces],
        pods=[pod_to_object(p, _object_labels(world, p)) for p in world.pods],
        services=[service_to_object(s) for s in world.services],
        policies=[policy_to_object(p) for p in world.policies],
    )  # fmt: skip
