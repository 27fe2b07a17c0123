"""The route chooser: which backend service one HTTP request goes to (pure; randomness injected).

Theory of operation
-------------------
The routes attached to the request's destination service (`HttpRoute.services`) are looked at together, as
Gateway API's HTTPRoute does:

* none attached: the request goes to the service it was sent to, on the same port (`Chosen`, no route);
* else the best-matching rule wins, over all of them: an exact path beats a prefix, a longer prefix beats a
  shorter one, then a rule that names a method, then the one with more header matches; left ties go to
  the first route by `namespace/name`, then to the first rule. A rule without matches matches every path
  (prefix `/`). A path prefix matches whole segments (`/api` matches `/api` and `/api/v1`, not `/apis`);
  header names are case-insensitive and values exact;
* no rule matches: `NoRoute` 404 (Envoy's `route_not_found`, response flag NR);
* the winner has no backend with weight above 0: `NoRoute` 500 (as Gateway API asks);
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


_ALL_PATHS = RouteMatch(path=PathMatch(kind="prefix", value="/"))


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


def _rank(match: RouteMatch) -> tuple[int, int, int, int]:
    path = match.path or _ALL_PATHS.path
    assert path is not None
    return (1 if path.kind == "exact" else 0, len(path.value.rstrip("/")), 1 if match.method else 0,
            len(match.headers))


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


def choose(routes: Iterable[HttpRoute], service: str, *, method: str, path: str,
           headers: Mapping[str, str], rng: random.Random) -> Chosen | NoRoute:
    """The backend for a request to `service` (a hostname); `path` without the query, header names lower
    case. See the module doc."""
    attached = sorted((r for r in routes if service in r.services), key=lambda r: r.key)
    if not attached:
        return Chosen(backend=Backend(service=service))
    best: tuple[tuple[int, int, int, int], HttpRoute, RouteRule] | None = None
    for route in attached:
        for rule in route.rules:
            for match in rule.matches or (_ALL_PATHS,):
                if not match_holds(match, method, path, headers):
                    continue
                rank = _rank(match)
                if best is None or rank > best[0]:
                    best = (rank, route, rule)
    if best is None:
        return NoRoute(status=404, reason="route not found", response_flag="NR")
    _, route, rule = best
    backend = pick_backend(rule.backends, rng)
    if backend is None:
        return NoRoute(status=500, reason=f"route {route.key} has no backend with a weight above 0",
                       response_flag="NR")
    return Chosen(backend=backend, route=route, rule=rule)
