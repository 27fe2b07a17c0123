"""Redirection verified and repaired in a real lab (root): one of web's iptables rules deleted and one of
ztunnel's listeners in web closed by hand, then `ambient lab verify` (and, in a second lab, the node agent's
periodic loop) finds both, repairs both, counts them, and traffic through the mesh works again.

How the listener is closed: the test takes a duplicate of ztunnel's own listening socket (15008 in web's
netns) with pidfd_getfd(2) and shuts it down, as a crashed accept loop or a bug inside ztunnel would leave
it: the kernel no longer lists the port as listening, ztunnel's accept loop for it fails, and the client's
HBONE connects to web are refused. Nothing else of ztunnel is touched and the node agent is not told.
"""

from __future__ import annotations

import ctypes
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ambient.lab import components, lab
from ambient.lab.state import load_state
from services.node_agent.verify import listeners_here
from shared.netns import entered, open_netns
from tests.netns.test_lab_mesh import LAB_WORLD, eventually_ok, in_pod
from tests.netns.test_lab_topology import WEB_IP, client_get, needs_mesh, running_lab

pytestmark = needs_mesh

SYS_PIDFD_GETFD = 438  # x86_64 and aarch64 alike


def steal_fd(pid: int, target: int) -> int:
    """A duplicate of process `pid`'s fd `target` (pidfd_getfd(2); root)."""
    pidfd = os.pidfd_open(pid)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = int(libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0))
        if fd < 0:
            errno = ctypes.get_errno()
            raise OSError(errno, f"pidfd_getfd({pid}, {target}): {os.strerror(errno)}")
        return fd
    finally:
        os.close(pidfd)


def close_ztunnel_listener(prefix: str, pod_netns: str, port: int) -> None:
    """Shut down the listening socket ztunnel holds for `port` in `pod_netns`."""
    state = load_state(prefix)
    assert state is not None
    fd = open_netns(pod_netns)
    try:
        with entered(fd):
            inodes = listeners_here()[f"{port}/tcp"]
    finally:
        os.close(fd)
    ztunnel = state.process("ztunnel/node-b")  # web's node
    assert ztunnel is not None
    for name in os.listdir(f"/proc/{ztunnel.pid}/fd"):
        target = os.readlink(f"/proc/{ztunnel.pid}/fd/{name}")
        if target.startswith("socket:[") and int(target[8:-1]) in inodes:
            sock = socket.socket(fileno=steal_fd(ztunnel.pid, int(name)))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()
            return
    raise AssertionError(f"ztunnel (pid {ztunnel.pid}) holds no listener of {port} in {pod_netns}")


