"""Pod watch client: the node agent's view of the pods scheduled on its node, from the istiod stub.

Usage (the node agent owns the lifetime)::

    target = GrpcTarget(host="127.0.0.1", port=15012, root_cert_pem=root_pem, token=node_token)
    async with open_pod_watch(target, node="node-a") as watch:
        async for event in watch:
            match event:
                case PodSnapshot(pods=pods): ...      # replace the whole view
                case PodUpserted(pod=pod): ...        # new pod, or labels/IPs/annotations changed
                case PodDeleted(uid=uid): ...         # pod gone

Event types (all frozen msgspec Structs)
----------------------------------------
* `PodSnapshot(pods)`: the complete set of pods on the node. Always the first event; sent again only if the
  client had to start over. The consumer replaces its view (pods missing from it are gone).
* `PodUpserted(pod)`: a pod appeared or changed (any field of PodInfo, including `namespace_labels`; compare
  with what you had to see what changed).
* `PodDeleted(uid, name, namespace)`: the pod no longer exists.
* `WatchStatus(connected, reason)`: the stream to the stub was lost (`connected=False`, reason says why) or
  re-established (`connected=True`). Purely informational: the view stays valid while disconnected (nothing
  is known to have changed), and after a reconnect the watch resumes with the versions it holds and only the
  differences arrive as PodUpserted/PodDeleted.

`PodInfo.is_ambient` applies upstream's default enablement rule to the pod and its namespace labels.

This module imports shared.aio (and so trio_asyncio) only when a watch is opened, so importing it for the
types does not affect pyroute2 on the Trio thread (under trio_asyncio its sync IPRoute refuses to run there).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import msgspec
import trio

from services.node_agent.model import (
    ANNOTATION_SIDECAR_STATUS,
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_NONE,
    LABEL_DATAPLANE_MODE,
)

if TYPE_CHECKING:
    from shared.aio import GrpcTarget

log = logging.getLogger(__name__)


class PodInfo(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    name: str
    namespace: str
    service_account: str
    node: str
    ips: tuple[str, ...]
    labels: dict[str, str]
    annotations: dict[str, str]
    namespace_labels: dict[str, str]
    host_network: bool = False
    version: str = ""

    @property
    def is_ambient(self) -> bool:
        """Upstream's default rule: pod label ambient, or namespace label ambient and the pod not opted out
        with `none`; never a pod with a sidecar, never a host-network pod."""
        if ANNOTATION_SIDECAR_STATUS in self.annotations or self.host_network:
            return False
        mode = self.labels.get(LABEL_DATAPLANE_MODE)
        if mode == DATAPLANE_MODE_AMBIENT:
            return True
        return (
            self.namespace_labels.get(LABEL_DATAPLANE_MODE) == DATAPLANE_MODE_AMBIENT
            and mode != DATAPLANE_MODE_NONE
        )


class PodSnapshot(msgspec.Struct, frozen=True, kw_only=True):
    pods: tuple[PodInfo, ...]


class PodUpserted(msgspec.Struct, frozen=True, kw_only=True):
    pod: PodInfo


class PodDeleted(msgspec.Struct, frozen=True, kw_only=True):
    uid: str
    name: str
    namespace: str


class WatchStatus(msgspec.Struct, frozen=True, kw_only=True):
    connected: bool
    reason: str = ""


PodEvent = PodSnapshot | PodUpserted | PodDeleted | WatchStatus


def _pod_from_pb(msg: Any) -> PodInfo:
    return PodInfo(
        uid=msg.uid,
        name=msg.name,
        namespace=msg.namespace,
        service_account=msg.service_account,
        node=msg.node,
        ips=tuple(msg.ips),
        labels=dict(msg.labels),
        annotations=dict(msg.annotations),
        namespace_labels=dict(msg.namespace_labels),
        host_network=msg.host_network,
        version=msg.version,
    )


class PodWatch:
    """An async iterator of PodEvent; also keeps `pods` (uid -> PodInfo), the current view."""

    def __init__(
        self,
        target: GrpcTarget,
        node: str,
        *,
        backoff_initial: float = 0.1,
        backoff_max: float = 10.0,
        buffer: int = 256,
    ) -> None:
        self.target = target
        self.node = node
        self.pods: dict[str, PodInfo] = {}
        self.connected = False
        self.last_error: str | None = None
        """Why the last attempt to watch ended (None until one has); also logged."""
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._send, self._receive = trio.open_memory_channel[PodEvent](buffer)

    def __aiter__(self) -> PodWatch:
        return self

    async def __anext__(self) -> PodEvent:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Watch until cancelled, reconnecting with backoff; feeds the iterator."""
        from shared.aio import RpcError, open_aio_loop

        task_status.started()
        backoff = self._backoff_initial
        have_snapshot = False
        async with open_aio_loop(), self._send:
            while True:
                delivered = False
                try:
                    delivered = await self._session(have_snapshot)
                    reason = "the server ended the watch"
                except RpcError as exc:
                    reason = str(exc)
                self.last_error = reason
                have_snapshot = have_snapshot or delivered
                if delivered:
                    backoff = self._backoff_initial
                if self.connected:
                    self.connected = False
                    await self._send.send(WatchStatus(connected=False, reason=reason))
                log.warning("pod watch lost; retrying", extra={"fields": [
                    ("node", self.node), ("error", reason), ("backoff", f"{backoff:.1f}s")]})
                await trio.sleep(backoff)
                backoff = min(backoff * 2, self._backoff_max)

    async def _session(self, resume: bool) -> bool:
        from shared.aio import open_target
        from shared.api import podwatch_grpc, podwatch_pb2

        delivered = False
        request = podwatch_pb2.WatchRequest(
            node=self.node,
            known_versions={uid: pod.version for uid, pod in self.pods.items()} if resume else {},
        )
        async with (
            open_target(self.target) as channel,
            channel.stream(podwatch_grpc.PodWatchStub, "Watch", metadata=self.target.call_metadata()) as call,
        ):
            await call.send_message(request, end=True)
            while (event := await call.recv_message()) is not None:
                if not self.connected:
                    self.connected = True
                    if resume:
                        await self._send.send(WatchStatus(connected=True))
                delivered = True
                for out in self._convert(event, resume):
                    await self._send.send(out)
        return delivered

    def _convert(self, event: Any, resume: bool) -> list[PodEvent]:
        kind = event.WhichOneof("event")
        if kind == "sync":
            pods = [_pod_from_pb(p) for p in event.sync.pods]
            if event.sync.full or not resume:
                self.pods = {p.uid: p for p in pods}
                return [PodSnapshot(pods=tuple(pods))]
            out: list[PodEvent] = []
            for pod in pods:
                self.pods[pod.uid] = pod
                out.append(PodUpserted(pod=pod))
            for uid in event.sync.removed:
                old = self.pods.pop(uid, None)
                if old is not None:
                    out.append(PodDeleted(uid=uid, name=old.name, namespace=old.namespace))
            return out
        if kind == "changed":
            pod = _pod_from_pb(event.changed)
            self.pods[pod.uid] = pod
            return [PodUpserted(pod=pod)]
        if kind == "removed":
            self.pods.pop(event.removed.uid, None)
            return [
                PodDeleted(uid=event.removed.uid, name=event.removed.name, namespace=event.removed.namespace)
            ]
        log.warning("pod watch: ignoring an event of unknown kind (newer server?)",
                    extra={"fields": [("kind", kind)]})
        return []


@asynccontextmanager
async def open_pod_watch(target: GrpcTarget, node: str, **options: Any) -> AsyncIterator[PodWatch]:
    """Start watching `node`'s pods; the watch task lives (and dies) with the block."""
    from shared.aio import open_aio_loop

    async with open_aio_loop(), trio.open_nursery() as nursery:
        watch = PodWatch(target, node, **options)
        await nursery.start(watch.run)
        try:
            yield watch
        finally:
            nursery.cancel_scope.cancel()
