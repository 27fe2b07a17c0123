"""The redirection checks of services/node_agent/verify.py on listings as the kernel writes them."""

from __future__ import annotations

from pathlib import Path

from services.node_agent.rules import PodRedirect
from services.node_agent.verify import (
    STEP_ADD,
    STEP_READD,
    STEP_RULES,
    Findings,
    VerifyMetrics,
    describe_drift,
    expected_listeners,
    listener_problems,
    next_repair,
    outcome_of,
    parse_proc_net,
    socket_inodes,
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


def test_repair_steps_follow_what_is_found_and_each_is_taken_once() -> None:
    rules = Findings(rules=("iptables nat OUTPUT: chain missing",))
    listeners = Findings(listeners=("15001/tcp: nothing listening",), listeners_checked=True)
    both = Findings(rules=rules.rules, listeners=listeners.listeners, listeners_checked=True)
    assert next_repair(Findings(), []) is None
    assert next_repair(rules, []) == STEP_RULES
    assert next_repair(rules, [STEP_RULES]) is None  # re-applied and still wrong: no loop
    assert next_repair(both, []) == STEP_RULES
    assert next_repair(both, [STEP_RULES]) == STEP_ADD
    assert next_repair(listeners, []) == STEP_ADD
    assert next_repair(listeners, [STEP_ADD]) == STEP_READD  # ztunnel kept a broken listener set
    assert next_repair(listeners, [STEP_ADD, STEP_READD]) is None


def test_result_says_whether_the_repair_held() -> None:
    drift = Findings(rules=("x",))
    assert outcome_of(Findings(), Findings(), pending=False) == "ok"
    assert outcome_of(drift, Findings(), pending=False) == "repaired"
    assert outcome_of(drift, drift, pending=False) == "broken"
    assert outcome_of(drift, Findings(), pending=True) == "broken"  # ztunnel did not take the pod again


def test_metrics_render_in_upstream_style() -> None:
    metrics = VerifyMetrics()
    metrics.count_verified("web", "mesh", "drift")
    metrics.count_verified("web", "mesh", "drift")
    metrics.count_repaired("web", "mesh", "rules", True)
    text = metrics.render().decode()
    assert 'istio_cni_redirection_verified_total{namespace="mesh",pod="web",result="drift"} 2.0' in text
    assert (
        'istio_cni_redirection_repaired_total{namespace="mesh",pod="web",result="success",type="rules"} 1.0'
        in text
    )
    assert "_created" not in text


def test_socket_inodes_reads_fd_links_and_keeps_only_the_wanted(tmp_path: Path) -> None:
    fds = tmp_path / "7" / "fd"
    fds.mkdir(parents=True)
    links = {"3": "socket:[100]", "4": "pipe:[5]", "5": "socket:[200]", "6": "socket:[300]"}
    for fd, target in links.items():
        (fds / fd).symlink_to(target)
    proc = str(tmp_path)
    assert socket_inodes([7, 8], proc) == {100, 200, 300}  # pid 8 is gone: skipped
    assert socket_inodes([7], proc, wanted={200, 999}) == {200}
    assert socket_inodes([7], proc, wanted={100, 200}) == {100, 200}
