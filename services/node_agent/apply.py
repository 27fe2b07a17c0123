"""Install and remove in-pod redirection inside a pod's network namespace.

Theory of operation
-------------------
Everything that touches a pod's netns runs in one worker thread (`trio.to_thread.run_sync`) that switches
into the namespace with `shared.netns.entered(fd)`: the iptables-restore / nft child processes inherit the
thread's namespace, and pyroute2's netlink socket is opened inside it. The Trio thread never switches.

`apply` is a reconcile: it reads the current state first (`iptables-save` per family, the fwmark rule and the
table-100 route) and compares it with what `rules.expected_saved` says should be there.
- all present and equal  -> nothing is run; outcome UNCHANGED;
- nothing of ours there  -> routes, then one `iptables-restore --noflush` per family; outcome INSTALLED;
- anything else (drift, leftovers of a crashed agent, a half-applied set) -> one restore per family that
  flushes our chains, removes every jump found and appends our rules (`rules.render_repair`): iptables-nft
  applies it as one transaction, so the pod is never without redirection meanwhile; outcome REPAIRED.
If any step of an install fails, everything is deleted again before the error is raised: a pod is either
fully redirected or not redirected at all, never half.

The nftables backend renders a script that adds and flushes its own tables before filling them, so `nft -f`
replaces our rules atomically in one transaction; apply compares the tables' listing before and after
to report UNCHANGED.

`delete` is idempotent: every command that finds nothing to remove is ignored.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, NoReturn, Protocol, TypeVar

import msgspec
import trio
from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from services.node_agent.errors import NetnsGoneError, RuleApplyError
from services.node_agent.rules import (
    NFT_TABLES,
    Family,
    PodRedirect,
    PolicyRoute,
    RuleSettings,
    delete_commands,
    expected_saved,
    families,
    parse_saved,
    policy_routes,
    render_nft,
    render_nft_delete,
    render_repair,
    render_restore,
)
from shared.netns import NetnsError, entered

log = logging.getLogger("node_agent.apply")
T = TypeVar("T")

RTN_LOCAL = 2
COMMAND_TIMEOUT = 30.0


class Backend(enum.Enum):
    IPTABLES = "iptables"
    NFTABLES = "nftables"


class ApplyOutcome(enum.Enum):
    INSTALLED = "installed"
    UNCHANGED = "unchanged"
    REPAIRED = "repaired"


class RuleApplier(Protocol):
    """Installs and removes a pod's redirection inside its netns. Both calls are idempotent."""

    async def apply(self, netns_fd: int, redirect: PodRedirect) -> ApplyOutcome:
        """Make the pod's netns hold exactly our rules and routes.

        Raises:
            RuleApplyError: a step failed; whatever had been installed was removed again.
            NetnsGoneError: the namespace handle cannot be entered.
        """
        ...

    async def delete(self, netns_fd: int) -> None:
        """Remove our rules and routes; absent ones are fine.

        Raises:
            NetnsGoneError: the namespace handle cannot be entered.
        """
        ...


class CommandResult(msgspec.Struct, frozen=True, kw_only=True):
    argv: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str


def find_binary(name: str) -> str | None:
    """`name` on PATH, else under /usr/sbin or /sbin (root's PATH is not always set under a supervisor)."""
    found = shutil.which(name)
    if found:
        return found
    for folder in ("/usr/sbin", "/sbin"):
        path = os.path.join(folder, name)
        if os.access(path, os.X_OK):
            return path
    return None


def _run(argv: Sequence[str], *, stdin: str | None = None) -> CommandResult:
    binary = find_binary(argv[0])
    if binary is None:
        raise RuleApplyError(f"{argv[0]} not found; install it (apt-get install iptables nftables)")
    proc = subprocess.run(
        [binary, *argv[1:]],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=COMMAND_TIMEOUT,
        check=False,
    )
    return CommandResult(argv=tuple(argv), returncode=proc.returncode, stdout=proc.stdout, stderr=proc.stderr)


def _must(result: CommandResult) -> CommandResult:
    if result.returncode != 0:
        detail = (result.stderr or result.stdout).strip().splitlines()
        why = " / ".join(detail[-3:]) or "no output"
        raise RuleApplyError(f"`{' '.join(result.argv)}` failed (exit {result.returncode}): {why}")
    return result


def lo_ipv6_enabled() -> bool:
    """Whether the calling thread's netns has IPv6 on lo (upstream checks the same sysctl)."""
    try:
        with open("/proc/sys/net/ipv6/conf/lo/disable_ipv6") as f:
            return f.read().strip() != "1"
    except OSError:
        return False


# --- policy routing (pyroute2, called inside the netns) ---------------------------------------------------


def _af(family: Family) -> int:
    return socket.AF_INET if family is Family.V4 else socket.AF_INET6


