"""The ZDS conformance kit against our own peers: `ambient zds serve` (server role) and `ambient zds watch`
(client role), through the CLI as CI runs it and in-process; plus checks that the kit's own wire encoder
matches upstream's ZDS byte fixtures and that the kit fails a server that breaks the rules."""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from ambient import conformance
from ambient.conformance import ClientOptions, ServerOptions, Status
from services.node_agent.zds_server import ZdsServer
from shared.zds.codec import encode_ack, encode_request
from shared.zds.transport import bind_server_socket, recv_datagram, send_datagram
from shared.zds.types import DelWorkload, PodUid, SnapshotEntry, WorkloadInfo

REPO = Path(__file__).resolve().parents[2]
PY = shlex.quote(sys.executable)
AMBIENT = f"{PY} -m ambient.zds"
WATCH = f"{AMBIENT} zds watch --socket {{socket}} --state-file {{state}}"
SERVE = (
    f"{AMBIENT} zds serve --socket {{socket}} --keep pod-2"
    " --workload pod-1=/proc/self/ns/net:web:default:web-sa"
)


def run_kit(*args: str) -> tuple[int, list[dict[str, Any]], str]:
    proc = subprocess.run(
        [sys.executable, "-m", "ambient.zds", "zds-conformance", "--json", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, check=False,
    )
    results = json.loads(proc.stdout) if proc.stdout.strip() else []
    return proc.returncode, results, proc.stderr


def verdicts(results: list[dict[str, Any]]) -> dict[tuple[str, int], str]:
    return {(r["role"], r["number"]): r["status"] for r in results}


# --- the kit's wire encoder equals upstream's byte fixtures (and our codec) -------------------------------


def test_kit_encoder_matches_spec_fixtures() -> None:
    fixtures = {"08 01": conformance.HELLO_V1, "0a 00": conformance.ACK, "1a 00": conformance.SNAPSHOT_SENT}
    for hex_bytes, encoded in fixtures.items():
        assert encoded == bytes.fromhex(hex_bytes)
    assert conformance.wire_nack("x") == bytes.fromhex("0a 03 0a 01 78")
    assert conformance.wire_del("abc") == bytes.fromhex("12 05 12 03 61 62 63")
    assert conformance.wire_keep("abc") == bytes.fromhex("2a 05 0a 03 61 62 63")
    assert conformance.wire_add("u", ("n", "ns", "sa")) == bytes.fromhex(
        "0a 10 0a 01 75 12 0b 0a 01 6e 12 02 6e 73 1a 02 73 61"
    )
    assert encode_request(DelWorkload(uid=PodUid("abc")))[0] == conformance.wire_del("abc")
    assert encode_ack("x")[0] == conformance.wire_nack("x")


def test_kit_parser_flags_del_uid_in_field_1() -> None:
    good = conformance.parse_request(conformance.wire_del("abc"))
    assert (good.kind, good.uid, good.problems) == ("del", "abc", [])
    bad = conformance.parse_request(conformance.wire_del("abc", uid_field=1))
    assert bad.kind == "del" and bad.uid == "" and bad.problems
    add = conformance.parse_request(conformance.wire_add("u", ("n", "ns", "sa")))
    assert (add.kind, add.uid, add.info) == ("add", "u", ("n", "ns", "sa"))
    assert conformance.parse_answer(conformance.ACK) == ""
    assert conformance.parse_answer(conformance.wire_nack("boom")) == "boom"


# --- the CLI, as CI runs it ---------------------------------------------------------------------------------


def test_cli_server_role_against_ambient_zds_serve() -> None:
    code, results, stderr = run_kit("--server-cmd", SERVE)
    assert code == 0, stderr
    assert verdicts(results) == {("server", n): "pass" for n in conformance.SERVER_CASES}


def test_cli_client_role_against_ambient_zds_watch() -> None:
    # {fail_file} lets the kit make a start fail and then succeed on retry (case 15); a short retry interval
    # keeps the run quick (the kit waits for the retry, it does not time it).
    code, results, stderr = run_kit(
        "--client-cmd", f"{WATCH} --fail-file {{fail_file}} --retry-interval 0.3"
    )
    assert code == 0, stderr
    assert verdicts(results) == {("client", n): "pass" for n in conformance.CLIENT_CASES}


def test_cli_client_role_observed_through_admin_ports_needs_real_namespaces() -> None:
    code, results, stderr = run_kit("--client-cmd", WATCH, "--observe", "admin", "--netns", "pipe")
    assert (code, results) == (1, [])
    assert "--observe admin needs real namespaces" in stderr and "Traceback" not in stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="--observe admin runs the client in a namespace (needs root)")
def test_cli_client_role_against_our_ztunnel_observed_through_its_admin_ports() -> None:
    # the way the kit checks upstream's ztunnel: no state file, only /config_dump workloadState and
    # /healthz/ready, with case 15's failure made by holding port 15008 in the pod's namespace
    code, results, stderr = run_kit(
        "--client-cmd", f"{PY} -m services.ztunnel.app", "--client-env", "INPOD_UDS={socket}",
        "--client-env", f"PYTHONPATH={REPO}", "--observe", "admin",
    )  # fmt: skip
    assert code == 0, stderr
    assert verdicts(results) == {("client", n): "pass" for n in conformance.CLIENT_CASES}


