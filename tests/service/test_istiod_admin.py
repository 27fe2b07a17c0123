"""The WorldAdmin API (what `ambient world` talks to): atomic changes, operator-facing errors, admin token."""

from __future__ import annotations

import json

import pytest
import trio

from services.istiod.testing import bookinfo_world, open_test_istiod
from shared.aio import Channel, GrpcTarget, RpcError, RpcStatus, open_target
from shared.api import worldadmin_grpc, worldadmin_pb2


async def call(
    channel: Channel, target: GrpcTarget, method: str, request: object
) -> worldadmin_pb2.WorldResponse:
    response = await channel.unary(
        worldadmin_grpc.WorldAdminStub, method, request, metadata=target.call_metadata()
    )
    assert isinstance(response, worldadmin_pb2.WorldResponse)
    return response


async def test_mutations_apply_atomically_with_clear_errors() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            target = istiod.admin_target()
            async with open_target(target) as channel:
                start = istiod.store.generation
                pod = {"name": "x", "namespace": "sleep", "node": "node-a", "ips": ["10.244.1.99"]}
                response = await call(
                    channel, target, "AddPod", worldadmin_pb2.AddPodRequest(pod_json=json.dumps(pod).encode())
                )
                assert response.generation == start + 1

                with pytest.raises(RpcError) as info:
                    bad = dict(pod, name="y", node="node-q")
                    await call(
                        channel,
                        target,
                        "AddPod",
                        worldadmin_pb2.AddPodRequest(pod_json=json.dumps(bad).encode()),
                    )
                assert info.value.status is RpcStatus.INVALID_ARGUMENT
                assert (
                    info.value.message == "pod sleep/y: $.node: unknown node 'node-q' (nodes: node-a, node-b)"
                )

                with pytest.raises(RpcError) as info:
                    await call(
                        channel,
                        target,
                        "RemovePod",
                        worldadmin_pb2.RemovePodRequest(namespace="sleep", name="nope"),
                    )
                assert info.value.status is RpcStatus.NOT_FOUND

                with pytest.raises(RpcError) as info:
                    request = worldadmin_pb2.ApplyWorldRequest(document=b"pods: 3", source="broken.yaml")
                    await call(channel, target, "ApplyWorld", request)
                assert info.value.message.startswith("broken.yaml: $.pods: Expected `array`")
                assert istiod.store.generation == start + 1  # nothing of the failures applied

                request = worldadmin_pb2.SetLabelsRequest(
                    kind=worldadmin_pb2.SetLabelsRequest.NAMESPACE, name="legacy", set={"team": "a"}
                )
                await call(channel, target, "SetLabels", request)
                world = await call(channel, target, "GetWorld", worldadmin_pb2.GetWorldRequest())
                legacy = next(
                    ns for ns in json.loads(world.world_json)["namespaces"] if ns["name"] == "legacy"
                )
                assert legacy["labels"] == {"team": "a"}
                policy = {"name": "p", "namespace": "sleep", "action": "deny"}
                await call(
                    channel,
                    target,
                    "AddPolicy",
                    worldadmin_pb2.AddPolicyRequest(policy_json=json.dumps(policy).encode()),
                )
                await call(
                    channel,
                    target,
                    "RemovePolicy",
                    worldadmin_pb2.RemovePolicyRequest(namespace="sleep", name="p"),
                )
                assert istiod.store.generation == start + 4


async def test_admin_calls_need_the_admin_token() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            for target in (istiod.target(node="node-a"), istiod.target()):
                async with open_target(target) as channel:
                    with pytest.raises(RpcError) as info:
                        await call(channel, target, "GetWorld", worldadmin_pb2.GetWorldRequest())
                    assert info.value.status is RpcStatus.UNAUTHENTICATED


async def test_changes_are_refused_while_the_world_follows_the_kubernetes_api() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            istiod.store.follows = "the Kubernetes API server"
            target = istiod.admin_target()
            async with open_target(target) as channel:
                start = istiod.store.generation
                with pytest.raises(RpcError) as info:
                    await call(channel, target, "RemovePod",
                               worldadmin_pb2.RemovePodRequest(namespace="sleep", name="sleep-5c6d7e"))
                assert info.value.status is RpcStatus.FAILED_PRECONDITION
                assert "follows the Kubernetes API server" in info.value.message
                assert istiod.store.generation == start
                response = await call(channel, target, "GetWorld", worldadmin_pb2.GetWorldRequest())
                assert response.generation == start  # reading still works
