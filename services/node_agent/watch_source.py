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

The watch is a peer's input: a pod IP that is not an IP address is dropped from the pod (logged, the rest of
the pod kept), an event of a kind this agent does not know is logged and skipped, and an event whose handling
fails for any other reason is logged with the pod and skipped; the watch, and the agent, carry on.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import AbstractAsyncContextManager
from typing import Any

import msgspec
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


def checked(info: PodInfo) -> PodInfo:
    """`info` without the IPs that are not IP addresses (each logged): the netns scan and the rules get only
    addresses, never a string that could match nothing (or something else)."""
    valid = []
    for ip in info.ips:
        try:
            valid.append(str(ipaddress.ip_address(ip)))
        except ValueError:
            log.warning("pod watch: ignoring a pod IP that is not an IP address", extra={"fields": [
                ("namespace", info.namespace), ("name", info.name), ("ip", ip)]})
    return info if len(valid) == len(info.ips) else msgspec.structs.replace(info, ips=tuple(valid))


def _event_fields(event: object) -> list[tuple[str, object]]:
    """Which pod an event is about, for a log line."""
    pod = getattr(event, "pod", event)
    return [("event", type(event).__name__), ("namespace", getattr(pod, "namespace", None)),
            ("name", getattr(pod, "name", None))]


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
                if isinstance(event, PodSnapshot) and not started:
                    pods = [checked(p) for p in event.pods]
                    self.view = {p.uid: p for p in pods}
                    await sink.initial_pods([(to_pod(p), dict(p.namespace_labels)) for p in pods])
                    log.info("pod watch listed the node's pods",
                             extra={"fields": [("node", self.node), ("pods", len(pods))]})
                    task_status.started()
                    started = True
                    continue
                try:
                    await self._apply(sink, event)
                except Exception as exc:  # one event's failure skips that event, never ends the watch
                    log.error("pod watch event not applied; skipping it",
                              extra={"fields": [*_event_fields(event), ("error", repr(exc))]}, exc_info=exc)

    async def _apply(self, sink: PodSink, event: PodEvent) -> None:
        if isinstance(event, PodSnapshot):
            fresh = {p.uid: p for p in map(checked, event.pods)}
            for uid, old in list(self.view.items()):
                if uid not in fresh:
                    del self.view[uid]
                    await sink.pod_deleted(to_pod(old))
            for info in fresh.values():
                await self._changed(sink, info)
        elif isinstance(event, PodUpserted):
            await self._changed(sink, checked(event.pod))
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
        else:
            log.warning("pod watch: ignoring an event of unknown kind (newer server?)",
                        extra={"fields": [("kind", type(event).__name__)]})

    async def _changed(self, sink: PodSink, info: PodInfo) -> None:
        self.view[info.uid] = info
        await sink.pod_changed(to_pod(info), dict(info.namespace_labels))
