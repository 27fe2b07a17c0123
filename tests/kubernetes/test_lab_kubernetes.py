"""`ambient lab up --kubernetes` end to end (root, and the Kubernetes binaries): bookinfo in a namespace
that is not labelled; `lab kubectl -- label namespace bookinfo istio.io/dataplane-mode=ambient` enrols its
pods (the node agents write the redirection annotation, `lab status` shows it), a request crosses nodes
through HBONE (access-log lines on both ztunnels), removing the label un-enrols them; after a restart of
the API server a pod applied later gets a netns and an address of its node and is enrolled, and deleting
pods removes their namespaces."""

from __future__ import annotations

import json
import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from ambient.lab import lab
from ambient.lab.state import load_state, process_start_time
from ambient.lab.topology import ETC_NETNS
from tests.netns.test_lab_mesh import wait_for_lines
from tests.netns.test_lab_topology import NET_A, NET_B, client_get, force_clean, lab_netns, needs_mesh

pytestmark = [pytest.mark.netns, needs_mesh]


def _unlabelled_bookinfo() -> str:
    """The sample world with the bookinfo namespace unlabelled: not ambient, and not behind its waypoint
    (the Kubernetes path carries no L7 policies or routes yet), its waypoint pod kept."""
    world = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml").read_text())
    for ns in world["namespaces"]:
        if ns["name"] == "bookinfo":
            ns["labels"] = {}
    text = yaml.safe_dump(world, sort_keys=False)
    return text.replace("10.244.1.", f"10.244.{NET_A}.").replace("10.244.2.", f"10.244.{NET_B}.")


WORLD = _unlabelled_bookinfo()
WAYPOINT_POD = "waypoint-7c8d9e"
PRODUCTPAGE_IP, DETAILS_IP = f"10.244.{NET_A}.10", f"10.244.{NET_B}.10"
LABEL = "istio.io/dataplane-mode"
WAIT = 60.0


@pytest.fixture
def kube_lab(tmp_path: Path, kube_binaries: None) -> Iterator[str]:
    prefix = f"zl{os.getpid() % 100000}{uuid.uuid4().hex[:4]}"
    world = tmp_path / "bookinfo.yaml"
    world.write_text(WORLD)
    try:
        lab.up(prefix=prefix, world_file=world, timeout=60, kubernetes=True)
        yield prefix
    finally:
        try:
            lab.down(prefix=prefix)
        finally:
            force_clean(prefix)


def kubectl(prefix: str, *args: str, stdin: str | None = None) -> str:
    if stdin is None:
        result = lab.kubectl_command(list(args), prefix=prefix, capture=True)
    else:  # kubectl reads the manifest from a file the test writes
        path = Path(lab.require_state(prefix).run_dir) / f"manifest-{uuid.uuid4().hex[:6]}.yaml"
        path.write_text(stdin)
        result = lab.kubectl_command([*args, "-f", str(path)], prefix=prefix, capture=True)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout.decode()


def pods_by_name(prefix: str) -> dict[str, dict[str, Any]]:
    return {p["name"]: p for p in lab.status(prefix=prefix)["pods"]}


def until(check: Callable[[], Any], what: str) -> Any:
    deadline = time.monotonic() + WAIT
    while not (result := check()):
        assert time.monotonic() < deadline, f"not within {WAIT:.0f} s: {what}"
        time.sleep(0.3)
    return result


