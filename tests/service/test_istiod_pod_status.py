"""PodWatch.SetRedirection end to end: the stub and the node agent's client (pod_status.py) over loopback TLS.

The `ambient.istio.io/redirection` annotation goes pending -> enabled -> removed, every watcher of the node
sees each change, `ambient world show` (GetWorld) shows it, and a node may only touch its own pods.
"""

from __future__ import annotations

import json
import socket

import pytest
import trio

from services.istiod.testing import TestIstiod, bookinfo_world, open_test_istiod
from services.istiod.world import REDIRECTION_ANNOTATION
from services.node_agent.model import Pod
from services.node_agent.pod_status import ControlPlaneStatusReporter, set_redirection
from services.node_agent.podwatch import PodEvent, PodSnapshot, PodUpserted, PodWatch, open_pod_watch
from shared.aio import Channel, GrpcTarget, RpcError, RpcStatus, open_aio_loop, open_target
from shared.api import worldadmin_grpc, worldadmin_pb2
from shared.zds.types import PodUid


def pod_of(istiod: TestIstiod, namespace: str, name: str) -> Pod:
    found = istiod.store.find_pod(namespace, name)
    assert found is not None
    return Pod(uid=PodUid(found.kube_uid), name=name, namespace=namespace)


def annotation(istiod: TestIstiod, namespace: str, name: str) -> str | None:
    found = istiod.store.find_pod(namespace, name)
    assert found is not None
    return found.annotations.get(REDIRECTION_ANNOTATION)


async def shown(istiod: TestIstiod, name: str) -> dict[str, str]:
    """The pod's annotations as `ambient world show` prints them (GetWorld)."""
    target = istiod.admin_target()
    async with open_target(target) as channel:
        response = await channel.unary(
            worldadmin_grpc.WorldAdminStub,
            "GetWorld",
            worldadmin_pb2.GetWorldRequest(),
            metadata=target.call_metadata(),
        )
    pods = json.loads(response.world_json)["pods"]
    annotations: dict[str, str] = next(p for p in pods if p["name"] == name).get("annotations", {})
    return annotations


async def next_upsert(watch: PodWatch) -> PodUpserted:
    event: PodEvent = await watch.__anext__()
    assert isinstance(event, PodUpserted), event
    return event


async def test_pending_enabled_removed_reach_every_watcher_and_world_show() -> None:
    with trio.fail_after(30):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_pod_watch(istiod.target(node="node-a"), "node-a") as first,
            open_pod_watch(istiod.target(node="node-a"), "node-a") as second,
            open_target(istiod.target(node="node-a")) as channel,
        ):
            for watch in (first, second):
                assert isinstance(await watch.__anext__(), PodSnapshot)
            target = istiod.target(node="node-a")
            sleep = pod_of(istiod, "sleep", "sleep-5c6d7e")

            for value in ("pending", "enabled"):
                generation = istiod.store.generation
                assert await set_redirection(channel, target, "node-a", sleep, value) is True
                assert istiod.store.generation == generation + 1
                for watch in (first, second):
                    event = await next_upsert(watch)
                    assert event.pod.uid == sleep.uid
                    assert event.pod.annotations[REDIRECTION_ANNOTATION] == value
                assert (await shown(istiod, "sleep-5c6d7e"))[REDIRECTION_ANNOTATION] == value

            # the same value again changes nothing and wakes nobody
            generation = istiod.store.generation
            assert await set_redirection(channel, target, "node-a", sleep, "enabled") is False
            assert istiod.store.generation == generation

            assert await set_redirection(channel, target, "node-a", sleep, None) is True
            for watch in (first, second):
                event = await next_upsert(watch)
                assert REDIRECTION_ANNOTATION not in event.pod.annotations
                assert watch.pods[sleep.uid].annotations == event.pod.annotations
            assert REDIRECTION_ANNOTATION not in await shown(istiod, "sleep-5c6d7e")
            # the other annotations of the pod are untouched
            assert istiod.store.find_pod("sleep", "sleep-5c6d7e") in bookinfo_world().pods


async def refused(channel: Channel, target: GrpcTarget, node: str, pod: Pod, value: str | None) -> RpcError:
    with pytest.raises(RpcError) as info:
        await set_redirection(channel, target, node, pod, value)
    return info.value


