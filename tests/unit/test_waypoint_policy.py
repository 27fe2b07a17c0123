"""The waypoint's L7 authorization: every match kind, and Istio's ALLOW / DENY / dry-run semantics."""

from __future__ import annotations

import logging

import pytest

from services.waypoint.config import (
    HeaderCondition,
    L7Policy,
    L7Rule,
    Operation,
    Source,
    istio_match,
    istio_matches,
)
from services.waypoint.policy import L7Request, applicable, decide, policy_matches
from services.ztunnel.state.types import Action, StringMatch
from shared.identity import SpiffeId

PRODUCTPAGE = SpiffeId(trust_domain="cluster.local", namespace="default",
                       service_account="bookinfo-productpage")
SLEEP = SpiffeId(trust_domain="cluster.local", namespace="other", service_account="sleep")
DETAILS = "details.default.svc.cluster.local"


def req(method: str = "GET", path: str = "/details/0", *, host: str = "details:9080", port: int = 9080,
        headers: dict[str, str] | None = None, identity: SpiffeId | None = PRODUCTPAGE,
        service: str | None = DETAILS) -> L7Request:
    return L7Request(method=method, path=path, host=host, port=port, headers=headers or {},
                     src_identity=identity, service=service)


def policy(*rules: L7Rule, action: Action = Action.ALLOW, name: str = "p", dry_run: bool = False,
           services: tuple[str, ...] = ()) -> L7Policy:
    return L7Policy(name=name, namespace="default", action=action, rules=rules, dry_run=dry_run,
                    target_services=services)


def op(**kwargs: object) -> L7Rule:
    fields = {k: (istio_matches(v) if k not in ("ports", "not_ports") else v)  # type: ignore[arg-type]
              for k, v in kwargs.items()}
    return L7Rule(operations=(Operation(**fields),))  # type: ignore[arg-type]


def src(**kwargs: list[str]) -> L7Rule:
    return L7Rule(sources=(Source(**{k: istio_matches(v) for k, v in kwargs.items()}),))


@pytest.mark.parametrize(("text", "kind", "value"), [
    ("*", "presence", ""), ("/details/*", "prefix", "/details/"), ("*/ratings", "suffix", "/ratings"),
    ("/exact", "exact", "/exact"),
])
def test_istio_string_syntax(text: str, kind: str, value: str) -> None:
    assert istio_match(text) == StringMatch(kind=kind, value=value)


@pytest.mark.parametrize(("paths", "path", "matched"), [
    (["/details/0"], "/details/0", True),
    (["/details/0"], "/details/01", False),
    (["/details/*"], "/details/7", True),
    (["/details/*"], "/reviews/7", False),
    (["*/health"], "/api/health", True),
    (["*/health"], "/api/healthz", False),
    (["*"], "/anything", True),
    (["/a", "/details/*"], "/details/1", True),  # values ORed
])
def test_paths(paths: list[str], path: str, matched: bool) -> None:
    assert policy_matches(policy(op(paths=paths)), req(path=path)) is matched


def test_not_paths_hold_when_no_value_matches() -> None:
    rule = op(not_paths=["/admin/*"])
    assert policy_matches(policy(rule), req(path="/details/1"))
    assert not policy_matches(policy(rule), req(path="/admin/x"))


def test_methods_and_not_methods() -> None:
    assert policy_matches(policy(op(methods=["GET", "HEAD"])), req("HEAD"))
    assert not policy_matches(policy(op(methods=["GET"])), req("POST"))
    assert not policy_matches(policy(op(not_methods=["POST"])), req("POST"))
    assert policy_matches(policy(op(not_methods=["POST"])), req("GET"))


def test_fields_of_one_operation_are_anded() -> None:
    rule = op(methods=["GET"], paths=["/details/*"])
    assert policy_matches(policy(rule), req("GET", "/details/1"))
    assert not policy_matches(policy(rule), req("POST", "/details/1"))
    assert not policy_matches(policy(rule), req("GET", "/other"))


def test_hosts_case_insensitive_with_or_without_port_and_ports() -> None:
    assert policy_matches(policy(op(hosts=["details"])), req(host="Details:9080"))
    assert policy_matches(policy(op(hosts=["details:9080"])), req(host="details:9080"))
    assert policy_matches(policy(op(hosts=["*.svc.cluster.local"])), req(host=DETAILS))
    assert not policy_matches(policy(op(not_hosts=["details"])), req(host="details:9080"))
    assert policy_matches(policy(op(ports=[9080])), req(port=9080))
    assert not policy_matches(policy(op(ports=[80])), req(port=9080))
    assert not policy_matches(policy(op(not_ports=[9080])), req(port=9080))


def test_header_conditions() -> None:
    def when(**kwargs: list[str]) -> L7Rule:
        fields = {k: istio_matches(v) for k, v in kwargs.items()}
        return L7Rule(when=(HeaderCondition(name="x-user", **fields),))

    assert policy_matches(policy(when(values=["alice"])), req(headers={"x-user": "alice"}))
    assert not policy_matches(policy(when(values=["alice"])), req(headers={"x-user": "bob"}))
    assert not policy_matches(policy(when(values=["alice"])), req(headers={}))  # absent
    assert policy_matches(policy(when(values=["*"])), req(headers={"x-user": "x"}))  # presence
    assert policy_matches(policy(when(not_values=["bob"])), req(headers={}))
    assert not policy_matches(policy(when(not_values=["b*"])), req(headers={"x-user": "bob"}))


