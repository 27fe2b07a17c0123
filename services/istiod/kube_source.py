"""`istiod-stub --kubernetes`: the world from a Kubernetes API server, kept current.

Theory of operation
-------------------
One reflector (shared/kube/reflector.py: list, then watch with bookmarks; resume, 410 -> list again,
backoff) per collection: Nodes, Namespaces, Pods, Services and `security.istio.io/v1`
AuthorizationPolicies, all namespaces. The objects are kept as the server sent them, by uid. Once every
collection has been listed, and after every change from then on, the world is rebuilt from all of them
(kube_world.world_from_objects, on the mesh settings of the `base` world) and applied to the store as a
world-file reload is, so every xDS stream diffs and pushes. Events that arrive together are applied
together, one rebuild for the lot; a rebuild that gives the world the store already has changes nothing.

    the first listing                 the xDS server waits for it (`task_status.started()` after it): a
                                      stub that cannot reach the API serves no world rather than an empty
                                      one that would tell every ztunnel that nothing exists
    an object the world cannot take   left out with a warning naming it and why (a malformed policy, an
                                      address used twice, ...), logged once while it stays so
    the API server is lost            the world stays as it was; the reflectors retry with backoff; the
                                      warning says what failed (credentials, RBAC, the missing CRD)

Nodes are the Node objects, plus the nodes pods name that have no Node object (kube_world); each node gets
its token when it appears (app.keep_tokens). The pods' `ambient.istio.io/redirection` annotation is the one
the node agents wrote to the API server.
"""

from __future__ import annotations

import logging
from typing import Any

import trio

from services.istiod.errors import WorldError
from services.istiod.kube_world import KubeObjects, world_from_objects
from services.istiod.store import WorldStore
from services.istiod.world import World
from shared.kube.client import KubeApi, open_kube_api
from shared.kube.objects import KubeObject, decode_object
from shared.kube.reflector import Deleted, Listed, Lost, Reflector, ReflectorEvent, Upserted

log = logging.getLogger("istiod-stub.kube")

POLICY_GROUP_VERSION = "security.istio.io/v1"
COLLECTIONS: dict[str, str] = {
    "nodes": "/api/v1/nodes",
    "namespaces": "/api/v1/namespaces",
    "pods": "/api/v1/pods",
    "services": "/api/v1/services",
    "policies": f"/apis/{POLICY_GROUP_VERSION}/authorizationpolicies",
}
"""KubeObjects field -> the collection's path (cluster-wide)."""

RESOURCE_NAMES = {"nodes": "nodes", "namespaces": "namespaces", "pods": "pods", "services": "services",
                  "policies": f"authorizationpolicies.{POLICY_GROUP_VERSION.split('/')[0]}"}


def lost_problem(event: Lost) -> str:
    """What the operator should know about a lost collection, in one line."""
    resource = RESOURCE_NAMES.get(event.kind, event.kind)
    if event.status == 401:
        return "the API server refuses the stub's credentials: check --kubeconfig (or the service account)"
    if event.status == 403:
        return f"the stub's account may not list and watch {resource}: grant it in its ClusterRole"
    if event.status == 404 and event.kind == "policies":
        return (f"the API server has no {POLICY_GROUP_VERSION} AuthorizationPolicy: apply "
                "deploy/kubernetes/crds/ (kubectl apply -f)")
    return f"cannot list or watch {resource}"


