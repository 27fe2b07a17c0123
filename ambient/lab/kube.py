"""`ambient lab up --kubernetes`: the lab's Kubernetes API server, its objects, and `lab kubectl`.

Theory of operation
-------------------
The API server is two more lab components in the control-plane namespace, started before istiod:

    etcd            127.0.0.1:2379 inside <prefix>-cp (only the API server beside it talks to it);
                    data in <run>/kube/etcd
    kube-apiserver  <control-plane address>:6443 (TLS, client certificates, RBAC); PKI in <run>/kube/pki,
                    a serving certificate also for the control-plane address, an admin kubeconfig at
                    <run>/kube/kubeconfig that the stub, the node agents and `lab kubectl` share

Then the world goes in as Kubernetes objects (services/istiod/kube_world.py's world_to_objects): the CRD
of security.istio.io/v1 AuthorizationPolicy (deploy/kubernetes/crds/), Namespaces, Nodes with their pod
range, Services, AuthorizationPolicies and Pods with `spec.nodeName`. The API server gives each pod its own
uid; `up` writes those into the lab's plan, so the lab, the node agents and ztunnel speak of the same pod.
The lab then plays kubelet: each pod gets its netns, veth and address as in a plain lab, then its status
(phase Running, podIP) is patched, which is what the node agent's pod source waits for. Pods made later
(`lab kubectl -- apply`) and deletions are the lab kubelet's work (kubelet.py), a component of its own.

`lab kubectl -- ARGS` runs the cached kubectl (scripts/build-kube) inside the control-plane namespace with
the lab's kubeconfig; the host namespace never routes to the lab.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import msgspec
import yaml

from ambient.kube.apiserver import Pki, apiserver_argv, binaries_dir, etcd_argv, kubeconfig_document
from ambient.kube.errors import KubeError
from ambient.lab.components import PYTHON, REPO_ROOT, LabPaths
from ambient.lab.errors import ComponentError, PrerequisiteError
from ambient.lab.kubeapi import MERGE_PATCH, KubeRequestError, KubeRequests, LabKubeApi
from ambient.lab.state import ComponentSpec, LabState, TcpCheck
from ambient.lab.topology import LabPlan
from services.istiod.kube_world import world_to_objects
from services.istiod.world import REDIRECTION_ANNOTATION, World

API_PORT = 6443
ETCD_PORT, ETCD_PEER_PORT = 2379, 2380
CRD_DIR = REPO_ROOT / "deploy" / "kubernetes" / "crds"
POLICY_CRD = "authorizationpolicies.security.istio.io"


def kube_binaries() -> Path:
    """Where etcd, kube-apiserver and kubectl are. Raises PrerequisiteError saying how to build them."""
    try:
        return binaries_dir()
    except KubeError as exc:
        raise PrerequisiteError(f"`lab up --kubernetes` needs the Kubernetes binaries: {exc}") from None


def crd_files(crd_dir: Path | None = None) -> list[Path]:
    """The CRD manifests the lab installs (the AuthorizationPolicy CRD). Raises PrerequisiteError."""
    where = crd_dir or CRD_DIR
    files = sorted(where.glob("*.yaml")) if where.is_dir() else []
    if not files:
        raise PrerequisiteError(f"no CRD manifests in {where}: the lab needs the AuthorizationPolicy CRD")
    return files


def pki(paths: LabPaths) -> Pki:
    return Pki(paths.kube / "pki")


def server_url(plan: LabPlan) -> str:
    return f"https://{plan.control_plane.ip}:{API_PORT}"


def write_pki(plan: LabPlan, paths: LabPaths) -> None:
    """The API server's certificates (also for the control-plane address) and the lab's kubeconfig."""
    keys = pki(paths)
    keys.generate(extra_ips=[plan.control_plane.ip])
    paths.kubeconfig.write_text(yaml.safe_dump(kubeconfig_document(server_url(plan), keys)))
    paths.kubeconfig.chmod(0o600)


def etcd_spec(plan: LabPlan, paths: LabPaths, bin_dir: Path) -> ComponentSpec:
    cp = plan.control_plane.netns
    return ComponentSpec(
        name="etcd",
        component="etcd",
        netns=cp,
        argv=etcd_argv(bin_dir, paths.kube / "etcd", ETCD_PORT, ETCD_PEER_PORT),
        log=str(paths.log("etcd")),
        checks=[TcpCheck(netns=cp, host="127.0.0.1", port=ETCD_PORT)],
    )


def apiserver_spec(plan: LabPlan, paths: LabPaths, bin_dir: Path) -> ComponentSpec:
    cp = plan.control_plane
    argv = apiserver_argv(bin_dir, pki(paths), paths.kube, etcd_url=f"http://127.0.0.1:{ETCD_PORT}",
                          bind=cp.ip, advertise=cp.ip, port=API_PORT)  # fmt: skip
    return ComponentSpec(
        name="kube-apiserver",
        component="kube-apiserver",
        netns=cp.netns,
        argv=argv,
        log=str(paths.log("kube-apiserver")),
        checks=[TcpCheck(netns=cp.netns, host=cp.ip, port=API_PORT)],
    )


def kubelet_spec(paths: LabPaths) -> ComponentSpec:
    """The lab kubelet, in the host namespace (it creates pod namespaces); kubelet.py."""
    return ComponentSpec(
        name="kubelet",
        component="kubelet",
        netns="",
        argv=[PYTHON, "-m", "ambient.lab.kubelet", "--run-dir", str(paths.run_dir)],
        log=str(paths.log("kubelet")),
    )


def status_fields(plan: LabPlan, paths: LabPaths) -> dict[str, str]:
    """What `lab status` says about the API server."""
    return {"kube_apiserver": server_url(plan), "kubeconfig": str(paths.kubeconfig)}


def lab_api(plan: LabPlan, paths: LabPaths) -> LabKubeApi:
    return LabKubeApi(plan.control_plane.netns, plan.control_plane.ip, API_PORT, pki(paths))


def wait_api_ready(api: LabKubeApi, paths: LabPaths, timeout: float) -> None:
    try:
        api.wait_ready(timeout)
    except KubeRequestError as exc:
        raise ComponentError(f"kube-apiserver: {exc}; see its log {paths.log('kube-apiserver')}") from None


def install_crds(api: LabKubeApi, files: Sequence[Path], *, timeout: float) -> list[str]:
    """Create each CRD and wait until the API server serves it; their names."""
    names = []
    for path in files:
        for doc in yaml.safe_load_all(path.read_text()):
            if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
                continue
            api.create("/apis/apiextensions.k8s.io/v1/customresourcedefinitions", doc)
            names.append(str(doc["metadata"]["name"]))
    deadline = time.monotonic() + timeout
    for name in names:
        while not _established(api.get(f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{name}")):
            if time.monotonic() > deadline:
                raise ComponentError(f"the API server does not serve the CRD {name} after {timeout:g} s")
            time.sleep(0.2)
    return names


def _established(crd: Mapping[str, Any]) -> bool:
    conditions = (crd.get("status") or {}).get("conditions") or []
    return any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions)


def load_world(api: KubeRequests, world: World) -> dict[str, str]:
    """Create the world's objects (pods without status: the lab's kubelet gives them theirs); returns pod key
    -> the uid the API server gave it."""
    try:
        objects = world_to_objects(world)
    except ValueError as exc:
        raise PrerequisiteError(f"the world cannot be loaded into the API server: {exc}") from None
    for ns in objects.namespaces:
        try:
            api.create("/api/v1/namespaces", ns)
        except KubeRequestError as exc:
            if exc.status != 409:
                raise
            # one the API server makes itself (default, kube-system): give it the world's labels
            labels = {"metadata": {"labels": ns["metadata"].get("labels", {})}}
            api.request("PATCH", f"/api/v1/namespaces/{ns['metadata']['name']}", labels,
                        content_type=MERGE_PATCH)  # fmt: skip
    for node in objects.nodes:
        api.create("/api/v1/nodes", node)
    for svc in objects.services:
        api.create(f"/api/v1/namespaces/{svc['metadata']['namespace']}/services", svc)
    for policy in objects.policies:
        where = policy["metadata"]["namespace"]
        api.create(f"/apis/security.istio.io/v1/namespaces/{where}/authorizationpolicies", policy)
    uids = {}
    for pod in objects.pods:
        meta = {k: v for k, v in pod["metadata"].items() if k != "uid"}  # the API server chooses it
        made = api.create(f"/api/v1/namespaces/{meta['namespace']}/pods",
                          {**{k: v for k, v in pod.items() if k != "status"}, "metadata": meta})  # fmt: skip
        uids[f"{meta['namespace']}/{meta['name']}"] = str(made["metadata"]["uid"])
    return uids


WORLD_CONTAINERS = ("app",)
"""The containers world_to_objects gives each pod."""


def running_status(ip: str, host_ip: str, containers: Sequence[str] = WORLD_CONTAINERS) -> dict[str, Any]:
    """The pod status patch a kubelet writes once the pod's sandbox and its containers run."""
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {"status": {
        "phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}], "hostIP": host_ip, "startTime": now,
        "conditions": [{"type": t, "status": "True", "lastTransitionTime": now}
                       for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")],
        "containerStatuses": [{"name": name, "ready": True, "started": True, "restartCount": 0,
                               "image": "lab", "imageID": "", "state": {"running": {"startedAt": now}}}
                              for name in containers],
    }}  # fmt: skip


def container_names(obj: Mapping[str, Any]) -> list[str]:
    containers = (obj.get("spec") or {}).get("containers") or []
    return [str(c.get("name")) for c in containers if isinstance(c, dict)]


def redirections(api: LabKubeApi) -> dict[str, str]:
    """Pod key -> its `ambient.istio.io/redirection` annotation ("" without one), from the API server."""
    out = {}
    for pod in api.get("/api/v1/pods").get("items", []):
        meta = pod.get("metadata") or {}
        annotations = meta.get("annotations") or {}
        out[f"{meta.get('namespace')}/{meta.get('name')}"] = str(annotations.get(REDIRECTION_ANNOTATION, ""))
    return out


def kubectl(
    state: LabState, argv: Sequence[str], *, capture: bool = False
) -> subprocess.CompletedProcess[bytes]:
    """kubectl ARGV with the lab's kubeconfig, inside the control-plane namespace; its exit code."""
    if not state.kube_bin_dir:
        raise PrerequisiteError(
            f"lab {state.prefix!r} has no Kubernetes API server; start one with "
            f"`ambient lab up --kubernetes --prefix {state.prefix}`"
        )
    plan_netns = msgspec.json.decode(state.plan, type=LabPlan).control_plane.netns
    paths = LabPaths(state.run_dir)
    cmd = [str(Path(state.kube_bin_dir) / "kubectl"), "--kubeconfig", str(paths.kubeconfig), *argv]
    return subprocess.run(["ip", "netns", "exec", plan_netns, *cmd], capture_output=capture, check=False)
