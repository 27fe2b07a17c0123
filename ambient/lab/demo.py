"""`ambient demo`: the seed article's flow in a fresh lab, narrated.

1. lab up with examples/bookinfo.yaml (istiod, two nodes with node agent + ztunnel, eight app pods and
   bookinfo's waypoint)
2. the enrolled pods (lab status), then one DNS answer from inside the sleep pod and which server gave it
3. the sleep pod calls productpage, which calls details and reviews (which calls ratings)
4. the in-pod rules of productpage (`iptables-save` inside its netns)
5. the listeners ztunnel holds inside that pod (`ss -ltnp` inside the netns)
6. the `connection complete` access-log lines of both ztunnels
7. the waypoint: sleep's outbound line to productpage's VIP through it, its request lines, details' inbound
   line with the waypoint as source; the L7 policy (productpage may GET /details/*, sleep gets 403); the
   reviews route (N requests, how many reached v1 and v2)
8. a DENY policy at the waypoint (nothing from the sleep namespace may reach productpage): 403 and its line
9. lab down (unless --keep)
"""

from __future__ import annotations

import json
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from ambient.lab import lab
from ambient.lab.components import LabPaths
from ambient.lab.errors import LabError
from ambient.lab.probe import http_get
from ambient.lab.tables import status_tables
from ambient.output import make_console, section

REQUEST = "http://productpage.bookinfo:9080/productpage"


def _section(console: Console, title: str) -> None:
    section(console, title)


def _in_pod(prefix: str, pod: str, argv: list[str]) -> subprocess.CompletedProcess[bytes]:
    return lab.exec_in_pod(argv, pod=pod, prefix=prefix, capture=True)


def _served_by(body: bytes) -> list[str]:
    """The chain of pods a productpage answer went through, for a one-line summary."""
    try:
        page = json.loads(body)
    except ValueError:
        return []
    hops = [f"productpage <- {page.get('served_by', {}).get('pod')}"]
    for part in ("details", "reviews"):
        value = page.get(part, {})
        hops.append(f"{part}: {value.get('served_by', {}).get('pod') or value.get('error')}")
    ratings = page.get("reviews", {}).get("ratings")
    if ratings:
        hops.append(f"ratings: {ratings.get('served_by', {}).get('pod') or ratings.get('error')}")
    return hops


DIG = """\
import dns.message, dns.query, sys
server = next(line.split()[1] for line in open("/etc/resolv.conf") if line.startswith("nameserver"))
answer = dns.query.udp(dns.message.make_query(sys.argv[1], "A"), server, timeout=5)
print(answer.to_text())
print(";; SERVER: " + server + "#53 (udp)")
"""


def _dns_requests(node_netns: str, namespace: str) -> float:
    """ztunnel's istio_dns_requests_total for the pods of `namespace`, read from its stats port in the node
    netns (-1 when it does not answer)."""
    try:
        status, body = http_get(node_netns, "127.0.0.1", 15020, "/metrics")
    except OSError:
        return -1.0
    if status != 200:
        return -1.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in body.decode(errors="replace").splitlines()
               if line.startswith("istio_dns_requests_total{")
               and f'source_workload_namespace="{namespace}"' in line)


def dns_answer(prefix: str, console: Console, *, pod: str = "sleep",
               name: str = "productpage.bookinfo") -> str:
    """A dig-style answer for `name` asked from inside `pod` (dnspython, to the pod's resolv.conf server),
    and which server really answered: the pod's ztunnel (its DNS metric moved, the cluster DNS never saw the
    query) or the cluster DNS (its query log has the query). Returns "ztunnel", "cluster-dns" or "none"."""
    state = lab.require_state(prefix)
    plan = lab.plan_of(state)
    target = lab.find_pod(plan, pod)
    node_netns = plan.node(target.node).netns
    queries = LabPaths(state.run_dir).cluster_dns_queries
    seen = queries.read_text() if queries.exists() else ""
    before = _dns_requests(node_netns, target.namespace)
    console.print(f"$ ambient lab exec --prefix {prefix} {pod} -- python -c '<dig {name} A>'")
    result = _in_pod(prefix, pod, ["python", "-c", DIG, name])
    console.print(result.stdout.decode(errors="replace").rstrip() or result.stderr.decode(errors="replace"),
                  markup=False)
    after = _dns_requests(node_netns, target.namespace)
    now = queries.read_text() if queries.exists() else ""
    if f" {name} from {target.ip}" in now[len(seen):]:
        console.print(f"answered by the cluster DNS (dnsmasq at the VIP): its query log has {name}")
        return "cluster-dns"
    if after > before >= 0:
        console.print(f"answered by ztunnel on {target.node}, inside the pod on 15053: its "
                      f"istio_dns_requests_total for {target.namespace} went {before:g} -> {after:g}, "
                      "and the cluster DNS never saw the query")
        return "ztunnel"
    console.print("[yellow]neither ztunnel nor the cluster DNS counted the query[/]")
    return "none"