def test_labelling_bookinfo_enrols_it_and_a_request_crosses_nodes_through_hbone(kube_lab: str) -> None:
    prefix = kube_lab
    data = lab.status(prefix=prefix)
    assert data["control_plane"]["answered"] and data["control_plane"]["kube_apiserver"].endswith(":6443")
    running = {c["name"]: c["running"] for c in data["components"]}
    assert running["etcd"] and running["kube-apiserver"] and running["kubelet"], running
    pods = pods_by_name(prefix)
    bookinfo = [n for n, p in pods.items() if p["namespace"] == "bookinfo" and n != WAYPOINT_POD]
    assert len(bookinfo) == 5 and WAYPOINT_POD in pods
    assert all(pods[n]["redirection"] is None for n in bookinfo), pods
    assert pods["sleep-5c6d7e"]["redirection"] == "enabled"  # its namespace is labelled in the world file
    # the API server has them as a kubelet left them: Running, with the lab's addresses
    listed = json.loads(kubectl(prefix, "get", "pods", "-n", "bookinfo", "-o", "json"))["items"]
    seen = {p["metadata"]["name"]: p["status"] for p in listed}["productpage-v1-6f9c7d"]
    assert (seen["phase"], seen["podIP"]) == ("Running", PRODUCTPAGE_IP)
    assert seen["containerStatuses"][0]["ready"] is True  # kubectl's READY 1/1

    kubectl(prefix, "label", "namespace", "bookinfo", f"{LABEL}=ambient")
    until(lambda: all(pods_by_name(prefix)[n]["redirection"] == "enabled" for n in bookinfo),
          "every bookinfo pod enrolled after the label")
    assert pods_by_name(prefix)[WAYPOINT_POD]["redirection"] is None  # a waypoint's pod is never captured
    annotation = kubectl(prefix, "get", "pod", "details-v1-5f4d58", "-n", "bookinfo", "-o",
                         "jsonpath={.metadata.annotations.ambient\\.istio\\.io/redirection}")  # fmt: skip
    assert annotation == "enabled"
    assert "--to-ports 15001" in lab.exec_in_pod(["iptables-save"], pod="productpage", prefix=prefix,
                                                 capture=True).stdout.decode()  # fmt: skip

    def through_mesh() -> bool:
        code, body, _ = client_get(prefix, "http://details.bookinfo:9080/details/0", pod="productpage")
        return code == 0 and body is not None

    until(through_mesh, "productpage reaches details through the mesh")
    outbound = wait_for_lines(prefix, "node-a", "outbound", f"src.addr={PRODUCTPAGE_IP}:")
    inbound = wait_for_lines(prefix, "node-b", "inbound", f"dst.hbone_addr={DETAILS_IP}:9080")
    assert outbound and inbound, list(lab.access_logs(prefix=prefix))
    for line in (outbound[-1], inbound[-1]):
        assert f"dst.addr={DETAILS_IP}:15008 dst.hbone_addr={DETAILS_IP}:9080" in line
        assert 'src.identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"' in line
        assert 'dst.identity="spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details"' in line

    kubectl(prefix, "label", "namespace", "bookinfo", f"{LABEL}-")
    until(lambda: all(pods_by_name(prefix)[n]["redirection"] is None for n in bookinfo),
          "every bookinfo pod un-enrolled after the label went")
    state = load_state(prefix)
    assert state is not None
    details_uid = pods_by_name(prefix)["details-v1-5f4d58"]["uid"]
    until(lambda: details_uid not in lab.ztunnel_pods(lab.plan_of(state), "node-b"), "ztunnel let details go")
    assert "ISTIO" not in lab.exec_in_pod(["iptables-save"], pod="details", prefix=prefix,
                                          capture=True).stdout.decode()  # fmt: skip


def test_applied_pods_get_a_netns_and_deleted_pods_lose_theirs(kube_lab: str) -> None:
    prefix = kube_lab
    # first the API server restarts (etcd keeps the objects): the kubelet, the node agents and the stub
    # all have to watch again for what follows to work
    assert lab.restart("kube-apiserver", prefix=prefix, timeout=60) == ["kube-apiserver"]
    extra = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "extra", "namespace": "sleep"},
             "spec": {"nodeName": "node-b", "containers": [{"name": "app", "image": "lab"}]}}  # fmt: skip
    kubectl(prefix, "apply", stdin=yaml.safe_dump(extra))
    extra_pod = until(lambda: pods_by_name(prefix).get("extra"), "the applied pod runs")
    assert extra_pod["node"] == "node-b" and extra_pod["ip"].startswith(f"10.244.{NET_B}.")
    assert f"{prefix}-sleep-extra" in lab_netns(prefix)
    ip = kubectl(prefix, "get", "pod", "extra", "-n", "sleep", "-o", "jsonpath={.status.podIP}")
    assert ip == extra_pod["ip"]
    # its namespace is ambient: the node agent enrols it by its address, as any pod
    until(lambda: pods_by_name(prefix)["extra"]["redirection"] == "enabled", "the applied pod enrolled")

    kubectl(prefix, "delete", "pod", "extra", "-n", "sleep", "--timeout=60s")
    kubectl(prefix, "delete", "pod", "ratings-v1-8c9f0b", "-n", "bookinfo", "--timeout=60s")
    assert f"{prefix}-sleep-extra" not in lab_netns(prefix)
    assert f"{prefix}-bookinfo-ratings-v1-8c9f0b" not in lab_netns(prefix)
    pods = pods_by_name(prefix)
    assert "extra" not in pods and pods["ratings-v1-8c9f0b"]["enrolment"] == "deleted"
    assert kubectl(prefix, "get", "pods", "-A", "--field-selector", "metadata.name=extra", "-o", "name") == ""

    # down removes everything, also what the kubelet made after up, and stops etcd and the API server
    left = {**extra, "metadata": {"name": "left", "namespace": "sleep"}}
    kubectl(prefix, "apply", stdin=yaml.safe_dump(left))
    until(lambda: f"{prefix}-sleep-left" in lab_netns(prefix), "the last applied pod has its netns")
    state = load_state(prefix)
    assert state is not None
    started = [(p.pid, p.start_time) for p in state.processes]
    assert lab.down(prefix=prefix)
    assert lab_netns(prefix) == [] and not list(ETC_NETNS.glob(f"{prefix}-*"))
    assert all(process_start_time(pid) != start for pid, start in started)
