"""The node agent's pod status through the control plane: the lifecycle's reports reach the istiod stub as the
`ambient.istio.io/redirection` annotation (pending, then enabled, then removed), and a control plane that
does not take them never changes a pod's enrolment."""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path

import pytest
import trio

from services.istiod.testing import TestIstiod, bookinfo_world, open_test_istiod
from services.istiod.world import REDIRECTION_ANNOTATION
from services.node_agent.app import AgentConfig, run_agent
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.model import Pod
from services.node_agent.pod_status import ControlPlaneStatusReporter
from services.node_agent.podwatch import PodSnapshot, PodUpserted, PodWatch, open_pod_watch
from services.node_agent.rules import RuleSettings
from services.node_agent.testing import FakeRuleApplier, FakeZtunnel, PipeNetnsOpener
from services.node_agent.watch_source import PodWatchSource
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.aio import GrpcTarget
from shared.zds.types import PodUid
from tests.service.test_node_agent_app import post
from tests.service.zds_fakes import RecordingHandler


def sleep_pod(istiod: TestIstiod) -> Pod:
    found = istiod.store.find_pod("sleep", "sleep-5c6d7e")
    assert found is not None
    return Pod(
        uid=PodUid(found.kube_uid),
        name=found.name,
        namespace=found.namespace,
        service_account=found.service_account,
        labels=dict(found.labels),
        ips=tuple(found.ips),
        netns_path="/run/netns/sleep",
    )


async def next_annotation(watch: PodWatch, uid: str) -> str | None:
    """The redirection annotation of the next change of pod `uid` the watch delivers."""
    while True:
        event = await watch.__anext__()
        if isinstance(event, PodUpserted) and event.pod.uid == uid:
            return event.pod.annotations.get(REDIRECTION_ANNOTATION)


async def test_lifecycle_reports_pending_then_enabled_then_removed_through_the_control_plane() -> None:
    applier, ztunnel, opener = FakeRuleApplier(), FakeZtunnel(connected=False), PipeNetnsOpener()
    agent: NodeAgent | None = None
    try:
        with trio.fail_after(30):
            async with (
                open_test_istiod(bookinfo_world()) as istiod,
                open_pod_watch(istiod.target(node="node-a"), "node-a") as watch,
                trio.open_nursery() as nursery,
            ):
                assert isinstance(await watch.__anext__(), PodSnapshot)
                reporter = ControlPlaneStatusReporter(istiod.target(node="node-a"), "node-a")
                agent = NodeAgent(
                    applier=applier,
                    ztunnel=ztunnel,
                    status=reporter,
                    settings=RuleSettings(),
                    opener=opener,
                    retry_initial=0.01,
                    retry_max=0.05,
                )
                await nursery.start(reporter.run)
                await nursery.start(agent.run)
                pod = sleep_pod(istiod)

                # no ztunnel: rules in, pod pending, and the control plane (every watcher) says so
                assert await agent.enrol(pod) == "pending"
                assert await next_annotation(watch, pod.uid) == "pending"
                # ztunnel takes it on a retry: enabled
                ztunnel.set_connected(True)
                assert await next_annotation(watch, pod.uid) == "enabled"
                assert agent.status_of(pod.uid) == "enabled"
                assert [uid for uid, *_ in ztunnel.added] == [pod.uid]

                await agent.unenrol(pod, pod_gone=False)
                assert await next_annotation(watch, pod.uid) is None
                found = istiod.store.find_pod("sleep", "sleep-5c6d7e")
                assert found is not None and REDIRECTION_ANNOTATION not in found.annotations
                while reporter.backlog:  # the watch may see the change before the writer has its answer
                    await trio.sleep(0.01)
                assert reporter.written == 3 and reporter.last_error is None
                nursery.cancel_scope.cancel()
    finally:
        if agent is not None:
            agent.close()
        opener.close()


async def test_status_writes_failing_never_unenrol_a_pod() -> None:
    applier, ztunnel, opener = FakeRuleApplier(), FakeZtunnel(), PipeNetnsOpener()
    agent: NodeAgent | None = None
    try:
        with trio.fail_after(30):
            async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
                pod = sleep_pod(istiod)
                # node-b's token: every write is refused (PERMISSION_DENIED), and dropped
                reporter = ControlPlaneStatusReporter(istiod.target(node="node-b"), "node-b")
                agent = NodeAgent(
                    applier=applier, ztunnel=ztunnel, status=reporter, settings=RuleSettings(), opener=opener
                )
                await nursery.start(reporter.run)
                assert await agent.enrol(pod) == "enabled"
                while reporter.backlog:
                    await trio.sleep(0.01)
                assert reporter.written == 0
                assert agent.status_of(pod.uid) == "enabled"
                assert ztunnel.deleted == [] and [c for c, _ in applier.calls] == ["apply"]

                # and a control plane that is not there at all: retried in the background, the pod stays
                dead = GrpcTarget(host="127.0.0.1", port=1, root_cert_pem=istiod.root_pem, token="t")
                reporter2 = ControlPlaneStatusReporter(dead, "node-a", backoff_initial=0.01, backoff_max=0.02)
                agent.status = reporter2
                await nursery.start(reporter2.run)
                assert await agent.enrol(pod) == "enabled"
                while reporter2.last_error is None:
                    await trio.sleep(0.01)
                assert "UNAVAILABLE" in reporter2.last_error and reporter2.backlog == 1
                assert agent.status_of(pod.uid) == "enabled" and ztunnel.deleted == []
                nursery.cancel_scope.cancel()
    finally:
        if agent is not None:
            agent.close()
        opener.close()


