"""The CNI-event endpoint: upstream's plugin event socket (`POST /cmdadd`), served on a Unix socket.

The CNI plugin (or the lab, playing kubelet + CNI) posts the new pod's netns path, name, namespace and IPs
before the pod's app starts; the answer is 200 once the pod is redirected (its status `enabled`, or
`pending` while ztunnel has not taken it: the rules are in place either way, so the pod can never run
unredirected), 400 for a malformed request and 500 when enrolment failed (nothing left installed), which
makes the plugin fail the pod's sandbox creation: fail closed.

Body: {"Netns": "/var/run/netns/x", "PodName": "a", "PodNamespace": "ns", "PodUID": "...",
       "IPs": [{"Interface": "eth0", "Address": "10.244.1.5/24", "Gateway": "10.244.1.1"}],
       "ServiceAccount": "sa", "Labels": {...}, "Annotations": {...}}
PodUID, ServiceAccount, Labels and Annotations are this project's extensions, all optional; when a pod
watch knows the pod, its data wins and its eligibility is checked; otherwise PodUID is required and the
request itself is the decision that the pod is ambient.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Callable, Mapping

import msgspec

from services.node_agent.errors import CniRequestError, EnrolmentError
from services.node_agent.lifecycle import NodeAgent
from services.node_agent.model import Pod
from shared.httpd import Request, Response, Router, json_response
from shared.zds.types import PodUid

log = logging.getLogger("node_agent.cni")

DEFAULT_CNI_SOCKET = "/var/run/istio-cni/pluginevent.sock"


class CniIp(msgspec.Struct, frozen=True, kw_only=True, rename="pascal"):
    address: str
    interface: str | None = None
    gateway: str | None = None


class CniAddRequest(msgspec.Struct, frozen=True, kw_only=True, rename="pascal", forbid_unknown_fields=False):
    netns: str
    pod_name: str
    pod_namespace: str
    pod_uid: str | None = msgspec.field(default=None, name="PodUID")
    ips: list[CniIp] = msgspec.field(default_factory=list, name="IPs")
    service_account: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


PodLookup = Callable[[str, str], "tuple[Pod, Mapping[str, str]] | None"]
"""(namespace, name) -> the pod and its namespace's labels from the pod watch's view, or None."""


def parse_add_request(body: bytes) -> CniAddRequest:
    """Decode and validate a /cmdadd body.

    Raises:
        CniRequestError: not JSON, a missing or mistyped field, an empty name or netns, a bad IP.
    """
    try:
        req = msgspec.json.decode(body, type=CniAddRequest)
    except msgspec.ValidationError as exc:
        raise CniRequestError(f"invalid cmdadd request: {exc}") from None
    except msgspec.DecodeError as exc:
        raise CniRequestError(f"cmdadd request is not JSON: {exc}") from None
    for field, value in (
        ("Netns", req.netns),
        ("PodName", req.pod_name),
        ("PodNamespace", req.pod_namespace),
    ):
        if not value.strip():
            raise CniRequestError(f"invalid cmdadd request: {field} is empty")
    for ip in req.ips:
        try:
            ipaddress.ip_interface(ip.address)
        except ValueError:
            raise CniRequestError(f"invalid cmdadd request: {ip.address!r} is not an IP address") from None
    return req


def pod_from_request(req: CniAddRequest, lookup: PodLookup | None) -> tuple[Pod, Mapping[str, str] | None]:
    ips = tuple(str(ipaddress.ip_interface(ip.address).ip) for ip in req.ips)
    known = lookup(req.pod_namespace, req.pod_name) if lookup is not None else None
    if known is not None:
        pod, ns_labels = known
        if req.pod_uid and req.pod_uid != pod.uid:
            raise CniRequestError(
                f"PodUID {req.pod_uid} does not match the pod watch's {pod.uid} for {pod.key}; "
                "is the pod being recreated?"
            )
        return msgspec.structs.replace(pod, netns_path=req.netns, ips=ips or pod.ips), ns_labels
    if not req.pod_uid:
        raise CniRequestError(
            f"pod {req.pod_namespace}/{req.pod_name} is unknown to the pod watch; the request needs PodUID"
        )
    pod = Pod(
        uid=PodUid(req.pod_uid),
        name=req.pod_name,
        namespace=req.pod_namespace,
        service_account=req.service_account or "default",
        labels=dict(req.labels or {}),
        annotations=dict(req.annotations or {}),
        ips=ips,
        netns_path=req.netns,
    )
    return pod, None


class CniEndpoint:
    """Routes of the CNI-event socket: POST /cmdadd, GET /healthz."""

    def __init__(self, agent: NodeAgent, lookup: PodLookup | None = None) -> None:
        self.agent = agent
        self.lookup = lookup
        self.route = Router(
            {"/cmdadd": self._post_cmdadd, "/healthz": self._health, "/readyz": self._health},
            fallback=self._no_such_endpoint,
        )
        """The socket's handler (shared.httpd)."""

    async def _post_cmdadd(self, request: Request) -> Response:
        if request.method != "POST":
            return json_response({"error": "use POST"}, 405)
        return await self.cmdadd(request.body)

    @staticmethod
    async def _health(request: Request) -> Response:
        return json_response({"status": "ok"})

    @staticmethod
    async def _no_such_endpoint(request: Request) -> Response:
        return json_response({"error": f"no such endpoint {request.path}"}, 404)

    async def cmdadd(self, body: bytes) -> Response:
        try:
            req = parse_add_request(body)
            pod, ns_labels = pod_from_request(req, self.lookup)
        except CniRequestError as exc:
            log.warning("CNI event rejected", extra={"fields": [("error", str(exc))]})
            return json_response({"error": str(exc)}, 400)
        try:
            decision = await self.agent.cni_add(pod, ns_labels)
        except EnrolmentError as exc:
            log.error("CNI event: enrolment failed",
                      extra={"fields": [*pod.log_fields(), ("error", str(exc))]})
            return json_response({"error": str(exc), "retryable": exc.retryable}, 500)
        if not decision.eligible:
            log.info("CNI event: pod not ambient; skipped",
                     extra={"fields": [*pod.log_fields(), ("reason", decision.reason)]})
            return json_response({"status": "skipped", "reason": decision.reason})
        return json_response({"status": self.agent.status_of(pod.uid), "reason": decision.reason})
