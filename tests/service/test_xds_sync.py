"""Delta ADS end to end: the real istiod stub and ztunnel's XdsClient in one Trio run over loopback TLS."""

from __future__ import annotations

from collections.abc import Iterable

import msgspec
import trio

from services.istiod.auth import Auth
from services.istiod.server import IstiodServer, server_ssl_context
from services.istiod.store import WorldStore
from services.istiod.testing import bookinfo_world, open_test_istiod
from services.istiod.world import Pod, world_to_json
from services.ztunnel.authz import applicable
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import Action, PolicyKey, Scope, Service, TunnelProtocol, Workload
from services.ztunnel.xds.client import XdsClient, XdsClientConfig, ztunnel_node_id
from shared.aio import GRPC_TLS_READ_BUFFER, GrpcTarget, open_aio_loop


def wl(store: StateStore, ip: str) -> Workload:
    found = store.workload_by_ip(ip)
    assert found is not None, f"no workload at {ip}"
    return found


def new_client(target: GrpcTarget, store: StateStore | None = None) -> XdsClient:
    config = XdsClientConfig(
        node_id=ztunnel_node_id("127.0.0.1", "ztunnel-a", "istio-system"), backoff_initial=0.01
    )
    return XdsClient(target, store or StateStore(), config)


async def test_initial_push_fills_the_store() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
            client = new_client(istiod.target(node="node-a"))
            await nursery.start(client.run)
            await client.wait_synced()
            store = client.store
            assert len(store.workloads) == 9  # eight apps and the waypoint
            assert len(store.services) == 8  # with reviews-v1/v2 and the waypoint's
            assert set(store.policies) == {"bookinfo/ratings-from-reviews", "bookinfo/deny-legacy",
                                           "bookinfo/istio_allow_waypoint_bookinfo_waypoint",
                                           "bookinfo/require_waypoint_bookinfo_waypoint"}
            ratings = store.workload_by_ip("10.244.2.12")
            assert ratings is not None and ratings.uid == "Kubernetes//Pod/bookinfo/ratings-v1-8c9f0b"
            assert ratings.tunnel_protocol is TunnelProtocol.HBONE
            assert ratings.identity.uri == "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-ratings"
            assert wl(store, "10.244.1.30").tunnel_protocol is TunnelProtocol.NONE
            svc = store.service_by_vip("10.96.0.12")
            assert svc is not None and svc.key == "bookinfo/reviews.bookinfo.svc.cluster.local"
            assert [wl.name for wl, _ in store.endpoints(svc)] == ["reviews-v1-7b8c4f", "reviews-v2-6d7e9a"]
            names = [p.key for p in applicable(store.policies.values(), ratings)]
            assert names == ["bookinfo/deny-legacy", "bookinfo/istio_allow_waypoint_bookinfo_waypoint",
                             "bookinfo/ratings-from-reviews", "bookinfo/require_waypoint_bookinfo_waypoint"]
            pol = store.policies[PolicyKey("bookinfo/ratings-from-reviews")]
            assert pol.scope is Scope.WORKLOAD_SELECTOR and pol.action is Action.ALLOW
            assert client.nacks_sent == []
            nursery.cancel_scope.cancel()


async def test_incremental_change_and_removal_reach_the_client() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
            client = new_client(istiod.target(node="node-a"))
            await nursery.start(client.run)
            await client.wait_synced()
            store = client.store
            istiod.store.add_pod(
                b'{"name": "ratings-v2", "namespace": "bookinfo", "node": "node-b", "ips": ["10.244.2.13"],'
                b' "labels": {"app": "ratings"}, "serviceAccount": "bookinfo-ratings"}'
            )
            await store.wait_for(lambda s: s.workload_by_ip("10.244.2.13") is not None)
            new = wl(store, "10.244.2.13")
            assert "bookinfo/ratings.bookinfo.svc.cluster.local" in new.services
            assert "bookinfo/ratings-from-reviews" in new.authorization_policies

            istiod.store.set_namespace_labels("bookinfo", {}, ["istio.io/dataplane-mode"])
            await store.wait_for(lambda s: wl(s, "10.244.2.13").tunnel_protocol is TunnelProtocol.NONE)

            istiod.store.remove_pod("bookinfo", "ratings-v2")
            await store.wait_for(lambda s: s.workload_by_ip("10.244.2.13") is None)
            istiod.store.remove_policy("bookinfo", "deny-legacy")
            await store.wait_for(lambda s: "bookinfo/deny-legacy" not in s.policies)
            assert client.connects == 1
            assert istiod.server.ads.nacks == []
            nursery.cancel_scope.cancel()


async def test_reconnect_resumes_with_versions_and_gets_only_the_difference() -> None:
    with trio.fail_after(30):
        async with open_test_istiod(bookinfo_world()) as istiod:
            store = StateStore()
            client = new_client(istiod.target(node="node-a"), store)
            async with trio.open_nursery() as nursery:
                await nursery.start(client.run)
                await client.wait_synced()
                nursery.cancel_scope.cancel()
            before = len(store.workloads)
            # While disconnected: one pod removed, one label changed.
            istiod.store.remove_pod("sleep", "notmeshed-4a5b6c")
            istiod.store.set_pod_labels("bookinfo", "details-v1-5f4d58", {"version": "v1b"}, [])

            applied: list[int] = []
            original = store.apply_addresses

            def spy(upserts: Iterable[Workload | Service], removed: Iterable[str]) -> None:
                upserts, removed = list(upserts), list(removed)
                applied.append(len(upserts) + len(removed))
                original(upserts, removed)

            store.apply_addresses = spy  # type: ignore[method-assign]
            client2 = new_client(istiod.target(node="node-a"), store)
            client2.versions = client.versions
            async with trio.open_nursery() as nursery:
                await nursery.start(client2.run)
                await client2.wait_synced()
                nursery.cancel_scope.cancel()
            assert applied == [2]  # one removal + one changed workload, nothing else re-sent
            assert len(store.workloads) == before - 1
            assert wl(store, "10.244.2.10").canonical_revision == "v1b"


