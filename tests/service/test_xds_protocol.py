"""Delta ADS protocol details, driven by a raw gRPC stream and decoded with the generated classes
(conformance-style): type URLs, resource keys, nonces, ACK/NACK, unknown type URLs, NACKs of the client."""

from __future__ import annotations

from contextlib import AbstractAsyncContextManager

import pytest
import trio

from services.istiod.derive import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from services.istiod.testing import bookinfo_world, open_test_istiod
from services.ztunnel.state.store import StateStore
from services.ztunnel.xds.client import XdsClient, XdsClientConfig
from shared.aio import Channel, ClientCall, GrpcTarget, RpcError, RpcStatus, open_target
from shared.api import authorization_pb2, discovery_grpc, discovery_pb2, envoy_base_pb2, rpc_status_pb2
from shared.api import workload_pb2 as wpb

NODE = envoy_base_pb2.Node(id="ztunnel~127.0.0.1~ztunnel-a.istio-system~istio-system.svc.cluster.local")


async def recv(call: ClientCall) -> discovery_pb2.DeltaDiscoveryResponse:
    response = await call.recv_message()
    assert response is not None
    assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
    return response


def ads_stream(channel: Channel, target: GrpcTarget) -> AbstractAsyncContextManager[ClientCall]:
    """One DeltaAggregatedResources call on `channel`, authenticated as `target`'s node."""
    return channel.stream(
        discovery_grpc.AggregatedDiscoveryServiceStub,
        "DeltaAggregatedResources",
        metadata=target.call_metadata(),
    )


def subscribe(type_url: str, **kwargs: object) -> discovery_pb2.DeltaDiscoveryRequest:
    return discovery_pb2.DeltaDiscoveryRequest(node=NODE, type_url=type_url, **kwargs)  # type: ignore[arg-type]


async def test_server_sends_upstream_shaped_resources() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_target(istiod.target(node="node-a")) as channel,
            ads_stream(channel, istiod.target(node="node-a")) as call,
        ):
            await call.send_message(subscribe(ADDRESS_TYPE_URL))
            response = await recv(call)
            assert response.type_url == ADDRESS_TYPE_URL
            assert response.nonce and response.system_version_info
            names = set()
            for resource in response.resources:
                assert resource.resource.type_url == ADDRESS_TYPE_URL
                assert resource.version
                address = wpb.Address.FromString(resource.resource.value)
                if address.WhichOneof("type") == "workload":
                    assert resource.name == address.workload.uid
                    assert address.workload.uid.startswith("Kubernetes//Pod/")
                    assert all(len(a) in (4, 16) for a in address.workload.addresses)
                else:
                    svc = address.service
                    assert resource.name == f"{svc.namespace}/{svc.hostname}"
                names.add(resource.name)
            assert "Kubernetes//Pod/sleep/sleep-5c6d7e" in names
            assert "bookinfo/productpage.bookinfo.svc.cluster.local" in names
            # ACK, then subscribe to policies on the same stream.
            await call.send_message(subscribe(ADDRESS_TYPE_URL, response_nonce=response.nonce))
            await call.send_message(subscribe(AUTHORIZATION_TYPE_URL))
            response = await recv(call)
            assert response.type_url == AUTHORIZATION_TYPE_URL
            by_name = {
                r.name: authorization_pb2.Authorization.FromString(r.resource.value)
                for r in response.resources
            }
            ratings = by_name["bookinfo/ratings-from-reviews"]
            assert ratings.scope == authorization_pb2.WORKLOAD_SELECTOR
            assert ratings.rules[0].clauses[0].matches[0].principals[0].exact == (
                "cluster.local/ns/bookinfo/sa/bookinfo-reviews"  # principals travel without the scheme
            )
            deny = by_name["bookinfo/deny-legacy"]
            assert deny.action == authorization_pb2.DENY and deny.scope == authorization_pb2.NAMESPACE
            src = deny.rules[0].clauses[0].matches[0].source_ips[0]
            assert (src.address, src.length) == (bytes([10, 244, 1, 30]), 32)


async def test_nack_is_recorded_and_the_stream_keeps_working() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_target(istiod.target(node="node-a")) as channel,
            ads_stream(channel, istiod.target(node="node-a")) as call,
        ):
            await call.send_message(subscribe(ADDRESS_TYPE_URL))
            first = await recv(call)
            nack = subscribe(
                ADDRESS_TYPE_URL,
                response_nonce=first.nonce,
                error_detail=rpc_status_pb2.Status(code=3, message="cannot use resource x"),
            )
            await call.send_message(nack)
            istiod.store.remove_pod("sleep", "sleep-5c6d7e")
            second = await recv(call)
            assert list(second.removed_resources) == ["Kubernetes//Pod/sleep/sleep-5c6d7e"]
            assert second.nonce != first.nonce
            assert [n.message for n in istiod.server.ads.nacks] == ["cannot use resource x"]
            assert istiod.server.ads.nacks[0].nonce == first.nonce


