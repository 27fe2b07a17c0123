"""The redirection checks of services/node_agent/verify.py on listings as the kernel writes them."""

from __future__ import annotations

from services.node_agent.rules import PodRedirect
from services.node_agent.verify import (
    describe_drift,
    expected_listeners,
    listener_problems,
    parse_proc_net,
)

TCP6 = """\
  sl  local_address                         remote_address                        st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode
   0: 00000000000000000000000000000000:3A99 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 721496 1 0 100 0 0 10 0
   1: 00000000000000000000000000000000:3A9E 00000000000000000000000000000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0 721497 1 0 100 0 0 10 0
   2: 00000000000000000000000000000000:3A98 00000000000000000000000000000000:1F90 01 00000000:00000000 00:00000000 00000000     0        0 721498 1 0 100 0 0 10 0
"""  # noqa: E501


def test_listening_sockets_are_read_with_their_inodes() -> None:
    assert parse_proc_net(TCP6, "tcp") == {"15001/tcp": {721496}, "15006/tcp": {721497}}


def test_missing_and_foreign_listeners_are_named() -> None:
    bound = parse_proc_net(TCP6, "tcp")
    expected = expected_listeners(PodRedirect())
    assert listener_problems(expected, bound, {721496}) == [
        "15006/tcp: bound, but not by ztunnel",
        "15008/tcp: nothing listening",
    ]
    assert "15053/udp" in expected_listeners(PodRedirect(dns_capture=True))


def test_rule_drift_is_described_rule_by_rule() -> None:
    want = {("mangle", "ISTIO_PRERT"): ["-a", "-b"], ("nat", "OUTPUT"): ["-j ISTIO_OUTPUT"]}
    have = {("mangle", "ISTIO_PRERT"): ["-a", "-c"]}
    assert describe_drift("iptables", have, want) == [
        "iptables mangle ISTIO_PRERT: rule missing: -b",
        "iptables mangle ISTIO_PRERT: unexpected rule: -c",
        "iptables nat OUTPUT: chain missing",
    ]
    assert describe_drift("iptables", want, want) == []
    assert describe_drift("iptables", {("t", "c"): ["-b", "-a"]}, {("t", "c"): ["-a", "-b"]}) == [
        "iptables t c: rules out of order"
    ]
