"""The waypoint's route chooser: every match kind, precedence, weights by a seeded RNG, timeouts, retries."""

from __future__ import annotations

import collections
import random

from services.waypoint.config import Backend, HeaderMatch, HttpRoute, PathMatch, RouteMatch, RouteRule
from services.waypoint.routes import Chosen, NoRoute, choose, path_matches, pick_backend

REVIEWS = "reviews.default.svc.cluster.local"
V1 = "reviews-v1.default.svc.cluster.local"
V2 = "reviews-v2.default.svc.cluster.local"
V3 = "reviews-v3.default.svc.cluster.local"


def route(*rules: RouteRule, name: str = "reviews", services: tuple[str, ...] = (REVIEWS,),
          port: int | None = None) -> HttpRoute:
    return HttpRoute(name=name, namespace="default", services=services, rules=rules, port=port)


def to(service: str, weight: int = 1, port: int | None = None) -> Backend:
    return Backend(service=service, weight=weight, port=port)


def pick(routes: list[HttpRoute], path: str = "/", *, method: str = "GET",
         headers: dict[str, str] | None = None, seed: int = 1) -> Chosen | NoRoute:
    return choose(routes, REVIEWS, port=9080, method=method, path=path, headers=headers or {},
                  rng=random.Random(seed))


def backend_of(result: Chosen | NoRoute) -> str:
    assert isinstance(result, Chosen), result
    return result.backend.service


def test_no_route_attached_goes_to_the_service_itself() -> None:
    other = route(RouteRule(backends=(to(V1),)), services=("details.default.svc.cluster.local",))
    result = pick([other])
    assert isinstance(result, Chosen) and result.route is None
    assert result.backend == Backend(service=REVIEWS) and result.timeout is None and result.retries == 0


def test_path_prefix_is_segment_wise_and_exact_is_exact() -> None:
    prefix = PathMatch(kind="prefix", value="/api")
    assert path_matches(prefix, "/api") and path_matches(prefix, "/api/v1")
    assert not path_matches(prefix, "/apis")
    assert path_matches(PathMatch(kind="prefix", value="/api/"), "/api/x")
    assert path_matches(PathMatch(kind="prefix", value="/"), "/anything")
    exact = PathMatch(kind="exact", value="/api")
    assert path_matches(exact, "/api") and not path_matches(exact, "/api/v1")


def test_the_first_rule_that_matches_decides_in_the_order_written() -> None:
    def on(kind: str, value: str, backend: str) -> RouteRule:
        match = RouteMatch(path=PathMatch(kind=kind, value=value))
        return RouteRule(matches=(match,), backends=(to(backend),))

    routes = [route(on("exact", "/reviews/0", V3), on("prefix", "/reviews", V2), on("prefix", "/", V1))]
    assert backend_of(pick(routes, "/health")) == V1
    assert backend_of(pick(routes, "/reviews/1")) == V2
    assert backend_of(pick(routes, "/reviews/0")) == V3
    reversed_order = [route(on("prefix", "/", V1), on("exact", "/reviews/0", V3))]
    assert backend_of(pick(reversed_order, "/reviews/0")) == V1


def test_header_matches_exact_and_case_insensitive_names() -> None:
    routes = [route(
        RouteRule(matches=(RouteMatch(headers=(HeaderMatch(name="End-User", value="jason"),)),),
                  backends=(to(V2),)),
        RouteRule(backends=(to(V1),)),
    )]
    assert backend_of(pick(routes, headers={"end-user": "jason"})) == V2
    assert backend_of(pick(routes, headers={"end-user": "Jason"})) == V1  # values are exact
    assert backend_of(pick(routes)) == V1


def test_method_match() -> None:
    routes = [route(RouteRule(matches=(RouteMatch(method="POST"),), backends=(to(V2),)),
                    RouteRule(backends=(to(V1),)))]
    assert backend_of(pick(routes, method="POST")) == V2
    assert backend_of(pick(routes, method="GET")) == V1


def test_any_match_of_a_rule_holds() -> None:
    rule = RouteRule(matches=(RouteMatch(path=PathMatch(kind="exact", value="/a")),
                              RouteMatch(path=PathMatch(kind="exact", value="/b"))), backends=(to(V2),))
    routes = [route(rule, RouteRule(backends=(to(V3),)))]
    assert backend_of(pick(routes, "/b")) == V2
    assert backend_of(pick(routes, "/c")) == V3


def test_no_matching_rule_goes_to_the_service_and_no_weight_is_500() -> None:
    only_api = [route(RouteRule(matches=(RouteMatch(path=PathMatch(kind="prefix", value="/api")),),
                                backends=(to(V1),)))]
    result = pick(only_api, "/other")
    assert isinstance(result, Chosen) and result.backend == Backend(service=REVIEWS) and result.rule is None
    zero = [route(RouteRule(backends=(to(V1, 0), to(V2, 0))))]
    result = pick(zero)
    assert isinstance(result, NoRoute) and result.status == 500


def test_a_route_for_another_port_does_not_apply() -> None:
    assert backend_of(pick([route(RouteRule(backends=(to(V1),)), port=9090)])) == REVIEWS
    assert backend_of(pick([route(RouteRule(backends=(to(V1),)), port=9080)])) == V1


def test_weighted_split_with_a_seeded_rng_is_reproducible_and_near_the_weights() -> None:
    routes = [route(RouteRule(backends=(to(V1, 90), to(V2, 10))))]
    def split(seed: int) -> collections.Counter[str]:
        rng = random.Random(seed)
        return collections.Counter(
            backend_of(choose(routes, REVIEWS, port=9080, method="GET", path="/", headers={}, rng=rng))
            for _ in range(1000))

    counts, again = split(42), split(42)
    assert counts == again
    assert 850 <= counts[V1] <= 950 and counts[V1] + counts[V2] == 1000


def test_zero_weight_backend_is_never_chosen() -> None:
    rng = random.Random(7)
    backends = (to(V1, 0), to(V2, 3), to(V3, 0))
    assert {pick_backend(backends, rng) for _ in range(100)} == {to(V2, 3)}
    assert pick_backend((), rng) is None


def test_timeout_retries_port_and_route_name_come_from_the_rule() -> None:
    rule = RouteRule(backends=(to(V1, port=9080),), timeout=2.5, retries=3)
    result = pick([route(rule, name="reviews-split")])
    assert isinstance(result, Chosen)
    assert result.timeout == 2.5 and result.retries == 3 and result.backend.port == 9080
    assert result.route_name == "default/reviews-split"


def test_routes_are_taken_by_namespace_and_name() -> None:
    b = route(RouteRule(backends=(to(V2),)), name="b")
    a = route(RouteRule(backends=(to(V1),)), name="a")
    assert backend_of(pick([b, a])) == V1
