"""The stub's pod watch (PodWatch): each node agent's view of the pods on its node, and the redirection
status it writes back (the `ambient.istio.io/redirection` annotation)."""

from __future__ import annotations

import logging

from services.istiod.auth import Auth
from services.istiod.rpc import one_request, world_errors
from services.istiod.store import WorldStore
from services.istiod.world import REDIRECTION_ANNOTATION, REDIRECTION_VALUES
from shared.aio import RpcError, RpcStatus, ServerCall
from shared.api import podwatch_pb2

log = logging.getLogger(__name__)


class PodWatchServicer:
    """Watch: a full (or, with known versions, partial) sync of the node's pods, then every change.
    SetRedirection: a node agent sets or removes a pod's status, for pods on its own node only."""

    def __init__(self, store: WorldStore, auth: Auth) -> None:
        self.store = store
        self.auth = auth

    async def Watch(self, call: ServerCall) -> None:
        caller = self.auth.node_of(call.metadata)
        req = await one_request(call)
        if caller is not None and caller != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED, f"the token is node {caller}'s, not node {req.node}'s"
            )
        if req.node not in self.store.resources.pods_by_node:
            nodes = ", ".join(sorted(self.store.resources.pods_by_node)) or "none"
            raise RpcError(RpcStatus.NOT_FOUND, f"unknown node {req.node!r} (world nodes: {nodes})")
        log.info("pod watch opened", extra={"fields": [
            ("node", req.node), ("peer", str(call.peer)), ("known", len(req.known_versions))]})
        with self.store.subscribe() as wakeup:
            current = self.store.resources.pods_by_node.get(req.node, {})
            known = dict(req.known_versions)
            if known:
                sync = podwatch_pb2.Sync(
                    full=False,
                    pods=[p for uid, p in current.items() if known.get(uid) != p.version],
                    removed=sorted(uid for uid in known if uid not in current),
                )
            else:
                sync = podwatch_pb2.Sync(full=True, pods=list(current.values()))
            await call.send_message(podwatch_pb2.PodWatchEvent(revision=self.store.generation, sync=sync))
            sent = dict(current)
            while True:
                await wakeup.wait()
                current = self.store.resources.pods_by_node.get(req.node, {})
                revision = self.store.generation
                for uid, pod in current.items():
                    if uid not in sent or sent[uid].version != pod.version:
                        await call.send_message(podwatch_pb2.PodWatchEvent(revision=revision, changed=pod))
                for uid, old in list(sent.items()):
                    if uid not in current:
                        gone = podwatch_pb2.PodRemoved(uid=uid, name=old.name, namespace=old.namespace)
                        await call.send_message(podwatch_pb2.PodWatchEvent(revision=revision, removed=gone))
                sent = dict(current)

    async def SetRedirection(self, call: ServerCall) -> None:
        """A node agent sets or removes the `ambient.istio.io/redirection` annotation of a pod on its node."""
        caller = self.auth.node_of(call.metadata)
        req = await one_request(call)
        if not (req.node and req.namespace and req.name):
            raise RpcError(RpcStatus.INVALID_ARGUMENT, "node, namespace and name are all required")
        if caller is not None and caller != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED, f"the token is node {caller}'s, not node {req.node}'s"
            )
        value = req.value if req.HasField("value") else None
        if value is not None and value not in REDIRECTION_VALUES:
            raise RpcError(
                RpcStatus.INVALID_ARGUMENT,
                f"{value!r} is not a value of {REDIRECTION_ANNOTATION}: use "
                f"{' or '.join(REDIRECTION_VALUES)}, or leave value unset to remove the annotation",
            )
        key = f"{req.namespace}/{req.name}"
        pod = self.store.find_pod(req.namespace, req.name)
        if pod is None:
            raise RpcError(RpcStatus.NOT_FOUND, f"no pod {key} in the world")
        if req.uid and pod.kube_uid != req.uid:
            raise RpcError(
                RpcStatus.NOT_FOUND,
                f"pod {key} with uid {req.uid} no longer exists (the pod of that name has uid "
                f"{pod.kube_uid})",
            )
        if pod.node != req.node:
            raise RpcError(
                RpcStatus.PERMISSION_DENIED,
                f"pod {key} runs on node {pod.node}, not on node {req.node}; a node agent may only set the "
                "status of its own node's pods",
            )
        # Nothing awaits between the checks above and this change: they still hold.
        with world_errors():
            generation, changed = self.store.set_pod_redirection(req.namespace, req.name, value, uid=req.uid)
        version = self.store.resources.pods_by_node[pod.node][pod.kube_uid].version
        if changed:
            log.info("pod annotation set", extra={"fields": [
                ("node", req.node), ("pod", key), ("annotation", REDIRECTION_ANNOTATION),
                ("value", value or "(removed)")]})
        await call.send_message(
            podwatch_pb2.SetRedirectionResponse(revision=generation, version=version, changed=changed)
        )
