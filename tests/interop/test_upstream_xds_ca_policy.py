"""Interop with upstream's ztunnel, one bookinfo lab for the module (ours on node-a, upstream's on node-b):
what upstream's ztunnel learned from our istiod stub (xDS), the certificates our CA gave it, the CA refusing
node-b's token for an identity of another node, and the sample world's policies enforced by both ztunnels
alike (the same requests against a pod behind ours and one behind upstream's).

Runs only when AMBIENT_UPSTREAM_ZTUNNEL names a ztunnel built from istio/ztunnel; skipped otherwise.
"""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from ambient.lab import components, lab
from ambient.lab.components import LabPaths
from tests.interop.test_upstream_mixed_lab import UPSTREAM_BIN, pytestmark  # noqa: F401  (skips)
from tests.netns.test_lab_topology import NET_A, NET_B, running_lab

ROOT = Path(__file__).resolve().parents[2]
A, B = f"10.244.{NET_A}.", f"10.244.{NET_B}."
# the sample world, on this run's pod ranges, plus a second ratings pod on node-a (behind our ztunnel)
WORLD = (ROOT / "examples" / "bookinfo.yaml").read_text().replace("10.244.1.", A).replace("10.244.2.", B)
# the L4 policy cases reach pods directly: bookinfo without its waypoint (which admits only itself)
WORLD = WORLD.replace("istio.io/use-waypoint: waypoint", "istio.io/use-waypoint: none")
WORLD = WORLD.replace("services:\n", (
    "  - {name: ratings-v1-a1b2c3, namespace: bookinfo, node: node-a, ips: [" + A + "12],"
    "\n     workload: ratings-v1, serviceAccount: bookinfo-ratings,"
    " labels: {app: ratings, version: v1}}\nservices:\n"), 1)
UPSTREAM_NODE = "node-b"


