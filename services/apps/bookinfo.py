"""The sample apps: a bookinfo-like set (productpage -> details, reviews -> ratings), an echo server, sleep.

Each app is a handler factory taking its settings from the environment the lab gives the pod:
POD_NAME, POD_NAMESPACE, SERVICE_ACCOUNT, SERVICE_VERSION and the upstream URLs (DETAILS_URL, REVIEWS_URL,
RATINGS_URL, e.g. `http://details:9080`: the name resolves to the service VIP through the cluster DNS, or
through the pod's ztunnel when it is meshed).
Every response says which pod served it and which peer address it saw, so a request's path through the
mesh can be read off the answer. A failed upstream call is reported in the page (as bookinfo does), not as
a failure of the page itself.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import msgspec
import trio

from services.apps.http import FetchError, fetch
from shared.httpd import Handler, Limits, Request, Response, json_response

UPSTREAM_TIMEOUT = 5.0
LIMITS = Limits(max_body=1024 * 1024)  # what the apps serve with: the echo app takes bodies up to 1 MiB

BOOK = {
    "id": 0,
    "title": "The Comedy of Errors",
    "author": "William Shakespeare",
    "year": 1595,
    "type": "paperback",
    "pages": 200,
    "publisher": "PublisherA",
    "language": "English",
}
REVIEWS = [
    {
        "reviewer": "Reviewer1",
        "text": "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    },
    {
        "reviewer": "Reviewer2",
        "text": "Absolutely fun and entertaining. The play lacks thematic depth compared to other plays.",
    },
]
RATINGS = {"Reviewer1": 5, "Reviewer2": 4}

APP_KINDS = ("productpage", "details", "reviews", "ratings", "echo", "sleep")


class AppEnv:
    def __init__(self, kind: str, env: Mapping[str, str]) -> None:
        self.kind = kind
        self.pod = env.get("POD_NAME", kind)
        self.namespace = env.get("POD_NAMESPACE", "default")
        self.version = env.get("SERVICE_VERSION", "v1")
        self.urls = {
            name: env[f"{name.upper()}_URL"]
            for name in ("details", "reviews", "ratings")
            if env.get(f"{name.upper()}_URL")
        }

    def served_by(self, request: Request) -> dict[str, str]:
        return {"pod": self.pod, "namespace": self.namespace, "version": self.version, "peer": request.peer}

    async def call(self, name: str, path: str) -> dict[str, Any]:
        """GET an upstream; its JSON, or {"error": ...} saying what went wrong."""
        base = self.urls.get(name)
        if base is None:
            return {"error": f"{name} is not configured ({name.upper()}_URL unset)"}
        try:
            result = await fetch(base + path, timeout=UPSTREAM_TIMEOUT)
        except FetchError as exc:
            return {"error": f"{name}: {exc}"}
        if result.status != 200:
            return {
                "error": f"{name}: HTTP {result.status} {result.reason}",
                "body": result.body.decode("utf-8", "replace")[:200],
            }
        try:
            value: dict[str, Any] = msgspec.json.decode(result.body, type=dict[str, Any])
        except msgspec.DecodeError as exc:
            return {"error": f"{name}: bad JSON: {exc}"}
        return value


def make_handler(kind: str, env: Mapping[str, str]) -> Handler:
    """The request handler for app `kind` (one of APP_KINDS except sleep)."""
    app = AppEnv(kind, env)

    async def common(request: Request) -> Response | None:
        if request.path == "/healthz":
            return json_response({"status": "ok", **app.served_by(request)})
        return None

    async def productpage(request: Request) -> Response:
        if request.path not in ("/", "/productpage"):
            return json_response({"error": f"no page {request.path}; try /productpage"}, 404)
        details: dict[str, Any] = {}
        reviews: dict[str, Any] = {}

        async def get_details() -> None:
            details.update(await app.call("details", "/details/0"))

        async def get_reviews() -> None:
            reviews.update(await app.call("reviews", "/reviews/0"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(get_details)
            nursery.start_soon(get_reviews)
        return json_response(
            {
                "product": BOOK["title"],
                "details": details,
                "reviews": reviews,
                "served_by": app.served_by(request),
            }
        )

    async def details(request: Request) -> Response:
        if not request.path.startswith("/details/"):
            return json_response({"error": "try /details/0"}, 404)
        return json_response({**BOOK, "served_by": app.served_by(request)})

    async def reviews(request: Request) -> Response:
        if not request.path.startswith("/reviews/"):
            return json_response({"error": "try /reviews/0"}, 404)
        ratings: dict[str, Any] = {}
        if app.version != "v1":
            ratings = await app.call("ratings", "/ratings/0")
        items = []
        for review in REVIEWS:
            item: dict[str, Any] = dict(review)
            if ratings and "error" not in ratings:
                item["rating"] = ratings.get("ratings", {}).get(review["reviewer"])
            items.append(item)
        payload: dict[str, Any] = {"id": 0, "reviews": items, "served_by": app.served_by(request)}
        if ratings:
            payload["ratings"] = ratings
        return json_response(payload)

    async def ratings(request: Request) -> Response:
        if not request.path.startswith("/ratings/"):
            return json_response({"error": "try /ratings/0"}, 404)
        return json_response({"id": 0, "ratings": RATINGS, "served_by": app.served_by(request)})

    async def echo(request: Request) -> Response:
        return json_response(
            {
                "method": request.method,
                "path": request.target,
                "body": request.body.decode("utf-8", "replace"),
                "served_by": app.served_by(request),
            }
        )

    routes: dict[str, Handler] = {
        "productpage": productpage,
        "details": details,
        "reviews": reviews,
        "ratings": ratings,
        "echo": echo,
    }
    if kind not in routes:
        raise ValueError(f"unknown app {kind!r}; choose one of {', '.join(routes)}")
    route = routes[kind]

    async def handler(request: Request) -> Response:
        return await common(request) or await route(request)

    return handler
