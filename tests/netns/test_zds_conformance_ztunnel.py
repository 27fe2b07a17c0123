"""The ZDS conformance kit's client role against our real `ztunnel` process, run in its own netns.

ztunnel binds real listeners in the pods the kit creates; case 15 (proxy start failure) is provoked by
the kit occupying port 15008 inside a pod namespace, the way a real port clash would."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_ztunnel_passes_every_client_case(make_netns: Callable[[str], str]) -> None:
    node = make_netns("ztnode")
    ztunnel = [sys.executable, "-c", "from services.ztunnel.app import main; main()"]
    client_cmd = shlex.join(["ip", "netns", "exec", node, *ztunnel])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ambient.zds",
            "zds-conformance",
            "--json",
            "--netns",
            "real",
            "--client-cmd",
            client_cmd,
            "--client-env",
            "INPOD_UDS={socket}",
            "--client-env",
            "ZTUNNEL_ZDS_STATE_FILE={state}",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    results = json.loads(proc.stdout) if proc.stdout.strip() else []
    failed = [r for r in results if r["status"] != "pass"]
    assert proc.returncode == 0 and results and not failed, (failed, proc.stderr[-3000:])
    assert {r["number"] for r in results} == {1, *range(3, 17), 19}