@pytest.fixture(scope="module")
def prefix(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with running_lab("x", WORLD, tmp_path_factory.mktemp("lab"), ztunnel_bin=UPSTREAM_BIN,
                     upstream_on=[UPSTREAM_NODE]) as name:  # fmt: skip
        yield name


def lab_world(prefix: str) -> dict[str, Any]:
    """The world the lab's istiod was started with (the JSON copy in the run directory)."""
    world: dict[str, Any] = json.loads(LabPaths(lab.require_state(prefix).run_dir).world.read_text())
    return world


def upstream_dump(prefix: str) -> dict[str, Any]:
    state = lab.require_state(prefix)
    dump = lab.ztunnel_dump(lab.plan_of(state), UPSTREAM_NODE)
    assert dump is not None, "upstream's ztunnel did not answer /config_dump"
    return dump


def test_upstream_config_dump_lists_the_worlds_workloads_services_and_policies(prefix: str) -> None:
    world = lab_world(prefix)
    dump = upstream_dump(prefix)
    assert {w["name"] for w in dump["workloads"]} == {p["name"] for p in world["pods"]}
    by_name = {w["name"]: w for w in dump["workloads"]}
    for pod in world["pods"]:
        assert by_name[pod["name"]]["workloadIps"] == pod["ips"], pod["name"]
        assert by_name[pod["name"]]["node"] == pod["node"], pod["name"]
    assert {(s["namespace"], s["name"], tuple(s["vips"])) for s in dump["services"]} == {
        (s["namespace"], s["name"], tuple(f"/{v}" for v in s["vips"])) for s in world["services"]
    }
    assert {(p["namespace"], p["name"], p["action"].lower()) for p in dump["policies"]} == {
        (p["namespace"], p["name"], p["action"]) for p in world["policies"]
    }


def test_upstream_holds_certificates_from_our_ca_for_exactly_its_pods_identities(prefix: str) -> None:
    state = lab.require_state(prefix)
    world = lab_world(prefix)
    ambient_ns = {n["name"] for n in world["namespaces"]
                  if n.get("labels", {}).get("istio.io/dataplane-mode") == "ambient"}  # fmt: skip
    expected = {
        f"spiffe://cluster.local/ns/{p['namespace']}/sa/{p.get('serviceAccount', 'default')}"
        for p in world["pods"]
        if p["node"] == UPSTREAM_NODE and p["namespace"] in ambient_ns
        and p.get("labels", {}).get("istio.io/dataplane-mode") != "none"
    }
    certs = upstream_dump(prefix)["certificates"]
    assert {c["identity"] for c in certs} == expected
    root_file = LabPaths(state.run_dir).node_dir(UPSTREAM_NODE) / components.ROOT_CERT_PATH
    root = "".join(root_file.read_text().split())
    for cert in certs:
        assert cert["state"] == "Available", cert["identity"]
        # the same certificate as the lab's root (upstream re-encodes the PEM: compare without whitespace)
        assert ["".join(base64.b64decode(r["pem"]).decode().split()) for r in cert["rootCerts"]] == [root]


CA_REQUEST = """
import sys, trio
from pathlib import Path
from services.ztunnel.identity.ca_client import GrpcCaClient
from services.ztunnel.identity.errors import CertificateError
from shared.grpc_target import GrpcTarget
from shared.identity import SpiffeId
host, port, root, token, identity = sys.argv[1:]
target = GrpcTarget(host=host, port=int(port), root_cert_pem=Path(root).read_text(),
                    token=Path(token).read_text())
async def main() -> None:
    try:
        await GrpcCaClient(target).fetch(SpiffeId.parse(identity))
    except CertificateError as exc:
        print(exc)
        sys.exit(3)
    print("issued")
trio.run(main)
"""


def ca_request(prefix: str, node: str, identity: str) -> tuple[int, str]:
    """A certificate request to the lab's CA from inside `node`'s netns, with the node's token (the file
    upstream's ztunnel sends as its bearer token) and ImpersonatedIdentity `identity`, as upstream asks."""
    state = lab.require_state(prefix)
    plan = lab.plan_of(state)
    base = LabPaths(state.run_dir).node_dir(node)
    host, _, port = plan.istiod_address.rpartition(":")
    result = subprocess.run(
        ["ip", "netns", "exec", plan.node(node).netns, components.PYTHON, "-c", CA_REQUEST, host, port,
         str(base / components.ROOT_CERT_PATH), str(base / components.TOKEN_PATH), identity],
        capture_output=True, text=True, env=components.tool_env(), cwd=ROOT, check=False,
    )  # fmt: skip
    return result.returncode, result.stdout + result.stderr


def test_node_b_token_gets_its_own_pods_identity_and_is_refused_another_nodes(prefix: str) -> None:
    code, out = ca_request(prefix, UPSTREAM_NODE, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-details")
    assert (code, out.strip()) == (0, "issued"), out
    # productpage runs on node-a only
    code, out = ca_request(prefix, UPSTREAM_NODE, "spiffe://cluster.local/ns/bookinfo/sa/bookinfo-productpage")
    assert code == 3, out
    assert "PERMISSION_DENIED" in out and "node node-b runs no pod" in out, out


def request(prefix: str, pod: str, url: str) -> int:
    """The client's exit code: 0 answered, 52/56 refused (closed by the proxy), 7 cannot connect."""
    result = lab.exec_in_pod(["python", "-m", "services.apps.client", "-m", "5", url], pod=pod, prefix=prefix,
                             capture=True)  # fmt: skip
    return result.returncode


# (client pod, target behind ours, target behind upstream's, outcome): the same request to a pod on each node
POLICY_CASES = [
    # ALLOW ratings-from-reviews: only bookinfo-reviews reaches ratings
    ("reviews-v1-7b8c4f", f"http://{A}12:9080/ratings/0", f"http://{B}12:9080/ratings/0", "allowed"),
    ("sleep-5c6d7e", f"http://{A}12:9080/ratings/0", f"http://{B}12:9080/ratings/0", "refused"),
    ("productpage-v1-6f9c7d", f"http://{A}12:9080/ratings/0", f"http://{B}12:9080/ratings/0", "refused"),
    # no ALLOW policy selects details/reviews: anything in the mesh reaches them
    ("sleep-5c6d7e", f"http://{A}11:9080/reviews/0", f"http://{B}10:9080/details/0", "allowed"),
    # DENY deny-legacy: nothing in bookinfo accepts the legacy pod's address (plaintext, via 15006)
    ("legacy-app-1b2c3d", f"http://{A}11:9080/reviews/0", f"http://{B}10:9080/details/0", "refused"),
    ("legacy-app-1b2c3d", f"http://{A}10:9080/productpage", f"http://{B}11:9080/reviews/0", "refused"),
]


@pytest.mark.parametrize(("client", "ours", "upstreams", "outcome"), POLICY_CASES)
def test_policies_enforced_alike_by_our_ztunnel_and_upstreams(
    prefix: str, client: str, ours: str, upstreams: str, outcome: str
) -> None:
    def seen(code: int) -> str:
        return "allowed" if code == 0 else "refused" if code in (52, 56) else f"exit {code}"

    outcomes = (seen(request(prefix, client, ours)), seen(request(prefix, client, upstreams)))
    assert outcomes == (outcome, outcome)
