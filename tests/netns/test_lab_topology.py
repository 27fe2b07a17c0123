"""The lab for real (root): two nodes, two pods, cross-node traffic inside the lab, and a clean `down`.

Every test uses its own prefix and removes what it made in `finally`, also when `down` itself fails.
Traffic only ever flows between lab namespaces (`lab exec` in a pod), never from the host namespace.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from ambient.lab import components, lab
from ambient.lab.errors import AlreadyUpError, ComponentError
from ambient.lab.state import is_running, load_state, process_start_time, run_dir, save_state
from ambient.lab.topology import ETC_NETNS, apply_plan, plan_lab

# Pod ranges are random per test run: node agents find a restarted pod's netns by scanning the host for
# its IP, so labs of concurrent runs on one host must not share pod addresses.
NET_A, NET_B = random.sample(range(100, 250), 2)
CLIENT_IP, WEB_IP = f"10.244.{NET_A}.10", f"10.244.{NET_B}.10"

WORLD = """
nodes:
  - {name: node-a, podCidr: 10.244.1.0/24}
  - {name: node-b, podCidr: 10.244.2.0/24}
namespaces:
  - {name: plain}
pods:
  - {name: client, namespace: plain, node: node-a, ips: [10.244.1.10], labels: {app: sleep}}
  - {name: web, namespace: plain, node: node-b, ips: [10.244.2.10], labels: {app: web}}
services:
  - {name: web, namespace: plain, vips: [10.96.0.50], selector: {app: web},
     ports: [{port: 80, targetPort: 8080}]}
""".replace("10.244.1.", f"10.244.{NET_A}.").replace("10.244.2.", f"10.244.{NET_B}.")


def lab_netns(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")]


def force_clean(prefix: str) -> None:
    """Last resort after a failed test: only names carrying this test's unique prefix."""
    for name in lab_netns(prefix):
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)
    if ETC_NETNS.exists():
        for path in ETC_NETNS.glob(f"{prefix}-*"):
            subprocess.run(["rm", "-rf", str(path)], check=False)
    subprocess.run(["rm", "-rf", str(run_dir(prefix))], check=False)


needs_mesh = pytest.mark.skipif(
    not (components.available("node-agent") and components.available("ztunnel")),
    reason="needs the node agent and ztunnel processes",
)


@contextmanager
def running_lab(letter: str, world: str, directory: Path, **up_options: Any) -> Iterator[str]:
    """A lab up from `world` (YAML text) under a unique prefix starting with `letter`; always removed.
    `up_options` go to `lab.up` (for example `ztunnel_bin=`)."""
    prefix = f"{letter}{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    path = directory / f"{prefix}.yaml"
    path.write_text(world)
    try:
        lab.up(prefix=prefix, world_file=path, timeout=30, **up_options)
        yield prefix
    finally:
        try:
            lab.down(prefix=prefix)
        finally:
            force_clean(prefix)


@pytest.fixture
def prefix() -> Iterator[str]:
    name = f"t{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    try:
        yield name
    finally:
        try:
            lab.down(prefix=name)
        finally:
            force_clean(name)


@pytest.fixture
def world_file(tmp_path: Path) -> Path:
    path = tmp_path / "world.yaml"
    path.write_text(WORLD)
    return path


def client_get(prefix: str, url: str, pod: str = "client") -> tuple[int, dict[str, Any] | None, str]:
    result = lab.exec_in_pod(
        ["python", "-m", "services.apps.client", "-m", "5", url], pod=pod, prefix=prefix, capture=True
    )
    body = json.loads(result.stdout) if result.returncode == 0 and result.stdout else None
    return result.returncode, body, result.stderr.decode()


def assert_gone(prefix: str, pids: list[tuple[int, int]]) -> None:
    assert lab_netns(prefix) == []
    assert not run_dir(prefix).exists()
    assert not ETC_NETNS.exists() or list(ETC_NETNS.glob(f"{prefix}-*")) == []
    for pid, start in pids:
        assert process_start_time(pid) != start, f"pid {pid} still runs"


