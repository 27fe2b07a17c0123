"""`ambient bench --quick` end to end (root): every scenario is in the JSON, both arms for traffic, with
positive figures. The figures themselves are not judged: the benchmark is a command that prints them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from ambient.bench.report import SWEEP_RATES
from ambient.bench.sweep import metric as sweep_metric

# Root is handled by tests/conftest.py (skip locally, fail in CI). A missing iperf3 fails in CI as well.
pytestmark = pytest.mark.skipif(
    shutil.which("iperf3") is None and os.environ.get("CI") != "true",
    reason="needs iperf3 (apt-get install iperf3)",
)

REPO = Path(__file__).resolve().parents[2]
TRAFFIC = {
    "bulk_1": ["mb_s"],
    "bulk_4": ["mb_s"],
    "rr": ["p50_ms", "p90_ms", "p99_ms", "rps"],
    "crr": ["cps"],
}
MESH_ONLY = {
    "ztunnel": ["client_vcpu_per_1k", "server_vcpu_per_1k", "client_rss_mib", "server_rss_mib"],
    "enrol": ["p50_ms", "p99_ms", "total_s", "rss_after_mib"],
    "sweep": [sweep_metric(role, rate) for role in ("client", "server") for rate in SWEEP_RATES],
}


@pytest.mark.timeout(600)
def test_bench_quick_writes_every_scenario_for_both_arms(tmp_path: Path) -> None:
    prefix = f"bsmoke{os.getpid() % 10000}"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", "from ambient.cli import main; main()", "bench", "--quick",
         "--seconds", "0.5", "--reps", "2", "--enrol-pods", "3", "--out", str(out), "--prefix", prefix],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not Path(f"/run/ambient-lab/{prefix}").exists(), "the bench lab was not removed"
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
    assert f"{prefix}-" not in listed

    report = json.loads((out / "bench.json").read_text())
    scenarios = {s["name"]: s for s in report["scenarios"]}
    for name, metrics in TRAFFIC.items():
        assert set(scenarios[name]["arms"]) == {"baseline", "mesh"}, name
        for arm in ("baseline", "mesh"):
            stats = scenarios[name]["arms"][arm]["stats"]
            assert len(scenarios[name]["arms"][arm]["runs"]) == 2, (name, arm)
            for metric in metrics:
                assert stats[metric]["median"] > 0, (name, arm, metric)
        for metric in metrics:
            assert metric in scenarios[name]["added"]
    for name, metrics in MESH_ONLY.items():
        assert scenarios[name]["mesh_only"] is True
        for metric in metrics:
            assert scenarios[name]["arms"]["mesh"]["stats"][metric]["median"] > 0, (name, metric)
    assert report["generator"]["rr_closed_rps"] > 0
    assert report["machine"]["vcpus"] > 0
    table = (out / "benchmarks.md").read_text()
    assert "| what | no mesh | mesh |" in table
