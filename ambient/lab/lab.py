"""Bring a lab up and down, look at it, run commands in its pods, restart its components.

Theory of operation
-------------------
`up` is kubelet + CNI + a process supervisor for one host:

    1. load and plan the world (a PlanError leaves nothing behind), refuse a prefix that is in use
    2. record, then create, the fabric, control-plane and node namespaces; wire them
    3. start istiod and the cluster DNS (dnsmasq, cluster_dns.py) in the control-plane netns; per node the
       node agent, then ztunnel; wait until ready
    4. per pod: netns + resolv.conf, veth into the node's bridge, address, route; CNI ADD to the node agent
       (ambient pods only, as the istio-cni plugin decides); only then start the pod's app
    5. wait until every ambient pod is enrolled (CNI answered "enabled", or ztunnel holds it)

Every namespace, file and process is written to the state file before it is made, so `down` (and `up`'s own
clean-up when any step fails or is interrupted) removes exactly what exists: processes by recorded PID,
then namespaces, then files, then the run directory.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import msgspec

from ambient.lab import cluster_dns, components, kube
from ambient.lab.components import LabPaths
from ambient.lab.errors import (
    AlreadyUpError,
    ComponentError,
    EnrolmentError,
    LabError,
    NotUpError,
    PrerequisiteError,
    UnknownPodError,
)
from ambient.lab.kubeapi import KubeRequestError, LabKubeApi
from ambient.lab.kubelet import load_record
from ambient.lab.probe import http_get, http_request, unix_http
from ambient.lab.state import (
    ComponentSpec,
    LabState,
    PodRecord,
    ProcessRecord,
    is_running,
    load_state,
    run_dir,
    save_state,
    stop_process,
)
from ambient.lab.topology import (
    ETC_NETNS,
    LabPlan,
    PodPlan,
    apply_plan,
    check_prefix,
    create_pod_netns,
    delete_netns,
    netns_exists,
    plan_lab,
    remove_tree,
    rescale_notes,
    rescale_world,
    wire_pod,
)
from ambient.lab.upstream import (
    IMPLEMENTATION_OURS,
    check_ztunnel_bin,
    choose_nodes,
    held_from_workload_state,
)
from services.istiod.world import REDIRECTION_ANNOTATION, World, load_world, world_to_json
from shared.netns import NetnsError

DEFAULT_PREFIX = "amb"
DEFAULT_WORLD = Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml"
REQUIRED_BINARIES = ("ip", "iptables-restore", "sysctl", "dnsmasq")
STOP_ORDER = {"kubelet": 0, "app": 0, "waypoint": 0, "ztunnel": 1, "node-agent": 2, "istiod": 3,
              "cluster-dns": 4, "kube-apiserver": 5, "etcd": 6}

Progress = Callable[[str], None]


def _quiet(_: str) -> None:
    pass


def check_prerequisites() -> None:
    """Root and the binaries the lab runs. Raises PrerequisiteError saying what is missing."""
    if os.geteuid() != 0:
        raise PrerequisiteError(
            "the lab needs root (CAP_NET_ADMIN and CAP_SYS_ADMIN) to create network namespaces; "
            "run it with sudo"
        )
    path = os.environ.get("PATH", "") + os.pathsep + "/usr/sbin:/sbin"
    for binary in REQUIRED_BINARIES:
        if shutil.which(binary, path=path) is None:
            raise PrerequisiteError(
                f"the lab needs the `{binary}` command; "
                "install it with: apt-get install iproute2 iptables procps dnsmasq-base"
            )


BRIDGE_NETFILTER = Path("/proc/sys/net/bridge")


def check_bridge_netfilter() -> None:
    """The br_netfilter module, loaded: a reply between two pods of one node's bridge must pass iptables to
    be un-DNATed once only hairpin traffic is masqueraded (kube-proxy needs it too).

    Raises:
        PrerequisiteError: the module is not loaded.
    """
    if not BRIDGE_NETFILTER.is_dir():
        raise PrerequisiteError(
            "the lab needs the br_netfilter kernel module (bridged pod traffic through iptables, as "
            "kube-proxy needs it); load it with: modprobe br_netfilter"
        )


def load_lab_world(
    world_file: Path | None, nodes: int | None, *, progress: Progress = _quiet
) -> tuple[World, str]:
    """The world file (default examples/bookinfo.yaml), laid out over `nodes` nodes when given; what that
    re-addressing changed goes to `progress`."""
    path = world_file or DEFAULT_WORLD
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PrerequisiteError(f"cannot read the world file {path}: {exc.strerror}") from None
    world = load_world(data, str(path))
    if nodes is not None:
        rescaled = rescale_world(world, nodes)
        for note in rescale_notes(world, rescaled):
            progress(f"--nodes {nodes}: {note}")
        world = rescaled
    return world, str(path)


def plan_of(state: LabState) -> LabPlan:
    return msgspec.json.decode(state.plan, type=LabPlan)


def require_state(prefix: str, root: Path | None = None) -> LabState:
    state = load_state(prefix, root)
    if state is None:
        raise NotUpError(
            f"no lab {prefix!r} is up (no state file {run_dir(prefix, root) / 'state.json'}); "
            f"start one with `ambient lab up --prefix {prefix}`"
        )
    return state


# --- up --------------------------------------------------------------------------------------------------


class LabBuilder:
    """One `up`: the state it records as it goes, and the steps."""

    def __init__(
        self,
        plan: LabPlan,
        world: World,
        source: str,
        *,
        root: Path | None,
        timeout: float,
        progress: Progress,
        ztunnel_bin: str | None = None,
        upstream_nodes: frozenset[str] = frozenset(),
        kube_bin_dir: Path | None = None,
        crd_files: Sequence[Path] = (),
    ) -> None:
        self.plan = plan
        self.kube_bin_dir = kube_bin_dir
        self.crd_files = list(crd_files)
        self.api: LabKubeApi | None = None
        self.ztunnel_bin = ztunnel_bin
        self.upstream_nodes = upstream_nodes
        self.world = world
        self.timeout = timeout
        self.progress = progress
        self.paths = LabPaths(run_dir(plan.prefix, root))
        self.state = LabState(
            prefix=plan.prefix,
            run_dir=str(self.paths.run_dir),
            world_file=source,
            plan=msgspec.json.encode(plan),
            kube_bin_dir=str(kube_bin_dir) if kube_bin_dir else None,
        )
        self.has_agent = components.available("node-agent")
        self.has_ztunnel = components.available("ztunnel")

    def record_netns(self, name: str) -> None:
        self.state.netns.append(name)
        save_state(self.state)

    def record_file(self, path: str) -> None:
        self.state.files.append(path)
        save_state(self.state)

    def launch(self, spec: ComponentSpec) -> ProcessRecord:
        record = components.start(spec)
        self.state.processes = [p for p in self.state.processes if p.name != spec.name] + [record]
        save_state(self.state)
        return record

    def run(self) -> LabState:
        plan, paths = self.plan, self.paths
        paths.run_dir.mkdir(parents=True, exist_ok=False)
        save_state(self.state)
        paths.world.write_bytes(world_to_json(self.world))
        self.progress(
            f"building {len(plan.nodes)} nodes on a fabric ({plan.fabric.cidr}) "
            f"and the control plane ({plan.control_plane.ip})"
        )
        apply_plan(plan, on_netns=self.record_netns, on_file=self.record_file, pods=[])
        if self.kube_bin_dir is not None:
            self.start_kubernetes(self.kube_bin_dir)
            plan = self.plan

        node_tokens = {n.name: secrets.token_urlsafe(18) for n in plan.nodes}
        istiod = self.launch(components.istiod_spec(plan, paths, node_tokens, secrets.token_urlsafe(18),
                                                    kubernetes=self.kubernetes))  # fmt: skip
        self.progress(f"istiod starting in {plan.control_plane.netns} (log {istiod.spec.log})")
        components.wait_ready(istiod, timeout=self.timeout)
        self.progress(f"istiod ready on {plan.istiod_address}")
        cluster_dns.write_hosts(paths.cluster_dns_hosts, self.world)
        dns = self.launch(components.cluster_dns_spec(plan, paths))
        components.wait_ready(dns, timeout=self.timeout)
        self.progress(f"cluster DNS ready on {cluster_dns.KUBE_DNS_VIP} (dnsmasq, no upstream; queries "
                      f"logged to {paths.cluster_dns_queries})")

        started: list[ProcessRecord] = []
        for node in plan.nodes:
            components.write_node_secrets(paths, node.name, node_tokens[node.name])
            (paths.node_host(node.name) / "run" / "netns").mkdir(parents=True, exist_ok=True)
            if self.has_agent:
                started.append(self.launch(components.node_agent_spec(plan, node, paths,
                                                                      kubernetes=self.kubernetes)))
            if self.has_ztunnel:
                binary = self.ztunnel_bin if node.name in self.upstream_nodes else None
                started.append(self.launch(components.ztunnel_spec(
                    plan, node, paths, with_agent=self.has_agent, ztunnel_bin=binary)))  # fmt: skip
        for record in started:
            components.wait_ready(record, timeout=self.timeout)
            impl = record.spec.implementation
            whose = "" if impl == IMPLEMENTATION_OURS else f", {impl}"
            self.progress(f"{record.name} ready (pid {record.pid}{whose})")
        if not self.has_agent:
            self.progress("node-agent is not installed yet: pods are created without enrolment")
        if not self.has_ztunnel:
            self.progress("ztunnel is not installed yet: no proxies run")

        for pod in plan.pods:
            self.add_pod(pod)
        if self.kubernetes:  # pods made later, and every deletion, are the lab kubelet's
            self.launch(kube.kubelet_spec(paths))
            self.progress(f"kubelet running (pods applied later get a netns; log {paths.log('kubelet')})")
        self.wait_enrolled()
        self.state.phase = "up"
        save_state(self.state)
        return self.state

    @property
    def kubernetes(self) -> bool:
        return self.kube_bin_dir is not None

    def start_kubernetes(self, bin_dir: Path) -> None:
        """etcd and kube-apiserver in the control-plane netns, the CRDs, the world as objects; the plan
        takes the pod uids the API server chose."""
        kube.write_pki(self.plan, self.paths)
        for spec in (kube.etcd_spec(self.plan, self.paths, bin_dir),
                     kube.apiserver_spec(self.plan, self.paths, bin_dir)):  # fmt: skip
            components.wait_ready(self.launch(spec), timeout=self.timeout)
        api = kube.lab_api(self.plan, self.paths)
        kube.wait_api_ready(api, self.paths, max(self.timeout, 60.0))
        self.api = api
        self.progress(f"kube-apiserver ready on {kube.server_url(self.plan)} in "
                      f"{self.plan.control_plane.netns} (kubeconfig {self.paths.kubeconfig})")
        crds = kube.install_crds(api, self.crd_files, timeout=self.timeout)
        uids = kube.load_world(api, self.world)
        self.plan = msgspec.structs.replace(
            self.plan, pods=[msgspec.structs.replace(p, uid=uids[p.key]) for p in self.plan.pods])
        self.state.plan = msgspec.json.encode(self.plan)
        save_state(self.state)
        self.progress(f"the world is in the API server: CRDs {', '.join(crds)}, {len(uids)} pods")

    def add_pod(self, pod: PodPlan) -> None:
        create_pod_netns(pod, on_netns=self.record_netns, on_file=self.record_file)
        # every pod, meshed or not: a label change may enrol it later, and the agent then finds it by IP
        components.link_pod_netns(self.paths, pod.node, pod.netns)
        wire_pod(self.plan, pod)
        status = "not-ambient"
        if self.api is not None:  # as a kubelet: the node agent's pod source takes it from the status
            host_ip = self.plan.node(pod.node).ip
            self.api.patch_status(pod.namespace, pod.name, kube.running_status(pod.ip, host_ip))
            status = ("pending" if self.has_agent else "no-node-agent") if pod.ambient else "created"
        elif pod.ambient:
            status = cni_add(self.paths, pod, timeout=self.timeout) if self.has_agent else "no-node-agent"
        self.state.pods.append(
            PodRecord(
                key=pod.key, node=pod.node, netns=pod.netns, ip=pod.ip, ambient=pod.ambient, status=status
            )
        )
        save_state(self.state)
        spec = components.pod_spec(self.plan, pod, self.paths)
        if spec is None:
            self.progress(f"pod {pod.key} on {pod.node}: {pod.ip}, {pod.app.kind}, but the {pod.app.kind} "
                          "program is not installed yet: traffic sent to it fails closed")
            return
        app = self.launch(spec)
        components.wait_ready(app, timeout=self.timeout)
        self.progress(f"pod {pod.key} on {pod.node}: {pod.ip}, {pod.app.kind}, {status}")

    def wait_enrolled(self) -> None:
        pending = [p for p in self.state.pods if p.status == "pending"]
        if not pending:
            return
        self.progress(f"waiting for ztunnel to take {len(pending)} pending pods")
        uid_of = {p.key: p.uid for p in self.plan.pods}
        deadline = time.monotonic() + self.timeout
        while True:
            held = {node: ztunnel_pods(self.plan, node) for node in {r.node for r in pending}}
            taken = [r for r in pending if uid_of[r.key] in held[r.node]]
            for record in taken:
                record.status = "enabled"
                pending.remove(record)
            if taken:
                save_state(self.state)
            if not pending:
                return
            if time.monotonic() > deadline:
                first = pending[0]
                raise EnrolmentError(
                    f"pod {first.key} is still pending after {self.timeout:g} s: ztunnel on {first.node} has "
                    f"not taken it; see {self.paths.log(f'ztunnel/{first.node}')} and "
                    f"{self.paths.log(f'node-agent/{first.node}')}"
                )
            time.sleep(0.2)


def cni_add(paths: LabPaths, pod: PodPlan, *, timeout: float) -> str:
    """POST /cmdadd to the node agent of the pod's node, as the istio-cni plugin does; the answer's status.

    Raises:
        EnrolmentError: the node agent is unreachable or refused the pod (the message names its log).
    """
    body = {
        "Netns": f"/run/netns/{pod.netns}",
        "PodName": pod.name,
        "PodNamespace": pod.namespace,
        "PodUID": pod.uid,
        "ServiceAccount": pod.service_account,
        "Labels": pod.labels,
        "Annotations": pod.annotations,
        "IPs": [{"Interface": "eth0", "Address": pod.address, "Gateway": pod.gateway}],
    }
    # the node agent sees /run/netns through its node's HOST_PREFIX, which lists this node's pods only
    components.link_pod_netns(paths, pod.node, pod.netns)
    sock = str(paths.cni_socket(pod.node))
    log = paths.log(f"node-agent/{pod.node}")
    try:
        status, answer = unix_http(sock, "POST", "/cmdadd", json.dumps(body).encode(), timeout=timeout)
    except OSError as exc:
        raise EnrolmentError(
            f"CNI ADD of {pod.key} to the node agent of {pod.node} ({sock}) failed: {exc}; see its log {log}"
        ) from None
    text = answer.decode(errors="replace").strip()
    if status != 200:
        raise EnrolmentError(
            f"the node agent of {pod.node} refused {pod.key} (HTTP {status}: {text}); see its log {log}"
        )
    try:
        return str(json.loads(text).get("status", "unknown"))
    except (ValueError, AttributeError):
        return "unknown"


def ztunnel_dump(plan: LabPlan, node: str) -> dict[str, Any] | None:
    """ztunnel's /config_dump on `node` (asked from inside the node netns), None when it does not answer."""
    try:
        status, body = http_get(
            plan.node(node).netns, "127.0.0.1", components.ZTUNNEL_ADMIN_PORT, "/config_dump", timeout=2.0
        )
        if status != 200:
            return None
        dump = json.loads(body)
    except (OSError, NetnsError, ValueError, http.client.HTTPException):
        return None
    return dump if isinstance(dump, dict) else None


