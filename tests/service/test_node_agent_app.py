"""The node-agent process wiring (run_agent) with a fake rule applier: sockets bound, CNI add, a real
ZDS client acks, graceful shutdown leaves the pod enrolled state to the rules (no delete on exit)."""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import trio

from services.node_agent.app import AgentConfig, run_agent
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.testing import FakeRuleApplier, ScriptedInspector
from services.node_agent.verify import Findings
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
from tests.service.http_peers import misbehaving_peers
from tests.service.zds_fakes import RecordingHandler


async def post(path: str, body: dict[str, object]) -> tuple[int, dict[str, object]]:
    data = json.dumps(body).encode()
    stream = await trio.open_unix_socket(path)
    async with stream:
        head = f"POST /cmdadd HTTP/1.1\r\nhost: x\r\ncontent-length: {len(data)}\r\nconnection: close\r\n\r\n"
        await stream.send_all(head.encode() + data)
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    header, _, payload = raw.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload)


async def test_run_agent_enrols_via_cni_and_ztunnel_acks(tmp_path: Path) -> None:
    config = AgentConfig(
        node_name="n1",
        zds_socket=str(tmp_path / "zds.sock"),
        cni_socket=str(tmp_path / "cni.sock"),
        health_addr=None,
    )
    applier = FakeRuleApplier()
    handler = RecordingHandler()
    netns = tmp_path / "netns-file"  # open_netns refuses a non-netns file: a clear 500
    netns.write_text("")
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            agent: NodeAgent = await nursery.start(partial(run_agent, config, applier=applier))
            status, answer = await post(
                config.cni_socket,
                {"Netns": str(netns), "PodName": "a", "PodNamespace": "default", "PodUID": "u1", "IPs": []},
            )
            assert status == 500 and "not a network namespace" in str(answer["error"])
            if os.geteuid() == 0:
                status, answer = await post(
                    config.cni_socket,
                    {"Netns": "/proc/self/ns/net", "PodName": "a", "PodNamespace": "default", "PodUID": "u1"},
                )
                assert (status, answer["status"]) == (200, "pending")
                nursery.start_soon(run_zds_client, config.zds_socket, WorkloadManager(handler))
                while agent.status_of("u1") != "enabled":  # type: ignore[arg-type]
                    await trio.sleep(0.01)
                assert ("start", "u1") in handler.events
            nursery.cancel_scope.cancel()
    assert not os.path.exists(config.cni_socket)
    assert [c for c in applier.calls if c[0] == "delete"] == []  # shutdown leaves rules in place


