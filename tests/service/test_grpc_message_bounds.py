"""gRPC messages are bounded in size on every side (shared/aio.py): the xDS client, the CA client and the
istiod stub's server refuse a message over their bound with RESOURCE_EXHAUSTED, from its length prefix,
and carry on: the server serves its next call, the xDS client reconnects with its state unchanged."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import pytest
import trio
from google.protobuf import any_pb2

from services.istiod.server import MAX_REQUEST_SIZE
from services.istiod.world import MAX_WORLD_BYTES
from services.ztunnel.identity import ca_client
from services.ztunnel.identity.errors import CertificateError
from services.ztunnel.state.store import StateStore
from services.ztunnel.xds import client as xds_client
from services.ztunnel.xds.client import XdsClient, XdsClientConfig
from services.ztunnel.xds.convert import ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL
from shared.aio import (
    DEFAULT_MAX_MESSAGE_SIZE,
    GrpcTarget,
    RpcError,
    RpcStatus,
    ServerCall,
    open_channel,
    serve_grpc,
    trio_service,
)
from shared.api import ca_grpc, ca_pb2, discovery_grpc, discovery_pb2
from shared.identity import SpiffeId

KIB = 1024


def response_of(size: int, type_url: str = ADDRESS_TYPE_URL) -> discovery_pb2.DeltaDiscoveryResponse:
    """A delta response whose one resource carries `size` bytes (not a valid Address: never decoded here)."""
    return discovery_pb2.DeltaDiscoveryResponse(
        type_url=type_url, nonce="n1",
        resources=[discovery_pb2.Resource(name="big", version="1",
                                          resource=any_pb2.Any(type_url=type_url, value=b"x" * size))])


class Ads:
    """Answers each request with a response of `size` bytes; records what it received."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.received: list[int] = []
        self.errors: list[RpcError] = []
        self.streams = 0

    async def DeltaAggregatedResources(self, call: ServerCall) -> None:
        self.streams += 1
        try:
            while (request := await call.recv_message()) is not None:
                self.received.append(request.ByteSize())
                if not request.response_nonce:
                    await call.send_message(response_of(self.size, request.type_url))
        except RpcError as exc:
            self.errors.append(exc)
            raise


class Ca:
    def __init__(self, size: int) -> None:
        self.size = size

    async def CreateCertificate(self, call: ServerCall) -> None:
        await call.recv_message()
        await call.send_message(ca_pb2.IstioCertificateResponse(cert_chain=["x" * self.size]))


@asynccontextmanager
async def grpc_server(*services: object, max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
                      ) -> AsyncIterator[int]:
    async with trio.open_nursery() as nursery:
        port = await nursery.start(lambda task_status=trio.TASK_STATUS_IGNORED: serve_grpc(
            list(services), host="127.0.0.1", port=0, max_message_size=max_message_size,
            task_status=task_status))
        try:
            yield port
        finally:
            nursery.cancel_scope.cancel()


async def one_exchange(port: int, request: discovery_pb2.DeltaDiscoveryRequest, *,
                       max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
                       ) -> discovery_pb2.DeltaDiscoveryResponse:
    async with (
        open_channel("127.0.0.1", port, max_message_size=max_message_size) as channel,
        channel.stream(discovery_grpc.AggregatedDiscoveryServiceStub, "DeltaAggregatedResources") as call,
    ):
        await call.send_message(request)
        response = await call.recv_message()
        assert isinstance(response, discovery_pb2.DeltaDiscoveryResponse)
        return response


async def test_a_response_over_the_clients_bound_fails_the_call_from_its_prefix() -> None:
    ads = Ads(size=300 * KIB)
    with trio.fail_after(20):
        async with grpc_server(trio_service(discovery_grpc.AggregatedDiscoveryServiceBase, ads)) as port:
            request = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL)
            with pytest.raises(RpcError) as refused:
                await one_exchange(port, request, max_message_size=256 * KIB)
            assert refused.value.status == RpcStatus.RESOURCE_EXHAUSTED
            size = response_of(300 * KIB).ByteSize()
            assert refused.value.message == f"received message larger than max ({size} vs. {256 * KIB} bytes)"
            response = await one_exchange(port, request, max_message_size=512 * KIB)  # within: delivered
            assert len(response.resources[0].resource.value) == 300 * KIB


