"""The waypoint's configuration model: L7 authorization policies and HTTP routes, as plain domain types.

What the control plane says about L7 (policies with `targetRefs` to the waypoint or to a service, and
HTTPRoute-like routes) arrives as our own xDS resource and becomes these types at one boundary; the matcher
(policy.py) and the route chooser (routes.py) only see these.

String matches follow Istio's AuthorizationPolicy syntax (`istio_match`): `*` alone is presence (any
non-empty value), `*suffix`, `prefix*`, anything else exact.
"""

from __future__ import annotations

import msgspec

from services.ztunnel.state.types import Action, StringMatch


def istio_match(text: str) -> StringMatch:
    """One of Istio's string values as a matcher: `*` presence, `*x` suffix, `x*` prefix, else exact."""
    if text == "*":
        return StringMatch(kind="presence")
    if text.startswith("*"):
        return StringMatch(kind="suffix", value=text[1:])
    if text.endswith("*"):
        return StringMatch(kind="prefix", value=text[:-1])
    return StringMatch(kind="exact", value=text)


def istio_matches(values: tuple[str, ...] | list[str]) -> tuple[StringMatch, ...]:
    return tuple(istio_match(v) for v in values)


class Source(msgspec.Struct, frozen=True, kw_only=True):
    """One `from.source`: every field set must hold; values within a field are ORed."""

    principals: tuple[StringMatch, ...] = ()
    """Against `<trust domain>/ns/<ns>/sa/<sa>` of the peer's verified identity."""
    not_principals: tuple[StringMatch, ...] = ()
    namespaces: tuple[StringMatch, ...] = ()
    not_namespaces: tuple[StringMatch, ...] = ()


class Operation(msgspec.Struct, frozen=True, kw_only=True):
    """One `to.operation`: every field set must hold; values within a field are ORed."""

    methods: tuple[StringMatch, ...] = ()
    not_methods: tuple[StringMatch, ...] = ()
    paths: tuple[StringMatch, ...] = ()
    """Against the request path without its query."""
    not_paths: tuple[StringMatch, ...] = ()
    hosts: tuple[StringMatch, ...] = ()
    """Against the request's authority (Host), case-insensitively."""
    not_hosts: tuple[StringMatch, ...] = ()
    ports: tuple[int, ...] = ()
    not_ports: tuple[int, ...] = ()


class HeaderCondition(msgspec.Struct, frozen=True, kw_only=True):
    """A `when` condition on `request.headers[name]`."""

    name: str
    """Lower case."""
    values: tuple[StringMatch, ...] = ()
    not_values: tuple[StringMatch, ...] = ()


class L7Rule(msgspec.Struct, frozen=True, kw_only=True):
    """Matches when any source (or none given), any operation (or none given) and every condition hold."""

    sources: tuple[Source, ...] = ()
    operations: tuple[Operation, ...] = ()
    when: tuple[HeaderCondition, ...] = ()


class L7Policy(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    action: Action = Action.ALLOW
    rules: tuple[L7Rule, ...] = ()
    """A policy without rules matches nothing (so an ALLOW policy without rules denies everything)."""
    dry_run: bool = False
    audit: bool = False
    """An AUDIT policy: evaluated and logged when it matches, never deciding."""
    target_services: tuple[str, ...] = ()
    """Service hostnames the policy targets; empty: it targets the waypoint (every request through it)."""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class PathMatch(msgspec.Struct, frozen=True, kw_only=True):
    kind: str = "prefix"
    """`exact` or `prefix` (HTTPRoute's PathPrefix: whole path segments, `/a` matches `/a/b`, not `/ab`)."""
    value: str = "/"


class HeaderMatch(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    """Lower case."""
    value: str
    """Exact."""


class RouteMatch(msgspec.Struct, frozen=True, kw_only=True):
    """Every field set must hold."""

    path: PathMatch | None = None
    headers: tuple[HeaderMatch, ...] = ()
    method: str | None = None


class Backend(msgspec.Struct, frozen=True, kw_only=True):
    service: str
    """A service hostname (`reviews.default.svc.cluster.local`)."""
    port: int | None = None
    """The service port; None: the port the request was sent to."""
    weight: int = 1


class RouteRule(msgspec.Struct, frozen=True, kw_only=True):
    matches: tuple[RouteMatch, ...] = ()
    """Any one must hold; none given: every request."""
    backends: tuple[Backend, ...] = ()
    timeout: float | None = None
    """Seconds for the whole upstream exchange (HTTPRoute `timeouts.request`); None: no timeout."""
    retries: int = 0
    """Further attempts when connecting to an endpoint fails (each to an endpoint chosen afresh)."""


class HttpRoute(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    namespace: str
    services: tuple[str, ...]
    """The service hostnames the route is attached to (its parentRefs)."""
    port: int | None = None
    """The parents' port it applies to; None: every port."""
    rules: tuple[RouteRule, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


class WaypointConfig(msgspec.Struct, frozen=True, kw_only=True):
    name: str = ""
    namespace: str = ""
    """The waypoint's (the resource is named `namespace/name`)."""
    policies: tuple[L7Policy, ...] = ()
    routes: tuple[HttpRoute, ...] = ()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


EMPTY_CONFIG = WaypointConfig()