def ztunnel_pods(plan: LabPlan, node: str) -> set[str]:
    """UIDs of the pods ztunnel on `node` holds and serves, empty when it does not answer."""
    dump = ztunnel_dump(plan, node) or {}
    if "pods" not in dump:  # upstream's ztunnel: only its workloadState
        return set(held_from_workload_state(dump))
    try:
        return {str(p["uid"]) for p in dump.get("pods", []) if p.get("state", "up") == "up"}
    except (KeyError, TypeError, AttributeError):
        return set()


def zds_connections(plan: LabPlan, node: str) -> int:
    """How many ZDS connections ztunnel on `node` has made so far (-1: unknown)."""
    zds = (ztunnel_dump(plan, node) or {}).get("zds")
    value = zds.get("connections", -1) if isinstance(zds, dict) else -1
    return value if isinstance(value, int) else -1


def wait_zds_resync(plan: LabPlan, node: str, after: int, *, timeout: float, log: str) -> None:
    """After a node agent restart: wait until ztunnel has reconnected (more than `after` connections) and
    applied the new agent's snapshot, so a later check of its pods sees the reconciled set."""
    deadline = time.monotonic() + timeout
    while True:
        zds = (ztunnel_dump(plan, node) or {}).get("zds")
        if isinstance(zds, dict) and zds.get("connections", 0) > after and zds.get("ready"):
            return
        if time.monotonic() > deadline:
            raise EnrolmentError(
                f"ztunnel on {node} has not resynced with the restarted node agent after {timeout:g} s; "
                f"see {log}"
            )
        time.sleep(0.1)


