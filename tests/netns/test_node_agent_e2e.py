"""The real `node-agent` process in a node netns, driven by the `ambient-cni` plugin for a real pod netns,
with an in-test ZDS client playing ztunnel: pending -> enabled, rules in the pod, shutdown leaves them."""

from __future__ import annotations

import io
import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path

import trio

from services.node_agent import cni_plugin
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from shared.netns import entered, open_netns
from tests.access_logs import parse_plain
from tests.netns.conftest import run
from tests.service.zds_fakes import RecordingHandler

HEALTH_PORT = 18000


def plugin(netns: str, name: str, uid: str, sock: str) -> tuple[int, dict[str, object]]:
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_NETNS": netns,
        "CNI_ARGS": f"K8S_POD_NAMESPACE=default;K8S_POD_NAME={name};K8S_POD_UID={uid}",
    }
    config = {"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni", "cni_event_address": sock}
    out = io.StringIO()
    code = cni_plugin.run(env, io.StringIO(json.dumps(config)), out)
    return code, json.loads(out.getvalue())


def health(node_fd: int) -> dict[str, object]:
    with entered(node_fd):
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with s:
        s.settimeout(10)
        s.connect(("127.0.0.1", HEALTH_PORT))
        s.sendall(b"GET /healthz HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    result: dict[str, object] = json.loads(data.partition(b"\r\n\r\n")[2])
    return result


async def test_node_agent_process_enrols_pod_end_to_end(
    make_netns: Callable[[str], str], tmp_path: Path
) -> None:
    node, pod = make_netns("node"), make_netns("pod")
    node_fd = open_netns(node)
    zds, cni = str(tmp_path / "zds.sock"), str(tmp_path / "cni.sock")
    log_path = tmp_path / "agent.log"
    argv = [sys.executable, "-m", "services.node_agent.app", "--node-name", "n1", "--zds-socket", zds]
    argv += ["--cni-socket", cni, "--health-addr", f"127.0.0.1:{HEALTH_PORT}"]
    with open(log_path, "w") as log_file:
        proc = await trio.lowlevel.open_process(["ip", "netns", "exec", node, *argv], stderr=log_file)
    try:
        with trio.fail_after(60):
            while not os.path.exists(cni):
                assert proc.poll() is None, log_path.read_text()
                await trio.sleep(0.05)
            # no ztunnel yet: the pod is redirected anyway (pending), so it can never run unredirected
            code, result = await trio.to_thread.run_sync(plugin, f"/run/netns/{pod}", "a", "uid-a", cni)
            assert code == 0, result
            saved = run("iptables-save", netns=pod).stdout
            assert "-A OUTPUT -j ISTIO_OUTPUT" in saved and "--to-ports 15001" in saved
            assert "fwmark 0x111/0xfff lookup 100" in run("ip", "rule", netns=pod).stdout
            assert (await trio.to_thread.run_sync(health, node_fd))["pods"] == {"enabled": 0, "pending": 1}

            # a bad netns is refused with a CNI error, and nothing is left behind for it
            code, result = await trio.to_thread.run_sync(
                plugin, "/run/netns/does-not-exist", "b", "uid-b", cni
            )
            assert code == 1 and "does not exist" in str(result["details"])

            # ztunnel connects: the pod arrives in the snapshot, the agent's retry gets the ack
            handler = RecordingHandler()
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_zds_client, zds, WorkloadManager(handler))
                while (await trio.to_thread.run_sync(health, node_fd))["pods"] != {
                    "enabled": 1,
                    "pending": 0,
                }:
                    await trio.sleep(0.05)
                assert ("start", "uid-a") in handler.events
                nursery.cancel_scope.cancel()

            proc.send_signal(signal.SIGTERM)
            await proc.wait()
        assert proc.returncode == 0
        text = log_path.read_text()
        lines = [p for p in map(parse_plain, text.splitlines()) if p.target == "node_agent::app"]
        assert [(p.message, p.fields) for p in lines if p.message.startswith("node-agent stopped")] == [
            ("node-agent stopped; enrolled pods keep their redirection rules", {"enrolled": 1})
        ], text
        assert "ISTIO_OUTPUT" in run("iptables-save", netns=pod).stdout  # fail closed: rules stay
    finally:
        if proc.poll() is None:
            proc.kill()
            with trio.CancelScope(shield=True):
                await proc.wait()
        os.close(node_fd)
