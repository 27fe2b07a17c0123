"""The CNI-event endpoint over a real Unix socket, driven by raw HTTP and by the `ambient-cni` plugin."""

from __future__ import annotations

import io
import json
import os
from collections.abc import AsyncIterator, Mapping
from functools import partial
from pathlib import Path

import pytest
import trio

from services.node_agent import cni_plugin
from services.node_agent.cni_server import CniEndpoint, parse_add_request
from services.node_agent.errors import CniRequestError
from services.node_agent.model import Pod
from services.node_agent.testing import FakeNode
from shared.httpd import open_unix_listener, serve_http
from shared.zds.types import PodUid
from tests.service.http_peers import misbehaving_peers


class World(FakeNode):
    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self.known: dict[tuple[str, str], tuple[Pod, Mapping[str, str]]] = {}

    def lookup(self, namespace: str, name: str) -> tuple[Pod, Mapping[str, str]] | None:
        return self.known.get((namespace, name))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    (tmp_path / "cni").mkdir()  # the server socket's owner makes its directory
    w = World(str(tmp_path / "cni" / "pluginevent.sock"))
    endpoint = CniEndpoint(w.agent, w.lookup)
    try:
        async with trio.open_nursery() as nursery:
            listener = await open_unix_listener(w.path)
            await nursery.start(serve_http, endpoint.route, [listener])
            await nursery.start(w.agent.run)
            yield w
            nursery.cancel_scope.cancel()
    finally:
        w.close()


async def post(path: str, body: bytes, target: str = "/cmdadd") -> tuple[int, dict[str, object]]:
    stream = await trio.open_unix_socket(path)
    async with stream:
        head = (
            f"POST {target} HTTP/1.1\r\nhost: x\r\ncontent-length: {len(body)}\r\nconnection: close\r\n\r\n"
        )
        await stream.send_all(head.encode() + body)
        data = b""
        while chunk := await stream.receive_some(65536):
            data += chunk
    header, _, payload = data.partition(b"\r\n\r\n")
    return int(header.split()[1]), json.loads(payload)


def add_body(**overrides: object) -> bytes:
    body: dict[str, object] = {
        "Netns": "/run/netns/pod-a",
        "PodName": "a",
        "PodNamespace": "default",
        "PodUID": "uid-a",
        "IPs": [{"Interface": "eth0", "Address": "10.244.1.5/24", "Gateway": "10.244.1.1"}],
    }
    body.update(overrides)
    return json.dumps({k: v for k, v in body.items() if v is not None}).encode()


async def test_cmdadd_enrols_pod(world: World) -> None:
    status, answer = await post(world.path, add_body())
    assert (status, answer["status"]) == (200, "enabled")
    assert world.status.current == {PodUid("uid-a"): "enabled"}
    assert oct(os.stat(world.path).st_mode & 0o777) == "0o600"


async def test_misbehaving_peers_leave_the_next_cmdadd_its_200(world: World) -> None:
    with trio.fail_after(20):
        async with misbehaving_peers(partial(trio.open_unix_socket, world.path), "/cmdadd"):
            status, answer = await post(world.path, add_body())
    assert (status, answer["status"]) == (200, "enabled")
    assert world.status.current == {PodUid("uid-a"): "enabled"}


async def test_cmdadd_pending_when_ztunnel_absent_is_still_2xx(world: World) -> None:
    world.ztunnel.set_connected(False)
    status, answer = await post(world.path, add_body())
    assert (status, answer["status"]) == (200, "pending")
    assert len(world.applier.installed) == 1


async def test_cmdadd_missing_netns_is_500(world: World) -> None:
    world.opener.missing.add("/run/netns/pod-a")
    status, answer = await post(world.path, add_body())
    assert status == 500 and "does not exist" in str(answer["error"])
    assert world.applier.installed == {}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        (add_body(Netns=None), "Netns"),
        (add_body(PodName=""), "PodName is empty"),
        (add_body(PodUID=None), "needs PodUID"),
        (add_body(IPs=[{"Address": "not-an-ip"}]), "not an IP address"),
        (b"{not json", "not JSON"),
        (add_body(PodName=5), "PodName"),
    ],
)
async def test_cmdadd_bad_requests_are_400(world: World, body: bytes, needle: str) -> None:
    status, answer = await post(world.path, body)
    assert status == 400 and needle in str(answer["error"])
    assert world.applier.calls == []


