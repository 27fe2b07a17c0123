"""CA end to end: the stub's CreateCertificate and ztunnel's CA client / certificate manager over TLS."""

from __future__ import annotations

import base64
import datetime as dt
import logging
import time

import msgspec
import pytest
import trio
import trio.lowlevel
import trio.testing
from cryptography import x509
from google.protobuf import struct_pb2

from services.istiod.ca import CertificateAuthority
from services.istiod.testing import bookinfo_world, open_test_istiod
from services.ztunnel.identity.ca_client import GrpcCaClient
from services.ztunnel.identity.errors import CertificateError
from services.ztunnel.identity.manager import open_certificate_manager, split_pem
from shared.aio import RpcError, RpcStatus, open_target
from shared.api import ca_grpc, ca_pb2
from shared.identity import CertBundle, SpiffeId, generate_key, load_cert, make_csr, uri_sans

REVIEWS = SpiffeId(trust_domain="cluster.local", namespace="bookinfo", service_account="bookinfo-reviews")
RATINGS = SpiffeId(trust_domain="cluster.local", namespace="bookinfo", service_account="bookinfo-ratings")


class FakeClock:
    """Wall clock under test control: sleep_until returns once advance() passes the deadline."""

    def __init__(self, start: float) -> None:
        self.t = start
        self._moved = trio.Event()

    def now(self) -> float:
        return self.t

    def advance_to(self, t: float) -> None:
        self.t = t
        self._moved.set()
        self._moved = trio.Event()

    async def sleep_until(self, deadline: float) -> None:
        while self.t < deadline:
            await self._moved.wait()


class FlakyCa:
    """Wraps a real CA client; fails while `failing` is set."""

    def __init__(self, inner: GrpcCaClient) -> None:
        self.inner = inner
        self.failing = False
        self.calls = 0

    async def fetch(self, identity: SpiffeId) -> CertBundle:
        self.calls += 1
        if self.failing:
            raise CertificateError("CA unreachable (test)")
        return await self.inner.fetch(identity)


async def test_issued_chain_verifies_against_the_root_with_exactly_the_identity() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            bundle = await GrpcCaClient(istiod.target(node="node-a"), ttl_seconds=3600).fetch(REVIEWS)
            leaf = load_cert(bundle.cert_chain[0])
            root = load_cert(bundle.cert_chain[-1])
            assert root == load_cert(istiod.root_pem or "")
            leaf.verify_directly_issued_by(root)
            assert uri_sans(leaf) == [REVIEWS.uri]
            san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName)
            assert san.critical and len(list(san.value)) == 1
            assert leaf.subject == x509.Name([])
            assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
            assert 3600 <= bundle.not_after - bundle.not_before <= 3600 + 120
            assert bundle.refresh_at == pytest.approx((bundle.not_before + bundle.not_after) / 2)


async def test_foreign_identity_is_refused() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            # ratings runs only on node-b.
            with pytest.raises(
                CertificateError, match="PERMISSION_DENIED: node node-a runs no pod with identity"
            ):
                await GrpcCaClient(istiod.target(node="node-a")).fetch(RATINGS)
            assert (await GrpcCaClient(istiod.target(node="node-b")).fetch(RATINGS)).identity == RATINGS


async def test_each_refusal_is_logged_with_the_requesters_node_and_the_identity_asked(
        caplog: pytest.LogCaptureFixture) -> None:
    with trio.fail_after(20), caplog.at_level(logging.WARNING, logger="services.istiod.certificates"):
        async with open_test_istiod(bookinfo_world()) as istiod:
            with pytest.raises(CertificateError, match="PERMISSION_DENIED"):
                await GrpcCaClient(istiod.target(node="node-a")).fetch(RATINGS)  # ratings runs on node-b
            with pytest.raises(CertificateError, match="UNAUTHENTICATED"):
                await GrpcCaClient(istiod.target()).fetch(REVIEWS)  # no token
    refusals = [dict(getattr(r, "fields", ())) for r in caplog.records
                if r.getMessage() == "certificate refused"]
    assert [(f["node"], f["identity"], f["status"]) for f in refusals] == [
        ("node-a", RATINGS.uri, "PERMISSION_DENIED"), (None, None, "UNAUTHENTICATED")]
    assert "runs no pod with identity" in str(refusals[0]["reason"]) and refusals[0]["peer"]


async def test_node_removed_from_the_world_gets_nothing() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            target = istiod.target(node="node-a")
            world = istiod.store.world
            istiod.store.apply(
                msgspec.structs.replace(
                    world,
                    nodes=[n for n in world.nodes if n.name != "node-a"],
                    pods=[p for p in world.pods if p.node != "node-a"],
                ),
                "without node-a",
            )
            with pytest.raises(CertificateError, match="PERMISSION_DENIED: node node-a is not in the world"):
                await GrpcCaClient(target).fetch(REVIEWS)


async def test_csr_san_must_match_the_impersonated_identity() -> None:
    with trio.fail_after(20):
        async with open_test_istiod(bookinfo_world()) as istiod:
            target = istiod.target(node="node-a")
            metadata = struct_pb2.Struct()
            metadata.update({"ImpersonatedIdentity": REVIEWS.uri})
            sleep_id = SpiffeId(trust_domain="cluster.local", namespace="sleep", service_account="sleep")
            request = ca_pb2.IstioCertificateRequest(
                csr=make_csr(generate_key(), sleep_id), metadata=metadata
            )
            async with open_target(target) as channel:
                with pytest.raises(RpcError) as info:
                    await channel.unary(
                        ca_grpc.IstioCertificateServiceStub,
                        "CreateCertificate",
                        request,
                        metadata=target.call_metadata(),
                    )
                assert info.value.status is RpcStatus.INVALID_ARGUMENT
                assert "not exactly the requested identity" in info.value.message
                request = ca_pb2.IstioCertificateRequest(csr="not a csr", metadata=metadata)
                with pytest.raises(RpcError, match="cannot parse the CSR"):
                    await channel.unary(
                        ca_grpc.IstioCertificateServiceStub,
                        "CreateCertificate",
                        request,
                        metadata=target.call_metadata(),
                    )
                with pytest.raises(RpcError) as info:
                    await channel.unary(ca_grpc.IstioCertificateServiceStub, "CreateCertificate", request)
                assert info.value.status is RpcStatus.UNAUTHENTICATED


