"""The stub's single source of truth: the current World, what is derived from it, and change notification.

Every mutation builds a complete new World, validates it whole and derives its resources *before* swapping it
in, so a rejected change leaves the state every subscriber sees untouched. After a swap every registered
Wakeup is set; subscribers (xDS streams, pod watches) then diff the new resources against what they sent.
All methods run on the Trio thread; no locks are needed because nothing awaits between check and swap.

The `ambient.istio.io/redirection` pod annotation belongs to the node agents (SetRedirection), as the pod
status does in Kubernetes: a world document or replaced pod that does not set it keeps the value the same pod
(same uid on the same node) has, so re-applying a world file does not wipe every pod's enrolment status.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import msgspec
import trio

from services.istiod.derive import Resources
from services.istiod.errors import NotFoundError, WorldError
from services.istiod.world import (
    REDIRECTION_ANNOTATION,
    REDIRECTION_VALUES,
    Namespace,
    Pod,
    Policy,
    World,
    decode_fragment,
    validate,
)
from shared.logs import Display, Field

log = logging.getLogger(__name__)


class Wakeup:
    """A level-triggered flag one task waits on and others set (cleared by the waiter)."""

    def __init__(self) -> None:
        self._event = trio.Event()

    def set(self) -> None:
        self._event.set()

    async def wait(self) -> None:
        await self._event.wait()
        self._event = trio.Event()


class WorldStore:
    def __init__(self, world: World | None = None) -> None:
        self.world = world or World()
        self.follows: str | None = None
        """What the world is kept equal to (with --kubernetes: the API server), which the world admin API
        then does not change; None: the world file and the world admin API."""
        self.resources = Resources(self.world)
        self.generation = 1
        self._wakeups: set[Wakeup] = set()

    @contextmanager
    def subscribe(self) -> Iterator[Wakeup]:
        """A Wakeup set after every accepted change, for the duration of the block."""
        wakeup = Wakeup()
        self._wakeups.add(wakeup)
        try:
            yield wakeup
        finally:
            self._wakeups.discard(wakeup)

    def _swap(self, world: World, source: str, change: str, *fields: Field) -> int:
        validate(world, source)
        resources = Resources(world)
        self.world, self.resources = world, resources
        self.generation += 1
        log.info("world changed",
                 extra={"fields": [("generation", self.generation), ("change", Display(change)), *fields]})
        for wakeup in self._wakeups:
            wakeup.set()
        return self.generation

    def _keep_redirection(self, pods: list[Pod]) -> list[Pod]:
        """`pods` with the redirection annotation the same pods (uid and node) have now, where not given."""
        held = {
            (p.kube_uid, p.node): p.annotations[REDIRECTION_ANNOTATION]
            for p in self.world.pods
            if REDIRECTION_ANNOTATION in p.annotations
        }
        kept = []
        for pod in pods:
            value = held.get((pod.kube_uid, pod.node))
            if value is not None and REDIRECTION_ANNOTATION not in pod.annotations:
                pod = msgspec.structs.replace(
                    pod, annotations={**pod.annotations, REDIRECTION_ANNOTATION: value}
                )
            kept.append(pod)
        return kept

    def find_pod(self, namespace: str, name: str) -> Pod | None:
        key = f"{namespace}/{name}"
        return next((p for p in self.world.pods if p.key == key), None)

    # --- mutations (each atomic; raise WorldError / NotFoundError and change nothing on failure) ---------

    def apply(self, world: World, source: str = "world", *, keep_redirection: bool = True) -> int:
        """Replace the whole world. `keep_redirection=False` when `world` carries the pods' redirection
        annotation itself (the Kubernetes API's pods, where the node agents write it)."""
        if keep_redirection:
            world = msgspec.structs.replace(world, pods=self._keep_redirection(world.pods))
        return self._swap(world, source, "applied", ("source", source))

    def add_pod(self, pod_json: bytes) -> int:
        pod = decode_fragment(pod_json, Pod, "pod", "$")
        pods = [p for p in self.world.pods if p.key != pod.key] + self._keep_redirection([pod])
        index = len(pods) - 1
        try:
            return self._swap(msgspec.structs.replace(self.world, pods=pods), "pod", "pod_added",
                              ("namespace", pod.namespace), ("name", pod.name))
        except WorldError as exc:
            # Report the path relative to the pod the operator sent, not the whole world.
            prefix = f"$.pods[{index}]"
            if exc.path.startswith(prefix):
                raise WorldError(f"pod {pod.key}", "$" + exc.path[len(prefix) :], exc.problem) from None
            raise

    def remove_pod(self, namespace: str, name: str) -> int:
        key = f"{namespace}/{name}"
        pods = [p for p in self.world.pods if p.key != key]
        if len(pods) == len(self.world.pods):
            raise NotFoundError(f"no pod {key} in the world")
        return self._swap(msgspec.structs.replace(self.world, pods=pods), "pod", "pod_removed",
                          ("namespace", namespace), ("name", name))

    def set_pod_labels(self, namespace: str, name: str, set_: Mapping[str, str], remove: list[str]) -> int:
        key = f"{namespace}/{name}"
        pods = list(self.world.pods)
        for i, pod in enumerate(pods):
            if pod.key == key:
                labels = {k: v for k, v in pod.labels.items() if k not in remove} | dict(set_)
                pods[i] = msgspec.structs.replace(pod, labels=labels)
                break
        else:
            raise NotFoundError(f"no pod {key} in the world")
        return self._swap(msgspec.structs.replace(self.world, pods=pods), "labels", "pod_labels",
                          ("namespace", namespace), ("name", name))

    def set_pod_redirection(
        self, namespace: str, name: str, value: str | None, *, uid: str = ""
    ) -> tuple[int, bool]:
        """Set the pod's `ambient.istio.io/redirection` annotation to `value`, or remove it (None).

        Returns:
            (generation, changed): setting the value the pod already has changes nothing and wakes nobody.
        Raises:
            NotFoundError: no pod namespace/name, or (when `uid` is given) the pod has another uid.
            WorldError: `value` is neither "pending" nor "enabled".
        """
        key = f"{namespace}/{name}"
        if value is not None and value not in REDIRECTION_VALUES:
            raise WorldError(
                f"pod {key}",
                f"$.annotations[{REDIRECTION_ANNOTATION!r}]",
                f"{value!r} is not a redirection status; use {' or '.join(REDIRECTION_VALUES)}, "
                "or remove the annotation",
            )
        pods = list(self.world.pods)
        i = next((i for i, p in enumerate(pods) if p.key == key), None)
        if i is None:
            raise NotFoundError(f"no pod {key} in the world")
        pod = pods[i]
        if uid and pod.kube_uid != uid:
            raise NotFoundError(
                f"pod {key} with uid {uid} no longer exists (the pod of that name has uid {pod.kube_uid})"
            )
        if pod.annotations.get(REDIRECTION_ANNOTATION) == value:
            return self.generation, False
        annotations = {k: v for k, v in pod.annotations.items() if k != REDIRECTION_ANNOTATION}
        if value is not None:
            annotations[REDIRECTION_ANNOTATION] = value
        pods[i] = msgspec.structs.replace(pod, annotations=annotations)
        world = msgspec.structs.replace(self.world, pods=pods)
        return self._swap(world, "status", "pod_redirection", ("namespace", namespace), ("name", name),
                          ("status", value or "removed")), True

    def set_namespace_labels(self, name: str, set_: Mapping[str, str], remove: list[str]) -> int:
        namespaces = list(self.world.namespaces)
        for i, ns in enumerate(namespaces):
            if ns.name == name:
                labels = {k: v for k, v in ns.labels.items() if k not in remove} | dict(set_)
                namespaces[i] = Namespace(name=name, labels=labels)
                break
        else:
            raise NotFoundError(f"no namespace {name} in the world")
        world = msgspec.structs.replace(self.world, namespaces=namespaces)
        return self._swap(world, "labels", "namespace_labels", ("namespace", name))

    def add_policy(self, policy_json: bytes) -> int:
        pol = decode_fragment(policy_json, Policy, "policy", "$")
        policies = [p for p in self.world.policies if p.key != pol.key] + [pol]
        world = msgspec.structs.replace(self.world, policies=policies)
        return self._swap(world, f"policy {pol.key}", "policy_added", ("namespace", pol.namespace),
                          ("name", pol.name))

    def remove_policy(self, namespace: str, name: str) -> int:
        key = f"{namespace}/{name}"
        policies = [p for p in self.world.policies if p.key != key]
        if len(policies) == len(self.world.policies):
            raise NotFoundError(f"no policy {key} in the world")
        world = msgspec.structs.replace(self.world, policies=policies)
        return self._swap(world, "policy", "policy_removed", ("namespace", namespace), ("name", name))
