"""The lab's topology: a pure plan from a world, and the code that builds and removes it.

Theory of operation
-------------------
`plan_lab(world, prefix=...)` is a pure function: it lays the world out as network namespaces and returns a
`LabPlan` (every namespace, link, address and route, the resolv.conf of each pod, the service DNAT rules of
each node, the app each pod runs). It checks what the istiod stub's world validation does not: pod ranges
are IPv4 /24-or-smaller blocks inside 10.244.0.0/16 that do not overlap, each pod address lies in its
node's block and is not the block's gateway. A world the lab cannot build raises PlanError before anything
exists.

    <prefix>-fabric      bridge fabric0; one veth per node and one for the control plane
    <prefix>-cp          eth0 172.29.0.2/24 on the fabric; routes to every pod block via its node;
                         the cluster DNS's VIP 10.96.255.10 on lo (cluster_dns.py), routed there by every node
    <prefix>-node-a      eth0 172.29.0.10/24 on the fabric, bridge cbr0 10.244.1.1/24 for its pods,
                         ip_forward=1, routes to the other nodes' blocks, kube-proxy-like DNAT for VIPs
    <prefix>-<ns>-<pod>  eth0 10.244.1.10/24, default via 10.244.1.1; peer veth<hash> in cbr0 of its node

`build_steps(plan)` renders the plan into an ordered list of `Step`s (`ip` and `iptables-restore`
commands, each with the namespace it runs in), again pure, so the exact commands are unit-tested. Links are
named inside the namespace that owns them only; the host namespace never gets a link, address or route.

Applying (`apply_plan`, `wire_pod`) and removing (`delete_netns`, `remove_tree`) are the only impure
parts. The caller records each namespace in the lab's state file *before* creating it (via `on_netns`), so
`ambient lab down` can remove exactly what exists even after `up` crashed half-way. Deleting a namespace
deletes every link in it, and a veth dies with either end, so removal is: stop the recorded processes,
delete the recorded namespaces, remove the recorded files.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import os
import shutil
import subprocess
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import msgspec

from ambient.lab.cluster_dns import KUBE_DNS_VIP, node_resolv_conf, pod_resolv_conf
from ambient.lab.errors import CommandError, LabError, PlanError
from services.istiod.derive import pod_labels
from services.istiod.world import Match, Node, Pod, Policy, Service, World
from services.node_agent.eligibility import decide
from services.node_agent.model import Pod as AgentPod
from shared.netns import NETNS_RUN_DIR
from shared.zds.types import PodUid

POD_RANGE = ipaddress.IPv4Network("10.244.0.0/16")
DEFAULT_FABRIC = ipaddress.IPv4Network("172.29.0.0/24")
CONTROL_PLANE_HOST = 2  # .2 on the fabric
NODE_HOST_BASE = 10  # node i gets .10+i on the fabric
ISTIOD_PORT = 15012
ETC_NETNS = Path("/etc/netns")
IFNAMSIZ = 15

BOOKINFO_APPS = frozenset({"productpage", "details", "reviews", "ratings"})
CLIENT_APPS = frozenset({"sleep", "client", "curl"})
DEFAULT_APP_PORT = 9080


class Route(msgspec.Struct, frozen=True, kw_only=True):
    dst: str  # CIDR or "default"
    via: str


class FabricPlan(msgspec.Struct, frozen=True, kw_only=True):
    netns: str
    bridge: str
    cidr: str


class ControlPlanePlan(msgspec.Struct, frozen=True, kw_only=True):
    netns: str
    fabric_port: str  # the veth end in the fabric netns
    address: str  # ip/prefix on eth0
    routes: list[Route]

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class DnatTarget(msgspec.Struct, frozen=True, kw_only=True):
    vip: str
    port: int
    endpoints: list[str]  # ip:port


class NodePlan(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    index: int
    netns: str
    fabric_port: str
    address: str  # ip/prefix on eth0 (the fabric)
    bridge: str
    pod_cidr: str
    gateway: str  # ip/prefix on the bridge
    routes: list[Route]

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class AppPlan(msgspec.Struct, frozen=True, kw_only=True):
    """What runs in a pod: `kind` is one of the sample apps (services.apps), `echo` or `sleep`."""

    kind: str
    ports: list[int] = []
    env: dict[str, str] = {}


class PodPlan(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    uid: str
    node: str
    netns: str
    host_veth: str  # the end in the node netns, attached to the node's bridge
    address: str  # ip/prefix on eth0
    gateway: str
    service_account: str
    labels: dict[str, str]
    annotations: dict[str, str]
    ambient: bool
    ambient_reason: str
    resolv_conf: str  # contents of /etc/netns/<netns>/resolv.conf: the cluster DNS
    app: AppPlan

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def ip(self) -> str:
        return self.address.split("/")[0]


class ServicePlan(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    hostname: str
    vips: list[str]
    ports: list[int]
    endpoints: list[str]  # pod keys


class LabPlan(msgspec.Struct, frozen=True, kw_only=True):
    prefix: str
    fabric: FabricPlan
    control_plane: ControlPlanePlan
    nodes: list[NodePlan]
    pods: list[PodPlan]
    services: list[ServicePlan]
    dnat: list[DnatTarget]

    @property
    def istiod_address(self) -> str:
        return f"{self.control_plane.ip}:{ISTIOD_PORT}"

    def node(self, name: str) -> NodePlan:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(name)

    def all_netns(self) -> list[str]:
        return [
            self.fabric.netns,
            self.control_plane.netns,
            *(n.netns for n in self.nodes),
            *(p.netns for p in self.pods),
        ]


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One command of the build: argv, the netns it runs in (None: the lab's own), stdin text."""

    argv: list[str]
    netns: str | None = None
    stdin: str | None = None

    def describe(self) -> str:
        where = f"[{self.netns}] " if self.netns else ""
        return where + " ".join(self.argv)


