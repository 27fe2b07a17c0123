"""Pod watch end to end: the stub's PodWatch service and the node agent's PodWatch client over TLS."""

from __future__ import annotations

import pytest
import trio

from services.istiod.testing import bookinfo_world, open_test_istiod
from services.node_agent.podwatch import (
    PodDeleted,
    PodEvent,
    PodSnapshot,
    PodUpserted,
    PodWatch,
    WatchStatus,
    open_pod_watch,
)
from shared.aio import open_aio_loop


async def next_event(watch: PodWatch) -> PodEvent:
    return await watch.__anext__()


async def test_snapshot_then_changes() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_pod_watch(istiod.target(node="node-a"), "node-a") as watch,
        ):
            snapshot = await next_event(watch)
            assert isinstance(snapshot, PodSnapshot)
            by_name = {p.name: p for p in snapshot.pods}
            assert set(by_name) == {
                "productpage-v1-6f9c7d",
                "reviews-v1-7b8c4f",
                "sleep-5c6d7e",
                "legacy-app-1b2c3d",
            }
            assert by_name["sleep-5c6d7e"].is_ambient
            assert not by_name["legacy-app-1b2c3d"].is_ambient
            assert by_name["sleep-5c6d7e"].ips == ("10.244.1.20",)
            assert by_name["sleep-5c6d7e"].namespace_labels == {"istio.io/dataplane-mode": "ambient"}

            # A pod on another node is invisible; one on ours arrives.
            istiod.store.add_pod(
                b'{"name": "b1", "namespace": "sleep", "node": "node-b", "ips": ["10.244.2.99"]}'
            )
            istiod.store.add_pod(
                b'{"name": "a1", "namespace": "sleep", "node": "node-a", "ips": ["10.244.1.99"]}'
            )
            added = await next_event(watch)
            assert isinstance(added, PodUpserted) and added.pod.name == "a1" and added.pod.is_ambient

            # Namespace label change: every pod of the namespace on this node is re-sent.
            istiod.store.set_namespace_labels("legacy", {"istio.io/dataplane-mode": "ambient"}, [])
            changed = await next_event(watch)
            assert isinstance(changed, PodUpserted) and changed.pod.name == "legacy-app-1b2c3d"
            assert changed.pod.is_ambient

            istiod.store.remove_pod("sleep", "a1")
            removed = await next_event(watch)
            assert isinstance(removed, PodDeleted) and (removed.namespace, removed.name) == ("sleep", "a1")
            assert "a1" not in {p.name for p in watch.pods.values()}


async def test_resume_after_reconnect_sends_only_the_difference() -> None:
    with trio.fail_after(30):
        world = bookinfo_world()
        async with open_aio_loop(), open_test_istiod(world) as first:
            tokens, ca = first.tokens, first.server.ca
            port = first.port
            watch = PodWatch(first.target(node="node-a"), "node-a", backoff_initial=0.01)
            async with trio.open_nursery() as nursery:
                await nursery.start(watch.run)
                assert isinstance(await next_event(watch), PodSnapshot)
                # Stop the server under the watch: it reports the loss and keeps retrying.
                first.nursery.cancel_scope.cancel()
                status = await next_event(watch)
                assert isinstance(status, WatchStatus) and not status.connected

                # A new server on the same port with a changed world.
                from services.istiod.auth import Auth
                from services.istiod.server import IstiodServer, server_ssl_context
                from services.istiod.store import WorldStore

                server = IstiodServer(WorldStore(world), ca, Auth(tokens))
                server.store.remove_pod("sleep", "sleep-5c6d7e")
                server.store.set_pod_labels("bookinfo", "reviews-v1-7b8c4f", {"version": "v1b"}, [])
                await nursery.start(
                    lambda task_status: server.serve(
                        host="127.0.0.1",
                        port=port,
                        ssl_context=server_ssl_context(ca),
                        task_status=task_status,
                    )
                )
                events = [await next_event(watch) for _ in range(3)]
                assert events[0] == WatchStatus(connected=True)
                assert isinstance(events[1], PodUpserted) and events[1].pod.labels["version"] == "v1b"
                assert isinstance(events[2], PodDeleted) and events[2].name == "sleep-5c6d7e"
                assert len(watch.pods) == 3
                nursery.cancel_scope.cancel()


async def test_a_node_token_only_watches_its_own_node() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_pod_watch(istiod.target(node="node-b"), "node-a", backoff_initial=5) as watch,
        ):
            # The watch never connects; it keeps retrying and says why.
            while watch.last_error is None:
                await trio.sleep(0.01)
            assert "PERMISSION_DENIED: the token is node node-b's, not node node-a's" in watch.last_error
            assert not watch.connected
            assert watch.pods == {}


@pytest.mark.parametrize("node", ["node-z"])
async def test_unknown_node_is_not_found(node: str) -> None:
    from shared.aio import RpcError, RpcStatus, open_target
    from shared.api import podwatch_grpc, podwatch_pb2

    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world(), auth=False) as istiod:
            target = istiod.target()
            async with (
                open_target(target) as channel,
                channel.stream(podwatch_grpc.PodWatchStub, "Watch") as call,
            ):
                await call.send_message(podwatch_pb2.WatchRequest(node=node), end=True)
                with pytest.raises(RpcError) as info:
                    await call.recv_message()
                assert info.value.status is RpcStatus.NOT_FOUND
                assert "unknown node 'node-z'" in info.value.message
