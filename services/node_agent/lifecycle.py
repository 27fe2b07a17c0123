"""Pod lifecycle of the node agent: enrol, report, retry, remove, restore after a restart.

Theory of operation
-------------------
Pod sources (the control plane's pod watch, the CNI-event endpoint) call `pod_changed` / `pod_deleted` /
`cni_add`; the agent decides eligibility and moves the pod between three states:

    absent --enrol--> pending --ztunnel ACK--> enabled --unenrol--> absent
                       ^  | NACK / no ztunnel: retried with per-pod backoff (5 ms doubling to 5 s)

Enrolment (`AddPodToMesh`): put a placeholder in the netns cache, open the pod's netns, install the rules
inside it, store the handle in the cache, send `add` to the newest ztunnel. A bad netns or a failed rule
install is final for this attempt: the pod leaves the cache, nothing stays installed, the caller gets a
non-retryable `EnrolmentError`. A ztunnel that is absent, NACKs or times out leaves the rules in place
(fail closed: the pod's traffic goes to ports nobody serves rather than around the mesh), the pod reported
`pending`, and a retry task resends `add` until ztunnel ACKs; then it is reported `enabled`.

Removal (`RemovePodFromMesh`): take the handle from the cache, delete the rules in the netns unless the pod
is gone, send `del` to every ztunnel, clear the status. Each pod's operations are serialised by a per-pod
lock; different pods never wait for each other, and an error with one pod is logged, never fatal. A delete
is never dropped while an operation of the pod is under way or waiting for its lock: it queues behind it,
so a pod whose enrolment had not reached the cache yet cannot stay in later snapshots (upstream's
istio#56738, where such a pod kept ztunnel from ever becoming ready).

The seams are Protocols, so service tests run the whole lifecycle with fakes: `RuleApplier` (apply.py),
`ZtunnelLink` (the ZDS server), `StatusReporter` (the control plane's pod status, pod_status.py),
`NetnsOpener`.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import msgspec
import trio

from services.node_agent.apply import RuleApplier
from services.node_agent.cache import NetnsCache
from services.node_agent.eligibility import DEFAULT_SYSTEM_NAMESPACE, Decision, decide
from services.node_agent.errors import EnrolmentError, NetnsGoneError, NodeAgentError, RuleApplyError
from services.node_agent.model import ANNOTATION_REDIRECTION, STATUS_ENABLED, STATUS_PENDING, Pod
from services.node_agent.netns_scan import find_pod_netns
from services.node_agent.rules import RuleSettings, resolve_redirect
from shared.netns import NetnsError, netns_id, open_netns
from shared.zds.errors import ZdsError
from shared.zds.types import PodUid, WorkloadInfo

log = logging.getLogger("node_agent.lifecycle")

RETRY_INITIAL = 0.005
RETRY_MAX = 5.0


class ZtunnelLink(Protocol):
    """The ZDS server as the lifecycle uses it (services.node_agent.zds_server.ZdsServer satisfies it)."""

    @property
    def connected(self) -> bool: ...

    async def add_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int) -> None: ...

    async def del_workload(self, uid: PodUid) -> None: ...


class StatusReporter(Protocol):
    """Writes the `ambient.istio.io/redirection` pod annotation: "pending", "enabled" or None (removed)."""

    async def report(self, pod: Pod, status: str | None) -> None: ...


class NetnsOpener(Protocol):
    """Opens a pod's netns handle; raises NetnsGoneError when it cannot."""

    async def open(self, pod: Pod) -> int: ...


class PodSink(Protocol):
    """What a pod source feeds: the lifecycle."""

    async def initial_pods(self, pods: list[tuple[Pod, Mapping[str, str]]]) -> None: ...

    async def pod_changed(self, pod: Pod, namespace_labels: Mapping[str, str]) -> Decision: ...

    async def pod_deleted(self, pod: Pod) -> None: ...