async def test_client_reconnects_after_server_restart() -> None:
    with trio.fail_after(30):
        world = bookinfo_world()
        # One asyncio bridge for the whole test: it must outlive the first server.
        async with open_aio_loop(), trio.open_nursery() as outer:
            store = StateStore()
            async with open_test_istiod(world) as first:
                port = first.port
                ca = first.server.ca
                client = new_client(first.target(node="node-a"), store)
                await outer.start(client.run)
                await client.wait_synced()
            # The first server is gone; start a second on the same port and change the world there.
            server = IstiodServer(WorldStore(world), ca, Auth(first.tokens))
            server.store.remove_pod("bookinfo", "productpage-v1-6f9c7d")
            async with trio.open_nursery() as nursery:
                await nursery.start(
                    lambda task_status: server.serve(
                        host="127.0.0.1",
                        port=port,
                        ssl_context=server_ssl_context(ca),
                        task_status=task_status,
                    )
                )
                await store.wait_for(lambda s: s.workload_by_ip("10.244.1.10") is None)
                assert client.connects >= 2
                nursery.cancel_scope.cancel()
            outer.cancel_scope.cancel()


async def test_a_vanishing_client_does_not_disturb_the_others() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
            steady = new_client(istiod.target(node="node-b"))
            await nursery.start(steady.run)
            await steady.wait_synced()
            for _ in range(3):
                # A client that connects, syncs and disappears mid-stream (its task is cancelled).
                async with trio.open_nursery() as short_lived:
                    leaving = new_client(istiod.target(node="node-a"))
                    await short_lived.start(leaving.run)
                    await leaving.wait_synced()
                    short_lived.cancel_scope.cancel()
            istiod.store.remove_pod("bookinfo", "reviews-v2-6d7e9a")
            await steady.store.wait_for(lambda s: s.workload_by_ip("10.244.2.11") is None)
            assert steady.connects == 1 and steady.nacks_sent == []
            nursery.cancel_scope.cancel()


class Blackhole:
    """A loopback TCP relay that can stop forwarding (a partition: no FIN, no RST, just silence)."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.flowing = trio.Event()
        self.flowing.set()

    def freeze(self) -> None:
        self.flowing = trio.Event()

    async def _pump(self, src: trio.SocketStream, dst: trio.SocketStream) -> None:
        try:
            async for chunk in src:
                await self.flowing.wait()
                await dst.send_all(chunk)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            pass

    async def _handle(self, client: trio.SocketStream) -> None:
        async with client:
            await self.flowing.wait()
            upstream = await trio.open_tcp_stream("127.0.0.1", self.upstream_port)
            async with upstream, trio.open_nursery() as nursery:
                nursery.start_soon(self._pump, client, upstream)
                await self._pump(upstream, client)
                nursery.cancel_scope.cancel()

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED) -> None:
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        task_status.started(listeners[0].socket.getsockname()[1])
        await trio.serve_listeners(self._handle, listeners)


async def test_keepalive_notices_a_silent_server_and_the_client_recovers() -> None:
    with trio.fail_after(30):
        async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
            relay = Blackhole(istiod.port)
            port = await nursery.start(relay.serve)
            target = msgspec.structs.replace(
                istiod.target(node="node-a"), port=port, keepalive=0.1, keepalive_timeout=0.3
            )
            client = new_client(target)
            await nursery.start(client.run)
            await client.wait_synced()
            relay.freeze()
            # No FIN, no RST: only the unanswered PINGs can tell the stream is dead.
            while client.connected:
                await trio.sleep(0.05)
            relay.flowing.set()
            istiod.store.remove_pod("sleep", "sleep-5c6d7e")
            await client.store.wait_for(lambda s: s.workload_by_ip("10.244.1.20") is None)
            assert client.connects >= 2
            nursery.cancel_scope.cancel()


async def test_a_push_larger_than_the_tls_read_buffer_arrives_whole() -> None:
    world = bookinfo_world()
    node = world.nodes[0].name
    extra = [
        Pod(name=f"bulk-{i}", namespace="bookinfo", node=node, ips=[f"10.244.{100 + i // 250}.{i % 250 + 1}"],
            labels={"app": f"bulk-{i}", "padding": "x" * 60}, service_account=f"bulk-{i}")
        for i in range(1500)
    ]  # fmt: skip
    big = msgspec.structs.replace(world, pods=[*world.pods, *extra])
    assert len(world_to_json(big)) > 3 * GRPC_TLS_READ_BUFFER  # the initial push spans many TLS reads
    with trio.fail_after(30):
        async with open_test_istiod(big) as istiod, trio.open_nursery() as nursery:
            client = new_client(istiod.target(node="node-a"))
            await nursery.start(client.run)
            await client.wait_synced()
            assert len(client.store.workloads) == 9 + 1500
            assert client.nacks_sent == []
            nursery.cancel_scope.cancel()
