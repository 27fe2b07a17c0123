"""A node agent on a real API server: the real Kubernetes pod source and status writer, the real lifecycle,
fakes only for what needs root (the rules, ztunnel, the netns handles); kubectl-made objects, and a world's
objects loaded as the lab loads them."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio
import yaml

from ambient.kube.apiserver import ApiServer
from services.istiod.kube_world import KubeObjects
from services.node_agent.kube.source import NAMESPACES, PODS, KubePodSource
from services.node_agent.kube.status import KubeStatusReporter
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.model import ANNOTATION_REDIRECTION
from services.node_agent.rules import RuleSettings
from services.node_agent.testing import FakeRuleApplier, FakeZtunnel, PipeNetnsOpener
from shared.kube.client import KubeApi, open_kube_api
from shared.zds.types import PodUid

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy" / "kubernetes"
CRDS = DEPLOY / "crds"
WAIT = 30.0
FAST = {"backoff_initial": 0.05, "backoff_max": 0.5}


def namespace(name: str, labels: Mapping[str, str] | None = None) -> dict[str, Any]:
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name, "labels": dict(labels or {})}}


def pod(
    name: str,
    ns: str,
    *,
    node: str = "node-a",
    labels: Mapping[str, str] | None = None,
    annotations: Mapping[str, str] | None = None,
    host_network: bool = False,
) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "namespace": ns, "labels": dict(labels or {}),
                     "annotations": dict(annotations or {})},
        "spec": {"nodeName": node, "hostNetwork": host_network, "serviceAccountName": name,
                 "containers": [{"name": "app", "image": "example.invalid/app:1"}]},
    }


async def apply(api: ApiServer, *objects: Mapping[str, Any]) -> None:
    await api.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(list(objects)).encode())


async def apply_crds(api: ApiServer) -> None:
    """Install deploy/kubernetes/crds/ and wait until the API server serves them."""
    await api.kubectl("apply", "-f", str(CRDS))
    await api.kubectl("wait", "--for=condition=Established", "--timeout=30s", "-f", str(CRDS))


async def load_objects(api: ApiServer, client: KubeApi, objects: KubeObjects) -> None:
    """Create the objects (CRDs first), then play kubelet: each pod's status as the object gives it."""
    await apply_crds(api)
    await apply(api, *objects.nodes, *objects.namespaces)
    # the server gives each object its uid, and a pod's status comes through its own subresource
    pods = [{**o, "metadata": {k: v for k, v in o["metadata"].items() if k != "uid"}, "status": {}}
            for o in objects.pods]
    await apply(api, *pods, *objects.services, *objects.policies)
    for obj in objects.pods:
        meta = obj["metadata"]
        await client.patch_merge(f"/api/v1/namespaces/{meta['namespace']}/pods/{meta['name']}/status",
                                 {"status": obj["status"]})


async def get(api: ApiServer, kind: str, name: str, ns: str | None = None) -> dict[str, Any] | None:
    where = ["-n", ns] if ns else []
    out = await api.kubectl("get", kind, name, *where, "-o", "json", "--ignore-not-found")
    return json.loads(out) if out.strip() else None


async def set_pod_ip(client: KubeApi, ns: str, name: str, ip: str) -> None:
    """Play kubelet: the pod is running and has its IP."""
    await client.patch_merge(f"/api/v1/namespaces/{ns}/pods/{name}/status", {
        "status": {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]}})


async def wait_until(check: Callable[[], Any], what: str) -> None:
    """Poll `check` (sync or async) until it is true; fail naming `what` after WAIT seconds."""
    with trio.move_on_after(WAIT):
        while True:
            result = check()
            if hasattr(result, "__await__"):
                result = await result
            if result:
                return
            await trio.sleep(0.05)
    raise AssertionError(f"not within {WAIT:.0f} s: {what}")


class AgentOnKube:
    """One node's agent against `api`; `running()` runs it, `client` is a KubeApi of the test's own."""

    def __init__(self, api: ApiServer, node: str = "node-a", *, kubeconfig: str | None = None) -> None:
        self.api = api
        self.node = node
        config = kubeconfig or str(api.kubeconfig)
        self.source = KubePodSource(node, kubeconfig=config, **FAST)
        self.status = KubeStatusReporter(kubeconfig=config, **FAST)
        self.ztunnel = FakeZtunnel()
        self.opener = PipeNetnsOpener()
        self.agent = NodeAgent(
            applier=FakeRuleApplier(), ztunnel=self.ztunnel, status=self.status, settings=RuleSettings(),
            opener=self.opener, retry_initial=0.01, retry_max=0.1,
        )
        self.client: KubeApi

    @asynccontextmanager
    async def running(self, *, wait_listed: bool = True) -> AsyncIterator[AgentOnKube]:
        try:
            async with open_kube_api(str(self.api.kubeconfig)) as client, trio.open_nursery() as nursery:
                self.client = client
                await nursery.start(self.status.run)
                if wait_listed:
                    with trio.fail_after(WAIT):
                        await nursery.start(self.source.run, self.agent)
                else:
                    nursery.start_soon(self.source.run, self.agent)
                await nursery.start(self.agent.run)
                yield self
                nursery.cancel_scope.cancel()
        finally:
            self.agent.close()
            self.opener.close()

    def enrolled(self, ns: str, name: str) -> bool:
        uid = self.uid(ns, name)
        return uid is not None and self.agent.status_of(uid) == "enabled"

    def uid(self, ns: str, name: str) -> PodUid | None:
        for kube_pod in self.source.pods.values():
            if kube_pod.metadata.namespace == ns and kube_pod.metadata.name == name:
                return PodUid(kube_pod.metadata.uid)
        return None

    async def annotation(self, ns: str, name: str) -> str | None:
        obj = await get(self.api, "pod", name, ns)
        assert obj is not None, f"pod {ns}/{name} is gone"
        value = (obj["metadata"].get("annotations") or {}).get(ANNOTATION_REDIRECTION)
        return None if value is None else str(value)

    @property
    def pod_lists(self) -> int:
        return self.source.reflectors[PODS].lists

    @property
    def namespace_lists(self) -> int:
        return self.source.reflectors[NAMESPACES].lists
