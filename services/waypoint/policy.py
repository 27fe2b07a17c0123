"""L7 authorization: Istio's AuthorizationPolicy semantics for one HTTP request at the waypoint (pure).

Theory of operation
-------------------
Which policies apply (`applicable`): those that target the waypoint itself (no service named) and those that
target the request's destination service.

How a request is decided (`decide`, with the decision code L4 authorization uses), as Istio's waypoint does:
1. any enforced DENY policy that matches -> deny ("explicitly denied by: ns/name");
2. no enforced ALLOW policy -> allow;
3. any enforced ALLOW policy that matches -> allow;
4. otherwise deny ("allow policies exist, but none allowed").
Dry-run policies are evaluated the same way; what they would have done is logged and reported in
`Decision.dry_run`, never enforced. AUDIT policies are only logged when they match. A denied request
is answered `403` with body `RBAC: access denied`.

A policy matches when any of its rules matches (none: it matches nothing); a rule when any of its sources
(or none are given), any of its operations (or none) and all of its conditions hold; a source or operation
when every field it sets holds, the values within a field ORed and a `not_` field holding when none of its
values match. Source fields can only match a verified identity; their `not_` forms hold without one.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence

import msgspec

from services.waypoint.config import HeaderCondition, L7Policy, L7Rule, Operation, Source
from services.ztunnel.authz import Decision, decide_policies
from services.ztunnel.state.types import StringMatch
from shared.identity import SpiffeId
from shared.logs import Field

log = logging.getLogger("waypoint.authz")

DENIED_BODY = b"RBAC: access denied"


class L7Request(msgspec.Struct, frozen=True, kw_only=True):
    """What the policies see of one request."""

    method: str
    path: str
    """Without the query."""
    host: str
    port: int
    headers: Mapping[str, str]
    """Lower-case names."""
    src_identity: SpiffeId | None
    service: str | None = None
    """The destination service's hostname, when the request is for a service."""


def applicable(policies: Iterable[L7Policy], service: str | None) -> list[L7Policy]:
    """The policies for a request to `service`: the waypoint's own, and the service's (sorted by key)."""
    out = [p for p in policies
           if not p.target_services or (service is not None and service in p.target_services)]
    return sorted(out, key=lambda p: p.key)


def _any(matchers: Sequence[StringMatch], value: str | None) -> bool:
    return value is not None and any(m.matches(value) for m in matchers)


def _field(positive: Sequence[StringMatch], negative: Sequence[StringMatch], value: str | None) -> bool:
    if positive and not _any(positive, value):
        return False
    return not (negative and _any(negative, value))


def source_holds(source: Source, identity: SpiffeId | None) -> bool:
    principal = (f"{identity.trust_domain}/ns/{identity.namespace}/sa/{identity.service_account}"
                 if identity is not None else None)
    namespace = identity.namespace if identity is not None else None
    return (_field(source.principals, source.not_principals, principal)
            and _field(source.namespaces, source.not_namespaces, namespace))


def _host(authority: str) -> str:
    host = authority.lower()
    if host.startswith("["):
        return host.partition("]")[0] + "]"
    return host.rpartition(":")[0] if host.count(":") == 1 else host


def operation_holds(op: Operation, req: L7Request) -> bool:
    if not _field(op.methods, op.not_methods, req.method):
        return False
    if not _field(op.paths, op.not_paths, req.path):
        return False
    if op.hosts or op.not_hosts:
        host = req.host.lower()
        names = (host, _host(host))  # with or without its port
        if op.hosts and not any(_any(op.hosts, name) for name in names):
            return False
        if op.not_hosts and any(_any(op.not_hosts, name) for name in names):
            return False
    if op.ports and req.port not in op.ports:
        return False
    return not (op.not_ports and req.port in op.not_ports)


def condition_holds(cond: HeaderCondition, headers: Mapping[str, str]) -> bool:
    return _field(cond.values, cond.not_values, headers.get(cond.name))


def rule_matches(rule: L7Rule, req: L7Request) -> bool:
    if rule.sources and not any(source_holds(s, req.src_identity) for s in rule.sources):
        return False
    if rule.operations and not any(operation_holds(o, req) for o in rule.operations):
        return False
    return all(condition_holds(c, req.headers) for c in rule.when)


def policy_matches(policy: L7Policy, req: L7Request) -> bool:
    return any(rule_matches(rule, req) for rule in policy.rules)


def decide(policies: Iterable[L7Policy], req: L7Request) -> Decision:
    """Decide `req` against every policy given (pass `applicable(...)`); dry-run ones are only reported,
    AUDIT ones only logged when they match."""
    def fields() -> list[Field]:
        return [("method", req.method), ("path", req.path), ("authority", req.host),
                ("src.identity", req.src_identity.uri if req.src_identity else None)]

    deciding: list[L7Policy] = []
    for pol in policies:
        if not pol.audit:
            deciding.append(pol)
        elif policy_matches(pol, req):
            log.info("audit policy matched", extra={"fields": [*fields(), ("policy", pol.key)]})
    return decide_policies(deciding, lambda pol: policy_matches(pol, req), fields)