# --- planning (pure) -------------------------------------------------------------------------------------


def check_prefix(prefix: str) -> None:
    """A prefix is 1-20 chars of a-z, 0-9 and '-', starting with a letter (it starts every netns name)."""
    ok = (
        0 < len(prefix) <= 20
        and prefix[0].isalpha()
        and all(c.isdigit() or c == "-" or ("a" <= c <= "z") for c in prefix)
    )
    if not ok:
        raise LabError(
            f"lab prefix {prefix!r} must be 1-20 characters of a-z, 0-9 and '-', starting with a letter"
        )


def veth_name(pod_key: str) -> str:
    """The pod veth's end in the node netns: a name from the pod's key (15 characters at most)."""
    return "veth" + hashlib.sha1(pod_key.encode()).hexdigest()[:8]


def pod_netns_name(prefix: str, namespace: str, name: str) -> str:
    return f"{prefix}-{namespace}-{name}"


def _fabric_port(kind: str, index: int) -> str:
    return f"{kind}{index}"[:IFNAMSIZ]


def _node_cidrs(world: World, source: str) -> list[ipaddress.IPv4Network]:
    cidrs: list[ipaddress.IPv4Network] = []
    for i, node in enumerate(world.nodes):
        path = f"$.nodes[{i}].podCidr"
        if node.pod_cidr is None:
            cidr = ipaddress.IPv4Network(f"10.244.{i + 1}.0/24")
        else:
            try:
                net = ipaddress.ip_network(node.pod_cidr, strict=True)
            except ValueError as exc:
                raise PlanError(source, path, f"{node.pod_cidr!r} is not a network CIDR: {exc}") from None
            if not isinstance(net, ipaddress.IPv4Network):
                raise PlanError(source, path, f"{net} is IPv6; the lab lays out IPv4 pod ranges only")
            cidr = net
        if not cidr.subnet_of(POD_RANGE):
            raise PlanError(source, path, f"{cidr} is outside the lab's pod range {POD_RANGE}")
        if cidr.prefixlen < 24 or cidr.prefixlen > 29:
            raise PlanError(source, path, f"{cidr} must be a /24 to /29 (one block per node)")
        for j, other in enumerate(cidrs):
            if cidr.overlaps(other):
                raise PlanError(
                    source, path, f"{cidr} overlaps node {world.nodes[j].name}'s pod range {other}"
                )
        cidrs.append(cidr)
    return cidrs


