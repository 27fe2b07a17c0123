"""`ambient lab ...`, `ambient logs` and `ambient demo`: the local stack in network namespaces.

    ambient lab up [--world FILE] [--nodes N] [--prefix P]    build the lab and start everything in it
        [--ztunnel-bin PATH [--on NODE ...]]                  upstream's ztunnel (a build of istio/ztunnel)
    ambient lab down [--prefix P]                             stop and remove exactly what `up` made
    ambient lab status [--json] [--prefix P]                  nodes, pods (IP, node, enrolment: the pod's
                                                              ambient.istio.io/redirection), services
    ambient lab exec POD -- CMD ...                           run CMD in a pod's netns, its exit code
    ambient lab restart COMPONENT [NODE]                      restart ztunnel, node-agent, istiod or waypoint
                                                              (--kubernetes: also kube-apiserver, kubelet)
    ambient lab delete POD                                    delete a pod (unenrolled, then removed)
    ambient lab verify [--node N] [--json]                    each node agent checks its pods' rules and
                                                              ztunnel listeners now, repairs drift; exit 1
                                                              if a pod is still broken
    ambient lab world -- ARGS ...                             `ambient world ARGS` against the lab's istiod
    ambient lab up --kubernetes                               with a Kubernetes API server (etcd +
                                                              kube-apiserver); pods, labels, policies from it
    ambient lab kubectl -- ARGS ...                           kubectl against that API server
    ambient logs [NODE] [--direction inbound|outbound]        ztunnel access logs
    ambient demo [--keep]                                     the seed article's flow, end to end

Every command needs root. The prefix (default `amb`, env AMBIENT_LAB_PREFIX) starts every namespace name.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ambient.lab.errors import LabError
from ambient.lab.tables import status_tables, verify_failed, verify_table
from ambient.output import make_console

DEFAULT_PREFIX = os.environ.get("AMBIENT_LAB_PREFIX", "amb")
COMPONENTS = ("ztunnel", "node-agent", "istiod", "waypoint", "kube-apiserver", "kubelet")

console = make_console()  # piped output is never wrapped
err_console = make_console(stderr=True)


LAB_DESCRIPTION = """\
Build, inspect and remove the local lab: a multi-node ambient cluster made of network namespaces on this
host. A fabric namespace joins the nodes (one namespace each, with a bridge for its pods); istiod runs in a
control-plane namespace; each node runs a node agent and a ztunnel; each pod is a namespace with a veth into
its node's bridge, enrolled by the node agent through a CNI ADD, running its app. Everything it makes is
recorded in /run/ambient-lab/PREFIX/state.json first, so `down` removes exactly that.
More in ambient/lab/README.md."""

POD_ADD_REFUSED = (
    "`lab world -- pod add` is refused: istiod would record the pod, but nothing would start it in the lab "
    "(a pod needs a network namespace, a veth into its node, a CNI ADD to the node agent and its app). "
    "To run another pod, add it to a copy of the world file and start a lab from it: "
    "`ambient lab up --world FILE --prefix NEW` (or `lab down` first and reuse the prefix)"
)


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
        description=LAB_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    lab_sub = lab.add_subparsers(dest="lab_command", metavar="COMMAND")
    lab.set_defaults(func=lambda args: (lab.print_help(), 2)[1])

    up = lab_sub.add_parser(
        "up",
        help="build the lab and start everything",
        description="Build the lab from a world file and start everything in it: the fabric and node "
        "namespaces, istiod, per node the node agent and ztunnel, then every pod (netns, veth, CNI ADD to "
        "the node agent, its app), and wait until every ambient pod is enrolled. A failure, Ctrl-C or "
        "SIGTERM removes everything made so far.",
    )
    up.add_argument("--world", type=Path, default=None, help="world file (default examples/bookinfo.yaml)")
    up.add_argument(
        "--nodes",
        type=int,
        default=None,
        metavar="N",
        help="lay the world's pods out over N nodes (1-26); pods keep their address where it fits the new "
        "node, and `up` says which were re-addressed and which policies that affects",
    )
    up.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for each component (default 30)"
    )
    up.add_argument(
        "--ztunnel-bin",
        type=Path,
        default=None,
        metavar="PATH",
        help="run this ztunnel binary (a build of istio/ztunnel) instead of ours, configured through its own "
        "settings (INPOD_UDS, XDS_ADDRESS, CA_ADDRESS, ...); see ambient/lab/README.md",
    )
    up.add_argument(
        "--kubernetes",
        action="store_true",
        help="also run etcd and kube-apiserver (built by scripts/build-kube) in the control-plane namespace, "
        "load the world into it as Kubernetes objects and run the node agents and istiod from it "
        "(`ambient lab kubectl -- ...` then labels namespaces, applies and deletes pods)",
    )
    up.add_argument(
        "--on",
        action="append",
        default=None,
        metavar="NODE",
        help="with --ztunnel-bin: only on this node (repeatable; default every node)",
    )
    _add_prefix(up)
    up.set_defaults(func=cmd_up)

    down = lab_sub.add_parser(
        "down",
        help="stop and remove everything `up` made",
        description="Stop the lab's processes and remove its namespaces, files and run directory: exactly "
        "what `up` recorded in the lab's state file, nothing else.",
    )
    _add_prefix(down)
    down.set_defaults(func=cmd_down)

    status = lab_sub.add_parser(
        "status",
        help="nodes, pods and services of the lab",
        description="The lab's nodes, its pods (IP, node, app label, enrolment: the pod's "
        "ambient.istio.io/redirection annotation as istiod has it), services and component processes.",
    )
    status.add_argument("--json", action="store_true", help="machine-readable, with PIDs, logs, netns names")
    _add_prefix(status)
    status.set_defaults(func=cmd_status)

    ex = lab_sub.add_parser(
        "exec",
        help="run a command in a pod's network namespace",
        description="Run CMD inside POD's netns with its name resolution, like kubectl exec. "
        "POD is ns/name, name, a unique name prefix or an app label.",
    )
    ex.add_argument("pod", metavar="POD", help="ns/name, name, a unique name prefix or an app label")
    ex.add_argument(
        "cmd",
        nargs=argparse.REMAINDER,
        help="-- CMD [ARGS...]; exit code CMD's (127: not found, 126: not executable)",
    )
    _add_prefix(ex)
    ex.set_defaults(func=cmd_exec)

    rm = lab_sub.add_parser(
        "delete",
        help="delete a pod: istiod forgets it, the node agent unenrols it, its netns goes",
        description="Delete a pod as Kubernetes does: istiod forgets it first (the node agent's pod watch "
        "unenrols it and ztunnel lets it go), then its app is stopped and its netns removed. Afterwards "
        "`lab exec` and `lab status` know it as deleted. In a `--kubernetes` lab the pod is deleted through "
        "the API server (`kubectl delete pod`), and the lab's kubelet removes it.",
    )
    rm.add_argument("pod", metavar="POD", help="ns/name, name, a unique name prefix or an app label")
    rm.add_argument(
        "--timeout",
        type=float,
        default=30.0,
        help="seconds to wait for ztunnel to let the pod go (default 30)",
    )
    _add_prefix(rm)
    rm.set_defaults(func=cmd_delete)

    vf = lab_sub.add_parser(
        "verify",
        help="have the node agents verify and repair their pods' redirection now",
        description="Ask each node agent (POST /verify on its health server) to check now, for every pod "
        "it enrolled, that the pod's redirection rules are the ones it rendered and that ztunnel's "
        "listeners are bound in the pod by ztunnel's own process, and to repair what differs (rules "
        "re-applied, the pod re-sent to ztunnel). Prints one row per pod: checks, drift found, repair, "
        "result. Exit 1 when a node agent does not answer or a pod is still broken after the repair.",
    )
    vf.add_argument("--node", default=None, metavar="NODE", help="only this node's agent (default all)")
    vf.add_argument("--json", action="store_true", help="the node agents' answers as JSON")
    _add_prefix(vf)
    vf.set_defaults(func=cmd_verify)

    wd = lab_sub.add_parser(
        "world",
        help="`ambient world ...` against the lab's istiod (e.g. policy add FILE)",
        description="Run `ambient world ARGS` inside the control-plane netns with the lab's credentials. "
        "`pod add` is refused: istiod would record the pod, but nothing would start it in the lab (a pod "
        "needs a netns, a veth, a CNI ADD and its app); add it to a world file and `lab up --world FILE`. "
        "A `--kubernetes` lab's world is its API server's: only `show` works there (`lab kubectl` changes "
        "it).",
    )
    wd.add_argument("args", nargs=argparse.REMAINDER, help="-- ARGS (see `ambient world --help`)")
    _add_prefix(wd)
    wd.set_defaults(func=cmd_world)

    kc = lab_sub.add_parser(
        "kubectl",
        help="kubectl against the lab's Kubernetes API server (`lab up --kubernetes`)",
        description="Run kubectl ARGS with the lab's kubeconfig, inside the control-plane namespace (where "
        "its API server listens); exit code kubectl's. For example: "
        "`ambient lab kubectl -- label namespace bookinfo istio.io/dataplane-mode=ambient`.",
    )
    kc.add_argument("args", nargs=argparse.REMAINDER, help="-- ARGS (see `kubectl --help`)")
    _add_prefix(kc)
    kc.set_defaults(func=cmd_kubectl)

    rs = lab_sub.add_parser(
        "restart",
        help="restart one component (all nodes unless NODE is given)",
        description="Stop and start ztunnel, the node agent, istiod or the waypoints (on every node, or on "
        "NODE), wait until it is ready and ztunnel holds the node's ambient pods again. A `--kubernetes` "
        "lab can also restart its kube-apiserver (etcd keeps the objects; the watchers resume) or its "
        "kubelet.",
    )
    rs.add_argument("component", choices=COMPONENTS, help="which component")
    rs.add_argument("node", nargs="?", default=None, metavar="NODE", help="only on this node (default all)")
    rs.add_argument(
        "--timeout", type=float, default=30.0, help="seconds to wait for it to be ready (default 30)"
    )
    _add_prefix(rs)
    rs.set_defaults(func=cmd_restart)

    logs = subparsers.add_parser("logs", help="ztunnel access logs of the lab")
    logs.add_argument("node", nargs="?", default=None, metavar="NODE", help="only this node's ztunnel")
    logs.add_argument(
        "--direction", choices=("inbound", "outbound"), default=None, help="only this direction's lines"
    )
    _add_prefix(logs)
    logs.set_defaults(func=cmd_logs)

    demo = subparsers.add_parser("demo", help="run the seed article's flow in a fresh lab (root)")
    demo.add_argument("--keep", action="store_true", help="leave the lab up afterwards")
    demo.add_argument("--prefix", default="demo", help="namespace name prefix (default demo)")
    demo.set_defaults(func=cmd_demo)


@contextlib.contextmanager
def sigterm_rolls_back() -> Iterator[None]:
    """Within: SIGTERM stops the command the way Ctrl-C does, as an exception (`up` then removes what it
    made), and the process exits 143 (128 + SIGTERM). A second SIGTERM during that clean-up is ignored."""

    def terminate(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_up(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    with sigterm_rolls_back():
        state = lab.up(
            prefix=args.prefix,
            world_file=args.world,
            nodes=args.nodes,
            timeout=args.timeout,
            progress=_progress,
            ztunnel_bin=args.ztunnel_bin,
            upstream_on=args.on,
            kubernetes=args.kubernetes,
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

    prefix, cmd = exec_options(args.prefix, list(args.cmd))
    if not cmd:
        err_console.print("usage: ambient lab exec [--prefix P] POD [--prefix P] -- CMD [ARGS...]")
        return 2
    return lab.exec_in_pod(cmd, pod=args.pod, prefix=prefix).returncode


def exec_options(prefix: str, rest: list[str]) -> tuple[str, list[str]]:
    """`lab exec`'s options given after POD (argparse hands them over inside the command), and the command.

    Only `--prefix` may stand between POD and `--`; anything else there is refused, never run as the command.
    """
    if not rest or not rest[0].startswith("-") or "--" not in rest:
        return prefix, rest  # `lab exec POD CMD ...` without options or separator: all of it is the command
    split = rest.index("--")
    options, cmd = rest[:split], rest[split + 1:]
    parser = argparse.ArgumentParser(prog="ambient lab exec POD", add_help=False)
    parser.add_argument("--prefix", default=prefix)
    return parser.parse_args(options).prefix, cmd


def cmd_delete(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    key = lab.delete_pod(args.pod, prefix=args.prefix, timeout=args.timeout, progress=_progress)
    console.print(f"pod {key} deleted")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    nodes = lab.verify(node=args.node, prefix=args.prefix)
    if args.json:
        print(json.dumps(nodes, indent=2))
    else:
        console.print(verify_table(nodes))
    return 1 if verify_failed(nodes) else 0


def _passed_on(args: argparse.Namespace, usage: str) -> list[str] | None:
    """The arguments after `--` for the command a lab command runs; None (usage printed) if there are none."""
    rest = list(args.args)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if not rest:
        err_console.print(usage)
        return None
    return rest


def cmd_world(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    usage = "usage: ambient lab world [--prefix P] -- COMMAND ... (e.g. policy add deny.yaml)"
    rest = _passed_on(args, usage)
    if rest is None:
        return 2
    if rest[:2] == ["pod", "add"]:
        raise LabError(POD_ADD_REFUSED)
    return lab.world_command(rest, prefix=args.prefix).returncode


def cmd_kubectl(args: argparse.Namespace) -> int:
    from ambient.lab import lab

    rest = _passed_on(args, "usage: ambient lab kubectl [--prefix P] -- ARGS ... (e.g. get pods -A)")
    if rest is None:
        return 2
    return lab.kubectl_command(rest, prefix=args.prefix).returncode


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

    with sigterm_rolls_back():
        return demo.run_demo(prefix=args.prefix, keep=args.keep, console=console, progress=_progress)


if __name__ == "__main__":  # pragma: no cover - `python -m ambient.lab.cli` for debugging
    parser = argparse.ArgumentParser(prog="ambient")
    register(parser.add_subparsers())
    ns = parser.parse_args()
    sys.exit(ns.func(ns))
