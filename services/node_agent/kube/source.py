"""The Kubernetes API as the lifecycle's PodSource and the CNI endpoint's PodLookup, like istio-cni's agent.

Theory of operation
-------------------
Two reflectors (reflector.py) run side by side on one client: the pods with `spec.nodeName` = this node,
and all namespaces (their labels decide for pods that carry no label of their own). Their events go through
one channel to one task, which owns the view, so a pod event and a namespace event never race.

    both collections listed for the first time    sink.initial_pods(every pod with its namespace's labels),
                                                  then task_status.started()
    a pod added or changed                        sink.pod_changed(pod, its namespace's labels)
    a pod deleted                                 sink.pod_deleted(pod)
    a namespace's labels changed (or it is gone)  sink.pod_changed for each of its pods on this node
    a later listing (after 410 Gone)              diffed against the view: pods missing from it are
                                                  deleted, new or changed ones (resourceVersion) changed

Which pods are ambient is the lifecycle's decision (eligibility.py: the pod's or its namespace's
`istio.io/dataplane-mode=ambient`, the pod's `none` opting out, no sidecar, no host network, no waypoint);
a pod without an IP yet waits there until an event brings one (or its CNI event names its netns). While the
API server cannot be reached the view stays as it was: enrolled pods stay enrolled and protected.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import msgspec
import trio

from services.node_agent.kube.objects import KubeNamespace, KubePod
from services.node_agent.lifecycle import PodSink
from services.node_agent.model import Pod
from shared.kube.client import KubeApi, open_kube_api
from shared.kube.reflector import Deleted, Listed, Lost, Reflector, ReflectorEvent, Upserted

log = logging.getLogger("node_agent.kube")

PODS = "pods"
NAMESPACES = "namespaces"

_decode_pod = msgspec.json.Decoder(KubePod).decode
_decode_namespace = msgspec.json.Decoder(KubeNamespace).decode


class KubePodSource:
    """PodSource + PodLookup over the Kubernetes API (see the module docstring)."""

    def __init__(self, node: str, *, kubeconfig: str | None = None, **reflector_options: Any) -> None:
        self.node = node
        self.kubeconfig = kubeconfig
        self.pods: dict[str, KubePod] = {}
        self.namespaces: dict[str, dict[str, str]] = {}
        """namespace name -> labels"""
        self.reflectors: dict[str, Reflector[Any]] = {}
        self._options = reflector_options

    def lookup(self, namespace: str, name: str) -> tuple[Pod, Mapping[str, str]] | None:
        for kube_pod in self.pods.values():
            if kube_pod.metadata.namespace == namespace and kube_pod.metadata.name == name:
                return kube_pod.to_pod(), dict(self.namespaces.get(namespace, {}))
        return None

    async def run(
        self, sink: PodSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with open_kube_api(self.kubeconfig) as api:
            await self.run_with(api, sink, task_status=task_status)

    async def run_with(
        self, api: KubeApi, sink: PodSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """`run` on a client the caller owns."""
        pods: Reflector[KubePod] = Reflector(
            api, PODS, "/api/v1/pods", _decode_pod, {"fieldSelector": f"spec.nodeName={self.node}"},
            **self._options,
        )
        namespaces: Reflector[KubeNamespace] = Reflector(
            api, NAMESPACES, "/api/v1/namespaces", _decode_namespace, **self._options
        )
        self.reflectors = {PODS: pods, NAMESPACES: namespaces}
        send, receive = trio.open_memory_channel[ReflectorEvent[Any]](256)
        async with trio.open_nursery() as nursery, receive:
            nursery.start_soon(pods.run, send.clone())
            nursery.start_soon(namespaces.run, send)
            listed: set[str] = set()
            async for event in receive:
                if isinstance(event, Lost):
                    log.info("enrolled pods stay enrolled and protected until the API server is back",
                             extra={"fields": [("kind", event.kind)]})
                    continue  # the view stays valid
                if len(listed) < 2:
                    self._apply_quietly(event)
                    if isinstance(event, Listed):
                        listed.add(event.kind)
                    if len(listed) == 2:
                        await self._initial(sink)
                        task_status.started()
                    continue
                await self._apply(sink, event)

    async def _initial(self, sink: PodSink) -> None:
        await sink.initial_pods([
            (p.to_pod(), dict(self.namespaces.get(p.metadata.namespace, {}))) for p in self.pods.values()
        ])
        log.info("listed this node's pods from the Kubernetes API",
                 extra={"fields": [("node", self.node), ("pods", len(self.pods)),
                                   ("namespaces", len(self.namespaces))]})

    def _apply_quietly(self, event: ReflectorEvent[Any]) -> None:
        """Before the first complete listing: only build the view."""
        if isinstance(event, Listed):
            if event.kind == PODS:
                self.pods = dict(event.objects)
            else:
                self.namespaces = {ns.metadata.name: ns.labels for ns in event.objects.values()}
        elif isinstance(event, Upserted):
            if event.kind == PODS:
                self.pods[event.object.metadata.uid] = event.object
            else:
                self.namespaces[event.object.metadata.name] = event.object.labels
        elif isinstance(event, Deleted):
            if event.kind == PODS:
                self.pods.pop(event.object.metadata.uid, None)
            else:
                self.namespaces.pop(event.object.metadata.name, None)

    async def _apply(self, sink: PodSink, event: ReflectorEvent[Any]) -> None:
        if event.kind == PODS:
            await self._apply_pod(sink, event)
        else:
            await self._apply_namespace(sink, event)

    async def _apply_pod(self, sink: PodSink, event: ReflectorEvent[Any]) -> None:
        if isinstance(event, Listed):
            fresh: dict[str, KubePod] = event.objects
            for uid, old in list(self.pods.items()):
                if uid not in fresh:
                    del self.pods[uid]
                    await sink.pod_deleted(old.to_pod())
            for uid, pod in fresh.items():
                known = self.pods.get(uid)
                if known is None or known.metadata.resource_version != pod.metadata.resource_version:
                    await self._pod_changed(sink, pod)
        elif isinstance(event, Upserted):
            await self._pod_changed(sink, event.object)
        elif isinstance(event, Deleted):
            self.pods.pop(event.object.metadata.uid, None)
            await sink.pod_deleted(event.object.to_pod())

    async def _pod_changed(self, sink: PodSink, pod: KubePod) -> None:
        self.pods[pod.metadata.uid] = pod
        await sink.pod_changed(pod.to_pod(), dict(self.namespaces.get(pod.metadata.namespace, {})))

    async def _apply_namespace(self, sink: PodSink, event: ReflectorEvent[Any]) -> None:
        if isinstance(event, Listed):
            fresh = {ns.metadata.name: ns.labels for ns in event.objects.values()}
            names = set(fresh) | set(self.namespaces)
            changed = [n for n in names if fresh.get(n) != self.namespaces.get(n)]
            self.namespaces = fresh
        elif isinstance(event, Upserted):
            name = event.object.metadata.name
            if self.namespaces.get(name) == event.object.labels:
                return
            self.namespaces[name] = event.object.labels
            changed = [name]
        elif isinstance(event, Deleted):
            name = event.object.metadata.name
            self.namespaces.pop(name, None)
            changed = [name]
        else:
            return
        for name in changed:
            labels = self.namespaces.get(name, {})
            affected = [p for p in self.pods.values() if p.metadata.namespace == name]
            if affected:
                log.info("namespace labels changed; re-evaluating its pods on this node",
                         extra={"fields": [("namespace", name), ("pods", len(affected))]})
            for pod in affected:
                await sink.pod_changed(pod.to_pod(), dict(labels))