def _route_present(ipr: Any, route: PolicyRoute) -> tuple[bool, bool]:
    af = _af(route.family)
    rule_ok = any(
        r.get("fwmark") == route.fwmark
        and r.get("fwmask") == route.fwmask
        and r.get("priority") == route.priority
        and r.get("table") == route.table
        for r in ipr.get_rules(family=af)
    )
    lo = ipr.link_lookup(ifname="lo")
    route_ok = any(
        r["type"] == RTN_LOCAL and r["dst_len"] == 0 and r.get("oif") in lo
        for r in ipr.get_routes(table=route.table, family=af)
    )
    return rule_ok, route_ok


def _rule(ipr: Any, command: str, route: PolicyRoute) -> None:
    """`ip rule <command> fwmark M/MASK pref P lookup T` for the route's family."""
    ipr.rule(
        command,
        fwmark=route.fwmark,
        fwmask=route.fwmask,
        priority=route.priority,
        table=route.table,
        family=_af(route.family),
    )


def _add_route(ipr: Any, route: PolicyRoute) -> None:
    af = _af(route.family)
    try:
        _rule(ipr, "add", route)
    except NetlinkError as exc:
        if exc.code != 17:  # EEXIST: already there, as upstream ignores it
            raise
    lo = ipr.link_lookup(ifname="lo")[0]
    ipr.route("replace", dst=route.dst, table=route.table, type="local", oif=lo, scope="host", family=af)


def _del_route(ipr: Any, route: PolicyRoute) -> None:
    af = _af(route.family)
    # remove every copy: an older agent (or an operator) may have added the rule twice
    for _ in range(16):
        try:
            _rule(ipr, "del", route)
        except NetlinkError:
            break
    lo = ipr.link_lookup(ifname="lo")
    oif = lo[0] if lo else 1
    for scope in ("host", "universe"):  # v4 local routes need the scope they were added with; v6 ignore it
        with contextlib.suppress(NetlinkError):  # already gone
            ipr.route("del", dst=route.dst, table=route.table, type="local", oif=oif, scope=scope, family=af)


# --- the synchronous work, run inside the netns ----------------------------------------------------------


def in_netns(fd: int, work: Callable[[], T]) -> T:
    """Run `work` with the calling (worker) thread switched into the namespace `fd`.

    Raises:
        NetnsGoneError: `fd` is not a namespace that can be entered.
    """
    try:
        with entered(fd):
            return work()
    except NetnsError as exc:
        raise NetnsGoneError(f"cannot enter the pod's network namespace: {exc}") from None