def up(
    *,
    prefix: str = DEFAULT_PREFIX,
    world_file: Path | None = None,
    nodes: int | None = None,
    root: Path | None = None,
    timeout: float = 30.0,
    progress: Progress = _quiet,
    ztunnel_bin: str | Path | None = None,
    upstream_on: Sequence[str] | None = None,
    kubernetes: bool = False,
    crd_dir: Path | None = None,
) -> LabState:
    """Build and start a lab. On any failure (or Ctrl-C) everything made so far is removed again.

    With `ztunnel_bin` (a build of istio/ztunnel) the nodes in `upstream_on` (all when empty) run it in place
    of our ztunnel (ambient/lab/upstream.py). With `kubernetes` the lab runs a Kubernetes API server and
    takes its pods from there (kube.py); `crd_dir` has the CRDs it installs (default deploy/kubernetes/crds).

    Raises:
        PrerequisiteError, PlanError, AlreadyUpError, CommandError, ComponentError, EnrolmentError.
    """
    check_prefix(prefix)
    check_prerequisites()
    check_bridge_netfilter()
    world, source = load_lab_world(world_file, nodes, progress=progress)
    plan = plan_lab(world, prefix=prefix, source=source)
    binary = check_ztunnel_bin(ztunnel_bin) if ztunnel_bin is not None else None
    if upstream_on and binary is None:
        raise PrerequisiteError("--on chooses the nodes for --ztunnel-bin; give --ztunnel-bin PATH too")
    upstream_nodes = choose_nodes(plan, upstream_on) if binary is not None else frozenset()
    kube_bin = kube.kube_binaries() if kubernetes else None
    crds = kube.crd_files(crd_dir) if kubernetes else []
    existing = load_state(prefix, root)
    if existing is not None or run_dir(prefix, root).exists():
        raise AlreadyUpError(
            f"a lab {prefix!r} is already up ({run_dir(prefix, root)}); "
            f"run `ambient lab down --prefix {prefix}` first, or choose another --prefix"
        )
    clash = [n for n in plan.all_netns() if netns_exists(n)]
    if clash:
        raise AlreadyUpError(
            f"network namespace {clash[0]} exists already (not made by this lab's state); "
            f"choose another --prefix or remove it with `ip netns del {clash[0]}`"
        )
    builder = LabBuilder(plan, world, source, root=root, timeout=timeout, progress=progress,
                         ztunnel_bin=binary, upstream_nodes=upstream_nodes, kube_bin_dir=kube_bin,
                         crd_files=crds)  # fmt: skip
    try:
        return builder.run()
    except BaseException:
        builder.state.phase = "failed"
        if builder.paths.run_dir.exists():
            save_state(builder.state)
        progress("lab up failed: removing what was made")
        teardown(builder.state, progress=_quiet)
        raise


