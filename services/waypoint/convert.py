"""The WaypointConfig resource (proto/waypoint.proto, our own xDS type) -> the waypoint's model (config.py).

The only module of the waypoint that reads the generated protobuf classes. Each function returns a fully
valid model value or raises ConversionError with a reason fit for a NACK's error_detail, as ztunnel's
convert.py does for Address and Authorization.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from google.protobuf import any_pb2

from services.waypoint.config import (
    EMPTY_CONFIG,
    Backend,
    HeaderCondition,
    HeaderMatch,
    HttpRoute,
    L7Policy,
    L7Rule,
    Operation,
    PathMatch,
    RouteMatch,
    RouteRule,
    Source,
    WaypointConfig,
)
from services.ztunnel.state.types import Action, StringMatch
from services.ztunnel.xds.convert import _named_errors, _string_match, _unpack
from services.ztunnel.xds.errors import ConversionError
from shared.api import authorization_pb2 as apb
from shared.api import waypoint_pb2 as pb

WAYPOINT_CONFIG_TYPE_URL: Final = "type.googleapis.com/trio_ambient.waypoint.v1.WaypointConfig"


def _matches(name: str, items: Iterable[apb.StringMatch]) -> tuple[StringMatch, ...]:
    return tuple(_string_match(name, m) for m in items)


def _methods(values: Iterable[str]) -> tuple[StringMatch, ...]:
    return tuple(StringMatch(kind="exact", value=v.upper()) for v in values)


def _hostname(ref: pb.ServiceRef) -> str:
    return ref.hostname


def _rule(name: str, msg: pb.L7Rule) -> L7Rule:
    sources = tuple(Source(principals=_matches(name, s.principals),
                           not_principals=_matches(name, s.not_principals),
                           namespaces=_matches(name, s.namespaces),
                           not_namespaces=_matches(name, s.not_namespaces))
                    for s in getattr(msg, "from"))  # `from` is a Python keyword
    operations = tuple(Operation(methods=_methods(o.methods), not_methods=_methods(o.not_methods),
                                 paths=_matches(name, o.paths), not_paths=_matches(name, o.not_paths),
                                 hosts=_matches(name, o.hosts), not_hosts=_matches(name, o.not_hosts),
                                 ports=tuple(o.ports), not_ports=tuple(o.not_ports))
                       for o in msg.to)
    when = tuple(HeaderCondition(name=c.header.lower(), values=_matches(name, c.values),
                                 not_values=_matches(name, c.not_values)) for c in msg.when)
    return L7Rule(sources=sources, operations=operations, when=when)


def policy_from_pb(name: str, msg: pb.L7Policy) -> L7Policy:
    if msg.action not in (pb.ALLOW, pb.DENY, pb.AUDIT):
        raise ConversionError(name, f"policy {msg.namespace}/{msg.name}: unknown action {msg.action}")
    return L7Policy(name=msg.name, namespace=msg.namespace,
                    action=Action.DENY if msg.action == pb.DENY else Action.ALLOW,
                    audit=msg.action == pb.AUDIT, dry_run=msg.dry_run,
                    target_services=tuple(_hostname(ref) for ref in msg.target_services),
                    rules=tuple(_rule(name, r) for r in msg.rules))


def _path(name: str, msg: pb.PathMatch) -> PathMatch:
    kind = msg.WhichOneof("kind")
    if kind is None:
        raise ConversionError(name, "a path match with neither exact nor prefix")
    return PathMatch(kind=kind, value=getattr(msg, kind))


def _route_rule(name: str, msg: pb.RouteRule) -> RouteRule:
    matches = tuple(RouteMatch(path=_path(name, m.path) if m.HasField("path") else None,
                               headers=tuple(HeaderMatch(name=h.name.lower(), value=h.exact)
                                             for h in m.headers),
                               method=m.method.upper() or None)
                    for m in msg.matches)
    backends = tuple(Backend(service=_hostname(b.service), port=b.port or None, weight=b.weight)
                     for b in msg.backends)
    timeout = msg.timeout.ToTimedelta().total_seconds() if msg.HasField("timeout") else None
    return RouteRule(matches=matches, backends=backends, timeout=timeout, retries=msg.connect_retries)


def route_from_pb(name: str, msg: pb.HttpRoute) -> HttpRoute:
    if not msg.parent.hostname:
        raise ConversionError(name, f"route {msg.namespace}/{msg.name} has no parent service")
    return HttpRoute(name=msg.name, namespace=msg.namespace, services=(msg.parent.hostname,),
                     port=msg.parent_port or None, rules=tuple(_route_rule(name, r) for r in msg.rules))


def waypoint_config_from_pb(name: str, msg: pb.WaypointConfig) -> WaypointConfig:
    return WaypointConfig(name=msg.name, namespace=msg.namespace,
                          policies=tuple(policy_from_pb(name, p) for p in msg.policies),
                          routes=tuple(route_from_pb(name, r) for r in msg.routes))


@_named_errors
def waypoint_config_from_any(name: str, resource: any_pb2.Any) -> WaypointConfig:
    """Decode one WaypointConfig resource (named `namespace/name`).

    Raises:
        ConversionError: named by `name`.
    """
    msg = _unpack(name, resource, WAYPOINT_CONFIG_TYPE_URL, pb.WaypointConfig())
    if f"{msg.namespace}/{msg.name}" != name:
        raise ConversionError(name, f"waypoint config resource named {name!r} is {msg.namespace}/{msg.name}")
    return waypoint_config_from_pb(name, msg)


class WaypointConfigs:
    """The xDS sink of WaypointConfig resources (`XdsClient(sinks=...)`) and what the proxy reads.

    The control plane shows a waypoint only its own resource; should it hold several, their policies and
    routes all apply (`current`).
    """

    def __init__(self) -> None:
        self.by_key: dict[str, WaypointConfig] = {}
        self._current = EMPTY_CONFIG

    def convert(self, name: str, resource: any_pb2.Any) -> WaypointConfig:
        return waypoint_config_from_any(name, resource)

    def apply(self, upserts: list[object], removed: list[str]) -> None:
        for item in upserts:
            assert isinstance(item, WaypointConfig)
            self.by_key[item.key] = item
        for name in removed:
            self.by_key.pop(name, None)
        configs = [self.by_key[k] for k in sorted(self.by_key)]
        if len(configs) == 1:
            self._current = configs[0]
        else:
            self._current = WaypointConfig(policies=tuple(p for c in configs for p in c.policies),
                                           routes=tuple(r for c in configs for r in c.routes))

    def current(self) -> WaypointConfig:
        return self._current