class NetnsRuleApplier:
    """The real `RuleApplier`: iptables-restore or nft, plus pyroute2, in a worker thread inside the netns."""

    def __init__(self, settings: RuleSettings, backend: Backend = Backend.IPTABLES) -> None:
        self.settings = settings
        self.backend = backend

    async def apply(self, netns_fd: int, redirect: PodRedirect) -> ApplyOutcome:
        return await trio.to_thread.run_sync(in_netns, netns_fd, partial(self.apply_here, redirect))

    async def delete(self, netns_fd: int) -> None:
        await trio.to_thread.run_sync(in_netns, netns_fd, self.delete_here)

    # The *_here methods assume the calling thread is already inside the pod netns.

    def routes_here(self) -> list[PolicyRoute]:
        return policy_routes(self.settings, lo_ipv6_enabled=lo_ipv6_enabled())

    def routes_state_here(self) -> tuple[bool, bool]:
        """(all policy routes as expected, any of them present)."""
        in_sync, present = True, False
        with IPRoute() as ipr:
            for route in self.routes_here():
                rule_ok, route_ok = _route_present(ipr, route)
                in_sync &= rule_ok and route_ok
                present |= rule_ok or route_ok
        return in_sync, present

    def saved_here(self) -> dict[Family, dict[tuple[str, str], list[str]]]:
        """Our part of iptables-save / ip6tables-save per family (empty when the binary is absent)."""
        out: dict[Family, dict[tuple[str, str], list[str]]] = {}
        for family in (Family.V4, Family.V6):
            if find_binary(family.save_binary) is None:
                out[family] = {}
            else:
                out[family] = parse_saved(_must(_run([family.save_binary])).stdout)
        return out

    def in_sync_here(self, redirect: PodRedirect) -> tuple[bool, bool]:
        """(everything as expected, anything of ours present)."""
        in_sync, present = self.routes_state_here()
        if self.backend is Backend.IPTABLES:
            for family, have in self.saved_here().items():
                in_sync &= have == self._wanted(redirect, family)
                present |= bool(have)
        else:
            present |= bool(self.nft_tables_here())
        return in_sync, present

    def _wanted(self, redirect: PodRedirect, family: Family) -> dict[tuple[str, str], list[str]]:
        return expected_saved(redirect, self.settings, family) if family in families(self.settings) else {}

    def apply_here(self, redirect: PodRedirect) -> ApplyOutcome:
        if self.backend is Backend.NFTABLES:
            return self._apply_nft_here(redirect)
        routes_ok, routes_present = self.routes_state_here()
        haves = self.saved_here()
        wants = {family: self._wanted(redirect, family) for family in haves}
        if routes_ok and haves == wants:
            return ApplyOutcome.UNCHANGED
        present = routes_present or any(haves.values())
        try:
            self._add_routes_here()
            for family, have in haves.items():
                if have == wants[family]:
                    continue
                install = family in families(self.settings)
                if have:
                    log.warning(
                        "rules in the pod netns differ from ours; repairing them in place",
                        extra={"fields": [("binary", family.binary)]},
                    )
                    text = render_repair(redirect, self.settings, family, have, install=install)
                else:
                    text = render_restore(redirect, self.settings, family)
                _must(_run([family.restore_binary, "--noflush", "-v"], stdin=text))
        except (RuleApplyError, NetlinkError, OSError, subprocess.SubprocessError) as exc:
            self._roll_back(exc)
        return ApplyOutcome.REPAIRED if present else ApplyOutcome.INSTALLED

    def _apply_nft_here(self, redirect: PodRedirect) -> ApplyOutcome:
        # the script adds and flushes its own tables first: one transaction replaces whatever was there
        routes_ok, routes_present = self.routes_state_here()
        present = routes_present or bool(self.nft_tables_here())
        before = self._nft_listing_here()
        try:
            self._add_routes_here()
            _must(_run(["nft", "-f", "-"], stdin=render_nft(redirect, self.settings)))
        except (RuleApplyError, NetlinkError, OSError, subprocess.SubprocessError) as exc:
            self._roll_back(exc)
        if routes_ok and self._nft_listing_here() == before:
            return ApplyOutcome.UNCHANGED
        return ApplyOutcome.REPAIRED if present else ApplyOutcome.INSTALLED

    def _add_routes_here(self) -> None:
        wanted = self.routes_here()
        with IPRoute() as ipr:
            for route in wanted:
                _add_route(ipr, route)
            for family in {Family.V4, Family.V6} - {r.family for r in wanted}:
                _del_route(ipr, PolicyRoute(family=family))  # e.g. IPv6 switched off since the last apply

    def _roll_back(self, exc: Exception) -> NoReturn:
        self.delete_here()
        if isinstance(exc, RuleApplyError):
            raise RuleApplyError(f"{exc}; rolled back, no rules left in the pod") from None
        raise RuleApplyError(f"installing redirection failed: {exc}; rolled back, no rules left") from None

    def delete_here(self) -> None:
        # iptables: both families and both backends' leftovers, whatever the current settings say
        for family in (Family.V4, Family.V6):
            if find_binary(family.binary) is None:
                continue
            for argv in delete_commands(family):
                _run(argv)
        if find_binary("nft") is not None:
            present = self.nft_tables_here()
            if present:
                _run(["nft", "-f", "-"], stdin=render_nft_delete(present=present))
        with IPRoute() as ipr:
            for family in (Family.V4, Family.V6):
                _del_route(ipr, PolicyRoute(family=family))

    def nft_tables_here(self) -> frozenset[str]:
        if find_binary("nft") is None:
            return frozenset()
        out = _run(["nft", "list", "tables", "inet"]).stdout
        names = {line.split()[-1] for line in out.splitlines() if line.startswith("table inet ")}
        return frozenset(names & set(NFT_TABLES))

    def _nft_listing_here(self) -> str:
        parts = []
        for name in sorted(self.nft_tables_here()):
            parts.append(_run(["nft", "-s", "list", "table", "inet", name]).stdout)
        return "".join(parts)


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """What a netns holds of ours (for tests and debugging): iptables-save per family, rules, routes."""

    saved: dict[str, dict[str, list[str]]]
    ip_rules: list[str]
    table_100: list[str]


def inspect_here() -> Snapshot:
    """Our state in the calling thread's netns (use inside `entered`)."""
    saved: dict[str, dict[str, list[str]]] = {}
    for family in (Family.V4, Family.V6):
        parsed = parse_saved(_run([family.save_binary]).stdout)
        saved[family.name] = {f"{t} {c}": v for (t, c), v in parsed.items()}
    ip_rules: list[str] = []
    table_100: list[str] = []
    with IPRoute() as ipr:
        for af in (socket.AF_INET, socket.AF_INET6):
            for r in ipr.get_rules(family=af):
                if r.get("table") == 100:
                    ip_rules.append(
                        f"{af} fwmark {r.get('fwmark')} mask {r.get('fwmask')} pref {r.get('priority')}"
                    )
            for rt in ipr.get_routes(table=100, family=af):
                if rt.get("table") == 100:
                    table_100.append(f"{af} type {rt['type']} dst_len {rt['dst_len']}")
    return Snapshot(saved=saved, ip_rules=ip_rules, table_100=table_100)