# --- down ------------------------------------------------------------------------------------------------


def teardown(state: LabState, *, progress: Progress = _quiet) -> None:
    """Stop the recorded processes, delete the recorded namespaces and files, remove the run directory."""
    for record in sorted(state.processes, key=lambda r: STOP_ORDER.get(r.spec.component, 9)):
        stop_process(record, grace=3.0 if record.spec.component == "ztunnel" else 2.0)
    errors = []
    kubelet_made = [p.netns for p in load_record(LabPaths(state.run_dir)).pods if not p.from_plan]
    for name in [*reversed(state.netns), *kubelet_made]:
        try:
            delete_netns(name)
        except Exception as exc:
            errors.append(str(exc))
    for name in kubelet_made:
        remove_tree(ETC_NETNS / name)
    for path in sorted(state.files, key=lambda f: Path(f) == ETC_NETNS):  # /etc/netns last
        remove_tree(path)
    remove_tree(state.run_dir)
    with contextlib.suppress(OSError):
        Path(state.run_dir).parent.rmdir()  # /run/ambient-lab, when no other lab is up
    progress(
        f"removed {len(state.processes)} processes, {len(state.netns)} namespaces, {len(state.files)} files"
    )
    if errors:
        raise ComponentError("some namespaces could not be removed: " + "; ".join(errors))


