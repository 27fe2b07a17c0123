"""`ambient lab up --ztunnel-bin PATH [--on NODE]`: upstream's ztunnel configured through its own settings."""

from __future__ import annotations

import os
from pathlib import Path

import msgspec
import pytest

from ambient.lab import components, upstream
from ambient.lab.components import LabPaths
from ambient.lab.errors import PrerequisiteError
from ambient.lab.lab import ztunnel_pods
from ambient.lab.state import ComponentSpec, HttpCheck, LabState, load_state, save_state
from tests.unit.test_lab_state import plan


def fake_binary(tmp_path: Path) -> str:
    binary = tmp_path / "ztunnel"
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    return str(binary)


def test_upstream_spec_uses_only_upstream_settings(tmp_path: Path) -> None:
    p = plan()
    paths = LabPaths(tmp_path)
    node = p.nodes[0]
    binary = fake_binary(tmp_path)
    spec = components.ztunnel_spec(p, node, paths, with_agent=True, ztunnel_bin=binary)
    ours = components.ztunnel_spec(p, node, paths, with_agent=True)
    assert spec.argv == [binary] and spec.implementation == upstream.IMPLEMENTATION_UPSTREAM
    assert ours.implementation == upstream.IMPLEMENTATION_OURS
    cwd = paths.node_dir(node.name)
    assert spec.env == {
        "NODE_NAME": "node-a",
        "INSTANCE_IP": node.ip,
        "POD_NAME": "ztunnel-node-a",
        "POD_NAMESPACE": "istio-system",
        "SERVICE_ACCOUNT": "ztunnel",
        "INPOD_UDS": str(paths.zds_socket("node-a")),
        "XDS_ADDRESS": "https://172.29.0.2:15012",
        "CA_ADDRESS": "https://172.29.0.2:15012",
        "XDS_ROOT_CA": str(cwd / components.ROOT_CERT_PATH),
        "CA_ROOT_CA": str(cwd / components.ROOT_CERT_PATH),
        "AUTH_TOKEN": str(cwd / components.TOKEN_PATH),
        "CLUSTER_ID": "Kubernetes",
        "IPV6_ENABLED": "false",
    }
    # the same name, node, netns, log and readiness check as ours: status, restart and logs treat it alike
    assert (spec.name, spec.node, spec.netns, spec.log, spec.cwd) == (
        ours.name, ours.node, ours.netns, ours.log, ours.cwd)  # fmt: skip
    assert spec.checks == [HttpCheck(netns=spec.netns, host="127.0.0.1", port=15021, path="/healthz/ready")]


def test_implementation_survives_the_state_file_and_old_files_mean_ours(tmp_path: Path) -> None:
    p = plan()
    spec = components.ztunnel_spec(p, p.nodes[0], LabPaths(tmp_path), with_agent=True,
                                   ztunnel_bin=fake_binary(tmp_path))  # fmt: skip
    from ambient.lab.state import ProcessRecord

    state = LabState(prefix="t", run_dir=str(tmp_path / "t"), world_file="w",
                     processes=[ProcessRecord(spec=spec, pid=1, start_time=1)])  # fmt: skip
    save_state(state)
    loaded = load_state("t", tmp_path)
    assert loaded is not None and loaded.processes[0].spec.implementation == "istio/ztunnel"
    old = msgspec.json.decode(b'{"name":"z","component":"ztunnel","netns":"n","argv":[],"log":"l"}',
                              type=ComponentSpec)  # fmt: skip
    assert old.implementation == "ambient"


def test_node_token_file_has_no_newline(tmp_path: Path) -> None:
    # upstream ztunnel sends the file's bytes as the bearer token; a newline makes an invalid header value
    paths = LabPaths(tmp_path)
    components.write_node_secrets(paths, "node-a", "tok")
    assert (paths.node_dir("node-a") / components.TOKEN_PATH).read_bytes() == b"tok"


def test_ztunnel_bin_and_nodes_are_checked(tmp_path: Path) -> None:
    with pytest.raises(PrerequisiteError, match="no such file"):
        upstream.check_ztunnel_bin(tmp_path / "nope")
    plain = tmp_path / "plain"
    plain.write_text("")
    os.chmod(plain, 0o644)
    with pytest.raises(PrerequisiteError, match="not an executable"):
        upstream.check_ztunnel_bin(plain)
    assert upstream.check_ztunnel_bin(fake_binary(tmp_path)) == str((tmp_path / "ztunnel").resolve())
    p = plan()
    assert upstream.choose_nodes(p, None) == frozenset(n.name for n in p.nodes)
    assert upstream.choose_nodes(p, ["node-a"]) == frozenset({"node-a"})
    with pytest.raises(PrerequisiteError, match="no such node"):
        upstream.choose_nodes(p, ["node-z"])


def test_held_pods_are_read_from_upstreams_workload_state(monkeypatch: pytest.MonkeyPatch) -> None:
    dump = {"workloads": [], "workloadState": {
        "uid-1": {"state": "Up", "info": {"name": "a", "namespace": "ns", "serviceAccount": "sa"}},
        "uid-2": {"state": "Pending", "info": {"name": "b", "namespace": "ns", "serviceAccount": "sa"}},
    }}  # fmt: skip
    assert upstream.held_from_workload_state(dump) == {"uid-1": 0}
    monkeypatch.setattr("ambient.lab.lab.ztunnel_dump", lambda plan, node: dump)
    assert ztunnel_pods(plan(), "node-a") == {"uid-1"}
    ours = {"pods": [{"uid": "uid-3", "state": "up"}], "workloadState": {}}
    monkeypatch.setattr("ambient.lab.lab.ztunnel_dump", lambda plan, node: ours)
    assert ztunnel_pods(plan(), "node-a") == {"uid-3"}
