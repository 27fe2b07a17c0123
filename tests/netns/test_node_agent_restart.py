"""Agent restart with real namespaces: an agent restart rebuilds its cache from the pod source's first
listing (netns found by the pod's IP, rules reconciled without change) before ztunnel can connect, and a
reconnecting ztunnel gets the pod in its snapshot."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path

import trio

from services.node_agent.app import AgentConfig, run_agent
from services.node_agent.lifecycle import NodeAgent, PodSink
from services.node_agent.model import Pod
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.zds.types import PodUid
from tests.netns.conftest import run
from tests.service.zds_fakes import RecordingHandler

POD_IP = "10.252.3.4"
AMBIENT = {"istio.io/dataplane-mode": "ambient"}


class ListedSource:
    """A pod source whose first listing is fixed and which never changes afterwards."""

    def __init__(self, pods: list[Pod]) -> None:
        self.pods = pods

    async def run(
        self, sink: PodSink, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
    ) -> None:
        await sink.initial_pods([(p, AMBIENT) for p in self.pods])
        task_status.started()
        await trio.sleep_forever()

    def lookup(self, namespace: str, name: str) -> tuple[Pod, Mapping[str, str]] | None:
        return None


async def test_restart_restores_pod_before_ztunnel_connects(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    pod_ns, peer_ns = make_netns("pod"), make_netns("peer")
    run("ip", "-n", pod_ns, "link", "add", "vp", "type", "veth", "peer", "name", "vq", "netns", peer_ns)
    run("ip", "-n", pod_ns, "addr", "add", f"{POD_IP}/24", "dev", "vp")
    run("ip", "-n", pod_ns, "link", "set", "vp", "up")
    pod = Pod(uid=PodUid("uid-r"), name="r", namespace="bookinfo", service_account="sa-r", ips=(POD_IP,))
    config = AgentConfig(
        node_name="n1",
        zds_socket=str(tmp_path / "zds.sock"),
        cni_socket=str(tmp_path / "cni.sock"),
        health_addr=None,
    )
    with trio.fail_after(60):
        # first life: enrolled (the source's listing finds it by IP), then the agent stops; rules stay
        async with trio.open_nursery() as nursery:
            agent: NodeAgent = await nursery.start(partial(run_agent, config, pod_source=ListedSource([pod])))
            assert agent.status_of(pod.uid) == "enabled"
            nursery.cancel_scope.cancel()
        saved = run("iptables-save", netns=pod_ns).stdout
        assert "ISTIO_PRERT" in saved

        # second life: restored from the listing before the ZDS server starts; ztunnel gets it as `add`
        handler = RecordingHandler()
        async with trio.open_nursery() as nursery:
            agent = await nursery.start(partial(run_agent, config, pod_source=ListedSource([pod])))
            assert [e.uid for e in agent.cache.snapshot()] == [pod.uid]
            nursery.start_soon(run_zds_client, config.zds_socket, WorkloadManager(handler))
            while ("start", pod.uid) not in handler.events:
                await trio.sleep(0.01)
            nursery.cancel_scope.cancel()
    after = run("iptables-save", netns=pod_ns).stdout
    assert _rules(after) == _rules(saved)  # reconciled, not reinstalled twice


def _rules(saved: str) -> list[str]:
    return [line for line in saved.splitlines() if not line.startswith("#")]