def down(*, prefix: str = DEFAULT_PREFIX, root: Path | None = None, progress: Progress = _quiet) -> bool:
    """Remove lab `prefix`; False when there was none."""
    check_prefix(prefix)
    check_prerequisites()
    state = load_state(prefix, root)
    if state is None:
        return False
    teardown(state, progress=progress)
    return True


# --- status, exec, restart, logs -------------------------------------------------------------------------


def redirection_annotations(state: LabState) -> dict[str, str] | None:
    """Pod key -> its `ambient.istio.io/redirection` annotation ("" when it has none), as the lab's istiod has
    it (`ambient world show`; the node agents write it), or in a Kubernetes lab as the API server has it;
    None when that does not answer."""
    if state.kube_bin_dir:
        try:
            return kube.redirections(kube.lab_api(plan_of(state), LabPaths(state.run_dir)))
        except KubeRequestError:
            return None
    result = run_world_command(state, ["--timeout", "5", "show"], capture=True)
    if result.returncode != 0:
        return None
    try:
        return {
            f"{p['namespace']}/{p['name']}": str((p.get("annotations") or {}).get(REDIRECTION_ANNOTATION, ""))
            for p in json.loads(result.stdout)["pods"]
        }
    except (ValueError, KeyError, TypeError, AttributeError):
        return None


def status(*, prefix: str = DEFAULT_PREFIX, root: Path | None = None) -> dict[str, Any]:
    """What `lab status --json` prints: nodes, pods (IP, node, enrolment), services, components.

    A pod's enrolment is its `ambient.istio.io/redirection` annotation in the control plane (`redirection`);
    a pod without it is not enrolled, and the lab's own record says why (not-ambient, no-node-agent, deleted,
    ...). When istiod does not answer (`control_plane.answered` false), the lab infers enrolment from its
    records and what each ztunnel holds.

    In a Kubernetes lab (`up --kubernetes`) the annotation is read from the API server, pods the lab's
    kubelet ran later are listed too (program `none`), and pods it removed are `deleted`.
    """
    check_prerequisites()
    state = require_state(prefix, root)
    plan = plan_of(state)
    held = {n.name: ztunnel_pods(plan, n.name) for n in plan.nodes} if state.phase == "up" else {}
    annotations = redirection_annotations(state) if state.phase == "up" else None
    kubelet = load_record(LabPaths(state.run_dir)).pods
    removed = {p.uid for p in kubelet if p.state == "deleted"}
    pods = []
    for pod in plan.pods:
        record = state.pod(pod.key)
        enrolment = record.status if record else "not created"
        if pod.uid in removed:
            enrolment = "deleted"
        elif record and (pod.ambient or state.kube_bin_dir) and held.get(pod.node):
            enrolment = "enabled" if pod.uid in held[pod.node] else enrolment
        redirection = annotations.get(pod.key) if annotations is not None else None
        if redirection:
            enrolment = redirection
        elif redirection is not None and enrolment in ("enabled", "pending"):
            enrolment = "not enrolled"  # the control plane has no status for it
        pods.append(
            {
                "name": pod.name,
                "namespace": pod.namespace,
                "node": pod.node,
                "ip": pod.ip,
                "netns": pod.netns,
                # in a Kubernetes lab labels change after up: ambient is then what the node agent did
                "ambient": enrolment in ("enabled", "pending") if state.kube_bin_dir else pod.ambient,
                "enrolment": enrolment,
                "redirection": redirection or None,
                "app": pod.labels.get("app", ""),
                "program": pod.app.kind,
                "uid": pod.uid,
            }
        )
    for extra in (p for p in kubelet if p.state == "running" and not p.from_plan):
        redirection = (annotations or {}).get(extra.key) or None
        namespace, name = extra.key.split("/", 1)
        taken = extra.uid in held.get(extra.node, set())
        pods.append({
            "name": name, "namespace": namespace, "node": extra.node,
            "ip": extra.ip, "netns": extra.netns, "ambient": redirection is not None,
            "enrolment": redirection or ("enabled" if taken else "created"),
            "redirection": redirection, "app": "", "program": "none", "uid": extra.uid,
        })  # fmt: skip
    return {
        "prefix": state.prefix,
        "phase": state.phase,
        "run_dir": state.run_dir,
        "world": state.world_file,
        "control_plane": {
            "netns": plan.control_plane.netns,
            "istiod": plan.istiod_address,
            "answered": annotations is not None,
            **(kube.status_fields(plan, LabPaths(state.run_dir)) if state.kube_bin_dir else {}),
        },
        "nodes": [
            {"name": n.name, "netns": n.netns, "address": n.ip, "pod_cidr": n.pod_cidr} for n in plan.nodes
        ],
        "pods": pods,
        "services": [
            {
                "name": s.name,
                "namespace": s.namespace,
                "vips": s.vips,
                "ports": s.ports,
                "endpoints": s.endpoints,
            }
            for s in plan.services
        ],
        "components": [
            {
                "name": r.name,
                "component": r.spec.component,
                "pid": r.pid,
                "running": is_running(r),
                "implementation": r.spec.implementation,
                "netns": r.spec.netns,
                "log": r.spec.log,
            }
            for r in state.processes
        ],
    }


