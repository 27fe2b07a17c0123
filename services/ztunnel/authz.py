"""L4 authorization: upstream ztunnel's `rbac.rs` semantics as a pure decision over the xDS policy types.

Theory of operation
-------------------
Which policies apply to a destination workload (`applicable`):
GLOBAL-scoped policies apply to every workload, NAMESPACE-scoped ones to workloads of their namespace, and
WORKLOAD_SELECTOR ones to the workloads that list them (`Workload.authorization_policies`, `ns/name` keys).

How a connection is decided (`evaluate`), in this order:
1. any enforced DENY policy that matches -> deny ("explicitly denied by: ns/name");
2. no enforced ALLOW policy -> allow;
3. any enforced ALLOW policy that matches -> allow;
4. otherwise deny ("allow policies exist, but none allowed").
Dry-run policies are evaluated the same way and what they *would* have done is logged and reported in
`Decision.dry_run`, but they never change the outcome.

A policy matches when ANY of its rules matches; a rule when ALL of its clauses match (a rule without clauses
matches everything); a clause when ANY of its matches matches; a match when every field it sets holds, the
values within a field being ORed and a `not_` field holding when none of its values match. Source identity
fields (`principals`, `namespaces`, `service_accounts`) can only match an mTLS connection; their `not_` forms
hold for a plaintext one (Envoy RBAC's meaning of "not").

Principals are compared without the scheme, like Istio's AuthorizationPolicy: `cluster.local/ns/NS/sa/SA`.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol, TypeVar

import msgspec

from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Match,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    Workload,
)
from shared.addr import format_host_port, ip_address
from shared.identity import SpiffeId
from shared.logs import Field

log = logging.getLogger("ztunnel.authz")

IpNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class AuthzRequest(msgspec.Struct, frozen=True, kw_only=True):
    """The connection being authorized, as seen by the destination's ztunnel."""

    src_ip: str
    dst_ip: str
    dst_port: int
    src_identity: SpiffeId | None = None
    """The peer's verified SPIFFE id (HBONE); None for plaintext inbound."""


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    allowed: bool
    reason: str = ""
    """Why a connection was denied, in upstream's words (empty when allowed)."""
    policy: str | None = None
    """The deciding policy (`ns/name`): the matching DENY or ALLOW policy, if any."""
    dry_run: tuple[str, ...] = ()
    """What dry-run policies would have done: `ns/name: would deny` / `ns/name: would allow`."""


ALLOW_ALL = Decision(allowed=True)


def applicable(policies: Iterable[Authorization], workload: Workload) -> list[Authorization]:
    """The policies that apply to `workload` (the destination), sorted by key for stable decisions."""
    keys = set(workload.authorization_policies)
    out = [
        pol for pol in policies
        if pol.scope is Scope.GLOBAL
        or (pol.scope is Scope.NAMESPACE and pol.namespace == workload.namespace)
        or (pol.scope is Scope.WORKLOAD_SELECTOR and pol.key in keys)
    ]
    return sorted(out, key=lambda p: p.key)


@functools.lru_cache(maxsize=4096)
def _network(text: str) -> IpNetwork:
    return ipaddress.ip_network(text, strict=False)


_ip = functools.lru_cache(maxsize=4096)(ip_address)  # per connection; addresses repeat


def _in_any(ip: str, cidrs: Sequence[str]) -> bool:
    addr = _ip(ip)
    for cidr in cidrs:
        try:
            net = _network(cidr)
        except ValueError:
            log.warning("ignoring an unparsable address in an authorization policy",
                        extra={"fields": [("address", cidr)]})
            continue
        if addr.version == net.version and addr in net:
            return True
    return False


def _principal(identity: SpiffeId) -> str:
    return f"{identity.trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"


def _strings(matchers: Sequence[StringMatch], value: str | None) -> bool:
    return value is not None and any(m.matches(value) for m in matchers)


def _accounts(matchers: Sequence[ServiceAccountMatch], identity: SpiffeId | None) -> bool:
    return identity is not None and any(
        m.namespace == identity.namespace and m.service_account == identity.service_account for m in matchers)


