"""The L4 authorization decision table (upstream ztunnel rbac.rs semantics)."""

from __future__ import annotations

import logging

import pytest

from services.ztunnel.authz import (
    AuthzRequest,
    Decision,
    applicable,
    authorize,
    authorize_from_state,
    evaluate,
)
from services.ztunnel.state.store import StateStore
from services.ztunnel.state.types import (
    Action,
    Authorization,
    Clause,
    Match,
    PolicyKey,
    Rule,
    Scope,
    ServiceAccountMatch,
    StringMatch,
    Workload,
    WorkloadUid,
)
from shared.identity import SpiffeId

SLEEP = SpiffeId(trust_domain="cluster.local", namespace="default", service_account="sleep")
OTHER_NS = SpiffeId(trust_domain="cluster.local", namespace="other", service_account="client")

REQ = AuthzRequest(src_ip="10.0.0.1", dst_ip="10.0.1.5", dst_port=8080, src_identity=SLEEP)
PLAIN = AuthzRequest(src_ip="10.0.0.1", dst_ip="10.0.1.5", dst_port=8080)
FROM_OTHER = AuthzRequest(src_ip="192.168.3.4", dst_ip="10.0.1.5", dst_port=9090, src_identity=OTHER_NS)

DEST = Workload(uid=WorkloadUid("Kubernetes//Pod/default/httpbin"), name="httpbin", namespace="default",
                addresses=("10.0.1.5",), authorization_policies=(PolicyKey("default/selected"),))


def exact(v: str) -> StringMatch:
    return StringMatch(kind="exact", value=v)


def policy(action: Action, *matches: Match, name: str = "p", dry_run: bool = False) -> Authorization:
    """One rule, one clause, the given matches ORed (an empty `matches` makes a policy that matches none)."""
    return Authorization(name=name, namespace="default", scope=Scope.NAMESPACE, action=action,
                         rules=(Rule(clauses=(Clause(matches=matches),)),), dry_run=dry_run)


ALLOW, DENY = Action.ALLOW, Action.DENY

# (case, policies, request, allowed)
TABLE: list[tuple[str, list[Authorization], AuthzRequest, bool]] = [
    ("no policies -> allow", [], REQ, True),
    ("allow matching namespace", [policy(ALLOW, Match(namespaces=(exact("default"),)))], REQ, True),
    ("allow policies exist, none match -> deny", [policy(ALLOW, Match(namespaces=(exact("prod"),)))], REQ,
     False),
    ("deny beats allow", [policy(ALLOW, Match(namespaces=(exact("default"),)), name="a"),
                          policy(DENY, Match(destination_ports=(8080,)), name="d")], REQ, False),
    ("non-matching deny, no allow -> allow", [policy(DENY, Match(destination_ports=(1,)))], REQ, True),
    ("principal exact (no scheme)",
     [policy(ALLOW, Match(principals=(exact("cluster.local/ns/default/sa/sleep"),)))], REQ, True),
    ("principal with the spiffe:// scheme does not match",
     [policy(ALLOW, Match(principals=(exact("spiffe://cluster.local/ns/default/sa/sleep"),)))], REQ, False),
    ("principal prefix",
     [policy(ALLOW, Match(principals=(StringMatch(kind="prefix", value="cluster.local/"),)))], REQ, True),
    ("principal suffix", [policy(ALLOW, Match(principals=(StringMatch(kind="suffix", value="/sa/sleep"),)))],
     REQ, True),
    ("principal presence needs an identity",
     [policy(ALLOW, Match(principals=(StringMatch(kind="presence"),)))], PLAIN, False),
    ("principal presence with mTLS", [policy(ALLOW, Match(principals=(StringMatch(kind="presence"),)))], REQ,
     True),
    ("not_principals excludes",
     [policy(ALLOW, Match(not_principals=(StringMatch(kind="suffix", value="sleep"),)))], REQ, False),
    ("not_principals holds for plaintext",
     [policy(ALLOW, Match(not_principals=(StringMatch(kind="suffix", value="sleep"),)))], PLAIN, True),
    ("values within a field are ORed",
     [policy(ALLOW, Match(namespaces=(exact("prod"), exact("default"))))], REQ, True),
    ("fields of a match are ANDed",
     [policy(ALLOW, Match(namespaces=(exact("default"),), destination_ports=(9999,)))], REQ, False),
    ("not_namespaces", [policy(DENY, Match(not_namespaces=(exact("default"),)))], FROM_OTHER, False),
    ("not_namespaces lets the namespace in", [policy(DENY, Match(not_namespaces=(exact("default"),)))], REQ,
     True),
    ("service account", [policy(ALLOW, Match(service_accounts=(
        ServiceAccountMatch(namespace="default", service_account="sleep"),)))], REQ, True),
    ("service account in another namespace", [policy(ALLOW, Match(service_accounts=(
        ServiceAccountMatch(namespace="other", service_account="sleep"),)))], REQ, False),
    ("not_service_accounts", [policy(DENY, Match(not_service_accounts=(
        ServiceAccountMatch(namespace="default", service_account="sleep"),)))], FROM_OTHER, False),
    ("source CIDR", [policy(ALLOW, Match(source_ips=("10.0.0.0/24",)))], REQ, True),
    ("source CIDR miss", [policy(ALLOW, Match(source_ips=("10.0.9.0/24",)))], REQ, False),
    ("source single IP without length", [policy(ALLOW, Match(source_ips=("10.0.0.1",)))], REQ, True),
    ("not_source_ips", [policy(DENY, Match(not_source_ips=("10.0.0.0/8",)))], FROM_OTHER, False),
    ("not_source_ips keeps the range", [policy(DENY, Match(not_source_ips=("10.0.0.0/8",)))], REQ, True),
    ("IPv6 CIDR never matches IPv4", [policy(ALLOW, Match(source_ips=("::/0",)))], REQ, False),
    ("destination IP", [policy(ALLOW, Match(destination_ips=("10.0.1.5/32",)))], REQ, True),
    ("not_destination_ips", [policy(ALLOW, Match(not_destination_ips=("10.0.1.0/24",)))], REQ, False),
    ("destination port", [policy(ALLOW, Match(destination_ports=(80, 8080)))], REQ, True),
    ("not_destination_ports", [policy(ALLOW, Match(not_destination_ports=(8080,)))], REQ, False),
    ("plaintext cannot match a namespace", [policy(ALLOW, Match(namespaces=(exact("default"),)))], PLAIN,
     False),
    ("plaintext and an IP-only allow", [policy(ALLOW, Match(source_ips=("10.0.0.1/32",)))], PLAIN, True),
    ("a clause without matches matches nothing", [policy(ALLOW)], REQ, False),
    ("a rule without clauses matches everything (allow-all)",
     [Authorization(name="all", namespace="default", scope=Scope.NAMESPACE, rules=(Rule(),))], REQ, True),
    ("a policy without rules: ALLOW denies all",
     [Authorization(name="none", namespace="default", scope=Scope.NAMESPACE)], REQ, False),
    ("a policy without rules: DENY denies nothing",
     [Authorization(name="none", namespace="default", scope=Scope.NAMESPACE, action=DENY)], REQ, True),
    ("rules are ORed", [Authorization(name="two", namespace="default", scope=Scope.NAMESPACE, rules=(
        Rule(clauses=(Clause(matches=(Match(destination_ports=(1,)),)),)),
        Rule(clauses=(Clause(matches=(Match(destination_ports=(8080,)),)),)),
    ))], REQ, True),
    ("clauses are ANDed", [Authorization(name="and", namespace="default", scope=Scope.NAMESPACE, rules=(
        Rule(clauses=(Clause(matches=(Match(destination_ports=(8080,)),)),
                      Clause(matches=(Match(namespaces=(exact("prod"),)),)))),
    ))], REQ, False),
    ("dry-run deny does not enforce", [policy(DENY, Match(destination_ports=(8080,)), dry_run=True)], REQ,
     True),
    ("dry-run allow does not make allow policies exist",
     [policy(ALLOW, Match(namespaces=(exact("prod"),)), dry_run=True)], REQ, True),
]