async def test_cmdadd_uses_pod_watch_and_its_eligibility(world: World) -> None:
    known = Pod(uid=PodUid("uid-a"), name="a", namespace="default", service_account="sa", labels={})
    world.known[("default", "a")] = (known, {})
    status, answer = await post(world.path, add_body())
    assert (status, answer["status"]) == (200, "skipped")
    world.known[("default", "a")] = (known, {"istio.io/dataplane-mode": "ambient"})
    status, answer = await post(world.path, add_body())
    assert (status, answer["status"]) == (200, "enabled")
    assert world.ztunnel.added[0][1].service_account == "sa"


async def test_unknown_path_is_404(world: World) -> None:
    status, _ = await post(world.path, b"", target="/nope")
    assert status == 404


def run_plugin(env: dict[str, str], config: Mapping[str, object]) -> tuple[int, dict[str, object]]:
    out = io.StringIO()
    code = cni_plugin.run(env, io.StringIO(json.dumps(config)), out)
    return code, json.loads(out.getvalue())


PREV: dict[str, object] = {
    "cniVersion": "1.0.0",
    "interfaces": [{"name": "eth0", "sandbox": "/run/netns/pod-a"}],
    "ips": [{"address": "10.244.1.5/24", "gateway": "10.244.1.1", "interface": 0}],
}


def plugin_env(**extra: str) -> dict[str, str]:
    env = {
        "CNI_COMMAND": "ADD",
        "CNI_NETNS": "/run/netns/pod-a",
        "CNI_ARGS": "IgnoreUnknown=1;K8S_POD_NAMESPACE=default;K8S_POD_NAME=a;K8S_POD_UID=uid-a",
    }
    env.update(extra)
    return env


async def test_plugin_add_prints_prev_result(world: World) -> None:
    config = {"cniVersion": "1.0.0", "name": "k8s", "type": "ambient-cni", "cni_event_address": world.path}
    code, result = await trio.to_thread.run_sync(run_plugin, plugin_env(), {**config, "prevResult": PREV})
    assert code == 0 and result == PREV
    assert world.status.current == {PodUid("uid-a"): "enabled"}
    assert world.ztunnel.added[0][0] == "uid-a"


async def test_plugin_add_failure_is_a_cni_error(world: World) -> None:
    world.opener.missing.add("/run/netns/pod-a")
    config = {"cniVersion": "1.0.0", "name": "k8s", "cni_event_address": world.path, "prevResult": PREV}
    code, result = await trio.to_thread.run_sync(run_plugin, plugin_env(), config)
    assert code == 1
    assert result["code"] == cni_plugin.ERR_ENROLMENT_FAILED and "does not exist" in str(result["details"])


def test_plugin_unreachable_agent_is_try_again(tmp_path: Path) -> None:
    config = {"cniVersion": "1.0.0", "cni_event_address": str(tmp_path / "none.sock"), "prevResult": PREV}
    code, result = run_plugin(plugin_env(), config)
    assert code == 1 and result["code"] == cni_plugin.ERR_TRY_AGAIN and "node-agent" in str(result["details"])


def test_plugin_version_del_and_bad_input() -> None:
    code, result = run_plugin({"CNI_COMMAND": "VERSION"}, {})
    assert code == 0 and "1.0.0" in result["supportedVersions"]  # type: ignore[operator]
    out = io.StringIO()
    assert cni_plugin.run({"CNI_COMMAND": "DEL"}, io.StringIO("{}"), out) == 0 and out.getvalue() == ""
    code, result = run_plugin({"CNI_COMMAND": "BOGUS"}, {})
    assert code == 1 and result["code"] == cni_plugin.ERR_INVALID_ENV
    out = io.StringIO()
    assert cni_plugin.run({"CNI_COMMAND": "ADD"}, io.StringIO("{bad"), out) == 1
    assert json.loads(out.getvalue())["code"] == cni_plugin.ERR_DECODE
    code, result = run_plugin(plugin_env(CNI_NETNS=""), {"cniVersion": "1.0.0"})
    assert code == 1 and result["code"] == cni_plugin.ERR_INVALID_ENV
    code, result = run_plugin(plugin_env(), {"cniVersion": "9.9.9"})
    assert code == 1 and result["code"] == cni_plugin.ERR_INCOMPATIBLE_VERSION


def test_plugin_passes_non_pod_through() -> None:
    code, result = run_plugin(plugin_env(CNI_ARGS=""), {"cniVersion": "1.0.0", "prevResult": PREV})
    assert code == 0 and result == PREV


def test_parse_add_request_accepts_upstream_body() -> None:
    req = parse_add_request(add_body(PodUID=None))
    assert req.pod_uid is None and req.ips[0].interface == "eth0"
    with pytest.raises(CniRequestError):
        parse_add_request(b"[]")