async def test_a_node_may_only_set_the_status_of_its_own_pods() -> None:
    with trio.fail_after(30):
        async with open_test_istiod(bookinfo_world()) as istiod:
            generation = istiod.store.generation
            details = pod_of(istiod, "bookinfo", "details-v1-5f4d58")  # on node-b
            sleep = pod_of(istiod, "sleep", "sleep-5c6d7e")  # on node-a
            target = istiod.target(node="node-a")
            async with open_target(target) as channel:
                err = await refused(channel, target, "node-a", details, "enabled")
                assert err.status is RpcStatus.PERMISSION_DENIED
                assert err.message == (
                    "pod bookinfo/details-v1-5f4d58 runs on node node-b, not on node node-a; a node agent "
                    "may only set the status of its own node's pods"
                )
                # claiming to be node-b with node-a's token
                err = await refused(channel, target, "node-b", details, "enabled")
                assert err.status is RpcStatus.PERMISSION_DENIED
                assert err.message == "the token is node node-a's, not node node-b's"

                err = await refused(channel, target, "node-a", sleep, "disabled")
                assert err.status is RpcStatus.INVALID_ARGUMENT
                assert "'disabled' is not a value of ambient.istio.io/redirection" in err.message

                gone = Pod(uid=PodUid("no-such-uid"), name="sleep-5c6d7e", namespace="sleep")
                err = await refused(channel, target, "node-a", gone, "enabled")
                assert err.status is RpcStatus.NOT_FOUND and "uid no-such-uid" in err.message
                nobody = Pod(uid=PodUid(""), name="nobody", namespace="sleep")
                err = await refused(channel, target, "node-a", nobody, None)
                assert err.status is RpcStatus.NOT_FOUND and "no pod sleep/nobody" in err.message

            anonymous = istiod.target()
            async with open_target(anonymous) as channel:
                err = await refused(channel, anonymous, "node-a", sleep, "enabled")
                assert err.status is RpcStatus.UNAUTHENTICATED

            assert istiod.store.generation == generation
            assert all(REDIRECTION_ANNOTATION not in p.annotations for p in istiod.store.world.pods)


async def test_world_apply_and_pod_replace_keep_the_agents_status() -> None:
    """Like pods/status in Kubernetes, the annotation belongs to the node agent: re-applying the world file
    (or re-adding the pod) does not wipe it; a pod re-created on another node starts without it."""
    with trio.fail_after(30):
        async with open_test_istiod(bookinfo_world()) as istiod:
            istiod.store.set_pod_redirection("sleep", "sleep-5c6d7e", "enabled")
            istiod.store.apply(bookinfo_world(), "bookinfo.yaml")
            assert annotation(istiod, "sleep", "sleep-5c6d7e") == "enabled"
            istiod.store.add_pod(
                b'{"name": "sleep-5c6d7e", "namespace": "sleep", "node": "node-a", "ips": ["10.244.1.20"],'
                b' "labels": {"app": "sleep"}}'
            )
            assert annotation(istiod, "sleep", "sleep-5c6d7e") == "enabled"
            istiod.store.add_pod(
                b'{"name": "sleep-5c6d7e", "namespace": "sleep", "node": "node-b", "ips": ["10.244.2.99"]}'
            )
            assert annotation(istiod, "sleep", "sleep-5c6d7e") is None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_reporter_retries_until_the_control_plane_answers_and_writes_only_the_latest() -> None:
    world = bookinfo_world()
    with trio.fail_after(30):
        async with open_aio_loop(), open_test_istiod(world) as istiod:
            sleep = pod_of(istiod, "sleep", "sleep-5c6d7e")
            # a control plane that is not there yet: same root and token, a port nobody serves
            port = free_port()
            target = GrpcTarget(
                host="127.0.0.1", port=port, root_cert_pem=istiod.root_pem, token=istiod.tokens["node-a"]
            )
            reporter = ControlPlaneStatusReporter(target, "node-a", backoff_initial=0.01, backoff_max=0.05)
            async with trio.open_nursery() as nursery:
                await nursery.start(reporter.run)
                await reporter.report(sleep, "pending")  # returns at once, whatever the network does
                while reporter.last_error is None:
                    await trio.sleep(0.01)
                assert "UNAVAILABLE" in reporter.last_error and reporter.backlog == 1
                await reporter.report(sleep, "enabled")  # supersedes the unsent pending
                assert reporter.backlog == 1

                from services.istiod.auth import Auth
                from services.istiod.server import IstiodServer, server_ssl_context
                from services.istiod.store import WorldStore

                server = IstiodServer(WorldStore(world), istiod.server.ca, Auth(istiod.tokens))
                await nursery.start(
                    lambda task_status: server.serve(
                        host="127.0.0.1",
                        port=port,
                        ssl_context=server_ssl_context(istiod.server.ca),
                        task_status=task_status,
                    )
                )
                while reporter.backlog:
                    await trio.sleep(0.01)
                pod = server.store.find_pod("sleep", "sleep-5c6d7e")
                assert pod is not None and pod.annotations[REDIRECTION_ANNOTATION] == "enabled"
                assert reporter.written == 1 and reporter.last_error is None

                # a pod that is gone is dropped, not retried
                await reporter.report(Pod(uid=PodUid("u-x"), name="x", namespace="sleep"), None)
                while reporter.backlog:
                    await trio.sleep(0.01)
                assert reporter.written == 1
                nursery.cancel_scope.cancel()
