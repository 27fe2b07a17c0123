"""Which pods the node agent enrols. Pure: labels and annotations in, a decision out.

Upstream's default enablement selectors: a pod is ambient when it carries `istio.io/dataplane-mode=ambient`
itself, or when its namespace does and the pod does not opt out with `istio.io/dataplane-mode=none` (any
value other than `none` on the pod keeps the namespace's choice). Pods with a sidecar (annotation
`sidecar.istio.io/status`), ztunnel's own pods (`app=ztunnel` in the system namespace), waypoint proxies
(label `gateway.istio.io/managed=istio.io-mesh-controller`: they are the mesh's own proxies) and host-network
pods (redirecting them would capture the node's own traffic) never are.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec

from services.node_agent.model import (
    ANNOTATION_SIDECAR_STATUS,
    DATAPLANE_MODE_AMBIENT,
    DATAPLANE_MODE_NONE,
    LABEL_DATAPLANE_MODE,
    Pod,
)

DEFAULT_SYSTEM_NAMESPACE = "istio-system"
LABEL_GATEWAY_MANAGED = "gateway.istio.io/managed"
WAYPOINT_CONTROLLER = "istio.io-mesh-controller"


class Decision(msgspec.Struct, frozen=True, kw_only=True):
    eligible: bool
    reason: str


def decide(
    pod: Pod, namespace_labels: Mapping[str, str], *, system_namespace: str = DEFAULT_SYSTEM_NAMESPACE
) -> Decision:
    """Whether `pod` belongs in the mesh, with the reason (for logs and the CNI endpoint's answer)."""
    if pod.labels.get("app") == "ztunnel" and pod.namespace == system_namespace:
        return Decision(eligible=False, reason="ztunnel's own pod")
    if pod.labels.get(LABEL_GATEWAY_MANAGED) == WAYPOINT_CONTROLLER:
        return Decision(eligible=False, reason="waypoint proxy pod")
    if ANNOTATION_SIDECAR_STATUS in pod.annotations:
        return Decision(eligible=False, reason=f"has a sidecar ({ANNOTATION_SIDECAR_STATUS})")
    if pod.host_network:
        return Decision(eligible=False, reason="host-network pod (shares the node's namespace)")
    if pod.terminated:
        return Decision(eligible=False, reason="pod has terminated")
    pod_mode = pod.labels.get(LABEL_DATAPLANE_MODE)
    if pod_mode == DATAPLANE_MODE_AMBIENT:
        return Decision(eligible=True, reason=f"pod label {LABEL_DATAPLANE_MODE}={DATAPLANE_MODE_AMBIENT}")
    if namespace_labels.get(LABEL_DATAPLANE_MODE) == DATAPLANE_MODE_AMBIENT:
        if pod_mode == DATAPLANE_MODE_NONE:
            return Decision(eligible=False, reason=f"pod opts out with {LABEL_DATAPLANE_MODE}=none")
        return Decision(eligible=True, reason=f"namespace label {LABEL_DATAPLANE_MODE}=ambient")
    return Decision(eligible=False, reason=f"neither pod nor namespace has {LABEL_DATAPLANE_MODE}=ambient")
