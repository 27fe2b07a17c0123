"""The control plane's pod watch feeding the lifecycle (PodWatchSource with a scripted watch)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any

import msgspec
import pytest
import trio

pytest.importorskip("services.node_agent.podwatch")

from services.node_agent.eligibility import Decision
from services.node_agent.model import Pod
from services.node_agent.podwatch import PodDeleted, PodEvent, PodInfo, PodSnapshot, PodUpserted
from services.node_agent.testing import FakeNode
from services.node_agent.watch_source import PodWatchSource
from shared.zds.types import PodUid

AMBIENT = {"istio.io/dataplane-mode": "ambient"}


def info(name: str, ip: str, *, ns_labels: dict[str, str] | None = None, **kw: Any) -> PodInfo:
    return PodInfo(
        uid=f"uid-{name}",
        name=name,
        namespace="bookinfo",
        service_account=f"sa-{name}",
        node="n1",
        ips=(ip,),
        labels=kw.pop("labels", {}),
        annotations={},
        namespace_labels=AMBIENT if ns_labels is None else ns_labels,
        **kw,
    )


async def test_watch_restores_then_follows_label_changes_and_deletes() -> None:
    send, receive = trio.open_memory_channel[PodEvent](16)

    @asynccontextmanager
    async def open_watch(target: object, node: str) -> AsyncIterator[AsyncIterator[PodEvent]]:
        assert node == "n1"
        yield receive

    node = FakeNode()
    agent, ztunnel, status = node.agent, node.ztunnel, node.status
    source = PodWatchSource(None, "n1", open_watch=open_watch)
    a, b = info("a", "10.244.1.5"), info("b", "10.244.1.6")
    hostnet = info("h", "10.0.0.1", host_network=True)
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await send.send(PodSnapshot(pods=(a, hostnet)))
                await nursery.start(source.run, agent)
                # restored before any ztunnel: in the cache (the first ZDS snapshot), rules reconciled
                assert [e.uid for e in agent.cache.snapshot()] == ["uid-a"]
                assert agent.status_of(PodUid("uid-a")) == "enabled"
                assert source.lookup("bookinfo", "a") is not None and source.lookup("bookinfo", "zz") is None

                # a new ambient pod is enrolled (netns found by IP), a label change removes a pod
                await send.send(PodUpserted(pod=b))
                await send.send(PodUpserted(pod=info("a", "10.244.1.5", ns_labels={})))
                await send.send(PodDeleted(uid="uid-b", name="b", namespace="bookinfo"))
                while ztunnel.deleted != ["uid-a", "uid-b"]:
                    await trio.sleep(0.01)
                assert [u for u, *_ in ztunnel.added] == ["uid-b"]
                assert ("uid-b", "enabled") in status.history and ("uid-a", None) in status.history
                assert len(agent.cache) == 0
                nursery.cancel_scope.cancel()
    finally:
        node.close()


async def test_real_istiod_pod_watch_drives_enrolment() -> None:
    """The istiod stub's pod watch (bookinfo world, node-a) through PodWatchSource into the lifecycle."""
    from services.istiod.testing import bookinfo_world, open_test_istiod

    node = FakeNode()
    agent, ztunnel, status = node.agent, node.ztunnel, node.status
    try:
        with trio.fail_after(30):
            async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
                source = PodWatchSource(istiod.target(node="node-a"), "node-a")
                await nursery.start(source.run, agent)
                restored = {e.uid for e in agent.cache.snapshot()}
                names = {source.view[uid].name for uid in restored}
                assert "sleep-5c6d7e" in names and "legacy-app-1b2c3d" not in names
                legacy = source.lookup("legacy", "legacy-app-1b2c3d")
                assert legacy is not None
                legacy_uid = legacy[0].uid

                # labelling the namespace enrols its pod; removing the label removes it again
                istiod.store.set_namespace_labels("legacy", {"istio.io/dataplane-mode": "ambient"}, [])
                while status.current.get(legacy_uid) != "enabled":
                    await status.changed.wait()
                istiod.store.set_namespace_labels("legacy", {}, ["istio.io/dataplane-mode"])
                while legacy_uid not in ztunnel.deleted:
                    await status.changed.wait()
                assert legacy_uid not in agent.cache
                nursery.cancel_scope.cancel()
    finally:
        node.close()


class NewerEvent(msgspec.Struct, frozen=True, kw_only=True):
    """An event kind this agent does not know (a newer control plane)."""

    what: str = "pod resized"


async def test_a_bad_pod_an_unknown_event_and_a_failing_one_are_skipped_and_a_valid_pod_still_enrolled(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    send, receive = trio.open_memory_channel[Any](16)

    @asynccontextmanager
    async def open_watch(target: object, node: str) -> AsyncIterator[AsyncIterator[Any]]:
        yield receive

    node = FakeNode()
    agent, ztunnel, status = node.agent, node.ztunnel, node.status
    pod_changed = agent.pod_changed

    async def breaks_on_one_pod(pod: Pod, namespace_labels: Mapping[str, str]) -> Decision:
        if pod.name == "breaks":
            raise RuntimeError("a bug handling this pod")
        return await pod_changed(pod, namespace_labels)

    monkeypatch.setattr(agent, "pod_changed", breaks_on_one_pod)
    source = PodWatchSource(None, "n1", open_watch=open_watch)
    try:
        with trio.fail_after(10), caplog.at_level(logging.INFO, logger="node_agent"):
            async with trio.open_nursery() as nursery:
                await send.send(PodSnapshot(pods=(info("listed", "not-an-ip"),)))
                await nursery.start(source.run, agent)
                await send.send(PodUpserted(pod=info("bad", "not-an-ip")))
                await send.send(NewerEvent())
                await send.send(PodUpserted(pod=info("breaks", "10.244.1.8")))
                await send.send(PodUpserted(pod=info("good", "10.244.1.7")))
                while status.current.get(PodUid("uid-good")) != "enabled":
                    await status.changed.wait()
                nursery.cancel_scope.cancel()
    finally:
        node.close()
    assert [u for u, *_ in ztunnel.added] == ["uid-good"]
    assert source.view["uid-bad"].ips == () and source.lookup("bookinfo", "good") is not None
    lines = [(r.getMessage(), dict(r.__dict__.get("fields", ()))) for r in caplog.records]
    assert [f["name"] for m, f in lines if m.startswith("pod watch: ignoring a pod IP")] == ["listed", "bad"]
    assert [f["kind"] for m, f in lines if "unknown kind" in m] == ["NewerEvent"]
    [(_, failed)] = [(m, f) for m, f in lines if m == "pod watch event not applied; skipping it"]
    assert failed["name"] == "breaks" and "a bug handling this pod" in str(failed["error"])
