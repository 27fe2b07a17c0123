"""Real namespaces, real iptables/nft, real sockets: the in-pod rules redirect what upstream's do.

Topology (all inside namespaces this test creates; nothing is added to the host namespace):

    pod netns  [vp 10.250.0.2/24, fd00:250::2/64] <--veth--> [vr 10.250.0.1/24, fd00:250::1/64]  remote netns
"""

from __future__ import annotations

import os
import socket
import struct
from collections.abc import Callable, Iterator
from functools import partial

import pytest
import trio

from services.node_agent.apply import (
    ApplyOutcome,
    Backend,
    NetnsRuleApplier,
    Snapshot,
    in_netns,
    inspect_here,
)
from services.node_agent.errors import NetnsGoneError, RuleApplyError
from services.node_agent.rules import PodRedirect, RuleSettings
from shared.netns import entered, open_netns
from tests.netns.conftest import run

POD_IP, REMOTE_IP = "10.250.0.2", "10.250.0.1"
POD_IP6, REMOTE_IP6 = "fd00:250::2", "fd00:250::1"
SO_ORIGINAL_DST = 80
IP6T_SO_ORIGINAL_DST = 80
SO_MARK = 36


class Pair:
    def __init__(self, pod: str, remote: str) -> None:
        self.pod, self.remote = pod, remote
        self.pod_fd = open_netns(pod)
        self.remote_fd = open_netns(remote)

    def close(self) -> None:
        os.close(self.pod_fd)
        os.close(self.remote_fd)