@pytest.mark.parametrize(("policies", "req", "allowed"), [case[1:] for case in TABLE],
                         ids=[case[0] for case in TABLE])
def test_decision_table(policies: list[Authorization], req: AuthzRequest, allowed: bool) -> None:
    assert evaluate(policies, req).allowed is allowed


def test_deny_reason_names_the_policy() -> None:
    decision = evaluate([policy(DENY, Match(destination_ports=(8080,)), name="no-8080")], REQ)
    assert decision == Decision(allowed=False, reason="explicitly denied by: default/no-8080",
                                policy="default/no-8080")
    assert evaluate([policy(ALLOW, Match(destination_ports=(1,)))], REQ).reason == \
        "allow policies exist, but none allowed"


def test_dry_run_is_reported_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ztunnel.authz"):
        shadow = policy(DENY, Match(destination_ports=(8080,)), name="shadow", dry_run=True)
        decision = evaluate([shadow], REQ)
    assert decision.allowed
    assert "default/shadow: would deny" in decision.dry_run
    assert any("dry-run" in r.getMessage() for r in caplog.records)


def test_scopes_select_policies_for_the_destination() -> None:
    def pol(name: str, namespace: str, scope: Scope) -> Authorization:
        return Authorization(name=name, namespace=namespace, scope=scope, action=DENY, rules=(Rule(),))

    policies = [
        pol("global", "istio-system", Scope.GLOBAL),
        pol("ns", "default", Scope.NAMESPACE),
        pol("other-ns", "other", Scope.NAMESPACE),
        pol("selected", "default", Scope.WORKLOAD_SELECTOR),
        pol("unselected", "default", Scope.WORKLOAD_SELECTOR),
    ]
    assert [p.key for p in applicable(policies, DEST)] == ["default/ns", "default/selected",
                                                           "istio-system/global"]
    # A deny-all in another namespace does not touch this workload; the selected one does.
    assert authorize([pol("other-ns", "other", Scope.NAMESPACE)], DEST, REQ).allowed
    assert not authorize([pol("selected", "default", Scope.WORKLOAD_SELECTOR)], DEST, REQ).allowed
    assert authorize([pol("unselected", "default", Scope.WORKLOAD_SELECTOR)], DEST, REQ).allowed


def test_authorize_from_state_uses_current_policies() -> None:
    store = StateStore()
    assert not authorize_from_state(store, REQ).allowed  # unknown destination: fail closed
    store.apply_addresses([DEST], [])
    assert authorize_from_state(store, REQ).allowed
    deny_sleep = policy(DENY, Match(principals=(exact("cluster.local/ns/default/sa/sleep"),)))
    store.apply_authorizations([deny_sleep], [])
    decision = authorize_from_state(store, REQ)
    assert not decision.allowed and decision.reason == "explicitly denied by: default/p"
    store.apply_authorizations([], ["default/p"])
    assert authorize_from_state(store, REQ).allowed