async def test_run_agent_makes_missing_socket_directories_and_removes_them_at_exit(tmp_path: Path) -> None:
    kept = tmp_path / "kept"  # exists before: not the agent's, never removed
    kept.mkdir()
    config = AgentConfig(
        node_name="n1",
        zds_socket=str(tmp_path / "made" / "ztunnel" / "zds.sock"),
        cni_socket=str(kept / "cni" / "cni.sock"),
        health_addr=None,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
            assert os.path.exists(config.zds_socket) and os.path.exists(config.cni_socket)
            nursery.cancel_scope.cancel()
    assert not (tmp_path / "made").exists()  # made by the agent: gone, sockets and all
    assert kept.is_dir() and not (kept / "cni").exists()


async def test_a_made_directory_that_gained_other_files_is_left_in_place(tmp_path: Path) -> None:
    config = AgentConfig(
        node_name="n1",
        zds_socket=str(tmp_path / "run" / "zds.sock"),
        cni_socket=str(tmp_path / "run" / "cni.sock"),
        health_addr=None,
    )
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
            (tmp_path / "run" / "someone-elses").write_text("x")
            nursery.cancel_scope.cancel()
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["someone-elses"]


async def test_a_file_it_refused_to_replace_is_still_there_after_exit(tmp_path: Path) -> None:
    config = AgentConfig(node_name="n1", zds_socket=str(tmp_path / "zds.sock"),
                         cni_socket=str(tmp_path / "cni.sock"), health_addr=None)
    Path(config.cni_socket).write_text("not a socket, not the agent's")
    refused = pytest.RaisesExc(OSError, match="refusing to replace it")
    with trio.fail_after(10), pytest.RaisesGroup(refused, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
    assert Path(config.cni_socket).read_text() == "not a socket, not the agent's"
    assert not os.path.exists(config.zds_socket)  # its own socket is gone


async def test_a_second_agent_on_live_sockets_refuses_to_start_and_leaves_them(tmp_path: Path) -> None:
    config = AgentConfig(node_name="n1", zds_socket=str(tmp_path / "zds.sock"),
                         cni_socket=str(tmp_path / "cni.sock"), health_addr=None)
    refused = pytest.RaisesExc(Exception, match="another live process is serving")
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
            inodes = {p: os.stat(p).st_ino for p in (config.zds_socket, config.cni_socket)}
            with pytest.RaisesGroup(refused, flatten_subgroups=True, allow_unwrapped=True):
                async with trio.open_nursery() as second:
                    await second.start(partial(run_agent, config, applier=FakeRuleApplier()))
            assert {p: os.stat(p).st_ino for p in inodes} == inodes  # still the first agent's
            nursery.cancel_scope.cancel()


async def test_sockets_another_process_took_over_are_left_to_it_at_exit(tmp_path: Path) -> None:
    config = AgentConfig(node_name="n1", zds_socket=str(tmp_path / "zds.sock"),
                         cni_socket=str(tmp_path / "cni.sock"), health_addr=None)
    successors: list[socket.socket] = []
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
                for path in (config.zds_socket, config.cni_socket):  # a second agent on the same paths
                    os.unlink(path)
                    successor = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                    successor.bind(path)
                    successors.append(successor)
                inodes = [os.lstat(p).st_ino for p in (config.zds_socket, config.cni_socket)]
                nursery.cancel_scope.cancel()
        assert [os.lstat(p).st_ino for p in (config.zds_socket, config.cni_socket)] == inodes
    finally:
        for successor in successors:
            successor.close()


async def http(port: int, method: str, path: str) -> tuple[int, str, bytes]:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        head = f"{method} {path} HTTP/1.1\r\nhost: x\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
        await stream.send_all(head.encode())
        raw = b""
        while chunk := await stream.receive_some(65536):
            raw += chunk
    header, _, payload = raw.partition(b"\r\n\r\n")
    content_type = next((line.split(b":", 1)[1].strip().decode() for line in header.split(b"\r\n")
                         if line.lower().startswith(b"content-type:")), "")  # fmt: skip
    return int(header.split()[1]), content_type, payload


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.mark.skipif(os.geteuid() != 0, reason="enrols /proc/self/ns/net (root)")
async def test_health_server_verifies_on_post_and_serves_the_counters(tmp_path: Path) -> None:
    port = free_port()
    config = AgentConfig(node_name="n1", zds_socket=str(tmp_path / "zds.sock"),
                         cni_socket=str(tmp_path / "cni.sock"), health_addr=f"127.0.0.1:{port}",
                         verify_interval=0)  # fmt: skip
    inspector = ScriptedInspector(Findings(rules=("iptables-save nat OUTPUT: chain missing",)), Findings())
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier(), inspector=inspector))
            pod: dict[str, object] = {"Netns": "/proc/self/ns/net", "PodName": "a", "PodNamespace": "default",
                                      "PodUID": "u1"}
            status, _ = await post(config.cni_socket, pod)
            assert status == 200
            assert json.loads((await http(port, "GET", "/verify"))[2])["pods"] == []  # no run yet
            code, _, body = await http(port, "POST", "/verify")
            answer = json.loads(body)
            assert code == 200 and answer["node"] == "n1" and answer["interval"] == 0
            [verified] = answer["pods"]
            assert (verified["name"], verified["result"], verified["checks"]) == ("a", "repaired", ["rules"])
            assert verified["repairs"] == ["rules re-applied: unchanged"]  # pending: listeners not checked
            assert json.loads((await http(port, "GET", "/verify"))[2])["pods"] == [verified]
            code, content_type, body = await http(port, "GET", "/metrics")
            assert code == 200 and content_type.startswith("text/plain")
            text = body.decode()
            assert 'verified_total{namespace="default",pod="a",result="drift"} 1.0' in text
            assert (await http(port, "PUT", "/verify"))[0] == 405
            nursery.cancel_scope.cancel()


async def test_misbehaving_peers_on_the_health_server_leave_others_their_answer(tmp_path: Path) -> None:
    port = free_port()
    config = AgentConfig(node_name="n1", zds_socket=str(tmp_path / "zds.sock"),
                         cni_socket=str(tmp_path / "cni.sock"), health_addr=f"127.0.0.1:{port}",
                         verify_interval=0)  # fmt: skip
    with trio.fail_after(20):
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(run_agent, config, applier=FakeRuleApplier()))
            async with misbehaving_peers(partial(trio.open_tcp_stream, "127.0.0.1", port), "/healthz"):
                code, _, body = await http(port, "GET", "/healthz")
                metrics = await http(port, "GET", "/metrics")
            nursery.cancel_scope.cancel()
    assert code == 200 and json.loads(body)["node"] == "n1"
    assert metrics[0] == 200