def test_state_from_admin_reads_upstreams_workload_state() -> None:
    dump = {"workloadState": {
        "up-1": {"state": "Up", "info": {"name": "web", "namespace": "ns", "serviceAccount": "sa"}},
        "up-2": {"state": "Up", "info": {"name": "db", "namespace": "ns", "serviceAccount": "db"}},
        "wait": {"state": "Pending", "info": {"name": "w", "namespace": "ns", "serviceAccount": "sa"}},
        "odd": "not an object",
    }}  # fmt: skip
    state = conformance.state_from_admin(dump, False, {"up-1": ([4026532840, 4], 91234)}, connected=True,
                                         connections=2, snapshot_received=False)  # fmt: skip
    assert state == {
        "connected": True, "connections": 2, "snapshot_received": False, "ready": False,
        "workloads": {
            "up-1": {"name": "web", "namespace": "ns", "service_account": "sa", "netns": [4026532840, 4],
                     "generation": 91234},
            # Up, but no 15008 listener of the client's in the namespace it was sent: no netns to show
            "up-2": {"name": "db", "namespace": "ns", "service_account": "db", "netns": None,
                     "generation": 0},
        },
        "pending": {"wait": "workloadState: Pending"},
    }  # fmt: skip
    assert conformance.state_from_admin({}, True, {}, connected=False, connections=0,
                                        snapshot_received=False)["workloads"] == {}  # fmt: skip


# --- in-process runs ----------------------------------------------------------------------------------------


async def test_client_role_with_pipe_fds_and_env_placeholders(tmp_path: Path) -> None:
    # The ztunnel style: socket and state file from the environment. {fail_uid} always fails, so case 15
    # passes with a note that the retry success could not be checked.
    script = (
        "import os, sys; from ambient.cli import main; "
        "sys.argv = ['ambient', 'zds', 'watch', '--socket', os.environ['INPOD_UDS'], "
        "'--state-file', os.environ['ZTUNNEL_ZDS_STATE_FILE'], '--fail-uid', os.environ['FAIL_UID']]; main()"
    )
    opts = ClientOptions(
        command=f"{PY} -c {shlex.quote(script)}",
        env=["INPOD_UDS={socket}", "ZTUNNEL_ZDS_STATE_FILE={state}", "FAIL_UID={fail_uid}",
             f"PYTHONPATH={REPO}"],
        netns="pipe",
    )
    with trio.fail_after(60):
        run = await conformance.run_client_kit(opts, tmp_path)
    by_case = {r.number: r for r in run.results}
    assert all(r.status is Status.PASS for r in run.results), [(r.number, r.details) for r in run.results]
    assert any("retry success not checked" in d for d in by_case[15].details)


class _Snapshot:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def snapshot(self) -> list[SnapshotEntry]:
        info = WorkloadInfo(name="web", namespace="default", service_account="sa")
        return [SnapshotEntry(uid=PodUid("pod-1"), info=info, netns_fd=self.fd)]


async def test_server_role_by_socket_only_marks_control_cases_na(tmp_path: Path) -> None:
    path = str(tmp_path / "zds.sock")
    fd = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        server = ZdsServer(path, _Snapshot(fd), accept_interval=0)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve)
            with trio.fail_after(60):
                run = await conformance.run_server_kit(ServerOptions(socket_path=path), tmp_path)
            nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
    status = {r.number: r.status for r in run.results}
    assert status == {1: Status.PASS, 2: Status.PASS, 3: Status.PASS, 4: Status.NA, 8: Status.PASS,
                      17: Status.PASS, 18: Status.NA}
    assert "--server-cmd" in next(r for r in run.results if r.number == 18).details[0]


async def _rude_server(path: str, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Breaks case 2: sends two keeps back to back, without waiting for the first answer."""
    listener = bind_server_socket(path)
    task_status.started()
    async with trio.open_nursery() as nursery:

        async def serve(sock: trio.socket.SocketType) -> None:
            with sock:
                try:
                    await recv_datagram(sock)  # hello
                    await send_datagram(sock, (conformance.wire_keep("a"), []))
                    await send_datagram(sock, (conformance.wire_keep("b"), []))
                    while (await recv_datagram(sock))[0]:
                        pass
                except OSError:
                    pass

        while True:
            sock, _ = await listener.accept()
            nursery.start_soon(serve, sock)


async def test_kit_fails_a_server_that_sends_before_the_answer(tmp_path: Path) -> None:
    path = str(tmp_path / "rude.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(_rude_server, path)
        with trio.fail_after(60):
            opts = ServerOptions(socket_path=path, timeout=1, keepalive_timeout=1)
            run = await conformance.run_server_kit(opts, tmp_path)
        nursery.cancel_scope.cancel()
    case2 = next(r for r in run.results if r.number == 2)
    assert case2.status is Status.FAIL
    assert any("before our answer" in d for d in case2.details)
