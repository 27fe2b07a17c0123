"""Redirection verified, not assumed: what a pod's netns holds compared with what the agent installed, and
the repair of any difference.

Theory of operation
-------------------
Two checks per enrolled pod, both run in a worker thread switched into the pod's netns:

* rules: our part of `iptables-save` per family (rule texts, no counters) against `rules.expected_saved`,
  plus the fwmark policy rule and its local route; every difference is named (`describe_drift`). With the
  nftables backend the policy routes and the presence of our tables are checked (their contents are not
  compared: a repair replaces them whole anyway);
* listeners: ztunnel's sockets (15001, 15006, 15008 over TCP; 15053 over TCP and UDP when the pod's DNS is
  captured) must be listed in the netns's /proc/thread-self/net/{tcp,tcp6,udp,udp6} with an inode that one
  of ztunnel's processes (the ZDS peers' pids, from SO_PEERCRED) holds as an fd. Only for a pod that is
  `enabled` while a ztunnel is connected: a `pending` pod is the retry loop's.

`RedirectionVerifier` runs both for every enrolled pod, every `interval` seconds (0: never) and on demand
(`verify_all`, the health server's POST /verify). Each pod is verified under its lifecycle lock
(`NodeAgent.locked_pod`), so a verification never interleaves with the pod's add, retry or delete. On
drift it repairs, one step at a time, re-checking after each (`next_repair`, at most three steps):

    rules drift                      -> rules re-applied (the applier's reconcile: one atomic restore)
    listeners missing / not ztunnel's -> the pod re-sent to ztunnel (its add, through the ZDS server's
                                         normal path: ztunnel opens the listeners of a pod it does not run)
    listeners still wrong after that  -> del then add (ztunnel still ran the pod with a broken listener set);
                                         not again while the same problems outlived it last time

A re-send ztunnel does not ACK leaves the pod `pending` (written to its status; the retry loop resends), as
enrolment does; a successful one writes `enabled` again. Upstream's `ambient.istio.io/redirection` has no
state for "repaired", so a repair is logged (once, with what was wrong and what was done) and counted
(`istio_cni_redirection_verified_total`, `istio_cni_redirection_repaired_total`), never annotated.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from functools import partial
from typing import TYPE_CHECKING, Protocol

import msgspec
import trio
from pyroute2 import IPRoute

from services.node_agent.apply import Backend, NetnsRuleApplier, _route_present, in_netns
from services.node_agent.errors import NetnsGoneError, NodeAgentError, RuleApplyError
from services.node_agent.lifecycle import NodeAgent, PodState
from services.node_agent.model import STATUS_ENABLED
from services.node_agent.rules import PodRedirect, expected_saved, families, render_nft, resolve_redirect
from shared.zds.types import PodUid

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

log = logging.getLogger("node_agent.verify")

DEFAULT_VERIFY_INTERVAL = 60.0

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
PROXY_PORTS = (15001, 15006, 15008)
DNS_PORT = 15053


def expected_listeners(redirect: PodRedirect) -> tuple[str, ...]:
    """The sockets ztunnel must hold in a pod with these redirection choices, as `PORT/PROTO`."""
    wanted = [f"{port}/tcp" for port in PROXY_PORTS]
    if redirect.dns_capture:
        wanted += [f"{DNS_PORT}/tcp", f"{DNS_PORT}/udp"]
    return tuple(wanted)


def parse_proc_net(text: str, proto: str) -> dict[str, set[int]]:
    """`PORT/PROTO` -> socket inodes of the listening (TCP) or unconnected (UDP) sockets in a
    /proc/net/{tcp,tcp6,udp,udp6} listing."""
    state = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
    found: dict[str, set[int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != state:
            continue
        port = int(fields[1].rsplit(":", 1)[1], 16)
        found.setdefault(f"{port}/{proto}", set()).add(int(fields[9]))
    return found


def listeners_here() -> dict[str, set[int]]:
    """The listening sockets of the calling thread's netns (use inside `shared.netns.entered`)."""
    found: dict[str, set[int]] = {}
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                text = f.read()
        except OSError:
            continue
        for key, inodes in parse_proc_net(text, proto).items():
            found.setdefault(key, set()).update(inodes)
    return found