def test_principals_and_namespaces() -> None:
    principal = "cluster.local/ns/default/sa/bookinfo-productpage"
    assert policy_matches(policy(src(principals=[principal])), req())
    assert not policy_matches(policy(src(principals=[principal])), req(identity=SLEEP))
    assert policy_matches(policy(src(principals=["*/sa/sleep"])), req(identity=SLEEP))
    assert not policy_matches(policy(src(not_principals=["*/sa/sleep"])), req(identity=SLEEP))
    assert policy_matches(policy(src(namespaces=["default"])), req())
    assert not policy_matches(policy(src(namespaces=["default"])), req(identity=SLEEP))
    assert not policy_matches(policy(src(not_namespaces=["other"])), req(identity=SLEEP))
    # no verified identity: positive source fields never match, their not_ forms hold
    assert not policy_matches(policy(src(principals=["*"])), req(identity=None))
    assert policy_matches(policy(src(not_namespaces=["default"])), req(identity=None))


def test_rule_needs_source_operation_and_conditions_together() -> None:
    rule = L7Rule(sources=(Source(namespaces=istio_matches(["default"])),),
                  operations=(Operation(methods=istio_matches(["GET"])),),
                  when=(HeaderCondition(name="x-env", values=istio_matches(["prod"])),))
    assert policy_matches(policy(rule), req(headers={"x-env": "prod"}))
    assert not policy_matches(policy(rule), req(headers={"x-env": "dev"}))
    assert not policy_matches(policy(rule), req("POST", headers={"x-env": "prod"}))
    assert not policy_matches(policy(rule), req(identity=SLEEP, headers={"x-env": "prod"}))


def test_empty_rule_matches_all_and_no_rules_match_nothing() -> None:
    assert policy_matches(policy(L7Rule()), req())
    assert not policy_matches(policy(), req())


def test_no_policies_allow() -> None:
    assert decide([], req()).allowed


def test_deny_wins_over_allow() -> None:
    allow = policy(L7Rule(), name="allow-all")
    deny = policy(op(methods=["DELETE"]), action=Action.DENY, name="no-delete")
    assert decide([allow, deny], req("GET")).allowed
    decision = decide([allow, deny], req("DELETE"))
    assert not decision.allowed and decision.reason == "explicitly denied by: default/no-delete"
    assert decision.policy == "default/no-delete"


def test_allow_policies_exist_but_none_match_denies() -> None:
    productpage = Source(principals=istio_matches(["cluster.local/ns/default/sa/bookinfo-productpage"]))
    get_details = Operation(methods=istio_matches(["GET"]), paths=istio_matches(["/details/*"]))
    allow = policy(L7Rule(sources=(productpage,), operations=(get_details,)), name="productpage-get-details")
    assert decide([allow], req("GET", "/details/1")).allowed
    denied = decide([allow], req("POST", "/details/1"))
    assert not denied.allowed and denied.reason == "allow policies exist, but none allowed"
    assert not decide([allow], req(identity=SLEEP)).allowed


def test_dry_run_is_reported_and_logged_never_enforced(caplog: pytest.LogCaptureFixture) -> None:
    dry_deny = policy(L7Rule(), action=Action.DENY, name="would-deny", dry_run=True)
    with caplog.at_level(logging.INFO, logger="ztunnel.authz"):
        decision = decide([dry_deny], req())
    assert decision.allowed
    assert "default/would-deny: would deny" in decision.dry_run
    assert any("would deny" in str(getattr(r, "fields", "")) for r in caplog.records)
    dry_allow = policy(op(paths=["/other"]), name="only-other", dry_run=True)
    decision = decide([dry_allow], req())
    assert decision.allowed and decision.dry_run == ("dry-run policies would deny "
                                                     "(allow policies exist, but none allowed)",)


def test_audit_policies_are_logged_and_never_decide(caplog: pytest.LogCaptureFixture) -> None:
    audit = L7Policy(name="audit-all", namespace="default", rules=(L7Rule(),), audit=True)
    with caplog.at_level(logging.INFO, logger="waypoint.authz"):
        decision = decide([audit], req())
    assert decision.allowed and decision.policy is None  # an audit policy is not an ALLOW policy
    assert [r.getMessage() for r in caplog.records] == ["audit policy matched"]
    deny = policy(L7Rule(), action=Action.DENY, name="deny-all")
    assert not decide([audit, deny], req()).allowed


def test_applicable_waypoint_wide_and_service_targeted() -> None:
    everywhere = policy(L7Rule(), name="a")
    details_only = policy(L7Rule(), name="b", services=(DETAILS,))
    reviews_only = policy(L7Rule(), name="c", services=("reviews.default.svc.cluster.local",))
    keys = [p.key for p in applicable([reviews_only, details_only, everywhere], DETAILS)]
    assert keys == ["default/a", "default/b"]
    assert [p.key for p in applicable([details_only, everywhere], None)] == ["default/a"]
