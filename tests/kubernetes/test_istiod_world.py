"""`istiod-stub --kubernetes` against a real kube-apiserver: the bookinfo world loaded as Kubernetes objects
gives the same xDS as the world file; changes made with kubectl reach a connected delta xDS client (ztunnel's
own); a malformed AuthorizationPolicy is left out with a log line naming it; while the API server is away
the last world keeps being served."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio
import yaml

from ambient.kube.apiserver import ApiServer
from services.istiod.derive import WAYPOINT_CONFIG_TYPE_URL, Resources
from services.istiod.kube_source import KubeWorldSource
from services.istiod.kube_world import mesh_settings, world_to_objects
from services.istiod.store import WorldStore
from services.istiod.testing import TestIstiod, bookinfo_world, open_test_istiod
from services.istiod.world import World
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import PolicyKey, TunnelProtocol
from services.ztunnel.xds.client import XdsClient, XdsClientConfig, ztunnel_node_id
from shared.aio import GrpcTarget
from shared.kube.client import KubeApi, open_kube_api
from tests.istiod_process import run_stub
from tests.kubernetes.harness import FAST, WAIT, apply, load_objects, pod, set_pod_ip, wait_until

API_SERVERS_OWN = "default/kubernetes.default.svc.cluster.local"
"""The `kubernetes` Service every API server makes for itself (istiod serves it too)."""


def _xds(resources: Resources, *, without: str = "") -> dict[str, dict[str, str]]:
    return {url: {name: version for name, (version, _) in items.items() if name != without}
            for url, items in resources.by_type.items()}  # fmt: skip


def settings_of(world: World) -> World:
    return mesh_settings(world)


def policy(name: str, ns: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {"apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
            "metadata": {"name": name, "namespace": ns}, "spec": spec}  # fmt: skip


@asynccontextmanager
async def bookinfo_on(api: ApiServer) -> AsyncIterator[KubeApi]:
    async with open_kube_api(str(api.kubeconfig)) as client:
        await load_objects(api, client, world_to_objects(bookinfo_world()))
        yield client


@asynccontextmanager
async def stub_on(api: ApiServer) -> AsyncIterator[tuple[TestIstiod, KubeWorldSource, XdsClient]]:
    """The stub serving the API server's world (first listing in), with node-a's ztunnel xDS client synced."""
    world = bookinfo_world()  # the stub starts with its nodes only: the rest must come from the API server
    async with open_test_istiod(msgspec.structs.replace(settings_of(world), nodes=world.nodes)) as istiod, \
            trio.open_nursery() as nursery:
        source = KubeWorldSource(istiod.store, base=settings_of(world), kubeconfig=str(api.kubeconfig),
                                 **FAST)
        with trio.fail_after(WAIT):
            await nursery.start(source.run)
        client = XdsClient(istiod.target(node="node-a"), StateStore(), XdsClientConfig(
            node_id=ztunnel_node_id("127.0.0.1", "ztunnel-a", "istio-system"), backoff_initial=0.01))
        await nursery.start(client.run)
        with trio.fail_after(WAIT):
            await client.wait_synced()
        yield istiod, source, client
        nursery.cancel_scope.cancel()


def protocol(state: StateStore, ip: str) -> TunnelProtocol | None:
    workload = state.workload_by_ip(ip)
    return None if workload is None else workload.tunnel_protocol


async def wait_state(client: XdsClient, check: Any, what: str) -> None:
    with trio.move_on_after(WAIT):
        await client.store.wait_for(check)
        return
    raise AssertionError(f"not within {WAIT:.0f} s: {what}")


async def test_bookinfo_from_the_api_server_derives_the_world_files_xds(api: ApiServer) -> None:
    world = bookinfo_world()
    async with bookinfo_on(api) as client, trio.open_nursery() as nursery:
        store = WorldStore(settings_of(world))
        source = KubeWorldSource(store, base=settings_of(world), backoff_initial=0.05)
        with trio.fail_after(WAIT):
            await nursery.start(lambda task_status: source.run_with(client, task_status=task_status))
        assert source.notes == set()
        assert API_SERVERS_OWN in {name for items in _xds(store.resources).values() for name in items}
        ours, theirs = _xds(store.resources, without=API_SERVERS_OWN), _xds(Resources(world))
        # The waypoint comes back from its pod's gateway labels; its L7 policies and routes are not read
        # from the API server yet, so only its WaypointConfig's contents differ.
        assert store.world.waypoints == world.waypoints
        assert ours.pop(WAYPOINT_CONFIG_TYPE_URL).keys() == theirs.pop(WAYPOINT_CONFIG_TYPE_URL).keys()
        assert ours == theirs
        assert store.resources.identities_by_node == Resources(world).identities_by_node
        assert {p.key: p.workload for p in store.world.pods} == {p.key: p.workload for p in world.pods}
        assert {n.name: n.pod_cidr for n in store.world.nodes} == {n.name: n.pod_cidr for n in world.nodes}
        nursery.cancel_scope.cancel()


async def test_label_new_pod_and_new_policy_reach_a_connected_xds_client(api: ApiServer) -> None:
    async with bookinfo_on(api) as kube, stub_on(api) as (istiod, _, xds):
        state = xds.store
        ratings = state.workload_by_ip("10.244.2.12")
        assert ratings is not None and ratings.tunnel_protocol is TunnelProtocol.HBONE
        assert set(state.policies) == {"bookinfo/ratings-from-reviews", "bookinfo/deny-legacy",
                                       # a waypoint-served pod accepts only its waypoint (derive.py)
                                       "bookinfo/istio_allow_waypoint_bookinfo_waypoint",
                                       "bookinfo/require_waypoint_bookinfo_waypoint"}  # fmt: skip

        await api.kubectl("label", "namespace", "bookinfo", "istio.io/dataplane-mode-")
        await wait_state(xds, lambda s: protocol(s, "10.244.2.12") is TunnelProtocol.NONE,
                         "ratings out of the mesh after the namespace label went")
        await api.kubectl("label", "namespace", "bookinfo", "istio.io/dataplane-mode=ambient")
        await wait_state(xds, lambda s: protocol(s, "10.244.2.12") is TunnelProtocol.HBONE,
                         "ratings back in the mesh")

        await apply(api, pod("ratings-v2", "bookinfo", node="node-b", labels={"app": "ratings"}))
        await set_pod_ip(kube, "bookinfo", "ratings-v2", "10.244.2.13")
        await wait_state(xds, lambda s: s.workload_by_ip("10.244.2.13") is not None, "the new pod's workload")
        new = state.workload_by_ip("10.244.2.13")
        assert new is not None and "bookinfo/ratings.bookinfo.svc.cluster.local" in new.services

        await apply(api, policy("deny-sleep", "bookinfo", {
            "action": "DENY", "rules": [{"from": [{"source": {"namespaces": ["sleep"]}}]}]}))
        await wait_state(xds, lambda s: PolicyKey("bookinfo/deny-sleep") in s.policies, "the new policy")

        # no kubelet confirms a graceful deletion here: delete at once
        await api.kubectl("delete", "pod", "-n", "bookinfo", "ratings-v2", "--grace-period=0", "--force")
        await wait_state(xds, lambda s: s.workload_by_ip("10.244.2.13") is None, "the deleted pod gone")
        assert xds.nacks_sent == [] and istiod.server.ads.nacks == []


async def test_a_malformed_policy_is_left_out_and_named(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with bookinfo_on(api), stub_on(api) as (_, source, xds):
        with caplog.at_level(logging.WARNING, logger="istiod-stub"):
            await apply(
                api,
                policy("broken", "bookinfo", {"rules": [{"from": [{"source": {"principals": "all"}}]}]}),
                policy("allow-sleep", "bookinfo", {"rules": [{"from": [{"source": {"namespaces": ["x"]}}]}]}),
            )  # fmt: skip
            await wait_state(xds, lambda s: PolicyKey("bookinfo/allow-sleep") in s.policies, "the next one")
        assert PolicyKey("bookinfo/broken") not in xds.store.policies
        (note,) = [n for n in source.notes if "broken" in n]
        assert "AuthorizationPolicy bookinfo/broken" in note
        assert "spec.rules[0].from[0].source.principals" in note
        logged = [r for r in caplog.records if r.getMessage() == "object left out of the world"]
        assert any("bookinfo/broken" in str(getattr(r, "fields", "")) for r in logged)


async def test_the_last_world_is_served_while_the_api_server_is_away(
    api: ApiServer, caplog: pytest.LogCaptureFixture
) -> None:
    async with bookinfo_on(api) as kube, stub_on(api) as (istiod, source, xds):
        before = istiod.store.generation
        with caplog.at_level(logging.WARNING, logger="istiod-stub"):
            await api.stop_apiserver()
            await wait_until(lambda: all(r.last_error for r in source.reflectors.values()), "the loss seen")
        assert istiod.store.generation == before
        assert xds.store.workload_by_ip("10.244.2.12") is not None
        assert any(r.getMessage().startswith("the world stays as it was") for r in caplog.records)
        await api.start_apiserver()
        await apply(api, pod("late", "bookinfo", node="node-a", labels={"app": "late"}))
        await set_pod_ip(kube, "bookinfo", "late", "10.244.1.99")
        await wait_state(xds, lambda s: s.workload_by_ip("10.244.1.99") is not None, "a change after it")


async def test_the_stub_process_serves_the_api_servers_world(api: ApiServer, tmp_path: Path) -> None:
    """`istiod-stub --kubernetes --kubeconfig PATH`, as `ambient lab up --kubernetes` starts it."""
    async with bookinfo_on(api) as kube:
        state = tmp_path / "state"
        async with run_stub(state, "--kubernetes", "--kubeconfig", str(api.kubeconfig),
                            "--node-token", "node-a=secret-a") as port:  # fmt: skip
            assert (state / "tokens" / "node-b.token").exists()  # nodes from the API server get tokens
            root = (state / "root-cert.pem").read_text()
            target = GrpcTarget(host="127.0.0.1", port=port, root_cert_pem=root, token="secret-a")
            client = XdsClient(target, StateStore(), XdsClientConfig(
                node_id=ztunnel_node_id("127.0.0.1", "ztunnel-a", "istio-system")))
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                with trio.fail_after(WAIT):
                    await client.wait_synced()
                assert len(client.store.workloads) == len(bookinfo_world().pods)
                await apply(api, pod("extra", "sleep", node="node-a", labels={"app": "extra"}))
                await set_pod_ip(kube, "sleep", "extra", "10.244.1.77")
                await wait_state(client, lambda s: s.workload_by_ip("10.244.1.77") is not None, "the new pod")
                nursery.cancel_scope.cancel()


async def test_wrong_credentials_are_named_and_nothing_is_served(
    api: ApiServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    config = yaml.safe_load(api.kubeconfig.read_text())
    config["users"][0]["user"] = {"token": "not-a-token"}
    bad = tmp_path / "kubeconfig"
    bad.write_text(yaml.safe_dump(config))
    store = WorldStore(settings_of(bookinfo_world()))
    source = KubeWorldSource(store, kubeconfig=str(bad), backoff_initial=0.05, backoff_max=0.5)

    def refused_everywhere() -> bool:
        errors = [r.last_error or "" for r in source.reflectors.values()]
        return len(errors) == 5 and all("HTTP 401" in e for e in errors)

    with caplog.at_level(logging.WARNING, logger="istiod-stub"):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(source.run)
            await wait_until(refused_everywhere, "401 on every collection")
            nursery.cancel_scope.cancel()
    assert not source.started and store.world.pods == []
    told = [r for r in caplog.records if r.getMessage() == "no world to serve until the API server answers"]
    assert len(told) == 1 and "credentials" in str(getattr(told[0], "fields", ""))