def socket_inodes(pids: Iterable[int], proc: str = "/proc", *, wanted: set[int] | None = None) -> set[int]:
    """Inodes of the sockets the processes `pids` hold as fds; with `wanted`, only those among them, and the
    scan stops once all are found (a ztunnel holding 10,000 connections has as many fds to read)."""
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{proc}/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{proc}/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inode = int(target[8:-1])
                        if wanted is None or inode in wanted:
                            inodes.add(inode)
                            if wanted is not None and inodes >= wanted:
                                return inodes
    return inodes


def listener_problems(
    expected: Iterable[str], bound: Mapping[str, set[int]], ztunnel_inodes: set[int]
) -> list[str]:
    """What is wrong with ztunnel's listeners: each expected socket nobody holds, or held by another
    process than ztunnel."""
    problems = []
    for key in expected:
        inodes = bound.get(key, set())
        if not inodes:
            problems.append(f"{key}: nothing listening")
        elif not inodes & ztunnel_inodes:
            problems.append(f"{key}: bound, but not by ztunnel")
    return problems


def describe_drift(
    binary: str, have: Mapping[tuple[str, str], list[str]], want: Mapping[tuple[str, str], list[str]]
) -> list[str]:
    """Every difference between our rules as the kernel lists them (`have`) and as rendered (`want`)."""
    problems = []
    for key in sorted(set(have) | set(want)):
        table, chain = key
        got, wanted = have.get(key), want.get(key)
        where = f"{binary} {table} {chain}"
        if got is None:
            problems.append(f"{where}: chain missing")
            continue
        if wanted is None:
            problems.append(f"{where}: unexpected chain or jump ({len(got)} rules)")
            continue
        missing = [r for r in wanted if r not in got]
        extra = [r for r in got if r not in wanted]
        problems += [f"{where}: rule missing: {r}" for r in missing]
        problems += [f"{where}: unexpected rule: {r}" for r in extra]
        if not missing and not extra and got != wanted:
            problems.append(f"{where}: rules out of order")
    return problems


def rule_problems_here(applier: NetnsRuleApplier, redirect: PodRedirect) -> list[str]:
    """Rule and policy-route drift in the calling thread's netns."""
    problems: list[str] = []
    with IPRoute() as ipr:
        for route in applier.routes_here():
            rule_ok, route_ok = _route_present(ipr, route)
            if not rule_ok:
                v = route.family.value
                problems.append(f"ip rule fwmark {route.fwmark:#x} lookup {route.table} (v{v}) missing")
            if not route_ok:
                problems.append(f"local route in table {route.table} (v{route.family.value}) missing")
    if applier.backend is Backend.NFTABLES:
        script = render_nft(redirect, applier.settings).splitlines()
        wanted = {line.split()[-1] for line in script if line.startswith("add table inet ")}
        present = applier.nft_tables_here()
        problems += [f"nft table inet {name}: missing" for name in sorted(wanted - present)]
        problems += [f"nft table inet {name}: unexpected" for name in sorted(present - wanted)]
        return problems
    for family, have in applier.saved_here().items():
        ours = family in families(applier.settings)
        want = expected_saved(redirect, applier.settings, family) if ours else {}
        problems += describe_drift(family.save_binary, have, want)
    return problems


class Findings(msgspec.Struct, frozen=True, kw_only=True):
    """What one inspection of a pod found wrong, by kind; empty tuples: in place."""

    rules: tuple[str, ...] = ()
    listeners: tuple[str, ...] = ()
    listeners_checked: bool = False

    @property
    def problems(self) -> list[str]:
        return [*self.rules, *self.listeners]

    @property
    def checks(self) -> tuple[str, ...]:
        return ("rules", "listeners") if self.listeners_checked else ("rules",)