class PodSource(Protocol):
    """A source of this node's pods (the control plane's pod watch, a Kubernetes informer, ...)."""

    async def run(
        self, sink: PodSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        """Deliver the first full listing to `sink.initial_pods`, then call started(), then deliver every
        change until cancelled."""
        ...

    def lookup(self, namespace: str, name: str) -> tuple[Pod, Mapping[str, str]] | None:
        """The pod and its namespace's labels, if the source knows it (for the CNI endpoint)."""
        ...


class LogStatusReporter:
    """StatusReporter for a node without a control plane: the status goes to the log only."""

    async def report(self, pod: Pod, status: str | None) -> None:
        log.info("pod redirection status",
                 extra={"fields": [*pod.log_fields(), ("status", status or "removed")]})


class PathNetnsOpener:
    """Opens `pod.netns_path` (under an optional host mount prefix, upstream's /host); without a path, finds
    the namespace holding the pod's IPs (netns_scan) when `scan` is on."""

    def __init__(self, prefix: str = "", *, scan: bool = True) -> None:
        self.prefix = prefix
        self.scan = scan

    async def open(self, pod: Pod) -> int:
        if not pod.netns_path:
            if not self.scan:
                raise NetnsGoneError("no network namespace path known (no CNI event yet)")
            fd, path = await find_pod_netns(pod.ips, prefix=self.prefix)  # NetnsGoneError naming no pod
            log.info("found the pod's network namespace",
                     extra={"fields": [*pod.log_fields(), ("netns", path)]})
            return fd
        path = pod.netns_path
        if self.prefix and path.startswith("/"):
            path = self.prefix.rstrip("/") + path
        try:
            return open_netns(path)
        except NetnsError as exc:
            raise NetnsGoneError(str(exc)) from None


class PodState(msgspec.Struct, kw_only=True):
    pod: Pod
    status: str
    delay: float = RETRY_INITIAL
    due: float = 0.0


class NodeAgent:
    """The pod lifecycle; see the module docstring. Implements PodSink."""

    def __init__(
        self,
        *,
        applier: RuleApplier,
        ztunnel: ZtunnelLink,
        status: StatusReporter,
        settings: RuleSettings,
        opener: NetnsOpener | None = None,
        cache: NetnsCache | None = None,
        system_namespace: str = DEFAULT_SYSTEM_NAMESPACE,
        retry_initial: float = RETRY_INITIAL,
        retry_max: float = RETRY_MAX,
        reconcile_on_start: bool = True,
    ) -> None:
        self.reconcile_on_start = reconcile_on_start
        self.applier = applier
        self.ztunnel = ztunnel
        self.status = status
        self.settings = settings
        self.opener: NetnsOpener = opener or PathNetnsOpener()
        self.cache = cache if cache is not None else NetnsCache()
        self.system_namespace = system_namespace
        self.retry_initial, self.retry_max = retry_initial, retry_max
        self.pods: dict[PodUid, PodState] = {}
        self._locks: dict[PodUid, trio.Lock] = {}
        self._wakeup = trio.Event()

    # --- queries ----------------------------------------------------------------------------------------

    def status_of(self, uid: PodUid) -> str | None:
        state = self.pods.get(uid)
        return state.status if state else None

    # --- PodSink ----------------------------------------------------------------------------------------

    async def pod_changed(self, pod: Pod, namespace_labels: Mapping[str, str]) -> Decision:
        """Re-evaluate a pod after any change of it or its namespace's labels; enrol or remove accordingly.
        Errors are logged (the source has nothing to answer); a pending pod is retried by `run`."""
        decision = decide(pod, namespace_labels, system_namespace=self.system_namespace)
        enrolled = pod.uid in self.pods
        try:
            if decision.eligible and not enrolled:
                known = self.cache.get(pod.uid)
                if pod.netns_path is None and known is None and not pod.ips:
                    log.info(
                        "pod is ambient; waiting for its CNI event or netns",
                        extra={"fields": [*pod.log_fields(), ("reason", decision.reason)]},
                    )
                    return decision
                await self.enrol(pod)
            elif decision.eligible:
                state = self.pods[pod.uid]
                state.pod = pod
                if pod.annotations.get(ANNOTATION_REDIRECTION) != state.status:
                    # the control plane lost the status (a restarted stub) or has an old one: write it again,
                    # as upstream re-adds an ambient pod that is not annotated `enabled`
                    await self._report(pod, state.status)
            elif enrolled:
                log.info("pod leaves the mesh",
                         extra={"fields": [*pod.log_fields(), ("reason", decision.reason)]})
                await self.unenrol(pod, pod_gone=pod.terminated)
        except NodeAgentError as exc:
            log.warning("pod change not applied", extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
        return decision

    async def pod_deleted(self, pod: Pod) -> None:
        """Remove a deleted pod. An operation on it still under way or waiting (its lock exists: an
        enrolment that has not reached the cache yet) counts as known, so the delete queues behind it
        instead of being dropped, and the pod cannot end up in a later snapshot (upstream istio#56738)."""
        if pod.uid in self.pods or pod.uid in self.cache or pod.uid in self._locks:
            await self.unenrol(pod, pod_gone=True)

    async def cni_add(self, pod: Pod, namespace_labels: Mapping[str, str] | None) -> Decision:
        """The CNI ADD path: enrol now and tell the caller whether it worked.

        `namespace_labels` None means no pod watch vouches for the pod: the CNI caller's request is taken as
        the decision that it is ambient (the lab, playing kubelet, only calls for ambient pods).

        Raises:
            EnrolmentError: the pod could not be enrolled (the CNI plugin turns this into a CNI error). A
                pod left `pending` because ztunnel has not acked yet is not an error (rules are in place).
        """
        if namespace_labels is None:
            decision = Decision(eligible=True, reason="CNI event")
        else:
            decision = decide(pod, namespace_labels, system_namespace=self.system_namespace)
        if not decision.eligible:
            return decision
        await self.enrol(pod)
        return decision

    # --- enrol / unenrol --------------------------------------------------------------------------------

    def _lock(self, uid: PodUid) -> trio.Lock:
        return self._locks.setdefault(uid, trio.Lock())

    @contextlib.asynccontextmanager
    async def locked_pod(self, uid: PodUid) -> AsyncIterator[PodState | None]:
        """Hold the pod's lock (the one enrol, retry and removal take) and yield its state, None when it is
        not enrolled (any more): for work on an enrolled pod that must not race with its add or delete."""
        while True:
            lock = self._lock(uid)
            await lock.acquire()
            if self._locks.get(uid) is lock:
                break
            lock.release()  # the pod was removed meanwhile (its lock dropped): take the current one
        try:
            yield self.pods.get(uid)
        finally:
            lock.release()
            if uid not in self.pods and self._locks.get(uid) is lock and not lock.statistics().tasks_waiting:
                self._locks.pop(uid, None)

    async def resend_locked(self, state: PodState) -> str:
        """Send an enrolled pod to ztunnel again (its `add`, with the cached netns handle), as enrolment
        does: `enabled` on the ACK, else `pending` and retried. Call inside `locked_pod`. Returns the
        pod's status."""
        entry = self.cache.get(state.pod.uid)
        if entry is None or entry.netns_fd is None:
            return state.status
        await self._send_add(state, entry.netns_fd)
        return state.status

    async def enrol(self, pod: Pod) -> str:
        """AddPodToMesh. Returns the resulting status ("enabled" or "pending").

        Raises:
            EnrolmentError(retryable=False): bad netns, bad annotations, rules not installable.
        """
        async with self._lock(pod.uid):
            return await self._enrol_locked(pod)

    async def _enrol_locked(self, pod: Pod) -> str:
        was_cached = pod.uid in self.cache
        was_enrolled = pod.uid in self.pods
        self.cache.ensure(pod.uid, pod.workload_info)
        try:
            redirect = resolve_redirect(pod.annotations, self.settings)
            fd = await self._open(pod)
        except NodeAgentError as exc:
            if not was_cached:  # a `keep` placeholder from a restart stays: ztunnel may still serve the pod
                self._forget(pod.uid)
            raise EnrolmentError(str(exc), retryable=False) from None  # the caller names the pod
        try:
            outcome = await self.applier.apply(fd, redirect)
        except (RuleApplyError, NetnsGoneError) as exc:
            os.close(fd)
            self._forget(pod.uid)
            if was_enrolled:  # its rules were rolled back: ztunnel must not keep serving it as enrolled
                await self.ztunnel.del_workload(pod.uid)
                await self._report(pod, None)
            raise EnrolmentError(
                f"redirection not installed: {exc}", retryable=False
            ) from None
        except BaseException:
            os.close(fd)
            self._forget(pod.uid)
            raise
        log.info("pod redirection", extra={"fields": [*pod.log_fields(), ("outcome", outcome.value)]})
        fd = self.cache.upsert(pod.uid, pod.workload_info, fd)
        state = self.pods.get(pod.uid)
        if state is None:
            state = self.pods[pod.uid] = PodState(pod=pod, status=STATUS_PENDING)
        state.pod = pod
        await self._send_add(state, fd)
        return state.status

    async def _open(self, pod: Pod) -> int:
        known = self.cache.get(pod.uid)
        if pod.netns_path is None and known is not None and known.netns_fd is not None:
            return os.dup(known.netns_fd)
        return await self._open_netns(pod)

    async def _open_netns(self, pod: Pod) -> int:
        """The opener's handle for `pod`. The CNI-reported path is taken as given; a namespace found by
        the scan (no path: found by the pod's IPs) that the cache holds for another pod is refused: it
        is that pod's (a stale namespace with a reused IP), and handing it over would put the other pod's
        traffic under this pod's identity (upstream's istio#61211).

        Raises:
            NetnsGoneError: not found, ambiguous, or another pod's.
        """
        fd = await self.opener.open(pod)
        if pod.netns_path is not None:
            return fd
        owner = self._netns_owner(fd, pod.uid)
        if owner is None:
            return fd
        os.close(fd)
        log.warning("netns scan match skipped: the namespace holding the pod's IPs is another pod's",
                    extra={"fields": [*pod.log_fields(), ("owner_uid", owner)]})
        raise NetnsGoneError(
            f"the network namespace holding {', '.join(pod.ips)} is enrolled for pod {owner}; refusing to"
            " pair this pod with it: re-add it through the CNI event (its netns path) instead"
        )

    def _netns_owner(self, fd: int, uid: PodUid) -> PodUid | None:
        """The uid of another pod whose cached netns handle is the same namespace as `fd`, if any."""
        ident = netns_id(fd)
        for entry in self.cache.snapshot():
            if entry.uid != uid and entry.netns_fd is not None and netns_id(entry.netns_fd) == ident:
                return entry.uid
        return None

    def _forget(self, uid: PodUid) -> None:
        entry = self.cache.take(uid)
        if entry is not None and entry.netns_fd is not None:
            os.close(entry.netns_fd)
        self.pods.pop(uid, None)

    async def _send_add(self, state: PodState, fd: int) -> None:
        pod = state.pod
        try:
            await self.ztunnel.add_workload(pod.uid, pod.workload_info, fd)
        except ZdsError as exc:
            retrying = state.status == STATUS_PENDING and state.due != 0.0
            state.due = trio.current_time() + state.delay
            state.delay = min(state.delay * 2, self.retry_max)
            if not retrying:
                log.warning(
                    "rules installed but ztunnel has not taken the pod; pending, retrying",
                    extra={"fields": [*pod.log_fields(), ("error", str(exc))]},
                )
                state.status = STATUS_PENDING
                await self._report(pod, STATUS_PENDING)
            self._wakeup.set()
            return
        state.status = STATUS_ENABLED
        state.delay, state.due = self.retry_initial, 0.0
        log.info("pod enrolled, ztunnel acked", extra={"fields": pod.log_fields()})
        await self._report(pod, STATUS_ENABLED)

    async def unenrol(self, pod: Pod, *, pod_gone: bool) -> None:
        """RemovePodFromMesh: rules out of the netns (unless the pod is gone), `del` to every ztunnel,
        status removed. Never raises for a pod whose netns vanished: there is nothing left to clean."""
        async with self._lock(pod.uid):
            entry = self.cache.take(pod.uid)
            self.pods.pop(pod.uid, None)
            try:
                if entry is not None and entry.netns_fd is not None and not pod_gone:
                    try:
                        await self.applier.delete(entry.netns_fd)
                    except (RuleApplyError, NetnsGoneError) as exc:
                        log.warning("removing redirection failed",
                                    extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
            finally:
                if entry is not None and entry.netns_fd is not None:
                    os.close(entry.netns_fd)
            await self.ztunnel.del_workload(pod.uid)
            await self._report(pod, None)
            log.info("pod removed from the mesh", extra={"fields": pod.log_fields()})
        self._release_lock(pod.uid)

    def _release_lock(self, uid: PodUid) -> None:
        """Forget a pod's lock once nobody holds or waits for it (a waiter keeps it, and with it the pod's
        operations serialised and its later delete honoured)."""
        lock = self._locks.get(uid)
        if lock is not None and not lock.locked() and lock.statistics().tasks_waiting == 0:
            del self._locks[uid]

    async def _report(self, pod: Pod, status: str | None) -> None:
        try:
            await self.status.report(pod, status)
        except Exception as exc:  # a status write never decides enrolment (the real reporter retries it)
            log.warning("could not report the pod's status", extra={"fields": [
                *pod.log_fields(), ("status", status or "removed"), ("error", str(exc))]})

    # --- restart ----------------------------------------------------------------------------------------

    async def initial_pods(self, pods: list[tuple[Pod, Mapping[str, str]]]) -> None:
        """A source's first listing, before the ZDS server accepts ztunnel: eligible pods whose netns can be
        found are taken as already enrolled (rules reconciled) so the first snapshot is complete; ztunnel
        receives them in it. (Upstream restores the pods annotated `enabled`. Here eligibility plus a
        findable netns stands in for it: it also covers pods enrolled through CNI events by an agent that
        had no control plane to write the annotation to.) A restored pod not annotated `enabled` is reported
        so again."""
        eligible = [
            p for p, labels in pods if decide(p, labels, system_namespace=self.system_namespace).eligible
        ]
        annotated = {p.uid for p in eligible if p.annotations.get(ANNOTATION_REDIRECTION) == STATUS_ENABLED}
        reconcile = self.reconcile_on_start
        await self.restore([p for p in eligible if p.uid in annotated], reconcile_rules=reconcile)
        # not annotated: enrolled here only if its netns exists already; else a fresh pod, enrolled later
        fresh = [p for p in eligible if p.uid not in annotated]
        await self.restore(fresh, reconcile_rules=reconcile, found_only=True)
        for pod in eligible:
            state = self.pods.get(pod.uid)
            if state is not None and pod.annotations.get(ANNOTATION_REDIRECTION) != state.status:
                await self._report(pod, state.status)

    async def restore(
        self, pods: list[Pod], *, reconcile_rules: bool = True, found_only: bool = False
    ) -> None:
        """Rebuild the cache from pods annotated `enabled` before this agent started.

        Pods whose netns can be opened go in with their handle (rules reconciled if asked); the others as a
        placeholder, so the snapshot sends `keep` for them (with `found_only`, skipped quietly: pods that were
        never enrolled, as on a fresh node). Call before the ZDS server starts serving.
        """
        for pod in pods:
            if pod.terminated:
                continue
            try:
                fd = await self._open_netns(pod)
            except NetnsGoneError as exc:
                if found_only:
                    continue
                log.warning("pod enabled before restart, netns not found; kept as is",
                            extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
                self.cache.ensure(pod.uid, pod.workload_info)
                continue
            if reconcile_rules:
                try:
                    outcome = await self.applier.apply(fd, resolve_redirect(pod.annotations, self.settings))
                    log.info("pod rules reconciled after restart",
                             extra={"fields": [*pod.log_fields(), ("outcome", outcome.value)]})
                except NodeAgentError as exc:
                    log.error("reconciling pod rules after restart failed",
                              extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
            self.cache.upsert(pod.uid, pod.workload_info, fd)
            self.pods[pod.uid] = PodState(pod=pod, status=STATUS_ENABLED)

    # --- retry loop -------------------------------------------------------------------------------------

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Retry pending pods until cancelled (per-pod exponential backoff)."""
        task_status.started()
        while True:
            pending = [s for s in self.pods.values() if s.status == STATUS_PENDING]
            if not pending:
                self._wakeup = trio.Event()
                await self._wakeup.wait()
                continue
            due = min(s.due for s in pending)
            with trio.move_on_at(due):
                self._wakeup = trio.Event()
                await self._wakeup.wait()
            now = trio.current_time()
            for state in [s for s in pending if s.due <= now]:
                await self._retry(state.pod.uid)

    async def _retry(self, uid: PodUid) -> None:
        if uid not in self.pods:  # removed meanwhile: no lock to make for it
            return
        async with self._lock(uid):
            state = self.pods.get(uid)
            entry = self.cache.get(uid)
            if state is None or state.status != STATUS_PENDING:
                return
            if entry is None or entry.netns_fd is None:  # cannot happen while pending; never spin on it
                log.error("pod pending without a netns handle; dropping it",
                          extra={"fields": state.pod.log_fields()})
                self.pods.pop(uid, None)
                return
            await self._send_add(state, entry.netns_fd)

    def close(self) -> None:
        """Close every cached netns handle; rules stay in the pods (fail closed)."""
        self.cache.close()
