"""`ambient world ...`: change the istiod stub's world through its WorldAdmin API.

    ambient world apply FILE                      replace the whole world (YAML/JSON, validated by the stub)
    ambient world show                            print the current world as JSON
    ambient world pod add NS/NAME --node N --ip IP [--ip IP] [--sa SA] [--label k=v ...]
                          [--annotation k=v ...] [--workload DEPLOYMENT] [--uid UID] [--host-network]
    ambient world pod rm NS/NAME
    ambient world label pod NS/NAME k=v k2-       set k, remove k2 (kubectl style)
    ambient world label namespace NAME k=v k2-
    ambient world policy add FILE                 one policy (world-file policy schema, YAML/JSON; with
                                                  targetRefs: an L7 policy for the waypoint)
    ambient world policy rm NS/NAME

Connection (flags or env): --istiod HOST:PORT (AMBIENT_ISTIOD, default 127.0.0.1:15012); --state-dir DIR
(AMBIENT_ISTIOD_STATE, default .istiod-state) supplies root-cert.pem and admin.token, or give --ca-cert FILE /
--token-file FILE / --plaintext explicitly. Every change is atomic: the stub applies all of it or none and
says what is wrong.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

import msgspec
import trio

from shared.addr import AddressError, split_host_port
from shared.errors import AmbientError

DEFAULT_ISTIOD = "127.0.0.1:15012"
DEFAULT_STATE_DIR = ".istiod-state"


class WorldCliError(AmbientError):
    """Bad arguments or unreadable files for `ambient world`."""


def _split_key(text: str, what: str) -> tuple[str, str]:
    ns, sep, name = text.partition("/")
    if not sep or not ns or not name:
        raise WorldCliError(f"{what} {text!r} must be NAMESPACE/NAME")
    return ns, name


def _labels(items: list[str]) -> tuple[dict[str, str], list[str]]:
    set_: dict[str, str] = {}
    remove: list[str] = []
    for item in items:
        if "=" in item:
            key, _, value = item.partition("=")
            if not key:
                raise WorldCliError(f"label {item!r} has an empty key")
            set_[key] = value
        elif item.endswith("-") and len(item) > 1:
            remove.append(item[:-1])
        else:
            raise WorldCliError(f"label {item!r} must be KEY=VALUE (set) or KEY- (remove)")
    return set_, remove


def _read(path: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise WorldCliError(f"cannot read {path}: {exc.strerror}") from None


def _to_json(data: bytes, source: str) -> bytes:
    """A YAML or JSON document as JSON bytes (the stub validates the content)."""
    try:
        value = msgspec.yaml.decode(data)
    except msgspec.DecodeError as exc:
        raise WorldCliError(f"{source}: not valid YAML/JSON: {exc}") from None
    return msgspec.json.encode(value)


def _target(args: argparse.Namespace) -> Any:
    from shared.aio import GrpcTarget

    try:
        host, port = split_host_port(args.istiod)
    except AddressError:
        raise WorldCliError(f"--istiod {args.istiod!r} is not HOST:PORT") from None
    state = Path(args.state_dir)
    root = None
    if not args.plaintext:
        ca_path = Path(args.ca_cert) if args.ca_cert else state / "root-cert.pem"
        try:
            root = ca_path.read_text()
        except OSError as exc:
            raise WorldCliError(
                f"cannot read the stub's root certificate {ca_path} ({exc.strerror}); "
                "pass --ca-cert or --state-dir"
            ) from None
    token = args.token
    if token is None:
        token_path = Path(args.token_file) if args.token_file else state / "admin.token"
        try:
            token = token_path.read_text().strip()
        except OSError:
            if args.token_file:
                raise WorldCliError(f"cannot read the admin token file {token_path}") from None
            token = None
    return GrpcTarget(host=host, port=port, root_cert_pem=root, token=token)


async def _call(args: argparse.Namespace, method: str, request: Any) -> Any:
    from services.istiod.server import MAX_REQUEST_SIZE
    from shared.aio import open_target
    from shared.api import worldadmin_grpc

    target = _target(args)
    with trio.fail_after(args.timeout):
        # The answer may carry the whole world: the stub's own bound applies.
        async with open_target(target, max_message_size=MAX_REQUEST_SIZE) as channel:
            return await channel.unary(
                worldadmin_grpc.WorldAdminStub, method, request, metadata=target.call_metadata()
            )


def _run(args: argparse.Namespace, method: str, request: Any) -> Any:
    try:
        return trio.run(_call, args, method, request)
    except trio.TooSlowError:
        raise WorldCliError(
            f"the istiod stub at {args.istiod} did not answer within {args.timeout}s"
        ) from None


def _done(response: Any) -> int:
    print(f"ok: world generation {response.generation}")
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    request = worldadmin_pb2.ApplyWorldRequest(document=_read(args.file), source=args.file)
    return _done(_run(args, "ApplyWorld", request))


def cmd_show(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    response = _run(args, "GetWorld", worldadmin_pb2.GetWorldRequest())
    print(json.dumps(json.loads(response.world_json), indent=2))
    return 0


def cmd_pod_add(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    namespace, name = _split_key(args.pod, "pod")
    labels, removed = _labels(args.label)
    annotations, _ = _labels(args.annotation)
    if removed:
        raise WorldCliError("`pod add` only sets labels (KEY=VALUE)")
    pod: dict[str, Any] = {
        "name": name,
        "namespace": namespace,
        "node": args.node,
        "ips": args.ip,
        "serviceAccount": args.sa,
        "labels": labels,
        "annotations": annotations,
        "hostNetwork": args.host_network,
    }
    if args.uid:
        pod["uid"] = args.uid
    if args.workload:
        pod["workload"] = args.workload
    return _done(_run(args, "AddPod", worldadmin_pb2.AddPodRequest(pod_json=json.dumps(pod).encode())))


def cmd_pod_rm(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    namespace, name = _split_key(args.pod, "pod")
    return _done(_run(args, "RemovePod", worldadmin_pb2.RemovePodRequest(namespace=namespace, name=name)))


def cmd_label(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    set_, remove = _labels(args.labels)
    if not set_ and not remove:
        raise WorldCliError("give at least one KEY=VALUE or KEY-")
    if args.kind == "namespace":
        request = worldadmin_pb2.SetLabelsRequest(
            kind=worldadmin_pb2.SetLabelsRequest.NAMESPACE, name=args.target, set=set_, remove=remove
        )
    else:
        namespace, name = _split_key(args.target, "pod")
        request = worldadmin_pb2.SetLabelsRequest(
            kind=worldadmin_pb2.SetLabelsRequest.POD, namespace=namespace, name=name, set=set_, remove=remove
        )
    return _done(_run(args, "SetLabels", request))


def cmd_policy_add(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    body = _to_json(_read(args.file), args.file)
    return _done(_run(args, "AddPolicy", worldadmin_pb2.AddPolicyRequest(policy_json=body)))


def cmd_policy_rm(args: argparse.Namespace) -> int:
    from shared.api import worldadmin_pb2

    namespace, name = _split_key(args.policy, "policy")
    return _done(
        _run(args, "RemovePolicy", worldadmin_pb2.RemovePolicyRequest(namespace=namespace, name=name))
    )


def register(subparsers: Any) -> None:
    """Add `ambient world ...` to the operator CLI."""
    world = subparsers.add_parser(
        "world", help="change the istiod stub's world", description=(__doc__ or "").split("\n\n")[0]
    )
    world.add_argument("--istiod", default=os.environ.get("AMBIENT_ISTIOD", DEFAULT_ISTIOD), help="HOST:PORT")
    world.add_argument("--state-dir", default=os.environ.get("AMBIENT_ISTIOD_STATE", DEFAULT_STATE_DIR))
    world.add_argument("--ca-cert", help="root certificate (default STATE_DIR/root-cert.pem)")
    world.add_argument("--token", default=os.environ.get("AMBIENT_ISTIOD_TOKEN"), help="admin token")
    world.add_argument("--token-file", help="admin token file (default STATE_DIR/admin.token)")
    world.add_argument("--plaintext", action="store_true", help="the stub runs without TLS")
    world.add_argument("--timeout", type=float, default=10.0, help="seconds (default 10)")
    sub = world.add_subparsers(dest="world_command", metavar="COMMAND", required=True)

    p = sub.add_parser("apply", help="replace the world with FILE")
    p.add_argument("file")
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("show", help="print the current world (JSON)")
    p.set_defaults(func=cmd_show)

    pod = sub.add_parser("pod", help="add or remove a pod").add_subparsers(dest="pod_command", required=True)
    p = pod.add_parser("add", help="add (or replace) a pod")
    p.add_argument("pod", metavar="NS/NAME")
    p.add_argument("--node", required=True)
    p.add_argument("--ip", action="append", required=True, help="pod IP (repeat for more)")
    p.add_argument("--sa", default="default", help="service account")
    p.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--annotation", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--workload", help="owning deployment name")
    p.add_argument("--uid", help="Kubernetes pod uid (default: derived from NS/NAME)")
    p.add_argument("--host-network", action="store_true")
    p.set_defaults(func=cmd_pod_add)
    p = pod.add_parser("rm", help="remove a pod")
    p.add_argument("pod", metavar="NS/NAME")
    p.set_defaults(func=cmd_pod_rm)

    p = sub.add_parser("label", help="set (KEY=VALUE) or remove (KEY-) labels of a pod or namespace")
    p.add_argument("kind", choices=["pod", "namespace"])
    p.add_argument("target", metavar="NS/NAME|NAMESPACE")
    p.add_argument("labels", nargs="+", metavar="KEY=VALUE|KEY-")
    p.set_defaults(func=cmd_label)

    policy = sub.add_parser("policy", help="add or remove an authorization policy").add_subparsers(
        dest="policy_command", required=True
    )
    p = policy.add_parser("add", help="add (or replace) the policy in FILE")
    p.add_argument("file")
    p.set_defaults(func=cmd_policy_add)
    p = policy.add_parser("rm", help="remove a policy")
    p.add_argument("policy", metavar="NS/NAME")
    p.set_defaults(func=cmd_policy_rm)


if __name__ == "__main__":
    from ambient.cli import main

    main(["world", *sys.argv[1:]])
