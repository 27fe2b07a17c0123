"""`ambient trace POD`: follow one pod's connections live, from its node's ztunnel.

ztunnel's admin port serves `/debug/connections?pod=<uid, ns/name or name>` (services/ztunnel/admin.py):
a JSON line per connection of that pod as it ends (services/ztunnel/telemetry/trace.py). This command
finds the pod in the lab, asks the ztunnel of its node from inside that node's network namespace, and
prints one line per connection; `--admin HOST:PORT` asks a ztunnel directly instead (no lab needed).
Upstream ztunnel has no such endpoint: this works against this project's ztunnel only.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
from collections.abc import Iterable
from typing import Any
from urllib.parse import quote

from ambient.lab import components
from ambient.lab.cli import DEFAULT_PREFIX
from ambient.lab.errors import ComponentError
from ambient.lab.lab import check_prerequisites, find_pod, plan_of, require_state
from ambient.lab.probe import netns_socket, stream_lines
from shared.addr import AddressError, split_host_port
from shared.errors import AmbientError
from shared.netns import NetnsError

DESCRIPTION = """\
Print each connection of POD as it happens: which of the pod's listeners took it, where the app was going,
the route (passthrough, or HBONE to which ztunnel or through which waypoint), the inbound policy decision
and the policy that made it, bytes, duration and error. One line per connection as it ends, and one per DNS
query the pod's DNS proxy (15053) answers: the name, who answered (ztunnel from the mesh, or the upstream
resolver), the response code and addresses. Ctrl-C stops.

In the lab, POD is ns/name, name, a unique name prefix or an app label, and the trace is read from the
ztunnel of the pod's node. With --admin, POD (uid, ns/name or name) is sent as is to that ztunnel.

It reads /debug/connections on ztunnel's admin port, which this project's ztunnel serves; upstream ztunnel
has no such endpoint (the nearest there is its access log at debug level).
"""


def register(subparsers: Any) -> None:
    """Add `trace` to the `ambient` command."""
    p = subparsers.add_parser(
        "trace",
        help="follow one pod's connections live (this project's ztunnel only)",
        description=DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("pod", metavar="POD", help="the pod to trace (see above for the forms it may take)")
    p.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"namespace name prefix of the lab (default {DEFAULT_PREFIX}; env AMBIENT_LAB_PREFIX)",
    )
    p.add_argument(
        "--admin",
        metavar="HOST:PORT",
        default=None,
        help="a ztunnel admin address to read instead of the lab's (e.g. 127.0.0.1:15000)",
    )
    p.add_argument("--json", action="store_true", help="print ztunnel's JSON lines as they come")
    p.add_argument(
        "--count", type=int, default=None, metavar="N", help="stop after N connections (default: never)"
    )
    p.set_defaults(func=cmd_trace)


def cmd_trace(args: argparse.Namespace) -> int:
    if args.admin is not None:
        try:
            host, port = split_host_port(args.admin)
        except AddressError as exc:
            raise AmbientError(f"--admin {args.admin!r}: {exc}") from None
        where, query, netns = f"ztunnel admin {args.admin}", args.pod, ""
    else:
        check_prerequisites()
        plan = plan_of(require_state(args.prefix))
        pod = find_pod(plan, args.pod)
        host, port = "127.0.0.1", components.ZTUNNEL_ADMIN_PORT
        where, query, netns = f"the ztunnel of {pod.node}", pod.uid, plan.node(pod.node).netns
    try:
        sock = netns_socket(netns)
        try:
            sock.connect((host, port))
        except BaseException:
            sock.close()
            raise
        lines = stream_lines(sock, f"{host}:{port}", f"/debug/connections?pod={quote(query, safe='')}")
        return follow(lines, where=where, raw=args.json, count=args.count)
    except (OSError, NetnsError, http.client.HTTPException) as exc:
        raise ComponentError(f"cannot read the trace from {where} ({host}:{port}): {exc}") from None


def follow(lines: Iterable[bytes], *, where: str, raw: bool, count: int | None) -> int:
    """Print the trace's lines until it ends (1: ztunnel closed it) or `count` connections were shown (0)."""
    shown = 0
    for line in lines:
        event = json.loads(line)
        if raw:
            print(line.decode().rstrip("\n"), flush=True)
        else:
            print(describe(event, where=where), flush=True)
        if event.get("event") in ("connection complete", "connection failed"):
            shown += 1
            if count is not None and shown >= count:
                return 0
    print(f"ambient: the trace ended: {where} closed it", file=sys.stderr)
    return 1


def describe(event: dict[str, Any], *, where: str = "ztunnel") -> str:
    """One trace event as one line for a terminal."""
    kind = event.get("event")
    if kind == "tracing":
        running = ", ".join(f"{p['pod'] or p['uid']} (uid {p['uid']})" for p in event.get("running", []))
        if not running:
            return (f"tracing {event.get('pod')} on {where}; not running there (yet): it shows once it is; "
                    "Ctrl-C stops")
        return f"tracing {running} on {where}; Ctrl-C stops"
    if kind == "dropped":
        return f"... {event['count']} connection(s) not shown: this reader fell behind"
    if kind == "dns query":
        answers = ", ".join(event.get("answers") or []) or "no address"
        line = (f"{event.get('time', '')} {event.get('listener', '')} {event.get('protocol', '')} "
                f"{event.get('name')} {event.get('type')} | answered by {event.get('answered_by')} | "
                f"{event.get('rcode')} | {answers}")
        return f"{line} | error: {event['error']}" if event.get("error") else line
    parts = [event.get("time", ""), event.get("listener", ""), event.get("src", "?"), "->",
             event.get("original_dst", "?")]
    if event.get("dst_service"):
        parts.append(f"({event['dst_service']})")
    if kind == "connection failed":
        return " ".join([*parts, f"failed: {event.get('error')}"])
    parts.append(f"| {event.get('route')}")
    if event.get("hbone_target") and event.get("direction") == "outbound":
        parts.append(f"target {event['hbone_target']}")
    if event.get("dst_workload"):
        parts.append(f"workload {event['dst_workload']}")
    if event.get("src_identity") and event.get("direction") == "inbound":
        parts.append(f"from {event['src_identity']}")
    unchecked = "none here (the destination decides)" if event.get("direction") == "outbound" else "none"
    parts.append(f"| policy: {event.get('policy') or unchecked}")
    if event.get("status") is not None:
        parts.append(f"| {event['status']}")
    parts.append(f"| sent {event.get('bytes_sent', 0)} B, received {event.get('bytes_recv', 0)} B, "
                 f"{event.get('duration_ms', 0)} ms")
    if event.get("error"):
        parts.append(f"| error: {event['error']}")
    return " ".join(parts)