def find_pod(plan: LabPlan, query: str, *, deleted: Collection[str] = ()) -> PodPlan:
    """A pod by `ns/name`, name, or a unique prefix of its name / its `app` label (`sleep`). Pods whose key
    is in `deleted` (`lab delete`) match nothing; asking for one says it was deleted."""

    def hits(pods: Iterable[PodPlan]) -> tuple[list[PodPlan], list[PodPlan]]:
        pods = list(pods)
        exact = [p for p in pods if query in (p.key, p.name)]
        return exact, [p for p in pods if p.name.startswith(query) or p.labels.get("app") == query]

    live = [p for p in plan.pods if p.key not in deleted]
    exact, matches = hits(live)
    if exact:
        return exact[0]
    if len(matches) == 1:
        return matches[0]
    names = ", ".join(p.key for p in (matches or live)) or "none"
    if not matches:
        gone_exact, gone = hits(p for p in plan.pods if p.key in deleted)
        if gone_exact or gone:
            raise UnknownPodError(
                f"pod {(gone_exact or gone)[0].key} was deleted (`ambient lab delete`); pods: {names}"
            )
    what = "more than one pod" if matches else "no pod"
    raise UnknownPodError(f"{what} matches {query!r}; pods: {names}")


def deleted_pods(state: LabState) -> set[str]:
    """Keys of the pods `lab delete` removed (or, in a Kubernetes lab, the lab's kubelet)."""
    removed = load_record(LabPaths(state.run_dir)).pods
    kubelet = {p.key for p in removed if p.from_plan and p.state == "deleted"}
    return {r.key for r in state.pods if r.status == "deleted"} | kubelet


COMMAND_NOT_FOUND = 127
"""The shell's exit code for a command that does not exist (`kubectl exec` passes it on too)."""
COMMAND_NOT_EXECUTABLE = 126


def exec_in_pod(
    argv: Sequence[str],
    *,
    pod: str,
    prefix: str = DEFAULT_PREFIX,
    root: Path | None = None,
    capture: bool = False,
) -> subprocess.CompletedProcess[bytes]:
    """Run `argv` inside a pod's netns with its resolv.conf (the cluster DNS), like `kubectl exec`."""
    check_prerequisites()
    state = require_state(prefix, root)
    target = find_pod(plan_of(state), pod, deleted=deleted_pods(state))
    if not netns_exists(target.netns):
        raise UnknownPodError(
            f"pod {target.key} has no network namespace {target.netns} any more; "
            f"`ambient lab status --prefix {prefix}` shows what runs"
        )
    spec = components.app_spec(target, LabPaths(state.run_dir))
    env = components.process_env(spec)
    problem = _command_problem(argv[0], env.get("PATH", os.defpath))
    if problem is not None:
        code, text = problem
        message = f"ambient lab exec: {text} (in pod {target.key})\n"
        if not capture:
            os.write(2, message.encode())
        return subprocess.CompletedProcess(list(argv), code, b"" if capture else None,
                                           message.encode() if capture else None)  # fmt: skip
    return subprocess.run(
        ["ip", "netns", "exec", target.netns, *argv],
        env=env,
        capture_output=capture,
        check=False,
    )


def _command_problem(command: str, path: str) -> tuple[int, str] | None:
    """(exit code, message) when `command` cannot be run, as a shell says it: 127 not found, 126 not
    executable; None when it can. (`ip netns exec` would answer 255 with its own wording.)"""
    if "/" in command:
        if not os.path.exists(command):
            return COMMAND_NOT_FOUND, f"{command}: no such file"
        if os.path.isdir(command) or not os.access(command, os.X_OK):
            return COMMAND_NOT_EXECUTABLE, f"{command}: not an executable file"
        return None
    if shutil.which(command, path=path) is None:
        return COMMAND_NOT_FOUND, f"{command}: command not found (PATH {path})"
    return None


def restart(
    component: str,
    node: str | None = None,
    *,
    prefix: str = DEFAULT_PREFIX,
    root: Path | None = None,
    timeout: float = 30.0,
    progress: Progress = _quiet,
) -> list[str]:
    """Stop and start one component (on one node, or every node); returns the restarted names."""
    check_prerequisites()
    state = require_state(prefix, root)
    chosen = [
        r for r in state.processes if r.spec.component == component and (node is None or r.spec.node == node)
    ]
    if not chosen:
        known = sorted({r.name for r in state.processes if r.spec.component != "app"})
        raise ComponentError(
            f"lab {prefix!r} runs no {component}{f' on {node}' if node else ''}; "
            f"components: {', '.join(known)}"
        )
    names = []
    plan = plan_of(state)
    before = {r.spec.node: zds_connections(plan, r.spec.node) for r in chosen
              if component == "node-agent" and r.spec.node}  # fmt: skip
    for record in chosen:
        stop_process(record)
        progress(f"{record.name} stopped (pid {record.pid})")
        fresh = components.start(record.spec)
        state.processes = [fresh if p.name == record.name else p for p in state.processes]
        save_state(state)
        components.wait_ready(fresh, timeout=timeout)
        if component == "kube-apiserver":  # accepting connections is not serving yet
            kube.wait_api_ready(kube.lab_api(plan, LabPaths(state.run_dir)), LabPaths(state.run_dir), timeout)
        progress(f"{fresh.name} ready again (pid {fresh.pid})")
        names.append(fresh.name)
    for node_name in sorted({r.spec.node for r in chosen if r.spec.node and component != "istiod"}):
        if before.get(node_name, -1) >= 0:
            log = str(LabPaths(state.run_dir).log(f"ztunnel/{node_name}"))
            wait_zds_resync(plan, node_name, before[node_name], timeout=timeout, log=log)
        wait_node_pods_held(state, node_name, timeout=timeout)
        progress(f"ztunnel on {node_name} holds its ambient pods again")
    return names


