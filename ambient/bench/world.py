"""The world `ambient bench` builds its lab from, and the arms it measures. Pure: no I/O.

Two nodes. Each arm is a client pod on node-a and a server pod on node-b; the `mesh` arm's namespace carries
the ambient label, the `baseline` arm's does not, so the same kernel path (veth, bridges, fabric) carries
both and only the two ztunnels differ. Clients reach servers by pod IP in both arms (the baseline has no
kube-proxy VIP path to compare with ztunnel's VIP resolution).

The pod blocks (a pair of /24s in 10.244.100.0-10.244.239.255, chosen per run) are away from the lab's
defaults on purpose: a node agent
that finds pods by scanning every netns on the host for their IPs (the restore path) would otherwise take
this lab's un-enrolled baseline pods for another lab's ambient pods with the same addresses.
"""

from __future__ import annotations

import msgspec

from services.istiod.world import Namespace, Node, Pod, World

ARMS = ("baseline", "mesh")
NAMESPACES = {"mesh": "bench-mesh", "baseline": "bench-plain"}
AMBIENT_LABEL = {"istio.io/dataplane-mode": "ambient"}
CLIENT_NODE, SERVER_NODE = "node-a", "node-b"
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


def pod_blocks(seed: int) -> tuple[int, int]:
    """Third octets of node-a's and node-b's /24 inside 10.244.0.0/16: 100-239, chosen by `seed` so that
    two bench labs on one host rarely share pod addresses."""
    first = 100 + 2 * (seed % 70)
    return first, first + 1


def bench_world(seed: int = 0) -> World:
    """Two nodes; per arm a `client` pod on node-a and a `server` pod on node-b (both run `sleep`: the
    bench starts its own servers in the server pods)."""
    a, b = pod_blocks(seed)
    pods = []
    for i, arm in enumerate(ARMS):
        ns = NAMESPACES[arm]
        pods += [
            Pod(name="client", namespace=ns, node=CLIENT_NODE, ips=[f"10.244.{a}.{10 + i}"],
                service_account="bench-client", labels={"app": "client"}),
            Pod(name="server", namespace=ns, node=SERVER_NODE, ips=[f"10.244.{b}.{10 + i}"],
                service_account="bench-server", labels={"app": "bench-server"}),
        ]  # fmt: skip
    return World(
        nodes=[
            Node(name=CLIENT_NODE, pod_cidr=f"10.244.{a}.0/24"),
            Node(name=SERVER_NODE, pod_cidr=f"10.244.{b}.0/24"),
        ],
        namespaces=[
            Namespace(name=NAMESPACES["mesh"], labels=dict(AMBIENT_LABEL)),
            Namespace(name=NAMESPACES["baseline"], labels={}),
        ],
        pods=pods,
    )


def enrol_pod_ip(index: int) -> str:
    """The address of enrolment pod `index` (0..63999): 10.250.<index // 250>.<index % 250 + 2>."""
    if not 0 <= index < 64000:
        raise ValueError(f"enrolment pod index {index} out of range")
    return f"{ENROL_RANGE}.{index // 250}.{index % 250 + 2}"
