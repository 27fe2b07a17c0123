"""The ZDS conformance kit's client role against upstream's ztunnel, observed through its own surfaces
(`--observe admin`: /config_dump `workloadState` on 127.0.0.1:15000, /healthz/ready on 15021, the pod's
15008 listener), standing alone: the kit's scripted node agent on INPOD_UDS, a fake CA and an empty local
xDS config, so no control plane is involved.

Runs only when AMBIENT_UPSTREAM_ZTUNNEL names a ztunnel built from istio/ztunnel; skipped otherwise.
docs/zds-conformance.md lists the result of each case against upstream.
"""

from __future__ import annotations

from pathlib import Path

import trio

from ambient import conformance
from ambient.conformance import ClientOptions, Status
from tests.interop.test_upstream_mixed_lab import UPSTREAM_BIN, pytestmark  # noqa: F401  (skips)

# upstream's own settings for running it without istiod: the kit's socket, a fake CA, an empty local config
UPSTREAM_ENV = [
    "INPOD_UDS={socket}",
    "FAKE_CA=true",
    "XDS_ADDRESS=",
    "LOCAL_XDS={}",
    "IPV6_ENABLED=false",
    "NODE_NAME=conformance",
    "RUST_LOG=info",
]


async def test_client_cases_against_upstreams_ztunnel(tmp_path: Path) -> None:
    opts = ClientOptions(command=UPSTREAM_BIN, env=UPSTREAM_ENV, observe=conformance.OBSERVE_ADMIN)
    with trio.fail_after(300):
        run = await conformance.run_client_kit(opts, tmp_path)
    results = {r.number: r for r in run.results}
    failed = {n: r.details for n, r in results.items() if r.status is not Status.PASS}
    assert failed == {}, run.log_tail
    # cases 9 and 10: upstream treats these protocol errors as fatal and exits 1 (the kit restarts it)
    for number in (9, 10):
        assert any("exited with code 1 (upstream behaviour)" in d for d in results[number].details), number
