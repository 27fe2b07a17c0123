"""The issue's "done when": `istiod-stub --world examples/bookinfo.yaml` as a real process over TLS, a
ztunnel-side xDS client and a node-agent pod watch syncing from it, `ambient world` changes reaching both."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import trio

from services.node_agent.podwatch import PodSnapshot, PodUpserted, open_pod_watch
from services.ztunnel.state.store import StateStore
from services.ztunnel.xds.client import XdsClient, XdsClientConfig
from shared.aio import GrpcTarget
from tests.istiod_process import ROOT, run_stub


async def ambient(state: Path, port: int, *args: str) -> None:
    env = {**os.environ, "AMBIENT_ISTIOD": f"127.0.0.1:{port}", "AMBIENT_ISTIOD_STATE": str(state)}
    result = await trio.run_process(
        [sys.executable, "-c", "from ambient.cli import main; main()", "world", *args],
        cwd=ROOT,
        env=env,
        capture_stdout=True,
        capture_stderr=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr.decode()


async def test_clients_sync_from_the_process_and_see_cli_changes(tmp_path: Path) -> None:
    with trio.fail_after(60):
        async with run_stub(tmp_path) as port:
            root = (tmp_path / "root-cert.pem").read_text()
            token = (tmp_path / "tokens" / "node-a.token").read_text().strip()
            target = GrpcTarget(host="127.0.0.1", port=port, root_cert_pem=root, token=token)
            store = StateStore()
            client = XdsClient(target, store, XdsClientConfig(node_id="ztunnel~127.0.0.1~z.istio-system~x"))
            async with trio.open_nursery() as nursery, open_pod_watch(target, "node-a") as watch:
                await nursery.start(client.run)
                await client.wait_synced()
                assert len(store.workloads) == 8
                snapshot = await watch.__anext__()
                assert isinstance(snapshot, PodSnapshot) and len(snapshot.pods) == 4

                await ambient(
                    tmp_path,
                    port,
                    "pod",
                    "add",
                    "sleep/extra",
                    "--node",
                    "node-a",
                    "--ip",
                    "10.244.1.77",
                    "--label",
                    "app=extra",
                )
                await store.wait_for(lambda s: s.workload_by_ip("10.244.1.77") is not None)
                event = await watch.__anext__()
                assert isinstance(event, PodUpserted) and event.pod.name == "extra"

                await ambient(tmp_path, port, "label", "pod", "sleep/extra", "istio.io/dataplane-mode=none")
                event = await watch.__anext__()
                assert isinstance(event, PodUpserted) and not event.pod.is_ambient
                nursery.cancel_scope.cancel()


def test_kubernetes_mode_with_a_bad_kubeconfig_fails_in_one_line(tmp_path: Path) -> None:
    stub = [sys.executable, "-m", "services.istiod.app", "--listen", "127.0.0.1:0", "--state-dir",
            str(tmp_path / "state")]  # fmt: skip
    missing = tmp_path / "no-such-kubeconfig"
    result = subprocess.run([*stub, "--kubernetes", "--kubeconfig", str(missing)], cwd=ROOT,
                            capture_output=True, text=True, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if "error" in line]
    assert error.startswith(f"istiod-stub: error: cannot load the Kubernetes configuration from {missing}")
    result = subprocess.run([*stub, "--kubeconfig", str(missing)], cwd=ROOT, capture_output=True, text=True,
                            timeout=60, check=False)  # fmt: skip
    assert result.returncode == 2 and "--kubeconfig is for --kubernetes" in result.stderr