def _held_generations(plan: LabPlan, node: str) -> dict[str, int]:
    """uid -> ZDS generation of each pod ztunnel on `node` serves (a changed generation: proxies replaced)."""
    dump = ztunnel_dump(plan, node) or {}
    zds, pods = dump.get("zds"), dump.get("pods")
    if "pods" not in dump:  # upstream's ztunnel
        return held_from_workload_state(dump)
    if not isinstance(zds, dict) or not isinstance(pods, list):
        return {}
    workloads = zds.get("workloads") if isinstance(zds.get("workloads"), dict) else {}
    up = {str(p.get("uid")) for p in pods if isinstance(p, dict) and p.get("state", "up") == "up"}
    return {uid: int((workloads or {}).get(uid, {}).get("generation", 0)) for uid in up}


def wait_node_pods_held(state: LabState, node: str, *, timeout: float, settle: float = 1.0) -> None:
    """Wait until ztunnel on `node` serves every enrolled pod of the node again (after a restart), and has
    kept serving them unchanged for `settle` s (a restarted node agent may hand a pod over twice, and each
    hand-over replaces its listeners).

    Raises:
        EnrolmentError: naming the first pod still missing and the logs to read.
    """
    plan = plan_of(state)
    uids = {p.key: p.uid for p in plan.pods}
    expected = {
        r.key: uids[r.key]
        for r in state.pods
        if r.node == node and r.ambient and r.status in ("enabled", "pending")
    }
    if state.process(f"ztunnel/{node}") is None or not expected:
        return
    deadline = time.monotonic() + timeout
    stable_since: float | None = None
    last: dict[str, int] = {}
    while True:
        held = _held_generations(plan, node)
        missing = sorted(k for k, uid in expected.items() if uid not in held)
        now = time.monotonic()
        if missing or held != last:
            stable_since = None if missing else now
        elif stable_since is not None and now - stable_since >= settle:
            return
        last = held
        if now > deadline:
            paths = LabPaths(state.run_dir)
            what = f"taken {missing[0]} back" if missing else "settled (pods keep being replaced)"
            raise EnrolmentError(
                f"ztunnel on {node} has not {what} after {timeout:g} s; see "
                f"{paths.log(f'node-agent/{node}')} and {paths.log(f'ztunnel/{node}')}"
            )
        time.sleep(0.1)


_DIRECTION = re.compile(r'direction="?(inbound|outbound)"?')


def node_names(plan: LabPlan, node: str | None, prefix: str) -> list[str]:
    """`[node]` when it is one of the lab's nodes, every node's name when it is None."""
    nodes = [n.name for n in plan.nodes]
    if node is not None and node not in nodes:
        raise ComponentError(f"lab {prefix!r} has no node {node!r}; nodes: {', '.join(nodes)}")
    return [node] if node else nodes


def node_agent_request(plan: LabPlan, node: str, method: str, path: str, timeout: float = 60.0) -> bytes:
    """`method path` on the node agent's health server of `node` (from inside the node netns).

    Raises:
        ComponentError: it does not answer, or answers with an error.
    """
    port = components.NODE_AGENT_HEALTH_PORT
    try:
        status, body = http_request(plan.node(node).netns, "127.0.0.1", port, method, path, timeout=timeout)
    except (OSError, NetnsError, http.client.HTTPException) as exc:
        raise ComponentError(f"the node agent on {node} did not answer {method} {path}: {exc}") from None
    if status != 200:
        text = body.decode(errors="replace").strip()
        raise ComponentError(f"the node agent on {node} answered {method} {path} with {status}: {text}")
    return body


def verify(
    *, node: str | None = None, prefix: str = DEFAULT_PREFIX, root: Path | None = None
) -> list[dict[str, Any]]:
    """Have each node agent (or `node`'s) verify and repair its pods' redirection now (POST /verify): one
    entry per node, with its pods' checks, drift found, repairs done and result, or the error when its agent
    did not answer."""
    check_prerequisites()
    state = require_state(prefix, root)
    plan = plan_of(state)
    out: list[dict[str, Any]] = []
    for name in node_names(plan, node, prefix):
        try:
            answer = json.loads(node_agent_request(plan, name, "POST", "/verify"))
        except (ComponentError, ValueError) as exc:
            out.append({"node": name, "error": str(exc), "pods": []})
            continue
        out.append({"node": name, "error": None, "pods": answer.get("pods", [])})
    return out


def access_logs(
    *,
    node: str | None = None,
    direction: str | None = None,
    prefix: str = DEFAULT_PREFIX,
    root: Path | None = None,
) -> Iterator[str]:
    """The lab's ztunnel access-log lines, like `kubectl logs -l app=ztunnel | grep -E 'inbound|outbound'`."""
    check_prerequisites()
    state = require_state(prefix, root)
    for name in node_names(plan_of(state), node, prefix):
        path = LabPaths(state.run_dir).log(f"ztunnel/{name}")
        try:
            lines = path.read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            match = _DIRECTION.search(line)
            if match is None or ("\taccess\t" not in line and '"access"' not in line):
                continue
            if direction is None or match.group(1) == direction:
                yield line


def waypoint_logs(*, prefix: str = DEFAULT_PREFIX, root: Path | None = None) -> Iterator[str]:
    """The request lines (`request complete`) of every waypoint the lab runs, oldest first per waypoint."""
    state = require_state(prefix, root)
    for record in state.processes:
        if record.spec.component != "waypoint":
            continue
        try:
            lines = Path(record.spec.log).read_text(errors="replace").splitlines()
        except FileNotFoundError:
            continue
        yield from (line for line in lines if "request complete" in line)


