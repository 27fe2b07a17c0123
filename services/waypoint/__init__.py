"""The waypoint: an L7 proxy in a waypoint pod's netns, reached by ztunnels over HBONE (upstream: Envoy).

Modules, bottom up:

* `config`   the waypoint's own model: L7 authorization policies and HTTP routes (`WaypointConfig`);
* `policy`   the L7 policy decision for one request (pure);
* `routes`   the route and weighted backend for one request (pure, with an injected RNG);
* `convert`  the WaypointConfig resource -> config.py's model, and its xDS sink;
* `upstream` endpoints of a service from the Address xDS, and the pooled HBONE stream to one of them;
* `http`     one tunnel's HTTP/1.1 requests: parse, authorize, route, forward, answer;
* `http2`    the same for a tunnel that speaks HTTP/2 with prior knowledge, one task per h2 stream;
* `proxy`    the 15008 side: which CONNECT targets this waypoint serves, HTTP or opaque TCP per port;
* `telemetry` the per-request access log line and the `istio_requests_*` metrics;
* `app`      the process: identity, xDS, the listeners.

The transport is ztunnel's (`services/ztunnel/hbone/`), as are the xDS client, the state store, the
certificate manager and the L4 authorization: the waypoint is built on the same parts.
"""