def match_holds(m: Match, req: AuthzRequest) -> bool:
    """Every field `m` sets holds for `req` (values within a field ORed, `not_` fields negated)."""
    ident = req.src_identity
    principal = _principal(ident) if ident is not None else None
    namespace = ident.namespace if ident is not None else None
    if m.namespaces and not _strings(m.namespaces, namespace):
        return False
    if m.not_namespaces and _strings(m.not_namespaces, namespace):
        return False
    if m.principals and not _strings(m.principals, principal):
        return False
    if m.not_principals and _strings(m.not_principals, principal):
        return False
    if m.service_accounts and not _accounts(m.service_accounts, ident):
        return False
    if m.not_service_accounts and _accounts(m.not_service_accounts, ident):
        return False
    if m.source_ips and not _in_any(req.src_ip, m.source_ips):
        return False
    if m.not_source_ips and _in_any(req.src_ip, m.not_source_ips):
        return False
    if m.destination_ips and not _in_any(req.dst_ip, m.destination_ips):
        return False
    if m.not_destination_ips and _in_any(req.dst_ip, m.not_destination_ips):
        return False
    if m.destination_ports and req.dst_port not in m.destination_ports:
        return False
    return not (m.not_destination_ports and req.dst_port in m.not_destination_ports)


def policy_matches(policy: Authorization, req: AuthzRequest) -> bool:
    """ANY rule; within a rule ALL clauses; within a clause ANY match."""
    return any(
        all(any(match_holds(m, req) for m in clause.matches) for clause in rule.clauses)
        for rule in policy.rules
    )


class PolicyLike(Protocol):
    """What the decision needs of a policy: L4 `Authorization`s here, the waypoint's L7 policies too."""

    @property
    def action(self) -> Action: ...

    @property
    def key(self) -> str: ...

    @property
    def dry_run(self) -> bool: ...


P = TypeVar("P", bound=PolicyLike)


def _decide(policies: Sequence[P], matches: Callable[[P], bool]) -> Decision:
    for pol in policies:
        if pol.action is Action.DENY and matches(pol):
            return Decision(allowed=False, reason=f"explicitly denied by: {pol.key}", policy=pol.key)
    allows = [pol for pol in policies if pol.action is Action.ALLOW]
    if not allows:
        return ALLOW_ALL
    for pol in allows:
        if matches(pol):
            return Decision(allowed=True, policy=pol.key)
    return Decision(allowed=False, reason="allow policies exist, but none allowed")


def decide_policies(policies: Iterable[P], matches: Callable[[P], bool],
                    log_fields: Callable[[], list[Field]]) -> Decision:
    """The decision over `policies` (DENY first, then ALLOW if any; see the module doc), `matches` saying
    whether one policy matches the request. Dry-run policies are evaluated on their own and reported in
    `dry_run` (and logged, with `log_fields()` naming the request), never enforced."""
    enforced: list[P] = []
    dry: list[P] = []
    for pol in policies:
        (dry if pol.dry_run else enforced).append(pol)
    decision = _decide(enforced, matches)
    if not dry:
        return decision
    notes = []
    for pol in dry:
        if matches(pol):
            verb = "deny" if pol.action is Action.DENY else "allow"
            notes.append(f"{pol.key}: would {verb}")
    # Also what the dry-run set would decide together with the enforced ones (an unmatched dry-run ALLOW
    # would deny); `_decide` does not look at `dry_run`.
    shadow = _decide(enforced + dry, matches)
    if shadow.allowed != decision.allowed:
        notes.append(f"dry-run policies would {'allow' if shadow.allowed else 'deny'}"
                     + (f" ({shadow.reason})" if shadow.reason else ""))
    if notes:
        log.info("dry-run authorization result", extra={"fields": [
            *log_fields(), ("enforced", "allow" if decision.allowed else "deny"),
            ("dry_run", "; ".join(notes))]})
    return msgspec.structs.replace(decision, dry_run=tuple(notes))


def evaluate(policies: Iterable[Authorization], req: AuthzRequest) -> Decision:
    """Decide `req` against the policies that apply to its destination (see `applicable`)."""
    def fields() -> list[Field]:
        return [("src.addr", req.src_ip), ("dst.addr", format_host_port(req.dst_ip, req.dst_port)),
                ("src.identity", str(req.src_identity) if req.src_identity else None)]

    return decide_policies(policies, lambda pol: policy_matches(pol, req), fields)


def authorize(policies: Iterable[Authorization], workload: Workload, req: AuthzRequest) -> Decision:
    """`evaluate` over the policies that apply to the destination `workload`."""
    return evaluate(applicable(policies, workload), req)


def authorize_from_state(store: StateStore, req: AuthzRequest, *, network: str = "") -> Decision:
    """Decide with the xDS state as it is now (policy changes apply to the next connection at once).

    The destination workload is looked up by `req.dst_ip`; an unknown one is denied (fail closed), with a
    reason that says so.
    """
    workload = store.workload_by_ip(req.dst_ip, network)
    if workload is None:
        return Decision(allowed=False,
                        reason=f"destination {req.dst_ip} is not a known workload (is xDS synced?)")
    return authorize(store.policies.values(), workload, req)