def world_command(
    argv: Sequence[str], *, prefix: str = DEFAULT_PREFIX, root: Path | None = None, capture: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run `ambient world ARGV...` against the lab's istiod, from inside the control-plane netns.

    The lab's root certificate and admin token are passed from istiod's state directory; the call never
    leaves the lab's namespaces. After a change the cluster DNS is given the new world.
    """
    check_prerequisites()
    state = require_state(prefix, root)
    if state.kube_bin_dir and "show" not in argv:
        raise LabError(
            f"lab {prefix!r} takes its world from its Kubernetes API server: change it there with "
            f"`ambient lab kubectl --prefix {prefix} -- ...` (label, apply, delete)"
        )
    result = run_world_command(state, argv, capture=capture)
    if result.returncode == 0 and "show" not in argv:
        refresh_cluster_dns(state)
    return result


def kubectl_command(
    argv: Sequence[str], *, prefix: str = DEFAULT_PREFIX, root: Path | None = None, capture: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """Run kubectl ARGV against the API server of a `lab up --kubernetes` lab (kube.py)."""
    check_prerequisites()
    return kube.kubectl(require_state(prefix, root), argv, capture=capture)


def refresh_cluster_dns(state: LabState) -> bool:
    """Give the cluster DNS the world istiod holds now (dnsmasq re-reads its hosts directory by itself);
    False when istiod did not answer."""
    result = run_world_command(state, ["--timeout", "5", "show"], capture=True)
    if result.returncode != 0:
        return False
    world = load_world(result.stdout, "istiod's world")
    cluster_dns.write_hosts(LabPaths(state.run_dir).cluster_dns_hosts, world)
    return True


def run_world_command(
    state: LabState, argv: Sequence[str], *, capture: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """world_command for a lab whose state the caller has loaded (and whose prerequisites it checked)."""
    plan = plan_of(state)
    paths = LabPaths(state.run_dir)
    cmd = [
        components.PYTHON, "-c", "from ambient.cli import main; main()",
        "world", "--istiod", plan.istiod_address, "--state-dir", str(paths.istiod_state), *argv,
    ]  # fmt: skip
    return subprocess.run(
        ["ip", "netns", "exec", plan.control_plane.netns, *cmd],
        env=components.tool_env(),
        capture_output=capture,
        check=False,
    )


def delete_pod(
    pod: str,
    *,
    prefix: str = DEFAULT_PREFIX,
    root: Path | None = None,
    timeout: float = 30.0,
    progress: Progress = _quiet,
) -> str:
    """Delete a pod the way Kubernetes does: the control plane forgets it first (the node agent's pod watch
    unenrols it and ztunnel lets it go), then the kubelet stops its app and removes its sandbox.

    Returns the pod's key. Raises UnknownPodError, ComponentError (istiod refused), EnrolmentError (ztunnel
    still holds the pod after `timeout`).
    """
    check_prerequisites()
    state = require_state(prefix, root)
    plan = plan_of(state)
    target = find_pod(plan, pod, deleted=deleted_pods(state))
    record = state.pod(target.key)
    if record is None or record.status == "deleted":
        raise UnknownPodError(f"pod {target.key} is not running in lab {prefix!r}")
    if state.kube_bin_dir:  # the API server forgets it once the lab's kubelet has removed it (kubelet.py)
        argv = ["delete", "pod", target.name, "-n", target.namespace, f"--timeout={timeout:g}s"]
        done = kube.kubectl(state, argv, capture=True)
        if done.returncode != 0:
            raise ComponentError(f"kubectl {' '.join(argv)}: {done.stderr.decode().strip()}; see the lab "
                                 f"kubelet's log {LabPaths(state.run_dir).log('kubelet')}")  # fmt: skip
        progress(f"pod {target.key} deleted (app stopped, netns {target.netns} removed by the lab's kubelet)")
        return target.key
    result = run_world_command(state, ["pod", "rm", target.key], capture=True)
    if result.returncode != 0:
        raise ComponentError(f"istiod did not remove {target.key}: {result.stderr.decode().strip()}")
    refresh_cluster_dns(state)
    progress(f"istiod removed {target.key}; waiting for the node agent to unenrol it")
    if target.ambient and state.process(f"ztunnel/{target.node}") is not None:
        deadline = time.monotonic() + timeout
        while target.uid in ztunnel_pods(plan, target.node):
            if time.monotonic() > deadline:
                paths = LabPaths(state.run_dir)
                raise EnrolmentError(
                    f"ztunnel on {target.node} still holds {target.key} after {timeout:g} s; see "
                    f"{paths.log(f'node-agent/{target.node}')} and {paths.log(f'ztunnel/{target.node}')}"
                )
            time.sleep(0.2)
    for kind in ("app", "waypoint"):
        app = state.process(f"{kind}/{target.namespace}/{target.name}")
        if app is not None:
            stop_process(app)
            state.processes = [p for p in state.processes if p is not app]
    delete_netns(target.netns)
    remove_tree(ETC_NETNS / target.netns)
    remove_tree(LabPaths(state.run_dir).pod_netns_link(target.node, target.netns))
    record.status = "deleted"
    save_state(state)
    progress(f"pod {target.key} deleted (app stopped, netns {target.netns} removed)")
    return target.key