def _selects(svc: Service, pod: Pod) -> bool:
    return (
        svc.namespace == pod.namespace
        and bool(svc.selector)
        and all(pod.labels.get(k) == v for k, v in svc.selector.items())
    )


def _service_url(world: World, namespace: str, name: str) -> str | None:
    for svc in world.services:
        if svc.namespace == namespace and svc.name == name and svc.ports:
            return f"http://{name}:{svc.ports[0].port}"
    return None


WAYPOINT_PROGRAM = "waypoint"
WAYPOINT_HBONE_PORT = 15008


def _app_for(world: World, pod: Pod) -> AppPlan:
    waypoint = world.waypoint_of_pod(pod)
    if waypoint is not None:
        # The waypoint process, not an app: it terminates HBONE on 15008 with the pod's identity.
        return AppPlan(kind=WAYPOINT_PROGRAM, ports=[WAYPOINT_HBONE_PORT], env={
            "POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "SERVICE_ACCOUNT": pod.service_account,
            "WAYPOINT_NAME": waypoint.name, "TRUST_DOMAIN": world.trust_domain,
            "CLUSTER_ID": world.cluster_id})
    ports = sorted(
        {(p.target_port or p.port) for svc in world.services if _selects(svc, pod) for p in svc.ports}
    )
    app = pod.labels.get("app", "")
    env = {"POD_NAME": pod.name, "POD_NAMESPACE": pod.namespace, "SERVICE_ACCOUNT": pod.service_account}
    if "version" in pod.labels:
        env["SERVICE_VERSION"] = pod.labels["version"]
    if app in BOOKINFO_APPS:
        calls = {"productpage": ("details", "reviews"), "reviews": ("ratings",)}.get(app, ())
        for upstream in calls:
            url = _service_url(world, pod.namespace, upstream)
            if url is not None:
                env[f"{upstream.upper()}_URL"] = url
        return AppPlan(kind=app, ports=ports[:1] or [DEFAULT_APP_PORT], env=env)
    if app in CLIENT_APPS or not ports:
        return AppPlan(kind="sleep", env=env)
    return AppPlan(kind="echo", ports=ports, env=env)


