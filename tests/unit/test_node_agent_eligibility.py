"""The eligibility matrix (upstream's default enablement selectors)."""

from __future__ import annotations

import pytest

from services.node_agent.eligibility import decide
from services.node_agent.model import Pod
from shared.zds.types import PodUid

MODE = "istio.io/dataplane-mode"


def pod(labels: dict[str, str], annotations: dict[str, str] | None = None, namespace: str = "default") -> Pod:
    return Pod(uid=PodUid("u"), name="p", namespace=namespace, labels=labels, annotations=annotations or {})


@pytest.mark.parametrize(
    ("pod_labels", "ns_labels", "annotations", "namespace", "eligible"),
    [
        ({MODE: "ambient"}, {}, {}, "default", True),  # pod label
        ({}, {MODE: "ambient"}, {}, "default", True),  # namespace label
        ({MODE: "none"}, {MODE: "ambient"}, {}, "default", False),  # namespace ambient, pod opts out
        ({MODE: "other"}, {MODE: "ambient"}, {}, "default", True),  # only `none` opts out
        ({MODE: "ambient"}, {}, {"sidecar.istio.io/status": "{}"}, "default", False),  # sidecar pod
        ({}, {MODE: "ambient"}, {"sidecar.istio.io/status": "{}"}, "default", False),
        ({MODE: "ambient", "app": "ztunnel"}, {}, {}, "istio-system", False),  # ztunnel's own pod
        ({MODE: "ambient", "app": "ztunnel"}, {}, {}, "default", True),  # only in the system namespace
        ({}, {}, {}, "default", False),
        ({}, {MODE: "none"}, {}, "default", False),
        ({MODE: "none"}, {}, {}, "default", False),
    ],
)
def test_eligibility_matrix(
    pod_labels: dict[str, str],
    ns_labels: dict[str, str],
    annotations: dict[str, str],
    namespace: str,
    eligible: bool,
) -> None:
    decision = decide(pod(pod_labels, annotations, namespace), ns_labels)
    assert decision.eligible is eligible
    assert decision.reason


def test_terminated_pod_is_not_eligible() -> None:
    p = Pod(uid=PodUid("u"), name="p", namespace="d", labels={MODE: "ambient"}, terminated=True)
    assert not decide(p, {}).eligible


def test_host_network_pod_is_not_eligible() -> None:
    p = Pod(uid=PodUid("u"), name="p", namespace="d", labels={MODE: "ambient"}, host_network=True)
    assert not decide(p, {}).eligible
