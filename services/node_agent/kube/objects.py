"""The fields of Kubernetes Pods and Namespaces the node agent reads, as msgspec types (unknown fields are
ignored; the metadata is shared/kube/objects.py's), and the conversion to the agent's own `Pod`."""

from __future__ import annotations

import msgspec

from services.node_agent.model import Pod
from shared.kube.objects import ObjectMeta
from shared.zds.types import PodUid

TERMINATED_PHASES = frozenset({"Succeeded", "Failed"})


class PodIP(msgspec.Struct, kw_only=True):
    ip: str = ""


class PodSpec(msgspec.Struct, kw_only=True, rename="camel"):
    node_name: str = ""
    host_network: bool = False
    service_account_name: str = ""


class PodStatus(msgspec.Struct, kw_only=True, rename="camel"):
    phase: str = ""
    pod_ip: str = ""
    pod_i_ps: list[PodIP] | None = msgspec.field(default=None, name="podIPs")


class KubePod(msgspec.Struct, kw_only=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)
    spec: PodSpec = msgspec.field(default_factory=PodSpec)
    status: PodStatus = msgspec.field(default_factory=PodStatus)

    @property
    def ips(self) -> tuple[str, ...]:
        listed = tuple(p.ip for p in self.status.pod_i_ps or () if p.ip)
        return listed or ((self.status.pod_ip,) if self.status.pod_ip else ())

    def to_pod(self) -> Pod:
        """The agent's view: a pod without an IP yet is just that (the lifecycle waits for it)."""
        meta = self.metadata
        return Pod(
            uid=PodUid(meta.uid),
            name=meta.name,
            namespace=meta.namespace,
            service_account=self.spec.service_account_name or "default",
            labels=dict(meta.labels or {}),
            annotations=dict(meta.annotations or {}),
            ips=self.ips,
            host_network=self.spec.host_network,
            terminated=self.status.phase in TERMINATED_PHASES,
        )


class KubeNamespace(msgspec.Struct, kw_only=True):
    metadata: ObjectMeta = msgspec.field(default_factory=ObjectMeta)

    @property
    def labels(self) -> dict[str, str]:
        return dict(self.metadata.labels or {})