def inspect_here(
    applier: NetnsRuleApplier, redirect: PodRedirect, ztunnel_pids: Iterable[int] | None
) -> Findings:
    """Everything wrong with one pod's redirection (use inside `shared.netns.entered`); listeners are
    checked only when `ztunnel_pids` is given (the pod is enabled)."""
    rules = rule_problems_here(applier, redirect)
    if ztunnel_pids is None:
        return Findings(rules=tuple(rules))
    expected = expected_listeners(redirect)
    bound = listeners_here()
    candidates = set().union(*(bound.get(key, set()) for key in expected))
    held = socket_inodes(ztunnel_pids, wanted=candidates) if candidates else set()
    listeners = listener_problems(expected, bound, held)
    return Findings(rules=tuple(rules), listeners=tuple(listeners), listeners_checked=True)


async def inspect(
    applier: NetnsRuleApplier, netns_fd: int, redirect: PodRedirect, ztunnel_pids: Iterable[int] | None
) -> Findings:
    """`inspect_here` in a worker thread switched into `netns_fd`.

    Raises:
        NetnsGoneError: the namespace cannot be entered.
    """
    pids = None if ztunnel_pids is None else tuple(ztunnel_pids)
    return await trio.to_thread.run_sync(in_netns, netns_fd, partial(inspect_here, applier, redirect, pids))


class Inspector(Protocol):
    """Inspects one pod's netns (the real one: `NetnsInspector`; tests give a scripted one)."""

    async def inspect(
        self, netns_fd: int, redirect: PodRedirect, ztunnel_pids: frozenset[int] | None
    ) -> Findings:
        """Raises NetnsGoneError when the namespace cannot be entered."""
        ...


class NetnsInspector:
    """The real Inspector: `inspect` with the agent's rule applier (its settings and backend)."""

    def __init__(self, applier: NetnsRuleApplier) -> None:
        self.applier = applier

    async def inspect(
        self, netns_fd: int, redirect: PodRedirect, ztunnel_pids: frozenset[int] | None
    ) -> Findings:
        return await inspect(self.applier, netns_fd, redirect, ztunnel_pids)


# --- repair ----------------------------------------------------------------------------------------------

STEP_RULES = "rules re-applied"
STEP_ADD = "pod re-sent to ztunnel"
STEP_READD = "pod deleted from and re-sent to ztunnel"

RESULT_OK = "ok"
RESULT_REPAIRED = "repaired"
RESULT_BROKEN = "broken"
RESULT_ERROR = "error"


def next_repair(findings: Findings, done: Sequence[str], *, readd: bool = True) -> str | None:
    """The next repair step for what an inspection found, given the steps already taken for this pod in
    this verification; None: nothing (more) to do. Each step is taken at most once; the del + add step
    (which drops the pod's open connections) only with `readd`."""
    if findings.rules and STEP_RULES not in done:
        return STEP_RULES
    if findings.listeners:
        if STEP_ADD not in done:
            return STEP_ADD
        if STEP_READD not in done and readd:
            return STEP_READD
    return None


def readd_allowed(previous: PodVerification | None, findings: Findings) -> bool:
    """Whether del + add may be tried: not when the previous verification already tried it and found the
    same listener problems afterwards (a ztunnel that cannot bind them would otherwise lose the pod's
    connections at every verification for nothing)."""
    if previous is None or previous.result != RESULT_BROKEN:
        return True
    tried = any(r.startswith(f"{STEP_READD}:") for r in previous.repairs)
    return not (tried and set(findings.listeners) <= set(previous.remaining))


def outcome_of(first: Findings, last: Findings, pending: bool) -> str:
    """A verification's result: ok (nothing found), repaired (all of it gone after the repair), broken."""
    if not first.problems:
        return RESULT_OK
    if last.problems or pending:
        return RESULT_BROKEN
    return RESULT_REPAIRED


