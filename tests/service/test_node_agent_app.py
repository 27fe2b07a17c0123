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
from services.node_agent.testing import FakeRuleApplier
from services.ztunnel.inpod.statemanager import WorkloadManager
from services.ztunnel.inpod.zds_client import run_zds_client
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