def plan_lab(
    world: World, *, prefix: str, source: str = "<world>", fabric: ipaddress.IPv4Network = DEFAULT_FABRIC
) -> LabPlan:
    """Lay `world` out as a lab. Pure: no I/O.

    Args:
        world: a world already validated by the istiod stub's `load_world`.
        prefix: starts every namespace name (`<prefix>-node-a`); see `check_prefix`.
        source: the world's file name, for error messages.
    Raises:
        PlanError: the world cannot be built as a lab; nothing was created.
    """
    check_prefix(prefix)
    if not world.nodes:
        raise PlanError(source, "$.nodes", "the lab needs at least one node")
    if len(world.nodes) > 200:
        raise PlanError(source, "$.nodes", "the lab supports at most 200 nodes")
    cidrs = _node_cidrs(world, source)
    fabric_hosts = list(fabric.hosts())
    node_plans: list[NodePlan] = []
    for i, (node, cidr) in enumerate(zip(world.nodes, cidrs, strict=True)):
        routes = [
            Route(dst=str(other), via=str(fabric_hosts[NODE_HOST_BASE + j - 1]))
            for j, other in enumerate(cidrs)
            if j != i
        ]
        node_plans.append(
            NodePlan(
                name=node.name,
                index=i,
                netns=f"{prefix}-{node.name}",
                fabric_port=_fabric_port("node", i),
                address=f"{fabric_hosts[NODE_HOST_BASE + i - 1]}/{fabric.prefixlen}",
                bridge="cbr0",
                pod_cidr=str(cidr),
                gateway=f"{next(cidr.hosts())}/{cidr.prefixlen}",
                routes=routes,
            )
        )
    control = ControlPlanePlan(
        netns=f"{prefix}-cp",
        fabric_port="cp0",
        address=f"{fabric_hosts[CONTROL_PLANE_HOST - 1]}/{fabric.prefixlen}",
        routes=[Route(dst=n.pod_cidr, via=n.ip) for n in node_plans],
    )
    by_node = {n.name: (n, c) for n, c in zip(node_plans, cidrs, strict=True)}
    ns_labels = {ns.name: ns.labels for ns in world.namespaces}
    pods: list[PodPlan] = []
    netns_names: dict[str, str] = {}
    for i, pod in enumerate(world.pods):
        base = f"$.pods[{i}]"
        if pod.host_network:
            raise PlanError(source, f"{base}.hostNetwork", "the lab does not run hostNetwork pods")
        pod_node, cidr = by_node[pod.node]
        v4 = [(j, ip) for j, ip in enumerate(pod.ips) if ipaddress.ip_address(ip).version == 4]
        if not v4:
            raise PlanError(source, f"{base}.ips", "the lab needs an IPv4 address for every pod")
        j, ip_text = v4[0]
        ip = ipaddress.IPv4Address(ip_text)
        if ip not in cidr:
            raise PlanError(
                source, f"{base}.ips[{j}]", f"{ip} is outside node {pod_node.name}'s pod range {cidr}"
            )
        if ip in (cidr.network_address, cidr.broadcast_address, next(cidr.hosts())):
            raise PlanError(
                source,
                f"{base}.ips[{j}]",
                f"{ip} is the network, broadcast or gateway address of {cidr}; use .2 and up",
            )
        netns = pod_netns_name(prefix, pod.namespace, pod.name)
        if len(netns) > 200:
            raise PlanError(source, f"{base}.name", "namespace and pod name are too long for a netns name")
        if netns in netns_names:
            raise PlanError(source, base, f"netns name {netns} collides with pod {netns_names[netns]}")
        netns_names[netns] = pod.key
        # The labels the node agent sees (a waypoint's pod also carries its gateway labels).
        labels = pod_labels(world, pod)
        agent_pod = AgentPod(
            uid=PodUid(pod.kube_uid),
            name=pod.name,
            namespace=pod.namespace,
            service_account=pod.service_account,
            labels=dict(labels),
            annotations=dict(pod.annotations),
        )
        decision = decide(agent_pod, ns_labels.get(pod.namespace, {}))
        pods.append(
            PodPlan(
                name=pod.name,
                namespace=pod.namespace,
                uid=pod.kube_uid,
                node=pod_node.name,
                netns=netns,
                host_veth=veth_name(pod.key),
                address=f"{ip}/{cidr.prefixlen}",
                gateway=str(next(cidr.hosts())),
                service_account=pod.service_account,
                labels=dict(labels),
                annotations=dict(pod.annotations),
                ambient=decision.eligible,
                ambient_reason=decision.reason,
                resolv_conf=pod_resolv_conf(pod.namespace, domain=world.domain_suffix),
                app=_app_for(world, pod),
            )
        )
    for i, svc in enumerate(world.services):
        if KUBE_DNS_VIP in svc.vips:
            raise PlanError(source, f"$.services[{i}].vips",
                            f"{KUBE_DNS_VIP} is the lab's cluster DNS address; give the service another VIP")
    pod_ip = {p.key: p.ip for p in pods}
    services: list[ServicePlan] = []
    dnat: list[DnatTarget] = []
    for svc in world.services:
        endpoints = [p.key for p in world.pods if _selects(svc, p)]
        services.append(
            ServicePlan(
                name=svc.name,
                namespace=svc.namespace,
                hostname=world.service_hostname(svc),
                vips=list(svc.vips),
                ports=[p.port for p in svc.ports],
                endpoints=endpoints,
            )
        )
        for vip in svc.vips:
            if ipaddress.ip_address(vip).version != 4 or not endpoints:
                continue
            for port in svc.ports:
                target = port.target_port or port.port
                dnat.append(
                    DnatTarget(
                        vip=vip, port=port.port, endpoints=[f"{pod_ip[k]}:{target}" for k in endpoints]
                    )
                )
    return LabPlan(
        prefix=prefix,
        fabric=FabricPlan(netns=f"{prefix}-fabric", bridge="fabric0", cidr=str(fabric)),
        control_plane=control,
        nodes=node_plans,
        pods=pods,
        services=services,
        dnat=dnat,
    )


