"""Redirection verified, not assumed: what a pod's netns holds compared with what the agent installed.

Theory of operation
-------------------
Two checks per enrolled pod, both run in a worker thread switched into the pod's netns:

* rules: our part of `iptables-save` per family (rule texts, no counters) against `rules.expected_saved`,
  plus the fwmark policy rule and its local route; every difference is named (`describe_drift`);
* listeners: ztunnel's sockets (15001, 15006, 15008 over TCP; 15053 over TCP and UDP when the pod's DNS is
  captured) must be listed in the netns's /proc/thread-self/net/{tcp,tcp6,udp,udp6} with an inode that one
  of ztunnel's processes (the ZDS peers' pids, from SO_PEERCRED) holds as an fd.

This module is the first step: the checks themselves. Repair (rules re-applied, the pod re-sent to
ztunnel), metrics and the on-demand endpoint build on `inspect_here`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Mapping
from functools import partial

import trio
from pyroute2 import IPRoute

from services.node_agent.apply import NetnsRuleApplier, _route_present, in_netns
from services.node_agent.rules import PodRedirect, expected_saved, families

TCP_LISTEN = "0A"
UDP_UNCONNECTED = "07"
PROXY_PORTS = (15001, 15006, 15008)
DNS_PORT = 15053


def expected_listeners(redirect: PodRedirect) -> tuple[str, ...]:
    """The sockets ztunnel must hold in a pod with these redirection choices, as `PORT/PROTO`."""
    wanted = [f"{port}/tcp" for port in PROXY_PORTS]
    if redirect.dns_capture:
        wanted += [f"{DNS_PORT}/tcp", f"{DNS_PORT}/udp"]
    return tuple(wanted)


def parse_proc_net(text: str, proto: str) -> dict[str, set[int]]:
    """`PORT/PROTO` -> socket inodes of the listening (TCP) or unconnected (UDP) sockets in a
    /proc/net/{tcp,tcp6,udp,udp6} listing."""
    state = TCP_LISTEN if proto == "tcp" else UDP_UNCONNECTED
    found: dict[str, set[int]] = {}
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) < 10 or fields[3] != state:
            continue
        port = int(fields[1].rsplit(":", 1)[1], 16)
        found.setdefault(f"{port}/{proto}", set()).add(int(fields[9]))
    return found


def listeners_here() -> dict[str, set[int]]:
    """The listening sockets of the calling thread's netns (use inside `shared.netns.entered`)."""
    found: dict[str, set[int]] = {}
    for name, proto in (("tcp", "tcp"), ("tcp6", "tcp"), ("udp", "udp"), ("udp6", "udp")):
        try:
            with open(f"/proc/thread-self/net/{name}") as f:
                text = f.read()
        except OSError:
            continue
        for key, inodes in parse_proc_net(text, proto).items():
            found.setdefault(key, set()).update(inodes)
    return found


def socket_inodes(pids: Iterable[int], proc: str = "/proc") -> set[int]:
    """Inodes of every socket the processes `pids` hold as fds."""
    inodes: set[int] = set()
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"{proc}/{pid}/fd"):
                with contextlib.suppress(OSError):
                    target = os.readlink(f"{proc}/{pid}/fd/{fd}")
                    if target.startswith("socket:["):
                        inodes.add(int(target[8:-1]))
    return inodes


def listener_problems(
    expected: Iterable[str], bound: Mapping[str, set[int]], ztunnel_inodes: set[int]
) -> list[str]:
    """What is wrong with ztunnel's listeners: each expected socket nobody holds, or held by another
    process than ztunnel."""
    problems = []
    for key in expected:
        inodes = bound.get(key, set())
        if not inodes:
            problems.append(f"{key}: nothing listening")
        elif not inodes & ztunnel_inodes:
            problems.append(f"{key}: bound, but not by ztunnel")
    return problems


def describe_drift(
    binary: str, have: Mapping[tuple[str, str], list[str]], want: Mapping[tuple[str, str], list[str]]
) -> list[str]:
    """Every difference between our rules as the kernel lists them (`have`) and as rendered (`want`)."""
    problems = []
    for key in sorted(set(have) | set(want)):
        table, chain = key
        got, wanted = have.get(key), want.get(key)
        where = f"{binary} {table} {chain}"
        if got is None:
            problems.append(f"{where}: chain missing")
            continue
        if wanted is None:
            problems.append(f"{where}: unexpected chain or jump ({len(got)} rules)")
            continue
        missing = [r for r in wanted if r not in got]
        extra = [r for r in got if r not in wanted]
        problems += [f"{where}: rule missing: {r}" for r in missing]
        problems += [f"{where}: unexpected rule: {r}" for r in extra]
        if not missing and not extra and got != wanted:
            problems.append(f"{where}: rules out of order")
    return problems


def rule_problems_here(applier: NetnsRuleApplier, redirect: PodRedirect) -> list[str]:
    """Rule and policy-route drift in the calling thread's netns (iptables backend)."""
    problems: list[str] = []
    with IPRoute() as ipr:
        for route in applier.routes_here():
            rule_ok, route_ok = _route_present(ipr, route)
            if not rule_ok:
                v = route.family.value
                problems.append(f"ip rule fwmark {route.fwmark:#x} lookup {route.table} (v{v}) missing")
            if not route_ok:
                problems.append(f"local route in table {route.table} (v{route.family.value}) missing")
    for family, have in applier.saved_here().items():
        ours = family in families(applier.settings)
        want = expected_saved(redirect, applier.settings, family) if ours else {}
        problems += describe_drift(family.save_binary, have, want)
    return problems


def inspect_here(
    applier: NetnsRuleApplier, redirect: PodRedirect, ztunnel_pids: Iterable[int] | None
) -> list[str]:
    """Everything wrong with one pod's redirection (use inside `shared.netns.entered`); listeners are
    checked only when `ztunnel_pids` is given (the pod is enabled)."""
    problems = rule_problems_here(applier, redirect)
    if ztunnel_pids is not None:
        held = socket_inodes(ztunnel_pids)
        problems += listener_problems(expected_listeners(redirect), listeners_here(), held)
    return problems


async def inspect(
    applier: NetnsRuleApplier, netns_fd: int, redirect: PodRedirect, ztunnel_pids: Iterable[int] | None
) -> list[str]:
    """`inspect_here` in a worker thread switched into `netns_fd`.

    Raises:
        NetnsGoneError: the namespace cannot be entered.
    """
    pids = None if ztunnel_pids is None else tuple(ztunnel_pids)
    return await trio.to_thread.run_sync(in_netns, netns_fd, partial(inspect_here, applier, redirect, pids))
