"""The route chooser: which backend service one HTTP request goes to (pure; randomness injected).

Theory of operation
-------------------
The routes attached to the request's destination service and port (`HttpRoute.services`, `port`) are
looked at in order (by `namespace/name`, then their rules as written), as the control plane documents them
(docs/waypoint.md):

* the first rule with a match that holds decides (a rule without matches takes every request). A path
  prefix matches whole segments (`/api` matches `/api` and `/api/v1`, not `/apis`); header names are
  case-insensitive and values exact; a method, when given, exactly;
* no route attached, or no rule matches: the request goes to the service it was sent to, on the same port
  (`Chosen` without a rule);
* the deciding rule has no backend with weight above 0: `NoRoute` 500 (as Gateway API asks);
* else one backend is drawn by weight (`rng.randrange` over the sum of the weights), so a seeded
  `random.Random` gives a reproducible split; each request is drawn separately.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

import msgspec

from services.waypoint.config import Backend, HttpRoute, PathMatch, RouteMatch, RouteRule


class Chosen(msgspec.Struct, frozen=True, kw_only=True):
    """Where the request goes: `backend` (its port None = the request's port), with the rule's timeout and
    retries; `route` and `rule` are None when no route is attached to the service."""

    backend: Backend
    route: HttpRoute | None = None
    rule: RouteRule | None = None

    @property
    def timeout(self) -> float | None:
        return self.rule.timeout if self.rule is not None else None

    @property
    def retries(self) -> int:
        return self.rule.retries if self.rule is not None else 0

    @property
    def route_name(self) -> str | None:
        return self.route.key if self.route is not None else None


class NoRoute(msgspec.Struct, frozen=True, kw_only=True):
    status: int
    reason: str
    response_flag: str


def path_matches(match: PathMatch, path: str) -> bool:
    if match.kind == "exact":
        return path == match.value
    prefix = match.value.rstrip("/")
    return not prefix or path == prefix or path.startswith(prefix + "/")


def match_holds(match: RouteMatch, method: str, path: str, headers: Mapping[str, str]) -> bool:
    if match.path is not None and not path_matches(match.path, path):
        return False
    if match.method is not None and match.method.upper() != method.upper():
        return False
    return all(headers.get(h.name.lower()) == h.value for h in match.headers)


def pick_backend(backends: Iterable[Backend], rng: random.Random) -> Backend | None:
    """One backend drawn by weight; None when no weight is above 0."""
    live = [b for b in backends if b.weight > 0]
    total = sum(b.weight for b in live)
    if not total:
        return None
    point = rng.randrange(total)
    for backend in live:
        point -= backend.weight
        if point < 0:
            return backend
    raise AssertionError("unreachable: the draw is below the sum of the weights")


def choose(routes: Iterable[HttpRoute], service: str, *, port: int, method: str, path: str,
           headers: Mapping[str, str], rng: random.Random) -> Chosen | NoRoute:
    """The backend for a request to `service` (a hostname) on `port`; `path` without the query, header
    names lower case. See the module doc."""
    attached = sorted((r for r in routes if service in r.services and r.port in (None, port)),
                      key=lambda r: r.key)
    for route in attached:
        for rule in route.rules:
            if rule.matches and not any(match_holds(m, method, path, headers) for m in rule.matches):
                continue
            backend = pick_backend(rule.backends, rng)
            if backend is None:
                return NoRoute(status=500, reason=f"route {route.key} has no backend with a weight above 0",
                               response_flag="NR")
            return Chosen(backend=backend, route=route, rule=rule)
    return Chosen(backend=Backend(service=service))
