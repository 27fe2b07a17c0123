"""`lab up --kubernetes` without root: the API server's component specs, the node agents' and the stub's
Kubernetes settings, and the lab kubelet's decisions (which pods it runs, which it leaves to `up`, what a
deletion does) against a fake API with the real netns steps replaced by recorders."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import msgspec
import pytest

from ambient.lab import components, kube, kubelet
from ambient.lab.components import LabPaths
from ambient.lab.kubeapi import JSON, KubeRequestError
from ambient.lab.kubelet import Kubelet, KubeletPod, free_address, load_record, sandbox_plan
from ambient.lab.state import LabState, TcpCheck, save_state
from ambient.lab.tables import status_tables
from ambient.lab.topology import LabPlan, plan_lab
from services.istiod.world import load_world

WORLD = b"""
nodes: [{name: node-a, podCidr: 10.244.1.0/24}, {name: node-b, podCidr: 10.244.2.0/24}]
namespaces: [{name: bookinfo}]
pods: [{name: web, namespace: bookinfo, node: node-a, ips: [10.244.1.2], labels: {app: web}}]
"""


def plan() -> LabPlan:
    return plan_lab(load_world(WORLD, "w.yaml"), prefix="zl")


def test_etcd_and_the_api_server_run_in_the_control_plane_namespace(tmp_path: Path) -> None:
    p, paths = plan(), LabPaths(tmp_path)
    etcd = kube.etcd_spec(p, paths, Path("/bin-dir"))
    api = kube.apiserver_spec(p, paths, Path("/bin-dir"))
    assert etcd.netns == api.netns == "zl-cp"
    assert etcd.argv[0] == "/bin-dir/etcd" and "http://127.0.0.1:2379" in etcd.argv
    assert etcd.checks == [TcpCheck(netns="zl-cp", host="127.0.0.1", port=2379)]
    assert api.argv[0] == "/bin-dir/kube-apiserver"
    bind = api.argv[api.argv.index("--bind-address") + 1]
    assert bind == p.control_plane.ip and api.argv[api.argv.index("--secure-port") + 1] == "6443"
    assert api.argv[api.argv.index("--etcd-servers") + 1] == "http://127.0.0.1:2379"
    assert kube.server_url(p) == f"https://{p.control_plane.ip}:6443"


def test_node_agents_and_the_stub_take_the_lab_kubeconfig(tmp_path: Path) -> None:
    p, paths = plan(), LabPaths(tmp_path)
    agent = components.node_agent_spec(p, p.nodes[0], paths, kubernetes=True)
    assert agent.env["POD_SOURCE"] == "kubernetes" and agent.env["KUBECONFIG"] == str(paths.kubeconfig)
    assert "POD_SOURCE" not in components.node_agent_spec(p, p.nodes[0], paths).env
    stub = components.istiod_spec(p, paths, {}, "admin", kubernetes=True)
    assert stub.argv[-3:] == ["--kubernetes", "--kubeconfig", str(paths.kubeconfig)]
    assert "--kubernetes" not in components.istiod_spec(p, paths, {}, "admin").argv


def test_the_kubeconfig_names_the_control_plane_address(tmp_path: Path) -> None:
    import yaml
    from cryptography import x509

    p, paths = plan(), LabPaths(tmp_path)
    paths.kube.mkdir()
    kube.write_pki(p, paths)
    config = yaml.safe_load(paths.kubeconfig.read_text())
    assert config["clusters"][0]["cluster"]["server"] == f"https://{p.control_plane.ip}:6443"
    cert = x509.load_pem_x509_certificate((paths.kube / "pki" / "apiserver.crt").read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert p.control_plane.ip in [str(ip) for ip in sans.get_values_for_type(x509.IPAddress)]


def test_free_address_skips_the_gateway_and_used_addresses() -> None:
    assert free_address("10.244.1.0/24", []) == "10.244.1.2"
    assert free_address("10.244.1.0/24", ["10.244.1.2", "10.244.1.3"]) == "10.244.1.4"
    assert free_address("10.244.1.0/29", [f"10.244.1.{i}" for i in range(2, 7)]) is None


def pod_object(name: str, *, node: str = "node-a", uid: str | None = None, ip: str | None = None,
               deleting: bool = False) -> dict[str, Any]:  # fmt: skip
    meta: dict[str, Any] = {"name": name, "namespace": "bookinfo", "uid": uid or f"uid-{name}",
                            "resourceVersion": "7"}  # fmt: skip
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    status = {"phase": "Running", "podIP": ip, "podIPs": [{"ip": ip}]} if ip else {"phase": "Pending"}
    return {"metadata": meta, "spec": {"nodeName": node, "serviceAccountName": name}, "status": status}


def test_sandbox_plan_is_a_pod_of_its_node() -> None:
    pod = sandbox_plan(plan(), pod_object("extra"), "10.244.1.3")
    assert (pod.netns, pod.node, pod.address, pod.gateway) == ("zl-bookinfo-extra", "node-a", "10.244.1.3/24",
                                                               "10.244.1.1")  # fmt: skip
    assert pod.host_veth.startswith("veth") and len(pod.host_veth) <= 15
    assert pod.service_account == "extra" and pod.uid == "uid-extra"


class FakeApi:
    def __init__(self) -> None:
        self.calls: list[tuple[str, str, Any]] = []

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                content_type: str = JSON) -> dict[str, Any]:  # fmt: skip
        self.calls.append((method, path, body))
        return {}

    def get(self, path: str, params: Mapping[str, str] | None = None) -> dict[str, Any]:
        return self.request("GET", path)

    def create(self, path: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("POST", path, obj)

    def patch_status(self, namespace: str, name: str, patch: Mapping[str, Any]) -> dict[str, Any]:
        return self.request("PATCH", f"/api/v1/namespaces/{namespace}/pods/{name}/status", patch)

    def watch(self, path: str, resource_version: str) -> Iterator[dict[str, Any]]:
        return iter(())


@pytest.fixture
def node(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Kubelet, FakeApi, list[str]]:
    """A kubelet over a lab state in tmp_path, its fake API, and the netns actions it took."""
    p = plan()
    state = LabState(prefix="zl", run_dir=str(tmp_path), world_file="w.yaml", plan=msgspec.json.encode(p))
    save_state(state)
    (tmp_path / "kube").mkdir()
    actions: list[str] = []
    monkeypatch.setattr(kubelet, "create_pod_netns", lambda pod, **_: actions.append(f"add {pod.netns}"))
    monkeypatch.setattr(kubelet, "wire_pod", lambda _, pod: actions.append(f"wire {pod.address}"))
    monkeypatch.setattr(kubelet, "delete_netns", lambda name: actions.append(f"del {name}"))
    monkeypatch.setattr(components, "link_pod_netns", lambda *_: None)
    api = FakeApi()
    return Kubelet(tmp_path, api=api), api, actions


def test_a_new_pod_gets_a_netns_an_address_and_its_running_status(node: Any) -> None:
    kl, api, actions = node
    kl.listed([pod_object("web", uid=plan().pods[0].uid, ip="10.244.1.2"), pod_object("extra")])
    assert actions == ["add zl-bookinfo-extra", "wire 10.244.1.3/24"]  # .2 is web's
    method, path, body = api.calls[-1]
    assert (method, path) == ("PATCH", "/api/v1/namespaces/bookinfo/pods/extra/status")
    assert body["status"]["podIP"] == "10.244.1.3" and body["status"]["phase"] == "Running"
    assert [(p.key, p.state) for p in load_record(kl.paths).pods] == [("bookinfo/extra", "running")]


def test_up_pods_other_nodes_and_pods_with_an_ip_are_left_alone(node: Any) -> None:
    kl, api, actions = node
    kl.listed([pod_object("web", uid=plan().pods[0].uid), pod_object("far", node="node-z"),
               pod_object("running", ip="10.244.2.9")])  # fmt: skip
    assert actions == [] and api.calls == []


def test_a_deleted_pod_loses_its_netns_and_its_object(node: Any) -> None:
    kl, api, actions = node
    kl.listed([pod_object("web", uid=plan().pods[0].uid, ip="10.244.1.2"), pod_object("extra")])
    actions.clear()
    kl.changed(pod_object("extra", ip="10.244.1.3", deleting=True))
    assert actions == ["del zl-bookinfo-extra"]
    method, path, body = api.calls[-1]
    assert (method, path) == ("DELETE", "/api/v1/namespaces/bookinfo/pods/extra")
    assert body["gracePeriodSeconds"] == 0 and body["preconditions"] == {"uid": "uid-extra"}
    kl.gone(pod_object("extra"))  # the DELETED event that follows: nothing is removed twice
    assert actions == ["del zl-bookinfo-extra"]
    assert [p.state for p in load_record(kl.paths).pods] == ["deleted"]


def test_a_listing_without_a_pod_removes_it_also_one_of_ups(node: Any) -> None:
    kl, _api, actions = node
    kl.record.pods.append(KubeletPod(key="bookinfo/old", uid="uid-old", node="node-b",
                                     netns="zl-bookinfo-old", ip="10.244.2.2", state="running"))
    kl.listed([])
    assert sorted(actions) == ["del zl-bookinfo-old", "del zl-bookinfo-web"]
    removed = {p.key: p.from_plan for p in load_record(kl.paths).pods if p.state == "deleted"}
    assert removed == {"bookinfo/old": False, "bookinfo/web": True}


class LoadingApi(FakeApi):
    """Answers creates as the API server does: the object back with a uid of its own; `default` exists."""

    def request(self, method: str, path: str, body: Mapping[str, Any] | None = None, *,
                content_type: str = JSON) -> dict[str, Any]:  # fmt: skip
        super().request(method, path, body)
        if method == "POST" and body is not None and body["metadata"]["name"] == "default":
            raise KubeRequestError(409, "namespaces \"default\" already exists")
        if method == "POST" and body is not None:
            return {**body, "metadata": {**body["metadata"], "uid": f"server-{body['metadata']['name']}"}}
        return {}


def test_the_world_is_loaded_as_objects_without_pod_status_and_with_the_servers_uids() -> None:
    text = WORLD.replace(b"[{name: bookinfo}]", b"[{name: bookinfo}, {name: default, labels: {a: b}}]")
    world = load_world(text, "w.yaml")
    api = LoadingApi()
    assert kube.load_world(api, world) == {"bookinfo/web": "server-web"}
    paths = [(m, p) for m, p, _ in api.calls]
    assert paths == [("POST", "/api/v1/namespaces"), ("POST", "/api/v1/namespaces"),
                     ("PATCH", "/api/v1/namespaces/default"), ("POST", "/api/v1/nodes"),
                     ("POST", "/api/v1/nodes"), ("POST", "/api/v1/namespaces/bookinfo/pods")]  # fmt: skip
    assert api.calls[2][2] == {"metadata": {"labels": {"a": "b"}}}  # the existing namespace gets the labels
    pod = api.calls[-1][2]
    assert "status" not in pod and "uid" not in pod["metadata"]
    assert pod["spec"]["nodeName"] == "node-a" and pod["metadata"]["labels"]["app"] == "web"


def test_status_names_the_api_server_under_the_nodes() -> None:
    data = {"prefix": "zl", "phase": "up", "nodes": [], "pods": [], "services": [], "components": [],
            "control_plane": {"answered": True, "kube_apiserver": "https://172.29.0.2:6443",
                              "kubeconfig": "/run/ambient-lab/zl/kube/kubeconfig"}}  # fmt: skip
    caption = str(status_tables(data)[0].caption)
    assert "https://172.29.0.2:6443" in caption and "/run/ambient-lab/zl/kube/kubeconfig" in caption


def test_a_half_made_sandbox_is_made_again_with_its_address(node: Any) -> None:
    kl, api, actions = node
    kl.record.pods.append(KubeletPod(key="bookinfo/extra", uid="uid-extra", node="node-a",
                                     netns="zl-bookinfo-extra", ip="10.244.1.7", state="creating"))
    kl.changed(pod_object("extra"))
    assert actions == ["del zl-bookinfo-extra", "add zl-bookinfo-extra", "wire 10.244.1.7/24"]
    assert api.calls[-1][2]["status"]["podIP"] == "10.244.1.7"
    assert [(p.key, p.state) for p in load_record(kl.paths).pods] == [("bookinfo/extra", "running")]
