"""Upstream's ztunnel in the lab: a build of istio/ztunnel, run on chosen nodes in place of ours.

    ambient lab up --ztunnel-bin PATH [--on NODE ...]

The project ships no such binary and no recipe for one; PATH must be a ztunnel built from the istio/ztunnel
repository by the user. It is configured only through its own settings (environment variables), exactly as a
Kubernetes DaemonSet would configure it:

    INPOD_UDS               the node agent's ZDS socket of the node
    XDS_ADDRESS, CA_ADDRESS https://<istiod-stub>:15012 (the lab's control plane)
    XDS_ROOT_CA, CA_ROOT_CA the root certificate file the stub wrote (the node's copy)
    AUTH_TOKEN              the node's token file (a bearer token, no newline, as the kubelet writes it)
    CLUSTER_ID              Kubernetes (sent as the `clusterid` metadata beside the token)
    NODE_NAME, INSTANCE_IP  the node; POD_NAME, POD_NAMESPACE, SERVICE_ACCOUNT: ztunnel's own pod
    IPV6_ENABLED=false      the lab is IPv4 only: listeners bind 0.0.0.0, not [::]

Its admin (127.0.0.1:15000), stats (15020) and readiness (15021) ports are its defaults, bound inside the
node's netns like ours; its DNS proxy forwards to the node's /etc/resolv.conf, which `ip netns exec` mounts
from /etc/netns/<node netns>/resolv.conf (the cluster DNS). Any other upstream setting in the caller's
environment (ZTUNNEL_WORKER_THREADS, RUST_LOG, ...) reaches it unchanged.

Upstream's /config_dump has no `pods`/`zds` sections (ours adds them); what it holds is read from its
`workloadState` (uid -> {state: Up|Pending, info}), which ours serves too.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ambient.lab.errors import PrerequisiteError
from ambient.lab.state import ComponentSpec
from ambient.lab.topology import LabPlan, NodePlan

UPSTREAM_ENV = "AMBIENT_UPSTREAM_ZTUNNEL"
"""Names a build of istio/ztunnel for the interop tests and the bench (never set by the project)."""

IMPLEMENTATION_OURS = "ambient"
IMPLEMENTATION_UPSTREAM = "istio/ztunnel"

ZTUNNEL_SERVICE_ACCOUNT = "ztunnel"
ZTUNNEL_NAMESPACE = "istio-system"


def check_ztunnel_bin(path: str | Path) -> str:
    """The absolute path of an executable file at `path`.

    Raises:
        PrerequisiteError: no such file, or not executable.
    """
    binary = Path(path).expanduser()
    if not binary.is_file():
        raise PrerequisiteError(
            f"--ztunnel-bin {path}: no such file; give the path of a ztunnel built from istio/ztunnel "
            "(cargo build --release leaves it in out/rust/release/ztunnel)"
        )
    if not os.access(binary, os.X_OK):
        raise PrerequisiteError(f"--ztunnel-bin {path}: not an executable file")
    return str(binary.resolve())


def choose_nodes(plan: LabPlan, on: Sequence[str] | None) -> frozenset[str]:
    """The nodes that run upstream's ztunnel: `on`, or every node when `on` is empty.

    Raises:
        PrerequisiteError: a name that is no node of the lab.
    """
    names = [n.name for n in plan.nodes]
    if not on:
        return frozenset(names)
    unknown = [n for n in on if n not in names]
    if unknown:
        raise PrerequisiteError(f"--on {unknown[0]}: the lab has no such node; nodes: {', '.join(names)}")
    return frozenset(on)


def upstream_env(
    plan: LabPlan, node: NodePlan, *, zds_socket: str, root_cert: str, token: str, istiod: str | None = None
) -> dict[str, str]:
    """Upstream ztunnel's settings for `node` (see the module docstring)."""
    address = f"https://{istiod or plan.istiod_address}"
    return {
        "NODE_NAME": node.name,
        "INSTANCE_IP": node.ip,
        "POD_NAME": f"ztunnel-{node.name}",
        "POD_NAMESPACE": ZTUNNEL_NAMESPACE,
        "SERVICE_ACCOUNT": ZTUNNEL_SERVICE_ACCOUNT,
        "INPOD_UDS": zds_socket,
        "XDS_ADDRESS": address,
        "CA_ADDRESS": address,
        "XDS_ROOT_CA": root_cert,
        "CA_ROOT_CA": root_cert,
        "AUTH_TOKEN": token,
        "CLUSTER_ID": "Kubernetes",
        "IPV6_ENABLED": "false",
    }


def held_from_workload_state(dump: Mapping[str, Any]) -> dict[str, int]:
    """uid -> 0 for each pod whose proxies are `Up` in a /config_dump's `workloadState` (upstream's schema:
    no generations, so a replaced proxy set is not seen here)."""
    state = dump.get("workloadState")
    if not isinstance(state, dict):
        return {}
    return {str(uid): 0 for uid, entry in state.items()
            if isinstance(entry, dict) and entry.get("state") == "Up"}  # fmt: skip


def implementations(specs: Iterable[ComponentSpec]) -> dict[str, str]:
    """node -> the ztunnel implementation running there."""
    return {s.node: s.implementation for s in specs if s.component == "ztunnel" and s.node}