@pytest.fixture
def pair(make_netns: Callable[[str], str]) -> Iterator[Pair]:
    pod, remote = make_netns("pod"), make_netns("remote")
    run("ip", "-n", pod, "link", "add", "vp", "type", "veth", "peer", "name", "vr", "netns", remote)
    for ns, dev, v4, v6 in ((pod, "vp", POD_IP, POD_IP6), (remote, "vr", REMOTE_IP, REMOTE_IP6)):
        run("ip", "-n", ns, "addr", "add", f"{v4}/24", "dev", dev)
        run("ip", "-n", ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
        run("ip", "-n", ns, "link", "set", dev, "up")
    p = Pair(pod, remote)
    try:
        yield p
    finally:
        p.close()


def listen(netns_fd: int, port: int, *, family: int = socket.AF_INET) -> socket.socket:
    with entered(netns_fd):
        s = socket.socket(family, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("::" if family == socket.AF_INET6 else "0.0.0.0", port))
    s.listen(8)
    s.settimeout(10)  # a safety net against hanging the suite, not an assertion
    return s


def connect(netns_fd: int, addr: str, port: int, *, mark: int | None = None) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    with entered(netns_fd):
        c = socket.socket(family, socket.SOCK_STREAM)
    if mark is not None:
        c.setsockopt(socket.SOL_SOCKET, SO_MARK, mark)
    c.settimeout(10)
    c.connect((addr, port))
    return c


def original_dst(conn: socket.socket) -> tuple[str, int]:
    if conn.family == socket.AF_INET6:
        raw = conn.getsockopt(socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, 28)
        port = struct.unpack("!H", raw[2:4])[0]
        return socket.inet_ntop(socket.AF_INET6, raw[8:24]), port
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return socket.inet_ntoa(raw[4:8]), port


async def our_state(netns_fd: int) -> Snapshot:
    # pyroute2 0.9's sync IPRoute refuses to run on the Trio thread once trio_asyncio is imported
    return await trio.to_thread.run_sync(in_netns, netns_fd, inspect_here)


async def assert_clean(pair: Pair) -> None:
    state = await our_state(pair.pod_fd)
    assert state == Snapshot(saved={"V4": {}, "V6": {}}, ip_rules=[], table_100=[])
    for cmd in ("iptables-save", "ip6tables-save"):
        assert "ISTIO" not in run(cmd, netns=pair.pod).stdout
    assert "lookup 100" not in run("ip", "rule", netns=pair.pod).stdout
    assert run("ip", "route", "show", "table", "100", netns=pair.pod).stdout.strip() == ""
    assert "istio" not in run("nft", "list", "ruleset", netns=pair.pod).stdout


def check_redirection(pair: Pair, *, v6: bool = False) -> None:
    family = socket.AF_INET6 if v6 else socket.AF_INET
    remote_ip, pod_ip = (REMOTE_IP6, POD_IP6) if v6 else (REMOTE_IP, POD_IP)
    outbound, inbound, hbone = (listen(pair.pod_fd, p, family=family) for p in (15001, 15006, 15008))
    app_remote = listen(pair.remote_fd, 8080, family=family)
    try:
        # outbound: the pod's connect to a remote address lands on 15001 with the original destination intact
        client = connect(pair.pod_fd, remote_ip, 8080)
        conn, _ = outbound.accept()
        assert original_dst(conn) == (remote_ip, 8080)
        conn.close()
        client.close()

        # mark 0x539 (ztunnel's own sockets) bypasses capture and really reaches the remote
        client = connect(pair.pod_fd, remote_ip, 8080, mark=0x539)
        conn, peer = app_remote.accept()
        assert peer[0] == pod_ip
        conn.close()
        client.close()

        # inbound plaintext lands on 15006 with its original destination
        client = connect(pair.remote_fd, pod_ip, 9080)
        conn, peer = inbound.accept()
        assert peer[0] == remote_ip
        assert original_dst(conn) == (pod_ip, 9080)
        conn.close()
        client.close()

        # inbound HBONE (15008) is not redirected
        client = connect(pair.remote_fd, pod_ip, 15008)
        conn, _ = hbone.accept()
        assert conn.getsockname()[1] == 15008
        conn.close()
        client.close()
    finally:
        for s in (outbound, inbound, hbone, app_remote):
            s.close()


@pytest.mark.parametrize("backend", [Backend.IPTABLES, Backend.NFTABLES])
async def test_rules_redirect_outbound_and_inbound(pair: Pair, backend: Backend) -> None:
    applier = NetnsRuleApplier(RuleSettings(), backend)
    assert await applier.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.INSTALLED
    await trio.to_thread.run_sync(check_redirection, pair)
    await applier.delete(pair.pod_fd)
    await assert_clean(pair)


@pytest.mark.parametrize("backend", [Backend.IPTABLES, Backend.NFTABLES])
async def test_ipv6_rules_redirect(pair: Pair, backend: Backend) -> None:
    applier = NetnsRuleApplier(RuleSettings(ipv6=True), backend)
    assert await applier.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.INSTALLED
    assert "lookup 100" in run("ip", "-6", "rule", netns=pair.pod).stdout
    await trio.to_thread.run_sync(lambda: check_redirection(pair, v6=True))
    await applier.delete(pair.pod_fd)
    await assert_clean(pair)


@pytest.mark.parametrize("backend", [Backend.IPTABLES, Backend.NFTABLES])
async def test_apply_twice_and_delete_twice_are_clean(pair: Pair, backend: Backend) -> None:
    applier = NetnsRuleApplier(RuleSettings(dns_capture=True, ipv6=True), backend)
    redirect = PodRedirect(dns_capture=True)
    assert await applier.apply(pair.pod_fd, redirect) is ApplyOutcome.INSTALLED
    first = await our_state(pair.pod_fd)
    rules_before = run("ip", "rule", netns=pair.pod).stdout
    ruleset_before = run("nft", "-s", "list", "ruleset", netns=pair.pod).stdout
    assert await applier.apply(pair.pod_fd, redirect) is ApplyOutcome.UNCHANGED
    assert await our_state(pair.pod_fd) == first
    assert run("ip", "rule", netns=pair.pod).stdout == rules_before
    assert run("nft", "-s", "list", "ruleset", netns=pair.pod).stdout == ruleset_before
    assert run("ip", "rule", netns=pair.pod).stdout.count("fwmark 0x111/0xfff lookup 100") == 1
    assert "local default dev lo" in run("ip", "route", "show", "table", "100", netns=pair.pod).stdout
    await applier.delete(pair.pod_fd)
    await applier.delete(pair.pod_fd)
    await assert_clean(pair)


async def test_iptables_state_matches_expected_saved_form(pair: Pair) -> None:
    """The drift check compares iptables-save with `expected_saved`: a fresh apply must compare equal."""
    settings = RuleSettings(dns_capture=True, ipv6=True)
    applier = NetnsRuleApplier(settings)
    redirect = PodRedirect(dns_capture=True, virtual_interfaces=("vp",))
    await applier.apply(pair.pod_fd, redirect)
    in_sync, present = await trio.to_thread.run_sync(
        in_netns, pair.pod_fd, partial(applier.in_sync_here, redirect)
    )
    assert (in_sync, present) == (True, True)
    await applier.delete(pair.pod_fd)


async def test_drift_is_repaired(pair: Pair) -> None:
    applier = NetnsRuleApplier(RuleSettings())
    await applier.apply(pair.pod_fd, PodRedirect())
    expected = await our_state(pair.pod_fd)
    run("iptables", "-t", "nat", "-F", "ISTIO_OUTPUT", netns=pair.pod)
    run("ip", "route", "flush", "table", "100", netns=pair.pod)
    assert await applier.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.REPAIRED
    assert await our_state(pair.pod_fd) == expected
    await trio.to_thread.run_sync(check_redirection, pair)
    await applier.delete(pair.pod_fd)
    await assert_clean(pair)


async def test_half_failed_apply_rolls_back(pair: Pair) -> None:
    # the v4 restore succeeds, the v6 one is rejected (bad address): nothing may be left behind
    applier = NetnsRuleApplier(RuleSettings(ipv6=True, host_probe_snat_ipv6="not-an-address"))
    with pytest.raises(RuleApplyError, match="rolled back"):
        await applier.apply(pair.pod_fd, PodRedirect())
    await assert_clean(pair)


async def test_entering_a_non_netns_fd_is_a_clear_error(tmp_path: object) -> None:
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        with pytest.raises(NetnsGoneError, match="cannot enter"):
            await NetnsRuleApplier(RuleSettings()).apply(fd, PodRedirect())
    finally:
        os.close(fd)


async def test_duplicate_jump_and_dns_switch_are_repaired_in_place(pair: Pair) -> None:
    dns_on = NetnsRuleApplier(RuleSettings(dns_capture=True))
    await dns_on.apply(pair.pod_fd, PodRedirect(dns_capture=True))
    run("iptables", "-t", "nat", "-A", "OUTPUT", "-j", "ISTIO_OUTPUT", netns=pair.pod)
    assert await dns_on.apply(pair.pod_fd, PodRedirect(dns_capture=True)) is ApplyOutcome.REPAIRED
    assert run("iptables-save", "-t", "nat", netns=pair.pod).stdout.count("-A OUTPUT -j ISTIO_OUTPUT") == 1
    assert await dns_on.apply(pair.pod_fd, PodRedirect(dns_capture=True)) is ApplyOutcome.UNCHANGED

    dns_off = NetnsRuleApplier(RuleSettings())
    assert await dns_off.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.REPAIRED
    assert "ISTIO" not in run("iptables-save", "-t", "raw", netns=pair.pod).stdout
    assert await dns_off.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.UNCHANGED
    await trio.to_thread.run_sync(check_redirection, pair)
    await dns_off.delete(pair.pod_fd)
    await assert_clean(pair)


async def test_switching_ipv6_off_removes_the_v6_rules_and_route(pair: Pair) -> None:
    await NetnsRuleApplier(RuleSettings(ipv6=True)).apply(pair.pod_fd, PodRedirect())
    v4_only = NetnsRuleApplier(RuleSettings())
    assert await v4_only.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.REPAIRED
    assert "ISTIO" not in run("ip6tables-save", netns=pair.pod).stdout
    assert "lookup 100" not in run("ip", "-6", "rule", netns=pair.pod).stdout
    assert await v4_only.apply(pair.pod_fd, PodRedirect()) is ApplyOutcome.UNCHANGED
    await v4_only.delete(pair.pod_fd)
    await assert_clean(pair)