async def test_initial_resource_versions_get_only_the_difference() -> None:
    with trio.fail_after(20):
        world = bookinfo_world()
        async with open_test_istiod(world) as istiod:
            current = istiod.store.resources.by_type[ADDRESS_TYPE_URL]
            known = {name: version for name, (version, _) in current.items()}
            known["Kubernetes//Pod/bookinfo/details-v1-5f4d58"] = "stale"
            known["Kubernetes//Pod/gone/ghost"] = "v0"
            async with (
                open_target(istiod.target(node="node-a")) as channel,
                ads_stream(channel, istiod.target(node="node-a")) as call,
            ):
                await call.send_message(subscribe(ADDRESS_TYPE_URL, initial_resource_versions=known))
                response = await recv(call)
                assert [r.name for r in response.resources] == ["Kubernetes//Pod/bookinfo/details-v1-5f4d58"]
                assert list(response.removed_resources) == ["Kubernetes//Pod/gone/ghost"]


async def test_unknown_type_url_ends_the_call_with_invalid_argument() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_target(istiod.target(node="node-a")) as channel,
            ads_stream(channel, istiod.target(node="node-a")) as call,
        ):
            await call.send_message(subscribe("type.googleapis.com/envoy.config.cluster.v3.Cluster"))
            with pytest.raises(RpcError) as info:
                await call.recv_message()
            assert info.value.status is RpcStatus.INVALID_ARGUMENT
            assert "unknown type URL" in info.value.message
            # The server is unharmed: a new stream works.
            async with ads_stream(channel, istiod.target(node="node-a")) as call2:
                await call2.send_message(subscribe(ADDRESS_TYPE_URL))
                assert (await recv(call2)).resources


async def test_missing_or_bad_token_is_unauthenticated() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            for token in (None, "nope"):
                target = istiod.target(token=token)
                async with (
                    open_target(target) as channel,
                    ads_stream(channel, target) as call,
                ):
                    with pytest.raises(RpcError) as info:
                        await call.send_message(subscribe(ADDRESS_TYPE_URL))
                        await call.recv_message()
                    assert info.value.status is RpcStatus.UNAUTHENTICATED


async def test_client_nacks_what_it_cannot_convert_and_keeps_the_rest() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod, trio.open_nursery() as nursery:
            bad = wpb.Address(
                workload=wpb.Workload(uid="bad", name="bad", namespace="x", addresses=[b"\x01\x02\x03"])
            )
            istiod.store.resources.by_type[ADDRESS_TYPE_URL]["bad"] = ("v1", bad)
            client = XdsClient(istiod.target(node="node-a"), StateStore(), XdsClientConfig(node_id=NODE.id))
            await nursery.start(client.run)
            await client.wait_synced()
            assert len(client.store.workloads) == 9
            assert "bad" not in client.versions[ADDRESS_TYPE_URL]
            assert len(client.nacks_sent) == 1 and "3 bytes" in client.nacks_sent[0]
            # The server records it once the NACK arrives.
            while not istiod.server.ads.nacks:
                await trio.sleep(0.01)
            assert "resource 'bad'" in istiod.server.ads.nacks[0].message
            nursery.cancel_scope.cancel()


async def test_on_demand_subscription_gets_only_named_resources() -> None:
    with trio.fail_after(20):
        async with (
            open_test_istiod(bookinfo_world()) as istiod,
            open_target(istiod.target(node="node-a")) as channel,
            ads_stream(channel, istiod.target(node="node-a")) as call,
        ):
            # Upstream on-demand mode: subscribe ["*"] + unsubscribe ["*"]: nothing until names are asked for.
            await call.send_message(
                subscribe(ADDRESS_TYPE_URL, resource_names_subscribe=["*"], resource_names_unsubscribe=["*"])
            )
            first = await recv(call)
            assert list(first.resources) == [] and list(first.removed_resources) == []
            wanted = "Kubernetes//Pod/sleep/sleep-5c6d7e"
            await call.send_message(
                subscribe(ADDRESS_TYPE_URL, response_nonce=first.nonce, resource_names_subscribe=[wanted])
            )
            second = await recv(call)
            assert [r.name for r in second.resources] == [wanted]
            # Changes to resources not subscribed are not pushed; changes to the subscribed one are.
            istiod.store.remove_pod("bookinfo", "details-v1-5f4d58")
            istiod.store.set_pod_labels("sleep", "sleep-5c6d7e", {"version": "v9"}, [])  # canonical_revision
            third = await recv(call)
            assert [r.name for r in third.resources] == [wanted]
            assert list(third.removed_resources) == []
