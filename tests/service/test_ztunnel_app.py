"""The ztunnel process end to end without root: a real ZDS server (node-agent role) over a SEQPACKET socket,
pipe fds as netns handles, the loopback socket factory, and the admin/stats/readiness HTTP endpoints."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import msgspec
import pytest
import trio

from services.node_agent.zds_server import ZdsServer
from services.ztunnel import app as app_module
from services.ztunnel import host
from services.ztunnel.admin import ZtunnelParts
from services.ztunnel.app import run_ztunnel
from services.ztunnel.config import ZtunnelConfig, drain_deadline, load_config
from services.ztunnel.errors import ConfigError
from shared.zds.errors import ZdsNack
from shared.zds.types import PodUid, SnapshotEntry, WorkloadInfo
from tests.service.http_peers import misbehaving_peers
from tests.service.test_ztunnel_inpod import FakeSockets
from tests.service.zds_fakes import wait_until

INFO = WorkloadInfo(name="app", namespace="ns", service_account="sa")


class Snapshot:
    def __init__(self) -> None:
        self.entries: list[SnapshotEntry] = []

    def snapshot(self) -> list[SnapshotEntry]:
        return list(self.entries)


@pytest.fixture
def pipe_fds() -> Iterator[list[int]]:
    fds: list[int] = []
    for _ in range(3):
        fds.extend(os.pipe())
    try:
        yield fds[0::2]
    finally:
        for fd in fds:
            os.close(fd)


async def http_get(addr: tuple[str, int], target: str) -> tuple[int, bytes]:
    stream = await trio.open_tcp_stream(*addr)
    async with stream:
        await stream.send_all(f"GET {target} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        data = bytearray()
        while chunk := await stream.receive_some():
            data += chunk
    head, _, body = bytes(data).partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def config(tmp_path: Path) -> ZtunnelConfig:
    return ZtunnelConfig(inpod_uds=str(tmp_path / "zds.sock"), admin_addr=("127.0.0.1", 0),
                         stats_addr=("127.0.0.1", 0), readiness_addr=("127.0.0.1", 0), drain_deadline=0.5)


async def test_zds_drives_pods_and_endpoints_report_them(tmp_path: Path, pipe_fds: list[int]) -> None:
    cfg = config(tmp_path)
    fake = FakeSockets()
    snap = Snapshot()
    snap.entries.append(SnapshotEntry(uid=PodUid("pod-a"), info=INFO, netns_fd=pipe_fds[0]))
    shutdown = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app: ZtunnelParts = await nursery.start(lambda **kw: run_ztunnel(cfg, shutdown=shutdown,
                                                                           sockets=fake, **kw))
            ready = app.addresses["readiness"][0]
            admin = app.addresses["admin"][0]
            stats = app.addresses["stats"][0]
            status, body = await http_get(ready, "/healthz/ready")
            assert status == 503 and b"inpod snapshot" in body

            server = ZdsServer(cfg.inpod_uds, snap, accept_interval=0)
            await nursery.start(server.serve)
            await server.wait_connections()
            await wait_until(lambda: app.manager.ready)
            assert (await http_get(ready, "/healthz/ready"))[0] == 200

            await server.add_workload(PodUid("pod-b"), INFO, pipe_fds[1])
            status, body = await http_get(admin, "/config_dump")
            dump = json.loads(body)
            assert status == 200
            assert [p["uid"] for p in dump["pods"]] == ["pod-a", "pod-b"]
            assert {li["role"] for li in dump["pods"][0]["listeners"]} == {"outbound", "inbound_plaintext",
                                                                           "inbound_hbone"}
            assert dump["zds"]["ready"] is True

            await server.del_workload(PodUid("pod-a"))
            assert set(app.handler.pods) == {"pod-b"}

            fake.fail_with = "port 15008 is already in use inside the pod"
            with pytest.raises(ZdsNack, match="failure to start proxy : port 15008"):
                await server.add_workload(PodUid("pod-c"), INFO, pipe_fds[2])
            status, body = await http_get(ready, "/healthz/ready")
            assert status == 503  # a pending pod blocks readiness

            status, body = await http_get(stats, "/stats/prometheus")
            assert status == 200 and re.search(rb"^istio_proxies_started_total 2\.0$", body, re.M)
            assert (await http_get(stats, "/metrics"))[0] == 200

            status, body = await http_get(admin, "/logging?level=access=debug")
            assert status == 200 and b"access=debug" in body
            assert (await http_get(admin, "/logging?level=loud"))[0] == 400
            assert (await http_get(admin, "/nope"))[0] == 404

            shutdown.set()
            await wait_until(lambda: not app.handler.pods)
            nursery.cancel_scope.cancel()


async def test_misbehaving_peers_on_admin_stats_and_readiness_leave_others_their_answer(
        tmp_path: Path) -> None:
    cfg = config(tmp_path)
    shutdown = trio.Event()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            app: ZtunnelParts = await nursery.start(lambda **kw: run_ztunnel(cfg, shutdown=shutdown,
                                                                           sockets=FakeSockets(), **kw))
            answers = {}
            for name, target in [("admin", "/config_dump"), ("stats", "/stats/prometheus"),
                                 ("readiness", "/healthz/ready")]:
                addr = app.addresses[name][0]
                async with misbehaving_peers(partial(trio.open_tcp_stream, *addr), target):
                    answers[name] = (await http_get(addr, target))[0]
            shutdown.set()
            nursery.cancel_scope.cancel()
    assert answers == {"admin": 200, "stats": 200, "readiness": 503}  # not ready: no ZDS snapshot yet


def test_config_reads_upstream_env_names() -> None:
    cfg = load_config({"INPOD_UDS": "/tmp/x.sock", "NODE_NAME": "node-a", "LOG_FORMAT": "json",
                       "XDS_ADDRESS": "http://istiod:15012", "IPV6_ENABLED": "false",
                       "ENABLE_ORIG_SRC": "true", "ADMIN_ADDR": "127.0.0.1:25000"})
    assert cfg.inpod_uds == "/tmp/x.sock" and cfg.node_name == "node-a" and cfg.log_format == "json"
    assert cfg.xds_address == "http://istiod:15012"
    assert cfg.xds_target is not None and cfg.xds_target.port == 15012
    assert cfg.xds_target.root_cert_pem is None  # http:// = plaintext
    assert cfg.proxy.ipv6 is False and cfg.proxy.orig_src is True
    assert cfg.admin_addr == ("127.0.0.1", 25000)
    assert load_config({}).inpod_uds == "/var/run/ztunnel/ztunnel.sock"
    with pytest.raises(ConfigError, match="LOG_FORMAT"):
        load_config({"LOG_FORMAT": "xml"})
    with pytest.raises(ConfigError, match="XDS_ROOT_CERT"):
        load_config({"XDS_ADDRESS": "https://istiod:15012", "XDS_ROOT_CERT": "/nonexistent/root.pem"})
    with pytest.raises(ConfigError, match="ENABLE_ORIG_SRC"):
        load_config({"ENABLE_ORIG_SRC": "maybe"})


def test_ca_defaults_to_the_xds_settings_and_is_only_built_with_xds() -> None:
    assert load_config({"CA_ADDRESS": "http://ca:15012"}).ca_target is None  # no xDS, no mesh
    cfg = load_config({"XDS_ADDRESS": "http://istiod:15012", "XDS_HEADER_X_ONE": "1"})
    assert cfg.ca_target is not None and (cfg.ca_target.host, cfg.ca_target.port) == ("istiod", 15012)
    cfg = load_config({"XDS_ADDRESS": "http://istiod:15012", "CA_ADDRESS": "http://ca:15010",
                       "CA_HEADER_X_TWO": "2"})
    assert cfg.ca_target is not None and (cfg.ca_target.host, cfg.ca_target.port) == ("ca", 15010)
    assert cfg.ca_target.headers == {"x-two": "2"}
    with pytest.raises(ConfigError, match="CA_ROOT_CERT"):
        load_config({"XDS_ADDRESS": "http://istiod:15012", "CA_ADDRESS": "https://ca:15010",
                     "CA_ROOT_CERT": "/nonexistent/root.pem"})


def test_drain_deadline_follows_upstream() -> None:
    assert drain_deadline({}) == 5.0
    assert drain_deadline({"CONNECTION_TERMINATION_DEADLINE": "7s"}) == 7.0
    assert drain_deadline({"TERMINATION_GRACE_PERIOD_SECONDS": "30"}) == 25.0
    assert drain_deadline({"TERMINATION_GRACE_PERIOD_SECONDS": "10"}) == 9.0
    assert drain_deadline({"TERMINATION_GRACE_PERIOD_SECONDS": "1"}) == 1.0


async def test_xds_sync_gates_readiness_and_names_peers(tmp_path: Path, pipe_fds: list[int]) -> None:
    from services.istiod.testing import open_test_istiod
    from services.istiod.world import load_world

    world_file = Path(__file__).resolve().parents[2] / "examples" / "bookinfo.yaml"
    world = load_world(world_file.read_bytes(), "bookinfo.yaml")
    with trio.fail_after(30):
        async with open_test_istiod(world) as istiod, trio.open_nursery() as nursery:
            node = world.nodes[0].name
            cfg = msgspec.structs.replace(config(tmp_path), xds_target=istiod.target(node=node),
                                          node_name=node)
            app: ZtunnelParts = await nursery.start(lambda **kw: run_ztunnel(cfg, sockets=FakeSockets(),
                                                                             **kw))
            snap = Snapshot()  # productpage runs on node-a: its certificate is fetched when its proxies start
            productpage = WorkloadInfo(name="productpage-v1-6f9c7d", namespace="bookinfo",
                                       service_account="bookinfo-productpage")
            snap.entries.append(SnapshotEntry(uid=PodUid("pp"), info=productpage, netns_fd=pipe_fds[0]))
            server = ZdsServer(cfg.inpod_uds, snap, accept_interval=0)
            await nursery.start(server.serve)
            await wait_until(lambda: not app.readiness.blocking())
            assert (await http_get(app.addresses["readiness"][0], "/healthz/ready"))[0] == 200
            dump = json.loads((await http_get(app.addresses["admin"][0], "/config_dump"))[1])
            assert dump["xds"]["workloads"] and dump["config"]["xds_target"]["token"] == "<redacted>"
            assert app.store is not None
            some_ip = next(iter(app.store.workloads.values())).addresses[0]
            peer = app.handler.peers.by_address(some_ip)
            assert peer is not None and peer.workload and peer.namespace
            identity = "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage"
            assert app.mesh is not None
            while not any(c["state"] == "Available" for c in app.mesh.certs.dump()):
                await trio.sleep(0.05)
            dump = json.loads((await http_get(app.addresses["admin"][0], "/config_dump"))[1])
            [cert] = dump["certificates"]
            assert cert["identity"] == identity and cert["state"] == "Available"
            [leaf] = cert["certChain"]
            assert leaf["serialNumber"].isdigit() and leaf["expirationTime"].endswith("Z")
            [pod] = dump["pods"]
            assert pod["identity"] == identity and pod["pool"] == []
            nursery.cancel_scope.cancel()


def test_malloc_trim_is_glibcs_and_callable() -> None:
    trim = host.libc_malloc_trim()
    if trim is None:
        pytest.skip("the C library has no malloc_trim (not glibc)")
    assert trim() in (0, 1)


async def test_free_heap_is_trimmed_every_interval(
    monkeypatch: pytest.MonkeyPatch, autojump_clock: trio.testing.MockClock
) -> None:
    calls: list[float] = []
    monkeypatch.setattr(host, "libc_malloc_trim", lambda: lambda: calls.append(trio.current_time()))
    with trio.move_on_after(host.MALLOC_TRIM_INTERVAL * 3.5):
        await host.trim_malloc_periodically()
    assert calls == [host.MALLOC_TRIM_INTERVAL * k for k in (1, 2, 3)]


def test_help_still_parses_arguments_and_unused_libraries_stay_unloaded(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exited:
        app_module.main(["--help"])
    assert exited.value.code == 0
    assert "INPOD_UDS" in capsys.readouterr().out
    # argparse: only for arguments; prometheus_client: at the first scrape; asyncio, trio_asyncio and grpclib:
    # only with XDS_ADDRESS (run_ztunnel imports the xDS and CA clients then).
    unused = "'argparse', 'prometheus_client', 'asyncio', 'trio_asyncio', 'grpclib'"
    code = f"import sys, services.ztunnel.app; print({{{unused}}} & set(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "set()"
