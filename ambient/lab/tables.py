"""The lab's status (`lab.status()`) as rich tables: nodes, pods, services, components.

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