async def test_a_request_over_the_servers_bound_ends_only_that_call() -> None:
    ads = Ads(size=10)
    with trio.fail_after(20):
        async with grpc_server(trio_service(discovery_grpc.AggregatedDiscoveryServiceBase, ads),
                               max_message_size=64 * KIB) as port:
            versions = {f"r{i}": "v" * 100 for i in range(1000)}  # about 100 KiB
            huge = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL,
                                                       initial_resource_versions=versions)
            with pytest.raises(RpcError) as refused:
                await one_exchange(port, huge)
            assert refused.value.status == RpcStatus.RESOURCE_EXHAUSTED
            assert "received message larger than max" in refused.value.message
            assert [e.status for e in ads.errors] == [RpcStatus.RESOURCE_EXHAUSTED] and not ads.received
            small = discovery_pb2.DeltaDiscoveryRequest(type_url=ADDRESS_TYPE_URL)
            assert (await one_exchange(port, small)).nonce == "n1"  # the server carries on


def test_the_stubs_bound_admits_a_whole_world_document() -> None:
    assert MAX_WORLD_BYTES < MAX_REQUEST_SIZE <= MAX_WORLD_BYTES + 2 * 1024 * 1024


@contextmanager
def xds_log() -> Iterator[list[logging.LogRecord]]:
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep()
    logger = logging.getLogger(xds_client.__name__)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


async def test_the_xds_client_refuses_an_oversized_response_and_keeps_its_state(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(xds_client, "XDS_MAX_MESSAGE_SIZE", 64 * KIB)
    ads = Ads(size=100 * KIB)
    store = StateStore()
    generation = store.generation
    with xds_log() as records, trio.fail_after(20):
        async with grpc_server(trio_service(discovery_grpc.AggregatedDiscoveryServiceBase, ads)) as port:
            xds = XdsClient(GrpcTarget(host="127.0.0.1", port=port), store,
                            XdsClientConfig(node_id="n", type_urls=(ADDRESS_TYPE_URL, AUTHORIZATION_TYPE_URL),
                                            backoff_initial=0.01, backoff_max=0.01))
            async with trio.open_nursery() as nursery:
                await nursery.start(xds.run)
                while ads.streams < 2:  # refused, then reconnected
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
    assert not xds.is_synced() and store.generation == generation and not store.workloads
    ended = [r for r in records if r.getMessage() == "xDS stream ended; reconnecting"]
    error = dict(ended[0].__dict__["fields"])["error"]
    assert "RESOURCE_EXHAUSTED: received message larger than max" in error
    assert f"vs. {64 * KIB} bytes" in error
    assert xds_client.XDS_MAX_MESSAGE_SIZE == 64 * KIB  # the patched bound was the one in force


def test_upstreams_xds_bound_is_the_default() -> None:
    assert xds_client.XDS_MAX_MESSAGE_SIZE == 200 * 1024 * 1024
    assert ca_client.CA_MAX_MESSAGE_SIZE == 4 * 1024 * 1024 == DEFAULT_MAX_MESSAGE_SIZE


async def test_the_ca_client_refuses_an_oversized_answer_with_a_clear_error(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(ca_client, "CA_MAX_MESSAGE_SIZE", 16 * KIB)
    identity = SpiffeId.parse("spiffe://cluster.local/ns/a/sa/b")
    with trio.fail_after(20):
        async with grpc_server(trio_service(ca_grpc.IstioCertificateServiceBase, Ca(size=32 * KIB))) as port:
            client = ca_client.GrpcCaClient(GrpcTarget(host="127.0.0.1", port=port))
            with pytest.raises(CertificateError) as refused:
                await client.fetch(identity)
    text = str(refused.value)
    assert text.startswith(f"the CA refused a certificate for {identity.uri}: RESOURCE_EXHAUSTED: ")
    assert "received message larger than max" in text and f"vs. {16 * KIB} bytes" in text
