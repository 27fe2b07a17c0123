"""The waypoint process (run_waypoint) against the istiod stub: its certificate from the CA, its services,
endpoints and WaypointConfig over delta ADS as router~IP~POD.NS~..., readiness, a request allowed and one
denied by the world's L7 policy, and the request metrics on its stats port."""

from __future__ import annotations

import functools
from pathlib import Path

import trio

from services.apps.http import fetch
from services.istiod.ca import CertificateAuthority
from services.istiod.testing import open_test_istiod
from services.istiod.world import load_world
from services.waypoint.app import load_settings, run_waypoint
from services.ztunnel.hbone.pool import open_hbone_connection
from services.ztunnel.hbone.tls import TlsContextCache
from shared.identity import SpiffeId
from tests.service.test_hbone_helpers import FakeCerts
from tests.service.waypoint_lab import FakePod, HttpClient, run_pod

WP_IP, APP_IP = "127.0.88.51", "127.0.88.52"
WORLD = f"""
nodes: [{{name: node-a}}]
namespaces: [{{name: ns, labels: {{istio.io/dataplane-mode: ambient, istio.io/use-waypoint: wp}}}}]
pods:
  - {{name: wp-0, namespace: ns, node: node-a, ips: [{WP_IP}], serviceAccount: waypoint, labels: {{app: wp}}}}
  - {{name: a, namespace: ns, node: node-a, ips: [{APP_IP}], labels: {{app: a}}}}
services:
  - {{name: wp, namespace: ns, vips: [10.96.0.99], selector: {{app: wp}}, ports: [{{port: 15008}}]}}
  - {{name: a, namespace: ns, vips: [10.96.0.1], selector: {{app: a}},
     ports: [{{port: 80, targetPort: 9080, appProtocol: http}}]}}
waypoints: [{{name: wp, namespace: ns, pod: wp-0}}]
authorizationPolicies:
  - {{name: get-only, namespace: ns, targetRefs: [{{kind: Gateway, name: wp}}],
     rules: [{{to: [{{operation: {{methods: [GET]}}}}]}}]}}
""".encode()
WAYPOINT = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="waypoint")
CLIENT = SpiffeId(trust_domain="cluster.local", namespace="ns", service_account="sleep")


async def test_the_waypoint_process_serves_what_the_control_plane_says(tmp_path: Path) -> None:
    ca = CertificateAuthority.create("cluster.local")
    certs = FakeCerts(ca)
    with trio.fail_after(60):
        async with open_test_istiod(load_world(WORLD, "w.yaml"), ca=ca) as istiod, \
                trio.open_nursery() as nursery:
            root = tmp_path / "root-cert.pem"
            root.write_text(ca.root_pem)
            token = tmp_path / "istio-token"
            token.write_text(istiod.tokens["node-a"])
            settings = load_settings({
                "XDS_ADDRESS": f"https://127.0.0.1:{istiod.port}", "XDS_ROOT_CERT": str(root),
                "XDS_TOKEN_FILE": str(token), "INSTANCE_IP": WP_IP, "POD_NAME": "wp-0",
                "POD_NAMESPACE": "ns", "SERVICE_ACCOUNT": "waypoint", "NODE_NAME": "node-a",
                "WAYPOINT_HBONE_ADDR": f"{WP_IP}:0", "STATS_ADDR": "127.0.0.1:0",
                "READINESS_ADDR": "127.0.0.1:0"})
            assert settings.identity == WAYPOINT
            app = FakePod("a", APP_IP, identity=SpiffeId(trust_domain="cluster.local", namespace="ns",
                                                            service_account="default"))
            await run_pod(nursery, app, certs, [ca.root_pem])
            addresses = await nursery.start(functools.partial(run_waypoint, settings))
            ready_url = "http://{}:{}/healthz/ready".format(*addresses["readiness"][0])
            while (await fetch(ready_url)).status != 200:  # xDS synced and its own workload known
                await trio.sleep(0.05)
            bundle = await certs.fetch_certificate(CLIENT)
            async with open_hbone_connection(addresses["hbone"][0], bundle=bundle, expected=[WAYPOINT],
                                             contexts=TlsContextCache([ca.root_pem])) as conn:
                client = HttpClient(await conn.open_stream(("10.96.0.1", 80), forwarded_for=("10.0.0.9", 1)),
                                    "a.ns:80")
                allowed = await client.request("GET", "/hello")
                denied = await client.request("POST", "/hello", body=b"x")
            metrics = (await fetch("http://{}:{}/metrics".format(*addresses["stats"][0]))).body.decode()
            nursery.cancel_scope.cancel()
    assert allowed == (200, b"a GET /hello 0")
    assert denied == (403, b"RBAC: access denied")
    assert [r.method for r in app.requests] == ["GET"]
    lines = [line for line in metrics.splitlines() if line.startswith("istio_requests_total{")]
    assert any('reporter="waypoint"' in line and 'response_code="403"' in line for line in lines), lines
    assert any('destination_workload="a"' in line and 'response_code="200"' in line for line in lines), lines
