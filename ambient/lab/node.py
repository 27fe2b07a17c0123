"""`python -m ambient.lab.node`: one node of the mesh in a container (docker-compose.yml's node-a, node-b).

    python -m ambient.lab.node --world /etc/ambient/world.yaml --node node-a --istiod istiod:15012 \\
        --peer node-b=172.30.0.12 --instance-ip 172.30.0.11

Theory of operation
-------------------
The container's own network namespace is the node (in the netns lab it is `<prefix>-node-a`). The runner
does what the lab's `up` does for one node, with the same plan and the same component specs:

    1. bridge cbr0 with the node's gateway address, VIP DNAT, routes to the other nodes' pod ranges via
       their container addresses (--peer), ip_forward=1
    2. wait for istiod's root certificate on the shared volume (services retry instead of gating on a
       health check, which podman-compose ignores), then start the node agent and ztunnel and wait until
       both are ready
    3. each pod of this node: netns, resolv.conf, veth into cbr0, CNI ADD to the node agent, then its app
       (the containers have no cluster DNS: a meshed pod's service names are answered by its ztunnel).
       A waypoint's pod gets its netns but no waypoint process: from a pod's netns the control plane's
       container is not reachable (its replies have no route back to the pod range), so container nodes run
       no waypoints yet, and a world whose services use one fails closed there
    4. print "node <name> ready" and wait for SIGTERM/SIGINT; then stop every process by PID and delete
       the pod namespaces

Logs go to <state-dir>/logs/ (ztunnel's access log: logs/ztunnel_<node>.log).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ambient.lab import components
from ambient.lab.components import LabPaths
from ambient.lab.errors import ComponentError, PlanError
from ambient.lab.lab import cni_add
from ambient.lab.state import ProcessRecord, stop_process
from ambient.lab.topology import (
    ETC_NETNS,
    WAYPOINT_PROGRAM,
    as_container_node,
    container_node_steps,
    create_netns,
    delete_netns,
    plan_lab,
    remove_tree,
    run_step,
    wire_pod,
    write_resolv_conf,
)
from services.istiod.world import load_world
from shared.errors import AmbientError

POD_PREFIX = "pod"


def _peers(items: Sequence[str]) -> dict[str, str]:
    peers = {}
    for item in items:
        name, sep, ip = item.partition("=")
        if not sep or not name or not ip:
            raise PlanError("--peer", "$", f"{item!r} is not NODE=IP")
        peers[name] = ip
    return peers


def log(message: str) -> None:
    print(message, flush=True)


def wait_for_file(path: Path, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        if time.monotonic() > deadline:
            raise ComponentError(f"{what} did not appear at {path} within {timeout:g} s; is istiod up?")
        time.sleep(0.5)


def run_node(args: argparse.Namespace) -> int:
    world = load_world(Path(args.world).read_bytes(), args.world)
    plan = as_container_node(plan_lab(world, prefix=POD_PREFIX, source=args.world), args.node)
    node = plan.node(args.node)
    paths = LabPaths(args.state_dir)
    processes: list[ProcessRecord] = []
    made: list[str] = []
    try:
        for step in container_node_steps(plan, node.name, _peers(args.peer)):
            run_step(step)
        Path("/proc/sys/net/ipv4/ip_forward").write_text("1\n")
        log(f"node {node.name}: bridge {node.bridge} {node.gateway}, routes to {len(plan.nodes) - 1} peers")

        wait_for_file(paths.root_cert, args.timeout, "istiod's root certificate")
        components.write_node_secrets(paths, node.name, args.token)
        specs = [
            components.node_agent_spec(plan, node, paths, istiod=args.istiod, netns=""),
            components.ztunnel_spec(plan, node, paths, with_agent=True, istiod=args.istiod, netns="",
                                    instance_ip=args.instance_ip),
        ]  # fmt: skip
        for spec in specs:
            processes.append(components.start(spec))
        for record in processes:
            components.wait_ready(record, timeout=args.timeout)
            log(f"node {node.name}: {record.name} ready (pid {record.pid}, log {record.spec.log})")

        for pod in (p for p in plan.pods if p.node == node.name):
            made.append(pod.netns)
            create_netns(pod.netns)
            write_resolv_conf(pod.netns, pod.resolv_conf)
            wire_pod(plan, pod)
            status = cni_add(paths, pod, timeout=args.timeout) if pod.ambient else "not-ambient"
            if pod.app.kind == WAYPOINT_PROGRAM:
                log(f"node {node.name}: pod {pod.key} {pod.ip}: a waypoint's pod; container nodes run "
                    "no waypoint yet (a pod cannot reach the control plane): traffic for it fails closed")
                continue
            pod_proc = components.pod_spec(plan, pod, paths, istiod=args.istiod)
            if pod_proc is None:
                log(f"node {node.name}: pod {pod.key} {pod.ip}: the {pod.app.kind} program is not installed; "
                    "nothing runs in it (traffic sent to it fails closed)")
                continue
            app = components.start(pod_proc)
            processes.append(app)
            components.wait_ready(app, timeout=args.timeout)
            log(f"node {node.name}: pod {pod.key} {pod.ip} ({pod.app.kind}) netns {pod.netns}: {status}")
        log(f"node {node.name} ready")

        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        received = signal.sigwait({signal.SIGTERM, signal.SIGINT})
        log(f"node {node.name}: {signal.Signals(received).name}, stopping")
        return 0
    finally:
        for record in reversed(processes):
            stop_process(record, grace=3.0)
        for name in reversed(made):
            with contextlib.suppress(AmbientError):
                delete_netns(name)
            remove_tree(ETC_NETNS / name)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m ambient.lab.node", description="one mesh node in a container"
    )
    p.add_argument("--world", default=os.environ.get("WORLD", "/etc/ambient/world.yaml"))
    p.add_argument("--node", default=os.environ.get("NODE_NAME"), required="NODE_NAME" not in os.environ)
    p.add_argument("--istiod", default=os.environ.get("ISTIOD", "istiod:15012"), help="HOST:PORT")
    p.add_argument("--peer", action="append", default=[], metavar="NODE=IP", help="another node's address")
    p.add_argument("--instance-ip", default=os.environ.get("INSTANCE_IP"), help="this node's address")
    p.add_argument("--token", default=os.environ.get("NODE_TOKEN", ""), help="this node's istiod token")
    p.add_argument("--state-dir", default=os.environ.get("STATE_DIR", "/var/lib/ambient"))
    p.add_argument("--timeout", type=float, default=120.0)
    args = p.parse_args(argv)
    try:
        return run_node(args)
    except AmbientError as exc:
        print(f"node {args.node}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
