"""The redirection checks in a real netns: real rules applied, one deleted by hand; a listener of this
process found as held, and named as not ztunnel's for other pids."""

from __future__ import annotations

import os
import socket
import uuid

import pytest
import trio

from services.node_agent.apply import Backend, NetnsRuleApplier
from services.node_agent.rules import PodRedirect, RuleSettings
from services.node_agent.verify import inspect
from shared.netns import entered, open_netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make network namespaces")


async def test_deleted_rule_and_listeners_are_reported() -> None:
    name = f"vfy-{uuid.uuid4().hex[:8]}"
    await trio.run_process(["ip", "netns", "add", name])
    fd = -1
    try:
        await trio.run_process(["ip", "-n", name, "link", "set", "lo", "up"])
        fd = open_netns(name)
        applier = NetnsRuleApplier(RuleSettings())
        redirect = PodRedirect()
        await applier.apply(fd, redirect)
        assert (await inspect(applier, fd, redirect, None)).problems == []
        done = await trio.run_process(["ip", "netns", "exec", name, "iptables-save", "-t", "mangle"],
                                      capture_stdout=True)
        saved = done.stdout.decode()
        rule = next(line for line in saved.splitlines() if line.startswith("-A ISTIO_PRERT"))
        delete = ["iptables", "-t", "mangle", "-D", *rule.split()[1:]]
        await trio.run_process(["ip", "netns", "exec", name, *delete])
        problems = list((await inspect(applier, fd, redirect, None)).rules)
        assert problems == [f"iptables-save mangle ISTIO_PRERT: rule missing: {rule.split(' ', 2)[2]}"]
        with entered(fd):
            sock = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
        with sock:
            sock.bind(("::", 15001))
            sock.listen()
            mine = (await inspect(applier, fd, redirect, [os.getpid()])).listeners
            tcp = [p for p in mine if "/tcp" in p]
            assert tcp == ["15006/tcp: nothing listening", "15008/tcp: nothing listening"]
            other = (await inspect(applier, fd, redirect, [1])).listeners
            assert "15001/tcp: bound, but not by ztunnel" in other
        # the repair: the applier's reconcile puts the deleted rule back; nothing is left to find
        assert (await applier.apply(fd, redirect)).value == "repaired"
        assert (await inspect(applier, fd, redirect, None)).problems == []
    finally:
        if fd >= 0:
            os.close(fd)
        await trio.run_process(["ip", "netns", "del", name], check=False)


async def test_nftables_backend_checks_routes_and_tables() -> None:
    name = f"vfy-{uuid.uuid4().hex[:8]}"
    await trio.run_process(["ip", "netns", "add", name])
    fd = -1
    try:
        await trio.run_process(["ip", "-n", name, "link", "set", "lo", "up"])
        fd = open_netns(name)
        applier = NetnsRuleApplier(RuleSettings(), Backend.NFTABLES)
        redirect = PodRedirect()
        await applier.apply(fd, redirect)
        assert (await inspect(applier, fd, redirect, None)).problems == []
        await trio.run_process(["ip", "netns", "exec", name, "nft", "delete", "table", "inet",
                                "istio-ambient-nat"])  # fmt: skip
        await trio.run_process(["ip", "-n", name, "rule", "del", "fwmark", "0x111/0xfff", "lookup", "100"])
        problems = (await inspect(applier, fd, redirect, None)).rules
        assert problems == ("ip rule fwmark 0x111 lookup 100 (v4) missing",
                            "nft table inet istio-ambient-nat: missing")  # fmt: skip
        await applier.apply(fd, redirect)
        assert (await inspect(applier, fd, redirect, None)).problems == []
    finally:
        if fd >= 0:
            os.close(fd)
        await trio.run_process(["ip", "netns", "del", name], check=False)
