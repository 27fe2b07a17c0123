"""The control plane's pod watch (services/node_agent/podwatch.py) as the lifecycle's PodSource and the CNI
endpoint's PodLookup.

Theory of operation
-------------------
`run(sink)` opens the watch and waits for its first `PodSnapshot`: that listing is handed to
`sink.initial_pods` (the agent restores pods that are already redirected, before its ZDS server accepts a
ztunnel, so the first ztunnel snapshot is complete) and only then is `task_status.started()` called. After
that each event becomes `pod_changed` (new pod, labels/annotations/IPs or namespace labels changed) or
`pod_deleted`; a later full snapshot (the watch had to start over) is diffed against the view. The view
(`lookup`) answers the CNI endpoint, so a CNI event for a known pod uses the pod's real labels, annotations
and service account.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import trio

from services.node_agent.lifecycle import PodSink
from services.node_agent.model import Pod
from services.node_agent.podwatch import (
    PodDeleted,
    PodEvent,
    PodInfo,
    PodSnapshot,
    PodUpserted,
    WatchStatus,
    open_pod_watch,
)
from shared.zds.types import PodUid

log = logging.getLogger("node_agent.watch")


OpenWatch = Callable[..., AbstractAsyncContextManager[AsyncIterator[PodEvent]]]


def to_pod(info: PodInfo) -> Pod:
    return Pod(
        uid=PodUid(info.uid),
        name=info.name,
        namespace=info.namespace,
        service_account=info.service_account or "default",
        labels=dict(info.labels),
        annotations=dict(info.annotations),
        ips=tuple(info.ips),
        host_network=info.host_network,
    )


class PodWatchSource:
    """PodSource + PodLookup over the istiod stub's pod watch."""

    def __init__(self, target: Any, node: str, *, open_watch: OpenWatch = open_pod_watch) -> None:
        self.target = target
        self.node = node
        self._open_watch = open_watch
        self.view: dict[str, PodInfo] = {}

    def lookup(self, namespace: str, name: str) -> tuple[Pod, Mapping[str, str]] | None:
        for info in self.view.values():
            if info.namespace == namespace and info.name == name:
                return to_pod(info), dict(info.namespace_labels)
        return None

    async def run(
        self, sink: PodSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        async with self._open_watch(self.target, self.node) as watch:
            started = False
            async for event in watch:
                if isinstance(event, PodSnapshot):
                    if not started:
                        self.view = {p.uid: p for p in event.pods}
                        await sink.initial_pods([(to_pod(p), dict(p.namespace_labels)) for p in event.pods])
                        log.info("pod watch listed the node's pods",
                                 extra={"fields": [("node", self.node), ("pods", len(event.pods))]})
                        task_status.started()
                        started = True
                        continue
                    fresh = {p.uid: p for p in event.pods}
                    for uid, old in list(self.view.items()):
                        if uid not in fresh:
                            del self.view[uid]
                            await sink.pod_deleted(to_pod(old))
                    for info in event.pods:
                        await self._changed(sink, info)
                elif isinstance(event, PodUpserted):
                    await self._changed(sink, event.pod)
                elif isinstance(event, PodDeleted):
                    gone = self.view.pop(event.uid, None)
                    pod = (
                        to_pod(gone)
                        if gone
                        else Pod(uid=PodUid(event.uid), name=event.name, namespace=event.namespace)
                    )
                    await sink.pod_deleted(pod)
                elif isinstance(event, WatchStatus):
                    if event.connected:
                        log.info("pod watch reconnected")
                    else:
                        log.warning("pod watch lost; keeping the last known view",
                                    extra={"fields": [("error", event.reason)]})

    async def _changed(self, sink: PodSink, info: PodInfo) -> None:
        self.view[info.uid] = info
        await sink.pod_changed(to_pod(info), dict(info.namespace_labels))
