"""The lab's status (`lab.status()`) as rich tables: nodes, pods, services, components; and the node agents'
verification (`lab.verify()`, `ambient lab verify`) as one table.

Shared by `ambient lab status` and `ambient demo`.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table


def status_tables(data: dict[str, Any]) -> list[Table]:
    nodes = Table(title=f"lab {data['prefix']} ({data['phase']})")
    for col in ("node", "netns", "fabric address", "pod range"):
        nodes.add_column(col)
    for n in data["nodes"]:
        nodes.add_row(n["name"], n["netns"], n["address"], n["pod_cidr"])
    control = data.get("control_plane", {})
    if control.get("kube_apiserver"):
        nodes.caption = (f"Kubernetes API server {control['kube_apiserver']} (`ambient lab kubectl -- ...`; "
                         f"kubeconfig {control['kubeconfig']})")
    pods = Table(title="pods")
    if not data.get("control_plane", {}).get("answered", True):
        pods.caption = "istiod did not answer: enrolment as the lab infers it (its records, ztunnel)"
    for col in ("namespace", "pod", "node", "ip", "app", "enrolment"):
        pods.add_column(col)
    colours = {"enabled": "green", "pending": "yellow", "not-ambient": "dim"}
    for p in data["pods"]:
        colour = colours.get(p["enrolment"], "red")
        pods.add_row(
            p["namespace"], p["name"], p["node"], p["ip"], p["app"], f"[{colour}]{p['enrolment']}[/]"
        )
    services = Table(title="services")
    for col in ("namespace", "service", "vips", "ports", "endpoints"):
        services.add_column(col)
    for s in data["services"]:
        services.add_row(
            s["namespace"],
            s["name"],
            ", ".join(s["vips"]),
            ", ".join(map(str, s["ports"])),
            ", ".join(e.split("/", 1)[1] for e in s["endpoints"]),
        )
    procs = Table(title="components")
    for col in ("component", "pid", "state", "log"):
        procs.add_column(col)
    for c in data["components"]:
        if c["component"] != "app":
            whose = c.get("implementation", "ambient")
            name = c["name"] if whose == "ambient" else f"{c['name']} ({whose})"
            procs.add_row(
                name, str(c["pid"]), "[green]running[/]" if c["running"] else "[red]gone[/]", c["log"]
            )
    return [nodes, pods, services, procs]


VERIFY_COLOURS = {"ok": "green", "repaired": "yellow"}


def verify_table(nodes: list[dict[str, Any]]) -> Table:
    """One row per verified pod (node, pod, checks, drift found, repairs done, result), one per node whose
    agent did not answer."""
    table = Table(title="redirection verification")
    for col in ("node", "pod", "checks", "drift found", "repair", "result"):
        table.add_column(col, overflow="fold")
    for node in nodes:
        if node.get("error"):
            table.add_row(node["node"], "", "", "", "", f"[red]{node['error']}[/]")
            continue
        for p in node["pods"]:
            colour = VERIFY_COLOURS.get(p["result"], "red")
            remaining = "\n".join(f"still: {r}" for r in p.get("remaining", []))
            table.add_row(
                node["node"],
                f"{p['namespace']}/{p['name']}",
                ", ".join(p["checks"]),
                "\n".join(p["drift"]) or "-",
                "\n".join(p["repairs"]) or "-",
                f"[{colour}]{p['result']}[/]" + (f"\n{remaining}" if remaining else ""),
            )
    return table


def verify_failed(nodes: list[dict[str, Any]]) -> bool:
    """Whether a node agent did not answer or any pod is still broken (or unreadable) after its repair."""
    return any(n.get("error") or any(p["result"] not in VERIFY_COLOURS for p in n["pods"]) for n in nodes)