def ca_on(clock: FakeClock) -> CertificateAuthority:
    """The stub's CA dating certificates by the same fake clock the manager uses."""
    return CertificateAuthority.create(now=lambda: dt.datetime.fromtimestamp(clock.now(), dt.UTC))


async def expire_unrenewed(ca: FlakyCa, clock: FakeClock, bundle: CertBundle) -> None:
    """Let `bundle` expire while the CA refuses, and wait for the manager's next (failing) try."""
    ca.failing = True
    calls = ca.calls
    clock.advance_to(bundle.not_after + 1)
    while ca.calls == calls:
        await trio.testing.wait_all_tasks_blocked()
        await trio.lowlevel.checkpoint()


async def test_manager_caches_and_rotates_at_half_life() -> None:
    with trio.fail_after(20):
        clock = FakeClock(time.time())
        async with open_test_istiod(bookinfo_world(), ca=ca_on(clock)) as istiod:
            ca = FlakyCa(GrpcCaClient(istiod.target(node="node-a"), ttl_seconds=3600))
            async with open_certificate_manager(ca, clock=clock) as manager:
                first = await manager.fetch_certificate(REVIEWS)
                assert await manager.fetch_certificate(REVIEWS) is first
                assert ca.calls == 1
                # Just before half-life: still cached, no new fetch.
                clock.advance_to(first.refresh_at - 1)
                await trio.testing.wait_all_tasks_blocked()
                assert ca.calls == 1
                clock.advance_to(first.refresh_at)
                second = await manager.wait_renewed(REVIEWS, first)
                assert second.not_after == pytest.approx(first.refresh_at + 3600)
                assert await manager.fetch_certificate(REVIEWS) is second
                assert ca.calls == 2


async def test_failed_renewal_keeps_the_old_certificate_then_recovers() -> None:
    with trio.fail_after(20):
        clock = FakeClock(time.time())
        async with open_test_istiod(bookinfo_world(), ca=ca_on(clock)) as istiod:
            ca = FlakyCa(GrpcCaClient(istiod.target(node="node-a"), ttl_seconds=3600))
            async with open_certificate_manager(ca, clock=clock, retry_initial=10) as manager:
                first = await manager.fetch_certificate(REVIEWS)
                ca.failing = True
                clock.advance_to(first.refresh_at)
                while ca.calls < 2:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.lowlevel.checkpoint()
                assert await manager.fetch_certificate(REVIEWS) is first
                ca.failing = False
                clock.advance_to(first.refresh_at + 10)
                second = await manager.wait_renewed(REVIEWS, first)
                assert second != first
                # Once expired with no renewal possible, the manager says so.
                await expire_unrenewed(ca, clock, second)
                with pytest.raises(CertificateError, match="CA unreachable"):
                    await manager.fetch_certificate(REVIEWS)


async def test_manager_dump_is_upstreams_certificate_states() -> None:
    with trio.fail_after(20):
        clock = FakeClock(time.time())
        async with open_test_istiod(bookinfo_world(), ca=ca_on(clock)) as istiod:
            ca = FlakyCa(GrpcCaClient(istiod.target(node="node-a"), ttl_seconds=3600))
            ca.failing = True
            async with open_certificate_manager(ca, clock=clock, retry_initial=10) as manager:
                with pytest.raises(CertificateError):
                    await manager.fetch_certificate(REVIEWS)
                assert manager.dump() == [{"identity": REVIEWS.uri, "certChain": [], "rootCerts": [],
                                           "state": "Unavailable: CA unreachable (test)"}]
                ca.failing = False
                clock.advance_to(clock.now() + 10)
                while (bundle := manager.cached(REVIEWS)) is None:
                    await trio.testing.wait_all_tasks_blocked()
                    await trio.lowlevel.checkpoint()
                [held] = manager.dump()
                assert held["state"] == "Available"
                [leaf], [root] = held["certChain"], held["rootCerts"]
                assert base64.b64decode(leaf["pem"]).decode() == bundle.leaf_pem
                leaf_cert, root_cert = load_cert(bundle.leaf_pem), load_cert(base64.b64decode(root["pem"]))
                assert leaf["serialNumber"] == str(leaf_cert.serial_number)
                assert root["serialNumber"] == str(root_cert.serial_number) != leaf["serialNumber"]
                rfc3339 = "%Y-%m-%dT%H:%M:%SZ"
                assert leaf["validFrom"] == time.strftime(rfc3339, time.gmtime(bundle.not_before))
                assert leaf["expirationTime"] == time.strftime(rfc3339, time.gmtime(bundle.not_after))
                # Expired, not renewed: unavailable, the old chain still shown (istioctl: VALID CERT false).
                await expire_unrenewed(ca, clock, bundle)
                [held] = manager.dump()
                assert held["state"] == "Unavailable: CA unreachable (test)" and held["certChain"] == [leaf]


def test_split_pem_keeps_each_certificate() -> None:
    one, two = (CertificateAuthority.create().root_pem for _ in range(2))
    assert split_pem(one + two) == [one, two] and split_pem(one) == [one] and split_pem("") == []
