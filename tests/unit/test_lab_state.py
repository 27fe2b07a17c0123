"""The lab's state file, process records, component specs, readiness errors and the CLI surface."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ambient.lab import cli as lab_cli
from ambient.lab import components, lab
from ambient.lab.components import LabPaths
from ambient.lab.errors import ComponentError, LabError, NotUpError, PrerequisiteError, UnknownPodError
from ambient.lab.state import (
    ComponentSpec,
    LabState,
    ProcessRecord,
    UnixHttpCheck,
    is_running,
    load_state,
    process_start_time,
    save_state,
    stop_process,
)
from ambient.lab.tables import status_tables
from ambient.lab.topology import LabPlan, plan_lab
from services.istiod.world import load_world

WORLD = b"""
nodes: [{name: node-a, podCidr: 10.244.1.0/24}]
namespaces: [{name: ns}]
pods:
  - {name: client-7f, namespace: ns, node: node-a, ips: [10.244.1.10], labels: {app: sleep}}
  - {name: web-1, namespace: ns, node: node-a, ips: [10.244.1.11], labels: {app: web}}
  - {name: web-2, namespace: ns, node: node-a, ips: [10.244.1.12], labels: {app: web}}
services: [{name: web, namespace: ns, vips: [10.96.0.5], selector: {app: web}, ports: [{port: 80}]}]
"""


def plan() -> LabPlan:
    return plan_lab(load_world(WORLD, "w"), prefix="t")


def test_state_round_trips_and_is_rewritten_atomically(tmp_path: Path) -> None:
    state = LabState(prefix="t", run_dir=str(tmp_path / "t"), world_file="w", netns=["t-fabric"])
    save_state(state)
    state.netns.append("t-cp")
    save_state(state)
    loaded = load_state("t", tmp_path)
    assert loaded is not None
    assert loaded.netns == ["t-fabric", "t-cp"]
    assert not (tmp_path / "t" / "state.tmp").exists()
    assert load_state("other", tmp_path) is None


def test_state_file_holding_the_tokens_is_0600_whatever_the_umask(tmp_path: Path) -> None:
    state = LabState(prefix="t", run_dir=str(tmp_path / "t"), world_file="w", netns=["t-fabric"])
    old = os.umask(0o022)
    try:
        (tmp_path / "t").mkdir()
        (tmp_path / "t" / "state.tmp").write_text("left by a crash")  # 0644: its mode must not be kept
        save_state(state)
        save_state(state)
    finally:
        os.umask(old)
    assert (tmp_path / "t" / "state.json").stat().st_mode & 0o777 == 0o600
    assert load_state("t", tmp_path) is not None


def test_damaged_state_file_says_how_to_clean_up(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "state.json").write_text("{not json")
    with pytest.raises(LabError, match=r"damaged.*ip netns list \| grep '\^t-'"):
        load_state("t", tmp_path)


def _record(proc: subprocess.Popen[bytes]) -> ProcessRecord:
    spec = ComponentSpec(name="x", component="app", netns="n", argv=[], log="/dev/null")
    start = process_start_time(proc.pid)
    assert start is not None
    return ProcessRecord(spec=spec, pid=proc.pid, start_time=start)


def test_stop_process_terminates_the_recorded_process() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = _record(proc)
        assert is_running(record)
        stop_process(record, grace=5)
        assert not is_running(record)
        assert proc.poll() is not None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_reused_pid_is_never_signalled() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = _record(proc)
        record.start_time -= 1  # the PID now belongs to "another" process
        assert not is_running(record)
        stop_process(record, grace=0.1)
        assert proc.poll() is None
    finally:
        proc.kill()
        proc.wait()


def test_component_specs_put_each_process_in_its_namespace(tmp_path: Path) -> None:
    p = plan()
    paths = LabPaths(tmp_path)
    istiod = components.istiod_spec(p, paths, {"node-a": "-tok", "node-b": "x"}, "-admin")
    assert istiod.netns == "t-cp"
    assert istiod.argv[istiod.argv.index("--listen") :][:2] == ["--listen", "0.0.0.0:15012"]
    # tokens may start with '-' (token_urlsafe) and must not show in `ps`: environment, not argv
    assert istiod.env == {"ISTIOD_ADMIN_TOKEN": "-admin", "ISTIOD_NODE_TOKENS": "node-a=-tok,node-b=x"}
    assert not any("tok" in a or "admin" in a for a in istiod.argv)
    node = p.nodes[0]
    agent = components.node_agent_spec(p, node, paths)
    assert agent.netns == "t-node-a"
    assert agent.env["ZTUNNEL_UDS_ADDRESS"] == str(paths.zds_socket("node-a"))
    assert agent.env["CONTROL_PLANE_ADDRESS"] == "https://172.29.0.2:15012"
    # the agent's "host" holds only its own node's pods: a netns scan by IP cannot reach another lab
    assert agent.env["HOST_PREFIX"] == str(paths.node_host("node-a"))
    container = components.node_agent_spec(p, node, paths, istiod="istiod:15012", netns="")
    assert "HOST_PREFIX" not in container.env and container.netns == ""
    zt = components.ztunnel_spec(p, node, paths, with_agent=True)
    assert zt.env["INPOD_UDS"] == agent.env["ZTUNNEL_UDS_ADDRESS"]
    assert zt.netns == "t-node-a"
    web = next(pod for pod in p.pods if pod.name == "web-1")
    app = components.app_spec(web, paths)
    assert app.netns == "t-ns-web-1"
    assert app.argv[-3:] == ["echo", "--port", "80"]
    assert app.env["POD_IP"] == "10.244.1.11"
    assert {s.log for s in (istiod, agent, zt, app)} == {
        str(tmp_path / "logs" / n)
        for n in ("istiod.log", "node-agent_node-a.log", "ztunnel_node-a.log", "app_ns_web-1.log")
    }


def test_pod_netns_links_point_at_the_named_namespace(tmp_path: Path) -> None:
    paths = LabPaths(tmp_path)
    components.link_pod_netns(paths, "node-a", "t-ns-web-1")
    components.link_pod_netns(paths, "node-a", "t-ns-web-1")  # idempotent
    link = tmp_path / "nodes" / "node-a" / "host" / "run" / "netns" / "t-ns-web-1"
    assert os.readlink(link) == "/run/netns/t-ns-web-1"


def test_wait_ready_times_out_naming_the_component_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    log.write_text("line one\nlast words\n")
    spec = ComponentSpec(
        name="node-agent/node-a",
        component="node-agent",
        netns="n",
        argv=[],
        log=str(log),
        checks=[UnixHttpCheck(socket=str(tmp_path / "none.sock"), path="/healthz")],
    )
    record = ProcessRecord(spec=spec, pid=1, start_time=0)
    with pytest.raises(ComponentError) as info:
        components.wait_ready(record, timeout=0.2, is_alive=lambda r: True, poll=0.05)
    message = str(info.value)
    assert "node-agent/node-a was not ready after 0.2 s" in message
    assert str(log) in message and "last words" in message


def test_wait_ready_reports_a_process_that_exited(tmp_path: Path) -> None:
    spec = ComponentSpec(name="istiod", component="istiod", netns="n", argv=[], log=str(tmp_path / "i.log"))
    with pytest.raises(ComponentError, match=r"istiod exited during start-up; see its log .*i\.log"):
        components.wait_ready(
            ProcessRecord(spec=spec, pid=1, start_time=0), timeout=5, is_alive=lambda r: False
        )


def test_not_root_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(PrerequisiteError, match="needs root"):
        lab.check_prerequisites()


def test_missing_binary_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "geteuid", lambda: 0)
    monkeypatch.setattr(shutil, "which", lambda name, path=None: None if name == "ip" else "/bin/x")
    with pytest.raises(PrerequisiteError, match=r"`ip` command.*apt-get install iproute2"):
        lab.check_prerequisites()


def test_missing_br_netfilter_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "BRIDGE_NETFILTER", tmp_path / "no-such-dir")
    with pytest.raises(PrerequisiteError, match=r"br_netfilter kernel module.*modprobe br_netfilter"):
        lab.check_bridge_netfilter()


def test_status_of_a_lab_that_is_not_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lab, "check_prerequisites", lambda: None)
    with pytest.raises(NotUpError, match="no lab 'nope' is up"):
        lab.status(prefix="nope", root=tmp_path)


def test_find_pod_by_key_name_prefix_or_app_label() -> None:
    p = plan()
    assert lab.find_pod(p, "ns/web-1").name == "web-1"
    assert lab.find_pod(p, "client").name == "client-7f"
    assert lab.find_pod(p, "sleep").name == "client-7f"
    with pytest.raises(UnknownPodError, match="more than one pod matches 'web'"):
        lab.find_pod(p, "web")
    with pytest.raises(UnknownPodError, match="no pod matches 'db'; pods: ns/client-7f"):
        lab.find_pod(p, "db")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ambient")
    lab_cli.register(parser.add_subparsers(dest="command"))
    return parser


def test_cli_parses_the_lab_commands() -> None:
    parser = _parser()
    args = parser.parse_args(["lab", "exec", "--prefix", "p", "sleep", "--", "curl", "-s", "http://x"])
    assert (args.func, args.pod, args.prefix) == (lab_cli.cmd_exec, "sleep", "p")
    assert args.cmd[-3:] == ["curl", "-s", "http://x"]
    args = parser.parse_args(["lab", "exec", "sleep", "--prefix", "q", "--", "curl", "--prefix", "x"])
    assert lab_cli.exec_options(args.prefix, args.cmd) == ("q", ["curl", "--prefix", "x"])
    assert lab_cli.exec_options("amb", ["--", "id"]) == ("amb", ["id"])
    assert lab_cli.exec_options("amb", ["id", "-u"]) == ("amb", ["id", "-u"])
    assert lab_cli.exec_options("amb", ["sh", "-c", "--", "x"]) == ("amb", ["sh", "-c", "--", "x"])
    with pytest.raises(SystemExit):
        lab_cli.exec_options("amb", ["--nodes", "3", "--", "id"])  # refused, not run as the command
    args = parser.parse_args(["lab", "restart", "ztunnel", "node-b"])
    assert (args.component, args.node) == ("ztunnel", "node-b")
    args = parser.parse_args(["logs", "node-a", "--direction", "inbound"])
    assert (args.node, args.direction) == ("node-a", "inbound")
    args = parser.parse_args(["lab", "up", "--nodes", "3", "--world", "w.yaml"])
    assert (args.nodes, args.world) == (3, Path("w.yaml"))
    assert parser.parse_args(["demo", "--keep"]).keep
    args = parser.parse_args(["lab", "world", "--", "policy", "add", "deny.yaml"])
    assert (args.func, args.args[-3:]) == (lab_cli.cmd_world, ["policy", "add", "deny.yaml"])


def test_cli_refuses_unknown_components() -> None:
    with pytest.raises(SystemExit):
        _parser().parse_args(["lab", "restart", "kube-proxy"])


def test_cli_without_root_exits_non_zero_with_a_message(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from ambient import cli

    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(SystemExit) as info:
        cli.main(["lab", "up", "--prefix", "nonroot"])
    assert info.value.code == 1
    assert "needs root" in capsys.readouterr().err


def test_status_tables_render_every_pod() -> None:
    data = {
        "prefix": "t",
        "phase": "up",
        "nodes": [
            {"name": "node-a", "netns": "t-node-a", "address": "172.29.0.10", "pod_cidr": "10.244.1.0/24"}
        ],
        "pods": [
            {
                "name": "web-1",
                "namespace": "ns",
                "node": "node-a",
                "ip": "10.244.1.11",
                "app": "echo",
                "enrolment": "enabled",
            }
        ],
        "services": [
            {
                "name": "web",
                "namespace": "ns",
                "vips": ["10.96.0.5"],
                "ports": [80],
                "endpoints": ["ns/web-1"],
            }
        ],
        "components": [{"name": "istiod", "component": "istiod", "pid": 1, "running": True, "log": "l"}],
    }
    tables = status_tables(data)
    assert [t.title for t in tables] == ["lab t (up)", "pods", "services", "components"]
    assert tables[1].row_count == 1
