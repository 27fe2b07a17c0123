"""ztunnel's DNS proxy in a real pod namespace with the node agent's DNS rules: the pod's port-53 queries
land on 15053 (the nat rule's counters), service names are answered from the xDS state without reaching the
resolver, other names are forwarded from the pod's netns with ztunnel's mark (not captured again) to a fake
resolver in a second namespace this test creates; opting out (no DNS rules) leaves the resolver to answer.

    pod netns [vp9 10.250.9.1/24] <--veth--> [vs9 10.250.9.2/24] resolver netns (the fake resolver on :53)
"""

from __future__ import annotations

import os
import socket
import subprocess
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import dns.message
import dns.rcode
import trio

from services.istiod.ca import CertificateAuthority
from services.node_agent.rules import Family, PodRedirect, RuleSettings, render_restore
from services.ztunnel.hbone.tls import TlsContextCache
from services.ztunnel.inpod.handler import InPodWorkloadHandler
from services.ztunnel.proxy.context import Mesh, ProxyConfig
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import NetworkAddress, Service
from services.ztunnel.telemetry.access_log import Telemetry
from shared.netns import entered, open_netns
from shared.zds.types import PodUid, WorkloadInfo
from tests.netns.conftest import run
from tests.service.test_dns_proxy import FakeUpstream, addresses, ask_tcp, count
from tests.service.test_hbone_helpers import FakeCerts

POD_IP, RESOLVER_IP = "10.250.9.1", "10.250.9.2"
INFO = WorkloadInfo(name="sleep", namespace="default", service_account="sleep")


def wire_pod(make_netns: Callable[[str], str], *, capture: bool) -> tuple[str, str]:
    pod, resolver = make_netns("dnspod"), make_netns("dnsres")
    run("ip", "link", "add", "vp9", "type", "veth", "peer", "name", "vs9", "netns", resolver, netns=pod)
    run("ip", "addr", "add", f"{POD_IP}/24", "dev", "vp9", netns=pod)
    run("ip", "link", "set", "vp9", "up", netns=pod)
    run("ip", "addr", "add", f"{RESOLVER_IP}/24", "dev", "vs9", netns=resolver)
    run("ip", "link", "set", "vs9", "up", netns=resolver)
    settings = RuleSettings(dns_capture=capture, ipv6=False)
    rules = render_restore(PodRedirect(dns_capture=capture), settings, Family.V4)
    subprocess.run(["ip", "netns", "exec", pod, "iptables-restore", "--noflush", "-v"], input=rules,
                   check=True, capture_output=True, text=True, timeout=30)
    return pod, resolver


@asynccontextmanager
async def fake_resolver(resolver_ns: str, upstream: FakeUpstream) -> AsyncIterator[None]:
    fd = open_netns(resolver_ns)
    try:
        with entered(fd):
            udp = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            tcp = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        await udp.bind((RESOLVER_IP, 53))
        await tcp.bind((RESOLVER_IP, 53))
        tcp.listen(8)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(upstream.serve_udp, udp)
            nursery.start_soon(upstream.serve_tcp, tcp)
            yield
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)


async def ask_udp_in(pod_fd: int, name: str) -> dns.message.Message:
    with entered(pod_fd):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with sock:
        await sock.connect((RESOLVER_IP, 53))  # what the pod's resolv.conf names; the rules take it to 15053
        await sock.send(dns.message.make_query(name, "A").to_wire())
        return dns.message.from_wire(await sock.recv(65535))


def dns_rule_packets(pod: str) -> int:
    out = run("iptables", "-t", "nat", "-L", "ISTIO_OUTPUT", "-v", "-x", "-n", netns=pod).stdout
    return sum(int(line.split()[0]) for line in out.splitlines() if "redir ports 15053" in line)


def mesh() -> Mesh:
    store = StateStore()
    store.apply_addresses([Service(name="productpage", namespace="bookinfo",
                                   hostname="productpage.bookinfo.svc.cluster.local",
                                   addresses=(NetworkAddress(address="10.96.0.20"),))], [])
    return Mesh(store=store, certs=FakeCerts(CertificateAuthority.create()),  # type: ignore[arg-type]
                contexts=TlsContextCache(), workload_wait=0.0)


async def test_pod_dns_is_answered_by_ztunnel_and_forwarded_past_the_capture(
        make_netns: Callable[[str], str]) -> None:
    pod, resolver = wire_pod(make_netns, capture=True)
    upstream = FakeUpstream(address="192.0.2.7")
    config = ProxyConfig(ipv6=False, dns_capture=True, dns_upstreams=(RESOLVER_IP,), dns_timeout=5.0)
    pod_fd = open_netns(pod)
    try:
        async with fake_resolver(resolver, upstream), trio.open_nursery() as pods:
            zt = InPodWorkloadHandler(pods, config=config, telemetry=Telemetry(), mesh=mesh())
            await zt.start_workload(PodUid("uid-dns"), INFO, pod_fd)
            listeners = {(li.role, li.address, li.port) for li in zt.pods[PodUid("uid-dns")].listeners}
            assert {("dns_tcp", "127.0.0.1", 15053), ("dns_udp", "127.0.0.1", 15053)} <= listeners

            local = await ask_udp_in(pod_fd, "productpage.bookinfo.svc.cluster.local")
            assert addresses(local) == ["10.96.0.20"]
            assert upstream.seen == []  # answered by ztunnel: the resolver never saw it
            forwarded = await ask_udp_in(pod_fd, "www.example.com")
            assert addresses(forwarded) == ["192.0.2.7"]
            assert upstream.seen == [("udp", "www.example.com.")]  # once: ztunnel's own query is not captured
            with entered(pod_fd):
                tcp_client = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            await tcp_client.connect((RESOLVER_IP, 53))
            (tcp_answer,) = await ask_tcp(tcp_client, dns.message.make_query("productpage.bookinfo",
                                                                             "A").to_wire())
            assert addresses(tcp_answer) == ["10.96.0.20"]

            metrics = zt.telemetry.metrics
            assert count(metrics, "dns_requests", request_protocol="udp") == 2
            assert count(metrics, "dns_requests", request_protocol="tcp", source_workload="sleep") == 1
            assert count(metrics, "dns_upstream_requests") == 1
            assert dns_rule_packets(pod) >= 3
            pods.cancel_scope.cancel()
    finally:
        os.close(pod_fd)


async def test_opted_out_pod_is_answered_by_the_resolver(make_netns: Callable[[str], str]) -> None:
    pod, resolver = wire_pod(make_netns, capture=False)
    upstream = FakeUpstream(address="192.0.2.8")
    pod_fd = open_netns(pod)
    try:
        async with fake_resolver(resolver, upstream):
            reply = await ask_udp_in(pod_fd, "productpage.bookinfo.svc.cluster.local")
            assert reply.rcode() == dns.rcode.NOERROR and addresses(reply) == ["192.0.2.8"]
            assert upstream.seen == [("udp", "productpage.bookinfo.svc.cluster.local.")]
            assert dns_rule_packets(pod) == 0
    finally:
        os.close(pod_fd)