# Behind a waypoint every request reaches productpage from the waypoint, so the policy is the waypoint's.
DENY_POLICY = """\
name: deny-sleep
namespace: bookinfo
targetRefs: [{kind: Service, name: productpage}]
action: DENY
rules:
  - from: [{source: {namespaces: [sleep]}}]
"""
SPLIT_REQUESTS = 50
SPLIT = """
import collections, http.client, json, sys
conn = http.client.HTTPConnection("reviews.bookinfo", 9080, timeout=10)
pods = collections.Counter()
for _ in range(int(sys.argv[1])):
    conn.request("GET", "/reviews/0")
    pods[json.loads(conn.getresponse().read())["served_by"]["pod"]] += 1
print(json.dumps(pods))
"""


def _newest(lines: list[str], *needles: str) -> str | None:
    return next((line for line in reversed(lines) if all(n in line for n in needles)), None)


def _show(console: Console, line: str | None, missing: str) -> None:
    if line is None:
        console.print(f"[yellow]({missing})[/]")
    else:
        console.print(line, markup=False, soft_wrap=True)


def waypoint(prefix: str, console: Console, *, wait: float = 3.0) -> bool:
    """The waypoint's part of the request of step 3, its L7 policy and its weighted route. True when the
    denied request got 403 and the split reached both versions."""
    time.sleep(min(wait, 1.0))  # the lines of step 3's connections are written when they close
    access = list(lab.access_logs(prefix=prefix))
    console.print("sleep's ztunnel sends productpage's traffic to the waypoint, the VIP as HBONE target:")
    sleep = 'src.identity="spiffe://cluster.local/ns/sleep/sa/sleep"'
    _show(console, _newest(access, 'direction="outbound"', sleep, "dst.hbone_addr=10.96.0.10:9080"),
          "no outbound line from sleep to productpage")
    requests = list(lab.waypoint_logs(prefix=prefix))
    console.print("the waypoint's request line for productpage's call to details:")
    _show(console, _newest(requests, 'dst.service="details.bookinfo.svc.cluster.local"', 'method="GET"'),
          "no waypoint request line for details")
    console.print("details' ztunnel sees the waypoint as the source:")
    _show(console, _newest(access, 'direction="inbound"', 'dst.workload="details-v1',
                           'src.identity="spiffe://cluster.local/ns/bookinfo/sa/waypoint"'),
          "no inbound line at details from the waypoint")

    console.print("\nthe L7 policy details-get-from-productpage: anyone else asking details gets 403")
    url = "http://details.bookinfo:9080/details/0"
    console.print(f"$ ambient lab exec --prefix {prefix} sleep -- python -m services.apps.client -i {url}")
    result = _in_pod(prefix, "sleep", ["python", "-m", "services.apps.client", "-m", "5", "-i", url])
    answer = result.stdout.decode(errors="replace")
    console.print(answer.strip() or result.stderr.decode(errors="replace").strip(), markup=False)
    denied = " 403 " in (answer.splitlines() or [""])[0]
    time.sleep(0.5)
    _show(console, _newest(list(lab.waypoint_logs(prefix=prefix)), sleep, 'path="/details/0"'),
          "no waypoint request line for the denied request")

    console.print(f"\nthe route reviews-split (v1 90, v2 10): {SPLIT_REQUESTS} requests from sleep to "
                  "reviews")
    result = _in_pod(prefix, "sleep", ["python", "-c", SPLIT, str(SPLIT_REQUESTS)])
    try:
        split = json.loads(result.stdout)
    except ValueError:
        console.print(f"[red]the requests failed[/]: {result.stderr.decode(errors='replace').strip()}")
        return False
    for pod in sorted(split):
        console.print(f"  {pod}: {split[pod]} of {SPLIT_REQUESTS}")
    return denied and len(split) == 2