class PodVerification(msgspec.Struct, frozen=True, kw_only=True):
    """One pod's verification, as POST /verify answers it."""

    namespace: str
    name: str
    uid: str
    checks: tuple[str, ...]
    drift: tuple[str, ...]
    """What was wrong when the verification started."""
    repairs: tuple[str, ...]
    """Each step taken, with its outcome (`rules re-applied: repaired`)."""
    remaining: tuple[str, ...]
    """What is still wrong afterwards (empty unless `result` is broken or error)."""
    result: str
    """ok, repaired, broken (still wrong after the repair) or error (the pod's netns could not be read)."""


class VerifyMetrics:
    """The counters of the verification, rendered for the health server's /metrics.

    istio_cni_redirection_verified_total{pod,namespace,result}: one per pod verification; result ok (in
        place), drift (something was wrong) or error (the netns could not be inspected);
    istio_cni_redirection_repaired_total{pod,namespace,type,result}: one per repaired kind of drift; type
        rules or listeners, result success or failure.
    """

    def __init__(self) -> None:
        self.verified: dict[tuple[str, str, str], int] = {}
        self.repaired: dict[tuple[str, str, str, str], int] = {}

    def count_verified(self, pod: str, namespace: str, result: str) -> None:
        key = (pod, namespace, result)
        self.verified[key] = self.verified.get(key, 0) + 1

    def count_repaired(self, pod: str, namespace: str, kind: str, success: bool) -> None:
        key = (pod, namespace, kind, "success" if success else "failure")
        self.repaired[key] = self.repaired.get(key, 0) + 1

    def collect(self) -> Iterator[Metric]:
        from prometheus_client.core import CounterMetricFamily

        verified = CounterMetricFamily(
            "istio_cni_redirection_verified", "Pod redirection verifications by the node agent, by result",
            labels=("pod", "namespace", "result"))
        for key, value in sorted(self.verified.items()):
            verified.add_metric(list(key), value)
        repaired = CounterMetricFamily(
            "istio_cni_redirection_repaired", "Pod redirection drift repaired by the node agent",
            labels=("pod", "namespace", "type", "result"))
        for rkey, value in sorted(self.repaired.items()):
            repaired.add_metric(list(rkey), value)
        yield verified
        yield repaired

    def render(self) -> bytes:
        """The Prometheus text exposition of both families."""
        from prometheus_client import CollectorRegistry, generate_latest

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self)
        return generate_latest(registry)


