"""The node agent's Kubernetes pod source against a real kube-apiserver: istio-cni's enrolment rules, the
redirection annotation, and list+watch through restarts, 410 Gone and bad credentials."""

from __future__ import annotations

import logging

import pytest
import yaml

from ambient.kube.apiserver import ApiServer
from services.node_agent.model import LABEL_DATAPLANE_MODE
from tests.kubernetes.harness import AgentOnKube, apply, namespace, pod, set_pod_ip, wait_until

AMBIENT = {LABEL_DATAPLANE_MODE: "ambient"}


async def test_namespace_label_enrols_and_removing_it_unenrols(api: ApiServer) -> None:
    await apply(api, namespace("bookinfo"), pod("ratings", "bookinfo"),
                pod("reviews", "bookinfo", node="node-b"))
    node = AgentOnKube(api)
    async with node.running():
        await set_pod_ip(node.client, "bookinfo", "ratings", "10.244.1.5")
        await set_pod_ip(node.client, "bookinfo", "reviews", "10.244.2.5")
        await wait_until(lambda: node.uid("bookinfo", "ratings") is not None, "ratings in the view")
        assert not node.enrolled("bookinfo", "ratings")
        assert node.uid("bookinfo", "reviews") is None, "another node's pod reached this node's view"

        await api.kubectl("label", "namespace", "bookinfo", f"{LABEL_DATAPLANE_MODE}=ambient")
        await wait_until(lambda: node.enrolled("bookinfo", "ratings"), "ratings enrolled by the label")
        await wait_until(lambda: node.annotation("bookinfo", "ratings"), "annotation written")
        assert await node.annotation("bookinfo", "ratings") == "enabled"

        await api.kubectl("label", "namespace", "bookinfo", f"{LABEL_DATAPLANE_MODE}-")
        await wait_until(lambda: node.uid("bookinfo", "ratings") not in node.agent.pods, "ratings unenrolled")

        async def removed() -> bool:
            return await node.annotation("bookinfo", "ratings") is None

        await wait_until(removed, "annotation removed")
        assert node.ztunnel.deleted == [node.uid("bookinfo", "ratings")]


async def test_opt_out_sidecar_host_network_and_waypoint_pods_are_skipped(api: ApiServer) -> None:
    await apply(
        api,
        namespace("mesh", AMBIENT),
        namespace("plain"),
        pod("app", "mesh"),
        pod("opted-out", "mesh", labels={LABEL_DATAPLANE_MODE: "none"}),
        pod("sidecar", "mesh", annotations={"sidecar.istio.io/status": '{"containers":["istio-proxy"]}'}),
        pod("host", "mesh", host_network=True),
        pod("waypoint", "mesh", labels={"gateway.istio.io/managed": "istio.io-mesh-controller"}),
        pod("own-label", "plain", labels=AMBIENT),
    )
    node = AgentOnKube(api)
    async with node.running():
        for i, name in enumerate(("app", "opted-out", "sidecar", "host", "waypoint")):
            await set_pod_ip(node.client, "mesh", name, f"10.244.1.{10 + i}")
        await set_pod_ip(node.client, "plain", "own-label", "10.244.1.20")
        await wait_until(lambda: node.enrolled("mesh", "app"), "app enrolled by its namespace")
        await wait_until(lambda: node.enrolled("plain", "own-label"), "own-label enrolled by its own label")
        for name in ("opted-out", "sidecar", "host", "waypoint"):
            uid = node.uid("mesh", name)
            assert uid is not None, f"{name} missing from the view"
            assert uid not in node.agent.pods, f"{name} was enrolled"
        assert len(node.agent.pods) == 2


async def test_pod_without_ip_waits_then_enrols_and_deleting_it_unenrols(api: ApiServer) -> None:
    await apply(api, namespace("mesh", AMBIENT), pod("fresh", "mesh"))
    node = AgentOnKube(api)
    async with node.running():
        uid = node.uid("mesh", "fresh")
        assert uid is not None
        assert uid not in node.agent.pods  # pending: no IP, no netns known yet; not an error
        await set_pod_ip(node.client, "mesh", "fresh", "10.244.1.30")
        await wait_until(lambda: node.enrolled("mesh", "fresh"), "fresh enrolled once it has an IP")
        await api.kubectl("delete", "pod", "fresh", "-n", "mesh", "--grace-period=0", "--force")
        await wait_until(lambda: uid in node.ztunnel.deleted, "ztunnel told the pod is gone")
        assert uid not in node.agent.pods


async def test_watch_resumes_after_the_api_server_restarts(api_uncached: ApiServer) -> None:
    api = api_uncached
    await apply(api, namespace("mesh", AMBIENT), pod("before", "mesh"))
    node = AgentOnKube(api)
    async with node.running():
        await set_pod_ip(node.client, "mesh", "before", "10.244.1.40")
        await wait_until(lambda: node.enrolled("mesh", "before"), "before enrolled")
        await api.restart()
        await apply(api, pod("after", "mesh"))
        await set_pod_ip(node.client, "mesh", "after", "10.244.1.41")
        await wait_until(lambda: node.enrolled("mesh", "after"), "a pod made after the restart enrolled")
        assert node.enrolled("mesh", "before"), "a pod enrolled before the restart was dropped"
        assert node.source.reflectors["pods"].resumes >= 1
        assert node.pod_lists == 1, "the watch listed again instead of resuming"


async def test_relists_on_410_and_sees_the_changes_it_missed(api: ApiServer) -> None:
    await apply(api, namespace("mesh", AMBIENT), pod("stays", "mesh"), pod("vanishes", "mesh"))
    node = AgentOnKube(api)
    async with node.running():
        await set_pod_ip(node.client, "mesh", "stays", "10.244.1.50")
        await set_pod_ip(node.client, "mesh", "vanishes", "10.244.1.51")
        await wait_until(lambda: node.enrolled("mesh", "vanishes"), "vanishes enrolled")
        await wait_until(lambda: node.enrolled("mesh", "stays"), "stays enrolled")
        gone = node.uid("mesh", "vanishes")
        await api.stop_apiserver()
        # while the agent cannot watch: the pod goes, and the history that would tell it so is compacted
        await api.delete_from_etcd("/registry/pods/mesh/vanishes")
        await api.compact_etcd()
        await api.start_apiserver()
        await wait_until(lambda: gone in node.ztunnel.deleted, "the missed deletion found by a new listing")
        assert node.pod_lists >= 2
        assert node.enrolled("mesh", "stays")


async def test_wrong_credentials_are_retried_and_named(
    api: ApiServer, tmp_path: pytest.TempPathFactory, caplog: pytest.LogCaptureFixture
) -> None:
    config = yaml.safe_load(api.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": "not-a-token"}
    bad = tmp_path / "kubeconfig"  # type: ignore[operator]
    bad.write_text(yaml.safe_dump(config))
    await apply(api, namespace("mesh", AMBIENT))
    node = AgentOnKube(api, kubeconfig=str(bad))
    with caplog.at_level(logging.WARNING, logger="kube"):
        async with node.running(wait_listed=False):
            await wait_until(lambda: node.source.reflectors.get("pods") is not None
                             and node.source.reflectors["pods"].last_error is not None, "the failure seen")
    assert "HTTP 401" in (node.source.reflectors["pods"].last_error or "")
    assert any("lost the API server" in r.getMessage() for r in caplog.records)