def rescale_world(world: World, nodes: int) -> World:
    """The same world on `nodes` nodes (node-a, node-b, ...): pods dealt round-robin.

    Used by `ambient lab up --nodes N`. Node k's pods live in 10.244.(k+1).0/24: a pod keeps the address the
    world gives it when that is in its new node's range, otherwise it gets the next free one from .10 up.
    Policies that name a re-addressed pod's address exactly (`a.b.c.d` or `/32`) are rewritten to its new
    one; `rescale_notes` says what moved and which wider ranges no longer match.
    """
    if not 1 <= nodes <= 26:
        raise PlanError("--nodes", "$", f"{nodes} nodes: the lab supports 1 to 26")
    names = [f"node-{chr(ord('a') + i)}" for i in range(nodes)]
    cidrs = [ipaddress.ip_network(f"10.244.{i + 1}.0/24") for i in range(nodes)]
    new_nodes = [Node(name=n, pod_cidr=str(cidr)) for n, cidr in zip(names, cidrs, strict=True)]
    placed = [(pod, i % nodes) for i, pod in enumerate(world.pods)]
    taken = {
        ip for pod, k in placed for ip in pod.ips[:1] if _in_network(ip, cidrs[k])
    }  # kept addresses are never handed out again
    counters = [10] * nodes
    moved: dict[str, str] = {}
    pods = []
    for pod, k in placed:
        if pod.ips and _in_network(pod.ips[0], cidrs[k]):
            ip = pod.ips[0]
        else:
            while (ip := f"10.244.{k + 1}.{counters[k]}") in taken:
                counters[k] += 1
            taken.add(ip)
            if pod.ips:
                moved[pod.ips[0]] = ip
        pods.append(msgspec.structs.replace(pod, node=names[k], ips=[ip]))
    policies = [_readdress_policy(policy, moved) for policy in world.policies]
    return msgspec.structs.replace(world, nodes=new_nodes, pods=pods, policies=policies)


def rescale_notes(before: World, after: World) -> list[str]:
    """What `rescale_world` changed that the operator should know: re-addressed pods, rewritten policies,
    and policy ranges that matched a pod's old address but not its new one (those the lab cannot fix)."""
    notes = []
    old_ips = {(p.namespace, p.name): p.ips[0] for p in before.pods if p.ips}
    moves = [
        (f"{p.namespace}/{p.name}", old_ips[(p.namespace, p.name)], p.ips[0])
        for p in after.pods
        if (p.namespace, p.name) in old_ips and p.ips and old_ips[(p.namespace, p.name)] != p.ips[0]
    ]
    if moves:
        notes.append("re-addressed for the new nodes: " + ", ".join(f"{k} {a} -> {b}" for k, a, b in moves))
    for old_policy, policy in zip(before.policies, after.policies, strict=True):
        if policy != old_policy:
            notes.append(f"policy {policy.namespace}/{policy.name}: pod addresses rewritten to the new ones")
        for cidr in sorted(set(_policy_ips(policy))):
            lost = [k for k, a, b in moves if _in_network(a, cidr) and not _in_network(b, cidr)]
            if lost and "/" in cidr and not cidr.endswith("/32"):
                notes.append(
                    f"policy {policy.namespace}/{policy.name}: {cidr} no longer matches {', '.join(lost)}; "
                    "edit the world file, or run without --nodes"
                )
    return notes


def _in_network(ip: str, network: ipaddress.IPv4Network | ipaddress.IPv6Network | str) -> bool:
    try:
        return ipaddress.ip_address(ip) in ipaddress.ip_network(network, strict=False)
    except ValueError:
        return False


_POLICY_IP_FIELDS = ("source_ips", "not_source_ips", "destination_ips", "not_destination_ips")


def _policy_ips(policy: Policy) -> Iterable[str]:
    for rule in policy.rules:
        for clause in rule.clauses:
            for match in clause.matches:
                for field in _POLICY_IP_FIELDS:
                    yield from getattr(match, field)


