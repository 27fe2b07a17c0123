"""`ambient zds serve|watch` (scripted ZDS peers for humans) and `ambient zds-conformance` (the kit).

This module only parses arguments and wires things together; the kit itself is ambient/conformance.py
and docs/zds-conformance.md describes its use and the client state-file interface.

    ambient zds serve --socket /tmp/zds.sock --workload pod1=ns1:web:default:web-sa [--keep pod2]
        node-agent role. The snapshot is the given workloads (NETNS: a name under /run/netns or a path);
        stdin lines `add UID=NETNS[:name[:namespace[:service_account]]]` and `del UID` send later changes.
    ambient zds watch --socket /tmp/zds.sock [--state-file F] [--fail-uid UID] [--fail-file F]
        ztunnel role: accepts every pod (except the ones told to fail), prints each event as a JSON line and
        keeps F up to date with the state-file interface.
    ambient zds-conformance [--server PATH | --server-cmd 'CMD {socket}'] [--client-cmd 'CMD {socket}']

Also runnable as `python -m ambient.zds ...` (same arguments as `ambient`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import trio

from ambient import conformance
from services.node_agent.zds_server import ZdsServer
from services.ztunnel.errors import ProxyStartError
from services.ztunnel.inpod.statemanager import RETRY_INTERVAL, WorkloadManager, write_state_file
from shared.errors import AmbientError
from shared.logs import LOG_FORMAT_HELP, log_format_from, setup_logging
from shared.netns import NetnsError, is_netns, netns_id, open_netns
from shared.zds.codec import close_fds
from shared.zds.errors import ZdsError
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo

T = TypeVar("T")

WORKLOAD_FORMAT = "UID=NETNS[:name[:namespace[:service_account]]]"


# --- shared helpers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkloadSpec:
    uid: PodUid
    netns: str
    info: WorkloadInfo


def parse_workload(text: str) -> WorkloadSpec:
    """`UID=NETNS[:name[:namespace[:service_account]]]`; name defaults to UID, the others to "default"."""
    uid, sep, rest = text.partition("=")
    parts = rest.split(":")
    if not sep or not uid or not parts[0] or len(parts) > 4:
        raise ValueError(f"workload {text!r} is not {WORKLOAD_FORMAT}")
    name, namespace, account = [*parts[1:], "", "", ""][:3]
    info = WorkloadInfo(
        name=name or uid, namespace=namespace or "default", service_account=account or "default"
    )
    return WorkloadSpec(PodUid(uid), parts[0], info)


def _workload_arg(text: str) -> WorkloadSpec:
    try:
        return parse_workload(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _say(obj: dict[str, Any] | str) -> None:
    line = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=False)
    print(line, flush=True)


def _setup_logging(verbose: bool, default: str = "warn") -> None:
    """Logs on stderr in the processes' one format (LOG_FORMAT=plain|json); raises AmbientError for a bad
    LOG_FORMAT."""
    try:
        log_format = log_format_from(os.environ)
    except ValueError as exc:
        raise AmbientError(str(exc)) from None
    setup_logging(json_format=log_format == "json", level="debug" if verbose else default, stream=sys.stderr)


def _run(prog: str, fn: Callable[[], Any]) -> int:
    """Run `fn` under trio; operator errors become one line on stderr and exit 1."""
    try:
        result = trio.run(fn)
    except KeyboardInterrupt:
        return 130
    except (AmbientError, NetnsError, OSError) as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except BaseExceptionGroup as group:
        leaves = _leaves(group)
        if not all(isinstance(e, AmbientError | NetnsError | OSError) for e in leaves):
            raise
        for leaf in leaves:
            print(f"{prog}: error: {leaf}", file=sys.stderr)
        return 1
    return int(result or 0)


def _leaves(group: BaseExceptionGroup[Any]) -> list[BaseException]:
    out: list[BaseException] = []
    for exc in group.exceptions:
        out.extend(_leaves(exc) if isinstance(exc, BaseExceptionGroup) else [exc])
    return out


async def _until_signal() -> None:
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for _ in signals:
            return


# --- ambient zds serve -------------------------------------------------------------------------------------


class _Snapshot:
    """The served pods; owns their netns fds (ZdsServer duplicates what it sends)."""

    def __init__(self) -> None:
        self.entries: dict[PodUid, SnapshotEntry] = {}

    def snapshot(self) -> list[SnapshotEntry]:
        return list(self.entries.values())

    def put(self, entry: SnapshotEntry) -> None:
        self.remove(entry.uid)
        self.entries[entry.uid] = entry

    def remove(self, uid: PodUid) -> None:
        old = self.entries.pop(uid, None)
        if old is not None and old.netns_fd is not None:
            close_fds([old.netns_fd])

    def close(self) -> None:
        for uid in list(self.entries):
            self.remove(uid)


def _open_spec(spec: WorkloadSpec) -> SnapshotEntry:
    fd = open_netns(spec.netns)
    return SnapshotEntry(uid=spec.uid, info=spec.info, netns_fd=fd)


def cmd_serve(args: argparse.Namespace) -> int:
    _setup_logging(args.verbose, "info")
    snap = _Snapshot()
    try:
        for spec in args.workload:
            snap.put(_open_spec(spec))
        for uid in args.keep:
            snap.put(SnapshotEntry(uid=PodUid(uid)))
    except NetnsError as exc:
        snap.close()
        print(f"ambient zds serve: error: {exc}", file=sys.stderr)
        return 1
    allowed = frozenset(args.allow_uid) if args.allow_uid else None
    server = ZdsServer(args.socket, snap, allowed_uids=allowed)

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            _say(f"serving ZDS on {args.socket}: {len(snap.entries)} workload(s) in the snapshot; "
                 "stdin: add UID=NETNS[:name[:namespace[:sa]]] | del UID | list")
            nursery.start_soon(_stdin_commands, server, snap)
            await _until_signal()
            nursery.cancel_scope.cancel()
        return 0

    try:
        return _run("ambient zds serve", main)
    finally:
        snap.close()


async def _stdin_commands(server: ZdsServer, snap: _Snapshot) -> None:
    stdin = sys.stdin
    if stdin is None:
        return
    while True:
        line = await trio.to_thread.run_sync(stdin.readline, abandon_on_cancel=True)
        if not line:
            return  # EOF: keep serving what we have
        words = line.split()
        if words:
            await _control(server, snap, words)


async def _control(server: ZdsServer, snap: _Snapshot, words: list[str]) -> None:
    match words:
        case ["add", text]:
            try:
                spec = parse_workload(text)
                entry = _open_spec(spec)
            except (ValueError, NetnsError) as exc:
                _say(f"add: error: {exc}")
                return
            snap.put(entry)
            assert entry.netns_fd is not None and entry.info is not None
            try:
                await server.add_workload(spec.uid, entry.info, entry.netns_fd)
            except ZdsError as exc:
                _say(f"add {spec.uid}: error: {exc}")
            else:
                _say(f"add {spec.uid}: ack")
        case ["del", uid]:
            snap.remove(PodUid(uid))
            count = server.connection_count
            await server.del_workload(PodUid(uid))
            _say(f"del {uid}: sent to {count} connection(s)")
        case ["list"]:
            for entry in snap.snapshot():
                kind = "add" if entry.netns_fd is not None else "keep"
                _say(f"{entry.uid}: {kind} {entry.info}")
            _say(f"connections: {server.connection_count}")
        case _:
            _say(f"unknown command {' '.join(words)!r}; use: add {WORKLOAD_FORMAT} | del UID | list")


# --- ambient zds watch -------------------------------------------------------------------------------------


class RecordingHandler:
    """A WorkloadHandler that starts nothing: it prints each event and fails the pods it is told to."""

    def __init__(self, fail_uids: frozenset[str], fail_file: str | None) -> None:
        self.fail_uids = fail_uids
        self.fail_file = fail_file

    def _should_fail(self, uid: str) -> bool:
        if uid in self.fail_uids:
            return True
        if self.fail_file is None:
            return False
        try:
            listed = Path(self.fail_file).read_text().split()
        except OSError:
            return False
        return uid in listed

    async def start_workload(self, uid: PodUid, info: WorkloadInfo, netns_fd: int, *,
                             on_exit: Callable[[], None]) -> None:
        if self._should_fail(uid):
            _say({"event": "start_failed", "uid": uid})
            raise ProxyStartError(f"pod {uid}: start refused on request (--fail-uid/--fail-file)")
        ino, dev = netns_id(netns_fd)
        _say({
            "event": "start", "uid": uid, "name": info.name, "namespace": info.namespace,
            "service_account": info.service_account, "netns": {"ino": ino, "dev": dev},
            "is_netns": is_netns(netns_fd),
        })

    async def stop_workload(self, uid: PodUid) -> None:
        _say({"event": "stop", "uid": uid})


class _Observer:
    """on_change of the manager: prints connection-level events."""

    def __init__(self) -> None:
        self.last: tuple[bool, bool, bool] = (False, False, False)

    def __call__(self, m: WorkloadManager) -> None:
        now = (m.connected, m.snapshot_received, m.ready)
        if now[0] != self.last[0]:
            _say({"event": "connected", "connection": m.connections} if now[0] else {"event": "disconnected"})
        if now[1] and not self.last[1]:
            _say({"event": "snapshot_received"})
        if now[2] != self.last[2]:
            _say({"event": "ready" if now[2] else "not_ready"})
        self.last = now


def cmd_watch(args: argparse.Namespace) -> int:
    from services.ztunnel.inpod.zds_client import run_zds_client

    _setup_logging(args.verbose)
    handler = RecordingHandler(frozenset(args.fail_uid), args.fail_file)
    manager = WorkloadManager(handler, state_file=args.state_file, on_change=_Observer())
    if args.state_file is not None:
        try:
            write_state_file(args.state_file, manager.state())
        except OSError as exc:
            print(f"ambient zds watch: error: cannot write state file {args.state_file}: {exc.strerror}",
                  file=sys.stderr)
            return 1

    async def main() -> int:
        async with trio.open_nursery() as nursery:
            await nursery.start(lambda task_status: run_zds_client(
                args.socket, manager, retry_interval=args.retry_interval, task_status=task_status))
            await _until_signal()
            nursery.cancel_scope.cancel()
        return 0

    return _run("ambient zds watch", main)


# --- ambient zds-conformance -------------------------------------------------------------------------------


def cmd_conformance(args: argparse.Namespace) -> int:
    prog = "ambient zds-conformance"
    if args.server and args.server_cmd:
        print(f"{prog}: error: give --server or --server-cmd, not both", file=sys.stderr)
        return 2
    if not (args.server or args.server_cmd or args.client_cmd):
        print(f"{prog}: error: nothing to check: give --server PATH, --server-cmd CMD or --client-cmd CMD",
              file=sys.stderr)
        return 2
    if args.server and not os.path.exists(args.server):
        print(f"{prog}: error: {args.server} does not exist (is the ZDS server running?)", file=sys.stderr)
        return 1
    _setup_logging(args.verbose)
    runs: list[tuple[str, conformance.KitRun]] = []

    async def main() -> None:
        with tempfile.TemporaryDirectory(prefix="zds-conformance-") as tmp:
            if args.server or args.server_cmd:
                workdir = Path(tmp, "server")
                os.mkdir(workdir)
                opts = conformance.ServerOptions(
                    socket_path=args.server, command=args.server_cmd, env=args.server_env,
                    timeout=args.timeout, keepalive_timeout=args.keepalive_timeout, pacing=args.pacing,
                )
                runs.append(("server", await conformance.run_server_kit(opts, workdir)))
            if args.client_cmd:
                workdir = Path(tmp, "client")
                os.mkdir(workdir)
                copts = conformance.ClientOptions(
                    command=args.client_cmd, env=args.client_env, netns=args.netns,
                    timeout=args.timeout, retry_timeout=args.retry_timeout, observe=args.observe,
                )
                runs.append(("client", await conformance.run_client_kit(copts, workdir)))

    code = _run(prog, main)
    if code:
        return code
    results = [r for _, run in runs for r in run.results]
    failed = any(r.status is conformance.Status.FAIL for r in results)
    if args.json:
        _say(json.dumps([msgspec.to_builtins(r) for r in results]))
    else:
        conformance.render(results)
    if failed:
        for role, run in runs:
            if run.log_tail and any(r.status is conformance.Status.FAIL for r in run.results):
                print(f"--- last output of the {role} under test ---\n{run.log_tail}", file=sys.stderr)
    return 1 if failed else 0


# --- registration ------------------------------------------------------------------------------------------


def register(subparsers: Any) -> None:
    """Add `zds serve`, `zds watch` and `zds-conformance` to the `ambient` CLI."""
    zds = subparsers.add_parser("zds", help="scripted ZDS peers: serve (node agent), watch (ztunnel)")
    zds_sub = zds.add_subparsers(dest="zds_command", metavar="COMMAND")

    def zds_help(_args: argparse.Namespace) -> int:
        zds.print_help()
        return 2

    zds.set_defaults(func=zds_help)

    serve = zds_sub.add_parser(
        "serve", help="node-agent role: serve a snapshot of workloads, take add/del lines on stdin",
        description="Serve ZDS like istio-cni's node agent. The snapshot is the --workload/--keep pods; "
        f"stdin lines 'add {WORKLOAD_FORMAT}' and 'del UID' send later changes and print the answer.",
        epilog=LOG_FORMAT_HELP,
    )
    serve.add_argument("--socket", required=True, metavar="PATH", help="socket path to listen on")
    serve.add_argument("--workload", action="append", default=[], type=_workload_arg, metavar=WORKLOAD_FORMAT,
                       help="a pod sent as add with its netns (name under /run/netns, or a path); repeatable")
    serve.add_argument("--keep", action="append", default=[], metavar="UID",
                       help="a pod without a known netns, sent as keep; repeatable")
    serve.add_argument("--allow-uid", action="append", type=int, metavar="UID",
                       help="peer uid allowed to connect (default: our own); repeatable")
    serve.add_argument("-v", "--verbose", action="store_true")
    serve.set_defaults(func=cmd_serve)

    watch = zds_sub.add_parser(
        "watch", help="ztunnel role: connect, ack, print events as JSON lines",
        description="Connect to a ZDS server like ztunnel, accept every pod (start nothing) and print each "
        "event as a JSON line. --state-file keeps the conformance kit's state interface up to date.",
        epilog=LOG_FORMAT_HELP,
    )
    watch.add_argument("--socket", required=True, metavar="PATH", help="the node agent's socket (INPOD_UDS)")
    watch.add_argument("--state-file", metavar="FILE", help="rewrite FILE with the JSON state on each change")
    watch.add_argument("--fail-uid", action="append", default=[], metavar="UID",
                       help="make this pod's proxy start fail (NACK 'failure to start proxy'); repeatable")
    watch.add_argument("--fail-file", metavar="FILE",
                       help="pods listed in FILE (one uid per line) fail to start while listed")
    watch.add_argument("--retry-interval", type=_positive_float, default=RETRY_INTERVAL, metavar="SECONDS",
                       help=f"retry failed pods this often (default {RETRY_INTERVAL:g}, as upstream)")
    watch.add_argument("-v", "--verbose", action="store_true")
    watch.set_defaults(func=cmd_watch)

    conf = subparsers.add_parser(
        "zds-conformance", help="check a ZDS server and/or client against the 19 conformance cases",
        description="Run the ZDS conformance cases against a server (--server/--server-cmd) and/or a client "
        "(--client-cmd). Prints a pass/fail table; exits 1 if a case fails. See docs/zds-conformance.md.",
        epilog=LOG_FORMAT_HELP,
    )
    conf.add_argument("--server", metavar="PATH", help="socket of a running ZDS server to check")
    conf.add_argument("--server-cmd", metavar="CMD",
                      help="start this server ('{socket}' is replaced); it must take add/del lines on stdin "
                      "like 'ambient zds serve' (needed for case 18)")
    conf.add_argument("--server-env", action="append", default=[], metavar="KEY=VALUE")
    conf.add_argument("--client-cmd", metavar="CMD",
                      help="start this client; placeholders {socket} {state} {fail_file} {fail_uid}")
    conf.add_argument("--client-env", action="append", default=[], metavar="KEY=VALUE",
                      help="environment for the client (placeholders allowed), e.g. INPOD_UDS={socket}")
    conf.add_argument("--netns", choices=("auto", "real", "pipe"), default="auto",
                      help="netns fds for the client: real namespaces (root), pipes, auto (real when root)")
    conf.add_argument("--observe", choices=(conformance.OBSERVE_STATE_FILE, conformance.OBSERVE_ADMIN),
                      default=conformance.OBSERVE_STATE_FILE,
                      help="client role: read the client's state from its {state} file (default), or from "
                      "upstream ztunnel's own surfaces, /config_dump workloadState on 127.0.0.1:15000 and "
                      "/healthz/ready on 15021, with the client run in a namespace of the kit's (root)")
    conf.add_argument("--timeout", type=_positive_float, default=10.0, metavar="SECONDS",
                      help="how long to wait for each expected event (default 10)")
    conf.add_argument("--retry-timeout", type=_positive_float, default=15.0, metavar="SECONDS",
                      help="how long to wait for a failed pod's retry to succeed (default 15)")
    conf.add_argument("--keepalive-timeout", type=_positive_float, default=12.0, metavar="SECONDS",
                      help="how long a server may take to notice an unsolicited datagram (default 12)")
    conf.add_argument("--pacing", type=_positive_float, default=0.2, metavar="SECONDS",
                      help="server role: wait this long for a stray datagram before answering (default 0.2)")
    conf.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    conf.add_argument("-v", "--verbose", action="store_true")
    conf.set_defaults(func=cmd_conformance)


if __name__ == "__main__":
    from ambient.cli import main

    main()
