"""The world `ambient bench` builds its lab from, and the arms it measures. Pure: no I/O.

Two nodes. Each arm is a client pod on node-a and a server pod on node-b; the `mesh` arm's namespace carries
the ambient label, the `baseline` arm's does not, so the same kernel path (veth, bridges, fabric) carries
both and only the two ztunnels differ. With upstream's ztunnel as a third arm (`ambient bench --ztunnel-bin`)
the world has two more nodes, node-c and node-d, which run that binary: the `upstream` arm's client is on
node-c and its server on node-d, over the same kind of veth/bridge/fabric path as node-a to node-b.
Clients reach servers by pod IP in every arm (the baseline has no kube-proxy VIP path to compare with
ztunnel's VIP resolution).

The pod blocks (four /24s in 10.244.100.0-10.244.239.255, chosen per run) are away from the lab's
defaults on purpose: a node agent that finds pods by scanning every netns on the host for their IPs (the
restore path) would otherwise take this lab's un-enrolled baseline pods for another lab's ambient pods
with the same addresses.
"""

from __future__ import annotations

import msgspec

from services.istiod.world import Namespace, Node, Pod, World

ARMS = ("baseline", "mesh")
UPSTREAM_ARM = "upstream"
"""The third arm: the same pair of pods meshed by upstream's ztunnel on node-c and node-d."""
MESH_ARMS = ("mesh", UPSTREAM_ARM)
"""Arms whose traffic crosses a pair of ztunnels (ours, upstream's)."""
NAMESPACES = {"mesh": "bench-mesh", "baseline": "bench-plain", UPSTREAM_ARM: "bench-upstream"}
AMBIENT_LABEL = {"istio.io/dataplane-mode": "ambient"}
CLIENT_NODE, SERVER_NODE = "node-a", "node-b"
UPSTREAM_NODES = {"client": "node-c", "server": "node-d"}
ARM_NODES = {"baseline": {"client": CLIENT_NODE, "server": SERVER_NODE},
             "mesh": {"client": CLIENT_NODE, "server": SERVER_NODE},
             UPSTREAM_ARM: UPSTREAM_NODES}  # fmt: skip
RR_PORT = 8080
CRR_PORT = 8081
IPERF_PORT = 5201

# Enrolment pods are not in the world: the lab (as kubelet) creates them during the run. Their addresses
# come from a range outside the nodes' pod blocks; they carry no traffic, only the in-pod listeners.
ENROL_RANGE = "10.250"


class Arm(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    client: str  # pod key ns/name
    server: str


def arm_pods(arm: str) -> Arm:
    ns = NAMESPACES[arm]
    return Arm(name=arm, client=f"{ns}/client", server=f"{ns}/server")


def arms(upstream: bool) -> tuple[str, ...]:
    """The arms of a run: no mesh and ours, plus upstream's ztunnel when the run has it."""
    return (*ARMS, UPSTREAM_ARM) if upstream else ARMS


def pod_blocks(seed: int) -> tuple[int, int, int, int]:
    """Third octets of the /24s of node-a, node-b, node-c and node-d inside 10.244.0.0/16: 100-239, chosen
    by `seed` so that two bench labs on one host rarely share pod addresses."""
    first = 100 + 4 * (seed % 35)
    return first, first + 1, first + 2, first + 3


def bench_world(seed: int = 0, *, upstream: bool = False) -> World:
    """Per arm a `client` pod and a `server` pod on two nodes (both run `sleep`: the bench starts its own
    servers in the server pods): node-a and node-b, plus node-c and node-d for the `upstream` arm."""
    blocks = dict(zip(("node-a", "node-b", "node-c", "node-d"), pod_blocks(seed), strict=True))
    pods = []
    for i, arm in enumerate(arms(upstream)):
        ns = NAMESPACES[arm]
        client, server = ARM_NODES[arm]["client"], ARM_NODES[arm]["server"]
        pods += [
            Pod(name="client", namespace=ns, node=client, ips=[f"10.244.{blocks[client]}.{10 + i}"],
                service_account="bench-client", labels={"app": "client"}),
            Pod(name="server", namespace=ns, node=server, ips=[f"10.244.{blocks[server]}.{10 + i}"],
                service_account="bench-server", labels={"app": "bench-server"}),
        ]  # fmt: skip
    node_names = [CLIENT_NODE, SERVER_NODE] + (list(UPSTREAM_NODES.values()) if upstream else [])
    namespaces = [Namespace(name=NAMESPACES["mesh"], labels=dict(AMBIENT_LABEL)),
                  Namespace(name=NAMESPACES["baseline"], labels={})]  # fmt: skip
    if upstream:
        namespaces.append(Namespace(name=NAMESPACES[UPSTREAM_ARM], labels=dict(AMBIENT_LABEL)))
    return World(
        nodes=[Node(name=name, pod_cidr=f"10.244.{blocks[name]}.0/24") for name in node_names],
        namespaces=namespaces,
        pods=pods,
    )


def enrol_pod_ip(index: int) -> str:
    """The address of enrolment pod `index` (0..63999): 10.250.<index // 250>.<index % 250 + 2>."""
    if not 0 <= index < 64000:
        raise ValueError(f"enrolment pod index {index} out of range")
    return f"{ENROL_RANGE}.{index // 250}.{index % 250 + 2}"