def _readdress_policy(policy: Policy, moved: Mapping[str, str]) -> Policy:
    """`policy` with each exact pod address in `moved` (`a.b.c.d` or `a.b.c.d/32`) replaced by its new one."""

    def swap(values: list[str]) -> list[str]:
        out = []
        for value in values:
            address, _, bits = value.partition("/")
            exact = address in moved and bits in ("", "32")
            out.append(moved[address] + (f"/{bits}" if bits else "") if exact else value)
        return out

    def fix_match(match: Match) -> Match:
        return msgspec.structs.replace(match, **{f: swap(getattr(match, f)) for f in _POLICY_IP_FIELDS})

    rules = [
        msgspec.structs.replace(
            rule,
            clauses=[
                msgspec.structs.replace(c, matches=[fix_match(m) for m in c.matches]) for c in rule.clauses
            ],
        )
        for rule in policy.rules
    ]
    return msgspec.structs.replace(policy, rules=rules)


# --- rendering (pure) ------------------------------------------------------------------------------------


def render_dnat(plan: LabPlan, node: NodePlan) -> str:
    """iptables-restore input for a node: kube-proxy-like DNAT of service VIPs to pod endpoints.

    Only plain (non-mesh) traffic uses it: an enrolled pod's connections are captured inside the pod first.
    As kube-proxy (its KUBE-MARK-MASQ for an endpoint reaching itself), only hairpin traffic is masqueraded:
    a pod reaching itself through its service VIP (`-s IP -d IP` once DNATed), whose reply would otherwise
    never leave the pod; it comes back through the bridge's hairpin port (`pod_steps`). Every other
    connection keeps its source IP, so source-IP policies hold through a VIP: a reply between two pods of
    one bridge is un-DNATed by the bridge netfilter hooks (br_netfilter, `set_bridge_netfilter`).
    """
    lines = ["*nat", ":LAB-SERVICES - [0:0]", "-A PREROUTING -j LAB-SERVICES", "-A OUTPUT -j LAB-SERVICES"]
    for target in plan.dnat:
        n = len(target.endpoints)
        for i, endpoint in enumerate(target.endpoints):
            stat = ""
            if i < n - 1:
                stat = f" -m statistic --mode random --probability {1 / (n - i):.5f}"
            lines.append(
                f"-A LAB-SERVICES -d {target.vip}/32 -p tcp -m tcp --dport {target.port}{stat}"
                f" -j DNAT --to-destination {endpoint}"
            )
    local = {endpoint.rpartition(":")[0]: None for target in plan.dnat for endpoint in target.endpoints}
    for ip in (ip for ip in local if _in_network(ip, node.pod_cidr)):
        lines.append(f"-A POSTROUTING -s {ip}/32 -d {ip}/32 -m conntrack --ctstate DNAT -j MASQUERADE")
    lines.append("COMMIT")
    return "\n".join(lines) + "\n"


def bridge_mac(name: str) -> str:
    """A fixed, locally administered MAC for a bridge.

    A bridge without one takes the lowest MAC of its ports and changes it when a pod's veth with a lower one
    joins; pods that cached the gateway's old MAC would then lose their traffic until ARP expires.
    """
    digest = hashlib.sha1(name.encode()).digest()
    return ":".join(f"{b:02x}" for b in (0x02, *digest[:5]))


def _ip(netns: str, *args: str) -> Step:
    """`ip -n NETNS ARGS`; with an empty name, `ip ARGS` in the caller's own namespace (a node container)."""
    return Step(argv=["ip", "-n", netns, *args] if netns else ["ip", *args])


