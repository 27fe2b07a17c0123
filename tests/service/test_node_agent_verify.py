"""The node agent's redirection verification with fakes: what each finding makes it do (rules re-applied, the
pod re-sent to ztunnel, del + add), the status it writes, the counters, and that it waits for the pod's
lifecycle lock. The real checks in a real netns are in tests/netns/test_node_agent_verify.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import trio
import trio.testing

from services.node_agent.model import STATUS_ENABLED, STATUS_PENDING, Pod
from services.node_agent.testing import FakeNode, ScriptedInspector
from services.node_agent.verify import (
    STEP_ADD,
    STEP_READD,
    STEP_RULES,
    Findings,
    RedirectionVerifier,
)
from shared.zds.types import PodUid

ZTUNNEL_PID = 4242
RULE_GONE = Findings(rules=("iptables-save nat ISTIO_OUTPUT: rule missing: -j REDIRECT",))
LISTENER_GONE = Findings(listeners=("15001/tcp: nothing listening",), listeners_checked=True)
CLEAN = Findings(listeners_checked=True)


@pytest.fixture
def node() -> Iterator[FakeNode]:
    n = FakeNode()
    try:
        yield n
    finally:
        n.close()


WEB = Pod(uid=PodUid("uid-web"), name="web", namespace="mesh", netns_path="/run/netns/web")


async def enrolled(node: FakeNode, *script: Findings) -> tuple[RedirectionVerifier, ScriptedInspector]:
    assert await node.agent.enrol(WEB) == STATUS_ENABLED
    inspector = ScriptedInspector(*script)
    verifier = RedirectionVerifier(node.agent, inspector, lambda: frozenset({ZTUNNEL_PID}), interval=0)
    return verifier, inspector


async def test_a_pod_in_place_is_counted_ok_and_left_alone(node: FakeNode) -> None:
    verifier, inspector = await enrolled(node, CLEAN)
    applies, adds = len(node.applier.calls), len(node.ztunnel.added)
    [result] = await verifier.verify_all()
    assert (result.result, result.drift, result.repairs) == ("ok", (), ())
    assert result.checks == ("rules", "listeners")
    assert inspector.calls == [frozenset({ZTUNNEL_PID})]  # listeners checked against ztunnel's pid
    assert (len(node.applier.calls), len(node.ztunnel.added)) == (applies, adds)
    assert verifier.metrics.verified == {("web", "mesh", "ok"): 1}
    assert verifier.metrics.repaired == {}


async def test_rule_drift_is_repaired_by_reapplying(node: FakeNode) -> None:
    verifier, _ = await enrolled(node, RULE_GONE, CLEAN)
    applies = len(node.applier.calls)
    result = await verifier.verify_pod(WEB.uid)
    assert result is not None and result.result == "repaired"
    assert result.drift == RULE_GONE.rules
    assert result.repairs == (f"{STEP_RULES}: unchanged",)  # the fake applier has nothing to change
    assert [c[0] for c in node.applier.calls[applies:]] == ["apply"]
    assert node.ztunnel.deleted == []
    assert verifier.metrics.verified == {("web", "mesh", "drift"): 1}
    assert verifier.metrics.repaired == {("web", "mesh", "rules", "success"): 1}
    assert verifier.last[WEB.uid] == result


async def test_missing_listeners_resend_then_del_and_add(node: FakeNode) -> None:
    verifier, _ = await enrolled(node, LISTENER_GONE, LISTENER_GONE, CLEAN)
    adds = len(node.ztunnel.added)
    result = await verifier.verify_pod(WEB.uid)
    assert result is not None and result.result == "repaired"
    assert result.repairs == (f"{STEP_ADD}: ztunnel acked", f"{STEP_READD}: ztunnel acked")
    assert [a[0] for a in node.ztunnel.added[adds:]] == [WEB.uid, WEB.uid]
    assert node.ztunnel.deleted == [WEB.uid]  # only the second step deletes
    assert node.status.current[WEB.uid] == STATUS_ENABLED
    assert verifier.metrics.repaired == {("web", "mesh", "listeners", "success"): 1}


async def test_ztunnel_refusing_the_pod_again_leaves_it_pending_and_broken(node: FakeNode) -> None:
    verifier, inspector = await enrolled(node, LISTENER_GONE)
    node.ztunnel.nack = "failure to start proxy : address in use"
    result = await verifier.verify_pod(WEB.uid)
    assert result is not None and result.result == "broken"
    assert result.repairs == (f"{STEP_ADD}: ztunnel did not take it (pending, retrying)",)
    assert "ztunnel has not taken the pod again (pending, retrying)" in result.remaining
    assert node.agent.status_of(WEB.uid) == STATUS_PENDING
    assert node.status.current[WEB.uid] == STATUS_PENDING  # upstream's state for "rules, no ztunnel"
    assert len(inspector.calls) == 1  # pending now: the retry loop resends it, no del + add
    assert verifier.metrics.repaired == {("web", "mesh", "listeners", "failure"): 1}


async def test_rules_still_wrong_after_reapplying_are_reported_not_looped(node: FakeNode) -> None:
    verifier, _ = await enrolled(node, RULE_GONE)
    result = await verifier.verify_pod(WEB.uid)
    assert result is not None and result.result == "broken"
    assert result.remaining == RULE_GONE.rules
    assert verifier.metrics.repaired == {("web", "mesh", "rules", "failure"): 1}


async def test_verification_waits_for_the_pods_lock_and_skips_a_removed_pod(node: FakeNode) -> None:
    verifier, inspector = await enrolled(node, CLEAN)
    results: list[object] = []

    async def verify() -> None:
        results.append(await verifier.verify_pod(WEB.uid))

    async with trio.open_nursery() as nursery, node.agent.locked_pod(WEB.uid) as state:
        assert state is not None
        nursery.start_soon(verify)
        await trio.testing.wait_all_tasks_blocked()
        assert inspector.calls == []  # an add or delete of the pod holds the lock: no inspection
        node.agent.pods.pop(WEB.uid)  # the pod left while the verification waited
    assert results == [None]
    assert inspector.calls == []


async def test_no_connected_ztunnel_checks_rules_only(node: FakeNode) -> None:
    assert await node.agent.enrol(WEB) == STATUS_ENABLED
    inspector = ScriptedInspector(Findings())
    verifier = RedirectionVerifier(node.agent, inspector, frozenset, interval=0)
    [result] = await verifier.verify_all()
    assert result.checks == ("rules",) and result.result == "ok"
    assert inspector.calls == [None]


async def test_the_periodic_loop_verifies_every_interval(node: FakeNode, autojump_clock: object) -> None:
    verifier, inspector = await enrolled(node, CLEAN)
    verifier.interval = 60.0
    async with trio.open_nursery() as nursery:
        await nursery.start(verifier.run)
        await trio.sleep(59)
        assert inspector.calls == []
        await trio.sleep(62)
        assert len(inspector.calls) == 2
        nursery.cancel_scope.cancel()


async def test_del_and_add_is_not_repeated_when_it_did_not_help_last_time(node: FakeNode) -> None:
    verifier, _ = await enrolled(node, LISTENER_GONE)
    first = await verifier.verify_pod(WEB.uid)
    assert first is not None and first.result == "broken"
    assert [r.split(":")[0] for r in first.repairs] == [STEP_ADD, STEP_READD]
    second = await verifier.verify_pod(WEB.uid)
    assert second is not None and second.result == "broken"
    assert [r.split(":")[0] for r in second.repairs] == [STEP_ADD]  # no second cut of the pod's connections
    assert node.ztunnel.deleted == [WEB.uid]


async def test_a_verification_that_waited_on_a_removed_pods_lock_takes_the_new_one(node: FakeNode) -> None:
    verifier, inspector = await enrolled(node, CLEAN)
    old = node.agent._lock(WEB.uid)
    results: list[object] = []

    async def verify() -> None:
        results.append(await verifier.verify_pod(WEB.uid))

    async with trio.open_nursery() as nursery:
        await old.acquire()  # an unenrol holds the pod's lock ...
        nursery.start_soon(verify)
        await trio.testing.wait_all_tasks_blocked()
        node.agent._locks.pop(WEB.uid)  # ... drops it as it ends, and the pod's next enrol holds a new one
        new = node.agent._lock(WEB.uid)
        await new.acquire()
        old.release()
        await trio.testing.wait_all_tasks_blocked()
        assert inspector.calls == []  # not alongside that enrol
        new.release()
    assert len(results) == 1 and inspector.calls == [frozenset({ZTUNNEL_PID})]
