"""`ambient bench --only conns,churn` with small counts (root): every held connection echoes through the
ztunnel pair, each costs about one fd in each ztunnel, the short connections all complete without fd
growth, and the lab is removed. A ztunnel that dropped connections or leaked sockets fails here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
HELD = 300
CHURN = 400


@pytest.mark.timeout(300)
def test_bench_conns_and_churn_hold_echo_and_leak_nothing(tmp_path: Path) -> None:
    prefix = f"bload{os.getpid() % 10000}"
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-c", "from ambient.cli import main; main()", "bench", "--only", "conns,churn",
         "--idle-conns", str(HELD), "--churn-conns", str(CHURN), "--out", str(out), "--prefix", prefix],
        cwd=REPO, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    try:
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads((out / "bench.json").read_text())
        scenarios = {s["name"]: s["arms"]["mesh"]["runs"][0] for s in report["scenarios"]}
        conns, churn = scenarios["conns"], scenarios["churn"]
        assert conns["held"] == HELD and conns["echoed"] == HELD and conns["all_echoed"] == 1.0
        for role in ("client", "server"):
            # one socket per relayed connection on each side (HBONE connections are shared by many)
            assert 0.9 <= conns[f"{role}_fds_per_conn"] <= 1.2, (role, conns)
            assert conns[f"{role}_kib_per_conn"] > 0, (role, conns)
            assert churn[f"{role}_fd_growth"] <= 10, (role, churn)
        assert churn["completed"] == CHURN and churn["errors"] == 0
        assert "| idle connections held at once, every one echoed" in (out / "benchmarks.md").read_text()
    finally:
        assert not Path(f"/run/ambient-lab/{prefix}").exists(), "the bench lab was not removed"
        listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True).stdout
        assert f"{prefix}-" not in listed
