"""`ambient lab ...`, `ambient logs` and `ambient demo`: the local stack in network namespaces (DESIGN §6).

    ambient lab up [--world FILE] [--nodes N] [--prefix P]    build the lab and start everything in it
    ambient lab down [--prefix P]                             stop and remove exactly what `up` made
    ambient lab status [--json] [--prefix P]                  nodes, pods (IP, node, enrolment: the pod's
                                                              ambient.istio.io/redirection), services
    ambient lab exec POD -- CMD ...                           run CMD in a pod's netns, its exit code
    ambient lab restart {ztunnel|node-agent|istiod} [NODE]    restart one component
    ambient lab delete POD                                    delete a pod (unenrolled, then removed)
    ambient lab world -- ARGS ...                             `ambient world ARGS` against the lab's istiod
    ambient logs [NODE] [--direction inbound|outbound]        ztunnel access logs
    ambient demo [--keep]                                     the seed article's flow, end to end

Every command needs root. The prefix (default `amb`, env AMBIENT_LAB_PREFIX) starts every namespace name.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from rich.console import Console

from ambient.lab.tables import status_tables

DEFAULT_PREFIX = os.environ.get("AMBIENT_LAB_PREFIX", "amb")
COMPONENTS = ("ztunnel", "node-agent", "istiod")

console = Console(highlight=False)
err_console = Console(stderr=True, highlight=False)


def _progress(message: str) -> None:
    err_console.print(f"[bold cyan]•[/] {message}")


def _add_prefix(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--prefix",
        default=DEFAULT_PREFIX,
        help=f"namespace name prefix of the lab (default {DEFAULT_PREFIX}; env AMBIENT_LAB_PREFIX)",
    )


def register(subparsers: Any) -> None:
    """Add `lab`, `logs` and `demo` to the `ambient` command."""
    lab = subparsers.add_parser(
        "lab",
        help="a multi-node ambient lab in network namespaces (root)",
        description="Build, inspect and remove the local lab (DESIGN §6).",
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    lab.set_defaults(func=lambda args: (lab.print_help(), 2)[1])

    up = lab_sub.add_parser("up", help="build the lab and start everything")
    up.add_argument("--world", type=Path, default=None, help="world file (default examples/bookinfo.yaml)")
    up.add_argument("--nodes", type=int, default=None, help="lay the world's pods out over N nodes")
    up.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for each component")
    _add_prefix(up)
    up.set_defaults(func=cmd_up)

    down = lab_sub.add_parser("down", help="stop and remove everything `up` made")
    _add_prefix(down)
    down.set_defaults(func=cmd_down)

    status = lab_sub.add_parser("status", help="nodes, pods and services of the lab")
    status.add_argument("--json", action="store_true", help="machine-readable, with PIDs, logs, netns names")
    _add_prefix(status)
    status.set_defaults(func=cmd_status)

    ex = lab_sub.add_parser(
        "exec",
        help="run a command in a pod's network namespace",
        description="Run CMD inside POD's netns with its name resolution, like kubectl exec. "
        "POD is ns/name, name, a unique name prefix or an app label.",
    )
    ex.add_argument("pod")
    ex.add_argument("cmd", nargs=argparse.REMAINDER, help="-- CMD [ARGS...]")
    _add_prefix(ex)
    ex.set_defaults(func=cmd_exec)

    rm = lab_sub.add_parser(
        "delete", help="delete a pod: istiod forgets it, the node agent unenrols it, its netns goes"
    )
    rm.add_argument("pod")
    rm.add_argument("--timeout", type=float, default=30.0)
    _add_prefix(rm)
    rm.set_defaults(func=cmd_delete)

    wd = lab_sub.add_parser(
        "world",
        help="`ambient world ...` against the lab's istiod (e.g. policy add FILE)",
        description="Run `ambient world ARGS` inside the control-plane netns with the lab's credentials.",
    )
    wd.add_argument("args", nargs=argparse.REMAINDER, help="-- ARGS (see `ambient world --help`)")
    _add_prefix(wd)
    wd.set_defaults(func=cmd_world)

    rs = lab_sub.add_parser("restart", help="restart one component (all nodes unless NODE is given)")
    rs.add_argument("component", choices=COMPONENTS)
    rs.add_argument("node", nargs="?", default=None)
    rs.add_argument("--timeout", type=float, default=30.0)
    _add_prefix(rs)
    rs.set_defaults(func=cmd_restart)

    logs = subparsers.add_parser("logs", help="ztunnel access logs of the lab")
    logs.add_argument("node", nargs="?", default=None)
    logs.add_argument("--direction", choices=("inbound", "outbound"), default=None)
    _add_prefix(logs)
    logs.set_defaults(func=cmd_logs)

    demo = subparsers.add_parser("demo", help="run the seed article's flow in a fresh lab (root)")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    demo.add_argument("--prefix", default="demo", help="namespace name prefix (default demo)")
    demo.set_defaults(func=cmd_demo)


def cmd_up(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    state = lab.up(
        prefix=args.prefix, world_file=args.world, nodes=args.nodes, timeout=args.timeout, progress=_progress
    )
    console.print(
        f"[green]lab {state.prefix!r} is up[/]: {len(state.pods)} pods; "
        f"`ambient lab status --prefix {state.prefix}`, `ambient lab down --prefix {state.prefix}`"
    )
    return 0


def cmd_down(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    if lab.down(prefix=args.prefix, progress=_progress):
        console.print(f"lab {args.prefix!r} removed")
    else:
        console.print(f"no lab {args.prefix!r} is up; nothing to do")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    data = lab.status(prefix=args.prefix)
    if args.json:
        print(json.dumps(data, indent=2))
        return 0
    for table in status_tables(data):
        console.print(table)
    return 0


def cmd_exec(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    cmd = list(args.cmd)
    if cmd and cmd[0] == "--":
        cmd = cmd[1:]
    if not cmd:
        err_console.print("usage: ambient lab exec POD -- CMD [ARGS...]")
        return 2
    return lab.exec_in_pod(cmd, pod=args.pod, prefix=args.prefix).returncode


def cmd_delete(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    key = lab.delete_pod(args.pod, prefix=args.prefix, timeout=args.timeout, progress=_progress)
    console.print(f"pod {key} deleted")
    return 0


def cmd_world(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        err_console.print("usage: ambient lab world [--prefix P] -- COMMAND ... (e.g. policy add deny.yaml)")
        return 2
    return lab.world_command(rest, prefix=args.prefix).returncode


def cmd_restart(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    lab.restart(args.component, args.node, prefix=args.prefix, timeout=args.timeout, progress=_progress)
    return 0


def cmd_logs(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    for line in lab.access_logs(node=args.node, direction=args.direction, prefix=args.prefix):
        print(line)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from ambient.lab import demo

    return demo.run_demo(prefix=args.prefix, keep=args.keep, console=console, progress=_progress)


if __name__ == "__main__":  # pragma: no cover - `python -m ambient.lab.cli` for debugging
    parser = argparse.ArgumentParser(prog="ambient")
    register(parser.add_subparsers())
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