def build_steps(plan: LabPlan) -> list[Step]:
    """Every command that builds the plan's links, addresses and routes (namespaces already exist)."""
    steps: list[Step] = []
    fab = plan.fabric
    for ns in plan.all_netns():
        steps.append(_ip(ns, "link", "set", "lo", "up"))
    steps += [
        _ip(fab.netns, "link", "add", fab.bridge, "address", bridge_mac(fab.netns), "type", "bridge"),
        _ip(fab.netns, "link", "set", fab.bridge, "up"),
    ]
    cp = plan.control_plane
    uplinks: list[tuple[str, str, str, list[Route]]] = [(cp.fabric_port, cp.netns, cp.address, cp.routes)]
    uplinks += [(n.fabric_port, n.netns, n.address, n.routes) for n in plan.nodes]
    for port, netns, address, routes in uplinks:
        steps += [
            _ip(fab.netns, "link", "add", port, "type", "veth", "peer", "name", "eth0", "netns", netns),
            _ip(fab.netns, "link", "set", port, "master", fab.bridge),
            _ip(fab.netns, "link", "set", port, "up"),
            _ip(netns, "addr", "add", address, "dev", "eth0"),
            _ip(netns, "link", "set", "eth0", "up"),
        ]
        steps += [_ip(netns, "route", "add", r.dst, "via", r.via) for r in routes]
    steps.append(_ip(cp.netns, "addr", "add", f"{KUBE_DNS_VIP}/32", "dev", "lo"))  # the cluster DNS
    for node in plan.nodes:
        steps += [
            _ip(node.netns, "route", "add", f"{KUBE_DNS_VIP}/32", "via", cp.ip),
            _ip(node.netns, "link", "add", node.bridge, "address", bridge_mac(node.name), "type", "bridge"),
            _ip(node.netns, "addr", "add", node.gateway, "dev", node.bridge),
            _ip(node.netns, "link", "set", node.bridge, "up"),
            Step(argv=["iptables-restore", "--noflush"], netns=node.netns, stdin=render_dnat(plan, node)),
        ]
    for pod in plan.pods:
        steps += pod_steps(plan, pod)
    return steps


def container_node_steps(plan: LabPlan, node_name: str, peers: Mapping[str, str]) -> list[Step]:
    """A node that is a container (docker-compose): its own namespace is the node's.

    The pods' bridge and gateway, the VIP DNAT, and a route to every other node's pod range via that node's
    container address in `peers` (node name -> IP).

    Raises:
        PlanError: a node of the world has no address in `peers`.
    """
    node = plan.node(node_name)
    steps = [
        _ip("", "link", "add", node.bridge, "address", bridge_mac(node.name), "type", "bridge"),
        _ip("", "addr", "add", node.gateway, "dev", node.bridge),
        _ip("", "link", "set", node.bridge, "up"),
        Step(argv=["iptables-restore", "--noflush"], stdin=render_dnat(plan, node)),
    ]
    for other in plan.nodes:
        if other.name == node.name:
            continue
        if other.name not in peers:
            raise PlanError("--peer", "$", f"no address for node {other.name}; pass --peer {other.name}=IP")
        steps.append(_ip("", "route", "add", other.pod_cidr, "via", peers[other.name]))
    return steps


def as_container_node(plan: LabPlan, node_name: str) -> LabPlan:
    """The plan with `node_name`'s namespace being the caller's own (pod steps then use plain `ip`)."""
    nodes = [msgspec.structs.replace(n, netns="") if n.name == node_name else n for n in plan.nodes]
    return msgspec.structs.replace(plan, nodes=nodes)


def pod_steps(plan: LabPlan, pod: PodPlan) -> list[Step]:
    """What CNI's bridge plugin does for one pod (with `hairpinMode`, as kubelet asks): veth into the node's
    bridge, hairpin on its port (a pod reaching itself through a VIP), address, default route."""
    node = plan.node(pod.node)
    return [
        _ip(
            node.netns,
            "link",
            "add",
            pod.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            pod.netns,
        ),
        _ip(node.netns, "link", "set", pod.host_veth, "master", node.bridge),
        _ip(node.netns, "link", "set", pod.host_veth, "up"),
        _ip(node.netns, "link", "set", "dev", pod.host_veth, "type", "bridge_slave", "hairpin", "on"),
        _ip(pod.netns, "addr", "add", pod.address, "dev", "eth0"),
        _ip(pod.netns, "link", "set", "eth0", "up"),
        _ip(pod.netns, "route", "add", "default", "via", pod.gateway),
    ]


# --- applying (root) -------------------------------------------------------------------------------------