async def test_run_agent_with_a_control_plane_writes_status_for_cni_enrolled_pods(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if os.geteuid() != 0:
        pytest.skip("opening /proc/self/ns/net as a pod netns needs root")
    # A host prefix of our own: the agent's netns scan (restoring the watch's pods) finds nothing of this
    # host, and the CNI netns path <prefix>/proc/self/ns/net is this process's namespace.
    host = tmp_path / "host"
    (host / "proc" / "self" / "ns").mkdir(parents=True)
    (host / "proc" / "self" / "ns" / "net").symlink_to("/proc/self/ns/net")
    applier, handler = FakeRuleApplier(), RecordingHandler()
    with trio.fail_after(30):
        async with open_test_istiod(bookinfo_world()) as istiod:
            (tmp_path / "root-cert.pem").write_text(istiod.root_pem or "")
            (tmp_path / "token").write_text(istiod.tokens["node-a"])
            monkeypatch.setenv("CONTROL_PLANE_ROOT_CERT", str(tmp_path / "root-cert.pem"))
            monkeypatch.setenv("CONTROL_PLANE_TOKEN_FILE", str(tmp_path / "token"))
            config = AgentConfig(
                node_name="node-a",
                control_plane=f"https://127.0.0.1:{istiod.port}",
                zds_socket=str(tmp_path / "zds.sock"),
                cni_socket=str(tmp_path / "cni.sock"),
                health_addr=None,
                host_prefix=str(host),
            )
            pod = sleep_pod(istiod)

            def annotation() -> str | None:
                found = istiod.store.find_pod("sleep", "sleep-5c6d7e")
                return found.annotations.get(REDIRECTION_ANNOTATION) if found else None

            async with trio.open_nursery() as nursery:
                agent: NodeAgent = await nursery.start(partial(run_agent, config, applier=applier))
                status, answer = await post(
                    config.cni_socket,
                    {"Netns": "/proc/self/ns/net", "PodName": pod.name, "PodNamespace": pod.namespace},
                )
                assert (status, answer["status"]) == (200, "pending"), json.dumps(answer)
                while annotation() != "pending":
                    await trio.sleep(0.01)
                nursery.start_soon(run_zds_client, config.zds_socket, WorkloadManager(handler))
                while annotation() != "enabled":
                    await trio.sleep(0.01)
                assert agent.status_of(pod.uid) == "enabled"
                nursery.cancel_scope.cancel()
            # shutdown leaves the pod's status (and rules) as they are: fail closed, not unenrolled
            assert annotation() == "enabled"


async def test_status_the_control_plane_lacks_is_written_again() -> None:
    """Pods restored at start-up without the annotation, and a pod whose annotation the control plane lost
    (a restarted stub keeps no status), are reported `enabled` again through the pod watch."""
    applier, ztunnel, opener = FakeRuleApplier(), FakeZtunnel(), PipeNetnsOpener()
    agent: NodeAgent | None = None
    try:
        with trio.fail_after(30):
            async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:

                def annotations() -> dict[str, str | None]:
                    return {
                        p.name: p.annotations.get(REDIRECTION_ANNOTATION)
                        for p in istiod.store.world.pods
                        if p.node == "node-a"
                    }

                target = istiod.target(node="node-a")
                reporter = ControlPlaneStatusReporter(target, "node-a")
                agent = NodeAgent(
                    applier=applier, ztunnel=ztunnel, status=reporter, settings=RuleSettings(), opener=opener
                )
                await nursery.start(reporter.run)
                # every ambient pod of node-a has a netns "found by IP" (PipeNetnsOpener): all restored
                source = PodWatchSource(target, "node-a")
                await nursery.start(source.run, agent)
                expected = {
                    "productpage-v1-6f9c7d": "enabled",
                    "reviews-v1-7b8c4f": "enabled",
                    "sleep-5c6d7e": "enabled",
                    "legacy-app-1b2c3d": None,  # not ambient
                }
                while annotations() != expected:
                    await trio.sleep(0.01)

                # the watch sends a pod's latest state only: lose the annotation after the agent has seen it,
                # or "enabled" then "removed" in quick succession reaches the agent as no change at all
                uid = sleep_pod(istiod).uid
                while source.view[uid].annotations.get(REDIRECTION_ANNOTATION) != "enabled":
                    await trio.sleep(0.01)
                istiod.store.set_pod_redirection("sleep", "sleep-5c6d7e", None)
                while annotations()["sleep-5c6d7e"] != "enabled":
                    await trio.sleep(0.01)
                assert ztunnel.deleted == [] and agent.status_of(sleep_pod(istiod).uid) == "enabled"
                nursery.cancel_scope.cancel()
    finally:
        if agent is not None:
            agent.close()
        opener.close()