def delete_rule(prefix: str, pod: str) -> str:
    """Delete web's first mangle ISTIO_PRERT rule by hand; returns it as iptables-save lists it."""
    saved = in_pod(prefix, pod, "iptables-save", "-t", "mangle")
    rule = next(line for line in saved.splitlines() if line.startswith("-A ISTIO_PRERT"))
    result = lab.exec_in_pod(["iptables", "-t", "mangle", "-D", *rule.split()[1:]], pod=pod, prefix=prefix,
                             capture=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert rule not in in_pod(prefix, pod, "iptables-save", "-t", "mangle")
    return rule


def break_web(prefix: str, *, check_broken: bool = True) -> str:
    """Delete one of web's rules and close ztunnel's 15008 in web; with `check_broken`, see that web is then
    unreachable (not with a periodic loop running: it may have repaired both already)."""
    state = load_state(prefix)
    assert state is not None
    web = lab.find_pod(lab.plan_of(state), "mesh/web")
    rule = delete_rule(prefix, "mesh/web")
    close_ztunnel_listener(prefix, web.netns, 15008)
    if check_broken:
        assert ":15008 " not in in_pod(prefix, "mesh/web", "ss", "-ltnH")
        code, _, _ = client_get(prefix, f"http://{WEB_IP}:8080/while-broken")
        assert code != 0  # fail closed: no inbound HBONE listener, nothing reaches the app around it
    return rule


def metrics(prefix: str, node: str) -> list[str]:
    state = load_state(prefix)
    assert state is not None
    body = lab.node_agent_request(lab.plan_of(state), node, "GET", "/metrics")
    return [line for line in body.decode().splitlines() if line.startswith("istio_cni_redirection_")]


def ambient_lab_verify(prefix: str) -> tuple[int, list[dict[str, object]]]:
    done = subprocess.run(
        [sys.executable, "-c", "from ambient.cli import main; main()", "lab", "verify", "--prefix", prefix,
         "--json"], capture_output=True, text=True, check=False)  # fmt: skip
    assert done.stdout, done.stderr
    return done.returncode, json.loads(done.stdout)


def pods_of(nodes: list[dict[str, object]]) -> dict[str, dict[str, object]]:
    out: dict[str, dict[str, object]] = {}
    for node in nodes:
        assert node["error"] is None, node
        pods = node["pods"]
        assert isinstance(pods, list)
        out.update({f"{p['namespace']}/{p['name']}": p for p in pods})
    return out


@pytest.fixture
def on_demand_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("REDIRECTION_VERIFY_INTERVAL", "0")  # inherited by the lab's node agents: on demand
    with running_lab("zv", LAB_WORLD, tmp_path) as prefix:
        yield prefix


@pytest.fixture
def periodic_lab(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.setenv("REDIRECTION_VERIFY_INTERVAL", "1s")
    with running_lab("zv", LAB_WORLD, tmp_path) as prefix:
        yield prefix


def test_lab_verify_repairs_a_deleted_rule_and_a_closed_listener(on_demand_lab: str) -> None:
    prefix = on_demand_lab
    code, nodes = ambient_lab_verify(prefix)
    assert code == 0, nodes
    before = pods_of(nodes)
    assert sorted(before) == ["mesh/client", "mesh/web"]  # the outsider is not enrolled: not verified
    assert {p["result"] for p in before.values()} == {"ok"}
    assert before["mesh/web"]["checks"] == ["rules", "listeners"]

    rule = break_web(prefix)
    code, nodes = ambient_lab_verify(prefix)
    assert code == 0, nodes
    web = pods_of(nodes)["mesh/web"]
    assert web["result"] == "repaired", web
    drift = web["drift"]
    assert isinstance(drift, list)
    assert f"iptables-save mangle ISTIO_PRERT: rule missing: {rule.split(' ', 2)[2]}" in drift
    assert "15008/tcp: nothing listening" in drift
    repairs = web["repairs"]
    assert isinstance(repairs, list) and repairs[0] == "rules re-applied: repaired", repairs
    assert any(r.endswith("re-sent to ztunnel: ztunnel acked") for r in repairs), repairs
    assert pods_of(nodes)["mesh/client"]["result"] == "ok"

    assert rule in in_pod(prefix, "mesh/web", "iptables-save", "-t", "mangle")
    assert ":15008 " in in_pod(prefix, "mesh/web", "ss", "-ltnH")
    code_ok, err = eventually_ok(prefix, f"http://{WEB_IP}:8080/after-repair", within=5.0)
    assert code_ok == 0, err

    counted = metrics(prefix, "node-b")
    assert 'istio_cni_redirection_verified_total{namespace="mesh",pod="web",result="drift"} 1.0' in counted
    assert 'istio_cni_redirection_verified_total{namespace="mesh",pod="web",result="ok"} 1.0' in counted
    for kind in ("rules", "listeners"):
        line = ('istio_cni_redirection_repaired_total{namespace="mesh",pod="web",result="success",'
                f'type="{kind}"}} 1.0')  # fmt: skip
        assert line in counted, counted

    code, nodes = ambient_lab_verify(prefix)  # nothing left to repair
    assert code == 0 and {p["result"] for p in pods_of(nodes).values()} == {"ok"}, nodes
    state = load_state(prefix)
    assert state is not None
    agent_log = components.LabPaths(state.run_dir).log("node-agent/node-b").read_text()
    repaired = [line for line in agent_log.splitlines() if "pod redirection drift repaired" in line]
    assert len(repaired) == 1 and 'name="web"' in repaired[0] and "15008/tcp" in repaired[0], agent_log


def test_the_periodic_loop_repairs_without_being_asked(periodic_lab: str) -> None:
    prefix = periodic_lab
    rule = break_web(prefix, check_broken=False)
    wanted = ('istio_cni_redirection_repaired_total{namespace="mesh",pod="web",result="success",'
              'type="listeners"} 1.0')  # fmt: skip
    deadline = time.monotonic() + 30
    while wanted not in (counted := metrics(prefix, "node-b")) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert wanted in counted, counted
    assert ('istio_cni_redirection_repaired_total{namespace="mesh",pod="web",result="success",'
            'type="rules"} 1.0') in counted  # fmt: skip
    assert rule in in_pod(prefix, "mesh/web", "iptables-save", "-t", "mangle")
    code, err = eventually_ok(prefix, f"http://{WEB_IP}:8080/after-periodic-repair", within=5.0)
    assert code == 0, err
