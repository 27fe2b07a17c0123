"""deploy/kubernetes/ against a real kube-apiserver: every manifest passes a server-side dry run (validation
and admission), and once applied each ServiceAccount may do what its process does, and not more."""

from __future__ import annotations

from typing import Any

import yaml

from ambient.kube.apiserver import ApiServer
from tests.kubernetes.harness import DEPLOY, apply_crds

SYSTEM = "istio-system"


def manifests() -> list[dict[str, Any]]:
    objects = []
    for path in sorted(DEPLOY.rglob("*.yaml")):
        objects += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return objects


async def test_every_manifest_passes_a_server_side_dry_run(api: ApiServer) -> None:
    objects = manifests()
    kinds = {o["kind"] for o in objects}
    assert {"DaemonSet", "Deployment", "ServiceAccount", "ClusterRole", "ClusterRoleBinding",
            "CustomResourceDefinition"} <= kinds  # fmt: skip
    # the namespace and the CRD must exist before what lives in them can be dry-run
    await apply_crds(api)
    await api.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    out = await api.kubectl("apply", "--dry-run=server", "-o", "name", "--recursive", "-f", str(DEPLOY))
    applied = sorted(out.split())
    expected = sorted(
        f"{o['kind'].lower()}{'.' + o['apiVersion'].split('/')[0] if '/' in o['apiVersion'] else ''}"
        f"/{o['metadata']['name']}"
        for o in objects
    )
    assert applied == expected
    # a dry run changes nothing
    assert await api.kubectl("get", "daemonsets", "-A", "-o", "name") == ""


async def can_i(api: ApiServer, account: str, verb: str, resource: str, *extra: str) -> bool:
    out = await api.kubectl("auth", "can-i", verb, resource, *extra,
                            f"--as=system:serviceaccount:{SYSTEM}:{account}", check=False)  # fmt: skip
    return out.strip() == "yes"


async def test_each_service_account_may_do_what_its_process_does(api: ApiServer) -> None:
    await apply_crds(api)
    await api.kubectl("apply", "-f", str(DEPLOY / "namespace.yaml"))
    await api.kubectl("apply", "--recursive", "-f", str(DEPLOY))
    # the node agent: its node's pods and every namespace (list+watch), the redirection annotation
    for verb in ("get", "list", "watch"):
        assert await can_i(api, "istio-cni", verb, "pods", "-A")
        assert await can_i(api, "istio-cni", verb, "namespaces")
    assert await can_i(api, "istio-cni", "patch", "pods", "--subresource=status", "-n", "bookinfo")
    assert not await can_i(api, "istio-cni", "patch", "pods", "-n", "bookinfo")
    assert not await can_i(api, "istio-cni", "delete", "pods", "-n", "bookinfo")
    assert not await can_i(api, "istio-cni", "list", "secrets", "-A")
    # the stub: the five collections its world is made of, read-only
    for resource in ("nodes", "namespaces", "pods", "services", "authorizationpolicies.security.istio.io"):
        for verb in ("list", "watch"):
            assert await can_i(api, "istiod", verb, resource, "-A"), (verb, resource)
    assert not await can_i(api, "istiod", "patch", "pods", "-A")
    assert not await can_i(api, "istiod", "list", "secrets", "-A")
    # ztunnel talks only to the control plane
    assert not await can_i(api, "ztunnel", "list", "pods", "-A")