class RedirectionVerifier:
    """The periodic and on-demand verification of every enrolled pod; see the module docstring.

    Args:
        agent: the lifecycle (its pods, netns cache, rule applier, ZDS link and per-pod locks).
        inspector: inspects one pod's netns.
        ztunnel_pids: the pids of the connected ztunnels (`ZdsServer.peer_pids`).
        interval: seconds between two verifications of every pod; 0 (or less): only on demand.
    """

    def __init__(
        self,
        agent: NodeAgent,
        inspector: Inspector,
        ztunnel_pids: Callable[[], frozenset[int]],
        *,
        interval: float = DEFAULT_VERIFY_INTERVAL,
    ) -> None:
        self.agent = agent
        self.inspector = inspector
        self.ztunnel_pids = ztunnel_pids
        self.interval = interval
        self.metrics = VerifyMetrics()
        self.last: dict[PodUid, PodVerification] = {}
        self._run_lock = trio.Lock()

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Verify every pod each `interval` seconds until cancelled (returns at once when it is 0)."""
        task_status.started()
        if self.interval <= 0:
            return
        while True:
            await trio.sleep(self.interval)
            await self.verify_all()

    async def verify_all(self) -> list[PodVerification]:
        """Verify (and repair) every enrolled pod now, one after the other."""
        async with self._run_lock:
            results = []
            for uid in list(self.agent.pods):
                result = await self.verify_pod(uid)
                if result is not None:
                    results.append(result)
            for uid in [u for u in self.last if u not in self.agent.pods]:
                del self.last[uid]
            return results

    async def verify_pod(self, uid: PodUid) -> PodVerification | None:
        """Verify and repair one pod under its lifecycle lock; None when it is not enrolled (any more)."""
        async with self.agent.locked_pod(uid) as state:
            entry = self.agent.cache.get(uid)
            if state is None or entry is None or entry.netns_fd is None:
                return None
            result = await self._verify_locked(state, entry.netns_fd)
        self.last[uid] = result
        return result

    async def _verify_locked(self, state: PodState, fd: int) -> PodVerification:
        pod = state.pod
        try:
            redirect = resolve_redirect(pod.annotations, self.agent.settings)
            first = await self._inspect(state, fd, redirect)
        except NodeAgentError as exc:
            self.metrics.count_verified(pod.name, pod.namespace, RESULT_ERROR)
            log.warning("pod redirection could not be verified",
                        extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
            return PodVerification(namespace=pod.namespace, name=pod.name, uid=pod.uid, checks=(), drift=(),
                                   repairs=(), remaining=(str(exc),), result=RESULT_ERROR)
        self.metrics.count_verified(pod.name, pod.namespace, "drift" if first.problems else RESULT_OK)
        last, steps, repairs = first, list[str](), list[str]()
        readd = readd_allowed(self.last.get(pod.uid), first)
        while (step := next_repair(last, steps, readd=readd)) is not None:
            steps.append(step)
            repairs.append(f"{step}: {await self._repair(step, state, fd, redirect)}")
            if step != STEP_RULES and state.status != STATUS_ENABLED:
                break  # ztunnel did not take the pod: pending now, its retry loop resends it
            try:
                last = await self._inspect(state, fd, redirect)
            except NodeAgentError as exc:
                last = Findings(rules=(f"could not inspect again: {exc}",))
                break
        pending = state.status != STATUS_ENABLED and bool(first.listeners)
        remaining = last.problems + (["ztunnel has not taken the pod again (pending, retrying)"]
                                     if pending else [])
        result = outcome_of(first, last, pending)
        if first.rules:
            self.metrics.count_repaired(pod.name, pod.namespace, "rules", not last.rules)
        if first.listeners:
            fixed = not last.listeners and not pending
            self.metrics.count_repaired(pod.name, pod.namespace, "listeners", fixed)
        fields = [*pod.log_fields(), ("drift", "; ".join(first.problems)), ("repair", "; ".join(repairs))]
        if result == RESULT_REPAIRED:
            log.warning("pod redirection drift repaired", extra={"fields": fields})
        elif result == RESULT_BROKEN:
            log.error("pod redirection drift not repaired",
                      extra={"fields": [*fields, ("remaining", "; ".join(remaining))]})
        return PodVerification(namespace=pod.namespace, name=pod.name, uid=pod.uid, checks=first.checks,
                               drift=tuple(first.problems), repairs=tuple(repairs),
                               remaining=tuple(remaining) if result == RESULT_BROKEN else (), result=result)

    async def _inspect(self, state: PodState, fd: int, redirect: PodRedirect) -> Findings:
        pids = self.ztunnel_pids() if state.status == STATUS_ENABLED else frozenset()
        return await self.inspector.inspect(fd, redirect, pids or None)

    async def _repair(self, step: str, state: PodState, fd: int, redirect: PodRedirect) -> str:
        """Take one repair step; its outcome in words."""
        if step == STEP_RULES:
            try:
                return (await self.agent.applier.apply(fd, redirect)).value
            except (RuleApplyError, NetnsGoneError) as exc:
                return f"failed: {exc}"
        if step == STEP_READD:
            await self.agent.ztunnel.del_workload(state.pod.uid)
        status = await self.agent.resend_locked(state)  # a ZDS failure leaves the pod pending, retried
        return "ztunnel acked" if status == STATUS_ENABLED else "ztunnel did not take it (pending, retrying)"