def run_step(step: Step) -> None:
    """Run one step; raises CommandError with the command and its stderr."""
    argv = step.argv
    if step.netns is not None:
        argv = ["ip", "netns", "exec", step.netns, *argv]
    try:
        proc = subprocess.run(argv, input=step.stdin, capture_output=True, text=True, timeout=30, check=False)
    except FileNotFoundError:
        raise CommandError(f"{argv[0]} is not installed (apt-get install iproute2 iptables)") from None
    except subprocess.TimeoutExpired:
        raise CommandError(f"`{step.describe()}` did not finish in 30 s") from None
    if proc.returncode != 0:
        raise CommandError(f"`{step.describe()}` failed: {proc.stderr.strip() or proc.returncode}")


def netns_exists(name: str) -> bool:
    return (NETNS_RUN_DIR / name).exists()


def create_netns(name: str) -> None:
    run_step(Step(argv=["ip", "netns", "add", name]))


def delete_netns(name: str) -> None:
    """Delete a namespace if it exists (its links go with it)."""
    if netns_exists(name):
        run_step(Step(argv=["ip", "netns", "del", name]))


def set_ip_forward(netns: str) -> None:
    run_step(Step(argv=["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"], netns=netns))


def set_bridge_netfilter(netns: str) -> None:
    """Bridged IPv4 through iptables in a node namespace (the default once the br_netfilter module is
    loaded; `modprobe br_netfilter` if this fails): a reply between two pods of one bridge is un-DNATed."""
    run_step(Step(argv=["sysctl", "-q", "-w", "net.bridge.bridge-nf-call-iptables=1"], netns=netns))


def write_resolv_conf(netns: str, text: str) -> Path:
    """Write /etc/netns/<netns>/resolv.conf (which `ip netns exec` mounts over /etc/resolv.conf); returns
    the directory made."""
    directory = ETC_NETNS / netns
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "resolv.conf").write_text(text)
    return directory


def remove_tree(path: str | os.PathLike[str]) -> None:
    """Remove a recorded file or directory; /etc/netns and the run root only when empty."""
    if Path(path) == ETC_NETNS:
        with contextlib.suppress(OSError):
            ETC_NETNS.rmdir()
        return
    if Path(path).is_dir() and not Path(path).is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def apply_plan(
    plan: LabPlan,
    *,
    on_netns: Callable[[str], None],
    on_file: Callable[[str], None],
    pods: Iterable[PodPlan] | None = None,
) -> None:
    """Create the plan's namespaces and build fabric, control plane and nodes (and the given pods).

    Args:
        on_netns: called with each namespace name *before* it is created (record it in the state file).
        on_file: called with each file or directory before it is written.
        pods: the pods to wire now (default all); `up` wires pods one by one, between CNI steps.
    Raises:
        CommandError: a command failed; what was made so far has been reported through the callbacks.
    """
    wired = list(plan.pods if pods is None else pods)
    no_pods = msgspec.structs.replace(plan, pods=[])
    for name in no_pods.all_netns():
        on_netns(name)
        create_netns(name)
    for node in plan.nodes:  # what ztunnel forwards goes to the cluster DNS, never to the host's resolvers
        _record_etc_netns(node.netns, on_file)
        write_resolv_conf(node.netns, node_resolv_conf())
    for pod in wired:
        create_pod_netns(pod, on_netns=on_netns, on_file=on_file)
    for step in build_steps(no_pods):
        run_step(step)
    for node in plan.nodes:
        set_ip_forward(node.netns)
        set_bridge_netfilter(node.netns)
    for pod in wired:
        wire_pod(plan, pod)


def create_pod_netns(
    pod: PodPlan, *, on_netns: Callable[[str], None], on_file: Callable[[str], None]
) -> None:
    on_netns(pod.netns)
    create_netns(pod.netns)
    _record_etc_netns(pod.netns, on_file)
    write_resolv_conf(pod.netns, pod.resolv_conf)


def _record_etc_netns(netns: str, on_file: Callable[[str], None]) -> None:
    if not ETC_NETNS.exists():
        on_file(str(ETC_NETNS))  # removed by `down` only when empty (another tool may use it by then)
    on_file(str(ETC_NETNS / netns))


def wire_pod(plan: LabPlan, pod: PodPlan) -> None:
    run_step(_ip(pod.netns, "link", "set", "lo", "up"))
    for step in pod_steps(plan, pod):
        run_step(step)
