"""The `ztunnel` console script as a real process in a node netns, driven over ZDS by this test.

The test plays the node agent (services.node_agent.zds_server.ZdsServer, snapshot = one pod's netns fd);
ztunnel runs in its own "node" netns and binds the pod's listeners in the pod netns through the fd it
receives.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import trio

from services.node_agent.zds_server import ZdsServer
from shared.logs import parse_plain
from shared.netns import entered
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo
from tests.netns.conftest import run
from tests.netns.test_ztunnel_inpod import (
    SERVER_PORT,
    add_pod,
    bound_listener,
    connect_from,
    echo_server,
    netns_fd,
    recv_all,
    send_all,
)

ZTUNNEL = str(Path(sys.executable).with_name("ztunnel"))
INFO = WorkloadInfo(name="client", namespace="default", service_account="client-sa")


class OnePod:
    def __init__(self, fd: int) -> None:
        self.fd = fd

    def snapshot(self) -> list[SnapshotEntry]:
        return [SnapshotEntry(uid=PodUid("pod-1"), info=INFO, netns_fd=self.fd)]


async def http_get_in(fd: int, port: int, target: str) -> int | None:
    """Status of GET target on 127.0.0.1:port inside netns `fd`, or None if nothing answers yet."""
    with entered(fd):
        sock = trio.socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        try:
            await sock.connect(("127.0.0.1", port))
        except OSError:
            return None
        await send_all(sock, f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        head = await recv_all(sock)
    return int(head.split()[1])


@pytest.mark.parametrize("log_format", ["plain", "json"])
async def test_ztunnel_process_serves_a_pod_over_zds_and_exits_cleanly_on_sigterm(
        make_netns: Callable[[str], str], tmp_path: Path, log_format: str) -> None:
    node_ns = make_netns("node")
    server_ns = make_netns("srv")
    pod, pod_ip, server_ip = add_pod(make_netns, server_ns, 1)
    uds = tmp_path / "ztunnel.sock"
    stderr_path = tmp_path / "ztunnel.log"
    peers: list[tuple[str, int]] = []
    env = {**os.environ, "INPOD_UDS": str(uds), "NODE_NAME": "node-a",
           "CONNECTION_TERMINATION_DEADLINE": "1s", "LOG_FORMAT": log_format}
    with netns_fd(pod) as pfd, netns_fd(server_ns) as sfd, netns_fd(node_ns) as nfd, \
            open(stderr_path, "wb") as log_file, trio.fail_after(60):
        server = await bound_listener(sfd, SERVER_PORT)
        zds = ZdsServer(uds, OnePod(pfd), accept_interval=0)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(echo_server, server, peers)
            await nursery.start(zds.serve)
            proc = await trio.lowlevel.open_process(["ip", "netns", "exec", node_ns, ZTUNNEL], env=env,
                                                    stdout=log_file, stderr=log_file)
            try:
                await zds.wait_connections()
                while await http_get_in(nfd, 15021, "/healthz/ready") != 200:
                    await trio.sleep(0.05)  # the process is starting up; bounded by fail_after
                assert await http_get_in(nfd, 15000, "/config_dump") == 200

                client = await connect_from(pfd, (server_ip, SERVER_PORT))
                with client:
                    await send_all(client, b"through a real ztunnel process")
                    client.shutdown(socket.SHUT_WR)
                    assert await recv_all(client) == b"through a real ztunnel process"
                assert peers[0][0] == pod_ip
            finally:
                proc.send_signal(signal.SIGTERM)
                rc = await proc.wait()
            nursery.cancel_scope.cancel()
    output = stderr_path.read_text()
    assert rc == 0, output
    if log_format == "plain":
        complete = [parse_plain(line).fields for line in output.splitlines()
                    if "\taccess\tconnection complete" in line]
    else:
        objs = [json.loads(line) for line in output.splitlines()]  # every line is one JSON object
        complete = [o for o in objs if o["scope"] == "access" and o["message"] == "connection complete"]
    assert len(complete) == 1, output
    assert complete[0]["bytes_sent"] == len(b"through a real ztunnel process")
    assert complete[0]["src.workload"] == "client"
    # ztunnel's listeners were in the pod, never in the node netns.
    assert ":15001 " not in run("ss", "-ltn", netns=node_ns).stdout


def test_ztunnel_refuses_to_start_without_privileges(make_netns: Callable[[str], str]) -> None:
    node_ns = make_netns("node")
    result = subprocess.run(["ip", "netns", "exec", node_ns, "setpriv", "--reuid=65534", "--regid=65534",
                             "--clear-groups", "--inh-caps=-all", ZTUNNEL],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "must run as root" in result.stderr