class KubeWorldSource:
    """Keeps `store`'s world equal to what the API server holds (see the module docstring)."""

    def __init__(self, store: WorldStore, *, base: World | None = None, kubeconfig: str | None = None,
                 **reflector_options: Any) -> None:
        self.store = store
        store.follows = "the Kubernetes API server"
        self.base = base or World()
        self.kubeconfig = kubeconfig
        self.objects: dict[str, dict[str, KubeObject]] = {kind: {} for kind in COLLECTIONS}
        self.reflectors: dict[str, Reflector[KubeObject]] = {}
        self.started = False
        """The first complete listing is in the store (and the xDS server may serve it)."""
        self.rebuilds = 0
        """Worlds built from the objects (whether or not they changed the store's)."""
        self.notes: set[str] = set()
        """What the current world leaves out, and why (each logged when it first appeared)."""
        self._options = reflector_options
        self._lost_told = False

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Until cancelled; `started()` once the first complete listing is in the store.

        Raises:
            KubeConfigError: the configuration cannot be loaded.
        """
        async with open_kube_api(self.kubeconfig) as api:
            await self.run_with(api, task_status=task_status)

    async def run_with(self, api: KubeApi, *,
                       task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """`run` on a client the caller owns."""
        self.reflectors = {kind: Reflector(api, kind, path, decode_object, **self._options)
                           for kind, path in COLLECTIONS.items()}
        send, receive = trio.open_memory_channel[ReflectorEvent[KubeObject]](1024)
        async with trio.open_nursery() as nursery, receive:
            for reflector in self.reflectors.values():
                nursery.start_soon(reflector.run, send.clone())
            send.close()
            listed: set[str] = set()
            async for event in receive:
                changed = self._apply(event, listed)
                while True:  # the events already waiting go into the same rebuild
                    try:
                        changed |= self._apply(receive.receive_nowait(), listed)
                    except trio.WouldBlock:
                        break
                if len(listed) < len(COLLECTIONS) or not changed:
                    continue
                self._rebuild()
                if not self.started:
                    self.started = True
                    log.info("world listed from the Kubernetes API", extra={"fields": [
                        ("server", api.server), ("nodes", len(self.store.world.nodes)),
                        ("pods", len(self.store.world.pods)), ("services", len(self.store.world.services)),
                        ("policies", len(self.store.world.policies))]})
                    task_status.started()

    def _apply(self, event: ReflectorEvent[KubeObject], listed: set[str]) -> bool:
        """Fold one event into the objects; True when they changed."""
        if isinstance(event, Lost):
            if self._lost_told:
                return False  # one line per outage: the collections are lost together
            self._lost_told = True
            message = ("the world stays as it was until the API server answers again" if self.started
                       else "no world to serve until the API server answers")
            log.warning(message, extra={"fields": [
                ("kind", event.kind), ("problem", lost_problem(event)), ("error", event.reason)]})
            return False
        self._lost_told = False  # the API server answered
        held = self.objects[event.kind]
        if isinstance(event, Listed):
            first = event.kind not in listed
            listed.add(event.kind)
            if not first and _versions(held) == _versions(event.objects):
                return False
            self.objects[event.kind] = dict(event.objects)
            return True
        uid = event.object.metadata.uid
        if isinstance(event, Upserted):
            held[uid] = event.object
            return True
        if isinstance(event, Deleted):
            return held.pop(uid, None) is not None
        return False

    def _rebuild(self) -> None:
        self.rebuilds += 1
        objects = KubeObjects(**{kind: [o.raw for o in held.values()] for kind, held in self.objects.items()})
        try:
            world, notes = world_from_objects(objects, base=self.base)
        except WorldError as exc:  # a setting of the base world: validated at start, so not expected
            log.error("cannot build the world from the Kubernetes API; keeping the current one",
                      extra={"fields": [("error", str(exc))]})
            return
        for note in sorted(set(notes) - self.notes):
            log.warning("object left out of the world", extra={"fields": [("detail", note)]})
        self.notes = set(notes)
        if world == self.store.world:
            return
        try:
            self.store.apply(world, "kubernetes", keep_redirection=False)
        except WorldError as exc:
            log.error("the store refused the world from the Kubernetes API; keeping the current one",
                      extra={"fields": [("error", str(exc))]})


def _versions(objects: dict[str, KubeObject]) -> dict[str, str]:
    return {uid: o.metadata.resource_version for uid, o in objects.items()}