def deny(prefix: str, console: Console, *, wait: float = 5.0) -> bool:
    """Apply DENY_POLICY through `ambient world`, show the refused request and the waypoint's line about it.

    Returns True when the request was refused.
    """
    state = lab.require_state(prefix)
    path = Path(state.run_dir) / "deny-sleep.yaml"
    path.write_text(DENY_POLICY)
    console.print(DENY_POLICY.rstrip(), markup=False)
    console.print(f"$ ambient lab world --prefix {prefix} -- policy add {path}")
    seen = set(lab.waypoint_logs(prefix=prefix))
    applied = lab.world_command(["policy", "add", str(path)], prefix=prefix, capture=True)
    if applied.returncode != 0:
        console.print(f"[red]could not apply the policy[/]: {applied.stderr.decode().strip()}")
        return False
    deadline = time.monotonic() + wait
    while True:
        result = _in_pod(prefix, "sleep", ["python", "-m", "services.apps.client", "-m", "5", "-f", REQUEST])
        if result.returncode != 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    if result.returncode == 0:
        console.print("[yellow]the request still succeeds: the waypoint did not apply the policy[/]")
        return False
    console.print(f"refused as expected (client exit {result.returncode}): {result.stderr.decode().strip()}")
    line = denied_line(prefix, seen, wait=wait)
    _show(console, line, "no waypoint request line for the refused request")
    return True


def denied_line(prefix: str, seen: set[str], *, wait: float) -> str | None:
    """The newest waypoint request line from sleep answered 403 that is not in `seen` (waits up to `wait` s:
    the waypoint writes it when the response is done)."""
    deadline = time.monotonic() + wait
    while True:
        fresh = [line for line in lab.waypoint_logs(prefix=prefix)
                 if line not in seen and "response_code=403" in line and "/ns/sleep/" in line]
        if fresh or time.monotonic() > deadline:
            return fresh[-1] if fresh else None
        time.sleep(0.2)


def run_demo(
    *,
    prefix: str = "demo",
    keep: bool = False,
    console: Console | None = None,
    progress: Callable[[str], None] = print,
) -> int:
    """Run the demo; 0 when the request through the mesh succeeded."""
    console = console or make_console()
    _section(console, "1. lab up: istiod, two nodes (node agent + ztunnel), the bookinfo pods")
    lab.up(prefix=prefix, progress=progress)
    ok = False
    try:
        _section(console, "2. the pods, enrolled by the node agents (ambient.istio.io/redirection)")
        data = lab.status(prefix=prefix)
        for table in status_tables(data)[:3]:
            console.print(table)

        _section(console, "DNS: sleep resolves productpage.bookinfo (its resolv.conf names the cluster DNS)")
        dns_answer(prefix, console)

        _section(console, f"3. sleep -> {REQUEST}")
        console.print(
            f"$ ambient lab exec --prefix {prefix} sleep -- python -m services.apps.client {REQUEST}"
        )
        result = _in_pod(prefix, "sleep", ["python", "-m", "services.apps.client", "-m", "10", REQUEST])
        ok = result.returncode == 0
        if ok:
            for hop in _served_by(result.stdout):
                console.print(f"  {hop}")
        else:
            console.print(
                f"[red]request failed (exit {result.returncode})[/]: {result.stderr.decode().strip()}"
            )

        page_pod = next(p for p in data["pods"] if p["name"].startswith("productpage"))
        _section(
            console, f"4. the in-pod redirection rules of {page_pod['name']} (iptables-save in its netns)"
        )
        rules = _in_pod(prefix, page_pod["name"], ["iptables-save"])
        console.print(rules.stdout.decode(errors="replace").rstrip() or "(no rules)", markup=False)

        _section(console, f"5. the sockets ztunnel holds inside {page_pod['name']} (ss -ltnp in its netns)")
        sockets = _in_pod(prefix, page_pod["name"], ["ss", "-ltnp"])
        console.print(sockets.stdout.decode(errors="replace").rstrip(), markup=False)

        _section(console, "6. ztunnel access logs (ambient logs)")
        lines = [line for line in lab.access_logs(prefix=prefix) if "connection complete" in line]
        for line in lines[-12:]:
            console.print(line, markup=False, soft_wrap=True)
        if not lines:
            console.print("(no access-log lines yet)")

        _section(console, "7. the waypoint: the way through it, its L7 policy, its weighted route")
        waypoint(prefix, console)

        _section(console, "8. a DENY policy at the waypoint: nothing from the sleep namespace may reach "
                          "productpage")
        deny(prefix, console)
    except LabError as exc:
        console.print(f"[red]demo step failed: {exc}[/]")
        ok = False
    finally:
        if keep:
            console.print(
                f"\nthe lab stays up: `ambient lab status --prefix {prefix}`, "
                f"`ambient lab down --prefix {prefix}`"
            )
        else:
            _section(console, "9. lab down")
            lab.down(prefix=prefix, progress=progress)
    return 0 if ok else 1