def test_two_nodes_two_pods_cross_node_traffic_then_clean_down(prefix: str, world_file: Path) -> None:
    state = lab.up(prefix=prefix, world_file=world_file, timeout=30)
    assert state.phase == "up"
    assert sorted(lab_netns(prefix)) == sorted(
        f"{prefix}-{n}" for n in ("fabric", "cp", "node-a", "node-b", "plain-client", "plain-web")
    )
    assert all(is_running(p) for p in state.processes)

    # pod to pod across nodes, by pod IP: the server sees the client's own address (routed, not NATed)
    code, body, err = client_get(prefix, f"http://{WEB_IP}:8080/direct")
    assert code == 0, err
    assert body is not None
    served = body["served_by"]
    assert (served["pod"], served["namespace"]) == ("web", "plain")
    assert str(served["peer"]).startswith(f"{CLIENT_IP}:")

    # by service name: the cluster DNS (the pod's resolv.conf) gives the VIP, the node's DNAT the endpoint
    code, body, err = client_get(prefix, "http://web/by-name")
    assert code == 0, err
    assert body is not None and body["path"] == "/by-name"
    code, _, _ = client_get(prefix, "http://web.plain.svc.cluster.local/fqdn")
    assert code == 0

    node_a = f"{prefix}-node-a"
    forward = subprocess.run(
        ["ip", "netns", "exec", node_a, "cat", "/proc/sys/net/ipv4/ip_forward"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert forward == "1"

    # exit codes pass through `lab exec`
    assert lab.exec_in_pod(["sh", "-c", "exit 3"], pod="client", prefix=prefix).returncode == 3
    code, _, err = client_get(prefix, f"http://{WEB_IP}:9999/")
    assert code == 7, err

    status = lab.status(prefix=prefix)
    assert {p["name"]: (p["node"], p["ip"], p["enrolment"]) for p in status["pods"]} == {
        "client": ("node-a", CLIENT_IP, "not-ambient"),
        "web": ("node-b", WEB_IP, "not-ambient"),
    }
    assert {c["name"] for c in status["components"]} >= {"istiod", "app/plain/client", "app/plain/web"}

    pids = [(p.pid, p.start_time) for p in state.processes]
    assert lab.down(prefix=prefix)
    assert_gone(prefix, pids)
    assert not lab.down(prefix=prefix)  # a second down has nothing to do


def test_second_up_with_the_same_prefix_is_refused_and_leaves_the_first_intact(
    prefix: str, world_file: Path
) -> None:
    lab.up(prefix=prefix, world_file=world_file, timeout=30)
    with pytest.raises(AlreadyUpError, match=f"lab '{prefix}' is already up"):
        lab.up(prefix=prefix, world_file=world_file, timeout=30)
    code, _, err = client_get(prefix, "http://web/")
    assert code == 0, err


def test_failed_up_removes_everything_it_made(
    prefix: str, world_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = components.app_spec

    def broken(pod, paths):  # type: ignore[no-untyped-def]
        spec = real(pod, paths)
        if pod.name != "web":
            return spec
        argv = [components.PYTHON, "-c", "import sys; sys.exit('web: cannot start: boom')"]
        return type(spec)(**{**{f: getattr(spec, f) for f in spec.__struct_fields__}, "argv": argv})

    monkeypatch.setattr(components, "app_spec", broken)
    with pytest.raises(ComponentError) as info:
        lab.up(prefix=prefix, world_file=world_file, timeout=10)
    message = str(info.value)
    assert "app/plain/web exited during start-up" in message
    assert "boom" in message and "app_plain_web.log" in message
    assert_gone(prefix, [])


def test_down_after_a_crashed_up_removes_what_the_state_file_recorded(prefix: str, world_file: Path) -> None:
    world, source = lab.load_lab_world(world_file, None)
    plan = plan_lab(world, prefix=prefix, source=source)
    builder = lab.LabBuilder(plan, world, source, root=None, timeout=30, progress=lambda _: None)
    builder.paths.run_dir.mkdir(parents=True)
    save_state(builder.state)
    apply_plan(plan, on_netns=builder.record_netns, on_file=builder.record_file, pods=plan.pods[:1])
    record = builder.launch(components.app_spec(plan.pods[0], builder.paths))
    # `up` "crashes" here: no clean-up ran; a later `down` finds everything in the state file
    recorded = load_state(prefix)
    assert recorded is not None and recorded.phase == "building"
    assert len(lab_netns(prefix)) == 5
    assert lab.down(prefix=prefix)
    assert_gone(prefix, [(record.pid, record.start_time)])


def test_sigterm_during_up_rolls_back_like_ctrl_c(prefix: str, world_file: Path) -> None:
    """`ambient lab up` killed with SIGTERM mid-build removes what it made and exits 143."""
    up = subprocess.Popen(
        [sys.executable, "-c", "from ambient.cli import main; main()", "lab", "up", "--prefix", prefix,
         "--world", str(world_file)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:  # mid-build: istiod launched, not yet up
            state = load_state(prefix)
            if state is not None and state.processes:
                break
            assert up.poll() is None and time.monotonic() < deadline, "lab up never got going"
            time.sleep(0.05)
        pids = [(p.pid, p.start_time) for p in state.processes]
        assert state.phase == "building"
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=60)
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    assert up.returncode == 143, err.decode()
    assert b"lab up failed: removing what was made" in err and b"Traceback" not in err
    assert_gone(prefix, pids)
