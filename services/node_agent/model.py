"""Domain types of the node agent: the pod as the agent sees it, whatever source it came from."""

from __future__ import annotations

import msgspec

from shared.logs import Field
from shared.zds.types import PodUid, WorkloadInfo

LABEL_DATAPLANE_MODE = "istio.io/dataplane-mode"
DATAPLANE_MODE_AMBIENT = "ambient"
DATAPLANE_MODE_NONE = "none"
ANNOTATION_SIDECAR_STATUS = "sidecar.istio.io/status"
ANNOTATION_REDIRECTION = "ambient.istio.io/redirection"
ANNOTATION_DNS_CAPTURE = "ambient.istio.io/dns-capture"
ANNOTATION_BYPASS_INBOUND = "ambient.istio.io/bypass-inbound-capture"
ANNOTATION_VIRTUAL_INTERFACES = "istio.io/reroute-virtual-interfaces"

STATUS_PENDING = "pending"
STATUS_ENABLED = "enabled"


class Pod(msgspec.Struct, frozen=True, kw_only=True):
    """One pod on this node, as delivered by a pod source (pod watch, CNI event, snapshot)."""

    uid: PodUid
    name: str
    namespace: str
    service_account: str = "default"
    labels: dict[str, str] = msgspec.field(default_factory=dict)
    annotations: dict[str, str] = msgspec.field(default_factory=dict)
    ips: tuple[str, ...] = ()
    netns_path: str | None = None
    """Where the pod's netns can be opened (CNI_NETNS, /run/netns/NAME); None when only a scan can find it."""
    terminated: bool = False
    host_network: bool = False

    @property
    def workload_info(self) -> WorkloadInfo:
        return WorkloadInfo(name=self.name, namespace=self.namespace, service_account=self.service_account)

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def log_fields(self) -> list[Field]:
        """The pod in a log line: its namespace and name, as upstream's node agent names it."""
        return [("namespace", self.namespace), ("name", self.name)]


class Namespace(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    labels: dict[str, str] = msgspec.field(default_factory=dict)
